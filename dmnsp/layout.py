"""The results tree: where every file of a run lives, and the one place that reads and writes them.

::

    results/
      pretrained/<pretrain_id>/model.pt, model.json, config.yaml, run.json
      <experiment>/
        runs/<run_id>/                  one continual-learning run (run_id: key~value/... parts)
          config.yaml, run.json         resolved run config; provenance (experiment, label, settings)
          task<t>/eval.json             accuracy row after task t
          task<t>/diagnostics.json      training diagnostics of task t
          task<t>/checkpoint.pt         state after task t (eval.json is written after it: all or nothing)
          metrics.json, accuracy_matrix.csv
        tables/, plots/, search/

The planner, the runner, the CLI, the metrics and tables stages and the workflow's input
functions ask this module for paths; nothing else spells a file name of a run folder. Importing it
imports no torch (the workflow reads it at parse time).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, records
from .bounded import BoundsError, loads_json, read_regular_text
from .config import ConfigError, config_hash, dump_config, read_yaml_file
from .io import atomic_write_json, atomic_write_text, json_safe
from .metrics import accuracy_matrix_frame, metrics_from_rows

if TYPE_CHECKING:
    from .checkpoint import TaskState

RESULTS = "results"
CONFIG = "config.yaml"
RUN_INFO = "run.json"
METRICS = "metrics.json"
MATRIX = "accuracy_matrix.csv"
EVAL = "eval.json"
DIAGNOSTICS = "diagnostics.json"
CHECKPOINT = "checkpoint.pt"
#: The files a task job writes, in the order it writes them (eval.json, which marks a task as
#: evaluated, last).
TASK_FILES = (DIAGNOSTICS, CHECKPOINT, EVAL)
#: The files a run writes at its end, from its tasks' records (write_run_metrics), in that order.
RUN_END_FILES = (MATRIX, METRICS)
#: The lock file of a folder a dmnsp process writes into (dmnsp.guard; removed on release). Every
#: writer of a run locks the run folder, one-task jobs included.
LOCK = ".dmnsp.lock"

_TASK_DIR = re.compile(r"^task(\d+)$")


# --------------------------------------------------------------------------- paths
def experiment_dir(experiment: str) -> str:
    return f"{RESULTS}/{experiment}"


def run_dir(experiment: str, run_id: str) -> str:
    """``results/<experiment>/runs/<run_id>`` (wildcard strings such as ``"{run}"`` work too)."""
    return f"{RESULTS}/{experiment}/runs/{run_id}"


def run_file(run: str | Path, name: str) -> str:
    """A run-level file (``CONFIG``, ``RUN_INFO``, ``METRICS``, ``MATRIX``) of a run folder."""
    return f"{run}/{name}"


def task_dir(run: str | Path, task: int | str) -> str:
    """The folder of task ``task`` of a run."""
    return f"{run}/task{task}"


def is_task_dir_name(name: str) -> bool:
    """Whether ``name`` is the name of a task folder (``task<t>``)."""
    return _TASK_DIR.match(name) is not None


def task_file(run: str | Path, task: int | str, name: str) -> str:
    """A file of one task (``EVAL``, ``DIAGNOSTICS``, ``CHECKPOINT``)."""
    return f"{task_dir(run, task)}/{name}"


def pretrain_dir(pretrain_id: str) -> str:
    return f"{RESULTS}/pretrained/{pretrain_id}"


def pretrained_model(pretrain_id: str) -> str:
    """The checkpoint ``dmnsp pretrain`` writes for a pretraining job (a ``.json`` summary beside it)."""
    return f"{pretrain_dir(pretrain_id)}/model.pt"


def search_dir(experiment: str) -> str:
    return f"{RESULTS}/{experiment}/search"


# --------------------------------------------------------------------------- readers
def task_dirs(run: str | Path) -> list[tuple[int, Path]]:
    """``(t, folder)`` of every task folder of a run, ordered by task."""
    found = []
    run = Path(run)
    if run.is_dir():
        for child in run.iterdir():
            match = _TASK_DIR.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
    return sorted(found)


def _task_records(run: str | Path, name: str, check: Callable[[Any, int], dict]) -> list[dict]:
    # exists(), not is_file(): a FIFO or folder in a record's place is refused in one line, not skipped.
    return [_read_record(folder / name, check, t) for t, folder in task_dirs(run) if (folder / name).exists()]


def _read_json(path: Path, fix: str) -> Any:
    """A JSON record dmnsp wrote: bounded (a regular file, size, depth), strict JSON (no NaN literal:
    dmnsp writes non-finite values as strings); a damaged one is a user error naming the file and the fix."""
    try:
        return loads_json(read_regular_text(path, "record"), f"record {path}", allow_nan=False)
    except BoundsError as exc:  # "record PATH is a folder; give ...": the reason, then our fix
        reason = str(exc).removeprefix(f"record {path} ").rsplit("; ", 1)[0]
        raise ConfigError(f"{path} is damaged or unreadable ({reason}); {fix}") from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"{path} is damaged or unreadable ({_first_line(exc)}); {fix}") from None


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."


def _task_fix(path: Path) -> str:
    return f"delete {path.parent} and rerun that task (`snakemake` reruns it, or `dmnsp train-task`)"


def _read_record(path: Path, check: Callable[[Any, int], dict], task: int) -> dict:
    """A task's JSON record, its content checked by ``check`` (:mod:`dmnsp.records`)."""
    fix = _task_fix(path)
    record = _read_json(path, fix)
    try:
        return check(record, task)
    except records.RecordProblem as exc:
        raise ConfigError(f"{path} is not a dmnsp task record: {exc}; {fix}") from None


def eval_record_claims(path: str | Path) -> dict:
    """What an ``eval.json`` claims, unchecked (read bounded; empty when unreadable or absent), for
    the guards that ask whose results a folder holds (``task``, ``config_hash``) before writing into it."""
    try:
        record = _read_json(Path(path), "")
    except ConfigError:
        return {}
    return record if isinstance(record, dict) else {}


def read_eval_rows(run: str | Path) -> list[dict]:
    """All ``task*/eval.json`` records of a run folder, ordered by task (empty when none), each
    checked (:func:`dmnsp.records.check_eval`) and agreeing on the number of tasks."""
    rows = _task_records(run, EVAL, records.check_eval)
    if len({row["n_tasks"] for row in rows}) > 1:
        first = rows[0]
        other = next(row for row in rows if row["n_tasks"] != first["n_tasks"])
        paths = [task_file(run, row["task"], EVAL) for row in (first, other)]
        raise ConfigError(
            f"{paths[1]} says the run has {other['n_tasks']} tasks, {paths[0]} says {first['n_tasks']}: "
            f"they come from different runs; {_task_fix(Path(paths[1]))}"
        )
    return rows


def read_diagnostics(run: str | Path) -> list[dict]:
    """All ``task*/diagnostics.json`` records of a run folder, ordered by task (empty when none),
    each checked (:func:`dmnsp.records.check_diagnostics`)."""
    return _task_records(run, DIAGNOSTICS, records.check_diagnostics)


def has_results(run: str | Path) -> bool:
    """Whether a run folder holds a config or any task's evaluation (else it counts as missing)."""
    run = Path(run)
    return (run / CONFIG).is_file() or any((folder / EVAL).is_file() for _, folder in task_dirs(run))


def read_run_config(run: str | Path) -> dict:
    """The run's resolved ``config.yaml`` (empty when absent); a damaged one is a user error."""
    path = Path(run) / CONFIG
    if not path.is_file():
        return {}
    config = read_yaml_file(path, "run config") or {}
    try:
        return records.check_run_config(config)
    except records.RecordProblem as exc:
        raise ConfigError(
            f"run config {path} is not a dmnsp run config: {exc}; delete it and rewrite it "
            f"(`dmnsp prepare-run`, or `snakemake` reruns prepare_run for {run})"
        ) from None


def read_run_info(run: str | Path) -> dict | None:
    """The run's ``run.json`` (None when absent); a damaged one is a user error naming the file."""
    path = Path(run) / RUN_INFO
    if not path.is_file():
        return None
    fix = f"delete it and rewrite it (`dmnsp prepare-run`, or `snakemake` reruns prepare_run for {run})"
    try:
        return records.check_run_info(_read_json(path, fix))
    except records.RecordProblem as exc:
        raise ConfigError(f"{path} is not a dmnsp run record: {exc}; {fix}") from None


def run_results(run: str | Path) -> list[Path]:
    """The results a run folder holds: ``metrics.json``, ``accuracy_matrix.csv`` and every task
    folder with a task file (empty for a new folder, or one with only ``config.yaml``/``run.json``)."""
    run = Path(run)
    found = [run / name for name in (METRICS, MATRIX) if (run / name).is_file()]
    found += [folder for _, folder in task_dirs(run) if any((folder / name).exists() for name in TASK_FILES)]
    return found


def clear_run(run: str | Path) -> list[Path]:
    """Remove what a run writes into its folder (task folders, metrics, config, provenance); other
    files (logs, a user's own) stay. Returns what was removed.

    Nothing outside the folder is touched: a task folder or file that is a symbolic link is
    unlinked, never followed (shutil.rmtree does not follow the links inside a folder either).
    The run's record (config.yaml, run.json) goes last, so a clear that is killed midway leaves a
    folder that still says whose results it holds.
    """
    import shutil

    run = Path(run)
    removed = []
    for child in sorted(run.iterdir()) if run.is_dir() else []:
        if not is_task_dir_name(child.name):
            continue
        if child.is_symlink():
            child.unlink()
        elif child.is_dir():
            shutil.rmtree(child)
        else:
            continue
        removed.append(child)
    for name in (*RUN_END_FILES, CONFIG, RUN_INFO):
        path = run / name
        if path.is_symlink() or path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def run_metrics(run: str | Path) -> dict[str, Any]:
    """Metrics of one run folder (:func:`dmnsp.metrics.metrics_from_rows` of its task files)."""
    rows, diagnostics = read_eval_rows(run), read_diagnostics(run)
    try:
        return metrics_from_rows(rows, diagnostics)
    except ValueError as exc:  # records valid one by one that cannot be scored together
        raise ConfigError(
            f"the task records of {run} cannot be scored ({_first_line(exc)}); delete the task folders "
            "named and rerun them"
        ) from None


# --------------------------------------------------------------------------- writers
def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_info(
    run: str | Path, cfg: Mapping[str, Any], experiment: str, label: str, settings: Mapping[str, Any]
) -> None:
    """A run folder's ``config.yaml`` (the resolved config) and ``run.json`` (provenance)."""
    dump_config(cfg, Path(run) / CONFIG)
    atomic_write_json(
        Path(run) / RUN_INFO,
        {
            "experiment": experiment,
            "label": label,
            "settings": dict(settings),
            "dmnsp_version": __version__,
            "git_revision": _git_revision(),
            "config_hash": config_hash(cfg),
            # The arithmetic that decides faithful DMNSP's float32 overflow (method.md section 6).
            "numerics": {
                "optimizer": cfg["optimizer"]["numerics"],
                "eig": cfg["projection"]["eig"],
                "order": cfg["projection"]["order"],
                "logit_scale": cfg["logit_scale"],
            },
        },
    )


def write_task_outputs(folder: str | Path, state: TaskState, row: dict, diag: dict, cfg: dict) -> None:
    """One task's folder, all or nothing: diagnostics.json, checkpoint.pt, then eval.json.

    eval.json is what marks a task as evaluated (metrics read it), so it comes last, once the
    checkpoint exists; a failed write removes what this call wrote. Non-finite diagnostics (an
    overflowed lambda product) are written as the strings "inf"/"-inf"/"nan" (io.json_safe).
    """
    from .checkpoint import save_checkpoint  # torch: only where a task is written

    folder = Path(folder)
    written: list[Path] = []
    try:
        written.append(atomic_write_json(folder / DIAGNOSTICS, json_safe(diag)))
        save_checkpoint(folder / CHECKPOINT, state, cfg)
        written.append(folder / CHECKPOINT)
        # The config that trained the task: a later job refuses to replace it with another's.
        written.append(atomic_write_json(folder / EVAL, json_safe({**row, "config_hash": config_hash(cfg)})))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def check_run_dir_exists(run: str | Path) -> None:
    """A run folder to read must exist (a command never creates a folder that holds no run)."""
    if not Path(run).is_dir():
        raise ConfigError(f"run folder {run} does not exist; give the folder that holds task0/, task1/, ...")


def write_run_metrics(run: str | Path) -> dict[str, Any]:
    """Write ``accuracy_matrix.csv`` and ``metrics.json`` of a run folder (atomically); return the metrics.

    ``accuracy_matrix.csv`` holds ``R`` (fractions; empty cells for entries not evaluated or above
    the diagonal). ``metrics.json`` holds :func:`run_metrics` without the matrix.
    """
    check_run_dir_exists(run)
    metrics = run_metrics(run)
    rows = metrics["accuracy_matrix"]
    atomic_write_text(Path(run) / MATRIX, accuracy_matrix_frame(rows).to_csv())
    summary = {key: value for key, value in metrics.items() if key != "accuracy_matrix"}
    atomic_write_json(Path(run) / METRICS, summary)
    return summary
