"""Atomic file writes: a job killed at any moment leaves the old file or the new one, never half."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


class OutputError(OSError):
    """An output could not be written (unwritable folder, disk full); names the path and the fix."""


def _atomic(path: str | Path, write: Callable[[Any], None], mode: str) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(
            exc.errno,
            f"cannot write into {path.parent}: {exc.strerror}; make the folder writable or choose another output path",
        ) from exc
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno is None:  # not the system's: e.g. gzip.BadGzipFile while reading the source
            raise
        raise OutputError(
            exc.errno,
            f"writing {path} failed ({exc.strerror}); free disk space or choose another output path",
        ) from exc
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error_under(exc)
        if cause is not None:  # torch.save turns a failed write into a RuntimeError (its zip writer)
            raise OutputError(
                cause.errno,
                f"writing {path} failed ({cause.strerror}); free disk space or choose another output path",
            ) from exc
        raise
    return path


def _os_error_under(exc: BaseException) -> OSError | None:
    """The OSError a library's own exception was raised while handling, if any (a short chain)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text to ``path`` via a temporary file in the same folder and a rename."""
    return _atomic(path, lambda fh: fh.write(text), "w")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes to ``path`` atomically."""
    return _atomic(path, lambda fh: fh.write(data), "wb")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON (indented, NaN/inf kept as JSON5-style literals are avoided: use None)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def atomic_save(path: str | Path, save: Callable[[Any], None]) -> Path:
    """Run ``save(fileobj)`` (e.g. ``lambda f: torch.save(obj, f)``) atomically."""
    return _atomic(path, save, "wb")


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by the string ``"inf"``, ``"-inf"`` or ``"nan"``.

    JSON has no literal for them, and a diagnostic that overflowed (the faithful lambda product)
    is worth keeping: ``float(value)`` and ``numpy.asarray(values, dtype=float)`` read them back.
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(value) for value in obj]
    return obj
