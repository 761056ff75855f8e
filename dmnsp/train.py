"""Training one task: AdamW + warm-up/cosine schedule, null-space projection of adapter gradients,
then the new null-space bases from the task's activations (method.md sections 3-6)."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import nullspace as ns
from .adapters import TOWERS, adapters, recorded_outputs, set_recording
from .model import clip_logits, encode_image, encode_text, tokenize_prompts


class NonFiniteError(FloatingPointError):
    """Loss or parameters became NaN/inf; names task, step and tensor."""


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (seed, task, purpose): the same on every machine and process."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def lr_at(step: int, total: int, base_lr: float, warmup: int = 30) -> float:
    """The reference schedule: linear warm-up over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(total - warmup, 1)  # guard tasks with T <= warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / span)) * base_lr


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, num_workers: int = 0, device: torch.device
) -> DataLoader:
    """A DataLoader whose shuffling and worker seeds derive from ``seed`` alone."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=gen,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=device.type == "cuda",
    )


def _cycle(loader: DataLoader) -> Iterator:
    while True:  # re-iterating reshuffles, as the reference's try/except re-iter does
        yield from loader


@dataclass
class ProjectionPlan:
    """Per tower and layer: the operator ``M_l`` and scalar factor, fixed for the whole task."""

    ops: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    factors: dict[str, list[float]] = field(default_factory=dict)
    lambdas: dict[str, torch.Tensor] = field(default_factory=dict)
    target: str = "gradient"

    def _weights(self, model: nn.Module):
        for tower, ops in self.ops.items():
            for adapter, op, f in zip(adapters(model, tower), ops, self.factors[tower], strict=True):
                yield adapter.down.weight, adapter.up.weight, op, f

    def apply(self, model: nn.Module) -> None:
        """Gradient target: ``G ← G M λ`` (down), ``G ← M^T G λ`` (up), before the optimiser step."""
        for w_down, w_up, op, f in self._weights(model):
            if w_down.grad is not None:
                w_down.grad = ns.project_down(w_down.grad, op, f)
            if w_up.grad is not None:
                w_up.grad = ns.project_up(w_up.grad, op, f)

    def snapshot(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(d.detach().clone(), u.detach().clone()) for d, u, _, _ in self._weights(model)]

    @torch.no_grad()
    def apply_update(self, model: nn.Module, before: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Update target: project AdamW's step itself (its elementwise scaling would otherwise leave
        the subspace); the coefficients are step-size factors here, so they are not applied."""
        for (w_down, w_up, op, _), (d0, u0) in zip(self._weights(model), before, strict=True):
            w_down.copy_(d0 + ns.project_down(w_down - d0, op, 1.0))
            w_up.copy_(u0 + ns.project_up(w_up - u0, op, 1.0))


def projected_towers(cfg: dict) -> list[str]:
    """Towers whose adapter gradients are projected under this config."""
    towers = cfg["projection"]["towers"]
    return (
        []
        if cfg["method"] != "dmnsp" or towers == "none"
        else (["visual"] if towers == "visual" else list(TOWERS))
    )


def build_plan(
    cfg: dict, bases: dict[str, list[torch.Tensor]], current: dict[str, list[torch.Tensor]]
) -> ProjectionPlan:
    """Coefficients from the current batch's adapter outputs, then the composite operators.

    Args:
        cfg: resolved run config.
        bases: per tower, per layer V_k from earlier tasks.
        current: per tower, per layer adapter outputs of the first batch of this task.
    """
    proj = cfg["projection"]
    plan = ProjectionPlan(target=proj["target"])
    for tower, vs in bases.items():
        if proj["lambda"] == "fixed":
            lam = ns.fixed_lambda(len(vs), cfg["LAMBDA_SCALE"])
        else:
            u_top = [ns.top_directions(ns.gram(a), cfg["TOP_SELECT"]) for a in current[tower]]
            lam = ns.dynamic_lambda(u_top, vs, cfg["TOP_K_RATIO"], cfg["LAMBDA_SCALE"])
        plan.lambdas[tower] = lam.cpu()
        plan.ops[tower] = ns.composite_operators(vs, proj["layers"])
        plan.factors[tower] = ns.lambda_factors(lam, proj["layers"])
    return plan


def update_bases(
    cfg: dict, bases: dict[str, list[torch.Tensor]], current: dict[str, list[torch.Tensor]]
) -> dict[str, list[torch.Tensor]]:
    """Append (concat) or fold in (orthonormal) this task's per-layer statistics."""
    proj = cfg["projection"]
    out = {}
    for tower, acts in current.items():
        prev = bases.get(tower) or [None] * len(acts)
        new = []
        for v, a in zip(prev, acts, strict=True):
            c = ns.gram(a)
            if proj["basis"] == "concat":
                new.append(ns.concat_basis(v, c, cfg["TOP_SELECT"]))
            else:
                new.append(ns.orthonormal_basis(v, c, cfg["TOP_SELECT"], proj["energy_threshold"])[0])
        out[tower] = new
    return out


def _record(model: nn.Module, towers: list[str], on: bool) -> None:
    for tower in towers:
        set_recording(model, tower, on)


def _outputs(model: nn.Module, towers: list[str]) -> dict[str, list[torch.Tensor]]:
    return {tower: recorded_outputs(model, tower) for tower in towers}


def _check_finite_params(model: nn.Module, task: int, step: int) -> None:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
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


def train_task(
    model: nn.Module,
    tokenizer,
    train_set: Dataset,
    class_names: list[str],
    cfg: dict,
    task: int,
    bases: dict[str, list[torch.Tensor]],
    device: torch.device,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[dict[str, list[torch.Tensor]], dict]:
    """Train the adapters on one task and return the updated bases and the task's diagnostics.

    Args:
        model: CLIP with adapters (only adapters require grad), on ``device``.
        tokenizer: open_clip tokenizer.
        train_set: the task's training images, labels task-local (0 .. n_classes-1).
        class_names: names of this task's classes, in label order.
        cfg: resolved run config.
        task: task index t.
        bases: per tower, per layer null-space bases from tasks < t (empty for t = 0).
        device: compute device.

    Returns:
        ``(bases, diagnostics)``: bases including task t; a JSON-able diagnostics dict.
    """
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
    towers = projected_towers(cfg)
    tokens = tokenize_prompts(tokenizer, class_names, cfg["prompt_template"]).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    visual_params = [p for a in adapters(model, "visual") for p in a.parameters()]
    text_params = [p for a in adapters(model, "text") for p in a.parameters()]
    before = {
        name: [p.detach().clone() for p in ps]
        for name, ps in (("visual", visual_params), ("text", text_params))
    }
    optimizer = torch.optim.AdamW(
        params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.999), eps=1e-8
    )
    total = cfg["epochs"] * len(loader)
    n_steps = total + 1 if cfg["max_steps"] is None else min(total + 1, cfg["max_steps"])
    use_proj = bool(towers) and task > 0 and all(bases.get(t) for t in towers)
    amp = cfg["precision"] == "amp_bf16"
    plan: ProjectionPlan | None = None
    losses: list[float] = []
    lambda_seconds = 0.0
    model.train()
    batches = _cycle(loader)
    for step in tqdm(range(n_steps), desc=f"task {task}", disable=not progress, leave=False):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, cfg["lr"], cfg["warmup_steps"])
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        first_projected = use_proj and plan is None
        if first_projected:
            _record(model, towers, True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = clip_logits(encode_image(model, images), encode_text(model, tokens))
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg["ls"])
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteError(
                f"task {task}, step {step}: loss is {value}; lower lr, or check the data and weights"
            )
        losses.append(value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if first_projected:
            tl = time.perf_counter()
            plan = build_plan(cfg, bases, _outputs(model, towers))
            _record(model, towers, False)
            lambda_seconds = time.perf_counter() - tl
        snap = None
        if plan is not None and plan.target == "gradient":
            plan.apply(model)
        elif plan is not None:
            snap = plan.snapshot(model)
        optimizer.step()
        if snap is not None:
            plan.apply_update(model, snap)
        _check_finite_params(model, task, step)
    train_seconds = time.perf_counter() - t0

    # New bases from one shuffled batch of this task, no grad, dropout on (the reference never
    # switches to eval mode here).
    tb = time.perf_counter()
    new_bases = bases
    basis_towers = [t for t in TOWERS if t in towers or (t == "visual" and cfg["method"] == "dmnsp")]
    if cfg["method"] == "dmnsp":
        basis_loader = make_loader(
            train_set,
            cfg["batch_size"],
            shuffle=True,
            seed=derive_seed(cfg["seed"], task, "basis"),
            num_workers=0,
            device=device,
        )
        images, _ = next(iter(basis_loader))
        _record(model, basis_towers, True)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            encode_image(model, images.to(device))
            if "text" in basis_towers:
                encode_text(model, tokens)
        current = _outputs(model, basis_towers)
        _record(model, basis_towers, False)
        new_bases = update_bases(cfg, bases, current)
    basis_seconds = time.perf_counter() - tb

    norms = {
        name: float(
            torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(ps, before[name], strict=True)))
        )
        for name, ps in (("visual", visual_params), ("text", text_params))
    }
    diagnostics = {
        "task": task,
        "steps": n_steps,
        "lambda": plan.lambdas["visual"].tolist() if plan and "visual" in plan.lambdas else None,
        "lambda_text": plan.lambdas["text"].tolist() if plan and "text" in plan.lambdas else None,
        "lambda_factor_visual": plan.factors["visual"] if plan and "visual" in plan.factors else None,
        "basis_columns": {t: [int(v.shape[1]) for v in vs] for t, vs in new_bases.items()},
        "inf_fraction_exp_avg_sq": {
            "visual": inf_fraction(optimizer, visual_params),
            "text": inf_fraction(optimizer, text_params),
        },
        "update_norm": norms,
        "loss": {
            "first": losses[0] if losses else None,
            "last": losses[-1] if losses else None,
            "mean": sum(losses) / len(losses) if losses else None,
            "min": min(losses) if losses else None,
            "steps": len(losses),
            "curve": losses[:: max(1, len(losses) // 50)],
        },
        "seconds": {
            "train": train_seconds - lambda_seconds,
            "lambda": lambda_seconds,
            "basis": basis_seconds,
        },
        "peak_mem_mb": peak_memory_mb(device),
    }
    return new_bases, diagnostics
