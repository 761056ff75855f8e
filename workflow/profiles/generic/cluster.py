#!/usr/bin/env python3
"""Submit, status and cancel glue between Snakemake's cluster-generic executor and PBS/SGE/LSF.

Called by workflow/profiles/generic/profile.yaml; standard library only, so any python3 on the
login node will do.

    cluster.py submit --scheduler pbs --name N --threads T --mem-mb M --runtime MIN --gpus G JOBSCRIPT
        Submits JOBSCRIPT and prints only the job id (the executor reads the first line).
    cluster.py status --scheduler pbs JOBID
        Prints exactly one of running / success / failed, as the executor expects.
    cluster.py cancel --scheduler pbs JOBID...
        Cancels jobs (the profile names qdel/bkill directly; this is for use by hand).

Schedulers: ``pbs`` (PBS Pro / OpenPBS: qsub -l select=..., qstat -x -f), ``sge`` (Son of / Univa
/ Altair Grid Engine: qsub -terse, qstat -j, qacct -j), ``lsf`` (IBM Spectrum LSF: bsub, bjobs).
A job the scheduler no longer knows counts as failed (Snakemake then removes its outputs and
retries it), so keep finished jobs visible for a few minutes: PBS job history
(``job_history_enable``), SGE accounting (``qacct``), LSF ``CLEAN_PERIOD`` (default one hour).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time

SCHEDULERS = ("pbs", "sge", "lsf")
RUNNING, SUCCESS, FAILED = "running", "success", "failed"


def walltime(minutes: float) -> str:
    minutes = max(1, int(round(float(minutes))))
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def submit_command(args: argparse.Namespace) -> list[str]:
    """The scheduler's submit command for one job script, from Snakemake's job resources."""
    threads, mem_mb, gpus = int(args.threads), int(float(args.mem_mb)), int(float(args.gpus or 0))
    log_dir = args.log_dir
    extra = shlex.split(args.extra or "")
    if args.scheduler == "pbs":
        select = f"select=1:ncpus={threads}:mem={mem_mb}mb" + (f":ngpus={gpus}" if gpus else "")
        cmd = ["qsub", "-V", "-N", args.name, "-j", "oe", "-o", f"{log_dir}/", "-l", select]
        cmd += ["-l", f"walltime={walltime(args.runtime)}"]
        cmd += ["-q", args.queue] if args.queue else []
        cmd += ["-A", args.account] if args.account else []
    elif args.scheduler == "sge":
        # h_vmem is per slot on Grid Engine: split the job's memory over its threads.
        per_slot = max(1, -(-mem_mb // threads))
        cmd = ["qsub", "-terse", "-V", "-cwd", "-b", "n", "-N", args.name, "-j", "y", "-o", log_dir]
        cmd += ["-pe", args.pe, str(threads)] if threads > 1 else []
        cmd += ["-l", f"h_vmem={per_slot}M", "-l", f"h_rt={walltime(args.runtime)}"]
        cmd += ["-l", f"gpu={gpus}"] if gpus else []
        cmd += ["-q", args.queue] if args.queue else []
        cmd += ["-P", args.account] if args.account else []
    else:  # lsf
        cmd = ["bsub", "-J", args.name, "-o", f"{log_dir}/%J.log", "-n", str(threads)]
        cmd += ["-R", f"span[hosts=1] rusage[mem={mem_mb}]", "-M", str(mem_mb)]
        cmd += ["-W", str(max(1, int(round(float(args.runtime)))))]
        cmd += ["-gpu", f"num={gpus}"] if gpus else []
        cmd += ["-q", args.queue] if args.queue else []
        cmd += ["-P", args.account] if args.account else []
    return cmd + extra + [args.jobscript]


def parse_job_id(scheduler: str, output: str) -> str:
    """The job id in the submit command's output."""
    if scheduler == "lsf":  # "Job <1234> is submitted to queue <normal>."
        match = re.search(r"Job <(\d+)>", output)
    elif scheduler == "sge":  # -terse: "1234" (array jobs: "1234.1-10:1")
        match = re.search(r"^(\d+)", output.strip())
    else:  # "1234.pbs-server"
        match = re.search(r"^(\S+)", output.strip())
    if not match:
        raise SystemExit(f"cluster.py: no job id in the submit output: {output!r}")
    return match.group(1)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def pbs_status(job_id: str) -> str:
    proc = _run(["qstat", "-x", "-f", job_id])
    state = re.search(r"^\s*job_state = (\S+)", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or not state:
        return FAILED  # unknown to the server (history disabled or expired)
    if state.group(1) not in ("F", "X"):  # Q R H W E T S B U M: not finished yet
        return RUNNING
    code = re.search(r"^\s*Exit_status = (-?\d+)", proc.stdout, re.MULTILINE)
    return SUCCESS if code and int(code.group(1)) == 0 else FAILED


def sge_status(job_id: str, tries: int = 3, pause: float = 2.0) -> str:
    proc = _run(["qstat", "-j", job_id])
    if proc.returncode == 0 and job_id in proc.stdout:
        # A job in error state (Eqw) stays in the queue forever: report it.
        return FAILED if re.search(r"^error reason", proc.stdout, re.MULTILINE) else RUNNING
    # Gone from the queue: its accounting record may take a moment to be written.
    for attempt in range(tries):
        acct = _run(["qacct", "-j", job_id])
        if acct.returncode == 0:
            failed = re.search(r"^failed\s+(\d+)", acct.stdout, re.MULTILINE)
            code = re.search(r"^exit_status\s+(\d+)", acct.stdout, re.MULTILINE)
            ok = failed and code and int(failed.group(1)) == 0 and int(code.group(1)) == 0
            return SUCCESS if ok else FAILED
        if attempt + 1 < tries:
            time.sleep(pause)
    return FAILED


def lsf_status(job_id: str) -> str:
    proc = _run(["bjobs", "-noheader", "-o", "stat exit_code", job_id])
    fields = proc.stdout.split()
    if proc.returncode != 0 or not fields or "not found" in proc.stdout:
        return FAILED
    if fields[0] == "DONE":
        return SUCCESS
    if fields[0] == "EXIT":
        return FAILED
    return RUNNING  # PEND PROV RUN PSUSP USUSP SSUSP WAIT UNKWN ZOMBI


STATUS = {"pbs": pbs_status, "sge": sge_status, "lsf": lsf_status}
CANCEL = {"pbs": ["qdel"], "sge": ["qdel"], "lsf": ["bkill"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_submit = sub.add_parser("submit", help="submit a job script, print its job id")
    p_status = sub.add_parser("status", help="print running, success or failed")
    p_cancel = sub.add_parser("cancel", help="cancel jobs")
    for p in (p_submit, p_status, p_cancel):
        p.add_argument("--scheduler", choices=SCHEDULERS, required=True)
    p_submit.add_argument("--name", default="dmnsp")
    p_submit.add_argument("--threads", default="1")
    p_submit.add_argument("--mem-mb", default="2000")
    p_submit.add_argument("--runtime", default="60", help="minutes")
    p_submit.add_argument("--gpus", default="0")
    p_submit.add_argument("--queue", default="", help="queue (PBS/SGE/LSF -q); empty: default")
    p_submit.add_argument("--account", default="", help="account/project (-A or -P)")
    p_submit.add_argument("--pe", default="smp", help="SGE parallel environment for threads")
    p_submit.add_argument("--log-dir", default=".snakemake/cluster_logs")
    p_submit.add_argument("--extra", default="", help="further submit options, one string")
    p_submit.add_argument("jobscript")
    p_status.add_argument("job_id")
    p_cancel.add_argument("job_ids", nargs="+")
    args = parser.parse_args(argv)

    if args.command == "submit":
        os.makedirs(args.log_dir, exist_ok=True)
        proc = _run(submit_command(args))
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            return proc.returncode or 1
        print(parse_job_id(args.scheduler, proc.stdout))
    elif args.command == "status":
        try:
            print(STATUS[args.scheduler](args.job_id))
        except subprocess.TimeoutExpired:  # a busy server: ask again at the next check
            print(RUNNING)
    else:
        return subprocess.call(CANCEL[args.scheduler] + args.job_ids)
    return 0


if __name__ == "__main__":
    sys.exit(main())
