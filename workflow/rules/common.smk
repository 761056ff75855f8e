# Planning: expand the validated config into runs once, then answer every input function from
# that plan by dictionary lookup (no file reads per job). The logic lives in dmnsp.experiments.

import os
import re
import sys
from functools import cache

from snakemake.exceptions import WorkflowError

from dmnsp import layout
from dmnsp.config import ConfigError
from dmnsp.experiments import (
    chunk_rules,
    chunk_spans,
    cli_json,
    cli_sets,
    expand_all,
    resources_for,
)

try:
    # The config files were read again with dmnsp's reader in the Snakefile (check_config).
    PLAN = expand_all(config)
    # tasks_per_job > 1: one training rule per chunk position (train_tasks_<first>_<last>).
    CHUNK_RULES = chunk_rules(PLAN)
except ConfigError as exc:
    raise WorkflowError(f"invalid workflow config: {exc}") from None

# Experiments trained one task per job, by the rule train_task.
ONE_TASK_EXPERIMENTS = [e for e, k in PLAN.tasks_per_job.items() if k == 1]

RESOURCE_TABLE = config.get("resources", [])

# Rule paths with wildcards, from the one module that knows the run-folder layout.
RUN = layout.run_dir("{experiment}", "{run}")
PRETRAINED = layout.pretrain_dir("{pretrain_id}")


# Rules call `python -m dmnsp`: make that the interpreter running Snakemake (which has dmnsp),
# also when Snakemake was started as .venv/bin/snakemake without activating the environment.
envvars:
    "PATH",


_inherited_path = os.environ["PATH"]
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), _inherited_path])


wildcard_constraints:
    experiment=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    run=r"[^/~]+~[^/]+(/[^/~]+~[^/]+)*",
    task=r"[0-9]+",
    pretrain_id=r"[^/]+",


# ------------------------------------------------------------------------------- targets


def get_final_outputs():
    """Every experiment's tables and plots (the outputs of aggregate_results)."""
    return expand(
        [
            "results/{experiment}/tables/summary.csv",
            "results/{experiment}/tables/hyperparameters.csv",
            "results/{experiment}/plots",
        ],
        experiment=list(PLAN.experiments),
    )


# ------------------------------------------------------------------------------- lookups


def get_run(wildcards):
    """The planned run behind the {experiment}/{run} wildcards."""
    try:
        return PLAN.run(wildcards.experiment, wildcards.run)
    except ConfigError as exc:
        raise WorkflowError(str(exc)) from None


def get_pretrain(wildcards):
    try:
        return PLAN.pretrains[wildcards.pretrain_id]
    except KeyError:
        raise WorkflowError(
            f"no pretraining '{wildcards.pretrain_id}' in this config"
        ) from None


def get_run_dir(wildcards):
    return layout.run_dir(wildcards.experiment, wildcards.run)


# ------------------------------------------------------------------------------- params


def get_run_settings(wildcards):
    """Settings the run shares with its experiment, as one JSON object (--settings-json)."""
    run = get_run(wildcards)
    return cli_json({k: v for k, v in run.settings.items() if k not in run.swept})


def get_run_swept(wildcards):
    """The run's own settings (its path's key~value parts), as --set arguments kept in run.json."""
    return cli_sets(get_run(wildcards).swept)


def get_run_label(wildcards):
    from shlex import quote

    return quote(get_run(wildcards).label)


def get_pretrain_settings(wildcards):
    return cli_json(get_pretrain(wildcards).settings)


def get_resume_option(wildcards, input):
    """--resume from the previous task's checkpoint (absent for task 0)."""
    return f"--resume {input.resume}" if "resume" in input.keys() else ""


def get_run_dirs(wildcards, input):
    """Run folders of an experiment, from its metrics files."""
    return " ".join(os.path.dirname(path) for path in input.metrics)


def get_expected_seeds(wildcards):
    return PLAN.expected_seeds[wildcards.experiment]


# ------------------------------------------------------------------------------- inputs


def get_train_task_input(wildcards):
    """The run config, the previous task's checkpoint and the pretrained model, when any."""
    run = get_run(wildcards)
    task = int(wildcards.task)
    if task >= run.n_tasks:
        raise WorkflowError(
            f"run {run.run_dir} has {run.n_tasks} tasks; task {task} does not exist"
        )
    return _train_input(wildcards, run, task)


def train_tasks_input(chunk):
    """Input function of the chunk rule `chunk` (tasks chunk.first..chunk.last, one job)."""

    def get_input(wildcards):
        run = get_run(wildcards)
        k = PLAN.tasks_per_job[wildcards.experiment]
        if (chunk.first, chunk.last) not in chunk_spans(run.n_tasks, k):
            raise WorkflowError(
                f"run {run.run_dir} ({run.n_tasks} tasks, {k} per job) has no job for tasks"
                f" {chunk.first}-{chunk.last}"
            )
        return _train_input(wildcards, run, chunk.first)

    return get_input


def _train_input(wildcards, run, task):
    run_dir = get_run_dir(wildcards)
    inputs = {"config": layout.run_file(run_dir, layout.CONFIG)}
    if task > 0:
        inputs["resume"] = layout.task_file(run_dir, task - 1, layout.CHECKPOINT)
    if run.pretrain_id:
        inputs["pretrained"] = PLAN.pretrains[run.pretrain_id].model_path
    return inputs


def get_metrics_input(wildcards):
    """Evaluation files of every task of a run."""
    run = get_run(wildcards)
    run_dir = get_run_dir(wildcards)
    return {
        "config": layout.run_file(run_dir, layout.CONFIG),
        "evals": [
            layout.task_file(run_dir, t, layout.EVAL) for t in range(run.n_tasks)
        ],
    }


def get_experiment_metrics(wildcards):
    """metrics.json of every run of an experiment."""
    try:
        runs = PLAN.experiments[wildcards.experiment]
    except KeyError:
        raise WorkflowError(
            f"no experiment '{wildcards.experiment}' in this config"
        ) from None
    return [layout.run_file(run.run_dir, layout.METRICS) for run in runs]


# ------------------------------------------------------------------------------- outputs


def checkpoint_output(path):
    """Task checkpoints are temporary unless keep_checkpoints is set."""
    return path if config.get("keep_checkpoints", True) else temp(path)


def train_tasks_output(chunk):
    """Every task's checkpoint, eval.json and diagnostics.json of a chunk: all are the job's outputs
    (temp() checkpoints inside a chunk too: each is deleted as soon as no job needs it).
    """
    out = {}
    for t in chunk.tasks:
        out[f"checkpoint{t}"] = checkpoint_output(
            layout.task_file(RUN, t, layout.CHECKPOINT)
        )
        out[f"eval{t}"] = layout.task_file(RUN, t, layout.EVAL)
        out[f"diagnostics{t}"] = layout.task_file(RUN, t, layout.DIAGNOSTICS)
    return out


def train_tasks_constraints(chunk):
    """Wildcard constraints that limit a chunk rule to the runs whose chunk it is."""
    out = {"experiment": chunk.experiment_regex}
    if chunk.run_regex is not None:
        out["run"] = chunk.run_regex
    return out


def train_task_constraints():
    """train_task serves the experiments at one task per job (all of them by default)."""
    if not CHUNK_RULES:
        return {}
    return {"experiment": "|".join(map(re.escape, ONE_TASK_EXPERIMENTS)) or "(?!)"}


# ------------------------------------------------------------------------------- resources


@cache
def _job_resources(rule_name, key):
    """Resources of one job, keyed by (rule_name, experiment, run) or (rule_name, pretrain id)."""
    method = None  # only a run's jobs have one
    if rule_name == "pretrain_model":
        spec = PLAN.pretrains[key[0]]
        dataset, model, own_threads = (
            spec.dataset,
            spec.model_name,
            spec.settings.get("threads"),
        )
    elif rule_name == "aggregate_results":
        first = PLAN.experiments[key[0]][0]
        dataset, model, own_threads = first.dataset, first.model_name, None
    else:
        run = PLAN.run(*key)
        dataset, model, own_threads = (
            run.dataset,
            run.model_name,
            run.settings.get("threads"),
        )
        method = run.swept["method"]
    out = resources_for(RESOURCE_TABLE, rule_name, dataset, model, method)
    if rule_name in ("pretrain_model", "train_task") and own_threads:
        out["threads"] = own_threads
    return out


def _job_key(rule_name, wildcards):
    if rule_name == "pretrain_model":
        return (wildcards.pretrain_id,)
    if rule_name == "aggregate_results":
        return (wildcards.experiment,)
    return (wildcards.experiment, wildcards.run)


def _planned_keys(rule_name):
    """The keys of every job of `rule_name` in this plan (see _job_key)."""
    if rule_name == "pretrain_model":
        return [(pretrain_id,) for pretrain_id in PLAN.pretrains]
    if rule_name == "aggregate_results":
        return [(experiment,) for experiment in PLAN.experiments]
    return list(PLAN.runs)


def _grow(base, attempt):
    """1x, 1.5x, 2x, ... of `base` at attempt 1, 2, 3, ... (rounded up)."""
    return -(-base * (attempt + 1) // 2)


def job_resource(rule_name, name, tasks=1):
    """Resource `name` of the jobs of rule `rule_name`, from the config's table.

    `tasks`: for a job that trains several tasks (tasks_per_job), the table's runtime, which is per
    task, is multiplied by the job's number of tasks.

    Planning cost: Snakemake evaluates every callable resource of every job (twice in a dry-run)
    and inspects its signature each time, which dominated planning of DAGs with ~20,000 jobs. So
    where the table gives every planned job of the rule the same value, that value is returned
    as a plain int; a per-job lookup only where it varies (e.g. a `threads` run setting).

    mem_mb and runtime stay callables: they grow with Snakemake's `attempt` (1, then 2, 3, ...
    under --retries), so a job resubmitted after running out of memory or time asks for 1.5x,
    2x, ... the table's value. The workflow cannot see --retries while it is parsed, so the
    growth is always on; with a constant base it costs one cheap call per job and resource.
    """
    scale = tasks if name == "runtime" else 1
    values = {_job_resources(rule_name, key)[name] for key in _planned_keys(rule_name)}
    if not values:  # no job of this rule in the plan
        values = {resources_for(RESOURCE_TABLE, rule_name)[name]}
    if name in ("mem_mb", "runtime"):
        if len(values) == 1:
            base = values.pop() * scale

            def grown(wildcards, attempt):
                return _grow(base, attempt)

            return grown

        def grown(wildcards, attempt):
            key = _job_key(rule_name, wildcards)
            return _grow(_job_resources(rule_name, key)[name] * scale, attempt)

        return grown
    if len(values) == 1:
        return values.pop()

    def lookup(wildcards):
        return _job_resources(rule_name, _job_key(rule_name, wildcards))[name]

    return lookup


def inherit_train_task_settings(chunk):
    """--set-resources and --set-threads given for train_task (the SLURM profile's GPU partition,
    say) apply to a chunk rule too, unless given for the chunk rule itself; a constant runtime
    given for train_task counts per task, like the table's."""
    settings = workflow.resource_settings
    target = getattr(rules, chunk.name).rule
    own = settings.overwrite_resources.get(chunk.name, {})
    for name, value in settings.overwrite_resources.get("train_task", {}).items():
        if name in own:
            continue
        # A snakemake Resource when given on the command line or in a profile.
        raw = getattr(value, "raw", value)
        if name == "runtime" and isinstance(raw, int):
            value = raw * len(chunk.tasks)
        target.resources[name] = value
    threads = settings.overwrite_threads.get("train_task")
    if threads is not None and chunk.name not in settings.overwrite_threads:
        target.resources["_cores"] = threads
