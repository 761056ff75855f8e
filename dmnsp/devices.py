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


# More torch threads than this many per available core only add contention (10000 threads start
# 20,001 OS threads and can crash); the config schema also caps `threads` at 1024.
THREADS_PER_CORE = 4


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a scheduler's allocation)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(threads: int | None) -> None:
    """Apply the config's ``threads`` (None keeps torch's default), refusing absurd counts."""
    if not threads:
        return
    cores = available_cores()
    if threads > THREADS_PER_CORE * cores:
        from .config import ConfigError

        raise ConfigError(
            f"'threads': {threads} torch threads on {cores} available cores is more than "
            f"{THREADS_PER_CORE} per core; set threads to at most {THREADS_PER_CORE * cores} "
            f"(usually the core count, {cores}) or null"
        )
    torch.set_num_threads(threads)


def check_workers(workers: int) -> int:
    """The config's DataLoader ``num_workers``, refused past a few per available core: each worker is
    a process with its own copy of the dataset handles (10000 workers took 7.7 GB before failing)."""
    cores = available_cores()
    if workers > THREADS_PER_CORE * cores:
        from .config import ConfigError

        raise ConfigError(
            f"'num_workers': {workers} DataLoader processes on {cores} available cores is more than "
            f"{THREADS_PER_CORE} per core; set num_workers to at most {THREADS_PER_CORE * cores} or auto"
        )
    return workers
