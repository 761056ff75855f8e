"""Time of the tests of deployment, remote storage and data/weights staging (issue 19's budget: about
4-5 minutes together on the 2-core CI machine).

Runs them in one pytest process with a JUnit report and prints each test's time, their sum, and the
time of the shared fixture that runs the miniature config in a snakedeploy deployment (it existed
before these tests as the local miniature run; deploying adds seconds to it). Timings are only
meaningful on a quiet machine:

    .venv/bin/python benchmarks/deploy_tests.py
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEW_TESTS = [
    "tests/test_staging.py",
    "tests/test_workflow.py::test_snakedeploy_writes_the_module_deployment",
    "tests/test_workflow.py::test_conda_env_installs_the_workflows_own_version",
    "tests/test_workflow.py::test_remote_storage_s3_kill_and_resume_through_the_bucket",
    "tests/test_workflow.py::test_remote_storage_fs_gives_the_local_results",
    "tests/test_workflow.py::test_workflow_entry_point_runs_from_any_folder",
    "tests/test_workflow.py::test_lint_is_clean[workflow]",
    "tests/test_workflow.py::test_profiles_are_read_as_profile_yaml_and_config_yaml",
]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        env = {**os.environ, "DMNSP_TEST_THREADS": os.environ.get("DMNSP_TEST_THREADS", "2")}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
        cmd += ["--durations=0", *NEW_TESTS]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cases = ET.parse(report).getroot().iter("testcase")
        times = [(f"{c.get('classname')}::{c.get('name')}", float(c.get("time", 0))) for c in cases]
    setup = [line for line in proc.stdout.splitlines() if " setup " in line and "test_workflow.py" in line]
    for name, seconds in sorted(times, key=lambda item: -item[1]):
        print(f"{seconds:8.1f} s  {name}")
    print(f"{sum(s for _, s in times):8.1f} s  all {len(times)} tests (setup + call + teardown)")
    print("shared fixture (the deployed miniature run), from --durations:")
    for line in setup[:3]:
        print(f"    {line.strip()}")
    print(
        f"wall {wall:.0f} s, CPU of the test processes {usage.ru_utime + usage.ru_stime:.0f} s, pytest exit {proc.returncode}"
    )
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
