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

try:
    import optuna  # noqa: F401
except ImportError as _exc:  # pragma: no cover - the [search] extra is missing
    raise ImportError(
        f"dmnsp.search needs Optuna 5 ({_exc}); install the search extra: pip install 'dmnsp[search]'"
    ) from _exc

from .export import PLOTS, export_study, followup_settings, read_best, trials_table
from .objective import make_objective, objective_value, run_worker
from .plan import SearchPlan, plan_search
from .spec import (
    FORBIDDEN_KEYS,
    OBJECTIVES,
    PARAM_TYPES,
    PRUNER_DEFAULTS,
    SAMPLER_DEFAULTS,
    SEARCH_DEFAULTS,
    SEARCH_RUN_PART,
    SPEC_VERSION,
    SearchError,
    in_space,
    load_spec,
    parse_space,
    suggest,
    trial_config,
)
from .storage import (
    FINISHED,
    HEARTBEAT_ATTR,
    HeartbeatJournalStorage,
    count_finished,
    create_study,
    is_url,
    load_study,
    open_storage,
    retry_of,
)

__all__ = [
    "FINISHED",
    "FORBIDDEN_KEYS",
    "HEARTBEAT_ATTR",
    "OBJECTIVES",
    "PARAM_TYPES",
    "PLOTS",
    "PRUNER_DEFAULTS",
    "SAMPLER_DEFAULTS",
    "SEARCH_DEFAULTS",
    "SEARCH_RUN_PART",
    "SPEC_VERSION",
    "HeartbeatJournalStorage",
    "SearchError",
    "SearchPlan",
    "count_finished",
    "create_study",
    "export_study",
    "followup_settings",
    "in_space",
    "is_url",
    "load_spec",
    "load_study",
    "make_objective",
    "objective_value",
    "open_storage",
    "parse_space",
    "plan_search",
    "read_best",
    "retry_of",
    "run_worker",
    "suggest",
    "trial_config",
    "trials_table",
]
