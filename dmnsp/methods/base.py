"""The interface of a continual-learning method: what it reads, how tables show it, and its hooks
into the generic training loop (:func:`dmnsp.train.train_task`) and evaluation.

Every path that builds a model (``run``, ``train-task``, ``evaluate``, a search trial) calls
:meth:`Method.prepare_model` once, before the initial adapters are recorded, a checkpoint is
restored or parameters are collected. For one task the loop then calls
:meth:`Method.start_task`; takes the optimiser of :meth:`Method.optimizer` over
:meth:`Method.trainable` and the step count and learning rates of :meth:`Method.schedule`; every
step :meth:`Method.task_loss` (None: the forward pass with the cross-entropy on the current task's
prompts plus :meth:`Method.extra_loss`), ``backward``, :meth:`Method.after_backward`, the optimiser
step, :meth:`Method.after_step`; finally :meth:`Method.end_task`, which returns the method's state
for the checkpoint and its diagnostics. Evaluation forms its logits with :meth:`Method.evaluator`.
The base class implements each hook as the generic loop had it, so a method overrides only what
it changes.

Class attributes are read at planning time (Snakefile parse, ``prepare-run``), so this file and
every method file import no torch at module level: torch loads inside the hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

#: Run keys only training reads: a method that does not train is never run twice over them.
TRAINING_KEYS = frozenset(
    {
        "batch_size",
        "epochs",
        "lr",
        "weight_decay",
        "ls",
        "warmup_steps",
        "max_steps",
        "max_train_per_class",
        "adapter_dim",
        "adapter_scale",
        "adapter_dropout",
        "optimizer.numerics",
        "logit_scale",
    }
)

#: ``optimizer.numerics`` when a config leaves it null: the reference ran torch's foreach AdamW on
#: a GPU (faithful); clean mode takes torch's own AdamW for the device (method.md section 6).
NUMERICS_BY_MODE = {"faithful": "cuda-foreach", "clean": "torch"}

#: ``logit_scale`` when a config leaves it null: the reference multiplies the logits by
#: ``exp(logit_scale)`` of the loaded checkpoint (faithful); clean mode uses CLIP's 100, the value of
#: OpenAI's weights, whatever a self-pretrained checkpoint reached (config/README.md, Numerics).
LOGIT_SCALE_BY_MODE: dict[str, str | float] = {"faithful": "checkpoint", "clean": 100.0}

#: Method state kept from task to task in the checkpoint: per tower, a list of tensors.
MethodState = dict[str, list["torch.Tensor"]]

#: A task's optimiser steps and the learning rate before each: ``(n_steps, lr_of_step)``.
Schedule = tuple[int, Callable[[int], float]]
#: The logits of a batch of images against the prompts evaluation was given.
Logits = Callable[["torch.Tensor"], "torch.Tensor"]


def fill_nulls(section: dict[str, Any], defaults: Mapping[str, Any]) -> None:
    """Set each key of ``section`` that is ``null`` to its value in ``defaults`` (a mode's defaults:
    the projection's, MoE's, RAPF's), in place."""
    for key, value in defaults.items():
        if section[key] is None:
            section[key] = value


@dataclass
class TaskContext:
    """What the training loop shares with a method during one task.

    Attributes:
        model: CLIP with adapters (only adapters require grad), on ``device``.
        tokenizer: open_clip tokenizer.
        train_set: the task's training images, labels task-local (0 .. n_classes-1).
        cfg: resolved run config.
        task: task index t.
        state: the method's state after task t-1 (empty at t = 0), on ``device``.
        device: compute device.
        tokens: tokenised prompts of the current task's classes.
        previous_class_names: names of the classes of tasks 0..t-1, in label order.
        amp: autocast to bfloat16 (``precision: amp_bf16``).
        step: index of the current optimiser step (set by the loop).
        class_names: names of the current task's classes, in label order.
        n_batches: batches of ``train_set`` per epoch (the loop's loader).
    """

    model: nn.Module
    tokenizer: Any
    train_set: Dataset
    cfg: dict
    task: int
    state: MethodState
    device: torch.device
    tokens: torch.Tensor
    previous_class_names: Sequence[str] = ()
    amp: bool = False
    step: int = 0
    class_names: Sequence[str] = ()
    n_batches: int = 0


class Method:
    """Base class of every method; subclasses set the class attributes and override hooks.

    Class attributes:
        name: the run key ``method`` (and the registry name).
        description: one line for ``dmnsp list-methods``.
        label: name in tables and legends (default: ``name``).
        order: row order in tables (lower first).
        color: plot colour (hex).
        trains: False for a method that never trains (training keys do not apply).
        own_keys: run keys only this method reads; an entry ending in ``.`` names a group
            (``projection.``). Other methods are never run twice over them.
        shared_keys: keys inside ``own_keys`` groups that every method reads after all.
        default_towers: ``projection.towers`` when the config leaves it null.
        variants: named variants (workflow ``ablations``): run-key switches, dotted keys.
        variant_ignores: per variant, run keys that have no effect in it.
        ignores: training keys this method never reads (it is not run twice over them).
        defaults: the method's own settings per dataset and split (the official code's), as rows
            ``(dataset or "*", split or "*", {dotted run key: value})``; every matching row applies
            in order. Applied where the config resolves, to keys the config leaves unset.
        labels: the training labels the hooks see: ``task`` (0 .. n-1 within the task, the
            reference's shift) or ``global`` (positions in the class order, old classes first).
        train_transform: transform of the training images: ``train`` (the random crop) or
            ``eval`` (the deterministic evaluation transform).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    label: ClassVar[str] = ""
    order: ClassVar[int] = 50
    color: ClassVar[str] = "#8c564b"
    trains: ClassVar[bool] = True
    own_keys: ClassVar[tuple[str, ...]] = ()
    shared_keys: ClassVar[tuple[str, ...]] = ()
    default_towers: ClassVar[str] = "none"
    variants: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    variant_ignores: ClassVar[Mapping[str, frozenset]] = {}
    ignores: ClassVar[frozenset] = frozenset()
    defaults: ClassVar[tuple[tuple[str, str, Mapping[str, Any]], ...]] = ()
    labels: ClassVar[str] = "task"
    train_transform: ClassVar[str] = "train"

    def __init__(self) -> None:
        #: Seconds of named phases (e.g. ``lambda``, ``basis``); those timed during the steps are
        #: subtracted from the loop's ``train`` seconds.
        self.seconds: dict[str, float] = {}

    # ------------------------------------------------------------------ metadata
    @classmethod
    def owns(cls, key: str) -> bool:
        """Whether run key ``key`` (dotted) is one only this method reads."""
        if key in cls.shared_keys:
            return False
        return any(key == own or (own.endswith(".") and key.startswith(own)) for own in cls.own_keys)

    @classmethod
    def label_parts(cls, cfg: Mapping[str, Any]) -> list[str]:
        """``key=value`` parts of the run label: this method's switches that differ from their defaults
        in a resolved config (none by default)."""
        return []

    @classmethod
    def resolve(cls, cfg: dict[str, Any]) -> None:
        """Fill this method's settings that follow others (``null`` → by ``projection.mode``) in a
        validated config, in place; raise ``dmnsp.config.ConfigError`` for settings that do not fit."""

    # ------------------------------------------------------------------ model
    def prepare_model(self, model: nn.Module, cfg: dict[str, Any]) -> None:
        """Change the freshly built model (adapters in place, backbone frozen) before anything reads
        its parameters: the initial adapters, a restored checkpoint and the optimiser then see the
        change. Whatever it installs as ``block.adapter`` is saved and restored as adapters."""

    @classmethod
    def state_mismatch(
        cls, cfg: Mapping[str, Any], task: int, state: MethodState, widths: Mapping[str, Sequence[int]]
    ) -> str | None:
        """Why ``state``, read from a checkpoint written after task ``task``, is not what this method
        writes under ``cfg`` for a model whose adapters have output ``widths`` (per tower, per layer);
        None when it fits. Checked before the state is used, so a crafted checkpoint (valid
        checksum, same config) cannot pass tensors of the wrong size into the maths.

        The default is a method that keeps no state between tasks; a method that keeps some
        overrides this with the shapes it writes (DMNSP: its per-layer bases).
        """
        if any(len(v) for v in state.values()):
            return f"method {cls.name} keeps no state between tasks, but the checkpoint holds {sorted(state)}"
        return None

    # ------------------------------------------------------------------ hooks
    def start_task(self, ctx: TaskContext) -> None:
        """Before the first step of task ``ctx.task`` (the model is in train mode; the optimiser is
        built after this hook, so parameters made here can be trained)."""

    def trainable(self, ctx: TaskContext) -> list[nn.Parameter]:
        """The parameters the task's optimiser updates (default: the model's that require grad)."""
        return [p for p in ctx.model.parameters() if p.requires_grad]

    def optimizer(self, ctx: TaskContext, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The task's new optimiser (default: AdamW of the config, :func:`dmnsp.optim.make_optimizer`)."""
        from ..optim import make_optimizer

        return make_optimizer(params, ctx.cfg)

    def schedule(self, cfg: dict[str, Any], n_batches: int) -> Schedule:
        """Steps of a task with ``n_batches`` batches per epoch, and the learning rate of each.

        Default, the reference's: ``T + 1`` steps for ``T = epochs * n_batches`` (capped by
        ``max_steps``), linear warm-up then cosine (:func:`dmnsp.optim.lr_at`).
        """
        from ..optim import lr_at

        total = cfg["epochs"] * n_batches
        n_steps = total + 1 if cfg["max_steps"] is None else min(total + 1, cfg["max_steps"])
        return n_steps, lambda step: lr_at(step, total, cfg["lr"], cfg["warmup_steps"])

    def task_loss(self, ctx: TaskContext, images: torch.Tensor, labels: torch.Tensor):
        """The whole loss of this step, replacing the loop's (None: the loop's cross-entropy on the
        current task's prompts plus :meth:`extra_loss`). ``labels`` follow :attr:`labels`."""
        return None

    def extra_loss(self, ctx: TaskContext, images: torch.Tensor, image_features: torch.Tensor):
        """A term added to the cross-entropy of this step (None: nothing added).

        Args:
            images: the batch, on the device.
            image_features: the current model's normalised image features of ``images``.
        """
        return None

    def after_backward(self, ctx: TaskContext) -> None:
        """After ``loss.backward()``, before the optimiser step (gradients are in ``.grad``)."""

    def after_step(self, ctx: TaskContext) -> None:
        """After the optimiser step."""

    def end_task(self, ctx: TaskContext) -> tuple[MethodState, dict]:
        """After the last step: the state for the checkpoint and this method's diagnostics."""
        return ctx.state, {}

    # ------------------------------------------------------------------ evaluation
    def evaluator(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        state: MethodState,
        cfg: Mapping[str, Any],
        scale: torch.Tensor,
    ) -> Logits:
        """The logits evaluation takes the argmax of, for batches of images against ``tokens`` (the
        prompts of every seen class), with the method's ``state`` after the task and the logit scale
        ``scale`` (run key ``logit_scale``, resolved by :func:`dmnsp.model.logit_scale`). Called in
        eval mode, without grad. Default: CLIP's, the text features computed once."""
        from ..model import clip_logits, encode_image, encode_text

        text = encode_text(model, tokens)
        return lambda images: clip_logits(encode_image(model, images), text, scale)
