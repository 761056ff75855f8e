# Tables and plots of one experiment (every run, seeds averaged), captioned for the HTML report,
# where they sit under their dataset and split, then Tables, Plots or Diagnostics.


rule aggregate_results:
    input:
        unpack(get_experiment_input),
    output:
        summary_md=report(
            "results/{experiment}/tables/summary.md",
            caption="../report/summary.rst",
            category=report_category,
            subcategory="Tables",
        ),
        summary_csv=report(
            "results/{experiment}/tables/summary.csv",
            caption="../report/summary.rst",
            category=report_category,
            subcategory="Tables",
        ),
        summary_tex=report(
            "results/{experiment}/tables/summary.tex",
            caption="../report/summary_tex.rst",
            category=report_category,
            subcategory="Tables",
        ),
        summary_html=report(
            "results/{experiment}/tables/summary.html",
            caption="../report/summary_html.rst",
            category=report_category,
            subcategory="Tables",
        ),
        runs_csv=report(
            "results/{experiment}/tables/runs.csv",
            caption="../report/runs.rst",
            category=report_category,
            subcategory="Tables",
        ),
        hyper_csv=report(
            "results/{experiment}/tables/hyperparameters.csv",
            caption="../report/hyperparameters.rst",
            category=report_category,
            subcategory="Tables",
        ),
        hyper_md=report(
            "results/{experiment}/tables/hyperparameters.md",
            caption="../report/hyperparameters.rst",
            category=report_category,
            subcategory="Tables",
        ),
        plots=report(
            directory("results/{experiment}/plots"),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category=report_plot_category,
            subcategory=report_plot_subcategory,
        ),
    log:
        "results/{experiment}/logs/aggregate_results.log",
    benchmark:
        "results/{experiment}/benchmarks/aggregate_results.tsv"
    conda:
        "../envs/dmnsp.yaml"
    threads: 1
    resources:
        mem_mb=job_resource("aggregate_results", "mem_mb"),
        runtime=job_resource("aggregate_results", "runtime"),
    params:
        root=get_results_root,
        runs=get_run_names,
        tables=get_tables_dir,
        plots=get_plots_dir,
        expected_seeds=get_expected_seeds,
    # Runs are read from the folder that holds results/ for this job (Snakemake's local copy under
    # remote storage) and named in the tables as results/<experiment>/runs/<run>. Health warnings
    # (runs collapsed or at chance, every method identical) also reach the console.
    shell:
        "(cd {params.root} && python -m dmnsp report-artifacts --runs {params.runs} --tables-dir {params.tables}"
        " --plots-dir {params.plots} --expected-seeds {params.expected_seeds}) > {log} 2>&1;"
        " grep -h 'warning:' {log} >&2 || true"
