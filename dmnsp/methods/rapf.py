"""RAPF (Huang et al., ECCV 2024), as its official code runs it (rapf.md).

The backbone stays frozen and carries no adapters. One linear map ``W`` (embed dim x embed dim, no
bias) after the image encoder is trained per task with Adam and a per-epoch step schedule, on the
cross-entropy over **all seen classes** (global labels) of the real batch plus pseudo-features of
old classes drawn from per-class Gaussians of the frozen features, and a hinge that pushes
samples of old classes away from the prompts of similar new classes ("hard pairs"). After each
task the new classes' means and covariances are kept, and ``W`` is fused with the previous map in
the basis of the old map's SVD. Evaluation applies ``W`` before normalising the image features.

Faithful (``projection.mode: faithful``) keeps the official code's odd behaviours, reported in the
diagnostics: the fp16 arithmetic of its GPU runs (``rapf.precision: fp16``: the input, the frozen
features, ``W x``, the logits and the losses rounded to half precision), the random init of ``W``
(``rapf.init: random``: task 0 starts below zero-shot), "edge" samples that are plain draws from
the whole old-class Gaussian, the hard-coded constants (pseudo classes per batch by dataset name
and increment, ``int(10 beta)`` and ``int(20 beta)`` draws, margin 0.1, ridge 1e-4). Clean mode
computes in float32 and starts ``W`` at the identity (zero-shot CLIP). In both, a fusion that
would divide 0 by 0 (``W`` unchanged by the task) keeps the previous map and says so.

Differences from the official code, by construction: Python's ``random`` (the per-epoch order
of the old classes) is a generator of its own per task, seeded from (seed, task) like every other
stream, so resumed tasks are bitwise those of one process; increments of one class work (the
official code crashes there); the frozen backbone runs in float32 on every device (the official
one runs in fp16 on a GPU; faithful mode rounds its outputs).

The maths is in small functions (:func:`shrink_cov`, :func:`sample`, :func:`class_statistics`,
:func:`hard_pairs`, :func:`replay_classes`, :func:`hinge_loss`, :func:`fuse`); torch loads inside
them, so the planner can read the class attributes without it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

from .base import Logits, Method, MethodState, Schedule, TaskContext, fill_nulls
from .registry import register

if TYPE_CHECKING:
    import torch
    from torch import nn

#: Hard-coded in the official code (rapf.md section 7.5).
RIDGE = 1e-4
MARGIN = 0.1
GAMMA = 0.1
STATS_BATCH = 128
PSEUDO_PER_CLASS = 10  # int(10 * beta) draws per replayed class
EDGE_PER_PAIR = 20  # int(20 * beta) draws per hard pair
#: Method-state entries in the checkpoint (2-D tensors each): the map, the class means (C x d) and
#: one covariance (d x d) per class.
MAP, MEANS, COVS = "rapf_map", "rapf_mean", "rapf_cov"
#: ``rapf.precision`` and ``rapf.init`` when the config leaves them null.
MODE_DEFAULTS: dict[str, dict[str, str]] = {
    "faithful": {"precision": "fp16", "init": "random"},
    "clean": {"precision": "fp32", "init": "identity"},
}


# --------------------------------------------------------------------------------------- maths
def shrink_cov(cov: torch.Tensor) -> torch.Tensor:
    """The official shrinkage: the mean diagonal entry added to the diagonal and the mean nonzero
    off-diagonal entry added to every off-diagonal entry (both weights 1)."""
    import torch

    diag_mean = torch.mean(torch.diagonal(cov))
    off = cov.clone()
    off.fill_diagonal_(0.0)
    nonzero = off != 0.0
    off_mean = (off * nonzero).sum() / nonzero.sum()
    eye = torch.eye(cov.shape[0], device=cov.device)
    return cov + diag_mean * eye + off_mean * (1 - eye)


def sample(mean: torch.Tensor, chol: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` draws ``mean + L eps``, eps ~ N(0, I) from torch's generator on ``mean``'s device, where
    ``chol`` is the lower Cholesky factor L of the class covariance."""
    import torch

    eps = torch.randn(n, mean.shape[-1], device=mean.device)
    return eps @ chol.t() + mean


def class_statistics(
    features: torch.Tensor, labels: torch.Tensor, ridge: float = RIDGE
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per class, in increasing label order: the mean of its feature rows and their unbiased
    covariance plus ``ridge * I`` (float32; means and covariances keep the features' dtype first,
    as the official fp16 run does: the float32 ridge promotes the covariance).
    Returns ``(means (C x d) float32, [cov (d x d) float32])``."""
    import torch

    means, covs = [], []
    eye = torch.eye(features.shape[-1], device=features.device)
    for label in torch.unique(labels, sorted=True):
        mean, cov = _mean_cov(features[labels == label])
        means.append(mean.float())
        covs.append(cov + ridge * eye)
    return torch.stack(means), covs


def _mean_cov(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (``torch.cov``) of feature rows, in their dtype. Half-precision
    rows are computed as a GPU computes ``torch.cov`` of half tensors (mean, centring, product,
    division: float32 arithmetic, each result rounded to half); torch's CPU half kernels round more."""
    import torch

    if rows.dtype != torch.float16:
        return rows.mean(dim=0), torch.cov(rows.t())
    x = rows.float()
    mean = x.mean(dim=0).half()
    centred = (x - mean.float()).half().float()
    product = (centred.t() @ centred).half().float()
    return mean, (product / (len(rows) - 1)).half()


def hard_pairs(text: torch.Tensor, n_old: int, threshold: float) -> torch.Tensor:
    """Pairs ``(k, j)`` of an old class k and a new class j (global labels) whose normalised prompt
    features lie closer than ``threshold`` (strictly), ordered by k then j; shape (P, 2).

    ``text``: unit text features of every seen class, old classes first. Distances are
    ``torch.cdist`` of the new classes against one old class at a time, as the official code
    computes them."""
    import torch

    new = text[n_old:].float()
    if n_old == 0 or len(new) == 0:
        return torch.zeros(0, 2, dtype=torch.long, device=text.device)
    dist = torch.stack([torch.cdist(new, text[k : k + 1].float()).reshape(-1) for k in range(n_old)])
    pairs = torch.nonzero(dist < threshold)
    pairs[:, 1] += n_old
    return pairs


def cholesky_factors(covs: Sequence[torch.Tensor], shrinkage: bool) -> list[torch.Tensor]:
    """The lower Cholesky factor of each class covariance (shrunk first with ``shrinkage``).

    Raises:
        dmnsp.errors.NonFiniteError: a covariance that is not positive definite (a class with fewer
            images than dimensions, rounded to fp16, can lose what the 1e-4 ridge gives it), naming
            the class and the fixes.
    """
    import torch

    from ..errors import NonFiniteError

    out = []
    for c, cov in enumerate(covs):
        factor, info = torch.linalg.cholesky_ex(shrink_cov(cov) if shrinkage else cov)
        if int(info):
            raise NonFiniteError(
                f"RAPF: the covariance of class {c} is not positive definite (its features vary in fewer "
                f"than their {cov.shape[0]} dimensions, and the rounding of rapf.precision fp16 outweighs "
                "the 1e-4 ridge); use rapf.precision: fp32, rapf.shrinkage: true, or more training images "
                "per class"
            )
        out.append(factor)
    return out


def replay_classes(order: Sequence[int], batch: int, m: int) -> list[int]:
    """The ``m`` old classes whose pseudo-features join batch ``batch`` of an epoch: consecutive
    entries of the epoch's shuffled class list ``order``, wrapping around."""
    return [order[(m * batch + i) % len(order)] for i in range(m)]


def classes_per_batch(dataset: str, increment: int) -> int:
    """The official rule for the number of old classes replayed per batch (main.py:78-85): 4 on
    CIFAR100 with increments of 5, else 2 (5 on ImageNet-R, 10 on CUB200, datasets dmnsp lacks)."""
    return {"imagenet_R": 5, "cub200": 10}.get(dataset, 4 if dataset == "cifar100" and increment == 5 else 2)


def hinge_loss(z: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = MARGIN):
    """``mean max(0, -<z, t_pos> + <z, t_neg> + margin)`` over rows: each sample of old class k
    (``positive`` row: its prompt feature) must be closer to it than to its hard new class's."""
    import torch

    return torch.relu(-(z * positive).sum(-1) + (z * negative).sum(-1) + margin).mean()


def fuse(
    w_new: torch.Tensor, w_old: torch.Tensor, mix_bias: float, svd: tuple | None = None
) -> tuple[torch.Tensor, dict]:
    """The fusion after a task: in the basis of ``W_old = U S V^T``, ``P_new = U^T W``,
    ``P_old = S V^T``, ``M = min(|P_new - P_old| / max |P_new - P_old| + mix_bias, 1)``, and
    ``W = U (M * P_new + (1 - M) * P_old)``.

    Args:
        svd: ``(U, S, V^T)`` of ``w_old`` (default: ``torch.linalg.svd``, as the official code).

    Returns ``(W, info)``; when the difference is zero everywhere (0 / 0) ``W_old`` is kept and
    ``info["guarded"]`` is True (the official code writes NaN weights there)."""
    import torch

    u, s, vh = torch.linalg.svd(w_old) if svd is None else svd
    p_new = u.T @ w_new
    p_old = torch.diag(s) @ vh
    delta = (p_new - p_old).abs()
    top = delta.max()
    if not top > 0:
        return w_old.clone(), {"guarded": True, "mask_mean": None}
    mask = torch.clamp(delta / top + mix_bias, max=1)
    fused = u @ (p_new * mask + p_old * (1 - mask))
    return fused, {"guarded": False, "mask_mean": float(mask.mean())}


def initial_map(dim: int, kind: str, seed: int, device: torch.device) -> torch.Tensor:
    """``W`` before task 0: torch's default for a linear layer (kaiming_uniform, a = sqrt 5:
    U(-1/sqrt d, 1/sqrt d)) from its own seed, or the identity."""
    import torch
    from torch import nn

    if kind == "identity":
        return torch.eye(dim, device=device)
    gen = torch.Generator().manual_seed(seed)
    w = torch.empty(dim, dim)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=gen)
    return w.to(device)


def _round(x: torch.Tensor, half: bool) -> torch.Tensor:
    return x.half() if half else x


def frozen_features(model: nn.Module, images: torch.Tensor, half: bool) -> torch.Tensor:
    """The frozen image embedding (after the projection, not normalised), no grad; fp16 mode rounds
    the input and the features to half precision as the official GPU run computes them."""
    import torch

    with torch.no_grad():
        if half:
            images = images.half().float()
        return _round(model.encode_image(images), half)


def head(w: torch.Tensor, x: torch.Tensor, half: bool) -> torch.Tensor:
    """``norm(W x)`` for feature rows ``x``: ``W`` in float32, its output (fp16 mode) rounded to half
    precision before the normalisation, as the official forward casts it back to the backbone's dtype."""
    import torch.nn.functional as F

    z = _round(F.linear(x.float(), w), half)
    return z / z.norm(dim=1, keepdim=True)


def prompt_features(raw: torch.Tensor, half: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """From the text encoder's output: the features the logits use (normalised in the backbone's
    dtype) and the unit features in float32 that the hard pairs and the hinge start from."""
    raw = _round(raw, half)
    unit = raw.float()
    return raw / raw.norm(dim=1, keepdim=True), unit / unit.norm(dim=-1, p=2, keepdim=True)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _summary(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"first": values[0], "last": values[-1], "mean": sum(values) / len(values), "steps": len(values)}


# -------------------------------------------------------------------------------------- method
@register
class RAPF(Method):
    name = "rapf"
    description = (
        "RAPF: a linear map on frozen CLIP features, Gaussian replay of old classes, text-guided hinge, "
        "fusion after each task (ECCV 2024)"
    )
    order = 4
    color = "#d62728"
    own_keys = ("rapf.",)
    # No adapters, no label smoothing, no warm-up: these keys change nothing.
    ignores = frozenset({"adapter_dim", "adapter_scale", "adapter_dropout", "warmup_steps", "ls"})
    variants = {"rapf-clean": {"projection.mode": "clean"}}
    labels = "global"
    train_transform = "eval"  # CLIP's preprocess everywhere: the frozen features never change
    # configs/class/cifar100_10-10.yaml (50-10 and 50-5 differ only in batch size); the other
    # splits and datasets dmnsp runs have no official setting: these values (config/README.md).
    defaults = (
        (
            "*",
            "*",
            {
                "epochs": 15,
                "batch_size": 100,
                "lr": 1e-3,
                "weight_decay": 0.0,
                "prompt_template": "a good photo of a {}.",
                "eval_transform": "center",
                "eval_batch_size": 128,
                "rapf.beta": 2.0,
                "rapf.mix_bias": 0.6,
                "rapf.threshold": 0.55,
                "rapf.shrinkage": False,
                "rapf.milestones": [4, 10],
            },
        ),
        ("cifar100", "50-5", {"batch_size": 50}),
    )

    @classmethod
    def resolve(cls, cfg: dict[str, Any]) -> None:
        fill_nulls(cfg["rapf"], MODE_DEFAULTS[cfg["projection"]["mode"]])

    @classmethod
    def label_parts(cls, cfg: dict[str, Any]) -> list[str]:
        rapf = cfg["rapf"]
        defaults: dict[str, Any] = {"beta": 2.0, "mix_bias": 0.6, "threshold": 0.55, "shrinkage": False}
        defaults.update(MODE_DEFAULTS[cfg["projection"]["mode"]])
        return [
            f"{key}={rapf[key]:g}" if isinstance(rapf[key], float) else f"{key}={rapf[key]}"
            for key in defaults
            if rapf.get(key) != defaults[key]
        ]

    # ------------------------------------------------------------------ model and state
    def prepare_model(self, model: nn.Module, cfg: dict[str, Any]) -> None:
        """No adapters: the frozen CLIP as it was loaded (an adapter at init adds exactly zero)."""
        from ..adapters import TOWERS, tower_blocks

        for tower in TOWERS:
            for block in tower_blocks(model, tower):
                block.adapter = no_adapter()

    @classmethod
    def state_mismatch(
        cls, cfg: dict[str, Any], task: int, state: MethodState, widths: dict[str, list[int]]
    ) -> str | None:
        """After task ``task``: one map ``W`` (d x d), the class means (C x d) and one covariance
        (d x d) per class, all finite float32, for the ``C = initial_increment + task * increment``
        classes seen and the architecture's embedding width d; nothing before task 0. (``widths``,
        the adapters', are not RAPF's: it trains no adapters.)"""
        import torch

        from ..architectures import embed_dim

        if task < 0:
            held = any(len(v) for v in state.values())
            return f"RAPF state before task 0 holds {sorted(state)}" if held else None
        if set(state) != {MAP, MEANS, COVS} or len(state[MAP]) != 1 or len(state[MEANS]) != 1:
            return f"RAPF state holds {sorted(state)}, expected one {MAP}, one {MEANS} and the {COVS} list"
        w, means, covs = state[MAP][0], state[MEANS][0], state[COVS]
        dim = embed_dim(cfg["model_name"]) or w.shape[0]
        n_classes = cfg["initial_increment"] + task * cfg["increment"]
        if tuple(w.shape) != (dim, dim) or tuple(means.shape) != (n_classes, dim):
            return (
                f"RAPF map {list(w.shape)} / means {list(means.shape)} after task {task} are not "
                f"{dim} x {dim} / {n_classes} x {dim} (embedding width {dim}, {n_classes} classes seen)"
            )
        if len(covs) != n_classes or any(tuple(c.shape) != (dim, dim) for c in covs):
            return f"RAPF keeps {len(covs)} covariances for {n_classes} classes seen (each {dim} x {dim})"
        for name, t in ((MAP, w), (MEANS, means), *((f"{COVS} {c}", v) for c, v in enumerate(covs))):
            if t.dtype != torch.float32 or not bool(torch.isfinite(t).all()):
                return f"RAPF {name} is not finite float32"
        return None

    # ------------------------------------------------------------------ training
    def start_task(self, ctx: TaskContext) -> None:
        import random

        import torch

        from ..loaders import derive_seed
        from ..model import tokenize_prompts

        cfg, opts = ctx.cfg, ctx.cfg["rapf"]
        self.half = opts["precision"] == "fp16"
        self.n_old = len(ctx.previous_class_names)
        dim = ctx.model.visual.output_dim
        if ctx.state:
            w = ctx.state[MAP][0].clone()
            self.means, self.covs = ctx.state[MEANS][0], list(ctx.state[COVS])
        else:
            w = initial_map(dim, opts["init"], derive_seed(cfg["seed"], "init", "rapf"), ctx.device)
            self.means, self.covs = torch.zeros(0, dim, device=ctx.device), []
        self.w = torch.nn.Parameter(w)
        self.w_start = w.clone()
        self.w_old = w.clone() if ctx.state else None
        # The Cholesky factor of each old class, once per task (the official code refactors per draw).
        self.chol = cholesky_factors(self.covs, opts["shrinkage"])
        names = [*ctx.previous_class_names, *ctx.class_names]
        tokens = tokenize_prompts(ctx.tokenizer, names, cfg["prompt_template"]).to(ctx.device)
        with torch.no_grad():
            self.text, self.text_unit = prompt_features(ctx.model.encode_text(tokens), self.half)
        self.pairs = hard_pairs(self.text_unit, self.n_old, opts["threshold"]) if self.n_old else None
        self.m = classes_per_batch(cfg["dataset"], cfg["increment"])
        self.n_pseudo = int(PSEUDO_PER_CLASS * opts["beta"])
        self.n_edge = int(EDGE_PER_PAIR * opts["beta"])
        self.random = random.Random(derive_seed(cfg["seed"], ctx.task, "rapf"))
        self.order: list[int] = []
        self.hinge: list[float] = []
        self.rows: dict[str, int] = {}

    def trainable(self, ctx: TaskContext) -> list[nn.Parameter]:
        return [self.w]

    def optimizer(self, ctx: TaskContext, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam, default betas. Without weight decay Adam is AdamW step for step (torch's two share
        one kernel), so the run's ``optimizer.numerics`` order applies; with decay, torch's Adam
        (decay added to the gradient, as the official optimiser would)."""
        import torch

        from ..optim import make_optimizer

        cfg = ctx.cfg
        if cfg["weight_decay"] == 0:
            return make_optimizer(params, cfg)
        return torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])

    def schedule(self, cfg: dict[str, Any], n_batches: int) -> Schedule:
        """``epochs * n_batches`` steps (capped by ``max_steps``), no warm-up; the learning rate
        falls by 10x at each of ``rapf.milestones`` (epochs), as MultiStepLR stepped per epoch."""
        total = cfg["epochs"] * n_batches
        n_steps = total if cfg["max_steps"] is None else min(total, cfg["max_steps"])
        rates = epoch_rates(cfg["lr"], cfg["rapf"]["milestones"], cfg["epochs"])
        return n_steps, lambda step: rates[step // n_batches]

    def task_loss(self, ctx: TaskContext, images: torch.Tensor, labels: torch.Tensor):
        import torch
        import torch.nn.functional as F

        from ..model import clip_logits, logit_scale

        batch = ctx.step % ctx.n_batches
        if self.n_old and batch == 0:  # each epoch replays the old classes in a new order
            self.order = list(range(self.n_old))
            self.random.shuffle(self.order)
        rows, targets = [frozen_features(ctx.model, images, self.half).float()], [labels]
        if self.n_old:
            for c in replay_classes(self.order, batch, self.m):
                rows.append(sample(self.means[c], self.chol[c], self.n_pseudo))
                targets.append(torch.full((self.n_pseudo,), c, dtype=torch.long, device=ctx.device))
        n_edge = 0
        if self.pairs is not None and len(self.pairs):
            for k, _ in self.pairs.tolist():
                rows.append(sample(self.means[k], self.chol[k], self.n_edge))
            n_edge = self.n_edge * len(self.pairs)
        z = head(self.w, torch.cat(rows), self.half)
        z_edge, z = z[len(z) - n_edge :], z[: len(z) - n_edge]
        target = torch.cat(targets)
        # The float32 scale times half features gives half logits, as the reference's fp16 run computes.
        scale = logit_scale(ctx.model, ctx.cfg["logit_scale"])
        loss = F.cross_entropy(clip_logits(z, self.text, scale), target)
        self.rows = {"ce_rows": len(target), "real_rows": len(labels), "edge_rows": n_edge}
        if n_edge:
            positive = self.pairs[:, 0].repeat_interleave(self.n_edge)
            negative = self.pairs[:, 1].repeat_interleave(self.n_edge)
            to = z_edge.dtype
            hinge = hinge_loss(
                _unit_rows(z_edge),
                _unit_rows(self.text_unit[positive].to(to)).detach(),
                _unit_rows(self.text_unit[negative].to(to)).detach(),
            )
            self.hinge.append(float(hinge.detach()))
            loss = loss + hinge
        return loss

    def end_task(self, ctx: TaskContext) -> tuple[MethodState, dict]:
        import torch

        t0 = time.perf_counter()
        features, labels = self._task_features(ctx)
        means, covs = class_statistics(features, labels + self.n_old)
        # Fewer images than dimensions leave a class covariance singular but for the ridge.
        self.class_images = int(torch.bincount(labels).min()) if len(labels) else 0
        self.seconds["statistics"] = time.perf_counter() - t0
        w = self.w.detach()
        fusion: dict[str, Any] = {}
        if self.w_old is not None:
            fused, fusion = fuse(w, self.w_old, ctx.cfg["rapf"]["mix_bias"])
            fusion["change_norm"] = float(torch.linalg.norm(w - self.w_old))
            fusion["fused_change_norm"] = float(torch.linalg.norm(fused - self.w_old))
            w = fused
        state = {
            MAP: [w.contiguous()],
            MEANS: [torch.cat([self.means, means.to(self.means)])],
            COVS: [*self.covs, *covs],
        }
        return state, self._diagnostics(ctx, fusion, state)

    def _task_features(self, ctx: TaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen features of every training image of the task (batch 128, no shuffle) and labels."""
        import torch

        from ..loaders import make_loader

        loader = make_loader(ctx.train_set, STATS_BATCH, shuffle=False, seed=0, device=ctx.device)
        feats, labels = [], []
        for images, y in loader:
            feats.append(frozen_features(ctx.model, images.to(ctx.device), self.half))
            labels.append(y.to(ctx.device))
        return torch.cat(feats), torch.cat(labels)

    def _diagnostics(self, ctx: TaskContext, fusion: dict, state: MethodState) -> dict:
        opts = ctx.cfg["rapf"]
        pairs = [] if self.pairs is None else self.pairs.tolist()
        return {
            "rapf": {
                "precision": opts["precision"],
                "init": opts["init"],
                "old_classes": self.n_old,
                "classes_per_batch": self.m if self.n_old else 0,
                "pseudo_rows_per_step": self.m * self.n_pseudo if self.n_old else 0,
                "pseudo_rows_per_epoch": self.m * self.n_pseudo * ctx.n_batches if self.n_old else 0,
                "rows_last_step": self.rows,
                "hard_pairs": len(pairs),
                "hard_pair_list": pairs[:50],
                "threshold": opts["threshold"],
                "hinge": _summary(self.hinge),
                "map_change_norm": float((self.w.detach() - self.w_start).norm()),
                "fusion": fusion or None,
                "min_images_per_class": self.class_images,
                "embed_dim": int(self.w.shape[0]),
                "state_mb": sum(t.numel() * t.element_size() for ts in state.values() for t in ts) / 2**20,
            }
        }

    # ------------------------------------------------------------------ evaluation
    def evaluator(
        self,
        model: nn.Module,
        tokens: torch.Tensor,
        state: MethodState,
        cfg: dict[str, Any],
        scale: torch.Tensor,
    ) -> Logits:
        from ..model import clip_logits

        half = cfg["rapf"]["precision"] == "fp16"
        w = state[MAP][0]
        text, _ = prompt_features(model.encode_text(tokens), half)
        return lambda images: clip_logits(head(w, frozen_features(model, images, half), half), text, scale)


def epoch_rates(lr: float, milestones: Sequence[int], epochs: int) -> list[float]:
    """The learning rate of each epoch under MultiStepLR(gamma 0.1) stepped once per epoch: the rate
    is multiplied by 0.1 at the start of every milestone epoch (chained, as torch computes it)."""
    rates, rate = [], lr
    for epoch in range(epochs):
        rate = rate * GAMMA ** list(milestones).count(epoch)
        rates.append(rate)
    return rates


@cache
def _no_adapter_class() -> type:
    from torch import nn

    class NoAdapter(nn.Module):
        """An adapted block's adapter slot left empty: adds exactly zero, holds no parameters."""

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return h.new_zeros(())

    return NoAdapter


def no_adapter() -> nn.Module:
    """A module for ``block.adapter`` that adds exactly zero (no parameters, no dropout draws)."""
    return _no_adapter_class()()
