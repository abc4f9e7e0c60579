#!/usr/bin/env bash
# Stops the cluster that slurm/start.sh started in STATE_DIR: cancels its jobs, then stops its slurmd (one per node)
# and slurmctld.
# munged is left running (other clusters on this machine share it). Only processes that are slurmd/slurmctld
# started with STATE_DIR/slurm.conf are signalled, whatever the pid files say, and only if STATE_DIR is root's own.
# Usage: slurm/stop.sh [STATE_DIR]      STATE_DIR defaults to $GD_SLURM_DIR, else /var/lib/gd-slurm.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
die() { echo "slurm/stop.sh: $*" >&2; exit 1; }
# shellcheck source=slurm/state_dir.sh
. "$here/state_dir.sh"
state=${1:-${GD_SLURM_DIR:-$GD_SLURM_DEFAULT_DIR}}
[ -e "$state" ] || [ -L "$state" ] || { echo "slurm/stop.sh: nothing under $state"; exit 0; }
state=$(check_state_dir "$state") || exit 1
conf="$state/slurm.conf"
export SLURM_CONF="$conf" PATH="$PATH:/usr/sbin"

if ours "$state/run/slurmctld.pid" slurmctld "$conf" && [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
  squeue -h -o %i | xargs -r scancel
  for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1; done
fi
# slurmd-<node>.pid per node (slurmd.pid: clusters started before nodes were named in pid files), then slurmctld.
stop_daemon() {
  local pidfile=$1 daemon=$2 pid
  if ours "$pidfile" "$daemon" "$conf"; then
    pid=$(tr -dc '0-9' <"$pidfile")
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    ours "$pidfile" "$daemon" "$conf" && kill -9 "$pid"
  elif [ -s "$pidfile" ]; then
    echo "slurm/stop.sh: $pidfile names no $daemon of this cluster; nothing signalled" >&2
  fi
  rm -f -- "$pidfile"
}
for pidfile in "$state"/run/slurmd.pid "$state"/run/slurmd-*.pid; do
  [ -e "$pidfile" ] || [ -L "$pidfile" ] || continue
  stop_daemon "$pidfile" slurmd
done
stop_daemon "$state/run/slurmctld.pid" slurmctld
echo "SLURM stopped ($state)"
