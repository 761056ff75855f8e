"""Deploying the workflow as the Snakemake catalog's standardized usage does, for the tests.

``snakedeploy deploy-workflow <repo> <dest> --tag <version>`` clones the repository at the tag,
copies its ``config/`` and writes ``<dest>/workflow/Snakefile``: a ``module`` whose snakefile is
``github("owner/repo", path="workflow/Snakefile", tag=...)``, then ``use rule * from``. Offline the
source is a local git repository made from this working tree and tagged with the package's
version; snakedeploy accepts it, but its local provider (0.17.1) writes the snakefile as the bare
relative path ``"workflow/Snakefile"``, which Snakemake resolves against the deployment's own
workflow folder. :func:`deploy` therefore points that one line at Snakemake's local equivalent of
``github(...)``: ``gitfile("<clone>", path="workflow/Snakefile", tag=...)``, which reads every file
of the workflow from the clone at the tag.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
#: What snakedeploy 0.17.1 writes as the module's snakefile for a local source.
LOCAL_DECLARATION = '"workflow/Snakefile"'


def version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def git(*args: str, cwd: Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def tagged_source(dest: Path) -> tuple[Path, str]:
    """A git repository holding this working tree's files (tracked, and untracked ones git does not
    ignore), committed and tagged ``v<version>``, as a release of the workflow would be."""
    files = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if not (src.is_file() or src.is_symlink()):
            continue  # deleted in the working tree
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)  # profiles' config.yaml stays a link
    tag = f"v{version()}"
    git("init", "-q", cwd=dest)
    git("add", "-A", cwd=dest)
    git("commit", "-q", "-m", "release", cwd=dest)
    git("tag", tag, cwd=dest)
    return dest, tag


def snakedeploy(source: Path, tag: str, dest: Path) -> subprocess.CompletedProcess:
    """``snakedeploy deploy-workflow <source> <dest> --tag <tag> --name dmnsp``."""
    exe = Path(sys.executable).parent / "snakedeploy"
    cmd = [str(exe), "deploy-workflow", str(source), str(dest), "--tag", tag, "--name", "dmnsp"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120)


def deploy(source: Path, tag: str, dest: Path) -> str:
    """Deploy with snakedeploy, point the module at the clone at ``tag``; returns what snakedeploy wrote."""
    snakedeploy(source, tag, dest)
    snakefile = dest / "workflow" / "Snakefile"
    written = snakefile.read_text()
    declaration = f'gitfile("{source}", path="workflow/Snakefile", tag="{tag}")'
    snakefile.write_text(written.replace(LOCAL_DECLARATION, declaration, 1))
    return written
