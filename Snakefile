# dmnsp workflow: class-incremental CLIP experiments (DMNSP, baselines, ablations).
#
#   snakemake --cores 2                                          # embedded default (config/config.yaml)
#   snakemake --cores 8 --configfile config/paper/cifar100-10-10.yaml
#   snakemake --workflow-profile workflow/profiles/default       # workstation profile
#   snakemake --report report.html                               # tables and plots, captioned
#
# A config given with --configfile replaces config/config.yaml (it is not merged into it), so
# each file under config/ describes a complete set of experiments. See config/README.md.

from snakemake.utils import min_version, validate

min_version("9.0")

if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/aggregate.smk"


# Optuna hyperparameter search: only when the config's `search.enabled` is true (see config/README.md).
if config.get("search", {}).get("enabled"):

    include: "workflow/rules/search.smk"


localrules:
    all,
    prepare_run,
    compute_metrics,


rule all:
    default_target: True
    input:
        get_final_outputs(),
