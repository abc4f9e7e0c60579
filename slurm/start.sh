#!/usr/bin/env bash
# Brings up a single-node SLURM on localhost (munged, slurmctld, slurmd), as root and without systemd.
# Usage: slurm/start.sh [STATE_DIR]     STATE_DIR defaults to $GD_SLURM_DIR, else /var/lib/gd-slurm.
# STATE_DIR must be root's own (see state_dir.sh): a directory another user made first is refused.
# Ports: $GD_SLURM_CTLD_PORT (6817) and $GD_SLURM_SLURMD_PORT (6818). Running it again is harmless.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
die() { echo "slurm/start.sh: $*" >&2; exit 1; }
# shellcheck source=slurm/state_dir.sh
. "$here/state_dir.sh"
ctld_port=${GD_SLURM_CTLD_PORT:-6817}
slurmd_port=${GD_SLURM_SLURMD_PORT:-6818}

[ "$(id -u)" = 0 ] || die "must run as root (slurmd starts job steps as their owner)"
state=$(check_state_dir "${1:-${GD_SLURM_DIR:-$GD_SLURM_DEFAULT_DIR}}" create)
for bin in munged slurmctld slurmd sinfo sbatch srun; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] ||
    die "'$bin' not found: install Debian's slurm-wlm slurm-client munge (bash tools/system-deps.sh)"
done
export PATH="$PATH:/usr/sbin"
conf="$state/slurm.conf"
export SLURM_CONF="$conf"
for f in "$conf" "$state/run/slurmctld.pid" "$state/run/slurmd.pid"; do
  [ -L "$f" ] && die "$f is a symbolic link: refusing to use $state"
done

alive() { ours "$1" "$2" "$conf"; }

# munge: one daemon per machine, shared by every cluster started here.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  [ -f /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0700 /etc/munge
  runuser -u munge -- munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munged did not come up (see /var/log/munge/munged.log)"
fi

if alive "$state/run/slurmctld.pid" slurmctld && alive "$state/run/slurmd.pid" slurmd && sinfo -h >/dev/null 2>&1
then
  echo "SLURM already running under $state"
else
  "$here/stop.sh" "$state" >/dev/null 2>&1 || true
  (umask 077 && mkdir -p "$state/ctld" "$state/spool" "$state/run" "$state/log")
  cpus=$(nproc)
  mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 * 0.9 / 1024}' /proc/meminfo)
  tmp=$(mktemp "$state/slurm.conf.XXXXXX")
  sed -e "s|@STATE@|$state|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEM_MB@|$mem_mb|g" \
      -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|$slurmd_port|g" \
      "$here/slurm.conf.in" >"$tmp"
  chmod 0644 "$tmp"  # readable by the users of the cluster once they may enter STATE_DIR (slurm/README.md)
  mv -f "$tmp" "$conf"
  # -c: start from a clean state (job ids restart at 1, so each run needs a fresh submitit folder).
  slurmctld -c -f "$conf"
  # The machine's hostname is not "localhost": name the node explicitly.
  slurmd -N localhost -f "$conf"
fi

# Our own daemons must be the ones answering: with ports taken by another cluster they exit at once, and
# sinfo would report the other cluster's node.
up() { alive "$state/run/slurmctld.pid" slurmctld && alive "$state/run/slurmd.pid" slurmd; }
st=""
for _ in $(seq 300); do
  st=$(sinfo -h -N -o %t 2>/dev/null || true)
  case "$st" in
    idle|mix|alloc) up && break ;;
    down*|drain*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.1
done
up || die "slurmctld/slurmd exited (ports $ctld_port/$slurmd_port in use?); logs: $state/log/"
case "$st" in
  idle|mix|alloc) ;;
  *) die "node not idle (state '${st:-no answer}'); logs: $state/log/slurmctld.log $state/log/slurmd.log" ;;
esac

cat <<MSG
SLURM is up: node localhost ($(nproc) CPUs), partition debug, state in $state.
Use it from this shell with:
  export SLURM_CONF=$conf
  sinfo; srun -n1 hostname
  python -m gd.launch +cluster=slurm +exp=demo
Stop it with: slurm/stop.sh $state
MSG
