# Per-run preparation, pretraining of small models, and one job per continual-learning task.


rule prepare_run:
    output:
        config=layout.run_file(RUN, layout.CONFIG),
        info=layout.run_file(RUN, layout.RUN_INFO),
    log:
        f"{RUN}/logs/prepare_run.log",
    benchmark:
        f"{RUN}/benchmarks/prepare_run.tsv"
    conda:
        "../envs/dmnsp.yaml"
    threads: 1
    resources:
        mem_mb=job_resource("prepare_run", "mem_mb"),
        runtime=job_resource("prepare_run", "runtime"),
    params:
        settings=get_run_settings,
        swept=get_run_swept,
        label=get_run_label,
    shell:
        "python -m dmnsp prepare-run --settings-json {params.settings} {params.swept}"
        " --experiment {wildcards.experiment} --label {params.label}"
        " --out-dir $(dirname {output.config}) > {log} 2>&1"


rule pretrain_model:
    input:
        unpack(get_pretrain_input),
    output:
        model=layout.pretrained_model("{pretrain_id}"),
        info=f"{PRETRAINED}/model.json",
        config=layout.run_file(PRETRAINED, layout.CONFIG),
        provenance=layout.run_file(PRETRAINED, layout.RUN_INFO),
    log:
        f"{PRETRAINED}/logs/pretrain_model.log",
    benchmark:
        f"{PRETRAINED}/benchmarks/pretrain_model.tsv"
    conda:
        "../envs/dmnsp.yaml"
    threads: job_resource("pretrain_model", "threads")
    resources:
        mem_mb=job_resource("pretrain_model", "mem_mb"),
        runtime=job_resource("pretrain_model", "runtime"),
        gpu=job_resource("pretrain_model", "gpu"),
    params:
        settings=get_pretrain_settings,
        staged=get_staged_options,
    shell:
        "(python -m dmnsp prepare-run --settings-json {params.settings}"
        " --experiment pretrained --label {wildcards.pretrain_id} --out-dir $(dirname {output.config})"
        " && OMP_NUM_THREADS={threads} python -m dmnsp pretrain --quiet --config {output.config} {params.staged}"
        " --out {output.model}) > {log} 2>&1"


# One job per task (tasks_per_job: 1, the default), resuming from the previous task's checkpoint.
rule train_task:
    input:
        unpack(get_train_task_input),
    output:
        checkpoint=checkpoint_output(layout.task_file(RUN, "{task}", layout.CHECKPOINT)),
        eval=layout.task_file(RUN, "{task}", layout.EVAL),
        diagnostics=layout.task_file(RUN, "{task}", layout.DIAGNOSTICS),
    log:
        f"{RUN}/logs/train_task{{task}}.log",
    benchmark:
        f"{RUN}/benchmarks/train_task{{task}}.tsv"
    wildcard_constraints:
        **train_task_constraints(),
    conda:
        "../envs/dmnsp.yaml"
    threads: job_resource("train_task", "threads")
    resources:
        mem_mb=job_resource("train_task", "mem_mb"),
        runtime=job_resource("train_task", "runtime"),
        gpu=job_resource("train_task", "gpu"),
    params:
        resume=get_resume_option,
        staged=get_staged_options,
    shell:
        "OMP_NUM_THREADS={threads} python -m dmnsp train-task --quiet --config {input.config} --task {wildcards.task}"
        " {params.resume} --out-dir $(dirname {output.eval}) {params.staged} > {log} 2>&1"


# tasks_per_job: k > 1: one job trains tasks first..last in one process, resuming from task first-1's
# checkpoint, and writes every task's folder (all of them its outputs). Snakemake cannot derive
# task{t+1} from a wildcard, so each chunk position is a rule of its own, limited to the runs
# whose chunk it is (dmnsp.experiments.chunk_rules). The table's runtime is per task.
for chunk in CHUNK_RULES:

    rule:
        name:
            chunk.name
        input:
            unpack(train_tasks_input(chunk)),
        output:
            **train_tasks_output(chunk),
        log:
            f"{RUN}/logs/train_tasks{chunk.first}-{chunk.last}.log",
        benchmark:
            f"{RUN}/benchmarks/train_tasks{chunk.first}-{chunk.last}.tsv"
        wildcard_constraints:
            **train_tasks_constraints(chunk),
        conda:
            "../envs/dmnsp.yaml"
        threads: job_resource("train_task", "threads")
        resources:
            mem_mb=job_resource("train_task", "mem_mb"),
            runtime=job_resource("train_task", "runtime", tasks=len(chunk.tasks)),
            gpu=job_resource("train_task", "gpu"),
        params:
            # The shell command is formatted when the job runs: no loop variable in it.
            tasks=f"{chunk.first}-{chunk.last}",
            resume=get_resume_option,
            staged=get_staged_options,
        # The run folder is the one holding the job's task outputs (<run>/task<t>/eval.json): under
        # remote storage, Snakemake's local copy of it. The shell text is evaluated when the job
        # runs, after the loop has ended: no loop variable in it (eval0 is every chunk's first task).
        shell:
            "OMP_NUM_THREADS={threads} python -m dmnsp train-task --quiet --config {input.config}"
            " --tasks {params.tasks} {params.resume} --run-dir $(dirname $(dirname {output.eval0}))"
            " {params.staged} > {log} 2>&1"

    inherit_train_task_settings(chunk)
