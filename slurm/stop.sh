#!/usr/bin/env bash
# Stops the cluster that slurm/start.sh started in STATE_DIR: cancels its jobs, then stops slurmd and slurmctld.
# munged is left running (other clusters on this machine share it).
# Usage: slurm/stop.sh [STATE_DIR]      STATE_DIR defaults to $GD_SLURM_DIR, else /tmp/gd-slurm.
set -uo pipefail
state=${1:-${GD_SLURM_DIR:-/tmp/gd-slurm}}
[ -d "$state" ] || { echo "slurm/stop.sh: nothing under $state"; exit 0; }
state=$(cd "$state" && pwd)
export SLURM_CONF="$state/slurm.conf" PATH="$PATH:/usr/sbin"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$state/run/slurmctld.pid" && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
  squeue -h -o %i | xargs -r scancel
  for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1; done
fi
for daemon in slurmd slurmctld; do
  pidfile="$state/run/$daemon.pid"
  if alive "$pidfile"; then
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$pidfile"
done
echo "SLURM stopped ($state)"
