"""DMNSP: dynamic multi-layer null-space projection of the adapters' gradients (method.md sections
4-7).

From task 1 on, the first batch's adapter outputs give the dynamic coefficients and the projection
plan (fixed for the task); every step then passes the visual adapter weights' gradients (or, in
clean mode, AdamW's update) through all layers' operators, one layer's basis at a time as the
reference does (``projection.order: reference``) or through their precomputed product
(``composite``). After the task, one shuffled batch of 128 of its training images (whatever
``batch_size`` is) gives the new per-layer null-space bases, the state kept in the checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .base import Method, MethodState, TaskContext
from .registry import register

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch and the modules that import it load inside the functions below: the planner reads this
# file's class attributes at Snakefile parse time, where importing torch would cost seconds.

#: Projection switches that follow ``projection.mode`` when the config leaves them null.
MODE_DEFAULTS: dict[str, dict[str, str]] = {
    "faithful": {"basis": "concat", "target": "gradient", "eig": "svd", "order": "reference"},
    "clean": {"basis": "orthonormal", "target": "update", "eig": "eigh", "order": "composite"},
}
#: The reference builds the bases from one batch of this many images, whatever ``batch_size`` is.
BASIS_BATCH = 128


@dataclass
class ProjectionPlan:
    """Per tower and layer, what the layer's adapter weight gradients pass through; fixed for a task.

    Order ``reference``: ``pairs[tower][l]``, the ``(V_k, lambda[l][k])`` sequence of the
    reference's loop. Order ``composite``: ``ops[tower][l]`` (``M_l``) and ``factors[tower][l]``
    (``Π_k lambda[l][k]``). ``factors`` and ``lambdas`` are kept in both orders for diagnostics.
    """

    order: str = "reference"
    target: str = "gradient"
    pairs: dict[str, list[list[tuple[torch.Tensor, torch.Tensor]]]] = field(default_factory=dict)
    ops: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    factors: dict[str, list[float]] = field(default_factory=dict)
    lambdas: dict[str, torch.Tensor] = field(default_factory=dict)

    def _weights(self, model: nn.Module):
        """``(down weight, up weight, tower, layer)`` of every projected adapter."""
        from ..adapters import adapters

        for tower in self.factors:
            for layer, adapter in enumerate(adapters(model, tower)):
                yield adapter.down.weight, adapter.up.weight, tower, layer

    def project(
        self, g: torch.Tensor, tower: str, layer: int, kind: str, scaled: bool = True
    ) -> torch.Tensor:
        """One weight's gradient (``kind`` down or up) through layer ``layer``'s operators; with
        ``scaled`` False the coefficients are left out (the update target)."""
        from .. import nullspace as ns

        if self.order == "reference":
            pairs = self.pairs[tower][layer]
            if not scaled:
                pairs = [(v, 1.0) for v, _ in pairs]
            return ns.project_sequential(g, pairs, kind)
        op, f = self.ops[tower][layer], self.factors[tower][layer] if scaled else 1.0
        return ns.project_down(g, op, f) if kind == "down" else ns.project_up(g, op, f)

    def apply(self, model: nn.Module) -> None:
        """Gradient target: every projected adapter weight's gradient, before the optimiser step."""
        for w_down, w_up, tower, layer in self._weights(model):
            if w_down.grad is not None:
                w_down.grad = self.project(w_down.grad, tower, layer, "down")
            if w_up.grad is not None:
                w_up.grad = self.project(w_up.grad, tower, layer, "up")

    def snapshot(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(d.detach().clone(), u.detach().clone()) for d, u, _, _ in self._weights(model)]

    def apply_update(self, model: nn.Module, before: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Update target: project AdamW's step itself (its elementwise scaling would otherwise leave
        the subspace); the coefficients are step-size factors here, so they are not applied."""
        import torch

        with torch.no_grad():
            for (w_down, w_up, tower, layer), (d0, u0) in zip(self._weights(model), before, strict=True):
                w_down.copy_(d0 + self.project(w_down - d0, tower, layer, "down", scaled=False))
                w_up.copy_(u0 + self.project(w_up - u0, tower, layer, "up", scaled=False))


def projected_towers(cfg: dict) -> list[str]:
    """Towers whose adapter gradients are projected under this config."""
    from ..adapters import TOWERS

    towers = cfg["projection"]["towers"]
    return (
        []
        if cfg["method"] != "dmnsp" or towers == "none"
        else (["visual"] if towers == "visual" else list(TOWERS))
    )


def build_plan(
    cfg: dict, bases: dict[str, list[torch.Tensor]], current: dict[str, list[torch.Tensor]]
) -> ProjectionPlan:
    """Coefficients from the current batch's adapter outputs, then the operators in the config's order.

    Args:
        cfg: resolved run config.
        bases: per tower, per layer V_k from earlier tasks.
        current: per tower, per layer adapter outputs of the first batch of this task.
    """
    from .. import nullspace as ns

    proj = cfg["projection"]
    plan = ProjectionPlan(order=proj["order"], target=proj["target"])
    for tower, vs in bases.items():
        if proj["lambda"] == "fixed":
            lam = ns.fixed_lambda(len(vs), cfg["LAMBDA_SCALE"]).to(vs[0].device)
        else:
            u_top = [ns.top_directions(ns.gram(a), cfg["TOP_SELECT"], proj["eig"]) for a in current[tower]]
            lam = ns.dynamic_lambda(u_top, vs, cfg["TOP_K_RATIO"], cfg["LAMBDA_SCALE"])
        plan.lambdas[tower] = lam.cpu()
        plan.factors[tower] = ns.lambda_factors(lam, proj["layers"])
        if proj["order"] == "reference":
            plan.pairs[tower] = ns.layer_operators(vs, lam, proj["layers"])
        else:
            plan.ops[tower] = ns.composite_operators(vs, proj["layers"])
    return plan


def update_bases(
    cfg: dict, bases: dict[str, list[torch.Tensor]], current: dict[str, list[torch.Tensor]]
) -> dict[str, list[torch.Tensor]]:
    """Append (concat) or fold in (orthonormal) this task's per-layer statistics."""
    from .. import nullspace as ns

    proj = cfg["projection"]
    out = {}
    for tower, acts in current.items():
        prev = bases.get(tower) or [None] * len(acts)
        new = []
        for v, a in zip(prev, acts, strict=True):
            c = ns.gram(a)
            if proj["basis"] == "concat":
                new.append(ns.concat_basis(v, c, cfg["TOP_SELECT"], proj["eig"]))
            else:
                new.append(ns.orthonormal_basis(v, c, cfg["TOP_SELECT"], proj["energy_threshold"])[0])
        out[tower] = new
    return out


def basis_columns(cfg: dict, task: int, width: int) -> tuple[int, int]:
    """The fewest and most columns a layer's basis of ``width`` rows can have after task ``task``
    (:func:`update_bases`): concat appends ``width - TOP_SELECT`` per task; orthonormal removes
    ``TOP_SELECT`` per task from the ``width`` free directions, or, with an energy threshold, as many
    as the threshold asks (any number)."""
    proj, top = cfg["projection"], cfg["TOP_SELECT"]
    if proj["basis"] == "concat":
        n = (task + 1) * max(0, width - top)
        return n, n
    if proj["energy_threshold"] is not None:
        return 0, width
    n = max(0, width - (task + 1) * top)
    return n, n


def _record(model: nn.Module, towers: list[str], on: bool) -> None:
    from ..adapters import set_recording

    for tower in towers:
        set_recording(model, tower, on)


def _outputs(model: nn.Module, towers: list[str]) -> dict[str, list[torch.Tensor]]:
    from ..adapters import recorded_outputs

    return {tower: recorded_outputs(model, tower) for tower in towers}


def basis_statistics(ctx: TaskContext, towers: list[str]) -> dict[str, list[torch.Tensor]]:
    """Adapter outputs of one shuffled batch of ``projection.basis_batch`` (128) of the task's
    training images (train transform), no grad, dropout on (the reference never switches to eval
    mode here) whatever ``batch_size`` is; the text tower sees the task's prompts."""
    import torch

    from ..loaders import derive_seed, make_loader
    from ..model import encode_image, encode_text

    cfg = ctx.cfg
    basis_loader = make_loader(
        ctx.train_set,
        cfg["projection"]["basis_batch"],
        shuffle=True,
        seed=derive_seed(cfg["seed"], ctx.task, "basis"),
        num_workers=0,
        device=ctx.device,
    )
    images, _ = next(iter(basis_loader))
    _record(ctx.model, towers, True)
    with torch.no_grad(), torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.amp):
        encode_image(ctx.model, images.to(ctx.device))
        if "text" in towers:
            encode_text(ctx.model, ctx.tokens)
    current = _outputs(ctx.model, towers)
    _record(ctx.model, towers, False)
    return current


@register
class DMNSP(Method):
    name = "dmnsp"
    description = "dynamic multi-layer null-space projection of the adapter gradients (ICCV 2025)"
    order = 5
    color = "#1f77b4"
    own_keys = ("TOP_SELECT", "TOP_K_RATIO", "LAMBDA_SCALE", "projection.")
    # The mode also picks every method's evaluation transform.
    shared_keys = ("projection.mode",)
    default_towers = "visual"
    # The ablations of method.md section 7, one switch each.
    variants = {
        "towers-both": {"projection.towers": "both"},
        "layers-single": {"projection.layers": "single"},
        "lambda-fixed": {"projection.lambda": "fixed"},
        "basis-orthonormal": {"projection.basis": "orthonormal"},
        "mode-clean": {"projection.mode": "clean"},
        # Numerics switches (not in the paper): how much of the result is float32 overflow, and how
        # much the solver's arbitrary null-space basis matters (config/README.md).
        "numerics-cpu": {"optimizer.numerics": "cpu"},
        "eig-eigh": {"projection.eig": "eigh"},
        "order-composite": {"projection.order": "composite"},
    }
    # Clean mode projects AdamW's update, where the coefficients have no effect.
    variant_ignores = {"mode-clean": frozenset({"TOP_K_RATIO", "LAMBDA_SCALE"})}

    @classmethod
    def label_parts(cls, cfg: dict[str, Any]) -> list[str]:
        proj = cfg["projection"]
        defaults = {"towers": cls.default_towers, "layers": "multi", "lambda": "dynamic"}
        defaults.update(MODE_DEFAULTS[proj["mode"]])
        parts = [f"{key}={proj[key]}" for key in defaults if proj[key] != defaults[key]]
        if proj["basis_batch"] != BASIS_BATCH:
            parts.append(f"basis_batch={proj['basis_batch']}")
        if proj["energy_threshold"] is not None:
            parts.append(f"energy={proj['energy_threshold']:g}")
        return parts

    @classmethod
    def state_mismatch(
        cls, cfg: dict[str, Any], task: int, state: MethodState, widths: dict[str, list[int]]
    ) -> str | None:
        """The bases after task ``task``: one per layer of the visual tower (and of the text tower when
        it is projected), ``width`` rows, finite float32, with the columns :func:`update_bases` leaves."""
        import torch

        towers = [t for t in ("visual", "text") if t == "visual" or t in projected_towers(cfg)]
        if task < 0:
            towers = []
        if sorted(state) != sorted(towers):
            return f"bases of the towers {sorted(state)}, expected {towers} after task {task}"
        for tower in towers:
            vs, layers = state[tower], widths.get(tower, [])
            if len(vs) != len(layers):
                return f"{len(vs)} {tower} bases for {len(layers)} layers"
            for layer, (v, width) in enumerate(zip(vs, layers, strict=True)):
                if v.dim() != 2 or v.shape[0] != width:
                    return f"{tower} basis {layer} has {v.shape[0]} rows, the adapter's width is {width}"
                low, high = basis_columns(cfg, task, width)
                if not low <= v.shape[1] <= high:
                    want = low if low == high else f"{low} to {high}"
                    return (
                        f"{tower} basis {layer} has {v.shape[1]} columns; after task {task} "
                        f"{cfg['projection']['basis']} bases of width {width} have {want}"
                    )
                if v.dtype != torch.float32 or not bool(torch.isfinite(v).all()):
                    return f"{tower} basis {layer} is not finite float32"
        return None

    def start_task(self, ctx: TaskContext) -> None:
        self.seconds = {"lambda": 0.0, "basis": 0.0}
        self.towers = projected_towers(ctx.cfg)
        self.use_proj = bool(self.towers) and ctx.task > 0 and all(ctx.state.get(t) for t in self.towers)
        self.plan: ProjectionPlan | None = None
        self.snap = None
        if self.use_proj:  # the first step's adapter outputs give the coefficients
            _record(ctx.model, self.towers, True)

    def after_backward(self, ctx: TaskContext) -> None:
        if self.use_proj and self.plan is None:
            tl = time.perf_counter()
            self.plan = build_plan(ctx.cfg, ctx.state, _outputs(ctx.model, self.towers))
            _record(ctx.model, self.towers, False)
            self.seconds["lambda"] = time.perf_counter() - tl
        self.snap = None
        if self.plan is not None and self.plan.target == "gradient":
            self.plan.apply(ctx.model)
        elif self.plan is not None:
            self.snap = self.plan.snapshot(ctx.model)

    def after_step(self, ctx: TaskContext) -> None:
        if self.snap is not None:
            self.plan.apply_update(ctx.model, self.snap)

    def end_task(self, ctx: TaskContext) -> tuple[MethodState, dict]:
        from ..adapters import TOWERS

        tb = time.perf_counter()
        basis_towers = [t for t in TOWERS if t in self.towers or t == "visual"]
        new_bases = update_bases(ctx.cfg, ctx.state, basis_statistics(ctx, basis_towers))
        self.seconds["basis"] = time.perf_counter() - tb
        plan = self.plan
        diagnostics = {
            "lambda": plan.lambdas["visual"].tolist() if plan and "visual" in plan.lambdas else None,
            "lambda_text": plan.lambdas["text"].tolist() if plan and "text" in plan.lambdas else None,
            "lambda_factor_visual": plan.factors["visual"] if plan and "visual" in plan.factors else None,
            "basis_columns": {t: [int(v.shape[1]) for v in vs] for t, vs in new_bases.items()},
        }
        return new_bases, diagnostics
