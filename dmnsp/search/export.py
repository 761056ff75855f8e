"""What a finished search leaves: ``best_params.yaml``, the trials table and Optuna's plots, and the
settings of the follow-up runs of the best setting."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from ..config import read_yaml_file
from ..io import atomic_save, atomic_write_text
from .spec import SearchError
from .storage import load_study, retry_of

#: File names written by :func:`export_study` (plots under ``plots/``).
PLOTS = ("optimization_history", "param_importances", "slice", "contour")


# ------------------------------------------------------------------------------------- export


def trials_table(study: optuna.Study, spec: Mapping[str, Any]):
    """One row per trial: number, state, value, parameters, avg/last on validation, steps done,
    retry origin, worker and seconds (a pandas DataFrame)."""
    import pandas as pd

    rows = []
    for trial in study.get_trials(deepcopy=False):
        accs = trial.user_attrs.get("accuracy_per_step") or []
        row = {"number": trial.number, "state": trial.state.name, "value": trial.value}
        for key in spec["space"]:
            row[key] = trial.params.get(key)
        row["val_avg"] = float(sum(accs) / len(accs)) if accs else None
        row["val_last"] = float(accs[-1]) if accs else None
        row["tasks_done"] = len(accs)
        row["retry_of"] = retry_of(trial)
        row["worker"] = trial.user_attrs.get("worker")
        row["seconds"] = trial.user_attrs.get("seconds")
        rows.append(row)
    columns = [
        "number",
        "state",
        "value",
        *spec["space"],
        "val_avg",
        "val_last",
        "tasks_done",
        "retry_of",
        "worker",
        "seconds",
    ]
    return pd.DataFrame(rows, columns=columns)


def _markdown(df, title: str) -> str:
    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, float):
            return f"{value:.6g}"
        return str(value).replace("|", "\\|")

    lines = [f"# {title}", "", "| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    for record in df.astype(object).itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in record) + " |")
    return "\n".join(lines) + "\n"


def _plot(kind: str, study: optuna.Study, path: Path) -> str | None:
    """Draw one of Optuna's standard plots into ``path``; a captioned placeholder when it cannot be drawn.

    Optuna draws through pyplot; this closes only the figure it drew and never switches the
    global backend (headless, pyplot falls back to Agg by itself; savefig works on any backend).
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from optuna.visualization import matplotlib as ovm

    draw = {
        "optimization_history": ovm.plot_optimization_history,
        "param_importances": ovm.plot_param_importances,
        "slice": ovm.plot_slice,
        "contour": ovm.plot_contour,
    }[kind]
    problem = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if kind == "contour" and len({k for t in complete for k in t.params}) < 2:
                raise ValueError("a contour plot needs at least two searched parameters")
            if kind == "param_importances" and len(complete) < 2:
                raise ValueError("parameter importances need at least two complete trials")
            axes = draw(study)
            fig = np.ravel(axes)[0].figure
        except Exception as exc:  # noqa: BLE001 - any plotting failure becomes a placeholder
            problem = f"{kind.replace('_', ' ')}: not drawn ({exc})"
            fig = Figure(figsize=(6, 2))
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
            ax.axis("off")
            ax.text(0.5, 0.5, problem, ha="center", va="center", wrap=True)
    fig.set_size_inches(max(fig.get_size_inches()[0], 6), max(fig.get_size_inches()[1], 4))
    atomic_save(path, lambda fh: fig.savefig(fh, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return problem


def export_study(spec: Mapping[str, Any], out_dir: str | Path) -> dict:
    """Write ``best_params.yaml``, ``trials.csv``, ``trials.md`` and ``plots/<name>.png`` of the study.

    Stale RUNNING trials (killed workers) are marked FAIL first, without a retry.

    Raises:
        SearchError: when no trial completed (nothing to report; see the worker logs).
    """
    out = Path(out_dir)
    study = load_study(spec, retry=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        states = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
        raise SearchError(
            f"study {spec['study_name']!r} has no complete trial ({states}); see the search worker logs"
        )
    best = study.best_trial
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    result = {
        "experiment": spec["experiment"],
        "study_name": spec["study_name"],
        "objective": f"{spec['objective']} accuracy on the validation split",
        "value": float(best.value),
        "trial": best.number,
        "params": {k: best.params[k] for k in spec["space"] if k in best.params},
        "trials": counts,
    }
    header = (
        "# Best setting of the hyperparameter search (dmnsp search-export).\n"
        "# `params` are run keys; the follow-up runs use them on the test set.\n"
    )
    atomic_write_text(out / "best_params.yaml", header + yaml.safe_dump(result, sort_keys=False))
    table = trials_table(study, spec)
    atomic_write_text(out / "trials.csv", table.to_csv(index=False))
    atomic_write_text(out / "trials.md", _markdown(table, f"Trials of study {spec['study_name']}"))
    problems = {}
    for kind in PLOTS:
        problem = _plot(kind, study, out / "plots" / f"{kind}.png")
        if problem:
            problems[kind] = problem
    result["plots_not_drawn"] = problems
    return result


# ------------------------------------------------------------------------------------- follow-up


def read_best(path: str | Path) -> dict:
    """The ``params`` of a ``best_params.yaml``."""
    path = Path(path)
    if not path.is_file():
        raise SearchError(f"{path} does not exist; run `dmnsp search-export` first")
    data = read_yaml_file(path, "best parameters file", SearchError)
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise SearchError(f"{path} holds no 'params' mapping")
    return data["params"]


def followup_settings(settings: Mapping[str, Any], best: Mapping[str, Any]) -> dict:
    """A follow-up run's settings: its base settings (flat, dotted) with the best parameters set.

    The follow-up runs are evaluated on the test set: ``evaluate_on`` must not be ``val`` here.
    """
    out = dict(settings)
    out.update(best)
    if out.get("evaluate_on", "test") != "test":
        raise SearchError(
            "a follow-up run of the best setting is evaluated on the test set (evaluate_on: test)"
        )
    return out
