# dmnsp workflow, run from the repository root:
#
#   snakemake --cores 2                                          # embedded default (config/config.yaml)
#   snakemake --cores 8 --configfile config/paper/cifar100-10-10.yaml
#   snakemake --workflow-profile workflow/profiles/default       # workstation profile
#   snakemake --report report.html                               # tables and plots, captioned
#
# The workflow itself is workflow/Snakefile, its entry point for the Snakemake workflow catalog.
# This file uses it as a module, exactly as a deployment made by snakedeploy does (README.md,
# "Deploying the workflow"); `snakemake -s workflow/Snakefile` runs the same rules. A config given
# with --configfile replaces config/config.yaml (it is not merged into it). See config/README.md.

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from dmnsp.config import ConfigError, check_workflow_config

min_version("9.19")


# workflow/Snakefile checks every config file and the loaded config with dmnsp's bounded reader
# before validation (dmnsp.config.check_workflow_config); this file reads config/config.yaml
# first (its `configfile:`), so it checks that file before Snakemake's own reader, which answers a
# non-UTF-8 or too deep file with a traceback.
if not workflow.overwrite_configfiles:
    try:
        check_workflow_config({}, ["config/config.yaml"])
    except ConfigError as exc:
        raise WorkflowError(f"invalid workflow config: {exc}") from None

    configfile: "config/config.yaml"


module dmnsp:
    snakefile:
        "workflow/Snakefile"
    config:
        config


use rule * from dmnsp
