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

import deployment as deployment_helpers
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


def snakemake(
    *args: str, cwd: Path, timeout: float = 300, check: bool = True, snakefile: Path | None = SNAKEFILE
) -> subprocess.CompletedProcess:
    """Run snakemake on the repository's Snakefile (``snakefile=None``: the one Snakemake finds in
    ``cwd``, e.g. a deployment's workflow/Snakefile) with ``cwd`` as working directory."""
    which = ["--snakefile", str(snakefile)] if snakefile is not None else []
    cmd = [sys.executable, "-m", "snakemake", *which, "--directory", str(cwd), *args]
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
    # zeroshot, finetune and lwf × 2 seeds, dmnsp × LAMBDA_SCALE {1, 30} × 2 seeds, and the clean
    # ablation × 2 seeds (it ignores LAMBDA_SCALE) = 12 runs of 5 tasks, each trained by one job.
    assert counts == {
        "download_data": 1,  # Fashion-MNIST from Debian's files into data/
        "prepare_run": 12,
        "pretrain_model": 1,
        "train_tasks_0_4": 12,
        "compute_metrics": 12,
        "aggregate_results": 1,
        "all": 1,
    }


def test_miniature_config_plans():
    counts, _ = dry_run(MINI)
    assert counts == {
        "download_data": 1,
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
        "download_data": 1,  # the dataset and the ViT-B-16 `openai` weights, staged before training
        "fetch_weights": 1,
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
        staged = {"download_data": 1, "fetch_weights": 1}
        assert counts == {
            **jobs,
            **staged,
            "prepare_run": 3,
            "compute_metrics": 3,
            "aggregate_results": 1,
            "all": 1,
        }


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
    differ (by dataset, by a run's own threads): each job must still get its own row's values. A
    profile's (here the command line's) set-resources still overrides the table for its rule."""
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
    override = ("--set-resources", "compute_metrics:mem_mb=777")
    proc = snakemake("-n", "--cores", "8", *override, "--configfile", str(path), cwd=work)
    planned = _planned_jobs(proc.stdout + proc.stderr)
    assert sorted(j["wildcards"]["data_folder"] for j in planned if j["rule"] == "download_data") == [
        "data/FashionMNIST",
        "data/cifar-100-python",
    ]
    jobs = [j for j in planned if j["rule"] not in ("all", "download_data")]
    assert {j["rule"] for j in jobs} == {"prepare_run", "train_task", "compute_metrics", "aggregate_results"}
    for job in jobs:
        res, experiment = job["resources"], job["wildcards"]["experiment"]
        on_big = job["rule"] == "train_task" and experiment == "big"
        expected_mem = 7000 if on_big else 2500 if job["rule"] == "aggregate_results" else 1000
        expected_mem = 777 if job["rule"] == "compute_metrics" else expected_mem
        assert int(res["mem_mb"]) == expected_mem, job
        assert int(res["runtime"]) == (50 if on_big else 5), job
        assert job["threads"] == (3 if on_big else 1), job
        if job["rule"] == "train_task":
            assert int(res["gpu"]) == (1 if on_big else 0), job


PROFILES = sorted(p.parent for p in (ROOT / "workflow" / "profiles").glob("*/profile.yaml"))


@pytest.mark.parametrize("folder", PROFILES, ids=[p.name for p in PROFILES])
def test_profiles_are_read_as_profile_yaml_and_config_yaml(folder):
    """Snakemake >= 9.19 reads profile.yaml, older 9.x config.yaml: the second is a link to the
    first, and the installed Snakemake resolves the folder to that one content."""
    from snakemake.cli import get_profile_dir

    link = folder / "config.yaml"
    assert link.is_symlink() and os.readlink(link) == "profile.yaml"
    _, chosen = get_profile_dir(str(folder))
    assert chosen.name in ("profile.yaml", "config.yaml")
    assert chosen.read_text() == (folder / "profile.yaml").read_text()
    assert yaml.safe_load(chosen.read_text())  # a mapping of settings


@pytest.mark.parametrize("entry", [SNAKEFILE, ROOT / "workflow" / "Snakefile"], ids=["root", "workflow"])
def test_lint_is_clean(entry):
    proc = snakemake("--lint", cwd=ROOT, timeout=120, check=False, snakefile=entry)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_workflow_entry_point_runs_from_any_folder(tmp_path):
    """workflow/Snakefile from an empty folder: without a config/config.yaml there, it takes the one
    shipped beside it and plans the embedded default, writing under this folder."""
    proc = snakemake("-n", "--quiet", "rules", cwd=tmp_path, snakefile=ROOT / "workflow" / "Snakefile")
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["prepare_run"] == 12 and counts["download_data"] == 1 and counts["all"] == 1
    assert "Config file(s): ['" + str(ROOT / "config" / "config.yaml") in proc.stdout + proc.stderr


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


def report_categories(html: str) -> dict[str, dict[str, list[str]]]:
    """The HTML report's categories: {category: {subcategory: [file names]}} (its `categories` script)."""
    found = re.search(r"var categories = (\{.*?\});\s*</script>", html, re.DOTALL)
    assert found, "no categories in the report"
    raw = json.loads(found.group(1))
    return {
        cat: {sub: sorted(Path(f).name for f in files) for sub, files in subs.items()}
        for cat, subs in raw.items()
    }


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
def deployment(tmp_path_factory):
    """The workflow deployed as the catalog's standardized usage does (tests/deployment.py): a
    clone of this working tree tagged v<version>, snakedeploy deploy-workflow into an empty folder."""
    source, tag = deployment_helpers.tagged_source(tmp_path_factory.mktemp("release"))
    dest = tmp_path_factory.mktemp("deployed")
    written = deployment_helpers.deploy(source, tag, dest)
    return dest, source, tag, written


@pytest.fixture(scope="module")
def finished_run(deployment, data_root):
    """The miniature config run once through snakemake --cores 2 in the deployed copy (Snakemake
    finds its workflow/Snakefile, which uses the tagged workflow as a module)."""
    workdir = deployment[0]
    config = mini_config(workdir, data_root)
    (workdir / "config" / "config.yaml").write_text(config.read_text())  # the deployment's own config
    start = time.perf_counter()
    proc = snakemake("--cores", "2", cwd=workdir, timeout=900, snakefile=None)
    (workdir / "snakemake.stderr").write_text(proc.stderr)  # the console, as the user saw it
    return workdir, config, time.perf_counter() - start


def deployed(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """snakemake in a deployment (its workflow/Snakefile)."""
    return snakemake(*args, cwd=cwd, snakefile=None, **kwargs)


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
    # Nothing left to do; the report builds, each file under its dataset / split, then Tables,
    # Plots or Diagnostics, with its caption.
    proc = deployed("-n", "--configfile", str(config), cwd=workdir)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    deployed("--report", "report.html", "--configfile", str(config), cwd=workdir)
    html = (workdir / "report.html").read_text(errors="replace")
    assert "summary.csv" in html and ".png" in html
    categories = report_categories(html)
    assert set(categories) == {"fashion-mnist / 6-4"}, categories
    files = categories["fashion-mnist / 6-4"]
    assert set(files) == {"Tables", "Plots", "Diagnostics"}, files
    assert {"summary.csv", "runs.csv", "hyperparameters.csv"} <= set(files["Tables"])
    assert {"accuracy_curves_fashion-mnist_6-4.png", "accuracy_matrix_fashion-mnist_6-4.png"} <= set(
        files["Plots"]
    )
    assert "diagnostics_fashion-mnist_6-4.png" in files["Diagnostics"]
    assert any(name.startswith("lambda_") for name in files["Diagnostics"])
    assert "Projection diagnostics of experiment test per task" in html  # the diagnostics' own caption
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
    proc = deployed("-n", "--quiet", "rules", "--configfile", str(changed), cwd=workdir)
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


# ------------------------------------------------------------------------------ deployment


@pytest.mark.slow
def test_snakedeploy_writes_the_module_deployment(deployment, finished_run):
    """snakedeploy deploy-workflow <tagged clone> <empty folder> --tag v<version>: config/ copied, a
    workflow/Snakefile that uses the tagged workflow as a module; the miniature ran from there."""
    dest, source, tag, written = deployment
    assert tag == f"v{deployment_helpers.version()}"
    assert 'configfile: "config/config.yaml"' in written
    assert "module dmnsp:" in written and "use rule * from dmnsp" in written
    # snakedeploy 0.17.1's local provider: the bare path, replaced by gitfile(<clone>, ..., tag)
    assert deployment_helpers.LOCAL_DECLARATION in written
    assert (dest / "config" / "paper" / "cifar100-10-10.yaml").is_file()
    assert sorted(p.name for p in (dest / "workflow").iterdir()) == ["Snakefile"]  # rules come from the tag
    tables = dest / "results" / "test" / "tables"
    assert {"summary.csv", "runs.csv", "hyperparameters.csv"} <= {p.name for p in tables.iterdir()}
    assert len(final_metrics(dest)) == 3
    # The workflow's config checks run in the module too (check_workflow_config in workflow/Snakefile,
    # before validation): a key written twice, which Snakemake's reader keeps silently, and a value
    # past the schema's bounds each stop planning in one line naming it.
    config = (dest / "config" / "config.yaml").read_text()
    for text, needle in [
        (config + "tasks_per_job: 2\ntasks_per_job: 1\n", "duplicate key 'tasks_per_job'"),
        (config + "tasks_per_job: 0\n", "tasks_per_job"),
    ]:
        (dest / "hostile.yaml").write_text(text)
        proc = deployed("-n", "--configfile", "hostile.yaml", cwd=dest, check=False, timeout=120)
        console = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "Building DAG" not in console, console
        assert "invalid workflow config: " in console and needle in console, console


def test_conda_env_installs_the_workflows_own_version(tmp_path):
    """envs/dmnsp.yaml's last pip line is ${DMNSP_PACKAGE}; the workflow sets it to the source it was
    read from (workflow/rules/package.smk). For a module from a clone at a tag, pip resolves that line
    to this package at the tag's version; the env file names the version, so a release gets a new env."""
    env = yaml.safe_load((ROOT / "workflow" / "envs" / "dmnsp.yaml").read_text())
    pip_lines = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip_lines[-1] == "${DMNSP_PACKAGE}"
    header = (ROOT / "workflow" / "envs" / "dmnsp.yaml").read_text()
    assert f"# dmnsp version: {deployment_helpers.version()}\n" in header
    source, tag = deployment_helpers.tagged_source(tmp_path / "release")
    # A workflow that includes package.smk from the clone at the tag, as a module would read it.
    (tmp_path / "Snakefile").write_text(
        f'include: gitfile("{source}", path="workflow/rules/package.smk", tag="{tag}")\n\n'
        "rule requirement:\n    output: 'requirement.txt'\n    shell: 'echo \"$DMNSP_PACKAGE\" > {output}'\n"
    )
    snakemake("--cores", "1", cwd=tmp_path, snakefile=tmp_path / "Snakefile", timeout=120)
    requirement = (tmp_path / "requirement.txt").read_text().strip()
    assert requirement == f"dmnsp @ git+file://{source}@{tag}"
    (tmp_path / "requirements.txt").write_text(pip_lines[-1] + "\n")  # what conda hands to pip
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation", "-q"]
        + ["--report", str(report), "-r", str(tmp_path / "requirements.txt")],
        env={**ENV, "DMNSP_PACKAGE": requirement},
        check=True,
        capture_output=True,
        timeout=300,
    )
    (install,) = json.loads(report.read_text())["install"]
    assert install["metadata"]["name"] == "dmnsp"
    assert install["metadata"]["version"] == deployment_helpers.version()
    assert install["download_info"]["vcs_info"]["requested_revision"] == tag
    # A release of another version than the installed package: planning stops, naming the fix.
    pyproject = source / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace(f'version = "{deployment_helpers.version()}"', 'version = "9.9.9"')
    )
    deployment_helpers.git("commit", "-q", "-am", "9.9.9", cwd=source)
    deployment_helpers.git("tag", "v9.9.9", cwd=source)
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(snakefile.read_text().replace(f'tag="{tag}"', 'tag="v9.9.9"'))
    proc = snakemake("-n", cwd=tmp_path, snakefile=snakefile, timeout=120, check=False)
    assert proc.returncode != 0
    console = proc.stdout + proc.stderr
    assert (
        f"this workflow is dmnsp 9.9.9 but Snakemake runs with dmnsp {deployment_helpers.version()}"
        in console
    )
    assert f"pip install 'dmnsp @ git+file://{source}@v9.9.9'" in console


# ------------------------------------------------------------------------------ remote storage

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "dmnsp-test",
    "AWS_SECRET_ACCESS_KEY": "dmnsp-test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent",  # nothing from this machine's AWS settings
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
}


@pytest.fixture(scope="module")
def s3_server():
    """A local S3 server (moto in server mode) on 127.0.0.1; yields its endpoint URL."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=S3_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
    )


def table_digest(text: str) -> str:
    """sha256 of a table without its timing and memory columns (they differ between identical runs)."""
    import hashlib
    import io

    df = pd.read_csv(io.StringIO(text), keep_default_na=False)
    df = df[[c for c in df.columns if not re.search(r"seconds|mem_mb", c)]]
    return hashlib.sha256(df.to_csv(index=False).encode()).hexdigest()[:16]


@pytest.mark.slow
def test_remote_storage_s3_kill_and_resume_through_the_bucket(finished_run, s3_server, tmp_path_factory):
    """With --default-storage-provider s3 every job reads only its inputs and writes only its
    outputs. The miniature (two tasks per training job: the chunk rule) runs against a local S3
    server, is killed while a training job runs, and is resumed from a fresh working directory and
    local storage prefix, nothing shared with the first but the bucket. Its tables equal the local run's."""
    bucket, prefix = "dmnsp-test", "study"
    client = s3_client(s3_server)
    client.create_bucket(Bucket=bucket)

    def workdir(name: str) -> Path:
        folder = tmp_path_factory.mktemp(name)
        cfg = yaml.safe_load(MINI.read_text())
        cfg["run"]["dataset_root"] = "data"  # relative: staged by download_data, through the bucket
        cfg["tasks_per_job"] = 2
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        return folder

    def command(folder: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(SNAKEFILE),
            "--directory",
            str(folder),
            "--cores",
            "2",
            "--configfile",
            str(folder / "config.yaml"),
            "--default-storage-provider",
            "s3",
            "--default-storage-prefix",
            f"s3://{bucket}/{prefix}",
            "--storage-s3-endpoint-url",
            s3_server,
            "--local-storage-prefix",
            str(folder / "storage"),
        ]

    def keys() -> list[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    first = workdir("s3-first")
    local = first / "storage" / "s3" / bucket / prefix
    proc = subprocess.Popen(
        command(first),
        cwd=first,
        env={**ENV, **S3_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            logs = list(local.glob("results/test/runs/**/method~dmnsp/**/logs/train_tasks0-1.log"))
            if logs and not list(logs[0].parent.parent.glob("task1/eval.json")):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the workflow finished before a training job could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stored = keys()
    assert any(k.endswith("/model.pt") and "/results/pretrained/" in k for k in stored)
    assert f"{prefix}/data/FashionMNIST/raw/train-images-idx3-ubyte" in stored
    # The killed job's outputs never reached the bucket (Snakemake stores them once a job succeeds).
    assert not [k for k in stored if "method~dmnsp" in k and "/task" in k], stored

    second = workdir("s3-second")
    done = subprocess.run(
        command(second), cwd=second, env={**ENV, **S3_ENV}, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
    counts = job_counts(done.stdout + done.stderr)
    print(f"resumed from the bucket, jobs: {counts}")
    assert "pretrain_model" not in counts and "download_data" not in counts, counts  # taken from the bucket
    assert counts.get("train_tasks_0_1", 0) >= 1 and counts["aggregate_results"] == 1, counts
    # No job wrote through a path it was not given: the second working directory holds Snakemake's
    # own folder, its local storage prefix and the config, nothing else (no results/, no data/).
    assert sorted(p.name for p in second.iterdir()) == [".snakemake", "config.yaml", "storage"]

    reference_dir = finished_run[0]
    # Every file a job wrote reached the bucket, so every one was a declared output: the bucket holds
    # what the local run holds under results/ (logs and benchmarks are named by the job's tasks).
    written = {
        str(p.relative_to(reference_dir))
        for p in (reference_dir / "results").rglob("*")
        if p.is_file() and not {"logs", "benchmarks"} & set(p.relative_to(reference_dir).parts)
    }
    missing = written - {k.removeprefix(f"{prefix}/") for k in keys()}
    assert not missing, sorted(missing)
    for name in ("summary.csv", "runs.csv", "hyperparameters.csv"):
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/results/test/tables/{name}")["Body"].read()
        remote = table_digest(body.decode())
        local_digest = table_digest((reference_dir / "results" / "test" / "tables" / name).read_text())
        print(f"{name}: s3 {remote}, local {local_digest}")
        assert remote == local_digest, name
    reference = final_metrics(reference_dir)
    for run_dir, metrics in reference.items():
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{run_dir}/metrics.json")["Body"].read()
        assert accuracy_only(json.loads(body)) == accuracy_only(metrics), run_dir


@pytest.mark.slow
def test_remote_storage_fs_gives_the_local_results(finished_run, tmp_path):
    """The same with snakemake-storage-plugin-fs (a storage folder standing in for a file system the
    jobs' machines share with nothing else), one task per training job (the train_task rule), for
    the miniature's dmnsp run only (its pretraining, data, run and tables)."""
    work, remote = tmp_path / "work", tmp_path / "remote"
    work.mkdir()
    cfg = yaml.safe_load(MINI.read_text())
    cfg["run"]["dataset_root"] = "data"
    cfg["experiments"]["test"]["methods"] = ["dmnsp"]
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    storage = ("--default-storage-provider", "fs", "--default-storage-prefix", str(remote))
    storage += ("--local-storage-prefix", str(work / "storage"))
    snakemake("--cores", "2", *storage, "--configfile", str(work / "config.yaml"), cwd=work, timeout=900)
    assert sorted(p.name for p in work.iterdir()) == [".snakemake", "config.yaml", "storage"]
    assert (remote / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    (run_dir,) = [r for r in final_metrics(finished_run[0]) if "method~dmnsp" in r]
    local = json.loads((finished_run[0] / run_dir / "metrics.json").read_text())
    assert accuracy_only(json.loads((remote / run_dir / "metrics.json").read_text())) == accuracy_only(local)

    def row(folder: Path) -> dict:
        """The run's row of runs.csv without timing columns, numbers as numbers (a column holds
        30.0 beside other methods' empty cells, 30 alone)."""
        table = pd.read_csv(folder / "results" / "test" / "tables" / "runs.csv", keep_default_na=False)
        (found,) = table[table["run_dir"] == run_dir].to_dict("records")
        values = {}
        for key, value in found.items():
            if not re.search(r"seconds|mem_mb", key):
                try:
                    values[key] = float(value)
                except (TypeError, ValueError):
                    values[key] = value
        return values

    assert row(remote) == row(finished_run[0])


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
        deployed("--report", "report.html", "--configfile", str(config), cwd=workdir)
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
