"""Start of a ``train-task`` job: interpreter, imports, model build; which libraries it loads.

    .venv/bin/python benchmarks/startup.py                  # tiny and ViT-B-16, 5 fresh processes each
    .venv/bin/python benchmarks/startup.py --quick          # tiny only, 3 processes
    .venv/bin/python benchmarks/startup.py --baseline DIR   # DIR's dmnsp too, alternating (before/after)

Every measurement is a fresh interpreter, as every workflow job is. In the child: the imports a
``train-task`` job makes (``dmnsp.cli`` and the modules ``cmd_train_task`` and the error handling
load), then ``create_clip`` with random weights (ViT-B-16: open_clip's own initialisation of
150 M parameters, adapters r = 64). Reported: the child's wall time as seen from here (interpreter
start and exit included), its import seconds (from its first line: interpreter start not included)
and model-build seconds, the first-import cumulative times of
the big libraries (``-X importtime``), and whether any table/plot/search library was imported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HEAVY = ("pandas", "matplotlib", "optuna", "scipy", "sqlalchemy", "snakemake", "tabulate")
LIBS = ("torch", "torchvision", "open_clip", "timm", "numpy", "yaml", "jsonschema")


def child(tree: str, model: str) -> None:
    t0 = time.perf_counter()
    sys.path.insert(0, tree)
    import dmnsp.cli as cli

    cli.build_parser()
    cli._user_errors()  # what main() imports around every command
    import dmnsp.runner  # noqa: F401 - what cmd_train_task imports

    t1 = time.perf_counter()
    from dmnsp.model import create_clip

    create_clip(model, None, seed=0, adapter_dim=16 if model == "dmnsp-tiny" else 64)
    t2 = time.perf_counter()
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
    print(json.dumps({"imports": t1 - t0, "model": t2 - t1, "heavy": loaded}), flush=True)


def import_times(stderr: str) -> dict[str, float]:
    """Cumulative seconds of each library's first import (``-X importtime`` lines)."""
    out: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:") :].split("|"))
        if name in LIBS and cumulative.isdigit():
            out[name] = int(cumulative) / 1e6
    return out


def measure(tree: Path, model: str, importtime: bool) -> dict:
    from common import child_env, python, run_measured

    cmd = [python(), *(["-X", "importtime"] if importtime else []), __file__, "--child", str(tree), model]
    env = child_env(1)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    res = run_measured(cmd, env=env, timeout=900)
    if res["rc"] != 0:
        raise RuntimeError(res["output"][-3000:])
    lines = [json.loads(x) for x in res["output"].splitlines() if x.startswith("{")]
    return {**lines[-1], "wall": res["seconds"], "libs": import_times(res["output"]) if importtime else {}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, 3 processes")
    parser.add_argument("--reps", type=int, help="fresh processes per case (default 5, --quick 3)")
    parser.add_argument("--baseline", type=Path, help="another checkout to measure side by side")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # nothing imported before the clock starts (common.py would import torch)
        child(*args.child)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import fmt_s, load_line, machine_line, median, table

    print(machine_line())
    models = ["dmnsp-tiny"] if args.quick else ["dmnsp-tiny", "ViT-B-16"]
    trees = {"this tree": ROOT} if args.baseline is None else {"baseline": args.baseline, "this tree": ROOT}
    reps = args.reps or (3 if args.quick else 5)
    runs: dict[tuple[str, str], list[dict]] = {}
    for rep in range(reps):
        for model in models:
            for name, tree in trees.items():
                r = measure(tree, model, importtime=rep == 0)
                runs.setdefault((name, model), []).append(r)
                print(
                    f"  [{rep + 1}/{reps}] {name} {model}: wall {fmt_s(r['wall'])}, imports {fmt_s(r['imports'])}, "
                    f"model {fmt_s(r['model'])}; {load_line()}",
                    flush=True,
                )
    rows = []
    for (name, model), rs in runs.items():
        libs = rs[0]["libs"]
        rows.append(
            [
                name,
                model,
                fmt_s(median([r["wall"] for r in rs])),
                fmt_s(median([r["imports"] for r in rs])),
                fmt_s(median([r["model"] for r in rs])),
                ", ".join(f"{k} {fmt_s(v)}" for k, v in libs.items()),
                ", ".join(sorted({m for r in rs for m in r["heavy"]})) or "none",
            ]
        )
    print(
        table(
            rows,
            [
                "tree",
                "model",
                f"job start, wall (median of {reps})",
                "imports",
                "model build",
                "first imports, cumulative (run 1, -X importtime)",
                "table/plot/search libraries",
            ],
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
