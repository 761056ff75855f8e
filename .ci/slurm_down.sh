#!/usr/bin/env bash
# Stop the private SLURM started by .ci/slurm_up.sh: cancel its jobs, then stop slurmd,
# slurmctld and munged by the PIDs in their pid files (never by name).
#
#   sudo .ci/slurm_down.sh           # keep $DMNSP_SLURM_DIR (logs, state) for inspection
#   sudo .ci/slurm_down.sh --purge   # and delete it
set -uo pipefail

DIR="${DMNSP_SLURM_DIR:-/tmp/dmnsp-slurm}"
CONF="$DIR/slurm.conf"

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Jobs first: a job's slurmstepd outlives slurmd, so cancel while the controller still answers.
if [ -f "$CONF" ] && running "$DIR/run/slurmctld.pid"; then
  export SLURM_CONF="$CONF"
  if [ -n "$(squeue --noheader --format=%i 2>/dev/null)" ]; then
    squeue --noheader --format=%i | xargs -r scancel 2>/dev/null || true
    for _ in $(seq 40); do
      [ -z "$(squeue --noheader --format=%i 2>/dev/null)" ] && break
      sleep 0.25
    done
  fi
fi

for name in slurmd slurmctld munged; do
  pidfile="$DIR/run/$name.pid"
  running "$pidfile" || continue
  pid="$(cat "$pidfile")"
  kill "$pid" 2>/dev/null
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null; fi
  rm -f "$pidfile"
  echo "slurm_down: stopped $name ($pid)" >&2
done

if [ "${1:-}" = --purge ]; then
  rm -rf "$DIR"
fi
exit 0
