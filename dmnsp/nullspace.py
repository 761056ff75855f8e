"""Null-space projection maths (method.md sections 4-6): pure functions on tensors.

Notation: L layers, D width, ``V_k`` (D × n_k) the basis of layer k, ``P_k = V_k V_k^T``.
Faithful mode concatenates one ``U[:, TOP_SELECT:]`` block per task (never orthonormalised, so
``P_k ≈ t·I`` after t tasks); clean mode keeps ``V_k`` an orthonormal basis of the complement of
the protected directions, so ``P_k`` is a true orthogonal projector.

A gradient meets the operators in one of two orders (``projection.order``): ``reference``, the
reference's loop (one layer's basis at a time, each product and each coefficient a float32 op:
:func:`layer_operators`, :func:`project_sequential`), or ``composite``, one precomputed
``M = P_0 ⋯ P_{L-1}`` per task and the product of the coefficients (:func:`composite_operators`,
:func:`project_down`, :func:`project_up`): the same maths, fewer flops, other float32 rounding.
"""

from __future__ import annotations

import math

import torch


def gram(activations: torch.Tensor) -> torch.Tensor:
    """Uncentred second moment ``sum a a^T`` over every leading dimension (tokens, batch), fp32."""
    a = activations.reshape(-1, activations.shape[-1]).float()
    return a.t() @ a


#: Solvers for the left singular vectors of a Gram matrix (``projection.eig``).
EIG_SOLVERS = ("svd", "eigh")


def left_singular(c: torch.Tensor, eig: str = "svd") -> torch.Tensor:
    """Left singular vectors of a Gram matrix ``c`` (columns, descending singular values).

    ``svd``: ``U`` of ``torch.linalg.svd(c)`` on ``c``'s device, the reference's call. ``eigh``:
    the eigenvectors of the symmetric ``c`` (faster), each column's largest-magnitude entry made
    positive. Neither is unique: singular vectors have no intrinsic sign, and a Gram matrix of
    adapter outputs has rank at most r + 1, so all but r + 1 columns span a null space in which
    any orthonormal basis is as valid as another. Which one comes out depends on the solver, the
    LAPACK / cuSOLVER build and rounding; the signed cosines of the dynamic coefficient, and so
    lambda, depend on it (config/README.md gives the measured spread). Sign pinning makes
    ``eigh`` repeatable for one build, not machine-independent.
    """
    if eig == "svd":
        return torch.linalg.svd(c)[0]
    if eig != "eigh":
        raise ValueError(f"eig must be one of {EIG_SOLVERS}, got {eig!r}")
    _, vecs = torch.linalg.eigh(c)
    vecs = vecs.flip(-1)
    pivots = vecs.abs().argmax(dim=0)
    signs = torch.sign(vecs[pivots, torch.arange(vecs.shape[1], device=vecs.device)])
    return vecs * torch.where(signs == 0, torch.ones_like(signs), signs)


def concat_basis(
    previous: torch.Tensor | None, c: torch.Tensor, top_select: int, eig: str = "svd"
) -> torch.Tensor:
    """Faithful update: append ``U[:, top_select:]`` of this task's Gram matrix to the basis."""
    block = left_singular(c, eig)[:, top_select:]
    return block if previous is None else torch.cat([previous, block], dim=1)


def orthonormal_basis(
    previous: torch.Tensor | None,
    c: torch.Tensor,
    top_select: int,
    energy_threshold: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Clean update: remove newly protected directions from an orthonormal free-space basis.

    The new directions are the leading singular vectors of this task's statistics restricted to
    the still-free space (``P C P``). Without a threshold ``top_select`` are protected; with one,
    as few as make the protected share of this task's activation energy reach it (the criterion of
    gradient projection memory).

    Returns:
        ``(V, k)``: orthonormal basis (D × n) of the free space, and how many directions were added.
    """
    d = c.shape[0]
    v = torch.eye(d, dtype=c.dtype, device=c.device) if previous is None else previous
    if v.shape[1] == 0:
        return v, 0
    c_free = v.t() @ c @ v  # the statistics in free-space coordinates
    evals, evecs = torch.linalg.eigh(c_free)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    if energy_threshold is None:
        k = min(top_select, v.shape[1])
    else:
        total = torch.trace(c).clamp_min(torch.finfo(c.dtype).tiny)
        protected = total - evals.sum()  # energy already outside the free space
        cum = (protected + torch.cumsum(evals, 0)) / total
        if protected / total >= energy_threshold:
            k = 0
        else:
            hit = torch.nonzero(cum >= energy_threshold)
            k = int(hit[0]) + 1 if len(hit) else v.shape[1]
    return v @ evecs[:, k:], k


def top_directions(c: torch.Tensor, top_select: int, eig: str = "svd") -> torch.Tensor:
    """``u``: the ``top_select`` leading left singular vectors of ``c`` (D × top_select)."""
    return left_singular(c, eig)[:, :top_select]


def _top_m(ncols: int, top_k_ratio: float) -> int:
    # The reference takes int(ratio * ncols) values; with fewer than one it would average an empty
    # set (NaN). One value is the smallest meaningful choice.
    return max(1, int(ncols * top_k_ratio))


def dynamic_lambda(
    u_top: list[torch.Tensor],
    bases: list[torch.Tensor],
    top_k_ratio: float,
    lambda_scale: float,
) -> torch.Tensor:
    """``lambda[j][k] = LAMBDA_SCALE * exp(-mean of the top-m cosines between u_j and V_k's columns)``.

    One matmul per layer k replaces the reference's Python loop over columns (same numbers).

    TOP_SELECT = s > 1 is this project's extension (the reference crashes: its ``torch.dot`` gets
    the D × s matrix ``u_j``). Its definition: with ``u_j[:, i]`` the i-th leading direction and
    ``m = max(1, int(TOP_K_RATIO * n_k))``, ``mean_i`` is the mean of the m largest signed cosines
    between ``u_j[:, i]`` and the normalised columns of ``V_k``, and
    ``lambda[j][k] = LAMBDA_SCALE * exp(-(mean_1 + ... + mean_s) / s)``: one top-m mean per
    direction, averaged. For s = 1 this is the reference's formula. (The ``max(1, ...)`` is also
    an extension: with fewer than 1 / TOP_K_RATIO columns the reference averages nothing, NaN.)

    Args:
        u_top: per layer j, D × s leading directions of the current batch.
        bases: per layer k, the basis V_k (D × n_k).

    Returns:
        L × L tensor (rows j: the layer whose gradient is scaled; columns k: the operator).
    """
    u = torch.stack([x / x.norm(dim=0, keepdim=True) for x in u_top])  # L × D × s
    out = torch.empty(len(u_top), len(bases), dtype=u.dtype, device=u.device)
    for k, v in enumerate(bases):
        vn = v / v.norm(dim=0, keepdim=True)
        cos = torch.einsum("lds,dn->lsn", u, vn)
        m = _top_m(v.shape[1], top_k_ratio)
        out[:, k] = cos.topk(m, dim=-1).values.mean(-1).mean(-1)
    return lambda_scale * torch.exp(-out)


def dynamic_lambda_loop(
    u_top: list[torch.Tensor], bases: list[torch.Tensor], top_k_ratio: float, lambda_scale: float
) -> torch.Tensor:
    """The reference's literal per-column loop (slow; for tests and benchmarks only)."""
    lam = torch.empty(len(u_top), len(bases))
    for j, u in enumerate(u_top):
        for k, v in enumerate(bases):
            means = []
            for s in range(u.shape[1]):
                un = u[:, s] / torch.norm(u[:, s])
                sims = [torch.dot(un, col / torch.norm(col)) for col in v.t()]
                m = _top_m(len(sims), top_k_ratio)
                means.append(torch.mean(torch.topk(torch.stack(sims), m)[0]))
            lam[j, k] = torch.exp(-torch.stack(means).mean()) * lambda_scale
    return lam


def fixed_lambda(n_layers: int, lambda_scale: float) -> torch.Tensor:
    """The ``lambda: fixed`` ablation: LAMBDA_SCALE everywhere."""
    return torch.full((n_layers, n_layers), float(lambda_scale))


def lambda_bounds(ncols: int, top_k_ratio: float, lambda_scale: float) -> tuple[float, float]:
    """Practical range of a dynamic coefficient against one orthonormal block (method.md §5)."""
    m = _top_m(ncols, top_k_ratio)
    return lambda_scale * math.exp(-1 / math.sqrt(m)), float(lambda_scale)


def projector(v: torch.Tensor) -> torch.Tensor:
    """``P = V V^T``."""
    return v @ v.t()


#: How the operators of the projection meet a gradient (``projection.order``).
ORDERS = ("reference", "composite")


def composite_operators(bases: list[torch.Tensor], layers: str = "multi") -> list[torch.Tensor]:
    """Per-layer operator ``M_l`` applied to layer l's down-weight gradient as ``G M_l`` (order composite).

    ``multi``: ``M = P_0 P_1 ⋯ P_{L-1}`` (left to right, the reference's order), shared by every
    layer and computed once per task. ``single``: ``M_l = P_l``.
    """
    projs = [projector(v) for v in bases]
    if layers == "single":
        return projs
    if layers != "multi":
        raise ValueError(f"layers must be 'multi' or 'single', got {layers!r}")
    m = projs[0]
    for p in projs[1:]:
        m = m @ p
    return [m] * len(projs)


def lambda_factors(lam: torch.Tensor, layers: str = "multi") -> list[float]:
    """Scalar per layer: ``prod_k lambda[l][k]`` (multi) or ``lambda[l][l]`` (single)."""
    if layers == "single":
        return [float(x) for x in torch.diagonal(lam)]
    # Left-to-right products in float64 then rounded once, as exact as the reference's chain.
    return [math.prod(float(x) for x in row) for row in lam]


def project_down(grad: torch.Tensor, op: torch.Tensor, factor: float) -> torch.Tensor:
    """Down weight (r × D), order composite: ``G M · factor``."""
    return (grad @ op) * factor


def project_up(grad: torch.Tensor, op: torch.Tensor, factor: float) -> torch.Tensor:
    """Up weight (D × r), order composite: ``M^T G · factor`` (= ``P_{L-1} ⋯ P_0 G``)."""
    return (op.t() @ grad) * factor


def layer_operators(
    bases: list[torch.Tensor], lam: torch.Tensor, layers: str = "multi"
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per layer l, the ``(V_k, lambda[l][k])`` pairs its gradient meets, in order (order reference).

    ``multi``: every layer's basis, k = 0 .. L-1; ``single``: layer l's own. The coefficients stay
    float32 scalars on ``lam``'s device, as the reference's ``lamda[j][k]`` tensors are.
    """
    if layers not in ("multi", "single"):
        raise ValueError(f"layers must be 'multi' or 'single', got {layers!r}")
    if layers == "single":
        return [[(v, lam[layer, layer])] for layer, v in enumerate(bases)]
    return [[(v, lam[layer, k]) for k, v in enumerate(bases)] for layer in range(len(bases))]


def project_sequential(
    grad: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor | float]], kind: str
) -> torch.Tensor:
    """The reference's per-step loop (order reference): one basis at a time, scaled after each.

    Down weight: ``G ← (G V_k) V_kᵀ · lambda_k``; up weight: ``G ← V_k (V_kᵀ G) · lambda_k``, for the
    pairs in order. Each product and each scaling is a separate float32 op, as in the reference,
    so the rounding (and where the growing values overflow) is the reference's.
    """
    if kind not in ("down", "up"):
        raise ValueError(f"kind must be 'down' or 'up', got {kind!r}")
    g = grad
    for v, lam in pairs:
        g = torch.mm(torch.mm(g, v), v.t()) * lam if kind == "down" else torch.mm(v, torch.mm(v.t(), g)) * lam
    return g
