# Optuna hyperparameter search (config `search:`; included only when search.enabled is true).
#
#   create_study ─┬─ search_worker 0 ─┬─ search_export ── search_prepare_run (one per seed) ── train_task …
#                 └─ search_worker 1 ─┘   best_params.yaml, trials table, plots
#
# One study shared by `search.workers` worker jobs (journal file or RDB URL, created once before
# any worker starts). Trials score on a validation split, never the test set. The best setting
# is then run over the experiment's seeds by the ordinary per-task rules and lands in the
# experiment's tables as "<method> (searched)". The logic lives in dmnsp.search.

import re

from snakemake.exceptions import WorkflowError

from dmnsp.config import ConfigError
from dmnsp.experiments import cli_json
from dmnsp.search import plan_search

try:
    SEARCH = plan_search(config, PLAN)
except ConfigError as exc:
    raise WorkflowError(f"invalid search config: {exc}") from None

# The follow-up runs join their experiment: aggregate_results collects them with the grid runs.
SEARCH.add_to(PLAN)
SEARCH_DIR = SEARCH.directory


localrules:
    search_prepare_run,


ruleorder: search_prepare_run > prepare_run


rule search_create_study:
    output:
        spec=f"{SEARCH_DIR}/spec.yaml",
        study=f"{SEARCH_DIR}/study.json",
    log:
        f"{SEARCH_DIR}/logs/create_study.log",
    benchmark:
        f"{SEARCH_DIR}/benchmarks/create_study.tsv"
    priority: 10
    conda:
        "../envs/dmnsp.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        # A function: a params string is a wildcard pattern, and `${PGPASSWORD}` in search.storage
        # would be read as a wildcard. The job expands the variable (dmnsp.search.storage).
        spec=lambda wildcards: cli_json(SEARCH.spec),
    shell:
        "python -m dmnsp search-create --spec-json {params.spec} --out-spec {output.spec} --out {output.study}"
        " > {log} 2>&1"


rule search_worker:
    input:
        spec=f"{SEARCH_DIR}/spec.yaml",
        study=f"{SEARCH_DIR}/study.json",
        pretrained=SEARCH.pretrained or [],
    output:
        f"{SEARCH_DIR}/workers/worker{{worker}}.json",
    log:
        f"{SEARCH_DIR}/logs/worker{{worker}}.log",
    benchmark:
        f"{SEARCH_DIR}/benchmarks/worker{{worker}}.tsv"
    wildcard_constraints:
        worker=r"[0-9]+",
    priority: 10  # before other ready jobs, so that the workers run side by side
    conda:
        "../envs/dmnsp.yaml"
    threads: SEARCH.resources["threads"]
    resources:
        mem_mb=SEARCH.resources["mem_mb"],
        runtime=SEARCH.resources["runtime"],
        gpu=SEARCH.resources["gpu"],
    shell:
        "OMP_NUM_THREADS={threads} python -m dmnsp search-worker --quiet --spec {input.spec}"
        " --worker {wildcards.worker} --out {output} > {log} 2>&1"


rule search_export:
    input:
        spec=f"{SEARCH_DIR}/spec.yaml",
        workers=expand(
            f"{SEARCH_DIR}/workers/worker{{worker}}.json", worker=SEARCH.workers
        ),
    output:
        best=report(
            f"{SEARCH_DIR}/best_params.yaml",
            caption="../report/search_best.rst",
            category=SEARCH.experiment,
            subcategory="Search",
        ),
        trials_csv=report(
            f"{SEARCH_DIR}/trials.csv",
            caption="../report/search_trials.rst",
            category=SEARCH.experiment,
            subcategory="Search",
        ),
        trials_md=report(
            f"{SEARCH_DIR}/trials.md",
            caption="../report/search_trials.rst",
            category=SEARCH.experiment,
            subcategory="Search",
        ),
        history=report(
            f"{SEARCH_DIR}/plots/optimization_history.png",
            caption="../report/search_history.rst",
            category=SEARCH.experiment,
            subcategory="Search",
        ),
        importances=report(
            f"{SEARCH_DIR}/plots/param_importances.png",
            caption="../report/search_importances.rst",
            category=SEARCH.experiment,
            subcategory="Search",
        ),
        slice=report(
            f"{SEARCH_DIR}/plots/slice.png",
            caption="../report/search_slice.rst",
            category=SEARCH.experiment,
            subcategory="Search",
        ),
        contour=report(
            f"{SEARCH_DIR}/plots/contour.png",
            caption="../report/search_contour.rst",
            category=SEARCH.experiment,
            subcategory="Search",
        ),
    log:
        f"{SEARCH_DIR}/logs/export.log",
    benchmark:
        f"{SEARCH_DIR}/benchmarks/export.tsv"
    conda:
        "../envs/dmnsp.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    shell:
        "python -m dmnsp search-export --spec {input.spec} --out-dir $(dirname {output.best}) > {log} 2>&1"


rule search_prepare_run:
    input:
        best=f"{SEARCH_DIR}/best_params.yaml",
    output:
        config=layout.run_file(RUN, layout.CONFIG),
        info=layout.run_file(RUN, layout.RUN_INFO),
    log:
        f"{RUN}/logs/prepare_run.log",
    benchmark:
        f"{RUN}/benchmarks/prepare_run.tsv"
    wildcard_constraints:
        experiment=re.escape(SEARCH.experiment),
        run=r"dataset~[^/]+/split~[^/]+/method~[^/]+/search~best/seed~[^/]+",
    conda:
        "../envs/dmnsp.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        settings=lambda wildcards: cli_json(get_run(wildcards).settings),
        label=get_run_label,
    shell:
        "python -m dmnsp search-prepare-run --best {input.best} --settings-json {params.settings}"
        " --experiment {wildcards.experiment} --label {params.label} --out-dir $(dirname {output.config})"
        " > {log} 2>&1"
