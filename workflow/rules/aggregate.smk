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
        runs=get_run_dirs,
        expected_seeds=get_expected_seeds,
    # Health warnings (runs collapsed or at chance, every method identical) also reach the console.
    shell:
        "python -m dmnsp report-artifacts --runs {params.runs} --tables-dir $(dirname {output.summary_csv})"
        " --plots-dir {output.plots} --expected-seeds {params.expected_seeds} > {log} 2>&1;"
        " grep -h 'warning:' {log} >&2 || true"
