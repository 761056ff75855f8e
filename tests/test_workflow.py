"""The Snakemake workflow: dry-runs of every shipped config, lint, config validation, and (slow)
miniature end-to-end runs including a kill-and-resume."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dmnsp.experiments import expand_all

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
DEFAULT = ROOT / "config" / "config.yaml"
MINI = ROOT / "config" / "test" / "config.yaml"
PAPER = sorted((ROOT / "config" / "paper").glob("*.yaml"))
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
N_TASKS = {
    "cifar100-10-10": 10,
    "cifar100-5-5": 20,
    "cifar100-2-2": 50,
    "tinyimagenet-100-20": 6,
    "tinyimagenet-100-10": 11,
    "tinyimagenet-100-5": 21,
}
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def snakemake(*args: str, cwd: Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run snakemake on the repository's Snakefile with ``cwd`` as working directory."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(cwd), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a snakemake run → {rule: count} (first table only)."""
    counts: dict[str, int] = {}
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Job stats:"))
    for line in lines[start + 3 :]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


@cache
def dry_run(configfile: Path) -> tuple[dict[str, int], float]:
    """Job counts and wall time of ``snakemake -n`` for one config (cached: each config is planned once)."""
    workdir = (
        Path(os.environ.get("PYTEST_DRYRUN_DIR", "/tmp")) / f"dmnsp-dryrun-{os.getpid()}-{configfile.stem}"
    )
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        proc = snakemake("-n", "--quiet", "rules", "--configfile", str(configfile), cwd=workdir)
        elapsed = time.perf_counter() - start
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return job_counts(proc.stdout + proc.stderr), elapsed


# ------------------------------------------------------------------------------------ dry-runs


def test_default_config_plans_the_embedded_study():
    counts, _ = dry_run(DEFAULT)
    # zeroshot, finetune, lwf, moe_adapters and rapf × 2 seeds, dmnsp × LAMBDA_SCALE {1, 30} × 2
    # seeds, and the clean ablation × 2 seeds (it ignores LAMBDA_SCALE) = 16 runs of 5 tasks, each
    # trained by one job.
    assert counts == {
        "prepare_run": 16,
        "pretrain_model": 1,
        "train_tasks_0_4": 16,
        "compute_metrics": 16,
        "aggregate_results": 1,
        "all": 1,
    }


def test_miniature_config_plans():
    counts, _ = dry_run(MINI)
    assert counts == {
        "prepare_run": 3,
        "pretrain_model": 1,
        "train_task": 6,
        "compute_metrics": 3,
        "aggregate_results": 1,
        "all": 1,
    }


def training_jobs(n_tasks: int, k: int, runs: int) -> dict[str, int]:
    """Job counts of the training rules for `runs` runs of `n_tasks` tasks at `k` tasks per job:
    train_task per task at k = 1, else a train_tasks_<first>_<last> rule per chunk of k (the last
    one shorter)."""
    if k == 1:
        return {"train_task": runs * n_tasks}
    return {f"train_tasks_{a}_{min(a + k, n_tasks) - 1}": runs for a in range(0, n_tasks, k)}


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_configs_plan_the_full_dag_offline(path):
    counts, elapsed = dry_run(path)
    runs = 3 * (6 + 5)  # 3 seeds × (zeroshot, finetune, lwf, moe_adapters, rapf, dmnsp and the 5 ablations)
    k = yaml.safe_load(path.read_text()).get("tasks_per_job", 1)
    assert k > 1  # the paper configs train several tasks per job (benchmarks/README.md)
    assert counts == {
        "prepare_run": runs,
        **training_jobs(N_TASKS[path.stem], k, runs),
        "compute_metrics": runs,
        "aggregate_results": 1,
        "all": 1,
    }
    print(f"planned {path.name} in {elapsed:.1f} s")  # the < 30 s target is checked in benchmarks/dag.py


def test_one_method_one_split_counts(tmp_path):
    """CIFAR100 10-10 × 3 seeds × 1 method = 30 tasks: 30 train_task jobs, or 6 of 5 tasks each."""
    cfg = yaml.safe_load((ROOT / "config" / "paper" / "cifar100-10-10.yaml").read_text())
    (exp,) = cfg["experiments"].values()
    exp["methods"], exp["ablations"] = ["dmnsp"], []
    for k, jobs in ((1, {"train_task": 30}), (5, {"train_tasks_0_4": 3, "train_tasks_5_9": 3})):
        cfg["tasks_per_job"] = k
        path = tmp_path / f"one-k{k}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        counts, _ = dry_run(path)
        assert counts == {**jobs, "prepare_run": 3, "compute_metrics": 3, "aggregate_results": 1, "all": 1}


def _planned_jobs(output: str) -> list[dict]:
    """Every job block of a dry-run: rule, wildcards, threads and resources as printed."""
    jobs = []
    for line in output.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            jobs.append({"rule": m.group(1), "threads": 1})
        elif jobs and (m := re.match(r"^    (wildcards|threads|resources): (.*)$", line)):
            key, value = m.groups()
            if key == "threads":
                jobs[-1]["threads"] = int(value)
            else:
                jobs[-1][key] = dict(item.split("=", 1) for item in value.split(", "))
    return jobs


def test_job_resources_follow_the_table_per_job(tmp_path):
    """Resources are plain values where all jobs of a rule agree and per-job lookups where they
    differ (by dataset, by a run's own threads): each job must still get its own row's values."""
    cfg = yaml.safe_load(MINI.read_text())
    small = cfg["experiments"]["test"]
    small.update(methods=["finetune"], pretrain_first=False)
    small["run"]["pretrained"] = None
    big = json.loads(json.dumps(small))
    big.update(datasets=["cifar100"], splits=["50-50"])
    big["run"]["threads"] = 3
    cfg["experiments"]["big"] = big
    cfg["resources"] = [
        {"mem_mb": 1000, "runtime": 5, "threads": 1},
        {"rule": "train_task", "dataset": "cifar100", "mem_mb": 7000, "runtime": 50, "gpu": 1},
        {"rule": "aggregate_results", "mem_mb": 2500},
    ]
    path = tmp_path / "resources.yaml"
    path.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    work.mkdir()
    proc = snakemake("-n", "--cores", "8", "--configfile", str(path), cwd=work)
    jobs = [j for j in _planned_jobs(proc.stdout + proc.stderr) if j["rule"] != "all"]
    assert {j["rule"] for j in jobs} == {"prepare_run", "train_task", "compute_metrics", "aggregate_results"}
    for job in jobs:
        res, experiment = job["resources"], job["wildcards"]["experiment"]
        on_big = job["rule"] == "train_task" and experiment == "big"
        expected_mem = 7000 if on_big else 2500 if job["rule"] == "aggregate_results" else 1000
        assert int(res["mem_mb"]) == expected_mem, job
        assert int(res["runtime"]) == (50 if on_big else 5), job
        assert job["threads"] == (3 if on_big else 1), job
        if job["rule"] == "train_task":
            assert int(res["gpu"]) == (1 if on_big else 0), job


def test_lint_is_clean():
    proc = snakemake("--lint", cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------- validation


def schema_validate(cfg: dict) -> dict:
    from snakemake.utils import validate

    validate(cfg, str(SCHEMA))
    return cfg


@pytest.mark.parametrize("path", [DEFAULT, MINI, *PAPER], ids=lambda p: p.stem)
def test_shipped_configs_match_the_schema(path):
    cfg = schema_validate(yaml.safe_load(path.read_text()))
    expand_all(cfg)


def test_schema_fills_defaults():
    cfg = schema_validate({"experiments": {"e": {"methods": ["dmnsp"]}}})
    assert cfg["keep_checkpoints"] is True and cfg["resources"] == []
    assert cfg["experiments"]["e"]["ablations"] == [] and cfg["experiments"]["e"]["pretrain_first"] is False


BAD_SCHEMA = [
    ({"experiments": {"e": {}}, "colour": "red"}, "colour"),
    ({"experiments": {"e": {"seed": [0]}}}, "seed"),
    ({"experiments": {"e": {"seeds": "zero"}}}, "seeds"),
    ({"experiments": {"e": {"datasets": ["mnist"]}}}, "mnist"),
    ({"experiments": {"e": {"methods": ["ewc"]}}}, "ewc"),
    ({"experiments": {"e": {"splits": ["10/10"]}}}, "10/10"),
    ({"experiments": {"e": {"ablations": ["towers-all"]}}}, "towers-all"),
    ({"experiments": {"e": {}}, "keep_checkpoints": "yes"}, "keep_checkpoints"),
    ({"experiments": {"e": {}}, "resources": [{"rule": "train", "mem_mb": 1}]}, "train"),
    ({}, "experiments"),
]


@pytest.mark.parametrize(("cfg", "key"), BAD_SCHEMA, ids=[k for _, k in BAD_SCHEMA])
def test_schema_rejects_bad_configs(cfg, key):
    from snakemake.exceptions import WorkflowError

    with pytest.raises(WorkflowError) as err:
        schema_validate(cfg)
    assert key in str(err.value) + str(getattr(err.value, "args", ""))


BAD_WORKFLOW = {
    "unknown-key": ({"experiments": {"e": {"methods": ["dmnsp"]}}, "colour": "red"}, "colour"),
    "wrong-type": ({"experiments": {"e": {"seeds": "zero"}}}, "seeds"),
    "unknown-method": ({"experiments": {"e": {"methods": ["ewc"]}}}, "ewc"),
    "bad-split": ({"experiments": {"e": {"splits": ["12-2"]}}}, "splits"),
    "bad-run-value": ({"experiments": {"e": {"grid": {"lr": [0.001, -1]}}}}, "'lr'"),
}


@pytest.mark.parametrize("case", list(BAD_WORKFLOW))
def test_bad_workflow_configs_stop_at_planning_naming_the_key(case, tmp_path):
    cfg, key = BAD_WORKFLOW[case]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake("-n", "--configfile", str(path), cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert key in output, output
    assert "Building DAG" not in output  # stopped while reading the config, before any job


# ------------------------------------------------------------------------------ end to end


def mini_config(tmp: Path, data_root: Path, **run_changes) -> Path:
    cfg = yaml.safe_load(MINI.read_text())
    cfg["run"]["dataset_root"] = str(data_root)
    cfg["experiments"]["test"]["run"].update(run_changes)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def final_metrics(workdir: Path) -> dict[str, dict]:
    out = {}
    for path in sorted((workdir / "results" / "test" / "runs").rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        out[str(path.parent.relative_to(workdir))] = metrics
    return out


def accuracy_only(metrics: dict) -> dict:
    """Drop timing and resource fields (they differ between two identical runs)."""
    drop = re.compile(r"(second|time|mem|wall|duration|host|date)", re.IGNORECASE)
    if isinstance(metrics, dict):
        return {k: accuracy_only(v) for k, v in metrics.items() if not drop.search(k)}
    if isinstance(metrics, list):
        return [accuracy_only(v) for v in metrics]
    return metrics


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root):
    """The miniature config run once through snakemake --cores 2."""
    workdir = tmp_path_factory.mktemp("mini")
    config = mini_config(workdir, data_root)
    start = time.perf_counter()
    proc = snakemake("--cores", "2", "--configfile", str(config), cwd=workdir, timeout=300)
    (workdir / "snakemake.stderr").write_text(proc.stderr)  # the console, as the user saw it
    return workdir, config, time.perf_counter() - start


@pytest.mark.slow
def test_miniature_workflow_end_to_end(finished_run):
    workdir, config, _elapsed = finished_run  # timings live in benchmarks/, not in tests
    tables = workdir / "results" / "test" / "tables"
    for name in (
        "summary.md",
        "summary.csv",
        "summary.tex",
        "summary.html",
        "runs.csv",
        "hyperparameters.csv",
        "hyperparameters.md",
    ):
        assert (tables / name).is_file(), name
    assert list((workdir / "results" / "test" / "plots").glob("*.png"))
    metrics = final_metrics(workdir)
    assert len(metrics) == 3
    for run_dir in metrics:
        info = json.loads((workdir / run_dir / "run.json").read_text())
        assert {"experiment", "label", "settings", "dmnsp_version", "git_revision", "config_hash"} <= set(
            info
        )
        assert info["numerics"]["optimizer"] in ("cuda-foreach", "torch") and info["numerics"]["eig"] in (
            "svd",
            "eigh",
        )
        assert (workdir / run_dir / "config.yaml").is_file()
        assert (workdir / run_dir / "accuracy_matrix.csv").is_file()
        # keep_checkpoints: false → checkpoints are temporary and gone once used.
        assert not list((workdir / run_dir).rglob("checkpoint.pt"))
    # Nothing left to do; the report builds.
    proc = snakemake("-n", "--configfile", str(config), cwd=workdir)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    snakemake("--report", "report.html", "--configfile", str(config), cwd=workdir)
    html = (workdir / "report.html").read_text(errors="replace")
    assert "summary.csv" in html and ".png" in html
    # Health: the miniature's 3-step pretraining leaves runs near chance. Whatever the runs'
    # flags are, the aggregate job's warnings reach the console and the report's inline table.
    runs = pd.read_csv(tables / "runs.csv", keep_default_na=False)
    flagged = (runs["health"] != "").any() or "§" in (tables / "summary.md").read_text()
    console = (workdir / "snakemake.stderr").read_text()
    assert ("dmnsp report-artifacts: warning:" in console) == flagged
    embedded = re.search(r"data:text/html;charset=utf8;filename=summary.html;base64,([A-Za-z0-9+/=]+)", html)
    page = base64.b64decode(embedded.group(1)).decode()
    assert "Results (accuracy, %)" in page and ("WARNING: " in page) == ("warning:" in console)
    for run_dir in metrics:
        assert {"collapsed", "at_chance", "top_class_share", "steps"} <= set(metrics[run_dir]["health"])


@pytest.mark.slow
def test_changing_a_hyperparameter_reruns_only_affected_runs(finished_run, data_root, tmp_path):
    workdir, _, _ = finished_run
    # TOP_K_RATIO is read by dmnsp only: zeroshot and finetune stay done.
    changed = mini_config(tmp_path, data_root, TOP_K_RATIO=0.2)
    proc = snakemake("-n", "--quiet", "rules", "--configfile", str(changed), cwd=workdir)
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts == {
        "prepare_run": 1,
        "train_task": 2,
        "compute_metrics": 1,
        "aggregate_results": 1,
        "all": 1,
    }


@pytest.mark.slow
def test_killed_workflow_resumes_to_the_same_metrics(finished_run, data_root, tmp_path_factory):
    reference_dir, _, _ = finished_run
    workdir = tmp_path_factory.mktemp("killed")
    config = mini_config(workdir, data_root)
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(workdir),
        "--cores",
        "2",
        "--configfile",
        str(config),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # Wait until a train_task job of a training method is running (its log exists, its eval not yet).
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            logs = list(
                (workdir / "results" / "test" / "runs").glob("**/method~dmnsp/**/logs/train_task1.log")
            )
            if logs and not list(logs[0].parent.parent.glob("task1/eval.json")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the workflow finished before a train_task job could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not final_metrics(workdir) or len(final_metrics(workdir)) < 3
    snakemake("--unlock", "--configfile", str(config), cwd=workdir)
    snakemake("--cores", "2", "--rerun-incomplete", "--configfile", str(config), cwd=workdir, timeout=300)
    resumed, reference = final_metrics(workdir), final_metrics(reference_dir)
    assert set(resumed) == set(reference) and len(resumed) == 3
    for run_dir in reference:
        assert accuracy_only(resumed[run_dir]) == accuracy_only(reference[run_dir]), run_dir


# ------------------------------------------------------------------------------ documentation


def _keys(schema: dict, prefix: str = "") -> list[str]:
    out = []
    for key, sub in schema.get("properties", {}).items():
        if sub.get("type") == "object" and "properties" in sub:
            out += _keys(sub, f"{prefix}{key}.")  # nested blocks are documented key by key
        else:
            out.append(f"{prefix}{key}")
    return out


def test_config_readme_explains_every_key():
    from dmnsp.config import run_schema

    readme = (ROOT / "config" / "README.md").read_text()
    workflow_schema = yaml.safe_load(SCHEMA.read_text())
    experiment = workflow_schema["properties"]["experiments"]["additionalProperties"]
    resource_row = workflow_schema["$defs"]["resource_row"]
    keys = _keys(run_schema()) + _keys(workflow_schema) + _keys(experiment) + _keys(resource_row)
    # The search block belongs to workflow/rules/search.smk and is documented with it.
    missing = [key for key in keys if f"`{key}`" not in readme and not key.startswith("search.")]
    assert not missing, f"config/README.md does not explain {missing}"


@pytest.mark.slow
def test_report_renders_in_headless_chromium(finished_run):
    """The HTML report as a reader sees it: opened from disk, JavaScript run, screenshot taken."""
    import numpy as np
    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "chromium is not installed: run .ci/setup (Debian package chromium)"
    workdir, config, _ = finished_run
    report = workdir / "report.html"
    if not report.is_file():
        snakemake("--report", "report.html", "--configfile", str(config), cwd=workdir)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={workdir / 'chromium-profile'}",
        "--window-size=1280,900",
        "--virtual-time-budget=15000",
    ]
    shot = workdir / "report.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", report.as_uri()],
        check=True,
        timeout=120,
        capture_output=True,
    )
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", report.as_uri()],
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    ).stdout
    assert "Snakemake Report" in dom or "snakemake" in dom.lower()
    assert "summary" in dom  # our captioned tables are listed
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (900, 1280)
    assert pixels.std() > 5, "the screenshot is blank"
