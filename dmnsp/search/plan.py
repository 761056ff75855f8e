"""Planning a search at Snakefile parse time (no data): the spec, the follow-up runs of the best
setting and the worker jobs' resources, from the workflow config and its planned runs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import layout
from ..config import validate
from ..experiments import Plan, RunSpec, expand_all, format_value, resources_for, unflatten
from ..methods import run_label
from .spec import (
    SEARCH_RUN_PART,
    SPEC_VERSION,
    SearchError,
    check_pruner,
    check_sampler,
    check_space_against,
    checked_section,
    checked_space,
    checked_trial_run,
)


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
        return layout.search_dir(self.experiment)

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
    search = checked_section(config.get("search") or {})
    plan = plan if plan is not None else expand_all(config)
    name = _experiment(search, plan)
    space = checked_space(search)
    per_seed = _tuned_runs(search, plan, name)
    first = per_seed[0]
    seed = search["seed"] if search["seed"] is not None else first.swept["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SearchError(f"'search.seed' must be an integer, got {seed!r}")
    base = _without(first.settings, space)
    base.update(checked_trial_run(search, space))
    base.update(seed=seed, val_fraction=float(search["val_fraction"]), evaluate_on="val")
    check_space_against(base, space)
    spec = _spec(search, name, space, base)
    followups = [_followup(run, name, space) for run in per_seed]
    return SearchPlan(
        experiment=name,
        spec=spec,
        followups=followups,
        pretrained=plan.pretrains[first.pretrain_id].model_path if first.pretrain_id else None,
        resources=_worker_resources(config, search, first, base, spec["workers"]),
    )


def _without(settings: Mapping[str, Any], space: Mapping[str, Any]) -> dict:
    """Run settings without the searched keys (a trial or the best setting supplies them)."""
    return {k: v for k, v in settings.items() if k not in space}


def _experiment(search: Mapping[str, Any], plan: Plan) -> str:
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
    return name


def _tuned_runs(search: Mapping[str, Any], plan: Plan, name: str) -> list[RunSpec]:
    """The experiment's runs of the tuned method, dataset, split and grid point: one per seed."""
    method = search["method"]
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
    return [r for r in candidates if {k: v for k, v in r.swept.items() if k != "seed"} == point]


def _spec(search: Mapping[str, Any], name: str, space: dict, base: dict) -> dict:
    """The spec every search step reads (``spec.yaml``)."""
    return {
        "version": SPEC_VERSION,
        "experiment": name,
        "study_name": search["study_name"] or f"dmnsp-{name}",
        "storage": search["storage"] or f"{layout.search_dir(name)}/study.journal",
        "direction": "maximize",
        "objective": search["objective"],
        "n_trials": search["n_trials"],
        "workers": min(search["workers"], search["n_trials"]),
        "space": space,
        "base": base,
        "sampler": check_sampler(search["sampler"]),
        "pruner": check_pruner(search["pruner"]),
        "heartbeat_interval": search["heartbeat_interval"],
        "grace_period": search["grace_period"],
        "max_retry": search["max_retry"],
    }


def _followup(run: RunSpec, name: str, space: Mapping[str, Any]) -> RunSpec:
    """The run of the best setting beside ``run`` (same seed), on the test set."""
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
    settings = _without(run.settings, space)
    return RunSpec(
        experiment=name,
        run_id=run_id,
        label=run_label(validate(unflatten(settings)), searched=True),
        settings=settings,
        swept={k: run.swept[k] for k in ("dataset", "initial_increment", "increment", "method", "seed")},
        n_tasks=run.n_tasks,
        dataset=run.dataset,
        model_name=run.model_name,
        pretrain_id=run.pretrain_id,
    )


def _worker_resources(
    config: Mapping[str, Any], search: Mapping[str, Any], first: RunSpec, base: dict, workers: int
) -> dict:
    """One worker job's resources: the train_task row, runtime times tasks × trials per worker."""
    res = resources_for(config.get("resources"), "train_task", first.dataset, first.model_name)
    if base.get("threads"):
        res["threads"] = base["threads"]
    res["runtime"] = res["runtime"] * first.n_tasks * math.ceil(search["n_trials"] / workers)
    extra = dict(search["resources"] or {})
    unknown = sorted(set(extra) - set(res))
    if unknown:
        raise SearchError(f"'search.resources': unknown key(s) {unknown}; use {sorted(res)}")
    res.update(extra)
    return res
