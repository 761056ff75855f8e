"""The method registry: names → :class:`~dmnsp.methods.base.Method` classes, and what the planner
and the tables ask of them (which keys a run reads, its label, the variants)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .base import LOGIT_SCALE_BY_MODE, NUMERICS_BY_MODE, TRAINING_KEYS, Method

_REGISTRY: dict[str, type[Method]] = {}


@dataclass(frozen=True)
class Variant:
    """A named variant of a method (a workflow ablation): run-key switches, keys without effect."""

    method: str
    switches: Mapping[str, Any] = field(default_factory=dict)
    ignores: frozenset = frozenset()


class UnknownMethodError(KeyError):
    """No method or variant of that name is registered."""

    def __str__(self) -> str:
        return str(self.args[0])


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``get(cls.name)``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {', '.join(names())}") from None


def names() -> list[str]:
    """Registered method names, in table order."""
    return sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].order, n))


def variants() -> dict[str, Variant]:
    """Every method's named variants (the workflow's ``ablations``), by name."""
    out = {}
    for name in names():
        cls = _REGISTRY[name]
        for key, switches in cls.variants.items():
            out[key] = Variant(name, dict(switches), frozenset(cls.variant_ignores.get(key, ())))
    return out


def variant(name: str) -> Variant:
    """The variant (ablation) called ``name``."""
    try:
        return variants()[name]
    except KeyError:
        raise UnknownMethodError(f"{name!r} is not one of {sorted(variants())}") from None


def reads_key(method: str, key: str, variant_name: str | None = None) -> bool:
    """Whether runs of ``method`` (in variant ``variant_name``) read run key ``key`` (dotted).

    Training keys are read by methods that train; a key another method owns is not read; a
    variant may make keys irrelevant. The planner never duplicates a run over a key it does not read.
    """
    cls = get(method)
    if key in TRAINING_KEYS and not cls.trains or key in cls.ignores:
        return False
    if any(other.owns(key) for other in _REGISTRY.values() if other is not cls):
        return False
    return not (variant_name and key in variant(variant_name).ignores)


def defaults_for(method: str, dataset: str, split: str) -> dict[str, Any]:
    """The run keys ``method`` sets by default on ``dataset`` and ``split`` (``"10-10"``): every
    matching row of its :attr:`~dmnsp.methods.base.Method.defaults` table, in order (dotted keys)."""
    out: dict[str, Any] = {}
    for row_dataset, row_split, keys in get(method).defaults:
        if row_dataset in ("*", dataset) and row_split in ("*", split):
            out.update(keys)
    return out


def run_label(cfg: Mapping[str, Any], searched: bool = False) -> str:
    """The one label of a run in tables and legends, from its resolved config.

    The method's label, then in parentheses: ``mode=clean`` when not faithful, the method's own
    switches that differ from their defaults (``dmnsp (towers=both, layers=single)``), and
    ``searched`` for the follow-up runs of a hyperparameter search. Grid values and seeds are not
    part of it (the tables show them as columns), so a label does not change when a grid grows.
    """
    cls = get(str(cfg.get("method")))
    parts = []
    mode = (cfg.get("projection") or {}).get("mode") or "faithful"
    if mode != "faithful":
        parts.append(f"mode={mode}")
    parts += cls.label_parts(cfg)
    numerics = (cfg.get("optimizer") or {}).get("numerics")
    if cls.trains and numerics not in (None, NUMERICS_BY_MODE.get(mode)):
        parts.append(f"numerics={numerics}")
    scale = cfg.get("logit_scale")
    if cls.trains and scale not in (None, LOGIT_SCALE_BY_MODE.get(mode)):
        parts.append(f"logit_scale={scale if isinstance(scale, str) else format(scale, 'g')}")
    if searched:
        parts.append("searched")
    base = cls.label or cls.name
    return f"{base} ({', '.join(parts)})" if parts else base
