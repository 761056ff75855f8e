"""AdamW with a named float32 arithmetic order, the same on every device (method.md section 6).

Faithful DMNSP acts through float32 overflow of AdamW's ``exp_avg_sq``, and where it overflows
depends on the order in which torch's kernels multiply. Two orders are reproduced here, element by
element and rounding by rounding, with ordinary tensor ops (so on CPU and CUDA alike):

``cuda-foreach``
    torch's default AdamW on CUDA tensors (``_multi_tensor_adam``: ``_foreach_lerp_``,
    ``_foreach_mul_``, ``_foreach_addcmul_``, ``_foreach_sqrt``, ``_foreach_div_``,
    ``_foreach_add_``, ``_foreach_addcdiv_``). The pointwise CUDA functors compute
    ``input + alpha * op(t1, t2)`` in float32, contracted to ``fma(alpha, op(t1, t2), input)``
    (explicit ``std::fma`` in newer sources): ``g·g`` is rounded first, so ``exp_avg_sq`` is inf
    as soon as ``|g| > sqrt(FLT_MAX) ≈ 1.8e19``. This is the order the reference ran in.
``cpu``
    torch's AdamW on CPU tensors (``_single_tensor_adam``; CPU ``addcmul``: ``self + value * t1 * t2``,
    which x86-64 builds with FMA contract to ``fma(value * t1, t2, self)``; ``addcdiv``:
    ``self + value * t1 / t2``). ``(1 − β2)·g`` is rounded first, so the square never exists on its
    own and ``exp_avg_sq`` overflows only when the whole sum passes FLT_MAX (``|g| ≳ 5.8e20``).

A float32 fma is emulated exactly: the product of two float32 numbers is exact in float64, the sum
is rounded once to float64 and then to float32, and the one case where that double rounding can go
wrong (the float64 sum lies exactly halfway between two float32 numbers while the exact sum does
not) is corrected with the sum's exact error (TwoSum). Scalars enter as float32 tensors on the
parameter's device, as the kernels cast them to their float32 ``opmath`` type, and every step is a
separate, correctly rounded float32 op, so the result does not depend on the device's own
scalar paths (CUDA divides by a CPU scalar through its reciprocal, for instance).

:func:`make_optimizer` runs torch's own AdamW where the device's kernels already are the chosen
order (``cuda-foreach`` on CUDA, ``cpu`` on CPU) and this emulation elsewhere; tests/test_optim.py
checks the emulation bit for bit against torch on CPU, and against torch's CUDA kernels where a GPU
is present.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

#: Arithmetic orders this AdamW reproduces (``torch`` in a run config means torch.optim.AdamW).
NUMERICS = ("cuda-foreach", "cpu")


def _f32(value: float, like: Tensor) -> Tensor:
    """A Python scalar as the kernels see it: rounded once to float32, on the tensor's device."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def fma32(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Correctly rounded float32 ``a * b + c`` (one rounding), elementwise, on any device."""
    p = a.double() * b.double()  # exact: 24 + 24 significant bits fit in float64's 53
    c64 = c.double()
    s = p + c64  # rounded once, to float64
    r = s.float()  # ... and once more: wrong only if s lies exactly halfway between two float32s
    # A float64 halfway between two normal float32 neighbours ends in binary 1 followed by 28 zeros
    # (float32 keeps 23 of float64's 52 fraction bits); in float32's subnormal range the spacing
    # differs, so those are checked in full.
    suspect = (s.view(torch.int64) & 0x1FFFFFFF) == 0x10000000
    suspect |= (s.abs() < 2.0**-126) & (s != r.double())
    if s.device.type == "cpu" and not bool(suspect.any()):  # no host sync on accelerators
        return r
    bv = s - p  # TwoSum: s + err == p + c exactly
    err = (p - (s - bv)) + (c64 - bv)
    big = torch.full_like(r, float("inf"))
    nb = torch.nextafter(r, torch.where(s > r.double(), big, -big))  # r's neighbour on s's side
    # Above FLT_MAX, r is inf: the midpoint to compare with is half-way to 2**128.
    r64 = torch.where(torch.isinf(r) & torch.isfinite(s), torch.sign(s) * 2.0**128, r.double())
    tie = suspect & (s != r64) & (2 * s == r64 + nb.double()) & (err != 0)
    # The exact sum lies past the midpoint in err's direction: round to that side's neighbour.
    lo, hi = torch.minimum(r, nb), torch.maximum(r, nb)
    return torch.where(tie, torch.where(err > 0, hi, lo), r)


def _lerp(start: Tensor, end: Tensor, weight: float) -> Tensor:
    """torch's ``lerp`` with a scalar weight (CUDA functor and CPU vector kernel alike): two fmas."""
    w = float(torch.tensor(weight, dtype=torch.float32))
    diff = end - start
    if abs(w) < 0.5:
        return fma32(_f32(w, start).expand_as(diff), diff, start)
    return fma32((_f32(w, start) - 1).expand_as(diff), diff, end)


def adamw_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: float,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    numerics: str,
) -> None:
    """One AdamW step of one float32 tensor in place, in the arithmetic order ``numerics``.

    ``step`` is the step count after incrementing (1 on the first step). The scalar bias
    corrections are computed in Python floats exactly as torch's optimizer does.
    """
    if weight_decay != 0:
        param.mul_(_f32(1 - lr * weight_decay, param))
    exp_avg.copy_(_lerp(exp_avg, grad, 1 - beta1))
    exp_avg_sq.mul_(_f32(beta2, exp_avg_sq))
    alpha = _f32(1 - beta2, grad)
    if numerics == "cuda-foreach":  # fma(1-β2, g·g, v): g·g rounded (and overflowing) on its own
        exp_avg_sq.copy_(fma32(alpha.expand_as(grad), grad * grad, exp_avg_sq))
    else:  # fma((1-β2)·g, g, v)
        exp_avg_sq.copy_(fma32(grad * alpha, grad, exp_avg_sq))
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = exp_avg_sq.sqrt()
    denom.div_(_f32(bias_correction2**0.5, denom))
    denom.add_(_f32(eps, denom))
    neg_step = _f32(-step_size, param)
    if numerics == "cuda-foreach":  # fma(-step, m / d, p)
        param.copy_(fma32(neg_step.expand_as(param), exp_avg / denom, param))
    else:  # p + (-step·m) / d
        param.add_((exp_avg * neg_step) / denom)


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, no amsgrad) in a chosen float32 arithmetic order.

    Same hyperparameters and state keys as ``torch.optim.AdamW`` (``step``, ``exp_avg``,
    ``exp_avg_sq``), so diagnostics read either. Float32 parameters only.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (the schedule may change ``param_groups[i]["lr"]`` between steps).
        betas: ``(β1, β2)``.
        eps: added to the denominator.
        weight_decay: decoupled weight decay.
        numerics: ``"cuda-foreach"`` (torch's CUDA default) or ``"cpu"`` (torch on CPU).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        numerics: str = "cuda-foreach",
    ) -> None:
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0 (got {lr}, {eps}, {weight_decay})")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, numerics=numerics)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype != torch.float32 or p.grad.dtype != torch.float32 or p.grad.is_sparse:
                    raise TypeError(f"dmnsp.optim.AdamW handles dense float32 parameters, got {p.dtype}")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                buckets.setdefault((p.device, float(state["step"])), []).append(p)
            for (_, step), params in buckets.items():
                self._step_flat(params, group, step)
        return loss

    def _step_flat(self, params: list[Tensor], group: dict, step: float) -> None:
        """One update of tensors sharing device and step count, on flat copies (elementwise maths,
        so the bits are those of a per-tensor update; far fewer op calls)."""
        states = [self.state[p] for p in params]
        flat = [
            torch.cat([t.reshape(-1) for t in ts])
            for ts in (
                params,
                [p.grad for p in params],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
            )
        ]
        beta1, beta2 = group["betas"]
        adamw_update(
            *flat,
            step,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            numerics=group["numerics"],
        )
        sizes = [p.numel() for p in params]
        for dst, src in zip(
            (params, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]),
            (flat[0], flat[2], flat[3]),
            strict=True,
        ):
            torch._foreach_copy_(dst, [x.view_as(d) for x, d in zip(src.split(sizes), dst, strict=True)])


def make_optimizer(params: Iterable[Tensor], cfg: Mapping) -> torch.optim.Optimizer:
    """The per-task AdamW of a run config: ``optimizer.numerics`` picks the arithmetic order.

    ``torch``: ``torch.optim.AdamW`` with torch's own choice for the device. ``cuda-foreach`` /
    ``cpu``: where the device's own torch kernels are that order (foreach AdamW on CUDA tensors,
    the single-tensor loop on CPU tensors) those run, since they are the order by definition;
    elsewhere :class:`AdamW` emulates it.
    """
    params = list(params)
    numerics = cfg["optimizer"]["numerics"]
    kwargs = dict(lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg["weight_decay"])
    if numerics == "torch":
        return torch.optim.AdamW(params, **kwargs)
    native = {"cuda-foreach": "cuda", "cpu": "cpu"}[numerics]
    if params and all(p.device.type == native for p in params):
        return torch.optim.AdamW(params, foreach=native == "cuda", **kwargs)
    return AdamW(params, numerics=numerics, **kwargs)


def describe(optimizer: torch.optim.Optimizer) -> str:
    """Which implementation and order an optimizer runs, for diagnostics."""
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    if isinstance(optimizer, AdamW):
        return f"dmnsp.optim.AdamW(numerics={group.get('numerics')})"
    return f"{type(optimizer).__module__}.{type(optimizer).__name__}(foreach={group.get('foreach')})"


def lr_at(step: int, total: int, base_lr: float, warmup: int = 30) -> float:
    """The reference schedule: linear warm-up over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(total - warmup, 1)  # guard tasks with T <= warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / span)) * base_lr
