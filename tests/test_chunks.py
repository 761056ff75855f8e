"""Several tasks per job (``tasks_per_job``): the chunk planner, ``dmnsp train-task --tasks``, and
results bitwise equal to one task per job.

The planner tests check the one property the workflow relies on, restated without the planner's
own logic: for every task of every planned run, exactly one training rule's output pattern (its
literal task folders plus its wildcard constraints) matches the task's files.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dmnsp.checkpoint import load_checkpoint
from dmnsp.cli import main
from dmnsp.config import ConfigError, load_config
from dmnsp.datasets import FASHION_MNIST_DEBIAN_DIR
from dmnsp.experiments import ChunkRule, Plan, RunSpec, chunk_rules, chunk_spans, expand_all

# 5 tasks of the tiny CLIP on real Fashion-MNIST; faithful dmnsp (its bases are strided views).
RUN = {
    "dataset": "fashion-mnist",
    "model_name": "dmnsp-tiny",
    "pretrained": None,
    "initial_increment": 2,
    "increment": 2,
    "max_train_per_class": 48,
    "max_test_per_class": 16,
    "adapter_dim": 8,
    "batch_size": 32,
    "epochs": 1,
    "warmup_steps": 1,
    "max_steps": 4,
    "method": "dmnsp",
    "device": "cpu",
    "threads": 1,
    "num_workers": 0,
}
N_TASKS = 5
TIMING = re.compile(r"second|peak_mem|time", re.IGNORECASE)


# ------------------------------------------------------------------------------------- planning


def test_chunk_spans_cover_every_task_once_with_a_shorter_last_chunk():
    assert chunk_spans(5, 1) == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]
    assert chunk_spans(5, 3) == [(0, 2), (3, 4)]
    assert chunk_spans(50, 5)[-1] == (45, 49) and len(chunk_spans(50, 5)) == 10
    assert chunk_spans(11, 5) == [(0, 4), (5, 9), (10, 10)]
    assert chunk_spans(2, 10) == [(0, 1)]
    for n in range(1, 30):
        for k in range(1, 12):
            tasks = [t for a, b in chunk_spans(n, k) for t in range(a, b + 1)]
            assert tasks == list(range(n)), (n, k)


def _run(experiment: str, dataset: str, split: str, rest: str, n_tasks: int) -> RunSpec:
    return RunSpec(experiment, f"dataset~{dataset}/split~{split}/{rest}", "x", {}, {}, n_tasks, dataset, "m")


def _plan(runs: list[RunSpec], tasks_per_job: dict[str, int]) -> Plan:
    plan = Plan(tasks_per_job=tasks_per_job)
    for run in runs:
        plan.runs[(run.experiment, run.run_id)] = run
        plan.experiments.setdefault(run.experiment, []).append(run)
    return plan


def _producers(plan: Plan, rules: list[ChunkRule], run: RunSpec, task: int) -> list[str]:
    """Names of the training rules whose output pattern matches ``task``'s eval.json of ``run``.

    Restates the Snakemake side: train_task (any task) serves the experiments at 1 task per job;
    a chunk rule names its task folders literally and constrains the wildcards by regex.
    """
    found = []
    if plan.tasks_per_job.get(run.experiment, 1) == 1:
        found.append("train_task")
    for rule in rules:
        if task not in rule.tasks or not re.fullmatch(rule.experiment_regex, run.experiment):
            continue
        if rule.run_regex is None or re.fullmatch(rule.run_regex, run.run_id):
            found.append(rule.name)
    return found


def _check_one_producer_per_task(plan: Plan) -> list[ChunkRule]:
    rules = chunk_rules(plan)
    for run in plan.runs.values():
        k = plan.tasks_per_job.get(run.experiment, 1)
        for first, last in chunk_spans(run.n_tasks, k):
            for t in range(first, last + 1):
                producers = _producers(plan, rules, run, t)
                assert len(producers) == 1, (run.experiment, run.run_id, t, producers)
                if k > 1:  # ... and it is the rule of this run's own chunk
                    (rule,) = [r for r in rules if r.name == producers[0]]
                    assert (rule.first, rule.last) == (first, last), (run.run_id, t, rule)
    assert len({r.name for r in rules}) == len(rules)
    return rules


def test_one_experiment_gets_one_rule_per_chunk_and_no_run_constraint():
    runs = [_run("e", "cifar100", "2-2", f"method~dmnsp/seed~{s}", 50) for s in range(3)]
    rules = _check_one_producer_per_task(_plan(runs, {"e": 5}))
    assert [(r.first, r.last) for r in rules] == [(a, a + 4) for a in range(0, 50, 5)]
    assert all(r.prefixes is None and r.experiments == ("e",) for r in rules)
    assert rules[0].name == "train_tasks_0_4"


def test_default_tasks_per_job_plans_no_chunk_rule():
    runs = [_run("e", "cifar100", "10-10", "method~dmnsp/seed~0", 10)]
    assert chunk_rules(_plan(runs, {"e": 1})) == []


def test_splits_with_different_task_counts_get_disjoint_rules():
    """11 and 21 tasks at 5 per job: (10, 10) and (10, 14) both start at task 10."""
    runs = [
        _run("e", "tinyimagenet", "100-10", "method~dmnsp/seed~0", 11),
        _run("e", "tinyimagenet", "100-5", "method~dmnsp/seed~0", 21),
        _run("e", "tinyimagenet", "100-5", "method~finetune/seed~0", 21),
        _run("f", "tinyimagenet", "100-10", "method~dmnsp/seed~0", 11),  # 3 per job
        _run("g", "tinyimagenet", "100-10", "method~dmnsp/seed~0", 11),  # 1 per job: train_task
        _run("h", "tinyimagenet", "100-10", "method~dmnsp/seed~0", 11),  # same as e's 100-10 runs
    ]
    rules = _check_one_producer_per_task(_plan(runs, {"e": 5, "f": 3, "g": 1, "h": 5}))
    by_span = {(r.first, r.last): r for r in rules if r.experiments == ("e",) or "e" in r.experiments}
    assert by_span[(10, 10)].prefixes == ("dataset~tinyimagenet/split~100-10",)
    assert by_span[(10, 14)].prefixes == ("dataset~tinyimagenet/split~100-5",)
    assert by_span[(0, 4)].prefixes is None and set(by_span[(0, 4)].experiments) == {"e", "h"}
    assert len({r.name for r in rules if r.first == 10}) == 3  # e's two and h's (10, 10)


def test_runs_of_one_split_with_different_task_counts_are_refused():
    runs = [
        _run("e", "imagefolder", "2-2", "method~dmnsp/class_order~a/seed~0", 5),
        _run("e", "imagefolder", "2-2", "method~dmnsp/class_order~b/seed~0", 4),
    ]
    with pytest.raises(ConfigError, match=r"experiment 'e'.*\[4, 5\] tasks.*tasks_per_job"):
        chunk_rules(_plan(runs, {"e": 2}))


def test_tasks_per_job_is_read_per_experiment_with_the_top_level_default():
    exp = {"datasets": ["fashion-mnist"], "methods": ["finetune"], "run": {"model_name": "dmnsp-tiny"}}
    plan = expand_all({"tasks_per_job": 4, "experiments": {"a": dict(exp), "b": {**exp, "tasks_per_job": 2}}})
    assert plan.tasks_per_job == {"a": 4, "b": 2}
    assert expand_all({"experiments": {"a": dict(exp)}}).tasks_per_job == {"a": 1}
    for bad in (0, -1, 1.5, "3", True):
        with pytest.raises(ConfigError, match="tasks_per_job"):
            expand_all({"tasks_per_job": bad, "experiments": {"a": dict(exp)}})


# ------------------------------------------------------------------------------ train-task --tasks


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory) -> Path:
    if not FASHION_MNIST_DEBIAN_DIR.is_dir():
        pytest.skip(
            f"Fashion-MNIST not installed in {FASHION_MNIST_DEBIAN_DIR} (apt-get install dataset-fashion-mnist)"
        )
    root = tmp_path_factory.mktemp("chunks")
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump({**RUN, "dataset_root": str(root / "data")}))
    return path


def _train(cfg_path: Path, run_dir: Path, tasks: str, first: int) -> int:
    argv = ["train-task", "--quiet", "--config", str(cfg_path), "--tasks", tasks, "--run-dir", str(run_dir)]
    if first > 0:
        argv += ["--resume", str(run_dir / f"task{first - 1}" / "checkpoint.pt")]
    return main(argv)


@pytest.fixture(scope="module")
def one_per_job(run_cfg) -> Path:
    """Every task by its own ``train-task --task t`` call (a fresh session each, as a per-task job)."""
    run_dir = run_cfg.parent / "k1"
    for t in range(N_TASKS):
        argv = ["train-task", "--quiet", "--config", str(run_cfg), "--task", str(t)]
        argv += ["--out-dir", str(run_dir / f"task{t}")]
        if t > 0:
            argv += ["--resume", str(run_dir / f"task{t - 1}" / "checkpoint.pt")]
        assert main(argv) == 0, t
    return run_dir


def _without_timing(record):
    if isinstance(record, dict):
        return {k: _without_timing(v) for k, v in record.items() if not TIMING.search(k)}
    if isinstance(record, list):
        return [_without_timing(v) for v in record]
    return record


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits, dtype, shape and memory layout (a loaded view keeps its storage's strides)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.storage_offset() == b.storage_offset()
        and torch.equal(_bits(a), _bits(b))
    )


@pytest.mark.parametrize("chunks", [[(0, 2), (3, 4)], [(0, 4)]], ids=["k3", "k5"])
def test_tasks_per_job_is_bitwise_equal_to_one_task_per_job(one_per_job, run_cfg, tmp_path, chunks):
    cfg = load_config(run_cfg)
    run_dir = tmp_path / "chunked"
    for first, last in chunks:
        assert _train(run_cfg, run_dir, f"{first}-{last}", first) == 0
    for t in range(N_TASKS):
        ref, got = one_per_job / f"task{t}", run_dir / f"task{t}"
        for name in ("eval.json", "diagnostics.json"):
            a, b = (json.loads((d / name).read_text()) for d in (ref, got))
            assert _without_timing(a) == _without_timing(b), (t, name)
        if t > 0:  # the projection ran, so the comparison covers the carried bases
            assert json.loads((got / "diagnostics.json").read_text())["basis_columns"]
        sa = load_checkpoint(ref / "checkpoint.pt", cfg, expect_task=t)
        sb = load_checkpoint(got / "checkpoint.pt", cfg, expect_task=t)
        assert sa.seen_classes == sb.seen_classes
        assert sa.adapters.keys() == sb.adapters.keys()
        assert all(_same_tensor(sa.adapters[k], sb.adapters[k]) for k in sa.adapters), t
        assert sa.bases.keys() == sb.bases.keys() and sa.bases["visual"], t
        for tower in sa.bases:
            assert len(sa.bases[tower]) == len(sb.bases[tower])
            assert all(_same_tensor(x, y) for x, y in zip(sa.bases[tower], sb.bases[tower], strict=True)), t
        # Everything else a checkpoint holds (RNG states, config) too: the files are identical.
        assert (ref / "checkpoint.pt").read_bytes() == (got / "checkpoint.pt").read_bytes(), t


def test_task_range_errors_are_one_line_user_errors(one_per_job, run_cfg, tmp_path, capsys):
    resume = str(one_per_job / "task2" / "checkpoint.pt")
    base = ["train-task", "--quiet", "--config", str(run_cfg)]
    # Past the scenario: refused before any task is trained or written.
    assert main([*base, "--tasks", f"3-{N_TASKS}", "--resume", resume, "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"task {N_TASKS} does not exist" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())
    # No checkpoint to resume from.
    assert main([*base, "--tasks", "3-4", "--run-dir", str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err
    # A range writes several folders: --out-dir (one task's folder) is refused.
    assert main([*base, "--tasks", "3-4", "--resume", resume, "--out-dir", str(tmp_path / "t")]) == 2
    assert "--run-dir" in capsys.readouterr().err
    # Malformed ranges are argparse errors (exit 2, usage).
    for bad in ("4-3", "3", "a-b", "-1-2"):
        with pytest.raises(SystemExit) as exc:
            main([*base, "--tasks", bad, "--run-dir", str(tmp_path)])
        assert exc.value.code == 2
    assert not list(tmp_path.iterdir())


def test_a_chunk_guards_every_task_folder_of_its_range(one_per_job, run_cfg, tmp_path, capsys):
    """As a one-task job: no task of the range writes over another task's results, nor into a
    run another process holds (the run folder's one lock); both refused before any training,
    leaving the folders as found."""
    from dmnsp import guard, layout

    resume = str(one_per_job / "task2" / "checkpoint.pt")
    argv = ["train-task", "--quiet", "--config", str(run_cfg), "--tasks", "3-4", "--resume", resume]
    argv += ["--run-dir", str(tmp_path)]
    (tmp_path / "task4").mkdir()
    (tmp_path / "task4" / layout.EVAL).write_text(json.dumps({"task": 1}))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds the results of task 1" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task4"]
    (tmp_path / "task4" / layout.EVAL).unlink()
    with guard.locked(tmp_path, "another job"):
        assert main(argv) == 2
    assert "is in use by another dmnsp process" in capsys.readouterr().err
    assert not (tmp_path / "task3").exists() and not list((tmp_path / "task4").iterdir())


def test_single_task_may_name_the_run_folder(one_per_job, run_cfg, tmp_path):
    argv = ["train-task", "--quiet", "--config", str(run_cfg), "--task", "0", "--run-dir", str(tmp_path)]
    assert main(argv) == 0
    assert (tmp_path / "task0" / "checkpoint.pt").read_bytes() == (
        one_per_job / "task0" / "checkpoint.pt"
    ).read_bytes()


# -------------------------------------------------------------------------------------- workflow


def _workflow_config(path: Path, data_root: Path, methods: list[str] | None = None, **top) -> Path:
    """The miniature config on 5 tasks (2-2), without pretraining; ``top`` sets top-level keys."""
    from test_workflow import MINI

    cfg = yaml.safe_load(MINI.read_text())
    cfg["run"]["dataset_root"] = str(data_root)
    exp = cfg["experiments"]["test"]
    exp.update(splits=["2-2"], pretrain_first=False)
    if methods:
        exp["methods"] = methods
    exp["run"]["pretrained"] = None
    del exp["run"]["pretrain"], exp["run"]["pretrain_per_class"]
    cfg.update(top)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_chunk_jobs_plan_with_per_task_runtime_and_train_task_settings(tmp_path):
    """Two experiments, 2 tasks per job and 1: chunk rules for one, train_task for the other; a
    chunk asks for its tasks' runtime, and --set-resources/--set-threads of train_task reach it."""
    from test_workflow import _planned_jobs, job_counts, snakemake

    path = _workflow_config(tmp_path / "c.yaml", tmp_path / "data", tasks_per_job=2)
    cfg = yaml.safe_load(path.read_text())
    single = json.loads(json.dumps(cfg["experiments"]["test"]))
    single.update(methods=["finetune"], tasks_per_job=1)
    cfg["experiments"]["single"] = single
    cfg["resources"] = [{"mem_mb": 1000, "runtime": 5, "threads": 1}, {"rule": "train_task", "runtime": 7}]
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    work = tmp_path / "work"
    work.mkdir()
    args = ("--configfile", str(path), "--cores", "8")
    counts = job_counts(snakemake("-n", "--quiet", "rules", *args, cwd=work).stdout)
    # test: zeroshot, finetune, dmnsp (LAMBDA_SCALE 30) = 3 runs of 5 tasks; single: 1 finetune run.
    assert counts["train_tasks_0_1"] == counts["train_tasks_2_3"] == counts["train_tasks_4_4"] == 3
    assert counts["train_task"] == 5
    extra = ("--set-resources", "train_task:slurm_partition=gpu", "--set-threads", "train_task=3")
    proc = snakemake("-n", "-p", *args, *extra, cwd=work)
    jobs = [j for j in _planned_jobs(proc.stdout + proc.stderr) if j["rule"].startswith("train_task")]
    assert len(jobs) == 3 * 3 + 5
    for job in jobs:
        n = 1 if job["rule"] in ("train_task", "train_tasks_4_4") else 2
        assert job["wildcards"]["experiment"] == ("single" if job["rule"] == "train_task" else "test"), job
        assert int(job["resources"]["runtime"]) == 7 * n, job
        assert job["resources"]["slurm_partition"] == "gpu" and job["threads"] == 3, job
    assert "--tasks 2-3 --resume " in proc.stdout and "/task1/checkpoint.pt --run-dir " in proc.stdout


def test_search_followup_runs_are_chunked_like_their_experiment(tmp_path):
    """The search's follow-up runs join their experiment after the chunk rules are planned: its
    rules (experiment-wide constraints) still give them one job per chunk."""
    from test_workflow import ROOT, job_counts, snakemake

    cfg = yaml.safe_load((ROOT / "config" / "search-example.yaml").read_text())
    cfg["tasks_per_job"] = 2
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    counts = job_counts(snakemake("-n", "--quiet", "rules", "--configfile", str(path), cwd=tmp_path).stdout)
    # 2 grid runs and 2 follow-up runs (the best setting over 2 seeds) of 5 tasks: jobs 0-1, 2-3, 4.
    assert counts["search_prepare_run"] == 2 and counts["prepare_run"] == 2
    assert counts["train_tasks_0_1"] == counts["train_tasks_2_3"] == counts["train_tasks_4_4"] == 4
    assert "train_task" not in counts


def _workflow_run(work: Path, data: Path, k: int, *extra: str) -> dict[str, int]:
    """The 5-task dmnsp workflow at ``k`` tasks per job in ``work``; its training jobs by rule."""
    from test_workflow import job_counts, snakemake

    work.mkdir(exist_ok=True)
    path = _workflow_config(work / "config.yaml", data, ["dmnsp"], tasks_per_job=k)
    proc = snakemake("--cores", "2", "--configfile", str(path), *extra, cwd=work, timeout=600)
    assert "Nothing to be done" in snakemake("-n", "--configfile", str(path), cwd=work).stdout
    counts = job_counts(proc.stdout + proc.stderr)
    return {rule: n for rule, n in counts.items() if rule.startswith("train_task")}


def _run_folder(work: Path) -> Path:
    (metrics,) = (work / "results").rglob("metrics.json")
    return metrics.parent


def _same_tasks(reference: Path, other: Path) -> None:
    for t in range(N_TASKS):
        for name in ("eval.json", "diagnostics.json"):
            a, b = (json.loads((d / f"task{t}" / name).read_text()) for d in (reference, other))
            assert _without_timing(a) == _without_timing(b), (t, name)
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (reference, other)]
    assert metrics[0]["avg"] == metrics[1]["avg"] and metrics[0]["last"] == metrics[1]["last"]


@pytest.fixture(scope="module")
def one_per_job_workflow(tmp_path_factory) -> tuple[Path, Path]:
    """The 5-task dmnsp workflow at one task per job: (its run folder, the data root)."""
    if not FASHION_MNIST_DEBIAN_DIR.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    tmp = tmp_path_factory.mktemp("k1")
    assert _workflow_run(tmp / "work", tmp / "data", 1) == {"train_task": 5}
    return _run_folder(tmp / "work"), tmp / "data"


@pytest.mark.slow
def test_workflow_with_tasks_per_job_matches_one_task_per_job(one_per_job_workflow, tmp_path):
    """At 3 tasks per job: jobs 0-2 and 3-4, every task's eval.json and diagnostics.json as at one
    per job, chunk logs and benchmarks; keep_checkpoints: false deletes every checkpoint, those
    inside a chunk included."""
    reference, data = one_per_job_workflow
    assert _workflow_run(tmp_path, data, 3) == {"train_tasks_0_2": 1, "train_tasks_3_4": 1}
    run = _run_folder(tmp_path)
    _same_tasks(reference, run)
    for first, last in ((0, 2), (3, 4)):
        assert (run / "logs" / f"train_tasks{first}-{last}.log").is_file()
        assert (run / "benchmarks" / f"train_tasks{first}-{last}.tsv").is_file()
    assert not list(run.rglob("checkpoint.pt")) and not list(reference.rglob("checkpoint.pt"))
    # Changing tasks_per_job afterwards: Snakemake sees new rules, commands and inputs and would
    # retrain every task; `snakemake --touch` once records the finished tasks under the new rules.
    from test_workflow import job_counts, snakemake

    path = _workflow_config(tmp_path / "config.yaml", data, ["dmnsp"], tasks_per_job=1)
    planned = job_counts(snakemake("-n", "--quiet", "rules", "--configfile", str(path), cwd=tmp_path).stdout)
    assert planned.get("train_task") == N_TASKS
    snakemake("--touch", "--cores", "1", "--configfile", str(path), cwd=tmp_path)
    assert "Nothing to be done" in snakemake("-n", "--configfile", str(path), cwd=tmp_path).stdout
    _same_tasks(reference, run)


@pytest.mark.slow
def test_killed_chunk_job_reruns_all_its_tasks_to_the_same_results(one_per_job_workflow, tmp_path):
    """A job is the unit of loss: Snakemake killed while a 5-task job has finished two tasks; the
    rerun (--rerun-incomplete) trains the whole job again, tasks 0 and 1 included, and ends with
    the results of one task per job."""
    from test_workflow import ENV, SNAKEFILE, snakemake

    reference, data = one_per_job_workflow
    tmp_path.mkdir(exist_ok=True)
    path = _workflow_config(tmp_path / "config.yaml", data, ["dmnsp"], tasks_per_job=5)
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(tmp_path)]
    proc = subprocess.Popen(
        [*cmd, "--cores", "2", "--configfile", str(path)],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    runs = tmp_path / "results" / "test" / "runs"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if list(runs.glob("**/task1/eval.json")):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the workflow finished before its job could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    (finished,) = runs.glob("**/task1/eval.json")
    run = finished.parent.parent
    assert not (run / "task4" / "eval.json").exists()
    written = {t: (run / f"task{t}" / "eval.json").stat().st_mtime_ns for t in (0, 1)}
    snakemake("--unlock", "--configfile", str(path), cwd=tmp_path)
    rerun = snakemake("--cores", "2", "--rerun-incomplete", "--configfile", str(path), cwd=tmp_path)
    assert "train_tasks_0_4" in rerun.stdout + rerun.stderr
    for t, mtime in written.items():  # the finished tasks were trained and written again
        assert (run / f"task{t}" / "eval.json").stat().st_mtime_ns > mtime, t
    _same_tasks(reference, run)
