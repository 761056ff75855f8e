# dmnsp workflow: class-incremental CLIP experiments (DMNSP, baselines, ablations).
#
#   snakemake --cores 2                                          # embedded default (config/config.yaml)
#   snakemake --cores 8 --configfile config/paper/cifar100-10-10.yaml
#   snakemake --workflow-profile workflow/profiles/default       # workstation profile
#   snakemake --report report.html                               # tables and plots, captioned
#
# A config given with --configfile replaces config/config.yaml (it is not merged into it), so
# each file under config/ describes a complete set of experiments. See config/README.md.

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

from dmnsp.config import ConfigError, check_workflow_config

min_version("9.0")

SCHEMA = f"{workflow.basedir}/workflow/schemas/config.schema.yaml"


# dmnsp's bounded reader on the config files, a bounded walk of `config` and its schema, before
# anything else reads or walks them (dmnsp.config.check_workflow_config): one line, not a hang.
if not workflow.overwrite_configfiles:
    # Before Snakemake's own reader, which answers a non-UTF-8 or too deep file with a traceback.
    try:
        check_workflow_config({}, ["config/config.yaml"])
    except ConfigError as exc:
        raise WorkflowError(f"invalid workflow config: {exc}") from None

    configfile: "config/config.yaml"


try:
    check_workflow_config(config, workflow.configfiles, SCHEMA)
except ConfigError as exc:
    raise WorkflowError(f"invalid workflow config: {exc}") from None

# Fills the schema's defaults (the check above validated already).
validate(config, SCHEMA)


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
