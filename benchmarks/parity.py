"""Parity with the official code: the project's method and the official repository's own modules,
run side by side on CPU with the project's tiny CLIP, the same data and (where the official code
allows) the same random streams.

    .venv/bin/python benchmarks/parity.py --method dmnsp --official PATH [--seeds 0 1] [...]

PATH is a local checkout of the official repository (RL-VIG/DMNSP, JiazuoYu/MoE-Adapters4CL or
linlany/RAPF); the project never contains or downloads it. Its modules are imported from PATH at
run time; only what CPU execution and the tiny model force is patched, plus the data order and
seeds, and every patch is printed. Per task it prints both accuracies, the prediction agreement
and the method's own state (DMNSP: lambda, inf fraction of AdamW's exp_avg_sq, bases; MoE: gate
statistics; RAPF: fused map, class statistics). Timings on a shared machine are indicative only.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys
import time
from pathlib import Path

from parity_common import OFFICIAL, ROOT, ParityError, check_modules, official_root

METHODS = tuple(OFFICIAL)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="the project's method beside the official repository's own code, on CPU with the tiny CLIP"
    )
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--official", help="local checkout of the method's official repository")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--train-per-class", type=int, default=300, help="training images per class (max_train_per_class)"
    )
    ap.add_argument(
        "--test-per-class", type=int, default=200, help="test images per class (max_test_per_class)"
    )
    ap.add_argument(
        "--adapter-dim",
        type=int,
        default=64,
        help="adapter bottleneck (DMNSP, MoE: the official adapter hard-codes 64; another width is patched in)",
    )
    ap.add_argument("--batch-size", type=int, default=None, help="training batch (default: the method's)")
    ap.add_argument(
        "--epochs", type=int, default=None, help="RAPF: epochs per task (default 15, as the official)"
    )
    ap.add_argument(
        "--numerics",
        choices=("cpu", "cuda-foreach"),
        default="cpu",
        help="DMNSP/MoE AdamW order: cpu = both sides run torch's CPU AdamW (no patch); cuda-foreach = "
        "the project's faithful CUDA order, the official AdamW patched to the same emulation "
        "(RAPF always compares torch's CPU Adam with the project's numerics: cpu)",
    )
    ap.add_argument(
        "--rapf-precision",
        choices=("fp32", "fp16"),
        default="fp32",
        help="RAPF: the project's rapf.precision (the official code on CPU is fp32 but for fp16-rounded inputs)",
    )
    ap.add_argument(
        "--rapf-fp16-inputs",
        action="store_true",
        help="RAPF: round both sides' input images to fp16 first (isolates the official fp16 input cast)",
    )
    ap.add_argument(
        "--moe-stable-dispatch",
        action="store_true",
        help="MoE: keep each expert's samples in batch order in the official dispatcher (its sort is unstable)",
    )
    ap.add_argument(
        "--dmnsp-reference-gram",
        action="store_true",
        help="DMNSP diagnosis: the project's Gram matrices summed per sample then over the batch, as the reference",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--pretrained", help="tiny CLIP checkpoint (default results/pretrain/dmnsp-tiny.pt, made if missing)"
    )
    ap.add_argument(
        "--log-dir", default=str(ROOT / "results/parity"), help="where the official code's output goes"
    )
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument(
        "--project",
        help="the project checkout whose dmnsp package is compared (default: this one), e.g. a branch "
        "exported with `git archive BRANCH | tar -x -C DIR`",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    faulthandler.enable()
    try:
        root = official_root(args.method, args.official)
        check_modules(args.method)
        use_project(args.project)
        return _run(args, root)
    except ParityError as exc:
        print(f"parity: error: {exc}", file=sys.stderr)
        return 2


def seeds_summary(results: dict) -> list[str]:
    """Avg and Last of both sides over the seeds run (mean, spread), and their per-seed gap: the
    comparison that remains where the random streams cannot be aligned."""
    import statistics

    rows = []
    per = {"ours": {"Avg": [], "Last": []}, "official": {"Avg": [], "Last": []}}
    for seed in results["seeds"].values():
        for side in per:
            accs = [r[f"acc_{side}"] for r in seed["rows"]]
            per[side]["Avg"].append(sum(accs) / len(accs))
            per[side]["Last"].append(accs[-1])
    n = len(results["seeds"])
    rows.append(f"\nover {n} seed(s): Avg and Last, mean (min-max)")
    for side, vals in per.items():
        parts = [f"{k} {statistics.mean(v):.4f} ({min(v):.4f}-{max(v):.4f})" for k, v in vals.items()]
        rows.append(f"  {side:8s} " + ", ".join(parts))
    gaps = {
        k: [a - b for a, b in zip(per["ours"][k], per["official"][k], strict=True)] for k in ("Avg", "Last")
    }
    rows.append(
        "  ours - official per seed: "
        + "; ".join(f"{k} " + ", ".join(f"{g:+.4f}" for g in v) for k, v in gaps.items())
    )
    return rows


def use_project(path: str | None) -> None:
    """Import ``dmnsp`` from the checkout at ``path`` instead of this one."""
    if path is None:
        return
    project = Path(path).expanduser().resolve()
    if not (project / "dmnsp" / "__init__.py").is_file():
        raise ParityError(f"--project {path} holds no dmnsp package (dmnsp/__init__.py)")
    if "dmnsp" in sys.modules:
        raise ParityError("dmnsp was imported before --project could take effect")
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    sys.path.insert(0, str(project))


def _run(args, root: Path) -> int:
    import importlib

    dmnsp = importlib.import_module("dmnsp")  # before common, which puts this checkout on sys.path
    from common import machine_line

    harness = importlib.import_module(f"parity_{args.method}")
    print(machine_line(), flush=True)
    print(f"official code: {OFFICIAL[args.method].name} at {root}", flush=True)
    print(f"project code: {Path(dmnsp.__file__).parent.parent}", flush=True)
    t0 = time.perf_counter()
    results = harness.run(args, root)
    for line in seeds_summary(results):
        print(line)
    print(f"\nwall {time.perf_counter() - t0:.0f} s (2 shared cores: indicative only)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
