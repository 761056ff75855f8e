"""Training one task, the loop every method shares: by default AdamW with the reference's
warm-up/cosine schedule and the cross-entropy on the current task's prompts (method.md section 3),
with the method's hooks (:mod:`dmnsp.methods`: DMNSP's projection and bases, LwF's distillation,
...) around them; a method may bring its own parameters, optimiser, schedule and loss
(:class:`dmnsp.methods.Method`)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from . import methods
from .adapters import adapters
from .errors import NonFiniteError
from .loaders import cycle, derive_seed, make_loader
from .methods import Method, MethodState, TaskContext
from .model import clip_logits, encode_image, encode_text, logit_scale, tokenize_prompts
from .optim import describe, lr_at

__all__ = ["NonFiniteError", "derive_seed", "lr_at", "inf_fraction", "peak_memory_mb", "train_task"]


def _check_finite_params(
    model: nn.Module, task: int, step: int, own: list[tuple[str, nn.Parameter]] = ()
) -> None:
    """``own``: parameters the method trains outside the model, named."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] + list(own)
    ok = torch.stack([torch.isfinite(p).all() for _, p in named])
    if not bool(ok.all()):
        bad = [n for (n, _), good in zip(named, ok.tolist(), strict=True) if not good]
        raise NonFiniteError(
            f"task {task}, step {step}: non-finite values in parameter {bad[0]}"
            + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
            + "; lower lr or LAMBDA_SCALE, or use projection.mode: clean"
        )


def inf_fraction(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> float:
    """Fraction of AdamW ``exp_avg_sq`` entries that are inf (the faithful overflow, method.md §6)."""
    total = inf = 0
    for p in params:
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" in state:
            total += state["exp_avg_sq"].numel()
            inf += int(torch.isinf(state["exp_avg_sq"]).sum())
    return inf / total if total else 0.0


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocator on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _loss_summary(losses: list[float]) -> dict:
    return {
        "first": losses[0] if losses else None,
        "last": losses[-1] if losses else None,
        "mean": sum(losses) / len(losses) if losses else None,
        "min": min(losses) if losses else None,
        "steps": len(losses),
        "curve": losses[:: max(1, len(losses) // 50)],
    }


def _update_norms(towers: dict[str, list[nn.Parameter]], before: dict[str, list[torch.Tensor]]) -> dict:
    """Per tower, the L2 norm of the adapters' change over the task."""
    return {
        name: float(
            torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(ps, before[name], strict=True)))
        )
        if ps
        else 0.0  # a method without adapters (RAPF)
        for name, ps in towers.items()
    }


def _untrained_diagnostics(task: int) -> dict:
    """Diagnostics of a method that does not train (zeroshot)."""
    return {
        "task": task,
        "steps": 0,
        "inf_fraction_exp_avg_sq": {"visual": 0.0, "text": 0.0},
        "update_norm": {"visual": 0.0, "text": 0.0},
        "loss": None,
        "seconds": {"train": 0.0},
    }


def _step(
    ctx: TaskContext,
    method: Method,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels,
    own: list[tuple[str, nn.Parameter]],
) -> float:
    """One optimiser step: forward, cross-entropy (+ the method's term) or the method's own loss,
    backward, hooks, step."""
    model, cfg = ctx.model, ctx.cfg
    loss = method.task_loss(ctx, images, labels)
    if loss is None:
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.amp):
            image_features = encode_image(model, images)
            logits = clip_logits(
                image_features, encode_text(model, ctx.tokens), logit_scale(model, cfg["logit_scale"])
            )
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg["ls"])
        extra = method.extra_loss(ctx, images, image_features)
        if extra is not None:
            loss = loss + extra
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteError(
            f"task {ctx.task}, step {ctx.step}: loss is {value}; lower lr, or check the data and weights"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.after_backward(ctx)
    optimizer.step()
    method.after_step(ctx)
    _check_finite_params(model, ctx.task, ctx.step, own)
    return value


def train_task(
    model: nn.Module,
    tokenizer,
    train_set: Dataset,
    class_names: list[str],
    cfg: dict,
    task: int,
    state: MethodState,
    device: torch.device,
    num_workers: int = 0,
    progress: bool = True,
    previous_class_names: Sequence[str] = (),
) -> tuple[MethodState, dict]:
    """Train one task with the config's method (by default its adapters); return its new state and
    diagnostics.

    Args:
        model: CLIP with adapters (only adapters require grad), on ``device``.
        tokenizer: open_clip tokenizer.
        train_set: the task's training images, labels task-local (0 .. n_classes-1).
        class_names: names of this task's classes, in label order.
        cfg: resolved run config.
        task: task index t.
        state: the method's state after task t-1 (DMNSP: per tower, per layer null-space bases).
        device: compute device.
        previous_class_names: names of the classes of tasks 0..t-1, in label order.

    Returns:
        ``(state, diagnostics)``: the method's state including task t; a JSON-able diagnostics dict.
    """
    method = methods.get(cfg["method"])()
    if not method.trains:
        return state, _untrained_diagnostics(task)
    t0 = time.perf_counter()
    torch.manual_seed(derive_seed(cfg["seed"], task, "train"))
    loader = make_loader(
        train_set,
        cfg["batch_size"],
        shuffle=True,
        seed=derive_seed(cfg["seed"], task, "loader"),
        num_workers=num_workers,
        device=device,
    )
    tokens = tokenize_prompts(tokenizer, class_names, cfg["prompt_template"]).to(device)
    towers = {name: [p for a in adapters(model, name) for p in a.parameters()] for name in ("visual", "text")}
    before = {name: [p.detach().clone() for p in ps] for name, ps in towers.items()}
    amp = cfg["precision"] == "amp_bf16"
    ctx = TaskContext(
        model,
        tokenizer,
        train_set,
        cfg,
        task,
        state,
        device,
        tokens,
        previous_class_names,
        amp,
        class_names=class_names,
        n_batches=len(loader),
    )
    optimizer, losses = _run_steps(ctx, method, loader, progress)
    train_seconds = time.perf_counter() - t0 - sum(method.seconds.values())  # the method's phases apart
    new_state, method_diagnostics = method.end_task(ctx)
    return new_state, {
        "task": task,
        "steps": len(losses),
        **method_diagnostics,
        "numerics": cfg["optimizer"]["numerics"],
        "optimizer": describe(optimizer),
        "eig": cfg["projection"]["eig"],
        "order": cfg["projection"]["order"],
        "logit_scale": float(logit_scale(model, cfg["logit_scale"])),
        "inf_fraction_exp_avg_sq": {name: inf_fraction(optimizer, ps) for name, ps in towers.items()},
        "update_norm": _update_norms(towers, before),
        "loss": _loss_summary(losses),
        "seconds": {"train": train_seconds, **method.seconds},
        "peak_mem_mb": peak_memory_mb(device),
    }


def _run_steps(
    ctx: TaskContext, method: Method, loader, progress: bool
) -> tuple[torch.optim.Optimizer, list[float]]:
    """The task's steps (by default ``epochs * len(loader) + 1``, capped by ``max_steps``) with the
    method's new optimiser; the optimiser and the steps' losses."""
    ctx.model.train()
    method.start_task(ctx)
    params = method.trainable(ctx)
    optimizer = method.optimizer(ctx, params)
    in_model = {id(p) for p in ctx.model.parameters()}
    own = [(f"{method.name} parameter {i}", p) for i, p in enumerate(params) if id(p) not in in_model]
    n_steps, lr_of = method.schedule(ctx.cfg, len(loader))
    # Global labels: the classes of earlier tasks come first in the class order.
    offset = len(ctx.previous_class_names) if method.labels == "global" else 0
    losses: list[float] = []
    batches = cycle(loader)
    for step in tqdm(range(n_steps), desc=f"task {ctx.task}", disable=not progress, leave=False):
        lr = lr_of(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, labels = next(batches)
        ctx.step = step
        images = images.to(ctx.device, non_blocking=True)
        labels = labels.to(ctx.device, non_blocking=True)
        if offset:
            labels = labels + offset
        losses.append(_step(ctx, method, optimizer, images, labels, own))
    return optimizer, losses
