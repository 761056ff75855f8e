"""AdamW arithmetic orders (dmnsp.optim): the exact fma, the overflow thresholds of each order, bitwise
equality with torch's own AdamW on CPU, and, on a CUDA machine, with torch's CUDA kernels.

Tests marked ``cuda`` need a CUDA GPU and skip (saying so) elsewhere; ``benchmarks/gpu.py`` runs
them with ``pytest -m cuda tests/test_optim.py`` where a GPU is at hand.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from dmnsp.config import validate
from dmnsp.optim import AdamW, describe, fma32, make_optimizer

FLT_MAX = float(np.finfo(np.float32).max)
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


# ----------------------------------------------------------------------- an exact reference fma
def _round_f32(x: Fraction) -> np.float32:
    """Round an exact rational to float32, ties to even, overflow to inf (IEEE round-to-nearest)."""
    if x == 0:
        return np.float32(0.0)
    with np.errstate(over="ignore"):
        guess = np.float32(float(x))  # within one ulp of the answer
    cands = {guess, np.nextafter(guess, np.float32(np.inf)), np.nextafter(guess, np.float32(-np.inf))}

    def value(f: np.float32) -> Fraction:  # inf stands for ±2**128 when rounding
        return Fraction(2**128) * (1 if f > 0 else -1) if np.isinf(f) else Fraction(float(f))

    def odd(f: np.float32) -> bool:
        return not np.isinf(f) and bool(np.array(f).view(np.uint32) & 1)

    return min(cands, key=lambda f: (abs(value(f) - x), odd(f)))


def _exact_fma(a: float, b: float, c: float) -> np.float32:
    if not all(np.isfinite([a, b, c])):
        with np.errstate(invalid="ignore"):
            return np.float32(np.float64(a) * np.float64(b) + np.float64(c))  # inf / nan propagate
    return _round_f32(Fraction(a) * Fraction(b) + Fraction(c))


def _f32(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def test_fma32_rounds_once_where_float64_double_rounding_would_not():
    e = 2.0**-23
    cases = [
        # exact sum 1 + 2^-23 + 2^-24 - 2^-54: float64 rounds it to the float32 midpoint, ties-to-even
        # would then give 1 + 2^-22, the right answer is 1 + 2^-23
        (1 + 2.0**-15, (1 - 2.0**-15) * 2.0**-24, 1 + e),
        # the mirror case with the error above the midpoint
        (-(1 + 2.0**-15), (1 - 2.0**-15) * 2.0**-24, 1 + 2 * e + e),
        # at the overflow boundary: exact 2^128 - 2^103 - 2^73 is below the midpoint to 2^128
        (2.0**52 * (1 + 2.0**-15), 2.0**51 * (1 - 2.0**-15), FLT_MAX),
    ]
    a, b, c = (_f32(*col) for col in zip(*cases, strict=True))
    naive = (a.double() * b.double() + c.double()).float()
    got = fma32(a, b, c)
    want = _f32(*(float(_exact_fma(*map(float, t))) for t in zip(a, b, c, strict=True)))
    assert torch.equal(got, want)
    assert (naive != want).all()  # each case defeats plain double rounding
    assert got[2] == FLT_MAX and torch.isinf(naive[2])


def test_fma32_matches_exact_rational_arithmetic():
    g = torch.Generator().manual_seed(0)
    n = 3000
    a = torch.randn(n, generator=g) * torch.exp2(torch.randint(-70, 70, (n,), generator=g).float())
    b = torch.randn(n, generator=g) * torch.exp2(torch.randint(-70, 70, (n,), generator=g).float())
    # c of the product's magnitude (where the rounding is decided), or far away, or tiny / huge
    c = (a * b).double() * (1 + torch.randn(n, generator=g, dtype=torch.float64) * 2.0**-20)
    c = torch.where(torch.rand(n, generator=g) < 0.3, torch.randn(n, generator=g).double() * 1e30, c)
    c = torch.cat([c[:-6].float(), _f32(1e-45, -1e-45, FLT_MAX, -FLT_MAX, float("inf"), float("nan"))])
    a[-8:] = _f32(1e19, 2e19, 3e-30, 1e-30, 2e19, 1e20, 0.0, 1.0)
    b[-8:] = _f32(1e19, 2e19, 1e-20, 3e-20, 1e19, 1e20, float("inf"), 1.0)
    got = fma32(a, b, c)
    want = torch.from_numpy(
        np.array([_exact_fma(float(x), float(y), float(z)) for x, y, z in zip(a, b, c, strict=True)])
    )
    same = (got == want) | (got.isnan() & want.isnan())
    assert bool(same.all()), f"{int((~same).sum())} of {n} differ"


# ------------------------------------------------------------------------- the overflow thresholds
GRADS = [1e19, -1e19, 1.8e19, 1.85e19, 2e19, 1e20, 5.8e20, 6e20, -6e20, 1e21]
# Which exp_avg_sq entries are inf after the first step from zero state:
# cuda-foreach rounds g·g first (inf once |g| > sqrt(FLT_MAX) = 1.8447e19);
# cpu rounds 0.001·g first and overflows only when 0.001·g² > FLT_MAX (|g| > 5.83e20).
FIRST_STEP_INF = {
    "cuda-foreach": [False, False, False, True, True, True, True, True, True, True],
    "cpu": [False, False, False, False, False, False, False, True, True, True],
}


def _steps(numerics: str, grads: list[float], n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    p = torch.zeros(len(grads), requires_grad=True)
    opt = AdamW([p], lr=1e-3, numerics=numerics)
    pattern = []
    for _ in range(n):
        p.grad = _f32(*grads)
        opt.step()
        pattern.append(torch.isinf(opt.state[p]["exp_avg_sq"]).clone())
    return p.detach(), pattern


@pytest.mark.parametrize("numerics", ["cuda-foreach", "cpu"])
def test_exact_inf_pattern_of_each_order_at_the_thresholds(numerics):
    p, pattern = _steps(numerics, GRADS, 1)
    assert pattern[0].tolist() == FIRST_STEP_INF[numerics]
    # An inf exp_avg_sq makes the step exactly 0: the parameter freezes; elsewhere it moves by lr.
    frozen = torch.tensor(FIRST_STEP_INF[numerics])
    assert (p[frozen] == 0).all()
    assert torch.allclose(p[~frozen].abs(), torch.full_like(p[~frozen], 1e-3), rtol=1e-5)


def test_cpu_order_overflows_later_as_exp_avg_sq_accumulates():
    # exp_avg_sq_t = (1 - 0.999^t) g² (up to rounding) passes FLT_MAX at step t for the cpu order;
    # the cuda order is inf from the first step for all of these.
    grads = [2e19, 1e20, 5.8e20]
    _, cuda = _steps("cuda-foreach", grads, 40)
    _, cpu = _steps("cpu", grads, 40)
    assert all(bool(x.all()) for x in cuda)
    for i, g in enumerate(grads):
        first = next(t for t in range(1, 10**5) if (1 - 0.999**t) * g * g > FLT_MAX)
        got = [bool(x[i]) for x in cpu]
        expected = [t + 1 >= first for t in range(40)]
        assert got == expected, (g, first)


# ---------------------------------------------------------------- against torch's AdamW on CPU
SHAPES = [(16, 64), (64, 16), (16,), (64,), (7, 3), (1,), (1003,)]


def _compare(numerics: str, reference, scale: float, steps: int = 12, weight_decay: float = 0.0):
    """Run our AdamW and ``reference(params)`` side by side on the same gradients and lr schedule."""
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    ours = [x.clone().requires_grad_() for x in init]
    theirs = [x.clone().requires_grad_() for x in init]
    o_opt = AdamW(ours, lr=1e-3, weight_decay=weight_decay, numerics=numerics)
    t_opt = reference(theirs, weight_decay)
    for s in range(steps):
        for group in o_opt.param_groups + t_opt.param_groups:
            group["lr"] = 1e-3 * (s + 1) / 30
        for a, b in zip(ours, theirs, strict=True):
            b.grad = (torch.randn(a.shape, generator=g) * scale).to(b.device)
            a.grad = b.grad.to(a.device).clone()
        o_opt.step()
        t_opt.step()
    out = []
    for a, b in zip(ours, theirs, strict=True):
        sa, sb = o_opt.state[a], t_opt.state[b]
        out.append(
            (a.detach().cpu(), b.detach().cpu(), sa["exp_avg_sq"].cpu(), sb["exp_avg_sq"].cpu(), sa, sb)
        )
    return out


def _torch_cpu(foreach: bool):
    return lambda ps, wd: torch.optim.AdamW(ps, lr=1e-3, weight_decay=wd, foreach=foreach)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e15, 3e19, 1e21])
def test_cpu_order_equals_torch_adamw_on_cpu_bitwise(scale, foreach):
    # Small gradients and ones that overflow: the cpu order is torch's CPU arithmetic, bit for bit.
    for p, q, v, w, sa, sb in _compare("cpu", _torch_cpu(foreach), scale, weight_decay=0.01):
        assert torch.equal(p, q)
        assert torch.equal(v, w)
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
        assert float(sa["step"]) == float(sb["step"])


def test_cuda_order_agrees_with_torch_cpu_to_float32_rounding_on_small_gradients():
    diff_sq = 0
    for p, q, v, w, _, _ in _compare("cuda-foreach", _torch_cpu(False), 1.0):
        assert torch.allclose(v, w, rtol=2.0**-20, atol=0)  # a few float32 ulps over 12 steps
        assert torch.allclose(p, q, rtol=0, atol=1e-6)  # steps of ~1e-4, a few ulps of |p| ~ 1
        diff_sq += int((v != w).sum())
    assert diff_sq > 0  # ... and is a different order (g·g is rounded on its own)


def test_torch_adamw_on_cpu_overflows_like_the_cpu_order():
    p = torch.zeros(len(GRADS), requires_grad=True)
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.0)
    p.grad = _f32(*GRADS)
    opt.step()
    assert torch.isinf(opt.state[p]["exp_avg_sq"]).tolist() == FIRST_STEP_INF["cpu"]


def test_make_optimizer_follows_the_config():
    params = [torch.zeros(3, requires_grad=True)]
    faithful = validate({})
    assert faithful["optimizer"]["numerics"] == "cuda-foreach"
    opt = make_optimizer(params, faithful)
    assert isinstance(opt, AdamW) and opt.param_groups[0]["numerics"] == "cuda-foreach"
    assert opt.param_groups[0]["lr"] == faithful["lr"] and opt.param_groups[0]["betas"] == (0.9, 0.999)
    clean = validate({"projection": {"mode": "clean"}})
    assert clean["optimizer"]["numerics"] == "torch"
    assert type(make_optimizer(params, clean)) is torch.optim.AdamW
    # Where the device's own torch kernels are the order, they run: torch's loop on CPU tensors.
    cpu = validate({"optimizer": {"numerics": "cpu"}})
    native = make_optimizer(params, cpu)
    assert type(native) is torch.optim.AdamW and native.param_groups[0]["foreach"] is False
    assert describe(native) == "torch.optim.adamw.AdamW(foreach=False)"
    assert describe(opt) == "dmnsp.optim.AdamW(numerics=cuda-foreach)"
    with pytest.raises(ValueError, match="numerics must be"):
        AdamW(params, numerics="gpu")
    with pytest.raises(TypeError, match="float32"):
        p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        p.grad = torch.ones(2, dtype=torch.float64)
        AdamW([p]).step()


# ------------------------------------------------------------------------------- on a CUDA GPU
@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("on", ["cuda", "cpu"])
@pytest.mark.parametrize("scale", [1.0, 1e15, 3e19, 1e21])
def test_cuda_foreach_emulation_equals_torch_foreach_adamw_on_cuda_bitwise(scale, on):
    def run():
        g = torch.Generator().manual_seed(1)
        init = [torch.randn(s, generator=g) for s in SHAPES]
        ours = [x.clone().to(on).requires_grad_() for x in init]
        theirs = [x.clone().cuda().requires_grad_() for x in init]
        o_opt = AdamW(ours, lr=1e-3, weight_decay=0.01, numerics="cuda-foreach")
        t_opt = torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.01, foreach=True)
        for s in range(12):
            for group in o_opt.param_groups + t_opt.param_groups:
                group["lr"] = 1e-3 * (s + 1) / 30
            for a, b in zip(ours, theirs, strict=True):
                grad = torch.randn(a.shape, generator=g) * scale
                a.grad, b.grad = grad.to(on), grad.cuda()
            o_opt.step()
            t_opt.step()
        return ours, theirs, o_opt, t_opt

    ours, theirs, o_opt, t_opt = run()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.detach().cpu(), b.detach().cpu())
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(o_opt.state[a][key].cpu(), t_opt.state[b][key].cpu()), key


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("scale", [1.0, 1e15, 3e19, 1e21])
def test_cpu_emulation_on_cuda_equals_torch_adamw_on_cpu_bitwise(scale):
    g = torch.Generator().manual_seed(2)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    ours = [x.clone().cuda().requires_grad_() for x in init]
    theirs = [x.clone().requires_grad_() for x in init]
    o_opt = AdamW(ours, lr=1e-3, weight_decay=0.01, numerics="cpu")
    t_opt = torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.01)
    for _ in range(12):
        for a, b in zip(ours, theirs, strict=True):
            b.grad = torch.randn(b.shape, generator=g) * scale
            a.grad = b.grad.cuda()
        o_opt.step()
        t_opt.step()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.detach().cpu(), b.detach())
        assert torch.equal(o_opt.state[a]["exp_avg_sq"].cpu(), t_opt.state[b]["exp_avg_sq"])


@pytest.mark.cuda
@needs_cuda
def test_torch_single_tensor_adamw_on_cuda_also_squares_first():
    # torch's CUDA addcmul kernel (the single-tensor loop, foreach=False) also computes
    # input + value·(t1·t2): on a GPU the overflow follows the device, not the foreach flag.
    p = torch.zeros(len(GRADS), device="cuda", requires_grad=True)
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.0, foreach=False)
    p.grad = _f32(*GRADS).cuda()
    opt.step()
    assert torch.isinf(opt.state[p]["exp_avg_sq"]).cpu().tolist() == FIRST_STEP_INF["cuda-foreach"]


@pytest.mark.cuda
@needs_cuda
def test_make_optimizer_on_cuda_runs_torch_foreach_for_the_cuda_order_and_emulates_cpu():
    params = [torch.zeros(3, device="cuda", requires_grad=True)]
    faithful = make_optimizer(params, validate({}))
    assert type(faithful) is torch.optim.AdamW and faithful.param_groups[0]["foreach"] is True
    cpu = make_optimizer(params, validate({"optimizer": {"numerics": "cpu"}}))
    assert isinstance(cpu, AdamW) and cpu.param_groups[0]["numerics"] == "cpu"
