"""How implementation-defined the dynamic coefficient is (issue 11, method.md section 6).

A Gram matrix of adapter outputs has rank ≤ r + 1, so ``U[:, 1:]`` of its SVD is, apart from r
columns fixed up to sign, an arbitrary orthonormal basis of a (D − r − 1)-dimensional null space,
and every singular vector's sign is arbitrary. The signed top-m cosines of lambda depend on that
choice. For the same Gram matrices this script computes lambda (12 × 12) under

- ``svd``: ``torch.linalg.svd`` (the reference's call), ``eigh``: sign-pinned ``torch.linalg.eigh``;
- ``--variants`` random, equally valid bases: random signs for every singular vector, and a
  Haar-random rotation of each null-space basis,

and prints, per setting, the spread per entry (max − min over all bases) as max and mean over the
144 entries, and the largest |lambda_svd − lambda_eigh|.

Settings: the tiny model (D = 64, r = 16) with real adapter outputs of the embedded default's
faithful run (Fashion-MNIST, the pretrained tiny CLIP; needs ``results/pretrain/dmnsp-tiny.pt``,
see benchmarks/numerics.py), and synthetic adapter outputs of the same structure,
``s·(W_up·relu(W_down·h + b) + b_up)``, at D = 64 (r = 16) and D = 768 (r = 64, ViT-B/16).

    .venv/bin/python benchmarks/lambda_spread.py [--variants 20] [--tasks 3] [--skip-real]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import ROOT, machine_line, table

from dmnsp import nullspace as ns

L = 12


def null_rank(c: torch.Tensor) -> int:
    """Numerical rank of a PSD Gram matrix (eigenvalues above 1e-6 of the largest)."""
    ev = torch.linalg.eigvalsh(c.double())
    return int((ev > 1e-6 * ev.max()).sum())


_CACHE: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}  # id → (the Gram itself, U, rank)


def random_valid_u(c: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Left singular vectors of ``c`` with random signs and a random basis of the null space."""
    if id(c) not in _CACHE or _CACHE[id(c)][0] is not c:
        _CACHE[id(c)] = (c, ns.left_singular(c, "eigh"), null_rank(c))
    _, u, k = _CACHE[id(c)]
    signs = torch.where(torch.rand(k, generator=gen) < 0.5, -1.0, 1.0)
    q, r = torch.linalg.qr(torch.randn(u.shape[0] - k, u.shape[0] - k, generator=gen))
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed
    return torch.cat([u[:, :k] * signs, u[:, k:] @ q], dim=1)


def lambdas(history: list[list[torch.Tensor]], current: list[torch.Tensor], variants: int, seed: int):
    """lambda under svd, eigh and random valid bases: {name: 12 × 12}."""
    gen = torch.Generator().manual_seed(seed)
    solvers = {
        "svd": lambda c: ns.left_singular(c, "svd"),
        "eigh": lambda c: ns.left_singular(c, "eigh"),
        **{f"random{i}": (lambda c: random_valid_u(c, gen)) for i in range(variants)},
    }
    out = {}
    for name, solve in solvers.items():
        bases = [torch.cat([solve(c)[:, 1:] for c in per_layer], dim=1) for per_layer in history]
        u_top = [solve(c)[:, :1] for c in current]
        out[name] = ns.dynamic_lambda(u_top, bases, 0.1, 30.0)
    return out


def summarize(lams: dict[str, torch.Tensor]) -> tuple[float, float, float, float, float]:
    stack = torch.stack(list(lams.values()))
    spread = stack.amax(0) - stack.amin(0)
    diff = (lams["svd"] - lams["eigh"]).abs()
    return (
        float(spread.max()),
        float(spread.mean()),
        float(diff.max()),
        float(stack.min()),
        float(stack.max()),
    )


# ------------------------------------------------------------------------------ synthetic
def synthetic_grams(d: int, r: int, tokens: int, batch: int, seed: int) -> list[torch.Tensor]:
    """Per layer, the Gram matrix of adapter-like outputs ``0.1·(W_up relu(W_down h + b) + b_up)``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(L):
        h = torch.randn(tokens * batch, d, generator=gen) + torch.randn(d, generator=gen)
        w_down = torch.randn(r, d, generator=gen) / d**0.5
        w_up = torch.randn(d, r, generator=gen) * 0.05
        z = torch.relu(h @ w_down.t() + 0.1 * torch.randn(r, generator=gen))
        a = 0.1 * (z @ w_up.t() + 0.01 * torch.randn(d, generator=gen))
        out.append(ns.gram(a))
    return out


# ------------------------------------------------------------------------------ real (tiny)
def real_grams(
    tasks: int, pretrained: str, threads: int
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Train the embedded default's faithful run task by task; after each task, the Gram matrices
    of one training batch of that task (the basis statistics) and of the next task's first batch
    (the lambda statistics), from the visual adapters' outputs with dropout on."""
    from dmnsp.adapters import recorded_outputs, set_recording
    from dmnsp.checkpoint import TaskState
    from dmnsp.config import load_config
    from dmnsp.model import encode_image
    from dmnsp.runner import Session

    cfg = load_config(
        ROOT / "config/run-tiny.yaml",
        {"pretrained": pretrained, "threads": threads, "dataset_root": str(ROOT / "data")},
    )
    session = Session(cfg, progress=False)
    model = session.model

    def grams_of(t: int, seed: int) -> list[torch.Tensor]:
        loader = torch.utils.data.DataLoader(
            session._train_set(t), batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
        images, _ = next(iter(loader))
        model.train()
        set_recording(model, "visual", True)
        with torch.no_grad():
            encode_image(model, images)
        outs = recorded_outputs(model, "visual")
        set_recording(model, "visual", False)
        return [ns.gram(a) for a in outs]

    state, hist, cur = TaskState(), [], []
    for t in range(tasks):
        state, _, _ = session.run_task(t, state)
        hist.append(grams_of(t, 100 + t))
        cur.append(grams_of(t + 1, 200 + t))
    return hist, cur


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", type=int, default=20)
    ap.add_argument("--tasks", type=int, default=3, help="history lengths 1..tasks")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pretrained", default=str(ROOT / "results/pretrain/dmnsp-tiny.pt"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    rows = []

    def report(
        label: str, hist: list[list[torch.Tensor]], cur: list[torch.Tensor], d: int, rank: int
    ) -> None:
        t0 = time.perf_counter()
        history = [[hist[t][layer] for t in range(len(hist))] for layer in range(L)]
        mx, mean, svd_eigh, lo, hi = summarize(lambdas(history, cur, args.variants, seed=len(hist)))
        rows.append(
            [
                label,
                d,
                rank,
                len(hist),
                f"{mx:.3f}",
                f"{mean:.3f}",
                f"{svd_eigh:.3f}",
                f"[{lo:.2f}, {hi:.2f}]",
            ]
        )
        print(table(rows[-1:], HEADERS), f"({time.perf_counter() - t0:.0f} s)", flush=True)

    if not args.skip_real:
        if not Path(args.pretrained).is_file():
            print(
                f"{args.pretrained} is missing: run benchmarks/numerics.py first, or --skip-real",
                file=sys.stderr,
            )
            return 2
        hist, cur = real_grams(args.tasks, args.pretrained, args.threads)
        for t in range(1, args.tasks + 1):
            report("tiny CLIP, real outputs", hist[:t], cur[t - 1], 64, null_rank(hist[0][5]))
    for d, r in ((64, 16), (768, 64)):
        tokens, batch = (50, 128) if d == 64 else (197, 8)
        hist = [synthetic_grams(d, r, tokens, batch, seed=t) for t in range(args.tasks)]
        for t in range(1, args.tasks + 1):
            cur = synthetic_grams(d, r, tokens, batch, seed=100 + t)
            report("synthetic", hist[:t], cur, d, null_rank(hist[0][0]))
    print()
    print(table(rows, HEADERS))
    return 0


HEADERS = [
    "adapter outputs",
    "D",
    "Gram rank",
    "tasks of history",
    "spread per entry, max",
    "spread per entry, mean",
    "max |svd − eigh|",
    "lambda range",
]

if __name__ == "__main__":
    sys.exit(main())
