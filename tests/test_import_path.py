"""The per-task job's import path stays light: ``python -m dmnsp train-task`` (thousands of jobs
in a paper sweep, each a fresh interpreter) imports no table, plotting or search library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Libraries only the aggregation, plots, report and search stages need.
HEAVY = ("pandas", "matplotlib", "optuna", "scipy", "sqlalchemy", "snakemake", "tabulate")

# Runs in a fresh interpreter: two train-task jobs (the second resumes from the first's
# checkpoint, as every workflow job after task 0 does), then the top-level modules loaded.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from dmnsp.cli import main

    config, out = sys.argv[1], sys.argv[2]
    assert main(["train-task", "--quiet", "--config", config, "--task", "0", "--out-dir", out + "/task0"]) == 0
    assert main(["train-task", "--quiet", "--config", config, "--task", "1",
                 "--resume", out + "/task0/checkpoint.pt", "--out-dir", out + "/task1"]) == 0
    print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
    """
)


def _modules_after(code: str, *args: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_train_task_jobs_import_no_table_plot_or_search_library(tmp_path):
    cfg = {
        "dataset": "fashion-mnist",
        "dataset_root": str(tmp_path / "data"),
        "model_name": "dmnsp-tiny",
        "pretrained": None,
        "initial_increment": 5,
        "increment": 5,
        "max_train_per_class": 8,
        "max_test_per_class": 4,
        "adapter_dim": 4,
        "batch_size": 8,
        "max_steps": 1,
        "method": "dmnsp",
        "threads": 1,
        "device": "cpu",
        "num_workers": 0,
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    loaded = _modules_after(SCRIPT, str(config), str(tmp_path / "run"))
    assert {"torch", "open_clip", "dmnsp"} <= loaded  # the jobs did run
    assert (tmp_path / "run" / "task1" / "checkpoint.pt").is_file()
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_the_command_line_parser_imports_no_library():
    """Building the parser (``--help``, argument errors) costs no torch, pandas or open_clip import."""
    code = "import json, sys; from dmnsp.cli import build_parser; build_parser(); print(json.dumps(sorted(sys.modules)))"
    loaded = _modules_after(code)
    assert not loaded & {"torch", "numpy", "open_clip", "yaml", *HEAVY}, sorted(loaded & {"torch", *HEAVY})
