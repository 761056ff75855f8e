"""End-to-end effect of the numerics switches on the tiny faithful run (issue 11).

Runs the embedded default's dmnsp run (config/run-tiny.yaml: Fashion-MNIST 2-2, the pretrained
tiny CLIP, LAMBDA_SCALE 30) under ``optimizer.numerics`` ∈ {cuda-foreach, cpu} × ``projection.eig``
∈ {svd, eigh} for each seed, and prints per task the inf fraction of the visual ``exp_avg_sq`` and
the accuracy, then Avg / Last. The pretrained checkpoint is made first when missing
(``python -m dmnsp pretrain``), or given with ``--pretrained``.

    .venv/bin/python benchmarks/numerics.py [--seeds 0 1] [--threads 1] [--pretrained PATH]
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

SETTINGS = [("cuda-foreach", "svd"), ("cpu", "svd"), ("cuda-foreach", "eigh"), ("cpu", "eigh")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
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
        for numerics, eig in SETTINGS:
            cfg = load_config(
                base, {**overrides, "seed": seed, "optimizer.numerics": numerics, "projection.eig": eig}
            )
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
            out.append(dict(seed=seed, numerics=numerics, eig=eig, inf=infs, acc=accs, avg=avg, last=last))
            rows.append(
                [
                    seed,
                    numerics,
                    eig,
                    ", ".join(f"{x:.3g}" for x in infs),
                    ", ".join(f"{x:.4f}" for x in accs),
                    f"{avg:.4f}",
                    f"{last:.4f}",
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
    "optimizer.numerics",
    "projection.eig",
    "inf fraction, visual exp_avg_sq, tasks 0..4",
    "accuracy after tasks 0..4",
    "Avg",
    "Last",
    "wall",
]

if __name__ == "__main__":
    sys.exit(main())
