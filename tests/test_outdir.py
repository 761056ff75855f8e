"""Output folders are guarded: finished results are never replaced silently.

``dmnsp run --out-dir`` holds an exclusive lock on its folder (a second process is refused, naming
the holder), refuses a folder that holds another config's results or this config's finished ones
unless ``--overwrite`` (which clears them first: no stale file survives), and ``train-task`` never
writes into its ``--resume`` folder or over another task. Stale locks (a killed holder) are taken over.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import mini_run_config

from dmnsp import guard, layout
from dmnsp.cli import main
from dmnsp.config import load_config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return mini_run_config(tmp_path_factory.mktemp("outdir"), method="finetune")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dmnsp(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dmnsp", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


# ------------------------------------------------------------------------------- the lock
def test_a_held_folder_refuses_a_second_process_naming_the_holder(config, tmp_path):
    out = tmp_path / "run"
    with guard.locked(out, "dmnsp run"):
        lock = json.loads((out / layout.LOCK).read_text())
        assert lock["pid"] == os.getpid() and lock["command"] == "dmnsp run"
        proc = dmnsp("run", "--quiet", "--config", str(config), "--out-dir", str(out))
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err
    assert f"{out} is in use by another dmnsp process (pid {os.getpid()} on host" in err
    assert "wait for it to finish or choose another output folder" in err
    assert not (out / layout.LOCK).exists()  # released on exit, and the refused process left it alone
    assert layout.run_results(out) == []


def test_two_concurrent_runs_into_one_folder_one_is_refused(config, tmp_path):
    out = tmp_path / "run"
    procs = [dmnsp("run", "--quiet", "--config", str(config), "--out-dir", str(out)) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    assert "is in use by another dmnsp process" in refused
    assert json.loads((out / layout.METRICS).read_text())["complete"] is True
    assert not (out / layout.LOCK).exists()


def test_a_stale_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = {"pid": 999999, "host": "gone", "command": "dmnsp run", "started": time.time() - 60}
    (out / layout.LOCK).write_text(json.dumps(dead))  # left by a killed process: no flock held
    with guard.locked(out):
        assert json.loads((out / layout.LOCK).read_text())["pid"] == os.getpid()
    assert "pid 999999 on host gone" in capsys.readouterr().err
    assert not (out / layout.LOCK).exists()


def test_the_lock_is_released_when_the_command_fails(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError), guard.locked(out):
        raise RuntimeError("the run failed")
    assert not out.exists()  # it created the folder and wrote nothing: nothing is left
    with guard.locked(out):  # and the folder can be locked again
        pass


# ------------------------------------------------------------------------------- another config's results
def finished_folder(root: Path, cfg: dict, n_tasks: int) -> Path:
    """A folder holding the finished results of ``cfg`` (hand-made records, n_tasks tasks)."""
    layout.write_run_info(root, cfg, experiment="cli", label="finetune", settings={})
    for t in range(n_tasks):
        row = {"task": t, "n_tasks": n_tasks, "accuracy_per_task": [0.5] * (t + 1), "accuracy": 0.5}
        (root / f"task{t}").mkdir()
        (root / f"task{t}" / "eval.json").write_text(json.dumps({**row, "n_samples": 10}))
        (root / f"task{t}" / "checkpoint.pt").write_bytes(b"task state")
    layout.write_run_metrics(root)
    return root


def test_a_folder_of_another_config_is_refused_then_overwritten_on_request(config, tmp_path, capsys):
    five = load_config(config, {"initial_increment": 2, "increment": 2})  # the 5-task config
    out = finished_folder(tmp_path / "run", five, 5)
    before = snapshot(out)
    assert main(["run", "--quiet", "--config", str(config), "--out-dir", str(out)]) == 2
    err = one_line_error(capsys)
    assert (
        f"{out} holds results of another config (config_hash {layout.read_run_info(out)['config_hash']}"
        in err
    )
    assert "increment: 2 != 5" in err and "--overwrite" in err
    assert snapshot(out) == before  # nothing touched
    assert main(["run", "--quiet", "--config", str(config), "--out-dir", str(out), "--overwrite"]) == 0
    metrics = json.loads((out / layout.METRICS).read_text())
    assert metrics["n_tasks"] == 2 and metrics["complete"] is True
    assert [t for t, _ in layout.task_dirs(out)] == [0, 1]  # tasks 2-4 of the old run are gone
    assert layout.read_run_config(out)["increment"] == 5


def test_finished_results_of_the_same_config_need_overwrite(config, tmp_path, capsys):
    cfg = load_config(config)
    out = finished_folder(tmp_path / "run", cfg, 2)
    before = snapshot(out)
    assert main(["run", "--quiet", "--config", str(config), "--out-dir", str(out)]) == 2
    assert "already holds the finished results of this config" in one_line_error(capsys)
    assert snapshot(out) == before


def test_unfinished_results_of_the_same_config_restart_the_run(config, tmp_path, capsys):
    cfg = load_config(config)
    out = finished_folder(tmp_path / "run", cfg, 2)
    (out / "task1" / "eval.json").unlink()  # killed during task 1
    (out / layout.METRICS).unlink()
    assert main(["run", "--quiet", "--config", str(config), "--out-dir", str(out)]) == 0
    assert "holds unfinished results of this config: starting the run again" in capsys.readouterr().err
    assert (out / "task0" / "checkpoint.pt").read_bytes() != b"task state"  # rewritten by the run
    assert json.loads((out / layout.METRICS).read_text())["complete"] is True


def test_a_damaged_run_json_counts_as_another_config(config, tmp_path, capsys):
    out = finished_folder(tmp_path / "run", load_config(config), 2)
    (out / layout.RUN_INFO).write_bytes(b"\xff\xfe not json")
    assert main(["run", "--quiet", "--config", str(config), "--out-dir", str(out)]) == 2
    assert "holds results of an unknown config (no readable run.json)" in one_line_error(capsys)


# ------------------------------------------------------------------------------- train-task
def test_train_task_never_writes_into_its_resume_folder(config, tmp_path, capsys):
    out = finished_folder(tmp_path / "run", load_config(config), 2)
    before = snapshot(out)
    resume = str(out / "task0" / "checkpoint.pt")
    argv = ["train-task", "--quiet", "--config", str(config), "--task", "1", "--resume", resume]
    assert main([*argv, "--out-dir", str(out / "task0")]) == 2
    err = one_line_error(capsys)
    assert "is the folder of the --resume checkpoint" in err and f"{out}/task1" in err
    # Another task's finished folder is refused too (here task 0's, resuming from elsewhere).
    other = tmp_path / "elsewhere.pt"
    other.write_bytes(b"x")
    argv[-1] = str(other)
    assert main([*argv, "--out-dir", str(out / "task0")]) == 2
    assert "holds the results of task 0" in one_line_error(capsys)
    assert snapshot(out) == before
