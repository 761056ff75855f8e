"""Run hostile-input cases in a fresh process, each through a real reader of dmnsp, and report per
case the error it ended in, its seconds and the process's peak memory so far.

    python tests/bounded_cases.py CASES.json  ->  one JSON line per case, then {"done": ...}

Peak memory is the resident set's high-water mark (VmHWM), reset before each case by writing 5 to
/proc/self/clear_refs (Linux), so each case has its own peak; where that is not allowed, the
process's running maximum (``ru_maxrss``) over what the imports took. A fresh process, because in
the test session that maximum would hide a case below an earlier test's peak. The address space is
capped a few GiB above what the imports take, so an input that does expand dies with MemoryError
here (reported as a failure) instead of swapping the machine.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


def readers() -> dict:
    """Each reader of untrusted input by name; arguments are file paths (or lists/dicts of them)."""
    from dmnsp import cli, config, experiments, hydra_import, scenario

    def snakemake_load(path: str):
        # What Snakemake's --configfile reader builds (yte over PyYAML's FullLoader, aliases shared),
        # then the Snakefile's check before Snakemake's validate walks it.
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.load(fh, Loader=yaml.FullLoader)  # noqa: S506 - what Snakemake does
        return config.check_workflow_config(loaded, [], WORKFLOW_SCHEMA)

    return {
        "load_config": config.load_config,
        "class_order_job": lambda path: scenario.resolve_class_order(path, 10, list(range(10))),
        "class_order_planning": lambda path: experiments.expand_experiment(
            "e", {"methods": ["zeroshot"], "run": {"class_order": path, "model_name": "dmnsp-tiny"}}
        ),
        "read_sheet": experiments.read_sheet,
        "import_hydra_config": hydra_import.import_hydra_config,
        "set_override": lambda path: config.parse_overrides([Path(path).read_text()]),
        "settings_json": lambda path: cli._json_object(Path(path).read_text(), "--settings-json"),
        "workflow_file": lambda path: config.check_workflow_config({}, [path]),
        "workflow_loaded": snakemake_load,
    }


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> float | None:
    """Reset VmHWM to the current resident set and return that (None where not allowed)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mib("VmRSS")
    except OSError:
        return None


def _peak_over(start: float | None, baseline: float) -> float:
    if start is not None:
        return _status_mib("VmHWM") - start
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline


def _cap_address_space(extra_gib: int = 3) -> None:
    size = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + extra_gib * 2**30, resource.RLIM_INFINITY))


def main(cases_path: str) -> None:
    from dmnsp.config import ConfigError

    calls = readers()
    import dmnsp.scenario  # noqa: F401 - imports (torch) before the baseline, not inside a case

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if Path("/proc/self/statm").exists():
        _cap_address_space()
    for case in json.loads(Path(cases_path).read_text()):
        rss = _reset_peak()
        start = time.perf_counter()
        try:
            calls[case["reader"]](case["arg"])
            outcome = {"outcome": "accepted", "message": ""}
        except ConfigError as exc:
            outcome = {"outcome": "config-error", "message": str(exc)}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the case
            outcome = {"outcome": type(exc).__name__, "message": str(exc)[:500]}
        record = {
            "name": case["name"],
            **outcome,
            "seconds": time.perf_counter() - start,
            "peak_over_baseline_mib": _peak_over(rss, baseline),
            "peak_measured": "VmHWM reset per case" if rss is not None else "ru_maxrss over the imports",
        }
        print(json.dumps(record), flush=True)
    print(json.dumps({"done": True, "baseline_mib": baseline}), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1])
