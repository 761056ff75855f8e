"""Shared fixtures: a tiny validated run config and seeded in-memory data (no files)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/fakes.py

from fakes import make_fake_splits  # noqa: E402

from dmnsp.config import validate  # noqa: E402

# Two threads (the CI machine's cores); .ci/mutants runs two test processes at once with one each.
torch.set_num_threads(int(os.environ.get("DMNSP_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """In-process jobs set torch's thread count from their config; give the next test its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def tiny_config(**overrides) -> dict:
    """The offline tiny CLIP, random weights, miniature training: seconds per task on 2 cores."""
    base = {
        "dataset": "fashion-mnist",
        "model_name": "dmnsp-tiny",
        "pretrained": None,
        "initial_increment": 2,
        "increment": 2,
        "adapter_dim": 16,
        "batch_size": 16,
        "epochs": 1,
        "warmup_steps": 2,
        "eval_batch_size": 64,
        "num_workers": 0,
        "device": "cpu",
    }
    proj = overrides.pop("projection", {})
    base.update(overrides)
    base["projection"] = proj
    return validate(base)


@pytest.fixture
def make_config():
    return tiny_config


@pytest.fixture(scope="session")
def fake_data():
    """10 classes of coloured 28 px images (learnable), named like the embedded default's dataset."""
    return make_fake_splits(
        n_classes=10, n_train_per_class=24, n_test_per_class=8, size=28, name="fashion-mnist", grayscale=False
    )
