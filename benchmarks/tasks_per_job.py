"""The embedded default with several tasks per job against one task per job, side by side.

    .venv/bin/python benchmarks/tasks_per_job.py --values default 5              # 3 runs of each
    .venv/bin/python benchmarks/tasks_per_job.py --values 1 5 --key tasks_per_job --reps 3
    .venv/bin/python benchmarks/tasks_per_job.py --config config/test/config.yaml --values default --reps 1

The ``tasks_per_job`` setting of issue 14 (k consecutive tasks trained by one job): each
value runs the whole workflow (``snakemake --cores N``) from an empty folder, the values alternating
within every repetition so that all see the same machine load. Reported per value: wall time, CPU
time of Snakemake and every job it ran (user + system, from ``wait4``), the job counts, and whether
every run's metrics equal those of the first value (they must: k only changes how tasks are grouped
into processes). ``default`` leaves the config as it is; any other value is written at ``--key``, a
dotted path into the workflow config where ``*`` stands for every experiment (``tasks_per_job``,
the top-level key, or ``experiments.*.tasks_per_job``).
Fashion-MNIST is prepared once and linked into every run's folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402
from common import (  # noqa: E402
    ROOT,
    child_env,
    fashion_root,
    fmt_s,
    load_line,
    machine_line,
    median,
    python,
    run_measured,
    spread,
    table,
)


def set_key(cfg: dict, dotted: str, value) -> None:
    """``cfg[a][b]... = value`` along ``dotted``; ``*`` applies the rest to every key at that level."""
    head, _, rest = dotted.partition(".")
    targets = list(cfg) if head == "*" else [head]
    for key in targets:
        if not rest:
            cfg[key] = value
        else:
            set_key(cfg.setdefault(key, {}), rest, value)


def metrics(workdir: Path) -> dict[str, dict]:
    """metrics.json of every run, without timing and memory fields."""
    out = {}
    for path in sorted((workdir / "results").rglob("metrics.json")):
        m = json.loads(path.read_text())
        out[str(path.relative_to(workdir))] = {
            k: v for k, v in m.items() if not re.search(r"seconds|time|mem", k)
        }
    return out


def job_counts(output: str) -> dict[str, int]:
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Job stats:")), None)
    counts: dict[str, int] = {}
    for line in lines[start + 3 :] if start is not None else []:
        parts = line.split()
        if len(parts) != 2:
            break
        counts[parts[0]] = int(parts[1])
    return counts


def train_jobs(counts: dict[str, int]) -> int:
    """Training jobs: ``train_task`` (one task each) and the ``train_tasks_<first>_<last>`` chunks."""
    return sum(n for rule, n in counts.items() if rule.startswith("train_task"))


def run_once(config: Path, key: str, value: str, cores: int, data: Path, work: Path) -> dict:
    cfg = yaml.safe_load(config.read_text())
    if value != "default":
        set_key(cfg, key, yaml.safe_load(value))
    work.mkdir(parents=True)
    (work / "data").symlink_to(data)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [python(), "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work)]
    cmd += ["--cores", str(cores), "--configfile", str(path)]
    res = run_measured(cmd, cwd=work, env=child_env(), timeout=6 * 3600)
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res['rc']}):\n{res['output'][-3000:]}")
    return {**res, "counts": job_counts(res["output"]), "metrics": metrics(work)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml")
    parser.add_argument("--values", nargs="+", default=["default", "5"], help="'default' = config untouched")
    parser.add_argument("--key", default="tasks_per_job", help="dotted path of the setting ('*' = every key)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args(argv)
    print(machine_line())
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="dmnsp-bench-k-") as tmp:
        tmp = Path(tmp)
        data = fashion_root(tmp / "data").resolve()
        for rep in range(args.reps):
            for i, value in enumerate(args.values):
                before = load_line().replace("load average now", "load before")
                r = run_once(args.config, args.key, value, args.cores, data, tmp / f"{i}-{value}-{rep}")
                runs.setdefault(value, []).append(r)
                print(
                    f"  [{rep + 1}/{args.reps}] {args.key}={value}: wall {fmt_s(r['seconds'])}, "
                    f"CPU {fmt_s(r['cpu_seconds'])}, {r['counts'].get('total')} jobs "
                    f"({train_jobs(r['counts'])} training); {before}; {load_line()}",
                    flush=True,
                )
    reference = runs[args.values[0]][0]["metrics"]
    rows = []
    for value, rs in runs.items():
        same = all(r["metrics"] == reference for r in rs)
        rows.append(
            [
                value,
                spread([r["seconds"] for r in rs]),
                spread([r["cpu_seconds"] for r in rs]),
                train_jobs(rs[0]["counts"]),
                rs[0]["counts"].get("total", "-"),
                f"{len(reference)} runs, {'identical' if same else 'DIFFERENT'}",
            ]
        )
    print(
        table(
            rows,
            [
                f"{args.key} ({args.config.name}, --cores {args.cores})",
                "wall",
                "CPU (all processes)",
                "training jobs",
                "all jobs",
                f"metrics vs {args.values[0]}",
            ],
        )
    )
    base = median([r["seconds"] for r in runs[args.values[0]]])
    for value in args.values[1:]:
        print(
            f"  {value} vs {args.values[0]}: wall {median([r['seconds'] for r in runs[value]]) / base:.2f}x"
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    raise SystemExit(main())
