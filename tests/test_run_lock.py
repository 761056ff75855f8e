"""Locks, folders and run integrity (issue 17), tried as a user or an attacker would.

* The lock file is never followed: a ``.dmnsp.lock`` that is a symbolic link (to someone's file,
  dangling, to a folder), a hard link, a FIFO or a folder is refused in one line, and whatever it
  points to is left as it was; a read-only folder is one line too.
* One lock for a run: every writer of a run folder (``run``, ``run --overwrite``, chunk jobs
  ``train-task --tasks``, one-task jobs ``train-task --task T --out-dir RUN/taskT``,
  ``prepare-run``, ``metrics``) takes the run folder's lock, so while one real process writes a
  run every other is refused, naming the holder, and the run's files stay as they were.
* ``--overwrite`` (and a restarted run) removes links, never what they point to.
* ``train-task`` refuses another config's finished task folder, naming both configs.
* A run killed at the end (between its last ``eval.json`` and ``metrics.json``) finishes on the
  rerun without training again.
* Empty or blank paths are refused in one line by every command.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import mini_run_config

from dmnsp import guard, layout
from dmnsp.checkpoint import TaskState, save_checkpoint
from dmnsp.cli import main
from dmnsp.config import ConfigError, config_hash, load_config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def snapshot(folder: Path) -> dict[str, object]:
    """Every entry under ``folder`` (links as their target, never followed), the lock file aside."""
    found: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.name == layout.LOCK:
            continue
        if path.is_symlink():
            found[rel] = ("link", os.readlink(path))
        elif path.is_file():
            found[rel] = path.read_bytes()
        elif path.is_dir():
            found[rel] = "dir"
    return found


def dmnsp(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dmnsp", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return mini_run_config(tmp_path_factory.mktemp("runlock"), method="finetune")


@pytest.fixture(scope="module")
def started(config, tmp_path_factory) -> Path:
    """A run folder as the workflow leaves it after its first job: config.yaml and run.json
    (prepare-run), task0 finished by a real one-task job; task 1 still to train."""
    run = tmp_path_factory.mktemp("started") / "run"
    argv = ["prepare-run", "--config", str(config), "--experiment", "cli", "--out-dir", str(run)]
    assert main(argv) == 0
    argv = ["train-task", "--quiet", "--config", str(config), "--task", "0", "--out-dir", str(run / "task0")]
    assert main(argv) == 0
    return run


def copy_of(started: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(started, run, symlinks=True)
    return run


# ------------------------------------------------------------------------------- lock files not ours
@pytest.mark.parametrize("kind", ["file", "dangling", "folder"])
def test_a_symlinked_lock_file_is_refused_and_never_followed(config, tmp_path, capsys, kind):
    """``.dmnsp.lock`` a link to someone's file (before: overwritten with the lock record and the
    link deleted on exit; a real process), dangling (before: its target was created), or to a
    folder: refused in one line, the link and its target kept."""
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "someone" / "precious.txt"
    victim.parent.mkdir()
    if kind == "file":
        victim.write_text("someone's data\n")
        target = victim
    elif kind == "folder":
        target = victim.parent
    else:
        target = tmp_path / "someone" / "not-yet.txt"
    (out / layout.LOCK).symlink_to(target)
    before = snapshot(tmp_path)
    argv = ["run", "--quiet", "--config", str(config), "--out-dir", str(out)]
    if kind == "file":
        rc, err = finish(dmnsp(*argv))
        assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    else:
        assert main(argv) == 2
        err = one_line_error(capsys)
    assert f"{out / layout.LOCK} is a symbolic link (to {target})" in err and "remove the link" in err
    assert snapshot(tmp_path) == before  # the target untouched (or not created), the link still there


def test_a_lock_file_with_another_name_elsewhere_is_refused(tmp_path, capsys):
    """A hard link shares someone's file under the lock's name: truncating it would destroy theirs."""
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("someone's data\n")
    os.link(victim, out / layout.LOCK)
    assert main(["metrics", "--run-dir", str(out)]) == 2
    err = one_line_error(capsys)
    assert f"{out / layout.LOCK} has 2 hard links" in err
    assert victim.read_text() == "someone's data\n" and (out / layout.LOCK).exists()


def test_a_fifo_at_the_lock_path_is_refused_without_blocking(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / layout.LOCK)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"is not a regular file .*remove it"):
        with guard.locked(out):
            pass
    assert time.monotonic() - t0 < 10 and (out / layout.LOCK).exists()


def test_a_lock_path_that_is_a_folder_is_one_line(config, tmp_path, capsys):
    out = tmp_path / "run"
    (out / layout.LOCK / "inside").mkdir(parents=True)
    assert main(["run", "--quiet", "--config", str(config), "--out-dir", str(out)]) == 2
    err = one_line_error(capsys)
    assert f"{out / layout.LOCK} is a folder, not dmnsp's lock file" in err and "remove it" in err
    assert (out / layout.LOCK / "inside").is_dir()


@pytest.mark.parametrize(
    ("code", "needle"),
    [
        (errno.EROFS, "read-only file system; choose an output folder on a writable file system"),
        (errno.EACCES, "permission denied; make"),
        (errno.ENOSPC, "No space left on device"),
    ],
)
def test_a_lock_file_that_cannot_be_created_is_one_line(config, tmp_path, monkeypatch, capsys, code, needle):
    out = tmp_path / "run"
    out.mkdir()
    real = os.open

    def refuse(path, flags, *args, **kwargs):
        if str(path).endswith(layout.LOCK):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(guard.os, "open", refuse)
    assert main(["run", "--quiet", "--config", str(config), "--out-dir", str(out)]) == 2
    err = one_line_error(capsys)
    assert str(out / layout.LOCK) in err and needle in err
    assert list(out.iterdir()) == []


def _read_only_mounts() -> bool:
    probe = Path("/tmp") / f"dmnsp-ro-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        cmd = f"mount -t tmpfs tmpfs {probe} && mount -o remount,ro {probe}"
        return subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True).returncode == 0
    except OSError:
        return False
    finally:
        probe.rmdir()


@pytest.mark.skipif(not _read_only_mounts(), reason="no user+mount namespaces (unshare -rm) on this machine")
def test_a_real_read_only_mount_is_one_line(config, tmp_path):
    """A tmpfs remounted read-only in a private mount namespace: the run folder exists there (a
    finished run copied to read-only storage), and nothing can be created in it."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (
        f"mount -t tmpfs tmpfs {mnt} && mkdir {mnt}/run && mount -o remount,ro {mnt} && "
        f"exec {sys.executable} -m dmnsp run --quiet --config {config} --out-dir {mnt}/run"
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=ENV)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"cannot create the lock file {mnt}/run/{layout.LOCK}" in err and "read-only file system" in err


def test_a_hostile_holder_record_is_described_in_one_line(config, tmp_path, capsys):
    """Whoever holds the lock, the refusal is one line: a record with a newline in its command, a
    start time that is not a number, or no JSON at all."""
    out = tmp_path / "run"
    out.mkdir()
    for record in (
        {"pid": 7, "host": "h\nx", "command": "evil\n\nlines", "started": "never"},
        {"pid": "1", "started": 1e300},
        "[" * 5000,
    ):
        fd = os.open(out / layout.LOCK, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, (record if isinstance(record, str) else json.dumps(record)).encode())
            fcntl.flock(fd, fcntl.LOCK_EX)
            assert main(["run", "--quiet", "--config", str(config), "--out-dir", str(out)]) == 2
            assert f"{out} is in use by another dmnsp process" in one_line_error(capsys)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------- one lock per run
#: Every writer of a run folder, the workflow's one-task job first.
WRITERS = {
    "train-task --task 1": lambda c, r: [
        *("train-task", "--quiet", "--config", c, "--task", "1"),
        *("--resume", f"{r}/task0/checkpoint.pt", "--out-dir", f"{r}/task1"),
    ],
    "train-task --tasks 1-1": lambda c, r: [
        *("train-task", "--quiet", "--config", c, "--tasks", "1-1"),
        *("--resume", f"{r}/task0/checkpoint.pt", "--run-dir", r),
    ],
    "run": lambda c, r: ["run", "--quiet", "--config", c, "--out-dir", r],
    "run --overwrite": lambda c, r: ["run", "--quiet", "--config", c, "--out-dir", r, "--overwrite"],
    "prepare-run": lambda c, r: ["prepare-run", "--config", c, "--experiment", "cli", "--out-dir", r],
    "metrics": lambda c, r: ["metrics", "--run-dir", r],
}
TRAINERS = list(WRITERS)[:4]


def _hold(run: Path, proc: subprocess.Popen) -> None:
    """Wait until ``proc`` holds ``run``'s lock, then stop it there (it keeps the lock)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if json.loads((run / layout.LOCK).read_text()).get("pid") == proc.pid:
                proc.send_signal(signal.SIGSTOP)
                return
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    raise AssertionError(f"{proc.args} never took the lock of {run}")


@pytest.mark.parametrize("holder", TRAINERS)
def test_no_two_writers_of_a_run_at_once(config, started, tmp_path, holder):
    """A real process writes the run (stopped while it holds the lock); another writer started
    meanwhile is refused naming it, and the run's files stay as the holder left them: every pair
    of the four training writers once (the holder against itself and those after it), and with the
    workflow's one-task job holding, every writer. That case is the workflow training the run
    while a user starts ``dmnsp run --out-dir`` on it: before, the run deleted task 0's files."""
    run = copy_of(started, tmp_path)
    proc = dmnsp(*WRITERS[holder](str(config), str(run)))
    try:
        _hold(run, proc)
        before = snapshot(run)
        names = list(WRITERS) if holder == TRAINERS[0] else TRAINERS[TRAINERS.index(holder) :]
        others = {name: dmnsp(*WRITERS[name](str(config), str(run))) for name in names}
        for name, other in others.items():
            rc, err = finish(other)
            assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (name, err)
            assert f"{run} is in use by another dmnsp process (pid {proc.pid} on host" in err, (name, err)
            assert f"`dmnsp {holder}`" in err, (name, err)
        assert snapshot(run) == before
        if holder == TRAINERS[0]:  # the job goes on, unharmed, and releases the lock
            assert (run / "task0" / "checkpoint.pt").read_bytes() == (
                started / "task0/checkpoint.pt"
            ).read_bytes()
            proc.send_signal(signal.SIGCONT)
            rc, err = finish(proc)
            assert rc == 0, err
            assert json.loads((run / "task1" / layout.EVAL).read_text())["task"] == 1
            assert not (run / layout.LOCK).exists()
    finally:
        proc.kill()
        proc.wait()


def test_each_writer_locks_the_run_folder_not_the_task_folder(config, tmp_path):
    """Which folder a job locks: a one-task job's ``--out-dir RUN/task<t>`` (or ``--run-dir``) locks RUN;
    an ``--out-dir`` that is not a task folder is locked itself."""
    assert guard.run_lock_folder(tmp_path / "r" / "task3") == tmp_path / "r"
    assert guard.run_lock_folder(tmp_path / "r" / "task3/") == tmp_path / "r"
    assert guard.run_lock_folder(tmp_path / "mine") == tmp_path / "mine"
    assert guard.run_lock_folder(tmp_path / "r" / "task3x") == tmp_path / "r" / "task3x"


# ------------------------------------------------------------------------------- --overwrite and links
def _another_configs_run(root: Path, cfg: dict, outside: Path) -> Path:
    """A finished folder of ``cfg`` whose task0 is a link to a folder outside, whose task1's
    checkpoint is a link to a file outside, and whose metrics.json is a link to a file outside."""
    layout.write_run_info(root, cfg, experiment="cli", label="finetune", settings={})
    outside.mkdir()
    (outside / "keep.txt").write_text("not dmnsp's\n")
    (outside / "mine.pt").write_text("someone's checkpoint\n")
    (outside / "metrics.txt").write_text("someone's metrics\n")
    (outside / "task0").mkdir()
    (root / "task0").symlink_to(outside / "task0")
    (root / "task1").mkdir()
    (root / "task1" / layout.CHECKPOINT).symlink_to(outside / "mine.pt")
    (root / "task2").symlink_to(root)  # a loop
    for t in range(2):
        row = {
            "task": t,
            "n_tasks": 2,
            "accuracy_per_task": [0.5] * (t + 1),
            "accuracy": 0.5,
            "n_samples": 10,
        }
        (root / f"task{t}" / layout.EVAL).write_text(json.dumps(row))
    (outside / "task0" / "keep.txt").write_text("not dmnsp's either\n")
    (root / layout.METRICS).symlink_to(outside / "metrics.txt")
    return root


def test_overwrite_removes_links_never_their_targets(config, tmp_path, capsys):
    other = load_config(config, {"seed": 3})
    outside = tmp_path / "outside"
    run = _another_configs_run(tmp_path / "run", other, outside)
    before = snapshot(outside)
    assert main(["run", "--quiet", "--config", str(config), "--out-dir", str(run), "--overwrite"]) == 0
    assert snapshot(outside) == before  # every file the links pointed to is as it was
    assert not any(p.is_symlink() for p in run.rglob("*")), list(run.rglob("*"))
    assert sorted(t for t, _ in layout.task_dirs(run)) == [0, 1]
    assert json.loads((run / layout.METRICS).read_text())["complete"] is True


def test_clear_run_unlinks_links_only(tmp_path):
    outside = tmp_path / "outside"
    run = _another_configs_run(tmp_path / "run", load_config(None), outside)
    (run / "task5").symlink_to(tmp_path / "nowhere")  # dangling
    (run / "notes.txt").write_text("the user's own file\n")
    before = snapshot(outside)
    layout.clear_run(run)
    assert snapshot(outside) == before
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------------------- another config's task
def test_train_task_refuses_another_configs_finished_task_folder(config, started, tmp_path, capsys):
    run = copy_of(started, tmp_path)
    before = snapshot(run)
    mine = config_hash(load_config(config))
    theirs = config_hash(load_config(config, {"seed": 7}))
    argv = ["train-task", "--quiet", "--config", str(config), "--set", "seed=7", "--task", "0"]
    assert main([*argv, "--out-dir", str(run / "task0")]) == 2
    err = one_line_error(capsys)
    assert f"{run / 'task0'} holds the finished task 0 of another config (config_hash {mine}" in err
    assert f"this config's is {theirs}" in err and f"delete {run / 'task0'}" in err
    # ... and as a chunk job: --tasks 0-1 --run-dir over the same folder
    chunk = ["train-task", "--quiet", "--config", str(config), "--set", "seed=7", "--tasks", "0-1"]
    assert main([*chunk, "--run-dir", str(run)]) == 2
    assert f"{run / 'task0'} holds the finished task 0 of another config" in one_line_error(capsys)
    assert snapshot(run) == before


def test_a_task_folder_without_a_recorded_config_hash_is_checked_by_its_checkpoint(config, tmp_path, capsys):
    """An eval.json written before config hashes were recorded: the checkpoint beside it decides;
    without one, the folder is of an unknown config and refused too."""
    cfg, other = load_config(config), load_config(config, {"seed": 7})
    folder = tmp_path / "run" / "task0"
    folder.mkdir(parents=True)
    row = {"task": 0, "n_tasks": 2, "accuracy_per_task": [0.5], "accuracy": 0.5, "n_samples": 10}
    (folder / layout.EVAL).write_text(json.dumps(row))
    save_checkpoint(folder / layout.CHECKPOINT, TaskState(0, {}, {}, [0, 1]), other)
    with pytest.raises(ConfigError, match=r"holds the finished task 0 of another config .*seed: 7 != 0"):
        guard.check_task_dir(folder, 0, None, cfg)
    guard.check_task_dir(folder, 0, None, other)  # its own config may train it again
    (folder / layout.CHECKPOINT).unlink()
    with pytest.raises(ConfigError, match=r"holds the finished task 0 of an unknown config"):
        guard.check_task_dir(folder, 0, None, cfg)
    (folder / layout.EVAL).write_text(json.dumps({**row, "config_hash": config_hash(cfg)}))
    guard.check_task_dir(folder, 0, None, cfg)  # the same config: a rerun of the same job


# ------------------------------------------------------------------------------- killed at the end
KILL_BEFORE = """
import os, signal, sys
import dmnsp.layout as layout
from dmnsp.cli import main

victim = sys.argv[1]
for name in ("atomic_write_json", "atomic_write_text"):
    def write(path, obj, _real=getattr(layout, name)):
        if os.path.basename(path) == victim:
            os.kill(os.getpid(), signal.SIGKILL)
        return _real(path, obj)
    setattr(layout, name, write)
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("victim", [layout.MATRIX, layout.METRICS])
def test_a_run_killed_before_its_metrics_finishes_on_the_rerun(config, tmp_path, capsys, victim):
    """SIGKILL right before ``dmnsp run`` writes accuracy_matrix.csv (or metrics.json, the matrix
    written): every task is finished; the rerun writes the run's end files, trains nothing."""
    run = tmp_path / "run"
    argv = ["run", "--quiet", "--config", str(config), "--out-dir", str(run)]
    proc = subprocess.run([sys.executable, "-c", KILL_BEFORE, victim, *argv], env=ENV, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert not (run / layout.METRICS).exists() and (run / "task1" / layout.EVAL).is_file()
    assert (run / layout.MATRIX).exists() == (victim == layout.METRICS)
    tasks = {p: p.stat().st_mtime_ns for p in run.glob("task*/*")}
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "holds the finished tasks of this config without" in captured.err
    assert "taking the lock over" in captured.err and "Avg " in captured.out
    assert {p: p.stat().st_mtime_ns for p in run.glob("task*/*")} == tasks  # nothing trained again
    metrics = json.loads((run / layout.METRICS).read_text())
    assert metrics["complete"] is True and metrics["n_tasks_done"] == 2
    assert (run / layout.MATRIX).read_text().count("\n") == 3
    assert main(argv) == 2  # now finished: as before, only --overwrite runs it again
    assert "already holds the finished results of this config" in one_line_error(capsys)


def test_clear_run_removes_tasks_before_the_run_record(tmp_path, monkeypatch):
    """A restart killed while it clears the folder leaves the run record last, so the rerun still
    sees this config's unfinished run (not results of an unknown config needing --overwrite)."""
    run = tmp_path / "run"
    cfg = load_config(None)
    layout.write_run_info(run, cfg, experiment="cli", label="x", settings={})
    for t in range(2):
        (run / f"task{t}").mkdir()
        (run / f"task{t}" / layout.EVAL).write_text(json.dumps({"task": t}))
    for name in layout.RUN_END_FILES:
        (run / name).write_text("of the old run\n")
    removed: list[str] = []
    real = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda p, *a, **k: (removed.append(Path(p).name), real(p, *a, **k)))
    real_unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", lambda p, *a, **k: (removed.append(p.name), real_unlink(p, *a, **k)))
    layout.clear_run(run)
    assert set(removed[:2]) == {"task0", "task1"}
    assert removed[2:] == [*layout.RUN_END_FILES, layout.CONFIG, layout.RUN_INFO]


# ------------------------------------------------------------------------------- empty paths
EMPTY = [
    ["run", "--config", "{config}", "--out-dir", ""],
    ["run", "--config", "{config}", "--out-dir", "  "],
    ["run", "--config", ""],
    ["train-task", "--config", "{config}", "--task", "0", "--out-dir", ""],
    ["train-task", "--config", "{config}", "--tasks", "0-1", "--run-dir", " "],
    ["train-task", "--config", "{config}", "--task", "1", "--resume", "", "--out-dir", "t1"],
    ["evaluate", "--config", "{config}", "--checkpoint", ""],
    ["evaluate", "--config", "{config}", "--checkpoint", "c.pt", "--out", "\t"],
    ["pretrain", "--config", "{config}", "--out", ""],
    ["prepare-run", "--experiment", "x", "--out-dir", ""],
    ["metrics", "--run-dir", ""],
    ["report-artifacts", "--runs", "r", "", "--tables-dir", "t", "--plots-dir", "p"],
    ["report-artifacts", "--runs", "r", "--tables-dir", "t", "--plots-dir", " "],
    ["import-config", ""],
    ["import-config", "h.yaml", "--out", ""],
    ["search-create", "--spec", ""],
    ["search-export", "--spec", "s.yaml", "--out-dir", ""],
    ["search-prepare-run", "--best", "", "--settings-json", "{{}}", "--experiment", "x", "--out-dir", "o"],
]


@pytest.mark.parametrize(
    "argv", EMPTY, ids=lambda a: f"{a[0]} {' '.join(x for x in a if x.startswith('--'))}"
)
def test_an_empty_path_is_refused_in_one_line(config, tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(config=config) for a in argv]
    blank = next(i for i, a in enumerate(argv) if i > 0 and not a.strip())
    option = argv[blank - 1] if argv[blank - 1].startswith("--") and blank > 0 else None
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "is empty" in err and "give a path" in err, err
    if option is not None and option != "--runs":
        assert f"{option} is empty" in err
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing run
