# Metrics of one run from its per-task evaluations: the accuracy matrix and the summary numbers.


rule compute_metrics:
    input:
        unpack(get_metrics_input),
    output:
        matrix=layout.run_file(RUN, layout.MATRIX),
        metrics=layout.run_file(RUN, layout.METRICS),
    log:
        f"{RUN}/logs/compute_metrics.log",
    benchmark:
        f"{RUN}/benchmarks/compute_metrics.tsv"
    conda:
        "../envs/dmnsp.yaml"
    threads: 1
    resources:
        mem_mb=job_resource("compute_metrics", "mem_mb"),
        runtime=job_resource("compute_metrics", "runtime"),
    shell:
        "python -m dmnsp metrics --run-dir $(dirname {output.metrics}) > {log} 2>&1"
