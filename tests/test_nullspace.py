"""The null-space maths against the literal reference formulation, on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from dmnsp import nullspace as ns
from dmnsp.train import lr_at

D, L = 16, 12


def _random_gram(seed: int, d: int = D, n: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g) * torch.linspace(3, 0.1, d)  # a clear leading direction
    return ns.gram(a)


def _faithful_bases(tasks: int, top_select: int = 1) -> list[torch.Tensor]:
    bases = []
    for layer in range(L):
        v = None
        for t in range(tasks):
            v = ns.concat_basis(v, _random_gram(100 * layer + t), top_select)
        bases.append(v)
    return bases


def test_gram_is_sum_of_outer_products():
    a = torch.randn(3, 5, D)
    expected = sum(torch.outer(x, x) for x in a.reshape(-1, D))
    assert torch.allclose(ns.gram(a), expected, atol=1e-5)


@pytest.mark.parametrize("tasks", [1, 2, 3])
def test_concat_basis_is_t_identity_minus_protected(tasks):
    # After t tasks, V V^T = t I - sum_s u_s u_s^T: not a projector once t >= 2 (method.md §4).
    v, us = None, []
    for t in range(tasks):
        c = _random_gram(t)
        us.append(ns.top_directions(c, 1)[:, 0])
        v = ns.concat_basis(v, c, 1)
    assert v.shape == (D, tasks * (D - 1))
    expected = tasks * torch.eye(D) - sum(torch.outer(u, u) for u in us)
    assert torch.allclose(v @ v.t(), expected, atol=1e-4)


def _reference_loop(g: torch.Tensor, bases, lam_row, layers: str, layer: int, kind: str) -> torch.Tensor:
    """The reference's per-step loop, written out: for each operator i (all, or the layer's own),
    ``torch.mm`` by V_i then by V_iᵀ (down: on the right; up: on the left), then ``* lambda[l][i]``."""
    which = range(len(bases)) if layers == "multi" else [layer]
    for i in which:
        v = bases[i]
        if kind == "down":
            g = torch.mm(torch.mm(g, v), v.T) * lam_row[i]
        else:
            g = torch.mm(v, torch.mm(v.T, g)) * lam_row[i]
    return g


@pytest.mark.parametrize("layers", ["multi", "single"])
@pytest.mark.parametrize("tasks", [1, 3])
def test_composite_operator_equals_sequential_loop(layers, tasks):
    bases = _faithful_bases(tasks)
    lam = 20 + 10 * torch.rand(L, L, generator=torch.Generator().manual_seed(1))
    ops = ns.composite_operators(bases, layers)
    factors = ns.lambda_factors(lam, layers)
    g = torch.Generator().manual_seed(2)
    for layer in (0, 5, 11):
        g_down, g_up = torch.randn(4, D, generator=g), torch.randn(D, 4, generator=g)
        ref_down = _reference_loop(g_down, bases, lam[layer], layers, layer, "down")
        ref_up = _reference_loop(g_up, bases, lam[layer], layers, layer, "up")
        got_down = ns.project_down(g_down, ops[layer], factors[layer])
        got_up = ns.project_up(g_up, ops[layer], factors[layer])
        # Magnitudes reach 1e17+ (28^12 * t^12): compare relative to the scale.
        assert torch.allclose(got_down, ref_down, rtol=1e-3, atol=1e-4 * ref_down.abs().max().item())
        assert torch.allclose(got_up, ref_up, rtol=1e-3, atol=1e-4 * ref_up.abs().max().item())


@pytest.mark.parametrize("layers", ["multi", "single"])
@pytest.mark.parametrize("tasks", [1, 3])
def test_reference_order_is_the_reference_loop_bit_for_bit(layers, tasks):
    bases = _faithful_bases(tasks)
    lam = 20 + 10 * torch.rand(L, L, generator=torch.Generator().manual_seed(1))
    pairs = ns.layer_operators(bases, lam, layers)
    ops, factors = ns.composite_operators(bases, layers), ns.lambda_factors(lam, layers)
    g = torch.Generator().manual_seed(2)
    differs = 0
    for layer in range(L):
        # Row = the scaled layer, column = the operator; every coefficient a float32 scalar.
        want = [(k, lam[layer, k]) for k in range(L)] if layers == "multi" else [(layer, lam[layer, layer])]
        assert [(v.data_ptr(), float(c)) for v, c in pairs[layer]] == [
            (bases[k].data_ptr(), float(c)) for k, c in want
        ]
        assert all(isinstance(c, torch.Tensor) and c.dtype == torch.float32 for _, c in pairs[layer])
        for kind, shape in (("down", (4, D)), ("up", (D, 4))):
            grad = torch.randn(*shape, generator=g) * 1e-3
            got = ns.project_sequential(grad, pairs[layer], kind)
            assert torch.equal(got, _reference_loop(grad, bases, lam[layer], layers, layer, kind)), (
                layer,
                kind,
            )
            composite = (ns.project_down if kind == "down" else ns.project_up)(
                grad, ops[layer], factors[layer]
            )
            differs += int(not torch.equal(got, composite))
    # The composite is the same maths with other float32 rounding: not the same bits.
    assert differs > 0
    with pytest.raises(ValueError, match="kind"):
        ns.project_sequential(torch.zeros(4, D), pairs[0], "left")
    with pytest.raises(ValueError, match="layers"):
        ns.layer_operators(bases, lam, "all")


def test_faithful_gradients_reach_overflow_scale():
    bases = _faithful_bases(3)
    lam = torch.full((L, L), 28.0)
    op = ns.composite_operators(bases)[0]
    g = ns.project_down(torch.randn(4, D), op, ns.lambda_factors(lam)[0])
    assert g.abs().max() > 1e20  # 28^12 * 3^12 ≈ 1e23 times the raw gradient


@pytest.mark.parametrize("top_select", [1, 2])
@pytest.mark.parametrize("tasks", [1, 2])
def test_vectorised_lambda_equals_loop(top_select, tasks):
    bases = _faithful_bases(tasks, top_select)
    u_top = [ns.top_directions(_random_gram(500 + j), top_select) for j in range(L)]
    fast = ns.dynamic_lambda(u_top, bases, 0.1, 30.0)
    slow = ns.dynamic_lambda_loop(u_top, bases, 0.1, 30.0)
    assert fast.shape == (L, L)
    assert torch.allclose(fast, slow, atol=1e-4)


def test_lambda_within_bound_for_width():
    d = 64  # the tiny model's width: m = int(0.1 * 63) = 6, lower bound 30 exp(-1/sqrt 6) ≈ 19.95
    lo, hi = ns.lambda_bounds(d - 1, 0.1, 30.0)
    assert lo == pytest.approx(30 * math.exp(-1 / math.sqrt(6)))
    g = torch.Generator().manual_seed(0)
    bases = [ns.concat_basis(None, ns.gram(torch.randn(200, d, generator=g)), 1) for _ in range(3)]
    u_top = [ns.top_directions(ns.gram(torch.randn(200, d, generator=g)), 1) for _ in range(3)]
    lam = ns.dynamic_lambda(u_top, bases, 0.1, 30.0)
    assert lam.min() >= lo - 1e-4 and lam.max() <= hi + 1e-4


def test_fixed_lambda_and_factors():
    lam = ns.fixed_lambda(L, 2.0)
    assert ns.lambda_factors(lam, "multi") == [2.0**L] * L
    assert ns.lambda_factors(lam, "single") == [2.0] * L


def test_orthonormal_basis_is_true_projector_complement():
    v = None
    for t in range(3):
        c = _random_gram(t)
        v, k = ns.orthonormal_basis(v, c, 2)
        assert k == 2
    assert v.shape == (D, D - 6)
    assert torch.allclose(v.t() @ v, torch.eye(D - 6), atol=1e-5)
    p = ns.projector(v)
    assert torch.allclose(p @ p, p, atol=1e-5)  # idempotent: a true projector
    # The first task's leading direction is protected exactly.
    u0 = ns.top_directions(_random_gram(0), 1)[:, 0]
    assert (p @ u0).norm() < 1e-4


def test_energy_threshold_picks_enough_directions():
    c = torch.diag(torch.tensor([8.0, 1.0, 0.5, 0.5] + [0.0] * (D - 4)))
    _, k = ns.orthonormal_basis(None, c, 1, energy_threshold=0.8)
    assert k == 1  # 8 / 10 = 0.8
    _, k = ns.orthonormal_basis(None, c, 1, energy_threshold=0.9)
    assert k == 2  # 9 / 10
    v, _ = ns.orthonormal_basis(None, c, 1, energy_threshold=0.8)
    _, k = ns.orthonormal_basis(v, c, 1, energy_threshold=0.8)
    assert k == 0  # already protected enough


def test_lr_schedule_matches_reference():
    assert lr_at(0, 100, 1e-3) == pytest.approx(1e-3 / 30)
    assert lr_at(29, 100, 1e-3) == pytest.approx(1e-3)
    assert lr_at(30, 100, 1e-3) == pytest.approx(1e-3)
    assert lr_at(65, 100, 1e-3) == pytest.approx(0.5e-3)
    assert lr_at(100, 100, 1e-3) == pytest.approx(0.0, abs=1e-12)
    assert math.isfinite(lr_at(40, 20, 1e-3))  # T <= warm-up is guarded


def test_left_singular_svd_is_the_references_call_and_eigh_matches_up_to_sign_pinned():
    c = _random_gram(7)
    ref, _, _ = torch.linalg.svd(c)
    assert torch.equal(ns.left_singular(c, "svd"), ref)  # faithful: exactly what the reference called
    assert torch.equal(ns.left_singular(c), ref)  # and the default
    u = ns.left_singular(c, "eigh")
    assert torch.allclose(u.abs(), ref.abs(), atol=1e-4)  # same vectors (distinct singular values)
    assert torch.allclose(u.t() @ u, torch.eye(D), atol=1e-5)
    pivots = u.abs().argmax(dim=0)
    assert (u[pivots, torch.arange(D)] > 0).all()
    assert torch.equal(ns.left_singular(c, "eigh"), u)  # repeatable
    with pytest.raises(ValueError, match="eig must be"):
        ns.left_singular(c, "qr")


def test_rank_deficient_gram_has_solver_dependent_null_space_basis():
    # Adapter outputs live in an (r + 1)-dim subspace: the rest of U is an arbitrary null-space basis.
    g = torch.Generator().manual_seed(3)
    a = torch.randn(200, 4, generator=g) @ torch.randn(4, D, generator=g)
    c = ns.gram(a)
    u_svd, u_eigh = ns.left_singular(c, "svd"), ns.left_singular(c, "eigh")
    for u in (u_svd, u_eigh):
        assert torch.allclose(u.t() @ u, torch.eye(D), atol=1e-4)
        assert (c @ u[:, 4:]).norm() < 1e-3 * c.norm()  # both valid null-space bases
    # ... spanning the same space, but with different columns.
    assert torch.allclose(u_svd[:, 4:] @ u_svd[:, 4:].t(), u_eigh[:, 4:] @ u_eigh[:, 4:].t(), atol=1e-4)
    assert not torch.allclose(u_svd[:, 4:].abs(), u_eigh[:, 4:].abs(), atol=1e-2)
