# Planning: expand the validated config into runs once, then answer every input function from
# that plan by dictionary lookup (no file reads per job). The logic lives in dmnsp.experiments.

import os
import re
import sys
from functools import cache

from snakemake.exceptions import WorkflowError

from dmnsp import layout, staging
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
    # workflow/Snakefile read the config files again with dmnsp's reader (check_workflow_config).
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


def get_run_names(wildcards):
    """Run folders of an experiment as the tables name them: results/<experiment>/runs/<run>."""
    from shlex import quote

    return " ".join(quote(run.run_dir) for run in get_experiment_runs(wildcards))


def get_results_root(wildcards, input):
    """The folder that holds this job's copy of results/: "." on a shared file system, Snakemake's
    local storage folder under remote storage (its inputs keep their paths below it)."""
    from shlex import quote

    physical = os.path.normpath(input.metrics[0])
    logical = os.path.normpath(
        layout.run_file(get_experiment_runs(wildcards)[0].run_dir, layout.METRICS)
    )
    if physical == logical:
        return "."
    if not physical.endswith(os.sep + logical):
        raise WorkflowError(f"input {physical} is not a copy of {logical}")
    return quote(physical[: -len(logical) - 1])


def get_tables_dir(wildcards, output):
    from shlex import quote

    return quote(os.path.abspath(os.path.dirname(output.summary_csv)))


def get_plots_dir(wildcards, output):
    from shlex import quote

    return quote(os.path.abspath(output.plots))


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
    inputs.update(staged_inputs(run.settings))
    return inputs


def staged_inputs(settings):
    """What a job reads from outside its run folder (dmnsp.staging): the dataset's folder and the
    weights, staged by download_data / fetch_weights or given as a file. Data and weights are the
    same files whenever they were fetched: ancient(), so a re-fetch never retrains anything.
    """
    staged = staging.staging_for(settings)
    inputs = {"data": ancient(staged.data_folder)}
    if staged.weights_folder:
        inputs["weights"] = ancient(staged.weights_folder)
    if staged.pretrained_file:
        inputs["pretrained"] = staged.pretrained_file
    return inputs


def staged_data_and_weights(settings):
    """The dataset and tag weights of a run (its staged inputs but a checkpoint file)."""
    return {k: v for k, v in staged_inputs(settings).items() if k != "pretrained"}


def get_pretrain_input(wildcards):
    return staged_inputs(get_pretrain(wildcards).settings)


def get_staged_options(wildcards, input):
    """Where this job reads the staged inputs (Snakemake's local copies under remote storage):
    dataset_root and cache_dir (they say where, not what: the run's identity keeps its own
    values) and --pretrained-file for a checkpoint file."""
    from shlex import quote

    if "pretrain_id" in wildcards.keys():
        settings = get_pretrain(wildcards).settings
    else:
        settings = get_run(wildcards).settings
    root = staging.data_root(staging.staging_for(settings).dataset, input.data)
    options = [f"--set dataset_root={quote(root)}"]
    if "weights" in input.keys():
        options.append(f"--set cache_dir={quote(input.weights)}")
    if "pretrained" in input.keys():
        options.append(f"--pretrained-file {quote(input.pretrained)}")
    return " ".join(options)


# With remote storage (--default-storage-provider) a job sees only the files it declares, so the
# metrics and tables jobs declare every task record they read. On a shared file system the same
# records are there already (each training job writes a task's diagnostics.json before its
# eval.json, and the metrics wait for every eval.json): declaring them again would only cost
# planning time (about 40 % more CPU for the 5,000-job CIFAR100 2-2 grid of benchmarks/dag.py).
REMOTE_STORAGE = workflow.storage_settings.default_storage_provider is not None


def _task_records(run_dir, n_tasks, every=REMOTE_STORAGE):
    """eval.json of every task, and with ``every`` (remote storage) diagnostics.json too (the
    metrics read both)."""
    records = {
        "evals": [layout.task_file(run_dir, t, layout.EVAL) for t in range(n_tasks)]
    }
    if every:
        records["diagnostics"] = [
            layout.task_file(run_dir, t, layout.DIAGNOSTICS) for t in range(n_tasks)
        ]
    return records


def get_metrics_input(wildcards):
    """The run's config and every task's records."""
    run = get_run(wildcards)
    run_dir = get_run_dir(wildcards)
    return {
        "config": layout.run_file(run_dir, layout.CONFIG),
        **_task_records(run_dir, run.n_tasks),
    }


def get_experiment_runs(wildcards):
    try:
        return PLAN.experiments[wildcards.experiment]
    except KeyError:
        raise WorkflowError(
            f"no experiment '{wildcards.experiment}' in this config"
        ) from None


def get_experiment_input(wildcards):
    """What the tables and plots read of every run of an experiment: metrics.json (one per run, in
    run order: their folders are the runs), config.yaml and run.json, and with remote storage
    every task's records."""
    runs = get_experiment_runs(wildcards)
    inputs = {
        "metrics": [layout.run_file(run.run_dir, layout.METRICS) for run in runs],
        "configs": [layout.run_file(run.run_dir, layout.CONFIG) for run in runs],
        "infos": [layout.run_file(run.run_dir, layout.RUN_INFO) for run in runs],
    }
    if REMOTE_STORAGE:
        for run in runs:
            for key, paths in _task_records(run.run_dir, run.n_tasks).items():
                inputs.setdefault(key, []).extend(paths)
    return inputs


# ------------------------------------------------------------------------------- outputs


def checkpoint_output(path):
    """Task checkpoints are temporary unless keep_checkpoints is set."""
    return path if config.get("keep_checkpoints", True) else temp(path)


def train_tasks_output(chunk):
    """Every task's checkpoint, eval.json and diagnostics.json of a chunk: all are the job's outputs
    (temp() checkpoints inside a chunk too: each is deleted as soon as no job needs it). Named by
    position in the chunk (eval0: its first task's), so one shell text serves every chunk rule.
    """
    out = {}
    for i, t in enumerate(chunk.tasks):
        out[f"checkpoint{i}"] = checkpoint_output(
            layout.task_file(RUN, t, layout.CHECKPOINT)
        )
        out[f"eval{i}"] = layout.task_file(RUN, t, layout.EVAL)
        out[f"diagnostics{i}"] = layout.task_file(RUN, t, layout.DIAGNOSTICS)
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


# ------------------------------------------------------------------------------- report


def _dataset_splits(experiment):
    """The (dataset, "I-I") pairs of an experiment's runs, sorted."""
    runs = PLAN.experiments.get(experiment, [])
    return sorted(
        {
            (run.dataset, f"{run.swept['initial_increment']}-{run.swept['increment']}")
            for run in runs
        }
    )


def report_category_of(experiment):
    """Report category of an experiment's files: its dataset and split ("cifar100 / 10-10"), or the
    experiment's name when it spans several of them."""
    pairs = _dataset_splits(experiment)
    if len(pairs) == 1:
        return " / ".join(pairs[0])
    return f"{experiment} (all datasets and splits)"


def report_category(wildcards):
    return report_category_of(wildcards.experiment)


def report_plot_category(wildcards):
    """A figure's dataset and split, from its file name (dmnsp.plots writes <kind>_<dataset>_<split>...)."""
    for dataset, split in _dataset_splits(wildcards.experiment):
        if f"_{dataset}_{split}" in wildcards.name:
            return f"{dataset} / {split}"
    return report_category(wildcards)


def report_plot_subcategory(wildcards):
    """Diagnostics (lambda matrices, AdamW overflow, update norms) apart from the accuracy plots."""
    if wildcards.name.startswith(("diagnostics_", "lambda_")):
        return "Diagnostics"
    return "Plots"


# ------------------------------------------------------------------------------- staging
# Data and weights folders the planned jobs read, fetched by the rules of staging.smk.


def _planned_staging():
    """Every dataset folder and weights folder a planned job reads, with what fetches it."""
    data, weights = {}, {}
    settings = [run.settings for run in PLAN.runs.values()]
    settings += [spec.settings for spec in PLAN.pretrains.values()]
    for item in settings:
        staged = staging.staging_for(item)
        dataset, download = data.get(staged.data_folder, (staged.dataset, False))
        if dataset != staged.dataset:
            raise WorkflowError(
                f"the folder {staged.data_folder} would hold both {dataset} and {staged.dataset}; "
                "give the imagefolder dataset a dataset_root of its own"
            )
        data[staged.data_folder] = (dataset, download or staged.download)
        if staged.weights_folder:
            weights.setdefault(
                staged.weights_folder,
                (staged.model_name, staged.pretrained, staged.cache_dir),
            )
    return data, weights


STAGED_DATA, STAGED_WEIGHTS = _planned_staging()


def _exactly(paths):
    return "|".join(re.escape(p) for p in sorted(paths)) or "(?!)"


def get_fetch_data_options(wildcards, output):
    """fetch-data options of a dataset folder: the dataset, the root that holds its (local) copy."""
    from shlex import quote

    dataset, download = STAGED_DATA[wildcards.data_folder]
    root = staging.data_root(dataset, output[0])
    return f"--dataset {dataset} --root {quote(root)}" + (
        " --download" if download else ""
    )


def get_fetch_weights_options(wildcards):
    from shlex import quote

    model_name, pretrained, cache_dir = STAGED_WEIGHTS[wildcards.weights_folder]
    options = f"--model {quote(model_name)} --pretrained {quote(pretrained)}"
    return options + (f" --cache-dir {quote(cache_dir)}" if cache_dir else "")


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
