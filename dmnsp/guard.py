"""Guards of the folders a command writes into: finished results are never replaced silently.

* :func:`locked`: one dmnsp process per folder. An exclusive ``flock`` on ``<folder>/.dmnsp.lock``,
  which records the holder (pid, host, command, start) for the message a second process gets;
  the kernel releases the lock when its process ends however it ends, so a lock file left by a
  killed process is stale by construction: the next process takes it over (saying so). The lock
  file is never followed: a symbolic link, hard link, FIFO or folder at its path is refused, and
  on release only the file this process locked is removed.
* One lock per run: every writer of a run folder (``run``, chunk and one-task ``train-task``
  jobs, ``prepare-run``, ``metrics``) locks the run folder itself (:func:`run_lock_folder`: a
  one-task job's ``--out-dir RUN/task<t>`` locks RUN), so no two processes write one run.
* :func:`claim_run_dir` (``dmnsp run --out-dir``): a folder holding another config's results (or
  this config's finished results) is refused unless ``--overwrite``, which clears them first; one
  holding this config's finished tasks without the files a run writes at its end (a run killed
  there) is finished, not trained again.
* :func:`check_task_dir` (``dmnsp train-task``): a task never writes into its ``--resume``
  checkpoint's folder, over another task's results, nor over another config's finished task.

Errors are :class:`~dmnsp.config.ConfigError` (one line, exit 2 at the CLI).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import socket
import stat
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import layout
from .config import ConfigError, config_diff, config_hash
from .io import OutputError

#: The most bytes of a lock file read for its holder record (dmnsp writes ~150).
_RECORD_BYTES = 4096


class FolderInUseError(ConfigError):
    """Another process holds the folder's lock."""


def run_lock_folder(out_dir: str | Path) -> Path:
    """The folder whose lock a job writing ``out_dir`` takes: the run folder for a task folder
    (``RUN/task<t>``: every writer of a run takes the run's one lock), else ``out_dir`` itself."""
    out = Path(out_dir)
    return out.parent if layout.is_task_dir_name(out.name) else out


def _holder(fd: int) -> dict:
    """The holder record in an open lock file (empty when unreadable: being written, or not ours)."""
    try:
        record = json.loads(os.pread(fd, _RECORD_BYTES, 0))
    except (OSError, ValueError, RecursionError):
        return {}
    return record if isinstance(record, dict) else {}


def _text(value: object) -> str:
    """A record's field for a one-line message: control characters escaped, length bounded."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value)[:200])
    return text if len(str(value)) <= 200 else text + "..."


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    pid = holder.get("pid")
    described = f"pid {pid if type(pid) is int else '?'} on host {_text(holder.get('host'))}, `{_text(holder.get('command'))}`"
    started = holder.get("started")
    if isinstance(started, int | float) and math.isfinite(started) and 0 <= started < 2**35:
        described += " since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    return described


def _not_a_lock_file(path: Path, st: os.stat_result) -> ConfigError | None:
    """Why ``path`` (lstat ``st``) is not a lock file dmnsp may open and write, or None."""
    fix = "choose another output folder"
    if stat.S_ISLNK(st.st_mode):
        try:
            target = f" (to {_text(os.readlink(path))})"
        except OSError:
            target = ""
        return ConfigError(
            f"{path} is a symbolic link{target}, not dmnsp's lock file, and dmnsp never writes through "
            f"a link: remove the link (its target is left alone) or {fix}"
        )
    if stat.S_ISDIR(st.st_mode):
        return ConfigError(f"{path} is a folder, not dmnsp's lock file: remove it or {fix}")
    if not stat.S_ISREG(st.st_mode):
        return ConfigError(
            f"{path} is not a regular file (a FIFO, socket or device), not dmnsp's lock file: remove it or {fix}"
        )
    if st.st_nlink != 1:
        return ConfigError(
            f"{path} has {st.st_nlink} hard links (another path shares the file), not dmnsp's lock file: "
            f"remove it (the other paths keep their data) or {fix}"
        )
    return None


def _open_error(path: Path, folder: Path, exc: OSError) -> Exception:
    if exc.errno in (errno.ELOOP, errno.EMLINK, errno.EISDIR, errno.ENXIO):  # not a file: say what it is
        with contextlib.suppress(OSError):
            why = _not_a_lock_file(path, os.lstat(path))
            if why is not None:
                return why
    if exc.errno == errno.EROFS:
        how = "read-only file system; choose an output folder on a writable file system"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        how = f"permission denied; make {folder} writable or choose another output folder"
    else:
        how = f"{exc.strerror}; choose another output folder"
    return OutputError(exc.errno, f"cannot create the lock file {path}: {how}")


def _open_lock_file(path: Path, folder: Path) -> int:
    """A descriptor of the regular, singly linked file ``path`` (created if absent), never
    following a link: checked before opening, opened with O_NOFOLLOW, and checked again."""
    with contextlib.suppress(FileNotFoundError):
        why = _not_a_lock_file(path, os.lstat(path))
        if why is not None:
            raise why
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        raise _open_error(path, folder, exc) from None
    why = _not_a_lock_file(path, os.fstat(fd))  # replaced between the check and the open
    if why is not None:
        os.close(fd)
        raise why
    return fd


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` (not followed) is still the file open as ``fd``."""
    try:
        here, mine = os.lstat(path), os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISREG(here.st_mode) and (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def _open_locked(path: Path, folder: Path) -> int:
    """A descriptor of the lock file, locked exclusively (retried if the holder removed the file)."""
    while True:
        fd = _open_lock_file(path, folder)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderInUseError(
                    f"{folder} is in use by another dmnsp process ({_describe(holder)}); "
                    "wait for it to finish or choose another output folder"
                ) from None
            raise OutputError(
                exc.errno,
                f"cannot lock {path} ({exc.strerror}); choose an output folder on a file system with locks",
            ) from None
        if _same_file(fd, path):  # the previous holder unlinks the file on release: lock the file there now
            return fd
        os.close(fd)


@contextmanager
def locked(folder: str | Path, command: str = "dmnsp") -> Iterator[Path]:
    """Hold ``folder``'s lock (creating the folder) for the ``with`` block; yields the folder.

    Raises:
        FolderInUseError: another process holds the lock (its pid, host and command are named).
        ConfigError: the lock path is a link, a folder or another file that is not a lock file.
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
    try:
        fd = _open_locked(path, folder)
    except BaseException:
        _remove_if_empty(folder, created)
        raise
    try:
        stale = _holder(fd)
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
        if _same_file(fd, path):  # only the file this process locked, never a link put there since
            with contextlib.suppress(OSError):
                path.unlink()
        os.close(fd)
        _remove_if_empty(folder, created)


def _remove_if_empty(folder: Path, created: bool) -> None:
    if created:  # a command that failed before writing anything leaves no folder behind
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds when empty


def claim_run_dir(run: str | Path, cfg: dict, overwrite: bool = False) -> bool:
    """Make ``run`` ready for a whole run of ``cfg`` (``dmnsp run --out-dir``), under its lock.

    A folder without results is used as it is. One holding results of another config (another
    ``config_hash`` in ``run.json``, or results without a ``run.json``), or the finished results of
    this config, is refused unless ``overwrite``; then, and for this config's unfinished results
    (a killed run started again), what the run writes is removed first, so no file of the old run
    (a ``metrics.json`` of five tasks beside a two-task config) survives beside the new one.

    Returns:
        False when the folder holds this config's finished tasks but not every file a run writes
        at its end (:data:`~dmnsp.layout.RUN_END_FILES`: the run was killed between its last
        ``eval.json`` and ``metrics.json``): the caller writes those and trains nothing. True when
        the run is to be trained.
    """
    run = Path(run)
    results = layout.run_results(run)
    if not results:
        return True
    old = _previous(run)
    same = old is not None and old.get("config_hash") == config_hash(cfg)
    if not overwrite:
        if not same:
            raise ConfigError(f"{run} holds results of {_other(run, old, cfg)}; {_overwrite_fix(run)}")
        if _finished(run):
            missing = [name for name in layout.RUN_END_FILES if not (run / name).is_file()]
            if missing:
                print(
                    f"note: {run} holds the finished tasks of this config without {' and '.join(missing)} "
                    "(the run was stopped at its end): writing them, no task is trained again",
                    file=sys.stderr,
                )
                return False
            raise ConfigError(
                f"{run} already holds the finished results of this config; {_overwrite_fix(run)}"
            )
        print(f"note: {run} holds unfinished results of this config: starting the run again", file=sys.stderr)
    try:
        layout.clear_run(run)
    except OSError as exc:
        raise OutputError(
            exc.errno,
            f"cannot remove {exc.filename or run} ({exc.strerror}); remove it by hand and run again",
        ) from None
    return True


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


def check_task_dir(out_dir: str | Path, task: int, resume: str | Path | None, cfg: dict) -> None:
    """``dmnsp train-task``: refuse an ``--out-dir`` that is the ``--resume`` checkpoint's folder, that
    holds another task's results (each task has its own folder, ``<run>/task<t>``), or that holds
    task ``task`` finished by another config (its ``eval.json``'s ``config_hash``, else the
    checkpoint beside it). The same config's finished task is trained again (a rerun of the job)."""
    out = Path(out_dir)
    if resume is not None and out.resolve() == Path(resume).resolve().parent:
        raise ConfigError(
            f"--out-dir {out_dir} is the folder of the --resume checkpoint (task {task - 1}'s results); "
            f"task {task} writes into its own folder, e.g. {layout.task_dir(out.parent, task)}"
        )
    evaluation = out / layout.EVAL
    if not evaluation.is_file():
        return
    record = layout.eval_record_claims(evaluation)
    done = record.get("task")
    if done != task:
        raise ConfigError(
            f"--out-dir {out_dir} holds the results of task {done} ({evaluation}); task {task} "
            f"writes into its own folder, e.g. {layout.task_dir(out.parent, task)}"
        )
    other = _other_task_config(out, record, task, cfg)
    if other is not None:
        raise ConfigError(
            f"{out} holds the finished task {task} of {other}; train this config in another run folder, "
            f"or delete {out} to replace that task by this config's"
        )


def _other_task_config(out: Path, record: dict, task: int, cfg: dict) -> str | None:
    """None when the finished task in ``out`` is of ``cfg``; else which config it is of."""
    mine = config_hash(cfg)
    recorded = record.get("config_hash")
    if recorded is not None:
        if recorded == mine:
            return None
        return f"another config (config_hash {_text(recorded)}, this config's is {mine})"
    checkpoint = out / layout.CHECKPOINT  # written before config hashes were recorded in eval.json
    if not checkpoint.is_file():
        return f"an unknown config (no config_hash in {out / layout.EVAL} and no checkpoint; this config's is {mine})"
    from .checkpoint import CheckpointError, load_checkpoint

    try:
        load_checkpoint(checkpoint, cfg, expect_task=task)
    except CheckpointError as exc:
        return f"another config (by its checkpoint: {exc})"
    return None
