"""A trial's objective (train every task, score on the validation split) and the worker loop that
runs trials of the shared study until its budget is reached."""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import optuna

from ..metrics import average_incremental_accuracy, last_accuracy
from .spec import OBJECTIVES, SearchError, suggest, trial_config
from .storage import FINISHED, count_finished, load_study, retry_of

# ------------------------------------------------------------------------------------- objective


def objective_value(accuracies: list[float], objective: str) -> float:
    """``avg``: mean accuracy over tasks (Avg); ``last``: accuracy after the last task (Last)."""
    if objective == "avg":
        return average_incremental_accuracy(accuracies)
    if objective == "last":
        return last_accuracy(accuracies)
    raise SearchError(f"unknown objective {objective!r}; use one of {list(OBJECTIVES)}")


_DATA_CACHE: dict[tuple, Any] = {}


def _data_for(cfg: Mapping[str, Any]):
    from ..datasets import load_dataset

    key = (cfg["dataset"], str(cfg["dataset_root"]), bool(cfg["download"]))
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_dataset(*key)
    return _DATA_CACHE[key]


def make_objective(
    spec: Mapping[str, Any], data=None, progress: bool = False
) -> Callable[[optuna.Trial], float]:
    """The objective of a trial: train every task from the suggested setting, score on validation.

    After each task the accuracy over all seen classes (validation split) is reported as step
    ``t`` and the pruner may stop the trial; a diverging setting (NaN/inf) counts as pruned. The
    trial records per step accuracy and the evaluated sample counts as user attributes.

    Args:
        spec: the search spec.
        data: a :class:`dmnsp.datasets.DatasetSplits` to use instead of loading the dataset
            (tests pass one whose test split may not be read).
    """

    def objective(trial: optuna.Trial) -> float:
        from ..runner import Session, run_all
        from ..train import NonFiniteError

        params = suggest(trial, spec["space"])
        cfg = trial_config(spec["base"], params)
        if cfg["evaluate_on"] != "val" or not cfg["val_fraction"] > 0:
            raise SearchError(
                "a trial must evaluate on the validation split (evaluate_on: val, val_fraction > 0)"
            )
        trial.set_user_attr("evaluate_on", cfg["evaluate_on"])
        start = time.perf_counter()
        session = Session(cfg, progress=progress, data=data if data is not None else _data_for(cfg))
        accuracies: list[float] = []

        def on_task_end(t: int, row: dict, diag: dict) -> None:
            accuracies.append(float(row["accuracy"]))
            trial.set_user_attr("accuracy_per_step", list(accuracies))
            trial.set_user_attr("n_samples_per_task", [int(n) for n in row["n_samples_per_task"]])
            trial.report(float(row["accuracy"]), t)
            if t < session.n_tasks - 1 and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after task {t}: accuracy {row['accuracy']:.4f}")

        try:
            run_all(cfg, None, on_task_end, progress=progress, session=session)
        except NonFiniteError as exc:
            trial.set_user_attr("diverged", str(exc))
            raise optuna.TrialPruned(f"diverged: {exc}") from None
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - start, 3))
        return objective_value(accuracies, spec["objective"])

    return objective


# ------------------------------------------------------------------------------------- worker


def run_worker(
    spec: Mapping[str, Any],
    worker: int = 0,
    objective: Callable[[optuna.Trial], float] | None = None,
    data=None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """One worker: run trials of the shared study until it holds ``n_trials`` finished trials.

    Stale trials of killed workers are failed and retried by the storage's heartbeat before each
    trial. ``objective`` replaces the training objective (tests use a cheap one).

    Returns:
        A summary: worker, pid, host, the trial numbers this worker finished, counts, seconds.
    """
    start = time.perf_counter()
    study = load_study(spec, worker)
    target = int(spec["n_trials"])
    before = count_finished(study)
    ran: list[dict] = []
    summary = {"worker": int(worker), "pid": os.getpid(), "host": socket.gethostname(), "n_trials": target}
    if before >= target:
        log(
            f"worker {worker}: the study already holds {before} finished trials (budget {target}); nothing to do"
        )
    else:
        objective = objective or make_objective(spec, data=data, progress=progress)

        def tagged(trial: optuna.Trial) -> float:
            trial.set_user_attr("worker", int(worker))
            trial.set_user_attr("host", summary["host"])
            trial.set_user_attr("pid", summary["pid"])
            return objective(trial)

        def record(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            retried = retry_of(trial)
            ran.append(
                {"number": trial.number, "state": trial.state.name, "value": trial.value, "retry_of": retried}
            )
            extra = f" (retry of trial {retried})" if retried is not None else ""
            value = "" if trial.value is None else f" value {trial.value:.4f}"
            log(
                f"worker {worker}: trial {trial.number} {trial.state.name.lower()}{value}{extra} {trial.params}"
            )

        cap = optuna.study.MaxTrialsCallback(target, states=FINISHED)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(tagged, n_trials=target - before, callbacks=[record, cap], gc_after_trial=True)
    summary.update(
        trials=ran,
        finished_before=before,
        finished_after=count_finished(study),
        seconds=round(time.perf_counter() - start, 3),
    )
    return summary
