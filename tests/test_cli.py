"""The command line on the real offline data path: Fashion-MNIST from Debian's files, the tiny CLIP
loaded from a local checkpoint, per-task jobs through checkpoints, and user errors without tracebacks."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from dmnsp.cli import main
from dmnsp.model import create_clip


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    weights = root / "tiny.pt"
    torch.save(
        {"state_dict": create_clip("dmnsp-tiny", None, seed=1, adapter_dim=None).model.state_dict()}, weights
    )
    cfg = {
        "dataset": "fashion-mnist",
        "dataset_root": str(root / "data"),
        "model_name": "dmnsp-tiny",
        "pretrained": str(weights),
        "initial_increment": 5,
        "increment": 5,
        "max_train_per_class": 16,
        "max_test_per_class": 8,
        "adapter_dim": 8,
        "batch_size": 16,
        "epochs": 1,
        "max_steps": 2,
        "warmup_steps": 1,
        "method": "dmnsp",
        "threads": 2,
        "device": "cpu",
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_prints_per_task_accuracy_and_writes_outputs(run_config, tmp_path, capsys):
    assert main(["run", "--config", str(run_config), "--out-dir", str(tmp_path / "r"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "task 0: accuracy" in out and "task 1: accuracy" in out and "Avg" in out
    for t in (0, 1):
        for name in ("checkpoint.pt", "eval.json", "diagnostics.json"):
            assert (tmp_path / "r" / f"task{t}" / name).is_file()
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["complete"] and 0 <= metrics["last"] <= 1
    diag = json.loads((tmp_path / "r" / "task1" / "diagnostics.json").read_text())
    assert len(diag["lambda"]) == 12 and diag["basis_columns"]["visual"] == [126] * 12
    # Which arithmetic ran: the faithful defaults, emulated on this CPU.
    assert (diag["numerics"], diag["eig"]) == ("cuda-foreach", "svd")
    assert diag["optimizer"] == "dmnsp.optim.AdamW(numerics=cuda-foreach)"


def test_train_task_chain_and_resume_errors(run_config, tmp_path, capsys):
    t0, t1 = tmp_path / "task0", tmp_path / "task1"
    assert (
        main(["train-task", "--config", str(run_config), "--task", "0", "--out-dir", str(t0), "--quiet"]) == 0
    )
    assert (
        main(
            [
                "train-task",
                "--config",
                str(run_config),
                "--task",
                "1",
                "--resume",
                str(t0 / "checkpoint.pt"),
                "--out-dir",
                str(t1),
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((t1 / "eval.json").read_text())["task"] == 1
    # The same task chain with another lr is refused, naming the key.
    rc = main(
        [
            "train-task",
            "--config",
            str(run_config),
            "--set",
            "lr=0.5",
            "--task",
            "1",
            "--resume",
            str(t0 / "checkpoint.pt"),
            "--out-dir",
            str(tmp_path / "x"),
            "--quiet",
        ]
    )
    assert rc == 2 and "lr: 0.001 != 0.5" in capsys.readouterr().err
    # A truncated checkpoint is a clear error, and no output of the failed task appears.
    ck = t0 / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    rc = main(
        [
            "train-task",
            "--config",
            str(run_config),
            "--task",
            "1",
            "--resume",
            str(ck),
            "--out-dir",
            str(tmp_path / "y"),
            "--quiet",
        ]
    )
    assert rc == 2 and "truncated or corrupt" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lamda=3", "unknown key 'lamda'"),
        ("model_name=ViT-B/16", "unknown model_name 'ViT-B/16'"),
        ("pretrained=/nonexistent/w.pt", "does not exist"),
        ("method=foo", "'method': 'foo' is not one of"),
        ("increment=3", "increment"),
    ],
)
def test_user_errors_are_messages_not_tracebacks(run_config, tmp_path, capsys, override, message):
    rc = main(["run", "--config", str(run_config), "--set", override, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_unwritable_output_folder(run_config, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # root ignores permissions, but not this
    rc = main(
        [
            "train-task",
            "--config",
            str(run_config),
            "--task",
            "0",
            "--out-dir",
            str(blocker / "t0"),
            "--quiet",
        ]
    )
    assert rc == 2 and "cannot write" in capsys.readouterr().err


def test_help_on_every_command(capsys):
    for cmd in (
        "run",
        "train-task",
        "evaluate",
        "pretrain",
        "prepare-run",
        "metrics",
        "report-artifacts",
        "import-config",
        "validate-config",
        "list-models",
        "list-datasets",
    ):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
    assert "dmnsp-tiny" in (main(["list-models", "--offline"]) == 0 and capsys.readouterr().out)


def test_prepare_run_records_the_numerics_in_run_json(tmp_path):
    out = tmp_path / "run"
    args = ["prepare-run", "--experiment", "e", "--out-dir", str(out), "--set", "optimizer.numerics=cpu"]
    assert main(args) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["numerics"] == {
        "optimizer": "cpu",
        "eig": "svd",
        "order": "reference",
        "logit_scale": "checkpoint",
    }
    assert info["settings"] == {"optimizer.numerics": "cpu"}
    assert (
        main(["prepare-run", "--experiment", "e", "--out-dir", str(out), "--set", "projection.mode=clean"])
        == 0
    )
    assert json.loads((out / "run.json").read_text())["numerics"] == {
        "optimizer": "torch",
        "eig": "eigh",
        "order": "composite",
        "logit_scale": 100.0,
    }
