"""Task state on disk: everything task t+1 needs, nothing it does not (no frozen backbone).

Files are written atomically (temporary file + rename) and carry a SHA-256 of their payload, so
a truncated or corrupted file is detected on load with a message saying which task to rerun.
"""

from __future__ import annotations

import hashlib
import io
import platform
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .config import config_diff, config_hash, state_config
from .io import atomic_write_bytes

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or made with another configuration."""


@dataclass
class TaskState:
    """State after finishing ``task`` (``task = -1``: nothing trained yet)."""

    task: int = -1
    adapters: dict[str, torch.Tensor] = field(default_factory=dict)
    bases: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    seen_classes: list[int] = field(default_factory=list)


def versions() -> dict[str, str]:
    """Library versions recorded with every checkpoint."""
    import open_clip

    return {
        "dmnsp": __version__,
        "torch": str(torch.__version__),
        "open_clip": str(getattr(open_clip, "__version__", "unknown")),
        "python": platform.python_version(),
    }


def rng_states() -> dict:
    """RNG states at save time (provenance; every task reseeds from (seed, task) anyway)."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "python": repr(random.getstate()[1][:4]),
    }


def save_checkpoint(path: str | Path, state: TaskState, cfg: dict) -> Path:
    """Write a task checkpoint atomically."""
    payload = {
        "format_version": FORMAT_VERSION,
        "task": state.task,
        "adapters": {k: v.detach().cpu() for k, v in state.adapters.items()},
        "bases": {t: [v.detach().cpu() for v in vs] for t, vs in state.bases.items()},
        "seen_classes": list(state.seen_classes),
        "config": state_config(cfg),
        "config_hash": config_hash(cfg),
        "versions": versions(),
        "rng": rng_states(),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    digest = hashlib.sha256(body).hexdigest().encode()
    # Layout: 64 hex digits of SHA-256, newline, torch.save payload.
    return atomic_write_bytes(path, digest + b"\n" + body)


def load_checkpoint(path: str | Path, cfg: dict | None = None, expect_task: int | None = None) -> TaskState:
    """Read and verify a checkpoint.

    Args:
        path: checkpoint file.
        cfg: the resolved run config that resumes from it; must match the one that wrote it.
        expect_task: the task index it must hold.

    Raises:
        CheckpointError: missing, truncated/corrupt, other config, or other task.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; run the previous task first")
    raw = path.read_bytes()
    digest, _, body = raw.partition(b"\n")
    if len(digest) != 64 or hashlib.sha256(body).hexdigest().encode() != digest:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt (checksum mismatch); delete it and rerun the task that wrote it"
        )
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means the same thing to the user
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({exc}); delete it and rerun that task"
        ) from exc
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {payload.get('format_version')}, expected {FORMAT_VERSION}"
        )
    if cfg is not None and payload["config_hash"] != config_hash(cfg):
        diff = config_diff(payload["config"], state_config(cfg))
        raise CheckpointError(
            f"checkpoint {path} was made with another configuration ({'; '.join(diff[:5]) or 'hash differs'}); "
            "resume with the config that wrote it or start the run again from task 0"
        )
    if expect_task is not None and payload["task"] != expect_task:
        raise CheckpointError(f"checkpoint {path} holds task {payload['task']}, expected task {expect_task}")
    return TaskState(payload["task"], payload["adapters"], payload["bases"], payload["seen_classes"])
