"""Atomic outputs (dmnsp.io): a failure at any point leaves the old file or the new one, never half
of one, and never a stray temporary file; disk-full and unwritable folders are clear errors."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dmnsp.io as dio
from dmnsp.io import OutputError, atomic_save, atomic_write_bytes, atomic_write_json, atomic_write_text

OLD = b"old content\n" * 100


def leftovers(folder: Path) -> list[str]:
    """Temporary files of dmnsp.io (``.<name>.<random>.tmp``) left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def existing(tmp_path) -> Path:
    path = tmp_path / "out" / "checkpoint.pt"
    path.parent.mkdir()
    path.write_bytes(OLD)
    return path


def test_writes_replace_the_file_and_leave_no_temporary(tmp_path):
    path = tmp_path / "a" / "b" / "eval.json"  # missing folders are created
    atomic_write_json(path, {"accuracy": 0.5})
    assert path.read_text() == '{\n  "accuracy": 0.5\n}\n'
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert atomic_write_bytes(path, b"\x00\x01") == path and path.read_bytes() == b"\x00\x01"
    assert leftovers(path.parent) == []


def test_crash_halfway_through_writing_keeps_the_old_file(existing):
    def save(fh):
        fh.write(b"new half")
        raise RuntimeError("simulated crash in the middle of torch.save")

    with pytest.raises(RuntimeError, match="simulated crash"):
        atomic_save(existing, save)
    assert existing.read_bytes() == OLD
    assert leftovers(existing.parent) == []


def test_interrupt_halfway_keeps_the_old_file(existing):
    def save(fh):
        fh.write(b"x" * 1000)
        raise KeyboardInterrupt  # not an Exception: must still clean up and propagate

    with pytest.raises(KeyboardInterrupt):
        atomic_save(existing, save)
    assert existing.read_bytes() == OLD and leftovers(existing.parent) == []


def test_failing_rename_keeps_the_old_file(existing, monkeypatch):
    def replace(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(dio.os, "replace", replace)
    with pytest.raises(OutputError) as info:
        atomic_write_bytes(existing, b"new content")
    assert str(existing) in str(info.value)
    assert existing.read_bytes() == OLD and leftovers(existing.parent) == []


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_is_an_output_error_naming_path_and_fix(existing, monkeypatch, where):
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "write":

        def save(fh):
            fh.write(b"y" * 4096)
            raise full
    else:

        def save(fh):
            fh.write(b"y" * 4096)

        def fsync(fd):
            raise full

        monkeypatch.setattr(dio.os, "fsync", fsync)
    with pytest.raises(OutputError) as info:
        atomic_save(existing, save)
    msg = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert str(existing) in msg and "No space left" in msg and "free disk space" in msg
    assert existing.read_bytes() == OLD and leftovers(existing.parent) == []


def test_unwritable_folder_is_an_output_error(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a regular file where a folder should be")  # mkdir fails even for root
    target = blocker / "run" / "task0" / "eval.json"
    with pytest.raises(OutputError) as info:
        atomic_write_json(target, {"a": 1})
    msg = str(info.value)
    assert str(target.parent) in msg and "writable" in msg
    assert blocker.read_text().startswith("a regular file")


def test_json_refuses_nan_before_touching_the_file(existing):
    with pytest.raises(ValueError):
        atomic_write_json(existing, {"accuracy": float("nan")})
    assert existing.read_bytes() == OLD and leftovers(existing.parent) == []


def test_failed_checkpoint_write_leaves_the_task_not_done(tmp_path, make_config, monkeypatch):
    """write_task_outputs is all or nothing: if the checkpoint fails, no eval.json marks the task done."""
    from dmnsp.checkpoint import TaskState, load_checkpoint
    from dmnsp.runner import write_task_outputs

    cfg = make_config()
    state = TaskState(0, {"w": torch.zeros(2)}, {}, [0, 1])
    real = dio.os.fsync

    def fsync(fd):  # the disk fills up while the checkpoint (written last) is flushed
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".checkpoint.pt."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(dio.os, "fsync", fsync)
    with pytest.raises(OutputError, match="checkpoint.pt"):
        write_task_outputs(tmp_path / "task0", state, {"task": 0}, {"task": 0}, cfg)
    assert sorted(p.name for p in (tmp_path / "task0").iterdir()) == []  # no eval.json, no diagnostics
    monkeypatch.setattr(dio.os, "fsync", real)
    write_task_outputs(tmp_path / "task0", state, {"task": 0}, {"task": 0}, cfg)  # the rerun completes it
    assert load_checkpoint(tmp_path / "task0" / "checkpoint.pt", cfg, expect_task=0).seen_classes == [0, 1]


WRITER = textwrap.dedent(
    """
    import sys
    from dmnsp.io import atomic_write_bytes
    path, size = sys.argv[1], int(sys.argv[2])
    i = 0
    atomic_write_bytes(path, bytes([i]) * size)  # one complete version before the kills begin
    print("ready", flush=True)
    while True:
        i += 1
        atomic_write_bytes(path, bytes([i % 251]) * size)
    """
)


def test_sigkill_during_writes_never_leaves_a_partial_file(tmp_path):
    """A process rewriting a 4 MiB file in a loop is SIGKILLed at seeded random moments: the file is
    always one complete version. (A killed process cannot clean up its temporary file; only hidden
    ``.<name>.*.tmp`` files may remain, which never shadow an output.)"""
    import random

    rng = random.Random(1234)
    path, size = tmp_path / "checkpoint.pt", 4 << 20
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(size)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = path.read_bytes()
        assert len(data) == size and data == data[:1] * size
    assert all(name.startswith(".checkpoint.pt.") for name in leftovers(tmp_path))


@settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=5000), fail_at=st.none() | st.integers(min_value=0, max_value=5000))
def test_any_content_round_trips_or_leaves_the_old_file(tmp_path, data, fail_at):
    path = tmp_path / "f.bin"
    path.write_bytes(OLD)

    def save(fh):
        if fail_at is not None and fail_at <= len(data):
            fh.write(data[:fail_at])
            raise OSError(errno.ENOSPC, "No space left on device")
        fh.write(data)

    if fail_at is not None and fail_at <= len(data):
        with pytest.raises(OutputError):
            atomic_save(path, save)
        assert path.read_bytes() == OLD
    else:
        atomic_save(path, save)
        assert path.read_bytes() == data
    assert leftovers(tmp_path) == []
