# The dmnsp package the workflow plans with and its jobs run (`python -m dmnsp`): it must be the
# workflow's own version, and conda environments install exactly that (envs/dmnsp.yaml).

import os
import tomllib

from snakemake.exceptions import WorkflowError
from snakemake.sourcecache import HostingProviderFile, LocalGitFile

# workflow/rules of the source this workflow is read from (a path, or a git or GitHub file)
_RULES_DIR = workflow.current_basedir


def workflow_version():
    """The version in the pyproject.toml beside this workflow (its checkout, tag or clone)."""
    with open(workflow.source_path("../../pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)["project"]["version"]


def package_requirement():
    """pip requirement for the dmnsp source this workflow was read from: a local checkout, a local
    git clone at a tag (a module's gitfile(...)), or GitHub/GitLab at a tag (github(...)).
    """
    base = _RULES_DIR
    if isinstance(base, LocalGitFile):
        return f"dmnsp @ git+file://{os.path.abspath(base.repo_path)}@{base.ref}"
    if isinstance(base, HostingProviderFile):
        return f"dmnsp @ git+https://{base.host}/{base.repo}@{base.ref}"
    root = os.path.dirname(os.path.dirname(str(base)))
    return f"dmnsp @ file://{os.path.abspath(root)}"


def _check_package():
    how = (
        f"install this workflow's own version into the Python that runs Snakemake: "
        f"pip install '{package_requirement()}' (or pip install -e . in a checkout)"
    )
    try:
        import dmnsp
    except ImportError:
        raise WorkflowError(f"the dmnsp package is not installed; {how}") from None
    wanted = workflow_version()
    if dmnsp.__version__ != wanted:
        raise WorkflowError(
            f"this workflow is dmnsp {wanted} but Snakemake runs with dmnsp {dmnsp.__version__} "
            f"({os.path.dirname(dmnsp.__file__)}); {how}"
        )


_check_package()
# envs/dmnsp.yaml installs `${DMNSP_PACKAGE}` (pip expands it when conda creates the environment):
# this workflow's own source, unless set already (e.g. a wheel on a site's package index).
os.environ.setdefault("DMNSP_PACKAGE", package_requirement())


def default_configfile():
    """config/config.yaml of the working directory (a deployed copy's, or the checkout's when run
    from its root), else the one shipped beside this workflow."""
    if os.path.exists("config/config.yaml"):
        return "config/config.yaml"
    if isinstance(_RULES_DIR, (LocalGitFile, HostingProviderFile)):
        # a copy in Snakemake's source cache
        return workflow.source_path("../../config/config.yaml")
    return os.path.normpath(
        os.path.join(str(_RULES_DIR), "..", "..", "config", "config.yaml")
    )
