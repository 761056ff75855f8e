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

import os

from snakemake.utils import min_version

min_version("9.0")


# The working directory's config/config.yaml, else the one beside this file.
DEFAULT_CONFIG = "config/config.yaml"
if not os.path.exists(DEFAULT_CONFIG):
    DEFAULT_CONFIG = workflow.source_path(DEFAULT_CONFIG)

if not workflow.overwrite_configfiles:

    configfile: DEFAULT_CONFIG


module dmnsp:
    snakefile:
        "workflow/Snakefile"
    config:
        config


use rule * from dmnsp
