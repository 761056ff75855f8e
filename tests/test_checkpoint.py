"""Task checkpoints: atomic, checksummed, tied to their configuration."""

from __future__ import annotations

import pytest
import torch

from dmnsp.checkpoint import CheckpointError, TaskState, load_checkpoint, save_checkpoint


def _state():
    return TaskState(
        task=1,
        adapters={"visual.transformer.resblocks.0.adapter.down.weight": torch.randn(4, 8)},
        bases={"visual": [torch.randn(8, 14)]},
        seen_classes=[0, 1, 2, 3],
    )


def test_round_trip_keeps_every_tensor(tmp_path, make_config):
    cfg = make_config()
    state = _state()
    path = save_checkpoint(tmp_path / "c.pt", state, cfg)
    got = load_checkpoint(path, cfg, expect_task=1)
    assert got.task == 1 and got.seen_classes == [0, 1, 2, 3]
    for k, v in state.adapters.items():
        assert torch.equal(got.adapters[k], v)
    assert torch.equal(got.bases["visual"][0], state.bases["visual"][0])
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_truncated_and_corrupted_files_are_detected(tmp_path, make_config):
    cfg = make_config()
    path = save_checkpoint(tmp_path / "c.pt", _state(), cfg)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt.*rerun"):
        load_checkpoint(path, cfg)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path, cfg)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError):
        load_checkpoint(path, cfg)


def test_other_config_is_refused_naming_the_key(tmp_path, make_config):
    path = save_checkpoint(tmp_path / "c.pt", _state(), make_config(lr=0.001))
    with pytest.raises(CheckpointError, match="another configuration.*lr: 0.001 != 0.01"):
        load_checkpoint(path, make_config(lr=0.01))
    # Execution-only keys (device, data folder, workers) may differ.
    load_checkpoint(path, make_config(lr=0.001, dataset_root="/elsewhere", device="cpu", num_workers=3))


def test_wrong_task_and_missing_file(tmp_path, make_config):
    cfg = make_config()
    path = save_checkpoint(tmp_path / "c.pt", _state(), cfg)
    with pytest.raises(CheckpointError, match="holds task 1, expected task 2"):
        load_checkpoint(path, cfg, expect_task=2)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt", cfg)
