"""Guards of the folders a command writes into: finished results are never replaced silently.

* :func:`locked`: one dmnsp process per folder. An exclusive ``flock`` on ``<folder>/.dmnsp.lock``,
  which records the holder (pid, host, command, start) for the message a second process gets;
  the kernel releases the lock when its process ends however it ends, so a lock file left by a
  killed process is stale by construction: the next process takes it over (saying so).
* :func:`claim_run_dir` (``dmnsp run --out-dir``): a folder holding another config's results (or
  this config's finished results) is refused unless ``--overwrite``, which clears them first.
* :func:`check_task_dir` (``dmnsp train-task``): a task never writes into its ``--resume``
  checkpoint's folder nor over another task's results.

Errors are :class:`~dmnsp.config.ConfigError` (one line, exit 2 at the CLI).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import layout
from .config import ConfigError, config_diff, config_hash
from .io import OutputError


class FolderInUseError(ConfigError):
    """Another process holds the folder's lock."""


def _holder(path: Path) -> dict:
    """The holder record of a lock file (empty when unreadable: it is being written or was never)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')}, `{holder.get('command')}` since {since}"


def _open_locked(path: Path, folder: Path) -> int:
    """A descriptor of the lock file, locked exclusively (retried if the holder removed the file)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderInUseError(
                    f"{folder} is in use by another dmnsp process ({_describe(_holder(path))}); "
                    "wait for it to finish or choose another output folder"
                ) from None
            raise OutputError(
                exc.errno,
                f"cannot lock {path} ({exc.strerror}); choose an output folder on a file system with locks",
            ) from None
        try:  # the previous holder unlinks the file on release: lock the file that is there now
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def locked(folder: str | Path, command: str = "dmnsp") -> Iterator[Path]:
    """Hold ``folder``'s lock (creating the folder) for the ``with`` block; yields the folder.

    Raises:
        FolderInUseError: another process holds the lock (its pid, host and command are named).
        OutputError: the folder cannot be created or locked.
    """
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            exc.errno, f"cannot write into {folder}: {exc.strerror}; choose another output folder"
        ) from None
    path = folder / layout.LOCK
    fd = _open_locked(path, folder)
    try:
        stale = _holder(path)
        if stale and stale.get("pid") != os.getpid():
            print(
                f"note: {folder} was locked by a process that ended without releasing it "
                f"({_describe(stale)}); taking the lock over",
                file=sys.stderr,
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield folder
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        if created:  # a command that failed before writing anything leaves no folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty


def claim_run_dir(run: str | Path, cfg: dict, overwrite: bool = False) -> None:
    """Make ``run`` ready for a whole run of ``cfg`` (``dmnsp run --out-dir``), under its lock.

    A folder without results is used as it is. One holding results of another config (another
    ``config_hash`` in ``run.json``, or results without a ``run.json``), or the finished results of
    this config, is refused unless ``overwrite``; then, and for this config's unfinished results
    (a killed run started again), what the run writes is removed first, so no file of the old run
    (a ``metrics.json`` of five tasks beside a two-task config) survives beside the new one.
    """
    run = Path(run)
    results = layout.run_results(run)
    if not results:
        return
    old = _previous(run)
    same = old is not None and old.get("config_hash") == config_hash(cfg)
    if not overwrite:
        if not same:
            raise ConfigError(f"{run} holds results of {_other(run, old, cfg)}; {_overwrite_fix(run)}")
        if _finished(run):
            raise ConfigError(
                f"{run} already holds the finished results of this config; {_overwrite_fix(run)}"
            )
        print(f"note: {run} holds unfinished results of this config: starting the run again", file=sys.stderr)
    layout.clear_run(run)


def _previous(run: Path) -> dict | None:
    try:
        return layout.read_run_info(run)
    except ConfigError:
        return None  # damaged: counts as another config's results


def _other(run: Path, old: dict | None, cfg: dict) -> str:
    if old is None:
        return "an unknown config (no readable run.json)"
    try:
        differences = config_diff(layout.read_run_config(run), cfg)
    except ConfigError:
        differences = []
    shown = "; ".join(differences[:3]) + ("; ..." if len(differences) > 3 else "")
    return f"another config (config_hash {old.get('config_hash')}{': ' + shown if shown else ''})"


def _finished(run: Path) -> bool:
    try:
        return bool(layout.run_metrics(run)["complete"])
    except (ConfigError, ValueError):
        return True  # records that do not add up: never thrown away without --overwrite


def _overwrite_fix(run: Path) -> str:
    return f"choose another --out-dir, or pass --overwrite to delete them and run again in {run}"


def check_task_dir(out_dir: str | Path, task: int, resume: str | Path | None) -> None:
    """``dmnsp train-task``: refuse an ``--out-dir`` that is the ``--resume`` checkpoint's folder, or
    that holds another task's results (each task has its own folder, ``<run>/task<t>``)."""
    out = Path(out_dir)
    if resume is not None and out.resolve() == Path(resume).resolve().parent:
        raise ConfigError(
            f"--out-dir {out_dir} is the folder of the --resume checkpoint (task {task - 1}'s results); "
            f"task {task} writes into its own folder, e.g. {layout.task_dir(out.parent, task)}"
        )
    evaluation = out / layout.EVAL
    if evaluation.is_file():
        done = layout.eval_record_task(evaluation)
        if done != task:
            raise ConfigError(
                f"--out-dir {out_dir} holds the results of task {done} ({evaluation}); task {task} "
                f"writes into its own folder, e.g. {layout.task_dir(out.parent, task)}"
            )
