"""Digests of short tiny runs, to show that a change of the harness leaves a method's results
bitwise unchanged: run it on two checkouts and compare the printed lines.

Each method runs ``dmnsp run`` on Fashion-MNIST with the tiny CLIP at random weights (5 tasks of
2 classes, a few dozen steps per task), in a fresh process. Per run it prints one SHA-256 over
every task's checkpoint tensors (adapters and method state, read back with
:func:`dmnsp.checkpoint.load_checkpoint`; the file itself also holds the config hash, which
changes whenever the run schema gains a key), one over the ``eval.json`` rows and one over the
``diagnostics.json`` files, both without their timing and memory fields.

    PYTHONPATH=/path/to/checkout python benchmarks/identity.py [--methods zeroshot finetune ...]

``PYTHONPATH`` picks the checkout whose code runs (as ``.ci/mutants`` does); the venv only
provides the libraries.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

RUN = {
    "dataset": "fashion-mnist",
    "model_name": "dmnsp-tiny",
    "pretrained": None,
    "initial_increment": 2,
    "increment": 2,
    "max_train_per_class": 48,
    "max_test_per_class": 24,
    "adapter_dim": 16,
    "batch_size": 32,
    "epochs": 2,
    "warmup_steps": 2,
    "eval_batch_size": 64,
    "device": "cpu",
    "threads": 1,
    "num_workers": 0,
}
#: Fields that measure the machine, not the computation, and the config hash ``eval.json`` records
#: (it changes whenever the run schema gains a key, as the checkpoint's does).
VOLATILE = {"seconds", "peak_mem_mb", "run_seconds", "config_hash"}


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def digests(run_dir: Path) -> dict[str, str]:
    """SHA-256 (first 16 hex digits) of the checkpoints' tensors, the eval rows, the diagnostics."""
    from dmnsp.checkpoint import load_checkpoint

    tensors, evals, diags = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    tasks = sorted(run_dir.glob("task*"), key=lambda p: int(p.name[4:]))
    for task in tasks:
        state = load_checkpoint(task / "checkpoint.pt")
        for name in sorted(state.adapters):
            tensors.update(name.encode() + state.adapters[name].contiguous().numpy().tobytes())
        for tower in sorted(state.bases):
            for i, v in enumerate(state.bases[tower]):
                tensors.update(f"{tower}/{i}".encode() + v.contiguous().numpy().tobytes())
        evals.update(
            json.dumps(_strip(json.loads((task / "eval.json").read_text())), sort_keys=True).encode()
        )
        diags.update(
            json.dumps(_strip(json.loads((task / "diagnostics.json").read_text())), sort_keys=True).encode()
        )
    return {
        "tasks": str(len(tasks)),
        "checkpoints": tensors.hexdigest()[:16],
        "eval": evals.hexdigest()[:16],
        "diagnostics": diags.hexdigest()[:16],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["zeroshot", "finetune", "lwf", "dmnsp"])
    ap.add_argument("--clean", action="store_true", help="also dmnsp in projection.mode clean")
    args = ap.parse_args()
    runs = [(m, {"method": m}) for m in args.methods]
    if args.clean:
        runs.append(("dmnsp-clean", {"method": "dmnsp", "projection": {"mode": "clean"}}))
    with tempfile.TemporaryDirectory(prefix="dmnsp-identity-") as tmp:
        root = Path(tmp)
        for name, change in runs:
            cfg = root / f"{name}.yaml"
            cfg.write_text(yaml.safe_dump({**RUN, "dataset_root": str(root / "data"), **change}))
            out = root / name
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "dmnsp",
                    "run",
                    "--config",
                    str(cfg),
                    "--out-dir",
                    str(out),
                    "--quiet",
                ],
                check=True,
                capture_output=True,
                env=os.environ,
            )
            d = digests(out)
            print(
                f"{name:12s} tasks {d['tasks']}  checkpoints {d['checkpoints']}  eval {d['eval']}  "
                f"diagnostics {d['diagnostics']}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
