"""Remaining hostile input of issue 12: crafted checkpoints with a valid checksum but adapters or
bases that do not fit the model, disk full while the results stage writes tables and plots, and
damaged run records in the results stage. Each is one line (exit 2), and no finished file is lost."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from fakes import mini_run_config

import dmnsp.io as dio
from dmnsp import layout
from dmnsp.checkpoint import load_checkpoint, save_checkpoint
from dmnsp.cli import main
from dmnsp.config import load_config


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def task0(tmp_path_factory) -> tuple[Path, Path]:
    """A run config and its real task-0 folder (checkpoint with dmnsp bases)."""
    root = tmp_path_factory.mktemp("guards")
    config = mini_run_config(root, method="dmnsp")
    out = root / "run" / "task0"
    assert main(["train-task", "--quiet", "--config", str(config), "--task", "0", "--out-dir", str(out)]) == 0
    return config, out / "checkpoint.pt"


def _crafted(tmp_path: Path, config: Path, checkpoint: Path, alter) -> Path:
    """The task-0 state altered by ``alter`` and saved again: a valid checksum and config hash."""
    cfg = load_config(config)
    state = load_checkpoint(checkpoint, cfg, expect_task=0)
    alter(state)
    path = tmp_path / "crafted" / "checkpoint.pt"
    save_checkpoint(path, state, cfg)
    load_checkpoint(path, cfg, expect_task=0)  # the file itself reads fine
    return path


def _rename(state) -> None:
    name = sorted(state.adapters)[0]
    state.adapters[name.replace("adapter", "adaptor")] = state.adapters.pop(name)


def _reshape(state) -> None:
    name = sorted(k for k in state.adapters if k.endswith("down.weight"))[0]
    state.adapters[name] = torch.zeros(8, state.adapters[name].shape[1])


def _basis_rows(state) -> None:  # every layer alike (the reader checks that the rows agree)
    state.bases["visual"] = [v[:-1] for v in state.bases["visual"]]


def _basis_layers(state) -> None:
    state.bases["visual"] = state.bases["visual"][:-1]


@pytest.mark.parametrize(
    ("alter", "needle"),
    [
        (_rename, "adapter names differ (missing ["),
        (_reshape, "is [8, 64], the model's is [4, 64]"),
        (_basis_rows, "visual basis 0 has 63 rows, the adapter's width is 64"),
        (_basis_layers, "11 visual bases for 12 layers"),
    ],
)
def test_a_crafted_checkpoint_is_one_line_naming_file_and_fix(task0, tmp_path, capsys, alter, needle):
    config, checkpoint = task0
    crafted = _crafted(tmp_path, config, checkpoint, alter)
    argv = ["train-task", "--quiet", "--config", str(config), "--task", "1", "--resume", str(crafted)]
    assert main([*argv, "--out-dir", str(tmp_path / "task1")]) == 2
    err = one_line_error(capsys)
    assert f"checkpoint {crafted} does not fit dmnsp-tiny with adapter_dim 4" in err and needle in err
    assert "delete it and rerun task 0" in err
    assert not (tmp_path / "task1").exists()
    assert main(["evaluate", "--quiet", "--config", str(config), "--checkpoint", str(crafted)]) == 2
    assert needle in one_line_error(capsys)


# ------------------------------------------------------------------------------- results stage
def _run(root: Path, method: str, level: float) -> Path:
    root.mkdir(parents=True)
    config = {"dataset": "cifar100", "initial_increment": 10, "increment": 10, "method": method, "seed": 0}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    for t in range(2):
        row = {"task": t, "n_tasks": 2, "accuracy_per_task": [level] * (t + 1), "accuracy": level}
        (root / f"task{t}").mkdir()
        (root / f"task{t}" / "eval.json").write_text(json.dumps({**row, "n_samples": 20 * (t + 1)}))
    return root


@pytest.fixture
def finished_stage(tmp_path) -> tuple[list[str], Path, dict[str, bytes]]:
    """Two runs and a results stage written once (the earlier, finished files)."""
    runs = [str(_run(tmp_path / "runs" / m, m, level)) for m, level in (("finetune", 0.5), ("dmnsp", 0.7))]
    argv = ["report-artifacts", "--runs", *runs, "--tables-dir", str(tmp_path / "t"), "--plots-dir"]
    assert main([*argv, str(tmp_path / "p")]) == 0
    files = {p.name: p.read_bytes() for folder in ("t", "p") for p in (tmp_path / folder).iterdir()}
    # A new result arrives: the next aggregate would change the tables and the plots.
    (Path(runs[1]) / "task1" / "eval.json").write_text(
        json.dumps(
            {"task": 1, "n_tasks": 2, "accuracy_per_task": [0.9, 0.9], "accuracy": 0.9, "n_samples": 40}
        )
    )
    return [*argv, str(tmp_path / "p")], tmp_path, files


def _fail_fsync_of(monkeypatch, fragment: str) -> None:
    """The disk fills up while ``fragment``'s temporary file is synced (dmnsp.io's last step)."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if fragment in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(dio.os, "fsync", fsync)


@pytest.mark.parametrize(
    "victim",
    [
        "summary.tex",
        "summary.html",
        "accuracy_curves_cifar100_10-10.png",
        "accuracy_matrix_cifar100_10-10.pdf",
    ],
)
def test_disk_full_in_the_results_stage_is_one_line_and_keeps_finished_files(
    finished_stage, monkeypatch, capsys, victim
):
    argv, tmp_path, before = finished_stage
    _fail_fsync_of(monkeypatch, victim)
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "No space left on device" in err and "free disk space or choose another output path" in err
    assert victim in err
    after = {p.name: p.read_bytes() for folder in ("t", "p") for p in (tmp_path / folder).iterdir()}
    assert set(after) == set(before)  # no file lost, no temporary file left
    assert (
        after[[n for n in before if n.startswith(victim)][0]]
        == before[[n for n in before if n.startswith(victim)][0]]
    )


def test_a_write_failing_inside_savefig_is_one_line(finished_stage, monkeypatch, capsys):
    argv, tmp_path, before = finished_stage
    real = dio.os.fdopen

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(
        dio.os, "fdopen", lambda fd, mode: Full(real(fd, mode)) if "b" in mode else real(fd, mode)
    )
    assert main(argv) == 2
    assert "No space left on device" in one_line_error(capsys)
    assert {p.name for folder in ("t", "p") for p in (tmp_path / folder).iterdir()} == set(before)


def test_an_unwritable_plots_folder_is_one_line(finished_stage, capsys):
    argv, tmp_path, _ = finished_stage
    (tmp_path / "blocker").write_text("a file where the plots folder should be")
    assert main([*argv[:-1], str(tmp_path / "blocker" / "plots")]) == 2
    assert "cannot write into" in one_line_error(capsys)


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("run.json", b"{not json", "run.json is damaged or unreadable"),
        ("run.json", b"[1, 2]", "run.json is not a dmnsp run record"),
        ("run.json", b"\xff\xfe\x00", "run.json is damaged or unreadable"),
        ("config.yaml", b"seed: [unclosed", "is not valid YAML"),
        ("config.yaml", b"- a\n- list\n", "is not a mapping of run keys"),
        ("config.yaml", b"\xff\xfe bad", "UTF-8"),
    ],
)
def test_damaged_run_records_stop_the_results_stage_naming_the_file(
    finished_stage, capsys, name, content, needle
):
    argv, tmp_path, before = finished_stage
    damaged = tmp_path / "runs" / "dmnsp" / name
    damaged.write_bytes(content)
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert needle in err and str(damaged) in err
    assert {p.name: p.read_bytes() for folder in ("t", "p") for p in (tmp_path / folder).iterdir()} == before
    assert layout.has_results(damaged.parent)
