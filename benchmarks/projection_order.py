"""Cost of ``projection.order`` per training step: the reference's loop against the composite.

    .venv/bin/python benchmarks/projection_order.py [--quick] [--threads N] [--tasks 1 4 9]

For the tiny CLIP (12 layers, width 64, r = 16) and ViT-B/16's visual tower (12 layers, width
768, r = 64), with faithful concat histories of t tasks (V_k of D × t(D−1), random orthonormal
blocks) and coefficients in [26, 30]: the time ``ProjectionPlan.apply`` takes for one step (every
layer's down and up weight gradient) in order ``reference`` (12 bases at a time, 2 products and a
scaling each: ``layer_operators`` + ``project_sequential``) and ``composite`` (one matmul with
the precomputed ``M``: ``composite_operators`` + ``project_down`` / ``project_up``), the once-per-
task cost of building the composite, and how far the two orders' float32 results lie apart. A
finetune step (forward + backward, batch 128) of the tiny model is timed beside them as the unit.
On CUDA (when present) every case runs there too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import faithful_bases, load_line, machine_line, median, repeat, spread, table  # noqa: E402

from dmnsp import nullspace as ns  # noqa: E402
from dmnsp.methods.dmnsp import ProjectionPlan  # noqa: E402
from dmnsp.model import clip_logits, create_clip, encode_image, encode_text, logit_scale  # noqa: E402

L = 12
CASES = [("dmnsp-tiny", 64, 16), ("ViT-B-16 (visual)", 768, 64)]


class _Adapter(torch.nn.Module):
    def __init__(self, width: int, r: int, device: torch.device) -> None:
        super().__init__()
        self.down = torch.nn.Linear(width, r).to(device)
        self.up = torch.nn.Linear(r, width).to(device)


class _Tower(torch.nn.Module):
    """Just enough of a model for ``ProjectionPlan``: ``visual.transformer.resblocks[l].adapter``."""

    def __init__(self, width: int, r: int, device: torch.device) -> None:
        super().__init__()
        blocks = torch.nn.ModuleList(torch.nn.Module() for _ in range(L))
        for block in blocks:
            block.adapter = _Adapter(width, r, device)
        self.visual = torch.nn.Module()
        self.visual.transformer = torch.nn.Module()
        self.visual.transformer.resblocks = blocks


def plans(width: int, tasks: int, device: torch.device) -> dict[str, ProjectionPlan]:
    bases = [v.to(device) for v in faithful_bases(L, width, tasks)]
    gen = torch.Generator().manual_seed(1)
    lam = (26 + 4 * torch.rand(L, L, generator=gen)).to(device)
    factors = ns.lambda_factors(lam)
    return {
        "reference": ProjectionPlan(
            order="reference", pairs={"visual": ns.layer_operators(bases, lam)}, factors={"visual": factors}
        ),
        "composite": ProjectionPlan(
            order="composite",
            ops={"visual": ns.composite_operators(bases)},
            factors={"visual": factors},
        ),
        "_bases": bases,
    }


def apply_times(width: int, r: int, tasks: int, device: torch.device, reps: int) -> dict:
    model = _Tower(width, r, device)
    built = plans(width, tasks, device)
    weights = [
        w for b in model.visual.transformer.resblocks for w in (b.adapter.down.weight, b.adapter.up.weight)
    ]
    gen = torch.Generator().manual_seed(2)
    grads = [(torch.randn(w.shape, generator=gen) * 1e-3).to(device) for w in weights]
    out, results = {}, {}
    for order in ("reference", "composite"):

        def call(order=order):
            for w, g in zip(weights, grads, strict=True):
                w.grad = g
            built[order].apply(model)

        out[order] = repeat(call, reps, warmup=2, device=device)
        call()
        results[order] = [w.grad.clone() for w in weights]
    out["build_composite"] = repeat(
        lambda: ns.composite_operators(built["_bases"]), max(2, reps // 5), device=device
    )
    rel = max(
        float((a.double() - b.double()).abs().max() / b.double().abs().max())
        for a, b in zip(results["reference"], results["composite"], strict=True)
    )
    out["rel_diff"] = rel
    return out


def finetune_step(device: torch.device, reps: int) -> list[float]:
    bundle = create_clip("dmnsp-tiny", None, device=device, seed=0, adapter_dim=16)
    model = bundle.model.train()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(128, 3, 28, 28, generator=gen).to(device)
    labels = torch.randint(0, 2, (128,), generator=gen).to(device)
    tokens = bundle.tokenizer(["a bad photo of a shirt.", "a bad photo of a bag."]).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    scale = logit_scale(model, "checkpoint")

    def step():
        logits = clip_logits(encode_image(model, images), encode_text(model, tokens), scale)
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return repeat(step, reps, warmup=1, device=device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (under a minute on 2 cores)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 4, 9], help="tasks of history (t)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        ft = finetune_step(device, 3 if args.quick else 10)
        rows.append(
            ["dmnsp-tiny finetune step, batch 128 (the unit)", str(device), "-", spread(ft), "", "", "", ""]
        )
        for name, width, r in CASES:
            for t in args.tasks:
                reps = (3 if args.quick else 10) if width > 100 else (10 if args.quick else 50)
                res = apply_times(width, r, t, device, reps)
                ref, comp = median(res["reference"]), median(res["composite"])
                rows.append(
                    [
                        f"{name}, t = {t} (V: {width} x {t * (width - 1)})",
                        str(device),
                        spread(res["reference"]),
                        spread(res["composite"]),
                        f"{ref / comp:.1f}x",
                        f"{100 * (ref - comp) / median(ft):+.1f} %" if name == "dmnsp-tiny" else "",
                        spread(res["build_composite"]),
                        f"{res['rel_diff']:.1e}",
                    ]
                )
                print(table(rows[-1:], HEADERS), flush=True)
        print(load_line(), flush=True)
    print()
    print(table(rows, HEADERS))
    print(
        "  apply = one step's projection of all 12 layers' down and up weight gradients; 'extra per step' ="
        " (reference - composite) / the tiny finetune step; the composite is built once per task."
    )
    print(load_line())
    return 0


HEADERS = [
    "case",
    "device",
    "apply, order reference",
    "apply, order composite",
    "reference / composite",
    "extra per tiny step",
    "build composite (once per task)",
    "max rel. difference",
]

if __name__ == "__main__":
    raise SystemExit(main())
