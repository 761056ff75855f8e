"""Metrics on tiny hand-made accuracy matrices with exact answers, and the per-run metrics files."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from dmnsp import layout
from dmnsp import metrics as M
from dmnsp.config import ConfigError

nan = math.nan

# R3: rows = after training task i, columns = task j (NaN above the diagonal is ignored).
R3 = [
    [0.90, nan, nan],
    [0.60, 0.80, nan],
    [0.50, 0.70, 0.95],
]
# Worked by hand for R3 (k = 3 tasks):
#   forgetting (Chaudhry): j=0: max(R00, R10) - R20 = 0.9 - 0.5 = 0.4
#                          j=1: max(R11)      - R21 = 0.8 - 0.7 = 0.1      -> mean = 0.25
#   BWT (GEM):             j=0: R20 - R00 = -0.4;  j=1: R21 - R11 = -0.1   -> mean = -0.25
#   forgetting_continuum:  j = 0 .. k-3 = 0 only, l in [0, 0]: R00 - R20 = 0.4; / (k-1) = 2 -> 0.2
#   bwt_continuum:         i=1: j in 0..-1 (none); i=2: j=0: R20 - R00 = -0.4; / (3*2/2) = 3 -> -0.4/3

R4 = [
    [1.00, nan, nan, nan],
    [0.80, 0.90, nan, nan],
    [0.60, 0.95, 0.90, nan],
    [0.70, 0.50, 0.60, 0.80],
]
# Worked by hand for R4 (k = 4 tasks); R21 = 0.95 is the best value of task 1 but lies in row k-2,
# which the continuum forgetting never looks at:
#   forgetting (Chaudhry): j=0: max(1.0, 0.8, 0.6) - 0.7 = 0.30
#                          j=1: max(0.9, 0.95)     - 0.5 = 0.45
#                          j=2: max(0.9)           - 0.6 = 0.30           -> 1.05 / 3 = 0.35
#   BWT (GEM):             (0.7-1.0) + (0.5-0.9) + (0.6-0.9) = -1.0       -> -1/3
#   forgetting_continuum:  j = 0..1, l in [j, 1]:
#                          j=0: max(R00, R10) - R30 = 1.0 - 0.7 = 0.3
#                          j=1: max(R11)      - R31 = 0.9 - 0.5 = 0.4     -> 0.7 / 3 = 0.2333...
#   bwt_continuum:         i=2, j=0: R20 - R00 = -0.4
#                          i=3, j=0: R30 - R00 = -0.3;  j=1: R31 - R11 = -0.4
#                          sum = -1.1, / (4*3/2) = 6                     -> -0.18333...

R2 = [
    [0.90, nan],
    [0.70, 0.80],
]
# R2: forgetting 0.9-0.7 = 0.2; BWT -0.2; both continuum sums are empty -> 0.

R1 = [[0.75]]  # a single task: every forgetting/transfer metric is defined as 0

CASES = [
    # (function, input, expected)
    (M.average_incremental_accuracy, [0.9, 0.8, 0.7], 0.8),
    (M.average_incremental_accuracy, [0.5], 0.5),
    (M.last_accuracy, [0.9, 0.8, 0.7], 0.7),
    (M.last_accuracy, [1.0], 1.0),
    (M.forgetting, R3, 0.25),
    (M.backward_transfer, R3, -0.25),
    (M.forgetting_continuum, R3, 0.2),
    (M.bwt_continuum, R3, -0.4 / 3),
    (M.forgetting, R4, 0.35),
    (M.backward_transfer, R4, -1.0 / 3),
    (M.forgetting_continuum, R4, 0.7 / 3),
    (M.bwt_continuum, R4, -1.1 / 6),
    (M.forgetting, R2, 0.2),
    (M.backward_transfer, R2, -0.2),
    (M.forgetting_continuum, R2, 0.0),
    (M.bwt_continuum, R2, 0.0),
    (M.forgetting, R1, 0.0),
    (M.backward_transfer, R1, 0.0),
    (M.forgetting_continuum, R1, 0.0),
    (M.bwt_continuum, R1, 0.0),
    # No forgetting at all: an identity-like matrix of ones.
    (M.forgetting, np.tril(np.ones((3, 3))), 0.0),
    (M.bwt_continuum, np.tril(np.ones((3, 3))), 0.0),
    # The old task improves after the new one is learned: negative forgetting, positive BWT.
    (M.backward_transfer, [[0.5, nan], [0.7, 0.9]], 0.2),
    (M.forgetting, [[0.5, nan], [0.7, 0.9]], -0.2),
]


@pytest.mark.parametrize(
    ("fn", "given", "expected"), CASES, ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)]
)
def test_metric_exact(fn, given, expected):
    assert fn(given) == pytest.approx(expected, abs=1e-12)


def test_upper_triangle_is_ignored():
    filled = np.array(R4)
    filled[np.triu_indices(4, k=1)] = 0.123
    for fn in (M.forgetting, M.backward_transfer, M.forgetting_continuum, M.bwt_continuum):
        assert fn(filled) == pytest.approx(fn(R4))


BAD_MATRICES = [
    ([[1.2]], "fractions in \\[0, 1\\]"),
    ([[0.9, nan], [-0.1, 0.8]], "fractions"),
    ([[90.0, nan], [70.0, 80.0]], "divide percentages"),
    ([[0.9, nan], [nan, 0.8]], "NaN or inf"),
    ([[0.9, 0.8]], "square"),
    (np.zeros((0, 0)), "square"),
]


@pytest.mark.parametrize(("given", "match"), BAD_MATRICES)
@pytest.mark.parametrize("fn", [M.forgetting, M.backward_transfer, M.forgetting_continuum, M.bwt_continuum])
def test_matrix_range_errors(fn, given, match):
    with pytest.raises(ValueError, match=match):
        fn(given)


@pytest.mark.parametrize("given", [[1.01], [-0.2, 0.5], [50.0, 40.0], [nan, 0.5], [], [[0.5]]])
@pytest.mark.parametrize("fn", [M.average_incremental_accuracy, M.last_accuracy])
def test_vector_range_errors(fn, given):
    with pytest.raises(ValueError):
        fn(given)


# --------------------------------------------------------------------------- eval.json rows
def _row(t, n_tasks, accs):
    return {
        "task": t,
        "n_tasks": n_tasks,
        "accuracy_per_task": accs,
        "n_samples_per_task": [10] * len(accs),
        "accuracy": float(np.mean(accs)),
    }


def test_accuracy_matrix_from_rows_any_order():
    rows = [_row(2, 3, [0.5, 0.7, 0.95]), _row(0, 3, [0.9]), _row(1, 3, [0.6, 0.8])]
    R, A, complete = M.accuracy_matrix_from_rows(rows)
    np.testing.assert_allclose(R, np.array(R3), equal_nan=True)
    np.testing.assert_allclose(A, [0.9, 0.7, np.mean([0.5, 0.7, 0.95])])
    assert complete is True


def test_accuracy_matrix_from_rows_incomplete():
    R, A, complete = M.accuracy_matrix_from_rows([_row(0, 3, [0.9]), _row(1, 3, [0.6, 0.8])])
    assert complete is False
    assert np.isnan(A[2]) and np.isnan(R[2]).all()


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([], "no evaluation records"),
        ([_row(0, 2, [0.9]), _row(1, 3, [0.5, 0.5])], "n_tasks"),
        ([_row(0, 2, [0.9]), _row(0, 2, [0.8])], "twice"),
        ([_row(1, 2, [0.9])], "entries, expected 2"),
        ([_row(2, 2, [0.9, 0.9, 0.9])], "outside"),
        ([_row(0, 1, [1.5])], "fractions"),
    ],
)
def test_accuracy_matrix_from_rows_errors(rows, match):
    with pytest.raises(ValueError, match=match):
        M.accuracy_matrix_from_rows(rows)


def test_weighted_accuracy_mismatch_warns():
    row = _row(1, 2, [0.5, 0.9]) | {"accuracy": 0.1}
    with pytest.warns(UserWarning, match="sample-weighted"):
        M.accuracy_matrix_from_rows([_row(0, 2, [0.9]), row])


# --------------------------------------------------------------------------- run folder files
def _write_task(run, t, n_tasks, accs, eval_seconds=2.0, mem=100.0):
    folder = run / f"task{t}"
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(
        json.dumps(_row(t, n_tasks, accs) | {"seconds": eval_seconds, "peak_mem_mb": mem})
    )
    diag = {
        "task": t,
        "lambda": None,
        "seconds": {"train": 10.0, "basis": 1.0, "lambda": 0.5, "eval": 0.25},
        "peak_mem_mb": mem * 2,
    }
    (folder / "diagnostics.json").write_text(json.dumps(diag))


def test_write_run_metrics(tmp_path):
    run = tmp_path / "run"
    for t, accs in enumerate([[0.9], [0.6, 0.8], [0.5, 0.7, 0.95]]):
        _write_task(run, t, 3, accs, mem=100.0 + t)
    out = layout.write_run_metrics(run)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == out
    assert saved["complete"] is True and saved["n_tasks"] == 3 and saved["n_tasks_done"] == 3
    assert saved["forgetting"] == pytest.approx(0.25)
    assert saved["forgetting_continuum"] == pytest.approx(0.2)
    assert saved["bwt_continuum"] == pytest.approx(-0.4 / 3)
    assert saved["avg"] == pytest.approx(np.mean([0.9, 0.7, np.mean([0.5, 0.7, 0.95])]))
    assert saved["accuracy_per_step"][1] == pytest.approx(0.7)
    # 3 tasks x (2.0 eval + 10 train + 1 basis + 0.5 lambda); the diagnostics' eval copy is not counted twice.
    assert saved["wall_seconds"] == pytest.approx(3 * 13.5)
    assert saved["peak_mem_mb"] == pytest.approx(204.0)
    matrix = pd.read_csv(run / "accuracy_matrix.csv", index_col=0)
    assert list(matrix.index) == ["after_task_0", "after_task_1", "after_task_2"]
    assert list(matrix.columns) == ["task_0", "task_1", "task_2"]
    assert matrix.loc["after_task_2", "task_1"] == pytest.approx(0.7)
    assert np.isnan(matrix.loc["after_task_0", "task_2"])
    assert not list(run.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_wall_seconds_fall_back_to_the_diagnostics_eval_time(tmp_path):
    run = tmp_path / "run"
    _write_task(run, 0, 1, [0.9])
    row = json.loads((run / "task0/eval.json").read_text())
    del row["seconds"]
    (run / "task0/eval.json").write_text(json.dumps(row))
    assert layout.run_metrics(run)["wall_seconds"] == pytest.approx(10.0 + 1.0 + 0.5 + 0.25)


def test_run_metrics_incomplete_and_empty(tmp_path):
    run = tmp_path / "run"
    _write_task(run, 0, 3, [0.9])
    _write_task(run, 1, 3, [0.6, 0.8])
    out = layout.run_metrics(run)
    assert out["complete"] is False and out["n_tasks_done"] == 2 and out["n_tasks"] == 3
    assert out["last"] == pytest.approx(0.7)  # last step reached so far, flagged by complete=False
    assert out["accuracy_per_step"][2] is None
    (tmp_path / "nothing").mkdir()
    empty = layout.write_run_metrics(tmp_path / "nothing")
    assert empty["avg"] is None and empty["complete"] is False and empty["n_tasks_done"] == 0
    with pytest.raises(ConfigError, match="does not exist"):  # a missing folder is not created
        layout.write_run_metrics(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
