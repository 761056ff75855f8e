"""Cost of the null-space projection: per training step, and per task (bases + coefficients).

    .venv/bin/python benchmarks/projection.py            # full (CPU: about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/projection.py --quick    # under a minute: fewer repetitions, extrapolated

Part 1, per step: a ``dmnsp`` step (forward + backward + ``ProjectionPlan.apply`` + AdamW) against a
``finetune`` step (the same without the projection) on the same model and batch. The plan is built
by ``dmnsp.methods.dmnsp.build_plan`` from realistic bases: 10 tasks of faithful concat history per layer
(V of D × 10(D-1)), coefficients from the batch's own adapter outputs. The per-step overhead is the
``plan.apply`` cost (the faithful default, projection.order reference: 2 thin products per basis and
adapter weight; benchmarks/projection_order.py sets both orders side by side); it is timed alone (many repetitions, stable)
and also shown as the difference of the two step medians (noisy on a shared machine).

Part 2, per task, ViT-B-16 width 768 with 10 tasks of history: the Gram matrices, the SVD per layer
of the basis update, the top directions and ``dynamic_lambda`` (vectorised) against
``dynamic_lambda_loop`` (the reference's per-column loop, timed on a column subset and
extrapolated linearly), and the composite operators of the next task.

Targets: projection overhead ≤ 5 % of a finetune step for ViT-B-16; lambda + basis (SVDs and
coefficients) < 1 s per task on CPU for ViT-B-16 at 10 tasks of history.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    activations,
    faithful_bases,
    fmt_s,
    load_line,
    machine_line,
    median,
    repeat,
    spread,
    table,
    timed,
    verdict,
)

from dmnsp import nullspace as ns  # noqa: E402
from dmnsp.adapters import adapters, recorded_outputs, set_recording  # noqa: E402
from dmnsp.config import validate  # noqa: E402
from dmnsp.methods.dmnsp import build_plan  # noqa: E402
from dmnsp.model import clip_logits, create_clip, encode_image, encode_text, logit_scale  # noqa: E402

OVERHEAD_TARGET = 0.05  # of a finetune step, ViT-B-16
LAMBDA_BASIS_TARGET = 1.0  # seconds per task, CPU, ViT-B-16, 10 tasks of history
HISTORY = 10  # tasks of faithful concat history


# ------------------------------------------------------------------------------------ per step


class StepBench:
    """One model, one batch, two optimisers: the same step with and without the projection."""

    def __init__(
        self,
        model_name: str,
        adapter_dim: int,
        batch: int,
        n_classes: int,
        device: torch.device,
        plan: bool = True,
    ):
        self.device = device
        bundle = create_clip(model_name, None, device=device, seed=0, adapter_dim=adapter_dim)
        self.model = model = bundle.model
        model.train()
        size = model.visual.image_size
        size = size[0] if isinstance(size, tuple | list) else size
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, 3, size, size, generator=gen).to(device)
        self.labels = torch.randint(0, n_classes, (batch,), generator=gen).to(device)
        self.tokens = bundle.tokenizer([f"a bad photo of a class{i}." for i in range(n_classes)]).to(device)
        self.width = model.visual.transformer.width
        self.n_layers = len(adapters(model, "visual"))
        params = [p for p in model.parameters() if p.requires_grad]
        self.ft_opt = torch.optim.AdamW(params, lr=1e-3)
        self.dm_opt = torch.optim.AdamW(params, lr=1e-3)
        self.plan = None
        self.lambda_range = (float("nan"), float("nan"))
        if plan:
            self._build_plan(model_name)

    def _build_plan(self, model_name: str) -> None:
        model, device = self.model, self.device
        cfg = validate({"model_name": model_name, "pretrained": None, "device": "cpu"})
        bases = [v.to(device) for v in faithful_bases(self.n_layers, self.width, HISTORY)]
        set_recording(model, "visual", True)
        with torch.no_grad():
            encode_image(model, self.images)
        current = recorded_outputs(model, "visual")
        set_recording(model, "visual", False)
        self.plan = build_plan(cfg, {"visual": bases}, {"visual": current})
        self.lambda_range = (
            float(self.plan.lambdas["visual"].min()),
            float(self.plan.lambdas["visual"].max()),
        )

    def step(self, projected: bool) -> None:
        model = self.model
        logits = clip_logits(
            encode_image(model, self.images),
            encode_text(model, self.tokens),
            logit_scale(model, "checkpoint"),
        )
        loss = F.cross_entropy(logits.float(), self.labels)
        opt = self.dm_opt if projected else self.ft_opt
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if projected:
            self.plan.apply(model)
        opt.step()

    def apply_only(self, repeats: int) -> list[float]:
        """``plan.apply`` on fixed gradients (restored before each call: apply replaces .grad)."""
        weights = [w for a in adapters(self.model, "visual") for w in (a.down.weight, a.up.weight)]
        gen = torch.Generator().manual_seed(1)
        grads = [torch.randn(w.shape, generator=gen).to(self.device) * 1e-3 for w in weights]

        def call():
            for w, g in zip(weights, grads, strict=True):
                w.grad = g
            self.plan.apply(self.model)

        return repeat(call, repeats, warmup=2, device=self.device)

    def run(self, repeats: int, apply_repeats: int, both: bool) -> dict:
        """Interleaved steps (drift from other processes hits both alike), then the isolated apply."""
        for projected in (False, True) if both else (False,):
            self.step(projected)  # warm-up
        ft, dm = [], []
        for _ in range(repeats):
            ft.append(timed(lambda: self.step(False), self.device))
            if both:
                dm.append(timed(lambda: self.step(True), self.device))
        return {"finetune": ft, "dmnsp": dm, "apply": self.apply_only(apply_repeats) if self.plan else []}


def per_step(quick: bool, devices: list[torch.device]) -> list[dict]:
    cases = []
    for device in devices:
        cuda = device.type == "cuda"
        cases.append(("dmnsp-tiny", 16, 128, 2, device, 5 if quick else 15, 200))
        if cuda:
            cases.append(("ViT-B-16", 64, 128, 10, device, 5 if quick else 20, 50))
        else:
            # CPU ViT-B-16 steps take tens of seconds on 2 cores: a few only; --quick uses batch 2.
            cases.append(
                ("ViT-B-16", 64, 2 if quick else 8, 10, device, 2 if quick else 3, 10 if quick else 20)
            )
    results = []
    for name, r, batch, n_classes, device, reps, apply_reps in cases:
        print(f"  {name} on {device}, batch {batch}: {reps} steps each ...", flush=True)
        bench = StepBench(name, r, batch, n_classes, device)
        both = not (quick and name == "ViT-B-16" and device.type == "cpu")
        times = bench.run(reps, apply_reps, both)
        results.append(
            {
                "model": name,
                "device": str(device),
                "batch": batch,
                "width": bench.width,
                "lambda_range": bench.lambda_range,
                **times,
            }
        )
        del bench
    return results


# ------------------------------------------------------------------------------------ per task


def per_task(quick: bool, device: torch.device, with_loop: bool) -> dict:
    """Bases and coefficients of one task for ViT-B-16 (12 layers, width 768) after 10 tasks."""
    n_layers, width, tokens, batch = 12, 768, 197, 128
    measured = 2 if quick else n_layers  # layers actually timed; the rest extrapolated linearly
    scale = n_layers / measured
    reps = 1 if quick else 5
    acts = activations(tokens, batch, width).to(device)
    bases = [v.to(device) for v in faithful_bases(n_layers, width, HISTORY)]
    out: dict = {"measured_layers": measured, "repeats": reps}

    grams = repeat(lambda: [ns.gram(acts) for _ in range(measured)], reps, warmup=1, device=device)
    c = ns.gram(acts)
    out["gram"] = [t * scale for t in grams]
    out["svd_basis"] = [
        t * scale
        for t in repeat(
            lambda: [ns.concat_basis(bases[i], c, 1) for i in range(measured)], reps, warmup=1, device=device
        )
    ]
    out["svd_top"] = [
        t * scale
        for t in repeat(
            lambda: [ns.top_directions(c, 1) for _ in range(measured)], reps, warmup=1, device=device
        )
    ]
    # Per layer its own top direction (rotated copies of one: the timing does not depend on it).
    u0 = ns.top_directions(c, 1)
    u_top = [torch.roll(u0, i, dims=0) for i in range(n_layers)]
    out["lambda"] = repeat(
        lambda: ns.dynamic_lambda(u_top, bases, 0.1, 30.0), 3 if quick else 10, device=device
    )
    if quick:
        out["composite"] = [
            t * scale
            for t in repeat(lambda: ns.composite_operators(bases[:measured]), reps, warmup=0, device=device)
        ]
    else:
        out["composite"] = repeat(lambda: ns.composite_operators(bases), reps, warmup=0, device=device)

    # Alternatives (not what dmnsp does): eigh of the symmetric Gram matrix instead of an SVD,
    # one batched call over all layers, and only the leading eigenvector for the coefficients.
    cs = c.expand(measured, width, width).contiguous()
    out["alt_eigh"] = [
        t * scale
        for t in repeat(
            lambda: [torch.linalg.eigh(c) for _ in range(measured)], reps, warmup=1, device=device
        )
    ]
    out["alt_eigh_batched"] = [
        t * scale for t in repeat(lambda: torch.linalg.eigh(cs), reps, warmup=1, device=device)
    ]
    out["alt_top_lobpcg"] = [
        t * scale
        for t in repeat(
            lambda: [torch.lobpcg(c, k=1, largest=True) for _ in range(measured)],
            reps,
            warmup=1,
            device=device,
        )
    ]
    lob = torch.lobpcg(c, k=1, largest=True)[1][:, 0]
    out["alt_top_agreement"] = float(torch.abs(torch.dot(lob, u0[:, 0])))

    if with_loop:
        ncols = bases[0].shape[1]
        subsets = (100, 400) if quick else (300, 1200)
        per_col = []
        for n in subsets:
            sub = [bases[0][:, :n].cpu()]
            u = [u_top[0].cpu()]
            t = median(
                repeat(
                    lambda sub=sub, u=u: ns.dynamic_lambda_loop(u, sub, 0.1, 30.0),
                    1 if quick else 3,
                    warmup=0,
                )
            )
            per_col.append(t / n)
            loop_val = ns.dynamic_lambda_loop(u, sub, 0.1, 30.0)
            vec_val = ns.dynamic_lambda(u, sub, 0.1, 30.0)
            out.setdefault("loop_vs_vectorised_maxdiff", []).append(float((loop_val - vec_val).abs().max()))
        out["loop_per_column"] = per_col
        out["loop_subsets"] = subsets
        # The loop visits every (j, k) pair and every column of V_k: L × L × ncols column visits.
        out["loop_extrapolated"] = per_col[-1] * n_layers * n_layers * ncols
        out["loop_columns_total"] = n_layers * n_layers * ncols
    return out


# ------------------------------------------------------------------------------------ report


def report_steps(results: list[dict]) -> list[list]:
    rows, targets = [], []
    for r in results:
        ft = median(r["finetune"])
        ap = median(r["apply"])
        diff = (median(r["dmnsp"]) - ft) if r["dmnsp"] else None
        rows.append(
            [
                r["model"],
                r["device"],
                r["batch"],
                spread(r["finetune"]),
                spread(r["dmnsp"]) if r["dmnsp"] else "not run (--quick)",
                spread(r["apply"]),
                f"{100 * ap / ft:.3f} %",
                f"{100 * diff / ft:+.1f} %" if diff is not None else "-",
                f"[{r['lambda_range'][0]:.1f}, {r['lambda_range'][1]:.1f}]",
            ]
        )
        if r["model"] == "ViT-B-16":
            targets.append(
                [
                    f"projection overhead per step, ViT-B-16 ({r['device']}, batch {r['batch']})",
                    f"{100 * ap / ft:.3f} % of a finetune step ({fmt_s(ap)} / {fmt_s(ft)})",
                    f"<= {100 * OVERHEAD_TARGET:.0f} %",
                    verdict(ap / ft, OVERHEAD_TARGET),
                ]
            )
    print(
        table(
            rows,
            [
                "model",
                "device",
                "batch",
                "finetune step",
                "dmnsp step",
                "plan.apply",
                "apply / finetune",
                "step difference",
                "lambda range",
            ],
        )
    )
    print(
        "  (medians of interleaved steps; 'step difference' = dmnsp median - finetune median, within noise"
        " on a shared machine; the verdict uses the isolated plan.apply time)"
    )
    return targets


def report_task(res: dict, device: torch.device) -> list[list]:
    extrap = " (extrapolated from 2 layers)" if res["measured_layers"] < 12 else ""

    def cell(key: str, factor: float = 1.0) -> str:
        return spread([factor * x for x in res[key]]) + extrap

    rows = [
        [
            "Gram matrices, 2 per layer (basis batch + first training batch; 197 tokens x 128 images)",
            cell("gram", 2.0),
        ],
        ["SVD per layer, basis update (concat_basis)", cell("svd_basis")],
        ["SVD per layer, top directions for lambda (top_directions)", cell("svd_top")],
        ["dynamic_lambda, vectorised (12 x 12 against 10 tasks of columns)", spread(res["lambda"])],
        ["composite_operators (12 projectors V V^T + 11 products)", cell("composite")],
        ["alternative: eigh per layer instead of SVD (not used)", cell("alt_eigh")],
        ["alternative: one batched eigh over the layers (not used)", cell("alt_eigh_batched")],
        [
            "alternative: lobpcg top-1 vector per layer (not used; |cos| to SVD's "
            f"{res['alt_top_agreement']:.6f})",
            cell("alt_top_lobpcg"),
        ],
    ]
    m = {k: median(res[k]) for k in ("gram", "svd_basis", "svd_top", "lambda", "composite")}
    lo = {k: min(res[k]) for k in m}
    if "loop_extrapolated" in res:
        n = res["loop_subsets"]
        rows.append(
            [
                f"dynamic_lambda_loop, reference loop: EXTRAPOLATED linearly from {n[0]} and {n[1]} columns "
                f"of one (j, k) pair ({1e6 * res['loop_per_column'][0]:.0f} / "
                f"{1e6 * res['loop_per_column'][1]:.0f} us per column) to {res['loop_columns_total']} "
                "column visits",
                fmt_s(res["loop_extrapolated"]),
            ]
        )
        rows.append(
            [
                "speed-up of the vectorised lambda over the loop",
                f"{res['loop_extrapolated'] / m['lambda']:.0f}x",
            ]
        )
        rows.append(
            [
                "max |loop - vectorised| on the subsets",
                ", ".join(f"{x:.2e}" for x in res["loop_vs_vectorised_maxdiff"]),
            ]
        )
    print(
        table(
            rows,
            [
                f"per task, ViT-B-16 width 768, 12 layers, {HISTORY} tasks of history, {device}",
                "time: median (min-max, n)",
            ],
        )
    )
    core = m["svd_basis"] + m["svd_top"] + m["lambda"]
    core_min = lo["svd_basis"] + lo["svd_top"] + lo["lambda"]
    full = core + 2 * m["gram"] + m["composite"]
    print(
        f"  lambda + basis (SVDs + dynamic_lambda): median {fmt_s(core)}, best repetition {fmt_s(core_min)}; "
        f"with Gram matrices and composite operators (all build_plan + update_bases do): {fmt_s(full)}"
    )
    cpu = device.type == "cpu"
    return [
        [
            f"lambda + basis per task, ViT-B-16 at {HISTORY} tasks ({device}; SVDs + dynamic_lambda)",
            f"{fmt_s(core)} (best {fmt_s(core_min)}){extrap}",
            f"< {LAMBDA_BASIS_TARGET:.0f} s" + ("" if cpu else " on CPU"),
            verdict(core, LAMBDA_BASIS_TARGET) if cpu else "n/a (target is for CPU)",
        ]
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer repetitions, ViT-B-16 at batch 2, "
        "2 of 12 layers timed and extrapolated (under a minute on 2 cores)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores available)")
    parser.add_argument("--skip-steps", action="store_true", help="only the per-task part")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine_line())
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    targets = []
    if not args.skip_steps:
        print("\n== per training step ==")
        targets += report_steps(per_step(args.quick, devices))
        print(load_line())
    for device in devices:
        print(f"\n== per task ({device}) ==", flush=True)
        res = per_task(args.quick, device, with_loop=device.type == "cpu")
        targets += report_task(res, device)
        print(load_line())
    print("\n== targets ==")
    print(table(targets, ["target", "measured (median)", "target", "verdict"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
