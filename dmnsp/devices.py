"""Run-time device choice. Several local jobs never share a GPU by accident: ``auto`` takes the
first GPU whose lock file it can hold for the life of the process."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

import torch

from .model import resolve_device

_held: list = []  # open lock files, kept for the life of the process


def pick_device(spec: str = "auto", lock_dir: str | Path | None = None) -> torch.device:
    """``auto``: a free local GPU slot (or the one a scheduler assigned), else CPU; otherwise ``spec``."""
    if spec != "auto" or not torch.cuda.is_available():
        return resolve_device(spec)
    n = torch.cuda.device_count()
    if n == 1 or os.environ.get("SLURM_JOB_ID"):
        return torch.device("cuda:0")  # the scheduler already restricted visibility
    folder = Path(lock_dir or os.environ.get("DMNSP_GPU_LOCK_DIR", tempfile.gettempdir()))
    for i in range(n):
        fh = open(folder / f"dmnsp-gpu-{i}.lock", "w")  # noqa: SIM115 - held open on purpose
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            continue
        _held.append(fh)
        return torch.device(f"cuda:{i}")
    raise RuntimeError(
        f"all {n} GPUs are held by other dmnsp jobs; limit concurrent GPU jobs "
        "(snakemake --resources gpu=N) or set device: cuda:K explicitly"
    )
