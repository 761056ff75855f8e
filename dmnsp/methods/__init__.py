"""Continual-learning methods, one file each, behind the :class:`~dmnsp.methods.base.Method`
interface, and the registry that names them (:mod:`dmnsp.methods.registry`).

Adding a method: write ``dmnsp/methods/<name>.py`` with a ``Method`` subclass decorated with
``@register``, import it below, and add its name to the ``method`` enums of
``dmnsp/schemas/run.schema.yaml`` and ``workflow/schemas/config.schema.yaml`` (a test checks them);
README.md, "Adding a method", lists the hooks a method may override.
Importing this package imports no torch (the planner reads it at Snakefile parse time).
"""

# The registration of each method: importing its file runs its @register.
from . import dmnsp, finetune, lwf, moe_adapters, rapf, zeroshot  # noqa: F401
from .base import LOGIT_SCALE_BY_MODE, NUMERICS_BY_MODE, TRAINING_KEYS, Method, MethodState, TaskContext
from .registry import (
    UnknownMethodError,
    Variant,
    defaults_for,
    get,
    names,
    reads_key,
    register,
    run_label,
    variant,
    variants,
)

__all__ = [
    "LOGIT_SCALE_BY_MODE",
    "NUMERICS_BY_MODE",
    "TRAINING_KEYS",
    "Method",
    "MethodState",
    "TaskContext",
    "UnknownMethodError",
    "Variant",
    "defaults_for",
    "get",
    "names",
    "reads_key",
    "register",
    "run_label",
    "variant",
    "variants",
]
