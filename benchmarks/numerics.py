"""End-to-end effect of the numerics switches on the tiny faithful run (issues 11 and 17).

Runs the embedded default's dmnsp run (config/run-tiny.yaml: Fashion-MNIST 2-2, the pretrained
tiny CLIP, LAMBDA_SCALE 30) under named settings for each seed, and prints per task the inf
fraction of the visual ``exp_avg_sq`` and the accuracy, then Avg / Last. The pretrained checkpoint
is made first when missing (``python -m dmnsp pretrain``), or given with ``--pretrained``.

Settings (``--settings``; every other key at the faithful default):
  before     projection.order composite, logit_scale 100 (the faithful default before issue 17)
  order      projection.order reference, logit_scale 100 (the order change alone)
  after      the faithful default: order reference, the checkpoint's logit scale
  composite  projection.order composite at the checkpoint's logit scale (the switch)
  cpu, eigh, cpu-eigh   optimizer.numerics cpu and/or projection.eig eigh at the faithful default
  clean      projection.mode clean

    .venv/bin/python benchmarks/numerics.py [--seeds 0 1] [--settings after cpu ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, machine_line, table

from dmnsp.config import load_config
from dmnsp.datasets import load_dataset
from dmnsp.runner import Session, run_all

SETTINGS: dict[str, dict] = {
    "before": {"projection.order": "composite", "logit_scale": 100.0},
    "order": {"projection.order": "reference", "logit_scale": 100.0},
    "after": {},
    "composite": {"projection.order": "composite"},
    "cpu": {"optimizer.numerics": "cpu"},
    "eigh": {"projection.eig": "eigh"},
    "cpu-eigh": {"optimizer.numerics": "cpu", "projection.eig": "eigh"},
    "clean": {"projection.mode": "clean"},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument(
        "--settings", nargs="+", choices=list(SETTINGS), default=["before", "order", "after", "composite"]
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (the workflow's training jobs use 1)"
    )
    ap.add_argument("--pretrained", default=str(ROOT / "results/pretrain/dmnsp-tiny.pt"))
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    print(machine_line(), flush=True)
    base = ROOT / "config/run-tiny.yaml"
    if not Path(args.pretrained).is_file():
        cmd = [sys.executable, "-m", "dmnsp", "pretrain", "--config", str(base), "--out", args.pretrained]
        print("pretraining:", " ".join(cmd), flush=True)
        subprocess.run([*cmd, "--set", f"threads={args.threads}", "--quiet"], check=True, cwd=ROOT)
    overrides = {"pretrained": args.pretrained, "threads": args.threads, "dataset_root": str(ROOT / "data")}
    data = load_dataset("fashion-mnist", str(ROOT / "data"), False)
    rows, out = [], []
    for seed in args.seeds:
        for name in args.settings:
            cfg = load_config(base, {**overrides, "seed": seed, **SETTINGS[name]})
            t0 = time.perf_counter()
            diags: list[dict] = []
            results = run_all(
                cfg,
                progress=False,
                on_task_end=lambda t, row, diag, into=diags: into.append(diag),
                session=Session(cfg, progress=False, data=data),
            )
            accs = [r["accuracy"] for r in results]
            infs = [d["inf_fraction_exp_avg_sq"]["visual"] for d in diags]
            avg, last = sum(accs) / len(accs), accs[-1]
            steps = [d["seconds"]["train"] / max(1, d["steps"]) for d in diags]
            numerics = cfg["optimizer"]["numerics"]
            switches = (
                f"{numerics}, {cfg['projection']['eig']}, {cfg['projection']['order']}, "
                f"logit_scale {cfg['logit_scale']} = {diags[0]['logit_scale']:.4g}"
            )
            out.append(
                dict(
                    seed=seed,
                    setting=name,
                    switches=switches,
                    inf=infs,
                    acc=accs,
                    avg=avg,
                    last=last,
                    step=steps,
                )
            )
            rows.append(
                [
                    seed,
                    name,
                    switches,
                    ", ".join(f"{x:.3g}" for x in infs),
                    ", ".join(f"{100 * x:.2f}" for x in accs),
                    f"{100 * avg:.2f}",
                    f"{100 * last:.2f}",
                    f"{1000 * sum(steps) / len(steps):.1f} ms",
                    f"{time.perf_counter() - t0:.0f} s",
                ]
            )
            print(table(rows[-1:], HEADERS), flush=True)
    print()
    print(table(rows, HEADERS))
    print(machine_line())
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


HEADERS = [
    "seed",
    "setting",
    "numerics, eig, order, logit scale",
    "inf fraction, visual exp_avg_sq, tasks 0..4",
    "accuracy % after tasks 0..4",
    "Avg %",
    "Last %",
    "train s/step (mean of tasks)",
    "wall",
]

if __name__ == "__main__":
    sys.exit(main())
