"""Where a search's trials live: a journal file or an SQL database, both with heartbeats of running
trials so that a killed worker's trial is failed and retried; creating and loading the study."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from .spec import SearchError

#: States that count towards the trial budget.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: Trial system attribute holding the last heartbeat (seconds since the epoch) in a journal file.
HEARTBEAT_ATTR = "dmnsp:heartbeat"


# ------------------------------------------------------------------------------------- storage


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Journal storage whose running trials record heartbeats, like ``RDBStorage(heartbeat_interval=...)``.

    A heartbeat is a trial system attribute (:data:`HEARTBEAT_ATTR`) rewritten every
    ``heartbeat_interval`` seconds by Optuna's heartbeat thread. A RUNNING trial whose last
    heartbeat (and start) lie more than ``grace_period`` seconds back is stale: Optuna's
    ``fail_stale_trials``, which ``study.optimize`` calls before every trial, marks it FAIL and runs
    ``heartbeat_stale_trial_callback`` (a retry). Clocks of machines sharing the file must agree.
    """

    def __init__(
        self,
        backend: JournalFileBackend,
        heartbeat_interval: int,
        grace_period: int | None = None,
        heartbeat_stale_trial_callback: Callable | None = None,
    ) -> None:
        super().__init__(backend)
        self._heartbeat_interval = int(heartbeat_interval)
        self._grace_period = int(grace_period) if grace_period else 2 * self._heartbeat_interval
        self._stale_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            if self.get_trial(trial_id).state == TrialState.RUNNING:
                self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except (optuna.exceptions.UpdateFinishedTrialError, KeyError):
            pass  # finished (or failed by another worker) meanwhile: nothing to keep alive

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_ATTR)
            if beat is None:
                continue  # never beaten: not started under a heartbeat (as RDBStorage)
            started = trial.datetime_start.timestamp() if trial.datetime_start else beat
            # A retried trial inherits its predecessor's attributes: its own start counts too.
            if now - max(float(beat), started) > self._grace_period:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable | None:
        return self._stale_callback


def is_url(storage: str) -> bool:
    """True for an SQLAlchemy URL (``postgresql+psycopg://...``), False for a journal file path."""
    head, sep, _ = storage.partition("://")
    return bool(sep) and head.replace("+", "").replace("_", "").isalnum()


def open_storage(spec: Mapping[str, Any], retry: bool = True) -> optuna.storages.BaseStorage:
    """The study's storage, with heartbeats and retries of stale trials.

    ``spec["storage"]`` is a journal file path (created with its folder) or an SQLAlchemy URL;
    ``$VARS`` in it are expanded from the environment here, so a password need not be written into
    the config (``postgresql+psycopg://user:${PGPASSWORD}@host/db``).

    Args:
        spec: the search spec (``storage``, ``heartbeat_interval``, ``grace_period``, ``max_retry``).
        retry: re-enqueue stale trials (False for read-only uses such as the export).
    """
    target = os.path.expandvars(str(spec["storage"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        callback = RetryHeartbeatStaleTrialCallback(max_retry=spec["max_retry"]) if retry else None
    kwargs = {"heartbeat_interval": spec["heartbeat_interval"], "grace_period": spec["grace_period"]}
    if is_url(target):
        engine = {"pool_pre_ping": True} if not target.startswith("sqlite") else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                target, engine_kwargs=engine, heartbeat_stale_trial_callback=callback, **kwargs
            )
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    return HeartbeatJournalStorage(
        JournalFileBackend(str(path)), heartbeat_stale_trial_callback=callback, **kwargs
    )


def _sampler(spec: Mapping[str, Any], worker: int) -> optuna.samplers.BaseSampler:
    """The sampler of one worker: seeded with ``seed + worker`` so workers do not draw alike."""
    cfg = spec["sampler"]
    seed = int(cfg["seed"]) + int(worker)
    if cfg["name"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    kwargs = {} if cfg["n_startup_trials"] is None else {"n_startup_trials": int(cfg["n_startup_trials"])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, **kwargs)


def _pruner(spec: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    cfg = spec["pruner"]
    if cfg["name"] == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=int(cfg["n_startup_trials"]), n_warmup_steps=int(cfg["n_warmup_steps"])
    )


def retry_of(trial: optuna.trial.FrozenTrial) -> int | None:
    """The number of the trial that ``trial`` re-runs after its worker died (None for a fresh trial)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def count_finished(study: optuna.Study) -> int:
    """Trials that count towards the budget (complete or pruned)."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


# ------------------------------------------------------------------------------------- study


def create_study(spec: Mapping[str, Any]) -> dict:
    """Create the study, or load it when it exists (a re-run resumes; trials are kept).

    Returns:
        ``{"study_name", "storage", "existing_trials", "created"}`` for ``study.json``.
    """
    storage = open_storage(spec, retry=False)
    created = spec["study_name"] not in optuna.study.get_all_study_names(storage)
    study = optuna.create_study(
        study_name=spec["study_name"], storage=storage, direction=spec["direction"], load_if_exists=True
    )
    old_space = study.user_attrs.get("space")
    if old_space is not None and old_space != spec["space"]:
        print(f"note: the search space differs from the one the study started with: {old_space}", flush=True)
    study.set_user_attr("space", spec["space"])
    study.set_user_attr("objective", spec["objective"])
    study.set_user_attr("experiment", spec["experiment"])
    study.set_user_attr("n_trials", spec["n_trials"])
    return {
        "study_name": spec["study_name"],
        "storage": str(spec["storage"]),
        "existing_trials": len(study.trials),
        "created": created,
    }


def load_study(spec: Mapping[str, Any], worker: int = 0, retry: bool = True) -> optuna.Study:
    """The existing study with this worker's sampler and the pruner."""
    try:
        return optuna.load_study(
            study_name=spec["study_name"],
            storage=open_storage(spec, retry=retry),
            sampler=_sampler(spec, worker),
            pruner=_pruner(spec),
        )
    except KeyError:
        raise SearchError(
            f"no study {spec['study_name']!r} in {spec['storage']}; run `dmnsp search-create` first"
        ) from None
