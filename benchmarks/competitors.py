"""The competitors at the embedded default's size, and their parameter counts at ViT-B/16.

1. **Run time per method** at the embedded default's size (Fashion-MNIST 2-2, 5 tasks, the tiny
   CLIP pretrained as the default pretrains it, 600 training and 500 test images per class, one
   thread): each method's run is expanded from ``config/config.yaml`` with
   ``config/competitors.yaml`` merged in by the workflow's own
   planner (so it takes the same settings, the method's own defaults included) and timed as one
   ``python -m dmnsp run`` process, seed 0. Prints wall seconds, Avg / Last and the steps per task.
   The whole main job (every method, both seeds, the grid, plots and tables) is what decides
   whether a method joins the embedded default; re-measure it on a quiet machine with
   ``rm -rf results && /usr/bin/time -v .venv/bin/snakemake --cores 2``.
2. ``--vit``: trainable parameters of each method on ViT-B-16 with random weights (open_clip
   ``pretrained=None``; about 30 s and 1 GB on CPU): MoE-Adapters 4,027,392, RAPF's map 262,144,
   DMNSP's adapters 1,982,976.

    python benchmarks/competitors.py [--methods finetune dmnsp moe_adapters rapf] [--pretrained FILE] [--vit]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_settings(method: str, pretrained: str, root: Path) -> dict:
    """The seed-0 run of ``method`` in the embedded default with the competitors, as the workflow
    plans it (nested run config)."""
    from snakemake.utils import update_config

    from dmnsp.experiments import expand_all, unflatten

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    update_config(
        cfg, yaml.safe_load((ROOT / "config" / "competitors.yaml").read_text())
    )  # as Snakemake merges
    ((name, exp),) = cfg["experiments"].items()
    exp.update(methods=[method], ablations=[], seeds=[0], grid={}, pretrain_first=False)
    exp["run"]["pretrained"] = pretrained
    cfg.setdefault("run", {})["dataset_root"] = str(root / "data")
    (run,) = expand_all(cfg).experiments[name]
    return unflatten(run.settings)


def pretrain(root: Path) -> str:
    """The tiny CLIP pretrained with the embedded default's pretraining settings."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    (exp,) = cfg["experiments"].values()
    keys = {k: v for k, v in exp["run"].items() if k in ("model_name", "pretrain_per_class", "pretrain")}
    path = root / "pretrain.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                **keys,
                "dataset": exp["datasets"][0],
                "pretrained": None,
                "threads": 1,
                "dataset_root": str(root / "data"),
            }
        )
    )
    out = root / "tiny.pt"
    subprocess.run(
        [sys.executable, "-m", "dmnsp", "pretrain", "--config", str(path), "--out", str(out), "--quiet"],
        check=True,
    )
    return str(out)


def time_run(method: str, pretrained: str, root: Path) -> dict:
    settings = run_settings(method, pretrained, root)
    path = root / f"{method}.yaml"
    path.write_text(yaml.safe_dump(settings))
    out = root / method
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dmnsp", "run", "--config", str(path), "--out-dir", str(out), "--quiet"],
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    steps = [json.loads((out / f"task{t}" / "diagnostics.json").read_text())["steps"] for t in range(5)]
    from dmnsp.config import validate

    resolved = validate(settings)
    return {
        "method": method,
        "wall_s": wall,
        "avg": metrics["avg"],
        "last": metrics["last"],
        "steps": steps,
        "epochs": resolved["epochs"],
        "batch_size": resolved["batch_size"],
        "tail": proc.stdout[-200:],
    }


def vit_counts() -> dict:
    from dmnsp.adapters import count_trainable
    from dmnsp.config import validate
    from dmnsp.methods import get
    from dmnsp.model import create_clip

    out = {}
    for method in ("dmnsp", "moe_adapters", "rapf"):
        cfg = validate({"method": method, "model_name": "ViT-B-16", "pretrained": None})
        model = create_clip("ViT-B-16", None, adapter_dim=cfg["adapter_dim"]).model
        get(method)().prepare_model(model, cfg)
        adapters = sum(count_trainable(model).values())
        own = model.visual.output_dim**2 if method == "rapf" else 0  # RAPF's map lives in its state
        out[method] = adapters + own
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["finetune", "dmnsp", "moe_adapters", "rapf"])
    ap.add_argument("--pretrained", help="a pretrained tiny CLIP (default: pretrain one as the default does)")
    ap.add_argument("--vit", action="store_true", help="also count ViT-B-16's trainable parameters")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dmnsp-competitors-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        weights = args.pretrained or pretrain(root)
        print(f"pretrained tiny CLIP: {weights} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for method in args.methods:
            r = time_run(method, weights, root)
            print(
                f"{method:13s} {r['wall_s']:6.1f} s  Avg {100 * r['avg']:.2f}  Last {100 * r['last']:.2f}  "
                f"epochs {r['epochs']}  batch {r['batch_size']}  steps/task {r['steps']}",
                flush=True,
            )
    if args.vit:
        for method, n in vit_counts().items():
            print(f"ViT-B-16 trainable parameters, {method}: {n:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
