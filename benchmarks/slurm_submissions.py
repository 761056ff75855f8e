"""sbatch calls of the SLURM test workflow under the shipped profile and its alternatives.

    bash .ci/slurm_up.sh                                   # a single-node SLURM (root)
    .venv/bin/python benchmarks/slurm_submissions.py       # per-job, arrays, groups; a few minutes
    bash .ci/slurm_down.sh

The workflow is the one tests/test_slurm.py sends through SLURM (its ``miniature_config``: two
training runs of two tasks, tiny CLIP, then the aggregation), with that test's site profile (the
shipped ``workflow/profiles/slurm`` naming this cluster's partition and status command). Each
variant plans it in a fresh folder and runs it to the end, without preemption:

- ``per-job``: the profile as shipped (one sbatch per job);
- ``arrays``: plus ``slurm-array-jobs: train_task`` (snakemake-executor-plugin-slurm >= 2.x submits
  train_task jobs that are ready in the same scheduling round as one job array);
- ``groups``: plus ``groups: [train_task=chain]`` and ``group-components: [chain=1]`` (a run's
  chain of train_task jobs is one group job: one sbatch runs all its tasks in sequence);
- ``tasks-per-job``: the shipped profile, the workflow config with ``tasks_per_job: 2`` (one
  training job per run trains both its tasks in one process; ``--tasks-per-job K`` for another k).

Counted from the scheduler's own records: the distinct SLURM job ids (an array's tasks share one)
of the jobs named with the Snakemake run's id, i.e. the sbatch calls this run made, whatever else
the cluster runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402
from common import load_line, machine_line, table  # noqa: E402
from test_slurm import (  # noqa: E402
    Cluster,
    child_env,
    miniature_config,
    run_id,
    site_profile,
    slurm_cmd,
    snakemake_cmd,
    squeue_records,
)

VARIANTS = {
    "per-job": {},
    "arrays": {"slurm-array-jobs": "train_task"},
    "groups": {"groups": ["train_task=chain"], "group-components": ["chain=1"]},
    "tasks-per-job": {},  # a workflow config setting, not a profile one: see CONFIG_VARIANTS
}
CONFIG_VARIANTS = {"tasks-per-job": "tasks_per_job"}


def cluster() -> Cluster:
    """This machine's SLURM, as tests/test_slurm.py sees it (partition, status command, sizes)."""
    try:
        partitions = slurm_cmd("sinfo", "--noheader", "--format=%P").stdout.split()
    except FileNotFoundError:
        raise SystemExit("no sinfo: install and start SLURM first (bash .ci/slurm_up.sh)") from None
    partition = next(
        (p.rstrip("*") for p in partitions if p.endswith("*")), partitions[0] if partitions else ""
    )
    if not partition:
        raise SystemExit("sinfo lists no partition: start SLURM first (bash .ci/slurm_up.sh)")
    cpus, memory = slurm_cmd(
        "sinfo", "--noheader", f"--partition={partition}", "--format=%c %m"
    ).stdout.split()
    sacct = slurm_cmd("sacct", "--noheader", "-X", "--format=JobID")
    use_sacct = sacct.returncode == 0 and "disabled" not in (sacct.stdout + sacct.stderr).lower()
    return Cluster(partition, "sacct" if use_sacct else "squeue", int(cpus), int(memory.rstrip("+")))


def run_variant(name: str, extra: dict, slurm: Cluster, tmp: Path, tasks_per_job: int = 2) -> dict:
    base = tmp / name
    workdir = base / "work"
    workdir.mkdir(parents=True)
    config = miniature_config(base / "config.yaml", tmp / "data")
    if name in CONFIG_VARIANTS:
        cfg = yaml.safe_load(config.read_text())
        cfg[CONFIG_VARIANTS[name]] = tasks_per_job
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    profile = site_profile(base / "profile", slurm)
    settings = yaml.safe_load((profile / "config.yaml").read_text())
    settings.update(extra)
    (profile / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    t0 = time.monotonic()
    proc = subprocess.run(
        snakemake_cmd(workdir, "--profile", str(profile), "--configfile", str(config), limit=900),
        cwd=workdir,
        env=child_env(),
        capture_output=True,
        text=True,
    )
    seconds = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    rid = run_id(out)
    records = squeue_records([rid])
    slurm_cmd("scancel", f"--name={rid}")
    ids = {r["id"].split("_")[0] for r in records}
    done = (workdir / "results" / "test" / "tables" / "summary.csv").is_file()
    return {
        "variant": name,
        "rc": proc.returncode,
        "finished": done,
        "sbatch": len(ids),
        "records": len(records),
        "states": sorted({r["state"] for r in records}),
        "seconds": seconds,
        "tail": "" if proc.returncode == 0 else out[-3000:],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--tasks-per-job", type=int, default=2, help="k of the tasks-per-job variant")
    args = parser.parse_args(argv)
    print(machine_line())
    slurm = cluster()
    print(f"SLURM: partition {slurm.partition}, {slurm.cpus} CPUs, status command {slurm.status_command}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dmnsp-bench-slurm-") as tmp:
        for name in args.variants:
            print(f"  {name} ...", flush=True)
            r = run_variant(name, VARIANTS[name], slurm, Path(tmp), args.tasks_per_job)
            print(
                f"  {name}: {r['sbatch']} sbatch, {r['records']} SLURM jobs, {r['seconds']:.0f} s; {load_line()}"
            )
            if r["tail"]:
                print(r["tail"])
            rows.append(
                [
                    name,
                    yaml.safe_dump(VARIANTS[name], default_flow_style=True).strip()
                    if VARIANTS[name]
                    else f"(shipped; config tasks_per_job: {args.tasks_per_job})"
                    if name in CONFIG_VARIANTS
                    else "(shipped)",
                    r["sbatch"],
                    r["records"],
                    ", ".join(r["states"]),
                    "yes" if r["finished"] and r["rc"] == 0 else f"NO (exit {r['rc']})",
                    f"{r['seconds']:.0f} s",
                ]
            )
    print(
        table(
            rows,
            ["variant", "profile additions", "sbatch calls", "SLURM jobs", "states", "finished", "wall"],
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
