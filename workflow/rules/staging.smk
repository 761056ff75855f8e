# Data and CLIP weights as inputs of the DAG (dmnsp.staging): local rules, so they run where
# Snakemake runs (a cluster's login node, which may reach the internet), once, before any job that
# reads them is submitted. A folder that is already there is left alone (the rule does not run);
# offline, a missing one stops the workflow with one line naming what to place where.
#
#   download_data:  <dataset_root>/<dataset folder>   python -m dmnsp fetch-data
#   fetch_weights:  weights/<model>/<tag>             python -m dmnsp fetch-weights (an open_clip cache)


localrules:
    download_data,
    fetch_weights,


rule download_data:
    output:
        directory("{data_folder}"),
    log:
        "logs/download_data/{data_folder}.log",
    benchmark:
        "logs/download_data/{data_folder}.tsv"
    wildcard_constraints:
        data_folder=_exactly(STAGED_DATA),
    conda:
        "../envs/dmnsp.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    params:
        options=get_fetch_data_options,
    # The one-line error (what to place where) also reaches the console.
    shell:
        "python -m dmnsp fetch-data {params.options} > {log} 2>&1"
        " || {{ grep -h 'error:' {log} >&2; exit 1; }}"


rule fetch_weights:
    output:
        directory("{weights_folder}"),
    log:
        "logs/fetch_weights/{weights_folder}.log",
    benchmark:
        "logs/fetch_weights/{weights_folder}.tsv"
    wildcard_constraints:
        weights_folder=_exactly(STAGED_WEIGHTS),
    conda:
        "../envs/dmnsp.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    params:
        options=get_fetch_weights_options,
    shell:
        "python -m dmnsp fetch-weights {params.options} --out-dir {output} > {log} 2>&1"
        " || {{ grep -h 'error:' {log} >&2; exit 1; }}"
