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

import json
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
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
#: The lock file of a folder a dmnsp process writes into (dmnsp.guard; removed on release).
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


def _task_records(run: str | Path, name: str) -> list[dict]:
    return [_read_record(folder / name) for _, folder in task_dirs(run) if (folder / name).is_file()]


def _read_record(path: Path) -> dict:
    """A task's JSON record; a damaged one is a user error naming the file and the fix."""
    fix = f"delete {path.parent} and rerun that task (`snakemake` reruns it, or `dmnsp train-task`)"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"{path} is damaged or unreadable ({exc}); {fix}") from None
    if not isinstance(record, dict) or not isinstance(record.get("task"), int):
        raise ConfigError(f"{path} is not a dmnsp task record (no integer 'task'); {fix}")
    return record


def read_eval_rows(run: str | Path) -> list[dict]:
    """All ``task*/eval.json`` records of a run folder, ordered by task (empty when none)."""
    return _task_records(run, EVAL)


def read_diagnostics(run: str | Path) -> list[dict]:
    """All ``task*/diagnostics.json`` records of a run folder, ordered by task (empty when none)."""
    return _task_records(run, DIAGNOSTICS)


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
    if not isinstance(config, dict):
        raise ConfigError(
            f"run config {path} is not a mapping of run keys; delete it and rewrite it "
            f"(`dmnsp prepare-run`, or `snakemake` reruns prepare_run for {run})"
        )
    return config


def read_run_info(run: str | Path) -> dict | None:
    """The run's ``run.json`` (None when absent); a damaged one is a user error naming the file."""
    path = Path(run) / RUN_INFO
    if not path.is_file():
        return None
    fix = f"delete it and rewrite it (`dmnsp prepare-run`, or `snakemake` reruns prepare_run for {run})"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"{path} is damaged or unreadable ({exc}); {fix}") from None
    if not isinstance(info, dict):
        raise ConfigError(f"{path} is not a dmnsp run record (not a JSON object); {fix}")
    return info


def run_results(run: str | Path) -> list[Path]:
    """The results a run folder holds: ``metrics.json``, ``accuracy_matrix.csv`` and every task
    folder with a task file (empty for a new folder, or one with only ``config.yaml``/``run.json``)."""
    run = Path(run)
    found = [run / name for name in (METRICS, MATRIX) if (run / name).is_file()]
    found += [folder for _, folder in task_dirs(run) if any((folder / name).exists() for name in TASK_FILES)]
    return found


def clear_run(run: str | Path) -> list[Path]:
    """Remove what a run writes into its folder (config, provenance, metrics, task folders); other
    files (logs, a user's own) stay. Returns what was removed."""
    import shutil

    run = Path(run)
    removed = []
    for name in (METRICS, MATRIX, CONFIG, RUN_INFO):
        if (run / name).is_file():
            (run / name).unlink()
            removed.append(run / name)
    for _, folder in task_dirs(run):
        shutil.rmtree(folder)
        removed.append(folder)
    return removed


def run_metrics(run: str | Path) -> dict[str, Any]:
    """Metrics of one run folder (:func:`dmnsp.metrics.metrics_from_rows` of its task files)."""
    return metrics_from_rows(read_eval_rows(run), read_diagnostics(run))


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
        written.append(atomic_write_json(folder / EVAL, json_safe(row)))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def write_run_metrics(run: str | Path) -> dict[str, Any]:
    """Write ``accuracy_matrix.csv`` and ``metrics.json`` of a run folder (atomically); return the metrics.

    ``accuracy_matrix.csv`` holds ``R`` (fractions; empty cells for entries not evaluated or above
    the diagonal). ``metrics.json`` holds :func:`run_metrics` without the matrix.
    """
    if not Path(run).is_dir():  # never create a folder that holds no run
        raise ConfigError(f"run folder {run} does not exist; give the folder that holds task0/, task1/, ...")
    metrics = run_metrics(run)
    rows = metrics["accuracy_matrix"]
    atomic_write_text(Path(run) / MATRIX, accuracy_matrix_frame(rows).to_csv())
    summary = {key: value for key, value in metrics.items() if key != "accuracy_matrix"}
    atomic_write_json(Path(run) / METRICS, summary)
    return summary
