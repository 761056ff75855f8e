"""Pretraining of the tiny CLIP: settings checked before the data load, non-finite loss stops before
anything is written, and the health gate stops a backbone left at chance (unless accepted)."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from fakes import make_fake_imagefolder

from dmnsp.cli import main
from dmnsp.pretrain import MIN_GAIN_OVER_CHANCE, PLATEAU_NATS, health

CLASSES = ("cat", "dog", "fox", "owl")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_fake_imagefolder(
        tmp_path_factory.mktemp("pre") / "images", classes=CLASSES, n_train=6, n_test=4, size=28
    )


def _config(path, root, **pretrain) -> str:
    cfg = {
        "dataset": "imagefolder",
        "dataset_root": str(root),
        "model_name": "dmnsp-tiny",
        "pretrained": None,
        "pretrain_per_class": 4,
        "pretrain": {"steps": 2, "batch_size": 8, "warmup_steps": 0, **pretrain},
        "device": "cpu",
        "num_workers": 0,
        "eval_batch_size": 64,
        "threads": 1,
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _pretrain(config: str, out, *extra: str) -> int:
    return main(["pretrain", "--config", config, "--out", str(out), "--quiet", *extra])


def test_non_finite_loss_stops_before_writing_a_model(folder, tmp_path, capsys):
    config = _config(tmp_path / "c.yaml", folder, lr=1e10, steps=4)
    assert _pretrain(config, tmp_path / "m" / "model.pt") == 2
    err = capsys.readouterr().err
    assert "loss is nan" in err and "pretrain.lr" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m" / "model.pt").exists() and not (tmp_path / "m" / "model.json").exists()


def test_backbone_at_chance_fails_naming_cause_and_fix(folder, tmp_path, capsys):
    # Two steps at a tiny lr cannot move the loss off ln 4: the gate stops the job, writes nothing.
    config = _config(tmp_path / "c.yaml", folder, lr=1e-7)
    assert _pretrain(config, tmp_path / "model.pt") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "at chance" in err and f"ln C = {math.log(4):.3f}" in err
    for fix in (
        "pretrain.steps (now 2)",
        "pretrain_per_class (now 4)",
        "pretrain.lr",
        "pretrain.accept_weak",
    ):
        assert fix in err
    assert not (tmp_path / "model.pt").exists()


def test_accept_weak_keeps_the_model_and_records_it(folder, tmp_path, capsys):
    config = _config(tmp_path / "c.yaml", folder, lr=1e-7, accept_weak=True)
    assert _pretrain(config, tmp_path / "model.pt") == 0
    assert "warning: pretraining left dmnsp-tiny at chance" in capsys.readouterr().err
    summary = json.loads((tmp_path / "model.json").read_text())
    assert summary["healthy"] is False and (tmp_path / "model.pt").is_file()
    assert summary["chance"] == 0.25 and len(summary["loss_curve"]) == 2
    assert 0.25 <= summary["top_class_share"] <= 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pretrain_per_class": 0}, "'pretrain_per_class'"),
        ({"pretrain": {"templates": ["{} {}"]}}, "'pretrain.templates[0]'"),
        ({"pretrain": {"templates": ["a {}", "{} {x}"]}}, "'pretrain.templates[1]'"),
        ({"pretrain": {"seed": 2**70}}, "'pretrain.seed'"),
        ({"seed": 2**70}, "'seed'"),
        ({"data_seed": -1}, "'data_seed'"),
    ],
)
def test_bad_pretrain_settings_stop_before_the_data_load(tmp_path, capsys, changes, message):
    # dataset_root does not exist: reaching the data load would give a different error.
    config = tmp_path / "c.yaml"
    _config(config, tmp_path / "no-data")
    cfg = yaml.safe_load(config.read_text())
    for key, value in changes.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    config.write_text(yaml.safe_dump(cfg))
    assert _pretrain(str(config), tmp_path / "model.pt") == 2
    err = capsys.readouterr().err
    assert message in err and "no folder" not in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_health_rule_on_hand_made_numbers():
    falling = [2.30, 2.1, 1.9, 1.7, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0]
    plateau = [2.31, 2.303, 2.302, 2.302, 2.3026, 2.3025, 2.3026, 2.3024, 2.3026, 2.3025]
    # 10 classes, 5000 test images: chance 0.1, needed 0.1 + max(0.05, 3 * sqrt(0.09 / 5000)) = 0.15.
    problems, facts = health(0.60, 5000, 10, falling)
    assert problems == [] and facts["needed_accuracy"] == pytest.approx(0.1 + MIN_GAIN_OVER_CHANCE)
    assert facts["late_loss"] == 1.0 and facts["ln_classes"] == pytest.approx(math.log(10))
    assert len(health(0.098, 5000, 10, falling)[0]) == 1  # the 0.087-0.118 runs
    assert len(health(0.14, 5000, 10, falling)[0]) == 1
    assert len(health(0.60, 5000, 10, plateau)[0]) == 1
    assert len(health(0.10, 5000, 10, plateau)[0]) == 2
    # Few test images: three standard errors dominate (45 per class × 10: 3 * sqrt(0.09/450) = 0.042;
    # 4 classes × 4 images: 3 * sqrt(0.1875/16) = 0.325).
    assert health(0.20, 16, 4, falling)[1]["needed_accuracy"] == pytest.approx(0.25 + 0.324759, abs=1e-5)
    # The plateau margin: just inside ln C - PLATEAU_NATS is still the plateau.
    assert health(0.9, 5000, 10, [math.log(10) - PLATEAU_NATS / 2])[0]
    assert not health(0.9, 5000, 10, [math.log(10) - 2 * PLATEAU_NATS])[0]
