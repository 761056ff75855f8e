"""Task state on disk: everything task t+1 needs, nothing it does not (no frozen backbone).

Format 2 is a safetensors file (any safetensors reader opens it): an 8-byte little-endian header
length, a JSON header naming every tensor's dtype, shape and byte range, then the raw tensor bytes.
The header's ``__metadata__`` holds, first, the SHA-256 of the whole file (computed with those 64
hex digits set to ``0``), then the format name and version, the non-tensor state as JSON, and the
``views``: a tensor that is not simply all of its storage in row-major order (the bases are
column-major slices of eigenvector matrices) is stored as its whole storage, 1-D, with its shape,
strides and offset here, so that it comes back with the memory layout it had, as ``torch.save``
kept it: resumed tasks then do the same arithmetic as a run in one process, bit for bit.

Tensors go between memory and disk without intermediate copies: saving hashes and writes each
tensor's own memory, loading reads straight into freshly allocated tensors while hashing, so a load
holds the file about once in memory and a save adds almost nothing. Nothing is unpickled. Files are
written atomically (temporary file + rename); a truncated, corrupt or malformed file, or one made
with another configuration or for another task, is a one-line :class:`CheckpointError`.

Format 1 files (a SHA-256 line, then a ``torch.save`` payload) are still read, with
``torch.load(weights_only=True)`` after their checksum matched, so runs started before format 2
can resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import random
import re
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from . import __version__
from .bounded import BoundsError, loads_json
from .config import config_diff, config_hash, state_config
from .io import atomic_save

FORMAT_NAME = "dmnsp-checkpoint"
FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1

CHUNK = 16 << 20  # bytes hashed and copied per step
MAX_HEADER = 64 << 20  # a header larger than this is not one of ours
MAX_DIMS = 8  # dimensions of a stored tensor or view (dmnsp writes at most 2)
MAX_DIM = 2**31 - 1  # size of one dimension (a zero-size tensor allocates nothing, but torch
# rejects sizes past 2**63, and no dmnsp tensor has a side this long)
DIGEST_PREFIX = b'{"__metadata__":{"sha256":"'  # the header starts with this; the digest follows
DIGEST_LEN = 64
DIGEST_OFFSET = 8 + len(DIGEST_PREFIX)  # where the 64 hex digits sit in the file

# safetensors dtype names <-> torch dtypes (the ones a checkpoint can hold).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
TENSOR_NAME = re.compile(r"^(adapters/.+|bases/[A-Za-z0-9_]+/(0|[1-9][0-9]*)|rng/torch)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, malformed, or made with another configuration."""


@dataclass
class TaskState:
    """State after finishing ``task`` (``task = -1``: nothing trained yet)."""

    task: int = -1
    adapters: dict[str, torch.Tensor] = field(default_factory=dict)
    bases: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    seen_classes: list[int] = field(default_factory=list)


def versions() -> dict[str, str]:
    """Library versions recorded with every checkpoint (read from metadata: imports nothing)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        open_clip = version("open_clip_torch")
    except PackageNotFoundError:
        open_clip = "unknown"
    return {
        "dmnsp": __version__,
        "torch": str(torch.__version__),
        "open_clip": open_clip,
        "python": platform.python_version(),
    }


def rng_states() -> dict:
    """RNG states at save time (provenance; every task reseeds from (seed, task) anyway)."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "python": repr(random.getstate()[1][:4]),
    }


# ------------------------------------------------------------------------------------ bytes


def _byte_view(t: torch.Tensor) -> memoryview:
    """The tensor's own memory as flat bytes (no copy; ``t`` must be contiguous on the CPU)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _chunks(view: memoryview) -> Iterator[memoryview]:
    for start in range(0, len(view), CHUNK):
        yield view[start : start + CHUNK]


def _storage(t: torch.Tensor) -> torch.Tensor:
    """The whole storage under CPU tensor ``t``, as a flat tensor of its dtype (no copy)."""
    n = t.untyped_storage().nbytes() // t.element_size()
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (n,), (1,))


def _on_disk(t: torch.Tensor) -> tuple[int, dict | None]:
    """Elements of the storage written for ``t``, and its view of that storage when it is not
    simply all of it in row-major order.

    The memory layout is kept, not only the values: the bases are column-major slices of an
    eigenvector matrix, and a resumed task must do the same arithmetic (BLAS takes another path,
    and rounds differently, on a row-major copy) for per-task jobs to equal a run in one process
    bit for bit, as format 1 (``torch.save``) did. Like ``torch.save`` after ``.cpu()``: a CPU
    tensor keeps its whole storage and offset; a GPU tensor is what ``.to("cpu")`` makes of it.
    """
    cpu = t if t.device.type == "cpu" else torch.empty_like(t, device="cpu")  # .to("cpu")'s layout
    n = cpu.untyped_storage().nbytes() // cpu.element_size()
    if cpu.is_contiguous() and cpu.storage_offset() == 0 and cpu.numel() == n:
        return n, None
    return n, {"shape": list(cpu.shape), "stride": list(cpu.stride()), "offset": cpu.storage_offset()}


# ------------------------------------------------------------------------------------ save


def _tensors(state: TaskState, rng: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {f"adapters/{k}": v for k, v in state.adapters.items()}
    for tower, vs in state.bases.items():
        out.update({f"bases/{tower}/{i}": v for i, v in enumerate(vs)})
    out["rng/torch"] = rng
    return out


def _header(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": {"sha256": "0" * DIGEST_LEN, **meta}}
    views, offset = {}, 0
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name} has dtype {t.dtype}, which a checkpoint cannot hold")
        n, view = _on_disk(t)
        if view is not None:
            views[name] = view
        nbytes = n * t.element_size()
        entries[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape) if view is None else [n],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    entries["__metadata__"]["views"] = json.dumps(views, separators=(",", ":"))
    header = json.dumps(entries, separators=(",", ":")).encode()
    assert header.startswith(DIGEST_PREFIX)
    return header + b" " * (-len(header) % 8)  # tensor data 8-byte aligned, as safetensors does


def _write(fh: BinaryIO, header: bytes, tensors: dict[str, torch.Tensor]) -> None:
    digest = hashlib.sha256()
    head = struct.pack("<Q", len(header)) + header
    digest.update(head)
    fh.write(head)
    for t in tensors.values():
        n, view = _on_disk(t)
        cpu = t.detach().to("cpu")  # one tensor at a time: a GPU tensor is copied, written, freed
        if _on_disk(cpu) != (n, view):
            raise RuntimeError(f"a {list(t.shape)} tensor's layout on the CPU differs from the header's")
        for chunk in _chunks(_byte_view(_storage(cpu))):
            digest.update(chunk)
            fh.write(chunk)
    fh.seek(DIGEST_OFFSET)
    fh.write(digest.hexdigest().encode())
    fh.seek(0, io.SEEK_END)


def save_checkpoint(path: str | Path, state: TaskState, cfg: dict) -> Path:
    """Write a task checkpoint atomically (format 2, see the module docstring)."""
    if sys.byteorder != "little":  # safetensors data is little-endian; so is every platform we run on
        raise CheckpointError("checkpoints can only be written on a little-endian machine")
    rng = rng_states()
    body = {
        "task": state.task,
        "seen_classes": [int(c) for c in state.seen_classes],
        "config": state_config(cfg),
        "config_hash": config_hash(cfg),
        "versions": versions(),
        "rng": {"numpy": rng["numpy"], "python": rng["python"]},
    }
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "state": json.dumps(body, default=str, allow_nan=False),
    }
    tensors = _tensors(state, rng["torch"])
    header = _header(meta, tensors)
    return atomic_save(path, lambda fh: _write(fh, header, tensors))


# ------------------------------------------------------------------------------------ load


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is truncated or corrupt ({why}); delete it and rerun the task that wrote it"
    )


def _malformed(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is not a valid dmnsp task checkpoint ({why}); delete it and rerun the task that wrote it"
    )


def _short(value: Any, limit: int = 120) -> str:
    """``value`` as text cut to ``limit`` characters: a crafted field never floods the error line."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shape_problem(shape: Any) -> str | None:
    """Why ``shape`` is not a tensor shape dmnsp could have written (None when it is)."""
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        return "is not a list of integers"
    if len(shape) > MAX_DIMS:
        return f"has {len(shape)} dimensions (at most {MAX_DIMS})"
    if any(not 0 <= d <= MAX_DIM for d in shape):
        return f"has a dimension outside 0..{MAX_DIM}"
    return None


def _read_exact(fh: BinaryIO, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _layout(path: Path, header: dict, data_size: int) -> list[tuple[str, str, list[int]]]:
    """Validate the tensor table (before reading any tensor): names, dtypes, shapes, contiguous
    byte ranges that exactly fill the data, so allocations never exceed the file's size."""
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _corrupt(path, f"bad entry for tensor {_short(repr(name))}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise _corrupt(path, f"tensor {_short(repr(name))} has unknown dtype {_short(repr(dtype))}")
        problem = _shape_problem(shape)
        if problem is not None:
            raise _corrupt(path, f"tensor {_short(repr(name))}'s shape {_short(shape)} {problem}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise _corrupt(path, f"tensor {_short(repr(name))} has bad data offsets {_short(offsets)}")
        entries.append((offsets, name, dtype, shape))
    out, offset = [], 0
    for offsets, name, dtype, shape in sorted(entries, key=lambda e: e[0]):  # in file order
        nbytes = int(np.prod(shape, dtype=object)) * DTYPES[dtype].itemsize
        if offsets != [offset, offset + nbytes]:
            raise _corrupt(
                path,
                f"tensor {_short(repr(name))} has data offsets {_short(offsets)} for {nbytes} bytes at {offset}",
            )
        offset += nbytes
        out.append((name, dtype, shape))
    if offset != data_size:
        raise _corrupt(path, f"tensors take {offset} bytes, the file holds {data_size}")
    return out


def _read_v2(path: Path, fh: BinaryIO, size: int) -> tuple[dict, dict[str, torch.Tensor]]:
    digest = hashlib.sha256()
    head = fh.read(8)
    if len(head) < 8:
        raise _corrupt(path, f"{size} bytes")
    (n,) = struct.unpack("<Q", head)
    if n > min(MAX_HEADER, size - 8) or n < len(DIGEST_PREFIX) + DIGEST_LEN:
        raise _corrupt(path, f"header length {n} in a file of {size} bytes")
    raw = fh.read(n)
    if not raw.startswith(DIGEST_PREFIX):
        raise _corrupt(path, "no checksum at the start of the header")
    start = len(DIGEST_PREFIX)
    expected = raw[start : start + DIGEST_LEN]
    digest.update(head + raw[:start] + b"0" * DIGEST_LEN + raw[start + DIGEST_LEN :])
    try:  # bounded: a header nested past the recursion limit is an error, not a traceback
        header = loads_json(raw, "header", allow_nan=False)
        meta = header["__metadata__"]
    except BoundsError:
        raise _corrupt(path, "the header nests too deep or holds too many values") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise _corrupt(path, f"unreadable header: {_short(exc)}") from None
    if not isinstance(header, dict) or not isinstance(meta, dict):
        raise _corrupt(path, "unreadable header")
    tensors = {}
    for name, dtype, shape in _layout(path, header, size - 8 - n):
        t = torch.empty(shape, dtype=DTYPES[dtype])
        for chunk in _chunks(_byte_view(t)):
            if _read_exact(fh, chunk) != len(chunk):
                raise _corrupt(path, "file ends early")
            digest.update(chunk)
        tensors[name] = t
    if digest.hexdigest().encode() != expected:
        raise _corrupt(path, "checksum mismatch")
    return meta, tensors


def _state_v2(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, TaskState]:
    """The checksum matched: check that the content is what dmnsp writes, field by field."""
    if meta.get("format") != FORMAT_NAME:
        raise _malformed(path, f"format {_short(repr(meta.get('format')))}, expected {FORMAT_NAME!r}")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"checkpoint {path} has format version {_short(repr(meta.get('format_version')))}; this dmnsp reads "
            f"versions {LEGACY_FORMAT_VERSION} and {FORMAT_VERSION}: use the dmnsp that wrote it or rerun the task"
        )
    try:
        body = loads_json(meta["state"], "'state' metadata", allow_nan=False)
    except (KeyError, TypeError, ValueError):  # BoundsError is a ValueError
        raise _malformed(path, "no readable 'state' metadata") from None
    if not isinstance(body, dict):
        raise _malformed(path, "'state' metadata is not a JSON object")
    _apply_views(path, meta, tensors)
    adapters: dict[str, torch.Tensor] = {}
    bases: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        if not TENSOR_NAME.match(name):
            raise _malformed(path, f"unexpected tensor {_short(repr(name))}")
        kind, _, rest = name.partition("/")
        if kind == "rng":
            if t.dtype != torch.uint8 or t.dim() != 1:
                raise _malformed(path, f"{name} is {DTYPE_NAMES[t.dtype]} {list(t.shape)}, expected 1-D U8")
            continue
        if t.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            raise _malformed(path, f"{name} has dtype {DTYPE_NAMES[t.dtype]}, expected a float type")
        if kind == "adapters":
            adapters[rest] = t
        else:
            tower, _, index = rest.partition("/")
            if t.dim() != 2:
                raise _malformed(path, f"{name} has shape {list(t.shape)}, expected a 2-D basis")
            bases.setdefault(tower, {})[int(index)] = t
    if "rng/torch" not in tensors:
        raise _malformed(path, "no rng/torch tensor")
    lists = {}
    for tower, by_index in bases.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise _malformed(path, f"bases of the {tower} tower are numbered {sorted(by_index)}")
        lists[tower] = [by_index[i] for i in range(len(by_index))]
        if len({v.shape[0] for v in lists[tower]}) > 1:
            raise _malformed(path, f"bases of the {tower} tower have different row counts")
    return body, TaskState(-1, adapters, lists, [])


def _view_problem(view: Any, numel: int) -> str | None:
    """Why ``view`` (``{shape, stride, offset}``) is not a view dmnsp could have saved of a storage of
    ``numel`` elements: every element it addresses lies inside the storage and no two of its indices
    address the same element (a stride-0 or overlapping view would pass a huge tensor through a
    small file). None when it is such a view."""
    if not isinstance(view, dict) or set(view) != {"shape", "stride", "offset"}:
        return "is not an object of shape, stride and offset"
    shape, stride, offset = view["shape"], view["stride"], view["offset"]
    problem = _shape_problem(shape)
    if problem is not None:
        return f"has a shape {_short(shape)} that {problem}"
    if not isinstance(stride, list) or len(stride) != len(shape) or not all(type(s) is int for s in stride):
        return f"has strides {_short(stride)}, not {len(shape)} integers"
    if any(not 0 <= s <= MAX_DIM * MAX_DIM for s in stride) or type(offset) is not int or offset < 0:
        return f"has strides {_short(stride)} or offset {_short(offset)} negative or out of range"
    if int(np.prod(shape, dtype=object)) == 0:
        return None if offset <= numel else f"starts past its storage of {numel} elements"
    reach = 0  # the largest offset (from ``offset``) reached by the dimensions taken so far
    for size, step in sorted((d for d in zip(shape, stride, strict=True) if d[0] > 1), key=lambda d: d[1]):
        if step <= reach:  # this dimension steps back onto elements the smaller ones already address
            return f"addresses some elements twice (shape {shape}, strides {stride})"
        reach += (size - 1) * step
    if offset + reach >= numel:
        return f"reaches past its storage of {numel} elements"
    return None


def _apply_views(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Turn stored storages back into the strided views they were saved from (see _on_disk)."""
    try:
        views = loads_json(meta.get("views", "{}"), "'views' metadata", allow_nan=False)
    except (TypeError, ValueError):  # BoundsError is a ValueError
        raise _malformed(path, "unreadable 'views' metadata") from None
    if not isinstance(views, dict):
        raise _malformed(path, "'views' metadata is not a JSON object")
    for name, view in views.items():
        storage = tensors.get(name)
        if storage is None or storage.dim() != 1:
            raise _malformed(path, f"a view of {_short(repr(name))} without a 1-D storage of that name")
        problem = _view_problem(view, storage.numel())
        if problem is not None:
            raise _malformed(path, f"bad view of {name!r}: it {problem}")
        tensors[name] = storage.as_strided(view["shape"], view["stride"], view["offset"])


def _read_v1(path: Path, fh: BinaryIO) -> tuple[dict, TaskState]:
    """Format 1: SHA-256 line + torch.save payload (read for runs started before format 2)."""
    fh.seek(0)
    raw = fh.read()
    digest, _, body = raw.partition(b"\n")
    if hashlib.sha256(body).hexdigest().encode() != digest:
        raise _corrupt(path, "checksum mismatch")
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means the same thing to the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _malformed(path, f"unreadable format-1 payload: {first}") from exc
    if not isinstance(payload, dict) or payload.get("format_version") != LEGACY_FORMAT_VERSION:
        version = payload.get("format_version") if isinstance(payload, dict) else None
        raise _malformed(path, f"format-1 payload with format_version {version!r}")
    adapters, bases = payload.get("adapters"), payload.get("bases")
    if not isinstance(adapters, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) and v.is_floating_point()
        for k, v in adapters.items()
    ):
        raise _malformed(path, "'adapters' is not a mapping of names to float tensors")
    if not isinstance(bases, dict) or not all(
        isinstance(k, str)
        and isinstance(vs, list)
        and all(isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 2 for v in vs)
        for k, vs in bases.items()
    ):
        raise _malformed(path, "'bases' is not a mapping of towers to lists of 2-D float tensors")
    return payload, TaskState(-1, adapters, bases, [])


def _check_body(path: Path, body: dict) -> None:
    task, seen = body.get("task"), body.get("seen_classes")
    if type(task) is not int or task < -1:
        raise _malformed(path, f"task {task!r} is not a task index")
    if not isinstance(seen, list) or not all(type(c) is int and c >= 0 for c in seen):
        raise _malformed(path, "'seen_classes' is not a list of class indices")
    if not isinstance(body.get("config_hash"), str) or not isinstance(body.get("config"), dict):
        raise _malformed(path, "no config or config hash")


def load_checkpoint(path: str | Path, cfg: dict | None = None, expect_task: int | None = None) -> TaskState:
    """Read and verify a checkpoint.

    Args:
        path: checkpoint file.
        cfg: the resolved run config that resumes from it; must match the one that wrote it.
        expect_task: the task index it must hold.

    Raises:
        CheckpointError: missing, truncated/corrupt, malformed, other config, or other task.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a folder, FIFO or device: never opened
        raise CheckpointError(
            f"checkpoint {path} is not a regular file; give the path of a task's checkpoint.pt"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; run the previous task first")
    with path.open("rb") as fh:
        size = path.stat().st_size
        start = fh.read(DIGEST_LEN + 1)
        fh.seek(0)
        if re.fullmatch(rb"[0-9a-f]{64}\n", start):
            body, state = _read_v1(path, fh)
        else:
            meta, tensors = _read_v2(path, fh, size)
            body, state = _state_v2(path, meta, tensors)
    _check_body(path, body)
    if cfg is not None and body["config_hash"] != config_hash(cfg):
        diff = [_short(line) for line in config_diff(body["config"], state_config(cfg))[:5]]
        raise CheckpointError(
            f"checkpoint {path} was made with another configuration ({'; '.join(diff) or 'hash differs'}); "
            "resume with the config that wrote it or start the run again from task 0"
        )
    if expect_task is not None and body["task"] != expect_task:
        raise CheckpointError(f"checkpoint {path} holds task {body['task']}, expected task {expect_task}")
    state.task, state.seen_classes = body["task"], list(body["seen_classes"])
    return state
