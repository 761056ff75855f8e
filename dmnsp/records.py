"""What the JSON records of a run folder may hold: the content checks :mod:`dmnsp.layout`'s readers
apply once, as they read a record, so that every later use (metrics, tables, plots, guards) can
trust its types and ranges.

A record a crashed job, a disk error, a hand edit or an attacker left behind gets exactly one
problem, phrased to follow the file's name in a one-line error ("``accuracy`` is 1.5, not a
fraction in [0, 1]"). Fields the readers do not use are not checked (newer dmnsp versions may add
some); fields they use are, by type, range and agreement with each other. Importing this module
imports nothing heavy (the workflow reads the layout at parse time).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

#: Most tasks a run may have: far above any class-incremental benchmark (TinyImageNet in steps of
#: one class has 200), and bounds the accuracy matrix read from a record (T x T floats, 8 MB).
MAX_TASKS = 1000
#: The strings :func:`dmnsp.io.json_safe` writes for a non-finite diagnostic (an overflowed lambda).
NON_FINITE = ("inf", "-inf", "nan")


class RecordProblem(ValueError):
    """One thing wrong in a record; the reader adds the file's name and the fix."""


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def integer(record: Mapping, key: str, low: int = 0, high: int | None = None, required: bool = True) -> None:
    """``record[key]`` is an integer in ``low..high`` (absent or null allowed when not required)."""
    value = record.get(key)
    if value is None:
        if required:
            raise RecordProblem(
                f"it has no {key!r}" if key not in record else f"{key!r} is null, not an integer"
            )
        return
    if not _is_int(value):
        raise RecordProblem(f"{key!r} is {_shown(value)}, not an integer")
    if value < low or (high is not None and value > high):
        span = f"{low}..{high}" if high is not None else f"at least {low}"
        raise RecordProblem(f"{key!r} is {_shown(value)}, outside {span}")


def number(value: Any, what: str, low: float | None = None, high: float | None = None) -> None:
    """``value`` is a finite number in ``[low, high]``."""
    if not _is_number(value):
        raise RecordProblem(f"{what} is {_shown(value)}, not a number")
    if not _finite_float(value):  # an int too large for a float is not finite either
        raise RecordProblem(f"{what} is {_shown(value)}, not a finite number")
    if (low is not None and value < low) or (high is not None and value > high):
        span = (
            "a fraction in [0, 1]"
            if (low, high) == (0.0, 1.0)
            else f"in [{low}, {high if high is not None else 'inf'}]"
        )
        raise RecordProblem(f"{what} is {_shown(value)}, not {span}")


def _finite_float(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def diagnostic(value: Any, what: str) -> None:
    """A diagnostic number: finite, null, or one of the strings :data:`NON_FINITE`."""
    if value is None or value in NON_FINITE:
        return
    if not _is_number(value) or not _finite_float(value):
        raise RecordProblem(
            f"{what} is {_shown(value)}, not a number (non-finite values are written as {list(NON_FINITE)})"
        )


def listing(record: Mapping, key: str, length: int | None = None, required: bool = False) -> list | None:
    """``record[key]`` as a list (of ``length`` items when given); None when absent or null."""
    value = record.get(key)
    if value is None:
        if required:
            raise RecordProblem(f"it has no {key!r}" if key not in record else f"{key!r} is null")
        return None
    if not isinstance(value, list):
        raise RecordProblem(f"{key!r} is {_shown(value)}, not a list")
    if length is not None and len(value) != length:
        raise RecordProblem(f"{key!r} has {len(value)} entries, expected {length}")
    return value


def mapping(record: Mapping, key: str) -> dict | None:
    """``record[key]`` as an object; None when absent or null."""
    value = record.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RecordProblem(f"{key!r} is {_shown(value)}, not an object")
    return value


def counts(record: Mapping, key: str, length: int | None = None) -> list[int] | None:
    """``record[key]``: a list of non-negative integers (absent or null: None)."""
    values = listing(record, key, length)
    for i, value in enumerate(values or ()):
        if not _is_int(value) or value < 0:
            raise RecordProblem(f"{key}[{i}] is {_shown(value)}, not a count")
    return values


def _object(record: Any) -> Mapping:
    if not isinstance(record, dict):
        raise RecordProblem(f"it holds {type(record).__name__} {_shown(record, 40)}, not a JSON object")
    return record


def _task(record: Mapping, task: int | None) -> int:
    integer(record, "task", 0, MAX_TASKS - 1)
    if task is not None and record["task"] != task:
        raise RecordProblem(f"'task' is {record['task']}, but the file lies in the folder of task {task}")
    return record["task"]


# --------------------------------------------------------------------------- eval.json
def check_eval(record: Any, task: int | None = None) -> dict:
    """An ``eval.json`` record (:func:`dmnsp.evaluate.evaluate_seen`) of task ``task``.

    ``task``, ``n_tasks``, ``accuracy_per_task`` (``task + 1`` fractions) and ``accuracy`` are
    required; ``null`` accuracies only where no image was evaluated. Counts are non-negative
    integers that add up; seconds and memory finite and non-negative.
    """
    record = _object(record)
    t = _task(record, task)
    integer(record, "n_tasks", 1, MAX_TASKS)
    if t >= record["n_tasks"]:
        raise RecordProblem(f"'task' is {t}, but 'n_tasks' is {record['n_tasks']}")
    sizes = counts(record, "n_samples_per_task", t + 1)
    integer(record, "n_samples", 0, required=False)
    n_samples = record.get("n_samples")
    if sizes is not None and n_samples is not None and sum(sizes) != n_samples:
        raise RecordProblem(f"'n_samples' is {n_samples}, but 'n_samples_per_task' adds up to {sum(sizes)}")
    per_task = listing(record, "accuracy_per_task", t + 1, required=True)
    for j, value in enumerate(per_task):
        if value is None and sizes is not None and sizes[j] == 0:
            continue  # a task without held-out images has no accuracy
        number(value, f"accuracy_per_task[{j}]", 0.0, 1.0)
    if "accuracy" not in record:
        raise RecordProblem("it has no 'accuracy'")
    if record["accuracy"] is not None or n_samples != 0:
        number(record["accuracy"], "'accuracy'", 0.0, 1.0)
    predictions = counts(record, "predictions_per_class")
    if predictions is not None:
        labels = counts(record, "labels_per_class", len(predictions))
        if n_samples is None:
            raise RecordProblem("it has 'predictions_per_class' but no 'n_samples'")
        for key, values in (("predictions_per_class", predictions), ("labels_per_class", labels)):
            if values is not None and sum(values) != n_samples:
                raise RecordProblem(f"{key!r} adds up to {sum(values)}, but 'n_samples' is {n_samples}")
    _resources(record)
    return record


def _resources(record: Mapping) -> None:
    for key in ("seconds", "peak_mem_mb", "run_seconds"):
        if record.get(key) is not None:
            number(record[key], repr(key), 0.0)


# --------------------------------------------------------------------------- diagnostics.json
def check_diagnostics(record: Any, task: int | None = None) -> dict:
    """A ``diagnostics.json`` record (:func:`dmnsp.train.train_task`) of task ``task``: the fields the
    metrics and plots read (seconds per phase, peak memory, lambda matrices, update norms, inf
    fractions) have their types; non-finite diagnostics are the strings :data:`NON_FINITE`."""
    record = _object(record)
    _task(record, task)
    integer(record, "steps", 0, required=False)
    for phase, value in (mapping(record, "seconds") or {}).items():
        if value is not None:
            number(value, f"seconds[{phase!r}]", 0.0)
    if record.get("peak_mem_mb") is not None:
        number(record["peak_mem_mb"], "'peak_mem_mb'", 0.0)
    for key in ("lambda", "lambda_text"):
        rows = listing(record, key)
        for i, row in enumerate(rows or ()):
            if not isinstance(row, list) or len(row) != len(rows):
                raise RecordProblem(f"{key!r} is not a square matrix (row {i} is {_shown(row, 40)})")
            for j, value in enumerate(row):
                diagnostic(value, f"{key}[{i}][{j}]")
    for i, value in enumerate(listing(record, "lambda_factor_visual") or ()):
        diagnostic(value, f"lambda_factor_visual[{i}]")
    for key in ("update_norm", "inf_fraction_exp_avg_sq"):
        for tower, value in (mapping(record, key) or {}).items():
            diagnostic(value, f"{key}[{tower!r}]")
    return record


# --------------------------------------------------------------------------- run.json
def check_run_info(record: Any) -> dict:
    """A ``run.json`` record (:func:`dmnsp.layout.write_run_info`): ``experiment``, ``label`` and
    ``config_hash`` are text, ``settings`` an object of the swept settings."""
    record = _object(record)
    for key in ("experiment", "label", "config_hash", "dmnsp_version", "git_revision"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise RecordProblem(f"{key!r} is {_shown(record[key])}, not text")
    mapping(record, "settings")
    mapping(record, "numerics")
    return record


# --------------------------------------------------------------------------- config.yaml
#: Keys of a run's config.yaml the tables and plots read, with what each must be (a run written by
#: an older dmnsp may miss some: absent keys are not checked).
_RUN_CONFIG_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "dataset": ("text", lambda v: isinstance(v, str)),
    "method": ("text", lambda v: isinstance(v, str)),
    "model_name": ("text", lambda v: isinstance(v, str)),
    "pretrained": ("text or null", lambda v: v is None or isinstance(v, str)),
    "evaluate_on": ("text or null", lambda v: v is None or isinstance(v, str)),
    "initial_increment": ("a positive integer", lambda v: _is_int(v) and 0 < v),
    "increment": ("a positive integer", lambda v: _is_int(v) and 0 < v),
    "seed": ("an integer or null", lambda v: v is None or _is_int(v)),
    "projection": ("an object or null", lambda v: v is None or isinstance(v, dict)),
    **{
        key: ("a finite number or null", lambda v: v is None or (_is_number(v) and _finite_float(v)))
        for key in ("TOP_SELECT", "TOP_K_RATIO", "LAMBDA_SCALE", "lr", "epochs")
    },
}


def check_run_config(config: Any) -> dict:
    """A run's resolved ``config.yaml``, as far as the results stage reads it."""
    if not isinstance(config, dict):
        raise RecordProblem(f"it is not a mapping of run keys (it holds a {type(config).__name__})")
    for key, (want, ok) in _RUN_CONFIG_TYPES.items():
        if key in config and not ok(config[key]):
            raise RecordProblem(f"{key!r} is {_shown(config[key])}, not {want}")
    return config
