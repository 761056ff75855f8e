"""Workflow scale: Snakemake planning time and job counts, and the fixed cost of one task job.

    .venv/bin/python benchmarks/dag.py                        # full (about 10-15 minutes on 2 cores)
    .venv/bin/python benchmarks/dag.py --quick                # 10-10 and the 2-2 grid once each, tiny jobs only
    .venv/bin/python benchmarks/dag.py --skip-jobs --baseline /tmp/dmnsp-before   # before/after in one run
    .venv/bin/python benchmarks/dag.py --skip-jobs --profile  # + where a grid dry-run spends its time

Part 1: ``snakemake -n`` (dry-run, nothing executed) of ``config/paper/cifar100-10-10.yaml`` (110
jobs at its 5 tasks per job) and of a grid of 3 seeds x 27 points (TOP_SELECT x TOP_K_RATIO x
LAMBDA_SCALE, 3 values each) on CIFAR100 2-2, built from ``config/paper/cifar100-2-2.yaml`` with its
methods, ablations and tasks per job (5,078 jobs), run side by side: the configs alternate within every repetition, so both see the
same machine load. Reported per config: wall time of the whole command (interpreter start and
Snakemake's imports included) and its CPU time (user + system of the child, from ``wait4``; less
sensitive to other processes on a shared machine), job counts, peak RSS. Target: the grid plans
in less than 3x the time of 10-10 (ratio of medians, wall and CPU both shown).

Both configs plan with the ``tasks_per_job`` the paper configs ship (k consecutive tasks per
training job); full mode also plans both at one task per job (k = 1), the DAG before
``tasks_per_job``, side by side, with its own ratio. ``--all-configs`` adds every other ``config/paper/*.yaml``. ``--baseline DIR`` plans every config
with DIR's Snakefile and DIR's ``dmnsp`` too (e.g. ``git worktree add DIR <commit>``), alternating
with this tree's, for before/after figures from one run. ``--profile`` runs the grid's dry-run
once under cProfile and prints where the time goes (DAG building, resource evaluation, printing
of every job that ``-n`` does even with ``--quiet``).

Part 2: per-task job overhead. ``python -m dmnsp train-task`` with ``max_steps: 1``; the overhead is
the job's wall time minus the compute it reports itself in diagnostics.json (train, lambda, basis,
eval seconds): interpreter start, imports, data and model build, checkpoint load and save. Broken
down by in-process timings of the same pieces. For ViT-B-16 (random init, Fashion-MNIST resized
to 224 px as a stand-in dataset) the resumed job loads a checkpoint with 9 tasks of faithful bases,
as task 10 of CIFAR100 10-10 would. Reported as a fraction of one task's training: tiny = the
embedded default's 41 steps of batch 128; ViT-B-16 CIFAR100 10-10 = 4 epochs x 40 batches of 128
(+1) steps, the batch-128 step time EXTRAPOLATED linearly from the measured batch-8 step (CPU).
"""

from __future__ import annotations

import argparse
import copy
import os
import pstats
import subprocess
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
    write_yaml,
)

PLANNING_RATIO_TARGET = 3.0  # grid planning time / 10-10 planning time
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


def dry_run_cmd(tree: Path, configfile: Path, workdir: Path, prefix: tuple[str, ...] = ()) -> list[str]:
    return [
        python(),
        *prefix,
        "-m",
        "snakemake",
        "--snakefile",
        str(tree / "Snakefile"),
        "--directory",
        str(workdir),
        "-n",
        "--quiet",
        "rules",
        "--configfile",
        str(configfile),
    ]


def tree_env(tree: Path) -> dict:
    """The environment of a dry-run of ``tree``: its own ``dmnsp`` first on the path."""
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    return env


def dry_run(tree: Path, configfile: Path, workdir: Path) -> dict:
    cmd = dry_run_cmd(tree, configfile, workdir)
    res = run_measured(cmd, cwd=workdir, env=tree_env(tree), timeout=1800)
    if res["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res['rc']}):\n{res['output'][-3000:]}")
    return {**res, "counts": job_counts(res["output"])}


def shipped_k(split: str = "10-10") -> int:
    """The tasks_per_job of ``config/paper/cifar100-<split>.yaml``."""
    cfg = yaml.safe_load((ROOT / "config" / "paper" / f"cifar100-{split}.yaml").read_text())
    return int(cfg.get("tasks_per_job", 1))


def paper_config(tmp: Path, split: str, tasks_per_job: int | None = None, grid: bool = False) -> Path:
    """``config/paper/cifar100-<split>.yaml``, with the 3 x 3 x 3 grid and 3 seeds when ``grid``, and
    ``tasks_per_job`` set when given (else as shipped)."""
    src = ROOT / "config" / "paper" / f"cifar100-{split}.yaml"
    cfg = yaml.safe_load(src.read_text())
    if tasks_per_job == 1:  # the default: no key, so that a --baseline tree from before it plans it too
        cfg.pop("tasks_per_job", None)
    elif tasks_per_job is not None:
        cfg["tasks_per_job"] = tasks_per_job
    if grid:
        ((name, exp),) = cfg["experiments"].items()
        exp = copy.deepcopy(exp)
        exp["grid"] = GRID
        exp["seeds"] = [0, 1, 2]
        cfg["experiments"] = {f"{name}-grid": exp}
    suffix = f"{'-grid' if grid else ''}-k{cfg.get('tasks_per_job', 1)}"
    return write_yaml(tmp / f"cifar100-{split}{suffix}.yaml", cfg)


def grid_config(tmp: Path, split: str = "2-2") -> Path:
    """The paper config of CIFAR100 ``split`` with the 3 x 3 x 3 grid and 3 seeds (tasks_per_job as shipped)."""
    return paper_config(tmp, split, grid=True)


def planning_configs(quick: bool, all_configs: bool, tmp: Path) -> dict[str, tuple[Path, str | None]]:
    """Configs to plan: name -> (path, name of the config its time is divided by, or None)."""
    k = shipped_k("2-2")
    small, big = f"cifar100-10-10 (k={shipped_k()})", f"cifar100-2-2 grid (k={k})"
    configs = {small: (ROOT / "config" / "paper" / "cifar100-10-10.yaml", None)}
    configs[big] = (grid_config(tmp, "2-2"), small)
    if not quick and (k != 1 or shipped_k() != 1):  # the same DAGs at one task per job
        configs["cifar100-10-10 (k=1)"] = (paper_config(tmp, "10-10", 1), None)
        configs["cifar100-2-2 grid (k=1)"] = (paper_config(tmp, "2-2", 1, grid=True), "cifar100-10-10 (k=1)")
    if all_configs:
        for path in sorted((ROOT / "config" / "paper").glob("*.yaml")):
            configs.setdefault(path.stem, (path, None))
    return configs


def train_jobs(counts: dict[str, int]) -> int:
    """Training jobs: ``train_task`` (one task each) and the ``train_tasks_<first>_<last>`` chunks."""
    return sum(n for rule, n in counts.items() if rule.startswith("train_task"))


def planning(quick: bool, tmp: Path, reps: int, baseline: Path | None, all_configs: bool) -> list[list]:
    configs = planning_configs(quick, all_configs, tmp)
    trees = {"this tree": ROOT} if baseline is None else {"baseline": baseline, "this tree": ROOT}
    runs: dict[tuple[str, str], list[dict]] = {}
    for rep in range(reps):  # side by side: every config and tree once per repetition
        for name, (path, _) in configs.items():
            for tree_name, tree in trees.items():
                work = Path(tempfile.mkdtemp(prefix="dry-", dir=tmp))
                res = dry_run(tree, path, work)
                runs.setdefault((tree_name, name), []).append(res)
                print(
                    f"  [{rep + 1}/{reps}] {tree_name}: {name}: wall {fmt_s(res['seconds'])}, "
                    f"CPU {fmt_s(res['cpu_seconds'])}, {res['counts'].get('total')} jobs; {load_line()}",
                    flush=True,
                )
    rows = []
    for (tree_name, name), rs in runs.items():
        counts = rs[0]["counts"]
        rows.append(
            [
                tree_name,
                name,
                counts.get("total", 0),
                train_jobs(counts),
                spread([r["seconds"] for r in rs]),
                spread([r["cpu_seconds"] for r in rs]),
                f"{max(r['maxrss_mb'] for r in rs):.0f} MiB",
            ]
        )
    print(table(rows, ["tree", "config", "jobs", "training jobs", "snakemake -n wall", "CPU", "peak RSS"]))
    targets = []
    for tree_name in trees:
        for name, (_, small) in configs.items():
            if small is None:
                continue
            base = runs[(tree_name, small)]
            big = runs[(tree_name, name)]
            wall = median([r["seconds"] for r in big]) / median([r["seconds"] for r in base])
            cpu = median([r["cpu_seconds"] for r in big]) / median([r["cpu_seconds"] for r in base])
            jobs = big[0]["counts"]["total"] - base[0]["counts"]["total"]
            per_job = (
                median([r["cpu_seconds"] for r in big]) - median([r["cpu_seconds"] for r in base])
            ) / jobs
            targets.append(
                [
                    f"{tree_name}: planning {name} / {small} ({big[0]['counts']['total']} / "
                    f"{base[0]['counts']['total']} jobs)",
                    f"wall {wall:.2f}x, CPU {cpu:.2f}x ({per_job * 1e3:.2f} ms CPU per extra job)",
                    f"< {PLANNING_RATIO_TARGET:.0f}x",
                    "PASS" if max(wall, cpu) < PLANNING_RATIO_TARGET else "MISS",
                ]
            )
    return targets


PROFILE_PARTS = {
    "DAG building (DAG.init)": "snakemake/dag.py:{}(init)",
    "printing every job (Job.log_info)": "snakemake/jobs.py:{}(log_info)",
    "  of which resources (Rule.expand_resources)": "snakemake/rules.py:{}(expand_resources)",
    "  of which shell commands (Job.shellcmd)": "snakemake/jobs.py:{}(shellcmd)",
    "signatures of input functions, params, resources (inspect.signature), in both": "inspect.py:{}(signature)",
}


def profile_grid(tmp: Path) -> None:
    """One grid dry-run under cProfile: cumulative seconds of the main phases."""
    work = tmp / "dry-profile"
    work.mkdir()
    out = tmp / "grid.prof"
    cmd = dry_run_cmd(ROOT, grid_config(tmp, "2-2"), work, ("-m", "cProfile", "-o", str(out)))
    subprocess.run(cmd, cwd=work, env=tree_env(ROOT), check=True, capture_output=True, timeout=3600)
    stats = pstats.Stats(str(out)).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    total = max(v[3] for v in stats.values())
    rows = []
    for label, pattern in PROFILE_PARTS.items():
        prefix, suffix = pattern.split("{}")
        ct = sum(
            v[3]
            for (file, line, name), v in stats.items()
            if file.endswith(prefix.split(":")[0]) and f"({name})" == suffix
        )
        rows.append([label, f"{ct:.1f} s", f"{100 * ct / total:.0f} %"])
    print(table(rows, ["cifar100-2-2 grid dry-run under cProfile", "cumulative", f"of {total:.0f} s"]))
    print(
        "  (a dry-run evaluates every job's resources only to print them; a real run when it submits the job)"
    )


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
        "peak_mem_mb": diag.get("peak_mem_mb"),
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
    parser.add_argument(
        "--quick", action="store_true", help="10-10 and the 2-2 grid once each; tiny jobs only"
    )
    parser.add_argument("--reps", type=int, help="repetitions of every dry-run (default 3, --quick 1)")
    parser.add_argument("--baseline", type=Path, help="another checkout to plan side by side (before/after)")
    parser.add_argument("--all-configs", action="store_true", help="also plan every other paper config")
    parser.add_argument("--profile", action="store_true", help="profile one grid dry-run (cProfile)")
    parser.add_argument("--skip-planning", action="store_true")
    parser.add_argument("--skip-jobs", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(cores())
    print(machine_line())
    targets = []
    with tempfile.TemporaryDirectory(prefix="dmnsp-bench-dag-") as tmp:
        tmp = Path(tmp)
        if not args.skip_planning:
            print("\n== planning: snakemake -n, side by side ==", flush=True)
            reps = args.reps or (1 if args.quick else 3)
            targets += planning(args.quick, tmp, reps, args.baseline, args.all_configs)
            print(load_line())
        if args.profile:
            print("\n== where a grid dry-run spends its time (cProfile) ==", flush=True)
            profile_grid(tmp)
        if not args.skip_jobs:
            print("\n== per-task job overhead (python -m dmnsp train-task, max_steps: 1) ==", flush=True)
            targets += overhead(args.quick, tmp)[1]
            print(load_line())
    print("\n== targets ==")
    print(table(targets, ["target", "measured (median)", "target", "verdict / basis"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
