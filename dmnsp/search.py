"""Optuna hyperparameter search over run settings, scored on a validation split, never the test set.

The workflow config's ``search:`` section names an experiment, a search space over run keys, an
objective (``avg`` or ``last`` accuracy on the validation split), a trial budget and a number of
workers. The pieces, one per CLI command (``workflow/rules/search.smk`` is a thin shell over them):

* :func:`plan_search` (Snakefile parse time, no data): the *spec* of the search, a plain dict
  written once to ``results/<experiment>/search/spec.yaml`` (trial base settings, parsed space,
  storage, sampler, pruner, budget), and the follow-up runs of the best setting, which join the
  experiment's runs and tables under the label ``<method> (searched)``.
* :func:`open_storage`: a journal file (a path; ``JournalFileBackend``) or any SQLAlchemy URL
  (PostgreSQL, MySQL, SQLite). Both record heartbeats of running trials, so a trial whose worker
  was killed is marked FAIL by the next worker that starts a trial and re-enqueued with the same
  parameters (``RetryHeartbeatStaleTrialCallback``); Optuna's journal storage has no heartbeat of
  its own, :class:`HeartbeatJournalStorage` adds one.
* :func:`create_study` (``dmnsp search-create``): the study, created once before any worker starts
  (concurrent creation races), or loaded when it exists, so a re-run resumes it.
* :func:`run_worker` (``dmnsp search-worker``): one worker process; every worker shares the study
  and stops when the study holds ``n_trials`` finished (complete or pruned) trials, counted over
  all workers (``MaxTrialsCallback``; up to ``workers - 1`` more under a race).
* :func:`export_study` (``dmnsp search-export``): ``best_params.yaml``, the trials table (CSV and
  markdown) and Optuna's standard plots as PNG.
* :func:`followup_settings` (``dmnsp search-prepare-run``): the settings of a follow-up run, the
  base settings plus the best parameters, evaluated on the test set like every grid run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import EXECUTION_KEYS, ConfigError, read_yaml_file, validate

try:
    import optuna
    from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState
except ImportError as _exc:  # pragma: no cover - the [search] extra is missing
    raise ImportError(
        f"dmnsp.search needs Optuna 5 ({_exc}); install the search extra: pip install 'dmnsp[search]'"
    ) from _exc

SPEC_VERSION = 1

#: Settings of the ``search:`` section and their defaults (the workflow schema states the same).
SEARCH_DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "experiment": None,
    "method": "dmnsp",
    "dataset": None,
    "split": None,
    "seed": None,
    "objective": "avg",
    "val_fraction": 0.1,
    "n_trials": 20,
    "workers": 2,
    "storage": None,
    "study_name": None,
    "space": {},
    "trial_run": {},
    "sampler": {},
    "pruner": {},
    "heartbeat_interval": 60,
    "grace_period": 180,
    "max_retry": 1,
    "resources": {},
}
SAMPLER_DEFAULTS: dict[str, Any] = {"name": "tpe", "seed": 0, "n_startup_trials": None}
PRUNER_DEFAULTS: dict[str, Any] = {"name": "median", "n_startup_trials": 3, "n_warmup_steps": 1}
PARAM_TYPES = ("int", "float", "log", "categorical")
OBJECTIVES = ("avg", "last")

#: Run keys a search may not vary: the scenario and its split, the seed, where things are and
#: how fast they run, and everything the pretraining of a small model depends on.
FORBIDDEN_KEYS = EXECUTION_KEYS | frozenset(
    {
        "dataset",
        "initial_increment",
        "increment",
        "method",
        "seed",
        "val_fraction",
        "data_seed",
        "class_order",
        "class_order_seed",
        "pretrained",
        "max_test_per_class",
        "pretrain_per_class",
        "precision",
        "model_name",
    }
)
#: States that count towards the trial budget.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: Trial system attribute holding the last heartbeat (seconds since the epoch) in a journal file.
HEARTBEAT_ATTR = "dmnsp:heartbeat"
#: File names written by :func:`export_study` (plots under ``plots/``).
PLOTS = ("optimization_history", "param_importances", "slice", "contour")
SEARCH_LABEL = "searched"
SEARCH_RUN_PART = "search~best"


class SearchError(ConfigError):
    """The search configuration or its study cannot be used; the message says what to change."""


# ------------------------------------------------------------------------------------- space


def parse_space(space: Mapping[str, Any] | None) -> dict[str, dict]:
    """Normalise a search space: run key (dotted for nested keys) → one distribution.

    Each entry is ``{type: int|float|log|categorical, ...}``: ``low``/``high`` (inclusive) for
    numbers, optional ``step`` (int and float) and ``log: true`` (int and float; ``type: log`` is a
    float on a log scale), ``choices`` for categorical.

    Returns:
        ``{key: {"type": "int"|"float"|"categorical", "low", "high", "step", "log", "choices"}}``.

    Raises:
        SearchError: naming ``search.space.<key>`` and what is wrong.
    """
    if not isinstance(space, Mapping) or not space:
        raise SearchError("'search.space' must map at least one run key to a distribution")
    out = {}
    for key, spec in space.items():
        where = f"'search.space.{key}'"
        if not isinstance(spec, Mapping):
            raise SearchError(
                f"{where} must be a mapping such as {{type: float, low: 0.0001, high: 0.01, log: true}}"
            )
        kind = spec.get("type")
        if kind not in PARAM_TYPES:
            raise SearchError(f"{where}: type {kind!r} is not one of {list(PARAM_TYPES)}")
        allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "step", "log"}
        extra = sorted(set(spec) - allowed)
        if extra:
            raise SearchError(f"{where}: unknown field(s) {extra} for type {kind}; use {sorted(allowed)}")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise SearchError(f"{where}: categorical needs a non-empty 'choices' list")
            if any(not (c is None or isinstance(c, (bool, int, float, str))) for c in choices):
                raise SearchError(f"{where}: choices must be numbers, strings, booleans or null")
            if len({json.dumps(c) for c in choices}) != len(choices):
                raise SearchError(f"{where}: choices list a value twice: {choices}")
            out[key] = {"type": "categorical", "choices": list(choices)}
            continue
        low, high = spec.get("low"), spec.get("high")
        numeric = (int,) if kind == "int" else (int, float)
        for name, value in (("low", low), ("high", high)):
            if isinstance(value, bool) or not isinstance(value, numeric):
                what = "an integer" if kind == "int" else "a number"
                raise SearchError(f"{where}: '{name}' must be {what}, got {value!r}")
        if not low < high:
            raise SearchError(f"{where}: low ({low}) must be smaller than high ({high})")
        log = bool(spec.get("log", kind == "log"))
        if kind == "log" and spec.get("log") is False:
            raise SearchError(f"{where}: type log cannot set log: false")
        step = spec.get("step")
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, numeric) or step <= 0:
                raise SearchError(f"{where}: 'step' must be a positive number, got {step!r}")
            if log and kind != "int":
                raise SearchError(f"{where}: a float on a log scale cannot have a step")
            if log and step != 1:
                raise SearchError(f"{where}: an int on a log scale needs step 1")
        if log and low <= 0:
            raise SearchError(f"{where}: a log scale needs low > 0, got {low}")
        out[key] = {
            "type": "int" if kind == "int" else "float",
            "low": int(low) if kind == "int" else float(low),
            "high": int(high) if kind == "int" else float(high),
            "step": step if kind == "int" or step is None else float(step),
            "log": log,
        }
        if kind == "int" and step is None:
            out[key]["step"] = 1
    return out


def suggest(trial: optuna.trial.BaseTrial, space: Mapping[str, dict]) -> dict[str, Any]:
    """Draw every parameter of a parsed space from ``trial`` (names are the dotted run keys)."""
    params = {}
    for key, dist in space.items():
        if dist["type"] == "categorical":
            params[key] = trial.suggest_categorical(key, dist["choices"])
        elif dist["type"] == "int":
            params[key] = trial.suggest_int(
                key, dist["low"], dist["high"], step=dist["step"], log=dist["log"]
            )
        else:
            params[key] = trial.suggest_float(
                key, dist["low"], dist["high"], step=dist["step"], log=dist["log"]
            )
    return params


def in_space(params: Mapping[str, Any], space: Mapping[str, dict]) -> bool:
    """True when ``params`` sets exactly the space's keys, each to an allowed value."""
    if set(params) != set(space):
        return False
    for key, dist in space.items():
        value = params[key]
        if dist["type"] == "categorical":
            if value not in dist["choices"]:
                return False
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        elif not dist["low"] <= value <= dist["high"]:
            return False
        elif dist["type"] == "int" and int(value) != value:
            return False
    return True


# ------------------------------------------------------------------------------------ planning


def _flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict:
    from .experiments import flatten

    return flatten(cfg, prefix)


def _unflatten(flat: Mapping[str, Any]) -> dict:
    from .experiments import unflatten

    return unflatten(flat)


def trial_config(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
    """The validated run config of one trial: the base settings plus the suggested parameters."""
    return validate(_unflatten({**base, **params}))


def _with_defaults(search: Mapping[str, Any]) -> dict:
    out = copy.deepcopy(SEARCH_DEFAULTS)
    unknown = sorted(set(search) - set(out))
    if unknown:
        raise SearchError(f"'search': unknown key(s) {unknown}; valid keys: {sorted(out)}")
    out.update(copy.deepcopy(dict(search)))
    for name, defaults in (("sampler", SAMPLER_DEFAULTS), ("pruner", PRUNER_DEFAULTS)):
        given = out[name] or {}
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise SearchError(f"'search.{name}': unknown key(s) {unknown}; valid keys: {sorted(defaults)}")
        out[name] = {**defaults, **given}
    return out


def _run_parts(run_id: str) -> dict[str, str]:
    return dict(part.split("~", 1) for part in run_id.split("/"))


@dataclass
class SearchPlan:
    """What the workflow needs from a search: the spec, the follow-up runs, the worker resources.

    Attributes:
        experiment: the experiment whose runs the search tunes.
        spec: the resolved search (``spec.yaml``; see :func:`create_study`).
        followups: one run of the best setting per seed of the experiment (label ``<method>
            (searched)``, path ``.../search~best/seed~S``); ``RunSpec.settings`` lacks the searched
            keys, which ``best_params.yaml`` fills in.
        pretrained: the pretrained checkpoint the trials start from (a workflow output), or None.
        resources: ``threads``, ``mem_mb``, ``runtime`` (minutes) and ``gpu`` of one worker job.
    """

    experiment: str
    spec: dict
    followups: list = field(default_factory=list)
    pretrained: str | None = None
    resources: dict = field(default_factory=dict)

    @property
    def directory(self) -> str:
        return f"results/{self.experiment}/search"

    @property
    def workers(self) -> list[int]:
        return list(range(self.spec["workers"]))

    def add_to(self, plan) -> None:
        """Put the follow-up runs into a :class:`dmnsp.experiments.Plan` (their experiment's tables)."""
        runs = plan.experiments[self.experiment]
        for run in self.followups:
            if (self.experiment, run.run_id) not in plan.runs:
                plan.runs[(self.experiment, run.run_id)] = run
                runs.append(run)


def plan_search(config: Mapping[str, Any], plan=None) -> SearchPlan:
    """Resolve the ``search:`` section of a workflow config against its planned runs.

    The trials start from the settings of the experiment's first run of ``method`` on ``dataset``
    and ``split`` (defaults: the experiment's first), without ablations: the grid (or sweep) keys
    that the space does not search keep that run's values, the searched keys are removed, the seed
    is ``search.seed`` (default: the experiment's first), ``val_fraction`` is the search's and
    ``evaluate_on`` is ``val``; ``trial_run`` overrides run keys for the trials only (e.g. fewer
    steps). The follow-up runs repeat that run over every seed of the experiment with the best
    parameters, on the test set.

    Args:
        config: the (schema-validated) workflow config.
        plan: its :func:`dmnsp.experiments.expand_all` plan (computed when None).

    Raises:
        SearchError: naming the key of ``search`` to fix.
    """
    from .experiments import UNUSED_KEYS, RunSpec, expand_all, format_value, resources_for

    search = _with_defaults(config.get("search") or {})
    plan = plan if plan is not None else expand_all(config)
    experiments = list(plan.experiments)
    name = search["experiment"]
    if name is None:
        if len(experiments) != 1:
            raise SearchError(
                f"'search.experiment': the config has {len(experiments)} experiments; name one of {experiments}"
            )
        name = experiments[0]
    if name not in plan.experiments:
        raise SearchError(f"'search.experiment': no experiment {name!r}; the config has {experiments}")
    method = search["method"]
    if method == "zeroshot":
        raise SearchError("'search.method': zeroshot does not train, there is nothing to search")
    objective = search["objective"]
    if objective not in OBJECTIVES:
        raise SearchError(f"'search.objective': {objective!r} is not one of {list(OBJECTIVES)}")
    for key in ("n_trials", "workers", "heartbeat_interval", "grace_period"):
        if isinstance(search[key], bool) or not isinstance(search[key], int) or search[key] < 1:
            raise SearchError(f"'search.{key}' must be a positive integer, got {search[key]!r}")
    if (
        isinstance(search["max_retry"], bool)
        or not isinstance(search["max_retry"], int)
        or search["max_retry"] < 0
    ):
        raise SearchError(f"'search.max_retry' must be an integer >= 0, got {search['max_retry']!r}")
    if search["grace_period"] <= search["heartbeat_interval"]:
        raise SearchError("'search.grace_period' must be longer than search.heartbeat_interval")
    vf = search["val_fraction"]
    if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 < vf <= 0.9:
        raise SearchError(
            f"'search.val_fraction' must lie in (0, 0.9], got {vf!r}; trials are scored on this split"
        )

    space = parse_space(search["space"])
    for key in space:
        if key in FORBIDDEN_KEYS or key.startswith("pretrain.") or key.startswith("pretrain_"):
            raise SearchError(
                f"'search.space.{key}': {key} defines the scenario or the run, it cannot be searched"
            )
        if key in UNUSED_KEYS.get(method, frozenset()):
            raise SearchError(f"'search.space.{key}': method {method} ignores {key}; search a key it reads")
    trial_run = _flatten(search["trial_run"] or {})
    for key in trial_run:
        if key in ("evaluate_on", "val_fraction", "seed") or key in space:
            raise SearchError(
                f"'search.trial_run.{key}': set by the search itself ({key} cannot be overridden here)"
            )

    runs = [r for r in plan.experiments[name] if SEARCH_RUN_PART not in r.run_id.split("/")]
    candidates = [
        r for r in runs if r.swept.get("method") == method and "ablation" not in _run_parts(r.run_id)
    ]
    if not candidates:
        raise SearchError(
            f"'search.method': experiment {name!r} has no {method} run; add {method} to its methods"
        )
    dataset = search["dataset"] or candidates[0].dataset
    split = search["split"] or _run_parts(candidates[0].run_id)["split"]
    candidates = [r for r in candidates if r.dataset == dataset and _run_parts(r.run_id)["split"] == split]
    if not candidates:
        raise SearchError(
            f"'search.dataset'/'search.split': experiment {name!r} has no {method} run on {dataset} split {split}"
        )
    point = {k: v for k, v in candidates[0].swept.items() if k != "seed"}
    per_seed = [r for r in candidates if {k: v for k, v in r.swept.items() if k != "seed"} == point]
    first = per_seed[0]
    seed = search["seed"] if search["seed"] is not None else first.swept["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SearchError(f"'search.seed' must be an integer, got {seed!r}")

    def strip(settings: Mapping[str, Any]) -> dict:
        return {k: v for k, v in settings.items() if k not in space}

    base = strip(first.settings)
    base.update(trial_run)
    base.update(seed=seed, val_fraction=float(vf), evaluate_on="val")
    _check_space_against(base, space)

    directory = f"results/{name}/search"
    study_name = search["study_name"] or f"dmnsp-{name}"
    workers = min(search["workers"], search["n_trials"])
    spec = {
        "version": SPEC_VERSION,
        "experiment": name,
        "study_name": study_name,
        "storage": search["storage"] or f"{directory}/study.journal",
        "direction": "maximize",
        "objective": objective,
        "n_trials": search["n_trials"],
        "workers": workers,
        "space": space,
        "base": base,
        "sampler": _check_sampler(search["sampler"]),
        "pruner": _check_pruner(search["pruner"]),
        "heartbeat_interval": search["heartbeat_interval"],
        "grace_period": search["grace_period"],
        "max_retry": search["max_retry"],
    }

    followups = []
    for run in per_seed:
        if run.settings.get("evaluate_on", "test") != "test":
            raise SearchError(
                f"experiment {name!r} sets evaluate_on: {run.settings['evaluate_on']}; the follow-up runs of "
                "the best setting are evaluated on the test set, so drop evaluate_on from the experiment"
            )
        parts = _run_parts(run.run_id)
        run_id = "/".join(
            [f"{k}~{parts[k]}" for k in ("dataset", "split", "method")]
            + [SEARCH_RUN_PART, f"seed~{format_value(run.swept['seed'])}"]
        )
        swept = {k: run.swept[k] for k in ("dataset", "initial_increment", "increment", "method", "seed")}
        followups.append(
            RunSpec(
                experiment=name,
                run_id=run_id,
                label=f"{method} ({SEARCH_LABEL})",
                settings=strip(run.settings),
                swept=swept,
                n_tasks=run.n_tasks,
                dataset=run.dataset,
                model_name=run.model_name,
                pretrain_id=run.pretrain_id,
            )
        )

    res = resources_for(config.get("resources"), "train_task", first.dataset, first.model_name)
    if base.get("threads"):
        res["threads"] = base["threads"]
    res["runtime"] = res["runtime"] * first.n_tasks * math.ceil(search["n_trials"] / workers)
    extra = dict(search["resources"] or {})
    unknown = sorted(set(extra) - set(res))
    if unknown:
        raise SearchError(f"'search.resources': unknown key(s) {unknown}; use {sorted(res)}")
    res.update(extra)
    pretrained = plan.pretrains[first.pretrain_id].model_path if first.pretrain_id else None
    return SearchPlan(experiment=name, spec=spec, followups=followups, pretrained=pretrained, resources=res)


def _check_space_against(base: Mapping[str, Any], space: Mapping[str, dict]) -> None:
    """Every bound and choice must give a valid run config (unknown keys and bad values stop here)."""
    corner = {}
    for key, dist in space.items():
        corner[key] = dist["choices"][0] if dist["type"] == "categorical" else dist["low"]
    for key, dist in space.items():
        values = dist["choices"] if dist["type"] == "categorical" else [dist["low"], dist["high"]]
        for value in values:
            try:
                trial_config(base, {**corner, key: value})
            except ConfigError as exc:
                raise SearchError(
                    f"'search.space.{key}': value {value!r} gives an invalid trial: {exc}"
                ) from None


def _check_sampler(sampler: Mapping[str, Any]) -> dict:
    if sampler["name"] not in ("tpe", "random"):
        raise SearchError(f"'search.sampler.name': {sampler['name']!r} is not one of ['tpe', 'random']")
    if isinstance(sampler["seed"], bool) or not isinstance(sampler["seed"], int):
        raise SearchError(f"'search.sampler.seed' must be an integer, got {sampler['seed']!r}")
    n = sampler["n_startup_trials"]
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise SearchError(f"'search.sampler.n_startup_trials' must be an integer >= 0 or null, got {n!r}")
    return dict(sampler)


def _check_pruner(pruner: Mapping[str, Any]) -> dict:
    if pruner["name"] not in ("median", "none"):
        raise SearchError(f"'search.pruner.name': {pruner['name']!r} is not one of ['median', 'none']")
    for key in ("n_startup_trials", "n_warmup_steps"):
        value = pruner[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SearchError(f"'search.pruner.{key}' must be an integer >= 0, got {value!r}")
    return dict(pruner)


def load_spec(path: str | Path) -> dict:
    """Read ``spec.yaml`` (written by :func:`create_study`)."""
    path = Path(path)
    if not path.is_file():
        raise SearchError(f"search spec {path} does not exist; run `dmnsp search-create` first")
    spec = read_yaml_file(path, "search spec", SearchError)
    if not isinstance(spec, dict) or spec.get("version") != SPEC_VERSION:
        raise SearchError(f"{path} is not a dmnsp search spec (version {SPEC_VERSION})")
    return spec


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


# ------------------------------------------------------------------------------------- objective


def objective_value(accuracies: list[float], objective: str) -> float:
    """``avg``: mean accuracy over tasks (Avg); ``last``: accuracy after the last task (Last)."""
    from .metrics import average_incremental_accuracy, last_accuracy

    if objective == "avg":
        return average_incremental_accuracy(accuracies)
    if objective == "last":
        return last_accuracy(accuracies)
    raise SearchError(f"unknown objective {objective!r}; use one of {list(OBJECTIVES)}")


_DATA_CACHE: dict[tuple, Any] = {}


def _data_for(cfg: Mapping[str, Any]):
    from .datasets import load_dataset

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
        from .runner import Session, run_all
        from .train import NonFiniteError

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
    """Draw one of Optuna's standard plots into ``path``; a captioned placeholder when it cannot be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization import matplotlib as ovm

    from .io import atomic_save

    draw = {
        "optimization_history": ovm.plot_optimization_history,
        "param_importances": ovm.plot_param_importances,
        "slice": ovm.plot_slice,
        "contour": ovm.plot_contour,
    }[kind]
    problem = None
    plt.close("all")
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
            fig, ax = plt.subplots(figsize=(6, 2))
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
    from .io import atomic_write_text

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


def searched_label(label: str) -> str:
    """``dmnsp`` → ``dmnsp (searched)``; ``dmnsp (clean)`` → ``dmnsp (clean, searched)``."""
    if label.endswith(")") and " (" in label:
        return f"{label[:-1]}, {SEARCH_LABEL})"
    return f"{label} ({SEARCH_LABEL})"
