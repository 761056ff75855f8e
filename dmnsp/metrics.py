"""Continual-learning metrics over an accuracy matrix, and the per-run metrics files.

Conventions (method.md section 8):

- ``R`` is a square ``T x T`` array. Row ``i`` holds the accuracies measured right after training
  task ``i``; column ``j`` is task ``j``'s test data. Only the lower triangle (``j <= i``) is
  meaningful; entries above the diagonal are ignored (they are NaN in files written here).
- ``A`` is the vector of accuracies on all seen test data, ``A[i]`` measured after task ``i``
  (sample-weighted over the seen tasks).
- Accuracies are fractions in ``[0, 1]``; every function rejects values outside that range.

Every function here is pure: arrays or records in, numbers out. Reading and writing a run
folder's files is :mod:`dmnsp.layout`'s job.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "average_incremental_accuracy",
    "last_accuracy",
    "forgetting",
    "backward_transfer",
    "forgetting_continuum",
    "bwt_continuum",
    "accuracy_matrix_from_rows",
    "metrics_from_rows",
    "accuracy_matrix_frame",
]

_TOL = 1e-9


# --------------------------------------------------------------------------- input checks
def _as_accuracy_vector(A: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(A, dtype=float)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"expected a non-empty 1-D accuracy vector, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("accuracy vector contains NaN or inf; pass only the steps that were evaluated")
    _check_fractions(a)
    return a


def _check_fractions(values: np.ndarray) -> None:
    if values.min() < -_TOL or values.max() > 1 + _TOL:
        raise ValueError(
            f"accuracies must be fractions in [0, 1], got range [{values.min():g}, {values.max():g}]"
            " (divide percentages by 100)"
        )


def _as_accuracy_matrix(R: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    r = np.asarray(R, dtype=float)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"expected a square, non-empty T x T accuracy matrix, got shape {r.shape}")
    lower = r[np.tril_indices(r.shape[0])]
    if not np.all(np.isfinite(lower)):
        raise ValueError("accuracy matrix has NaN or inf on or below the diagonal (a task was not evaluated)")
    _check_fractions(lower)
    return r


def _check_result(value: float, low: float, high: float, name: str) -> float:
    if not (low - _TOL <= value <= high + _TOL):
        raise AssertionError(f"{name} = {value!r} outside its possible range [{low}, {high}]")
    return float(value)


# --------------------------------------------------------------------------- metrics
def average_incremental_accuracy(A: Sequence[float] | np.ndarray) -> float:
    """Average incremental accuracy, ``Avg = mean_i A_i``. Higher is better.

    Rebuffi et al., "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017; the
    "Avg" column of the CLIP class-incremental papers (Continual-CLIP, MoE-Adapters4CL, DMNSP).

    Args:
        A: accuracy on all seen test data after each step, fractions in [0, 1].

    Returns:
        The mean over steps, in [0, 1].
    """
    a = _as_accuracy_vector(A)
    return _check_result(float(a.mean()), 0.0, 1.0, "average_incremental_accuracy")


def last_accuracy(A: Sequence[float] | np.ndarray) -> float:
    """Last accuracy, ``Last = A_{T-1}`` (accuracy on all test data after the final task). Higher is better.

    The "Last" column of the CLIP class-incremental papers (Continual-CLIP, MoE-Adapters4CL, DMNSP).

    Args:
        A: accuracy on all seen test data after each step, fractions in [0, 1].

    Returns:
        The final entry, in [0, 1].
    """
    a = _as_accuracy_vector(A)
    return _check_result(float(a[-1]), 0.0, 1.0, "last_accuracy")


def forgetting(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Average forgetting after the final task (Chaudhry et al. 2018). Lower is better.

    Chaudhry, Dokania, Ajanthan, Torr, "Riemannian Walk for Incremental Learning: Understanding
    Forgetting and Intransigence", ECCV 2018: with ``k = T-1`` the final step,
    ``f_j = max_{l in [j, k-1]} R[l, j] - R[k, j]`` for every earlier task ``j < k``, and the
    forgetting is ``mean_j f_j``. (Rows ``l < j`` are skipped: task ``j`` was not trained yet.)
    Defined as 0 for a single task.

    Returns:
        A value in [-1, 1]; 0 means no forgetting, negative means the old tasks improved.
    """
    r = _as_accuracy_matrix(R)
    k = r.shape[0] - 1
    if k == 0:
        return 0.0
    drops = [r[j:k, j].max() - r[k, j] for j in range(k)]
    return _check_result(float(np.mean(drops)), -1.0, 1.0, "forgetting")


def backward_transfer(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Backward transfer, GEM definition. Higher is better (negative values mean forgetting).

    Lopez-Paz and Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017:
    ``BWT = 1/(T-1) * sum_{j < T-1} (R[T-1, j] - R[j, j])``. Defined as 0 for a single task.

    Returns:
        A value in [-1, 1].
    """
    r = _as_accuracy_matrix(R)
    last = r.shape[0] - 1
    if last == 0:
        return 0.0
    diffs = [r[last, j] - r[j, j] for j in range(last)]
    return _check_result(float(np.mean(diffs)), -1.0, 1.0, "backward_transfer")


def forgetting_continuum(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Forgetting as computed by the ``continuum`` 1.2.7 library. Lower is better.

    Reproduces the formula behind the published CLIP class-incremental numbers (method.md
    section 8), odd index ranges included: with ``k = T``,
    ``(1/(k-1)) * sum_{j=0}^{k-3} [max_{l in [j, k-3]} R[l, j] - R[k-1, j]]`` (both ends inclusive).
    Unlike :func:`forgetting`, the second-to-last task and the second-to-last row never enter, and
    the sum is still divided by ``k-1``. Defined as 0 for ``k = 1`` (``k = 2`` gives 0 as well: the
    sum is empty).

    Returns:
        A value in [-1, 1].
    """
    r = _as_accuracy_matrix(R)
    k = r.shape[0]
    if k == 1:
        return 0.0
    total = 0.0
    for j in range(k - 2):  # j = 0 .. k-3
        total += r[j : k - 2, j].max() - r[k - 1, j]  # l = j .. k-3
    return _check_result(total / (k - 1), -1.0, 1.0, "forgetting_continuum")


def bwt_continuum(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Backward transfer as computed by the ``continuum`` 1.2.7 library. Higher is better.

    Reproduces the formula behind the published CLIP class-incremental numbers (method.md
    section 8), odd index ranges included: with ``k = T``,
    ``sum_{i=1}^{k-1} sum_{j=0}^{i-2} (R[i, j] - R[j, j]) / (k(k-1)/2)``. Every row after the first
    enters (not only the last), the task just before row ``i`` is skipped, and the divisor counts
    pairs that are never summed. Defined as 0 for ``k = 1``.

    Returns:
        A value in [-1, 1].
    """
    r = _as_accuracy_matrix(R)
    k = r.shape[0]
    if k == 1:
        return 0.0
    total = 0.0
    for i in range(1, k):
        for j in range(i - 1):  # j = 0 .. i-2
            total += r[i, j] - r[j, j]
    return _check_result(total / (k * (k - 1) / 2), -1.0, 1.0, "bwt_continuum")


# --------------------------------------------------------------------------- from eval.json rows
def accuracy_matrix_from_rows(rows: Iterable[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, bool]:
    """Assemble ``R`` and ``A`` from per-task evaluation records (the ``eval.json`` dicts).

    Args:
        rows: records with ``task``, ``n_tasks``, ``accuracy_per_task`` (``t+1`` fractions) and
            ``accuracy``, in any order; tasks may be missing.

    Returns:
        ``(R, A, complete)``: ``R`` is ``T x T`` with NaN above the diagonal and in rows of tasks not
        evaluated, ``A`` has NaN for those tasks, and ``complete`` is True when every task
        ``0..T-1`` has a record.

    Raises:
        ValueError: on an empty input, inconsistent ``n_tasks``, duplicate tasks, a row of the wrong
            length or accuracies outside [0, 1].
    """
    rows = list(rows)
    if not rows:
        raise ValueError("no evaluation records given")
    n_tasks = {int(row["n_tasks"]) for row in rows}
    if len(n_tasks) != 1:
        raise ValueError(f"evaluation records disagree on n_tasks: {sorted(n_tasks)}")
    T = n_tasks.pop()
    if T < 1:
        raise ValueError(f"n_tasks must be at least 1, got {T}")
    R = np.full((T, T), np.nan)
    A = np.full(T, np.nan)
    seen: set[int] = set()
    for row in rows:
        t = int(row["task"])
        if not 0 <= t < T:
            raise ValueError(f"task {t} outside 0..{T - 1}")
        if t in seen:
            raise ValueError(f"task {t} appears twice")
        seen.add(t)
        per_task = np.asarray(row["accuracy_per_task"], dtype=float)
        if per_task.shape != (t + 1,):
            raise ValueError(f"task {t}: accuracy_per_task has {per_task.size} entries, expected {t + 1}")
        R[t, : t + 1] = per_task
        A[t] = float(row["accuracy"])
        weights = row.get("n_samples_per_task")
        if weights is not None and len(weights) == t + 1 and sum(weights) > 0:
            weighted = float(np.dot(per_task, weights) / sum(weights))
            if abs(weighted - A[t]) > 1e-4:
                warnings.warn(
                    f"task {t}: accuracy {A[t]:.6f} differs from the sample-weighted mean of"
                    f" accuracy_per_task ({weighted:.6f})",
                    stacklevel=2,
                )
    values = np.concatenate([R[np.isfinite(R)], A[np.isfinite(A)]])
    if values.size and (values.min() < -_TOL or values.max() > 1 + _TOL):
        raise ValueError(
            f"accuracies must be fractions in [0, 1], got range [{values.min():g}, {values.max():g}]"
        )
    return R, A, seen == set(range(T))


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _done_prefix(A: np.ndarray) -> int:
    missing = np.flatnonzero(~np.isfinite(A))
    return int(missing[0]) if missing.size else int(A.size)


def _matrix_metrics(R: np.ndarray, A: np.ndarray, done: int) -> dict[str, float | None]:
    names = ("avg", "last", "forgetting", "bwt", "forgetting_continuum", "bwt_continuum")
    if done == 0:
        return dict.fromkeys(names)
    Rp, Ap = R[:done, :done], A[:done]
    return {
        "avg": average_incremental_accuracy(Ap),
        "last": last_accuracy(Ap),
        "forgetting": forgetting(Rp),
        "bwt": backward_transfer(Rp),
        "forgetting_continuum": forgetting_continuum(Rp),
        "bwt_continuum": bwt_continuum(Rp),
    }


def _resources(
    eval_rows: list[Mapping[str, Any]], diag_rows: list[Mapping[str, Any]]
) -> tuple[float | None, float | None]:
    """Wall seconds over all tasks (training, the method's own phases, evaluation counted once) and
    the peak memory."""
    eval_seconds = {int(r["task"]): float(r["seconds"]) for r in eval_rows if r.get("seconds") is not None}
    seconds: list[float] = list(eval_seconds.values())
    memory = [float(r["peak_mem_mb"]) for r in (*eval_rows, *diag_rows) if r.get("peak_mem_mb") is not None]
    for row in diag_rows:
        # The runner copies eval.json's seconds into the diagnostics as `eval`: count them once.
        counted = int(row["task"]) in eval_seconds
        for key, value in (row.get("seconds") or {}).items():
            if value is not None and not (key == "eval" and counted):
                seconds.append(float(value))
    return (float(sum(seconds)) if seconds else None), (max(memory) if memory else None)


def metrics_from_rows(
    eval_rows: Sequence[Mapping[str, Any]], diag_rows: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Metrics of one run from its tasks' evaluation records (``eval.json``) and diagnostics.

    An incomplete run (some tasks not evaluated) is scored on the tasks ``0..d-1`` evaluated so far,
    with ``complete: False`` and ``n_tasks_done: d``; its ``avg``/``last`` are then *not* the final
    numbers. A run folder with no evaluation yet gives ``None`` metrics.

    Returns:
        ``{avg, last, accuracy_per_step, forgetting, bwt, forgetting_continuum, bwt_continuum,
        n_tasks, n_tasks_done, complete, wall_seconds, peak_mem_mb, accuracy_matrix}`` with
        accuracies as fractions; ``accuracy_matrix`` is ``R`` as nested lists (None for unknown
        entries). ``wall_seconds`` sums, over tasks, the diagnostics' seconds (training and the
        method's own phases, e.g. DMNSP's lambda and basis) and the evaluation seconds (``eval.json``'s, else the diagnostics' ``eval``: the
        runner writes the same number in both, so it is counted once); ``peak_mem_mb`` is the
        maximum over both files.
    """
    eval_rows, diag_rows = list(eval_rows), list(diag_rows)
    wall, peak = _resources(eval_rows, diag_rows)
    if not eval_rows:
        out: dict[str, Any] = _matrix_metrics(np.empty((0, 0)), np.empty(0), 0)
        out.update(
            accuracy_per_step=[],
            n_tasks=None,
            n_tasks_done=0,
            complete=False,
            wall_seconds=wall,
            peak_mem_mb=peak,
            accuracy_matrix=[],
        )
        return out
    R, A, complete = accuracy_matrix_from_rows(eval_rows)
    done = _done_prefix(A)
    out = _matrix_metrics(R, A, done)
    out.update(
        accuracy_per_step=[_finite_or_none(a) for a in A],
        n_tasks=int(A.size),
        n_tasks_done=done,
        complete=bool(complete),
        wall_seconds=wall,
        peak_mem_mb=peak,
        accuracy_matrix=[[_finite_or_none(v) for v in row] for row in R],
    )
    return out


def accuracy_matrix_frame(R: np.ndarray | Sequence[Sequence[float | None]]) -> pd.DataFrame:
    """``R`` (an array, or nested lists with None for unknown entries) as a DataFrame with rows
    ``after_task_i`` and columns ``task_j``."""
    import pandas as pd  # only the metrics stage writes tables; task jobs never load pandas

    R = np.asarray(R, dtype=float).reshape(len(R), len(R))
    return pd.DataFrame(
        R,
        index=pd.Index([f"after_task_{i}" for i in range(R.shape[0])], name="trained"),
        columns=[f"task_{j}" for j in range(R.shape[1])],
    )
