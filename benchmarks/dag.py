"""Workflow scale: Snakemake planning time and job counts, and the fixed cost of one task job.

    .venv/bin/python benchmarks/dag.py            # full (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/dag.py --quick    # under a minute: one paper config, tiny jobs only

Part 1: ``snakemake -n`` (dry-run, nothing executed) for every ``config/paper/*.yaml`` and for a
grid of 3 seeds × 27 points (TOP_SELECT × TOP_K_RATIO × LAMBDA_SCALE, 3 values each) on
CIFAR100 2-2, built from ``config/paper/cifar100-2-2.yaml`` (its methods and ablations kept).
Reported: wall time of the whole command (interpreter start and Snakemake's imports included),
the share spent in ``dmnsp.experiments.expand_all`` (timed in-process), and the job counts.
Target: planning < 60 s for the largest.

Part 2: per-task job overhead. ``python -m dmnsp train-task`` with ``max_steps: 1``; the overhead is
the job's wall time minus the compute it reports itself in diagnostics.json (train, lambda, basis,
eval seconds): interpreter start, imports, data and model build, checkpoint load and save. Broken
down by in-process timings of the same pieces. For ViT-B-16 (random init, Fashion-MNIST resized
to 224 px as a stand-in dataset) the resumed job loads a checkpoint with 9 tasks of faithful bases,
as task 10 of CIFAR100 10-10 would. Reported as a fraction of one task's training: tiny = the
embedded default's 41 steps of batch 128; ViT-B-16 CIFAR100 10-10 = 4 epochs × 40 batches of 128
(+1) steps, the batch-128 step time EXTRAPOLATED linearly from the measured batch-8 step (CPU).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import yaml  # noqa: E402
from common import (  # noqa: E402
    ROOT,
    child_env,
    cores,
    faithful_bases,
    fashion_root,
    fmt_s,
    load_line,
    machine_line,
    median,
    python,
    read_json,
    run_measured,
    spread,
    table,
    verdict,
    write_yaml,
)

PLANNING_TARGET = 60.0  # seconds, largest config
GRID = {"TOP_SELECT": [1, 2, 3], "TOP_K_RATIO": [0.05, 0.1, 0.2], "LAMBDA_SCALE": [1.0, 10.0, 30.0]}


# ------------------------------------------------------------------------------------ planning


def job_counts(output: str) -> dict[str, int]:
    """The first 'Job stats' table of snakemake's output → {rule: count}, plus 'total'."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Job stats:")), None)
    if start is None:
        raise RuntimeError("no 'Job stats' table in snakemake's output:\n" + output[-3000:])
    counts: dict[str, int] = {}
    for line in lines[start + 3 :]:
        parts = line.split()
        if len(parts) != 2:
            break
        counts[parts[0]] = int(parts[1])
        if parts[0] == "total":
            break
    return counts


def dry_run(configfile: Path, workdir: Path) -> dict:
    cmd = [
        python(),
        "-m",
        "snakemake",
        "--snakefile",
        str(ROOT / "Snakefile"),
        "--directory",
        str(workdir),
        "-n",
        "--quiet",
        "rules",
        "--configfile",
        str(configfile),
    ]
    res = run_measured(cmd, cwd=workdir, env=child_env(), timeout=1800)
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res['rc']}):\n{res['output'][-3000:]}")
    return {"seconds": res["seconds"], "counts": job_counts(res["output"]), "maxrss_mb": res["maxrss_mb"]}


def expand_seconds(configfile: Path) -> float:
    from dmnsp.experiments import expand_all

    cfg = yaml.safe_load(configfile.read_text())
    expand_all(cfg)  # warm: the first call imports what run labels need
    t0 = time.perf_counter()
    expand_all(cfg)
    return time.perf_counter() - t0


def grid_config(tmp: Path) -> Path:
    src = ROOT / "config" / "paper" / "cifar100-2-2.yaml"
    cfg = yaml.safe_load(src.read_text())
    ((name, exp),) = cfg["experiments"].items()
    exp = copy.deepcopy(exp)
    exp["grid"] = GRID
    exp["seeds"] = [0, 1, 2]
    cfg["experiments"] = {f"{name}-grid": exp}
    return write_yaml(tmp / "cifar100-2-2-grid.yaml", cfg)


def planning(quick: bool, tmp: Path) -> tuple[list[list], list[list]]:
    paper = sorted((ROOT / "config" / "paper").glob("*.yaml"))
    configs = [p for p in paper if p.stem == "cifar100-10-10"] if quick else paper
    if not quick:
        configs.append(grid_config(tmp))
    rows, results = [], []
    for path in configs:
        reps = 1 if quick or "grid" in path.stem else 3
        runs = []
        for i in range(reps):
            work = tmp / f"dry-{path.stem}-{i}"
            work.mkdir()
            runs.append(dry_run(path, work))
        secs = [r["seconds"] for r in runs]
        counts = runs[0]["counts"]
        expand = statistics.median(expand_seconds(path) for _ in range(1 if reps == 1 else 3))
        results.append((path, secs, counts))
        other = ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("train_task", "total"))
        rows.append(
            [
                path.stem,
                spread(secs),
                fmt_s(expand),
                counts.get("train_task", 0),
                counts.get("total", 0),
                other,
                f"{runs[0]['maxrss_mb']:.0f} MiB",
            ]
        )
        print(f"  {path.stem}: {fmt_s(median(secs))}, {counts.get('total')} jobs", flush=True)
    print(
        table(
            rows,
            [
                "config",
                "snakemake -n wall",
                "expand_all in-process",
                "train_task jobs",
                "all jobs",
                "other jobs",
                "peak RSS",
            ],
        )
    )
    largest = max(results, key=lambda r: r[2].get("total", 0))
    t = median(largest[1])
    targets = [
        [
            f"planning time of the largest DAG ({largest[0].stem}, {largest[2].get('total')} jobs)",
            fmt_s(t),
            f"< {PLANNING_TARGET:.0f} s",
            verdict(t, PLANNING_TARGET),
        ]
    ]
    return rows, targets


# ------------------------------------------------------------------------------------ job overhead


def job_config(model: str, data_root: Path) -> dict:
    common = {
        "dataset": "fashion-mnist",
        "dataset_root": str(data_root),
        "pretrained": None,
        "method": "dmnsp",
        "max_steps": 1,
        "threads": cores(),
        "device": "cpu",
        "num_workers": 0,
    }
    if model == "dmnsp-tiny":  # the embedded default's run settings
        return {
            **common,
            "model_name": "dmnsp-tiny",
            "initial_increment": 2,
            "increment": 2,
            "max_train_per_class": 600,
            "max_test_per_class": 500,
            "adapter_dim": 16,
            "batch_size": 128,
            "epochs": 4,
        }
    return {
        **common,
        "model_name": "ViT-B-16",
        "initial_increment": 1,
        "increment": 1,
        "max_train_per_class": 16,
        "max_test_per_class": 2,
        "adapter_dim": 64,
        "batch_size": 8,
        "eval_batch_size": 8,
        "epochs": 4,
    }


def fabricate_checkpoint(cfg_path: Path, task: int, out: Path) -> Path:
    """The checkpoint of task ``task`` with ``task + 1`` tasks of faithful bases (initial adapters)."""
    from dmnsp.adapters import adapter_state_dict
    from dmnsp.checkpoint import TaskState, save_checkpoint
    from dmnsp.config import load_config
    from dmnsp.datasets import load_dataset
    from dmnsp.model import create_clip
    from dmnsp.scenario import build_scenario
    from dmnsp.train import derive_seed

    cfg = load_config(cfg_path)
    bundle = create_clip(
        cfg["model_name"],
        None,
        seed=derive_seed(cfg["seed"], "init"),
        adapter_dim=cfg["adapter_dim"],
        adapter_scale=cfg["adapter_scale"],
        adapter_dropout=cfg["adapter_dropout"],
    )
    width = bundle.model.visual.transformer.width
    sc = build_scenario(load_dataset(cfg["dataset"], cfg["dataset_root"]), cfg)
    state = TaskState(
        task,
        adapter_state_dict(bundle.model),
        {"visual": faithful_bases(12, width, task + 1)},
        list(sc.seen_classes(task)),
    )
    save_checkpoint(out, state, cfg)
    return out


def train_task_job(cfg_path: Path, task: int, resume: Path | None, out: Path) -> dict:
    cmd = [
        python(),
        "-m",
        "dmnsp",
        "train-task",
        "--quiet",
        "--config",
        str(cfg_path),
        "--task",
        str(task),
        "--out-dir",
        str(out),
    ]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    res = run_measured(cmd, env=child_env(cores()), timeout=3600)
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res['output'][-3000:]}")
    diag = read_json(out / "diagnostics.json")
    compute = sum(diag["seconds"][k] for k in ("train", "lambda", "basis", "eval"))
    return {
        "wall": res["seconds"],
        "compute": compute,
        "overhead": res["seconds"] - compute,
        "seconds": diag["seconds"],
        "maxrss_mb": res["maxrss_mb"],
    }


def breakdown(cfg_path: Path, resume: Path | None) -> dict:
    """The overhead's pieces, timed in this (already warm) process, plus a cold import in a child."""
    from dmnsp.checkpoint import load_checkpoint, save_checkpoint
    from dmnsp.config import load_config
    from dmnsp.datasets import load_dataset
    from dmnsp.model import create_clip
    from dmnsp.scenario import build_scenario
    from dmnsp.train import derive_seed

    out = {}
    imp = [
        run_measured(
            [python(), "-c", "import dmnsp.cli, dmnsp.runner, dmnsp.train, dmnsp.evaluate"],
            env=child_env(cores()),
        )["seconds"]
        for _ in range(3)
    ]
    out["start + imports (cold child)"] = median(imp)
    cfg = load_config(cfg_path)
    t0 = time.perf_counter()
    data = load_dataset(cfg["dataset"], cfg["dataset_root"])
    build_scenario(data, cfg)
    out["data + scenario"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    create_clip(
        cfg["model_name"], None, seed=derive_seed(cfg["seed"], "init"), adapter_dim=cfg["adapter_dim"]
    )
    out["model build"] = time.perf_counter() - t0
    if resume is not None:
        t0 = time.perf_counter()
        state = load_checkpoint(resume, cfg)
        out["checkpoint load"] = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            save_checkpoint(Path(tmp) / "checkpoint.pt", state, cfg)
            out["checkpoint save"] = time.perf_counter() - t0
        out["checkpoint MiB"] = resume.stat().st_size / 2**20
    return out


def step_seconds(model: str, batch: int, repeats: int) -> list[float]:
    """Finetune step time in this process (the per-step cost without projection)."""
    from projection import StepBench

    bench = StepBench(
        model,
        16 if model == "dmnsp-tiny" else 64,
        batch,
        2 if model == "dmnsp-tiny" else 10,
        torch.device("cpu"),
        plan=False,
    )
    return bench.run(repeats, 1, both=False)["finetune"]


def overhead(quick: bool, tmp: Path) -> tuple[list[list], list[list]]:
    data_root = fashion_root(tmp / "data")
    models = ["dmnsp-tiny"] if quick else ["dmnsp-tiny", "ViT-B-16"]
    rows, targets, parts_rows = [], [], []
    for model in models:
        cfg_path = write_yaml(tmp / f"{model}.yaml", job_config(model, data_root))
        reps = 1 if quick or model == "ViT-B-16" else 3
        jobs = {}
        print(f"  {model}: train-task jobs ({reps} each) ...", flush=True)
        for r in range(reps):
            d = tmp / f"jobs-{model}-{r}"
            jobs.setdefault("task 0", []).append(train_task_job(cfg_path, 0, None, d / "task0"))
            if model == "dmnsp-tiny":
                resume, task, label = d / "task0" / "checkpoint.pt", 1, "task 1 (resumes task 0)"
            else:
                resume = fabricate_checkpoint(cfg_path, 8, d / "task8" / "checkpoint.pt")
                task, label = 9, "task 9 (resumes a checkpoint with 9 tasks of bases)"
            jobs.setdefault(label, []).append(train_task_job(cfg_path, task, resume, d / f"task{task}"))
        parts = breakdown(cfg_path, resume)
        if model == "dmnsp-tiny":
            batch, steps = 128, 41  # embedded default: 2 x 600 images / 128 -> 10 batches x 4 epochs, +1
            step = step_seconds(model, batch, 3 if quick else 10)
            task_s, how = median(step) * steps, f"{steps} steps x {fmt_s(median(step))} (batch 128, measured)"
        else:
            step = step_seconds(model, 8, 2)
            steps = 4 * 40 + 1  # CIFAR100 10-10: 5000 images / 128 -> 40 batches, 4 epochs, +1
            per = median(step) * 128 / 8
            task_s = per * steps
            how = (
                f"{steps} steps x {fmt_s(per)} (batch 128 EXTRAPOLATED x16 from the measured batch-8 step "
                f"{fmt_s(median(step))})"
            )
        for label, js in jobs.items():
            ov = [j["overhead"] for j in js]
            rows.append(
                [
                    model,
                    label,
                    spread([j["wall"] for j in js]),
                    fmt_s(median([j["compute"] for j in js])),
                    spread(ov),
                    f"{100 * median(ov) / task_s:.2f} %",
                    f"{js[0]['maxrss_mb']:.0f} MiB",
                ]
            )
        worst = max(median([j["overhead"] for j in js]) for js in jobs.values())
        parts_rows.append(
            [model, ", ".join(f"{k} {fmt_s(v) if 'MiB' not in k else f'{v:.1f}'}" for k, v in parts.items())]
        )
        targets.append(
            [
                f"per-task job overhead, {model} (worst of task 0 / resumed task), fraction of a task",
                f"{fmt_s(worst)} = {100 * worst / task_s:.2f} % of {fmt_s(task_s)}",
                "report",
                how,
            ]
        )
    print(
        table(
            rows,
            ["model", "job", "wall", "compute (diagnostics)", "overhead", "of a task's training", "peak RSS"],
        )
    )
    print(
        table(
            parts_rows, ["model", "overhead pieces timed in-process (warm), start + imports in a cold child"]
        )
    )
    return rows, targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one paper config, no grid, tiny jobs only")
    parser.add_argument("--skip-planning", action="store_true")
    parser.add_argument("--skip-jobs", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(cores())
    print(machine_line())
    targets = []
    with tempfile.TemporaryDirectory(prefix="dmnsp-bench-dag-") as tmp:
        tmp = Path(tmp)
        if not args.skip_planning:
            print("\n== planning: snakemake -n ==", flush=True)
            targets += planning(args.quick, tmp)[1]
            print(load_line())
        if not args.skip_jobs:
            print("\n== per-task job overhead (python -m dmnsp train-task, max_steps: 1) ==", flush=True)
            targets += overhead(args.quick, tmp)[1]
            print(load_line())
    print("\n== targets ==")
    print(table(targets, ["target", "measured (median)", "target", "verdict / basis"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
