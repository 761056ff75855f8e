"""Cluster profiles, and the miniature workflow on a real SLURM scheduler.

Without a scheduler: the SLURM and generic profiles plan the miniature workflow, the SLURM
profile leaves job sizes to the config's resource table, and the generic profile's
``cluster.py`` builds PBS/SGE/LSF commands and reads their answers (fake scheduler programs).

With a scheduler (``@pytest.mark.cluster``): a session fixture starts a single-node SLURM with
``.ci/slurm_up.sh`` unless one started by it is already up, and stops the daemons it started, by
PID, at the end. The miniature config then goes through ``--profile workflow/profiles/slurm``
(a copy that names this cluster's partition and status command, as a site would). A running
``train_task`` job is cancelled with ``scancel`` (a preemption): Snakemake resubmits it (retries),
the retry is cancelled too, Snakemake gives up on that run, and a rerun of the same command
finishes the workflow from the last finished task, with the numbers of an uninterrupted local
run. Every Snakemake runs under ``timeout -s KILL``, so a hang fails the test instead of CI.

Environment: DMNSP_SLURM_EXISTING=1 runs against an already configured SLURM instead (partition
from DMNSP_SLURM_PARTITION or the default one); DMNSP_REQUIRE_SLURM=1 turns "cannot start a
scheduler here" from a skip into a failure; DMNSP_SLURM_DIR as in .ci/slurm_up.sh.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
MINI = ROOT / "config" / "test" / "config.yaml"
RULES = ROOT / "workflow" / "rules"
SLURM_PROFILE = ROOT / "workflow" / "profiles" / "slurm"
GENERIC_PROFILE = ROOT / "workflow" / "profiles" / "generic"
CLUSTER_PY = GENERIC_PROFILE / "cluster.py"
SLURM_UP = ROOT / ".ci" / "slurm_up.sh"
SLURM_DIR = Path(os.environ.get("DMNSP_SLURM_DIR", "/tmp/dmnsp-slurm"))
USE_EXISTING = os.environ.get("DMNSP_SLURM_EXISTING") == "1"
REQUIRE_SLURM = os.environ.get("DMNSP_REQUIRE_SLURM") == "1"
DAEMONS = ("slurmd", "slurmctld", "munged")  # stopping order

# Each job of the SLURM test asks for this (retries for more, see grown()).
TEST_MEM_MB, TEST_RUNTIME_MIN, TEST_THREADS = 1000, 5, 1
SNAKEMAKE_LIMIT_S = 360  # per Snakemake invocation, enforced with SIGKILL
METHODS = ["finetune", "dmnsp"]  # two training runs: their jobs fit a 2-CPU node side by side
PREEMPTED = {"method": "dmnsp", "task": 1}  # the task whose SLURM jobs get cancelled
# Whether workflow/rules/common.smk grows mem_mb and runtime with Snakemake's `attempt`.
ATTEMPT_AWARE = bool(re.search(r"\(wildcards, attempt\)", (RULES / "common.smk").read_text()))


def grown(value: int, attempt: int) -> int:
    """A resource at `attempt` when it grows per retry: 1x, 1.5x, 2x, ... (rounded up)."""
    return -(-value * (attempt + 1) // 2)


def child_env() -> dict[str, str]:
    """This interpreter's environment for Snakemake and SLURM commands (jobs inherit it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAKEMAKE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if not USE_EXISTING:
        env.pop("SLURM_CONF", None)  # our cluster is configured at the default path
    return env


def snakemake_cmd(workdir: Path, *args: str, limit: int = SNAKEMAKE_LIMIT_S) -> list[str]:
    return [
        "timeout",
        "-s",
        "KILL",
        str(limit),
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(workdir),
        *args,
    ]


def job_counts(output: str) -> dict[str, int]:
    """The first 'Job stats' table of a Snakemake output → {rule: count}."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Job stats:"))
    counts = {}
    for line in lines[start + 3 :]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def workflow_rules() -> set[str]:
    return {
        m.group(1)
        for path in RULES.glob("*.smk")
        for m in re.finditer(r"^rule (\w+):", path.read_text(), re.M)
    }


# --------------------------------------------------------------------------- profiles, no scheduler


def test_slurm_profile_leaves_job_sizes_to_the_resource_table():
    profile = yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert profile["retries"] >= 1 and profile["rerun-incomplete"] and profile["local-cores"] >= 1
    assert (
        "slurm_partition" in profile["default-resources"] and "slurm_account" in profile["default-resources"]
    )
    set_resources = profile.get("set-resources", {})
    # mem_mb, runtime or threads set here would override the resource table for every dataset and
    # model, and the growth of mem_mb/runtime per attempt; the profile says where jobs run.
    sizes = {"mem_mb", "mem", "runtime", "threads"}
    assert not sizes & set(profile["default-resources"])
    for rule, resources in set_resources.items():
        assert rule in workflow_rules(), f"set-resources names unknown rule {rule}"
        assert not sizes & set(resources), f"{rule}: job sizes belong in the config's resource table"
    for rule in ("pretrain_model", "train_task"):
        assert "slurm_partition" in set_resources[rule], f"{rule} needs a partition placeholder"


@pytest.mark.parametrize("profile", [SLURM_PROFILE, GENERIC_PROFILE], ids=["slurm", "generic"])
def test_cluster_profiles_plan_the_miniature_workflow(profile, tmp_path):
    proc = subprocess.run(
        snakemake_cmd(tmp_path, "--profile", str(profile), "--configfile", str(MINI), "-n", limit=180),
        cwd=ROOT,  # the generic profile names its script relative to the repository root
        env=child_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert job_counts(proc.stdout + proc.stderr) == {
        "download_data": 1,  # a local rule: the data is staged on the login node
        "prepare_run": 3,
        "pretrain_model": 1,
        "train_task": 6,
        "compute_metrics": 3,
        "aggregate_results": 1,
        "all": 1,
    }


# ------------------------------------------------------------- generic profile's glue, fake schedulers


def load_cluster_py():
    spec = importlib.util.spec_from_file_location("dmnsp_cluster_glue", CLUSTER_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_scheduler(tmp_path, monkeypatch):
    """Fake qsub/qstat/qacct/bsub/bjobs: each logs its arguments and answers what a test set."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    answers = tmp_path / "answers"
    answers.mkdir()
    calls = tmp_path / "calls.log"
    for name in ("qsub", "qstat", "qacct", "bsub", "bjobs", "qdel", "bkill"):
        script = bin_dir / name
        script.write_text(
            "#!/bin/sh\n"
            f'printf "%s\\n" "{name} $*" >> "{calls}"\n'
            f'[ -f "{answers}/{name}.out" ] && cat "{answers}/{name}.out"\n'
            f'exit "$(cat "{answers}/{name}.rc" 2>/dev/null || echo 0)"\n'
        )
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def answer(name: str, out: str = "", rc: int = 0):
        (answers / f"{name}.out").write_text(out)
        (answers / f"{name}.rc").write_text(str(rc))

    answer.calls = lambda: calls.read_text().splitlines() if calls.exists() else []
    return answer


SUBMIT_CASES = {
    "pbs": (
        "4711.pbs-server\n",
        "4711.pbs-server",
        ["-l select=1:ncpus=4:mem=8000mb:ngpus=1", "walltime=01:30:00", "-V"],
    ),
    "sge": ("4712\n", "4712", ["-terse", "-pe smp 4", "h_vmem=2000M", "h_rt=01:30:00", "gpu=1"]),
    "lsf": (
        "Job <4713> is submitted to queue <normal>.\n",
        "4713",
        ["-n 4", "rusage[mem=8000]", "-W 90", "num=1"],
    ),
}


@pytest.mark.parametrize("scheduler", list(SUBMIT_CASES))
def test_generic_submit_prints_only_the_job_id(scheduler, fake_scheduler, tmp_path):
    out, job_id, expected = SUBMIT_CASES[scheduler]
    submit = "bsub" if scheduler == "lsf" else "qsub"
    fake_scheduler(submit, out)
    args = ["submit", "--scheduler", scheduler, "--name", "dmnsp-train_task", "--threads", "4"]
    args += ["--mem-mb", "8000", "--runtime", "90", "--gpus", "1", "--log-dir", str(tmp_path / "logs")]
    proc = subprocess.run(
        [sys.executable, str(CLUSTER_PY), *args, "job.sh"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{job_id}\n"  # the executor takes the first line as the job id
    (call,) = fake_scheduler.calls()
    assert call.startswith(submit) and call.endswith(" job.sh")
    for piece in expected:
        assert piece in call, (piece, call)


STATUS_CASES = [
    ("pbs", {"qstat": ("Job Id: 1.s\n    job_state = R\n", 0)}, "running"),
    ("pbs", {"qstat": ("Job Id: 1.s\n    job_state = F\n    Exit_status = 0\n", 0)}, "success"),
    ("pbs", {"qstat": ("Job Id: 1.s\n    job_state = F\n    Exit_status = 271\n", 0)}, "failed"),
    ("pbs", {"qstat": ("qstat: Unknown Job Id 1.s\n", 153)}, "failed"),
    ("sge", {"qstat": ("job_number: 1\n", 0)}, "running"),
    ("sge", {"qstat": ("job_number: 1\nerror reason 1: can't chdir\n", 0)}, "failed"),
    ("sge", {"qstat": ("", 1), "qacct": ("failed       0\nexit_status  0\n", 0)}, "success"),
    (
        "sge",
        {"qstat": ("", 1), "qacct": ("failed       100 : assumedly after job\nexit_status  137\n", 0)},
        "failed",
    ),
    ("sge", {"qstat": ("", 1), "qacct": ("error: job id 1 not found\n", 1)}, "failed"),
    ("lsf", {"bjobs": ("RUN -\n", 0)}, "running"),
    ("lsf", {"bjobs": ("PEND -\n", 0)}, "running"),
    ("lsf", {"bjobs": ("DONE -\n", 0)}, "success"),
    ("lsf", {"bjobs": ("EXIT 1\n", 0)}, "failed"),
    ("lsf", {"bjobs": ("Job <1> is not found\n", 255)}, "failed"),
]


@pytest.mark.parametrize(("scheduler", "answers", "expected"), STATUS_CASES)
def test_generic_status_maps_scheduler_states(scheduler, answers, expected, fake_scheduler):
    for name, (out, rc) in answers.items():
        fake_scheduler(name, out, rc)
    glue = load_cluster_py()
    if scheduler == "sge":
        assert glue.sge_status("1", pause=0) == expected
    else:
        assert glue.STATUS[scheduler]("1") == expected


# ------------------------------------------------------------------------------ a real SLURM


def _no_scheduler(reason: str):
    message = f"no SLURM scheduler for the cluster tests: {reason}"
    if REQUIRE_SLURM:
        pytest.fail(message + " (DMNSP_REQUIRE_SLURM=1)")
    pytest.skip(message)


def _alive_pids() -> dict[str, int]:
    pids = {}
    for name in DAEMONS:
        try:
            pid = int((SLURM_DIR / "run" / f"{name}.pid").read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            continue
        pids[name] = pid
    return pids


def _stop_pid(pid: int, grace_s: float = 10):
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


def slurm_cmd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, env=child_env(), timeout=timeout)


@dataclass
class Cluster:
    partition: str
    status_command: str
    cpus: int
    real_memory_mb: int
    started: dict[str, int] = field(default_factory=dict)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A usable SLURM: ours (.ci/slurm_up.sh), started here unless already up, or an existing one."""
    started: dict[str, int] = {}
    if USE_EXISTING:
        if shutil.which("sinfo") is None:
            _no_scheduler("DMNSP_SLURM_EXISTING=1 but there is no sinfo")
    else:
        if os.name != "posix" or os.geteuid() != 0:
            _no_scheduler("starting slurmctld/slurmd/munged needs root")
        before = _alive_pids()
        env = {**child_env(), "DMNSP_SLURM_DIR": str(SLURM_DIR)}
        try:
            proc = subprocess.run(
                ["bash", str(SLURM_UP)], capture_output=True, text=True, env=env, timeout=180
            )
        except subprocess.TimeoutExpired:
            _no_scheduler(".ci/slurm_up.sh did not finish in 180 s")
        after = _alive_pids()
        started = {name: pid for name, pid in after.items() if before.get(name) != pid}
        if proc.returncode != 0:
            for name in DAEMONS:  # whatever it did start before failing
                if name in started:
                    _stop_pid(started[name])
            _no_scheduler(f".ci/slurm_up.sh exited {proc.returncode}: {proc.stderr.strip()[-800:]}")

    partitions = slurm_cmd("sinfo", "--noheader", "--format=%P").stdout.split()
    default = next((p.rstrip("*") for p in partitions if p.endswith("*")), None)
    partition = os.environ.get("DMNSP_SLURM_PARTITION") or default or (partitions[0] if partitions else "")
    if not partition:
        _no_scheduler("sinfo lists no partition")
    sizes = slurm_cmd("sinfo", "--noheader", f"--partition={partition}", "--format=%c %m").stdout.split()
    cpus, memory = int(sizes[0]), int(sizes[1].rstrip("+"))
    # Without slurmdbd, sacct fails ("accounting storage is disabled") and Snakemake's default status
    # command would wait forever: use squeue, which needs finished jobs kept for a while.
    sacct = slurm_cmd("sacct", "--noheader", "-X", "--format=JobID")
    use_sacct = sacct.returncode == 0 and "disabled" not in (sacct.stdout + sacct.stderr).lower()
    if not use_sacct:
        config = slurm_cmd("scontrol", "show", "config").stdout
        age = re.search(r"MinJobAge\s*=\s*(\d+)", config)
        if not age or int(age.group(1)) < 120:
            _no_scheduler(
                f"no accounting and MinJobAge {age and age.group(1)} s < 120 s: no usable status command"
            )
    cluster = Cluster(partition, "sacct" if use_sacct else "squeue", cpus, memory, started)
    yield cluster
    for name in DAEMONS:  # only what this session started, by PID
        if name in started:
            _stop_pid(started[name])
    _remove_stale_conf(started)


def _remove_stale_conf(started: dict[str, int]) -> None:
    """Remove the slurm.conf .ci/slurm_up.sh wrote once our controller is gone: with it and no
    controller every `scontrol` waits ~9 s, and the slurm executor plugin runs `scontrol show
    config` whenever Snakemake starts, so every later Snakemake (later tests) would wait too."""
    conf = Path("/etc/slurm/slurm.conf")
    if "slurmctld" in started and conf.is_file():
        if conf.read_text().startswith("# Generated by dmnsp .ci/slurm_up.sh"):
            conf.unlink()


def miniature_config(path: Path, data_root: Path) -> Path:
    """The miniature config, cut to what fits the time budget: two training runs of two tasks
    from the randomly initialised tiny model (no pretraining job: one scheduling round less)."""
    cfg = yaml.safe_load(MINI.read_text())
    cfg["run"]["dataset_root"] = str(data_root)
    cfg["experiments"]["test"]["methods"] = METHODS
    cfg["experiments"]["test"]["pretrain_first"] = False
    cfg["experiments"]["test"]["run"]["pretrained"] = None  # no weights to download offline
    cfg["resources"] = [{"mem_mb": TEST_MEM_MB, "runtime": TEST_RUNTIME_MIN, "threads": TEST_THREADS}]
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def site_profile(folder: Path, cluster: Cluster) -> Path:
    """The shipped SLURM profile with what a site changes: partition and status command.

    Test-only additions: quick status polling (seconds, not the plugin's 40 s), SLURM logs kept
    for every job, and a short latency wait (one machine, no network file system).
    """
    profile = yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())
    profile["default-resources"]["slurm_partition"] = cluster.partition
    for resources in profile.get("set-resources", {}).values():
        if "slurm_partition" in resources:
            resources["slurm_partition"] = cluster.partition
    profile.update(
        {
            "slurm-status-command": cluster.status_command,
            "slurm-init-seconds-before-status-checks": 2,
            "seconds-between-status-checks": 2,
            "slurm-keep-successful-logs": True,
            "latency-wait": 5,
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return folder


def squeue_records(run_ids: list[str]) -> list[dict[str, str]]:
    """The scheduler's records (finished jobs included) of the jobs Snakemake submitted."""
    keys = ["id", "name", "state", "partition", "min_memory", "time_limit", "cpus", "comment"]
    proc = slurm_cmd("squeue", "--states=all", "--noheader", "--format=%i|%j|%T|%P|%m|%l|%C|%k")
    rows = [line.split("|", len(keys) - 1) for line in proc.stdout.splitlines()]
    records = [dict(zip(keys, row, strict=True)) for row in rows if len(row) == len(keys)]
    return sorted((r for r in records if r.get("name") in run_ids), key=lambda r: int(r["id"]))


def run_id(output: str) -> str:
    match = re.search(r"SLURM run ID: (\S+)", output)
    assert match, f"no SLURM run ID in the Snakemake output:\n{output[-3000:]}"
    return match.group(1)


def mtimes(workdir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(workdir)): p.stat().st_mtime_ns
        for p in (workdir / "results").rglob("*")
        if p.is_file() and p.suffix in (".json", ".pt")
    }


def final_metrics(workdir: Path) -> dict[str, dict]:
    """metrics.json of every run without timing and memory fields (they differ between runs)."""
    out = {}
    for path in sorted((workdir / "results" / "test" / "runs").rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        out[str(path.parent.relative_to(workdir))] = {
            k: v for k, v in metrics.items() if not re.search(r"seconds|time|mem", k)
        }
    return out


@dataclass
class SlurmRun:
    workdir: Path
    reference: Path
    first: str  # output of the run that was preempted twice
    first_rc: int
    second: str  # output of the rerun
    second_rc: int
    run_ids: list[str]  # Snakemake's SLURM run ids (job names), first run then rerun
    cancelled: list[str]  # SLURM job ids cancelled: the task's attempt 1, then its retry
    run_dir: Path  # the run folder of the preempted task
    before_rerun: dict[str, int]  # modification times of results after the first run
    records: list[dict[str, str]]  # the scheduler's records of every job submitted
    seconds: float


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory):
    """The miniature workflow on SLURM with a task preempted twice, then the rerun.

    The first Snakemake runs with --retries 1: the preempted (scancel'ed) train_task job is
    resubmitted automatically, that retry is preempted as well, Snakemake finishes the other run
    and stops with an error; the rerun (the same command, the profile's retries) completes it.
    """
    cluster = slurm_cluster
    assert TEST_THREADS <= cluster.cpus, f"jobs ask for {TEST_THREADS} CPUs; the node has {cluster.cpus}"
    assert grown(TEST_MEM_MB, 3) <= cluster.real_memory_mb, (
        f"jobs and their retries ask for up to {grown(TEST_MEM_MB, 3)} MB; the node has {cluster.real_memory_mb} MB"
    )
    base = tmp_path_factory.mktemp("slurm")
    workdir, reference = base / "cluster", base / "local"
    workdir.mkdir()
    reference.mkdir()
    config = miniature_config(base / "config.yaml", base / "data-cluster")
    local_config = miniature_config(base / "local.yaml", base / "data-local")
    profile = site_profile(base / "profile", cluster)
    env = child_env()
    start = time.monotonic()

    run_ids: list[str] = []
    local = None
    try:
        first_log = base / "first.log"
        with first_log.open("w") as log:
            first = subprocess.Popen(
                snakemake_cmd(
                    workdir, "--profile", str(profile), "--configfile", str(config), "--retries", "1"
                ),
                cwd=workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        cancelled: list[str] = []
        task_log, log_mtime = None, 0
        pattern = re.compile(
            rf"^rule_train_task_wildcards_.*method~{PREEMPTED['method']}_.*_{PREEMPTED['task']}$"
        )
        deadline = time.monotonic() + SNAKEMAKE_LIMIT_S
        while len(cancelled) < 2 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            match = re.search(r"SLURM run ID: (\S+)", first_log.read_text())
            if not match:
                continue
            run_ids[:1] = [match.group(1)]
            for record in squeue_records(run_ids):
                if (
                    record["id"] in cancelled
                    or record["state"] != "RUNNING"
                    or not pattern.match(record["comment"])
                ):
                    continue
                # Preempt mid-task: once the task's command has (re)written its log.
                logs = list(
                    workdir.glob(f"results/test/runs/**/method~{PREEMPTED['method']}/**/logs/train_task1.log")
                )
                if logs and logs[0].stat().st_mtime_ns > log_mtime:
                    task_log, log_mtime = logs[0], logs[0].stat().st_mtime_ns
                    slurm_cmd("scancel", record["id"])
                    cancelled.append(record["id"])
        first_rc = first.wait(timeout=SNAKEMAKE_LIMIT_S)
        first_out = first_log.read_text()
        assert len(cancelled) == 2, (
            f"cancelled {cancelled}, not {PREEMPTED} twice (exit {first_rc}):\n{first_out[-4000:]}"
        )
        before_rerun = mtimes(workdir)

        # The uninterrupted reference runs locally meanwhile (the rerun keeps one CPU busy at most).
        local = subprocess.Popen(
            snakemake_cmd(reference, "--cores", "1", "--configfile", str(local_config)),
            cwd=reference,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # The rerun: the same command a user types again after a preemption.
        second = subprocess.run(
            snakemake_cmd(workdir, "--profile", str(profile), "--configfile", str(config)),
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
        )
        second_out = second.stdout + second.stderr
        run_ids.append(run_id(second_out))
        local_out, _ = local.communicate(timeout=SNAKEMAKE_LIMIT_S)
        seconds = time.monotonic() - start
        assert local.returncode == 0, f"local reference run failed:\n{local_out[-4000:]}"
        records = squeue_records(run_ids)
    finally:
        for name in run_ids:  # nothing of ours stays queued, whatever happened
            slurm_cmd("scancel", f"--name={name}")
        if local is not None and local.poll() is None:
            local.kill()
    print(f"\nSLURM test: {seconds:.0f} s, {len(records)} sbatch submissions", file=sys.stderr)
    return SlurmRun(
        workdir=workdir,
        reference=reference,
        first=first_out,
        first_rc=first_rc,
        second=second_out,
        second_rc=second.returncode,
        run_ids=run_ids,
        cancelled=cancelled,
        run_dir=task_log.parent.parent,
        before_rerun=before_rerun,
        records=records,
        seconds=seconds,
    )


def rule_of(record: dict[str, str]) -> str:
    return re.match(r"rule_(\w+?)_wildcards_", record["comment"]).group(1)


@pytest.mark.cluster
def test_jobs_go_through_sbatch_with_the_resource_table(slurm_run, slurm_cluster):
    run = slurm_run
    assert run.second_rc == 0, run.second[-4000:]
    tables = run.workdir / "results" / "test" / "tables"
    for name in ("summary.csv", "summary.md", "summary.tex", "runs.csv", "hyperparameters.csv"):
        assert (tables / name).is_file(), name
    assert list((run.workdir / "results" / "test" / "plots").glob("*.png"))

    first, second = run.run_ids
    by_run = {rid: sorted(rule_of(r) for r in run.records if r["name"] == rid) for rid in run.run_ids}
    # Every training task once, plus the preempted task's retry; localrules (all, prepare_run,
    # compute_metrics) never reach the scheduler.
    assert by_run[first] == ["train_task"] * (2 * len(METHODS) + 1)
    assert by_run[second] == ["aggregate_results", "train_task"]
    retry = run.cancelled[1]
    for record in run.records:
        attempt = 2 if record["id"] == retry else 1
        assert record["partition"] == slurm_cluster.partition  # the site's partition → -p
        # The resource table's mem_mb → --mem, runtime → --time, threads → --cpus-per-task.
        grow = grown if ATTEMPT_AWARE else (lambda value, attempt: value)
        mem, runtime = grow(TEST_MEM_MB, attempt), grow(TEST_RUNTIME_MIN, attempt)
        assert (record["min_memory"], record["time_limit"]) == (f"{mem}M", f"{runtime}:00"), record
        assert record["cpus"] == str(TEST_THREADS)
        assert record["state"] == ("CANCELLED" if record["id"] in run.cancelled else "COMPLETED"), record
        # The plugin's own record of each submission: one SLURM log per job id.
        assert list((run.workdir / ".snakemake" / "slurm_logs").rglob(f"{record['id']}.log")), record
    ctld_log = SLURM_DIR / "log" / "slurmctld.log"
    if not USE_EXISTING and ctld_log.is_file():
        submitted = set(re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", ctld_log.read_text()))
        assert {r["id"] for r in run.records} <= submitted


@pytest.mark.cluster
def test_a_preempted_task_resumes_from_the_last_finished_task(slurm_run):
    run = slurm_run
    # Attempt 1 preempted → resubmitted by Snakemake (--retries); the retry preempted → Snakemake
    # gives up on that run, finishes the others and exits with an error.
    for job_id in run.cancelled:
        assert f"SLURM-job '{job_id}' failed, SLURM status is: 'CANCELLED'" in run.first
    assert run.first_rc != 0
    task0, task1 = run.run_dir / "task0", run.run_dir / "task1"
    rel = lambda p: str(p.relative_to(run.workdir))  # noqa: E731
    # Task 0 stayed finished (with the checkpoint task 1 resumes from); task 1 left nothing behind.
    assert rel(task0 / "eval.json") in run.before_rerun
    assert rel(task0 / "checkpoint.pt") in run.before_rerun
    assert not [p for p in run.before_rerun if p.startswith(rel(task1))]
    # The rerun ran only the preempted task, resuming from task 0's checkpoint, and what follows it.
    counts = job_counts(run.second)
    assert counts == {"train_task": 1, "compute_metrics": 1, "aggregate_results": 1, "all": 1}, counts
    assert f"--resume {rel(task0 / 'checkpoint.pt')}" in run.second
    # Nothing finished was redone: every evaluation and model kept its modification time.
    for path, mtime in run.before_rerun.items():
        if (run.workdir / path).exists():  # temporary checkpoints go once their last user is done
            assert (run.workdir / path).stat().st_mtime_ns == mtime, f"{path} was rewritten"
    assert not (run.workdir / rel(task0 / "checkpoint.pt")).exists()  # keep_checkpoints: false


@pytest.mark.cluster
def test_cluster_results_equal_an_uninterrupted_local_run(slurm_run):
    resumed, reference = final_metrics(slurm_run.workdir), final_metrics(slurm_run.reference)
    assert len(reference) == len(METHODS) and resumed.keys() == reference.keys()
    for run_dir, metrics in reference.items():
        assert resumed[run_dir] == metrics, run_dir
