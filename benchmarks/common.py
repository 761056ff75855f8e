"""Helpers shared by the benchmark scripts: machine description, timing, tables, synthetic bases,
and running one ``dmnsp`` job in a child process with its own peak memory.

Benchmarks print results; they are not tests. Timings on a shared machine are noisy, so every
figure is a median of several repetitions and the load average is printed with it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    """``lscpu``'s model name (falls back to /proc/cpuinfo, then platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_line() -> str:
    """One line naming the machine, for the top of every benchmark's output."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"machine: {platform.machine()} {cpu_model()}, {cores()} cores, {gpu}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {load}"
    )


def load_line() -> str:
    if not hasattr(os, "getloadavg"):
        return ""
    return "load average now: " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------ timing


def sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Seconds one call of ``fn`` takes (CUDA work included)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def repeat(fn: Callable[[], object], repeats: int, warmup: int = 1, device=None) -> list[float]:
    """``warmup`` untimed calls, then ``repeats`` timed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    return [timed(fn, device) for _ in range(repeats)]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """``median (min-max, n=k)`` in adaptive units."""
    return f"{fmt_s(median(xs))} ({fmt_s(min(xs))}-{fmt_s(max(xs))}, n={len(xs)})"


def fmt_s(s: float) -> str:
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


# ------------------------------------------------------------------------------------ tables


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """A GitHub-flavoured markdown table (what benchmarks/README.md shows)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def verdict(measured: float, target: float) -> str:
    """PASS when ``measured`` is at most ``target`` (both in the same unit)."""
    return "PASS" if measured <= target else "MISS"


# ------------------------------------------------------------------------------------ bases


def faithful_bases(
    n_layers: int, width: int, n_tasks: int, seed: int = 0, pool: int = 3
) -> list[torch.Tensor]:
    """Per layer a faithful concat history: ``n_tasks`` orthonormal blocks ``U[:, 1:]`` (D × D-1 each).

    The content only matters for the lambda values, not for any timing, so the blocks are random
    orthogonal matrices (QR of a Gaussian) from a small pool, each used with its own random column
    permutation: orthonormal blocks of the right shape without ``n_layers * n_tasks`` decompositions.
    """
    gen = torch.Generator().manual_seed(seed)
    qs = [torch.linalg.qr(torch.randn(width, width, generator=gen))[0] for _ in range(pool)]
    out = []
    for layer in range(n_layers):
        blocks = []
        for t in range(n_tasks):
            q = qs[(layer + t) % pool]
            perm = torch.randperm(width, generator=gen)
            blocks.append(q[:, perm][:, 1:])
        out.append(torch.cat(blocks, dim=1).contiguous())
    return out


def activations(tokens: int, batch: int, width: int, seed: int = 0) -> torch.Tensor:
    """Adapter-output-like activations (tokens × batch × D): Gaussian plus a shared mean direction,
    so the uncentred Gram matrix has one dominant direction as real residual streams do."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(width, generator=gen)
    return torch.randn(tokens, batch, width, generator=gen) + 3 * mean / mean.norm() * width**0.5 / 4


# ------------------------------------------------------------------------------------ jobs


def python() -> str:
    """The interpreter running this script (the project's venv when started with it)."""
    return sys.executable


def child_env(threads: int | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONWARNINGS"] = "ignore"
    env.setdefault("HF_HUB_OFFLINE", "1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_measured(
    cmd: Sequence[str], cwd: Path | None = None, env: dict | None = None, timeout: float = 3600
) -> dict:
    """Run ``cmd``: wall seconds, exit code, output, and the child's own CPU seconds (user + system)
    and peak RSS (MiB), both from ``os.wait4``."""
    import tempfile

    env = env or child_env()
    with tempfile.TemporaryFile("w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise TimeoutError(f"{' '.join(cmd)} ran longer than {timeout} s")
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        out = log.read()
    return {
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "rc": proc.returncode,
        "output": out,
        "maxrss_mb": usage.ru_maxrss / 1024,
    }


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def fashion_root(folder: Path) -> Path:
    """A dataset_root holding the decompressed Debian Fashion-MNIST files (done once per folder)."""
    from dmnsp.datasets import FASHION_MNIST_DEBIAN_DIR, prepare_fashion_mnist

    if not FASHION_MNIST_DEBIAN_DIR.is_dir():
        raise SystemExit(
            f"Fashion-MNIST not found in {FASHION_MNIST_DEBIAN_DIR}; `apt-get install dataset-fashion-mnist`"
        )
    prepare_fashion_mnist(folder)
    return folder
