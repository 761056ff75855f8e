"""The ``search:`` section of a workflow config: its defaults and checks, the search space, and the
spec that every search step reads (``spec.yaml``)."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna

from ..config import EXECUTION_KEYS, ConfigError, read_yaml_file, validate
from ..experiments import flatten, unflatten
from ..methods import reads_key

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


# ------------------------------------------------------------------------------------- checks


def trial_config(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
    """The validated run config of one trial: the base settings plus the suggested parameters."""
    return validate(unflatten({**base, **params}))


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


def checked_section(search: Mapping[str, Any]) -> dict:
    """The ``search:`` section with its defaults, its scalar settings checked."""
    search = _with_defaults(search)
    if search["method"] == "zeroshot":
        raise SearchError("'search.method': zeroshot does not train, there is nothing to search")
    if search["objective"] not in OBJECTIVES:
        raise SearchError(f"'search.objective': {search['objective']!r} is not one of {list(OBJECTIVES)}")
    for key in ("n_trials", "workers", "heartbeat_interval", "grace_period"):
        if isinstance(search[key], bool) or not isinstance(search[key], int) or search[key] < 1:
            raise SearchError(f"'search.{key}' must be a positive integer, got {search[key]!r}")
    retry = search["max_retry"]
    if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
        raise SearchError(f"'search.max_retry' must be an integer >= 0, got {retry!r}")
    if search["grace_period"] <= search["heartbeat_interval"]:
        raise SearchError("'search.grace_period' must be longer than search.heartbeat_interval")
    vf = search["val_fraction"]
    if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 < vf <= 0.9:
        raise SearchError(
            f"'search.val_fraction' must lie in (0, 0.9], got {vf!r}; trials are scored on this split"
        )
    return search


def checked_space(search: Mapping[str, Any]) -> dict[str, dict]:
    """The parsed space; keys that define the run, or that the method ignores, are refused."""
    method = search["method"]
    space = parse_space(search["space"])
    for key in space:
        if key in FORBIDDEN_KEYS or key.startswith("pretrain.") or key.startswith("pretrain_"):
            raise SearchError(
                f"'search.space.{key}': {key} defines the scenario or the run, it cannot be searched"
            )
        if not reads_key(method, key):
            raise SearchError(f"'search.space.{key}': method {method} ignores {key}; search a key it reads")
    return space


def checked_trial_run(search: Mapping[str, Any], space: Mapping[str, Any]) -> dict:
    """``trial_run`` as flat run keys; the search's own keys cannot be overridden there."""
    trial_run = flatten(search["trial_run"] or {})
    for key in trial_run:
        if key in ("evaluate_on", "val_fraction", "seed") or key in space:
            raise SearchError(
                f"'search.trial_run.{key}': set by the search itself ({key} cannot be overridden here)"
            )
    return trial_run


def check_space_against(base: Mapping[str, Any], space: Mapping[str, dict]) -> None:
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


def check_sampler(sampler: Mapping[str, Any]) -> dict:
    if sampler["name"] not in ("tpe", "random"):
        raise SearchError(f"'search.sampler.name': {sampler['name']!r} is not one of ['tpe', 'random']")
    if isinstance(sampler["seed"], bool) or not isinstance(sampler["seed"], int):
        raise SearchError(f"'search.sampler.seed' must be an integer, got {sampler['seed']!r}")
    n = sampler["n_startup_trials"]
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise SearchError(f"'search.sampler.n_startup_trials' must be an integer >= 0 or null, got {n!r}")
    return dict(sampler)


def check_pruner(pruner: Mapping[str, Any]) -> dict:
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
