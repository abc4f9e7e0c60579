#!/usr/bin/env bash
# Brings up SLURM on this machine (munged, slurmctld, one or two slurmd), as root and without systemd.
# Usage: slurm/start.sh [STATE_DIR]     STATE_DIR defaults to $GD_SLURM_DIR, else /var/lib/gd-slurm.
# STATE_DIR must be root's own (see state_dir.sh): a directory another user made first is refused.
# Ports: $GD_SLURM_CTLD_PORT (6817) and $GD_SLURM_SLURMD_PORT (6818; node i of several gets port + i, or
# $GD_SLURM_SLURMD_PORTS lists one port per node). Running it again is harmless.
# GD_SLURM_NODES=2: two nodes, this machine's hostname and another name /etc/hosts maps to a loopback address (or
# $GD_SLURM_NODE_NAMES, two names that resolve here), each slurmd in its own mount namespace with a private /dev/shm
# and /tmp, as separate machines have: what one node's job steps leave there, the other's never see. STATE_DIR must
# then lie outside /tmp and /dev/shm. Folders that stand for a shared filesystem stay visible on both nodes where
# they lie under /tmp: the checkout this script belongs to (code and its .venv, as on a cluster's shared home or
# project filesystem) and $GD_SLURM_SHARED_DIRS (':'-separated absolute paths, e.g. a venv outside the checkout).
# GD_SLURM_FIRST_JOB_ID (1): the first job id. Two clusters on one machine need disjoint ids: what is derived from
# a job id (gd's rendezvous port, submitit's %j folders) would otherwise collide between them.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
die() { echo "slurm/start.sh: $*" >&2; exit 1; }
# shellcheck source=slurm/state_dir.sh
. "$here/state_dir.sh"
ctld_port=${GD_SLURM_CTLD_PORT:-6817}
slurmd_port=${GD_SLURM_SLURMD_PORT:-6818}
nodes=${GD_SLURM_NODES:-1}
first_job_id=${GD_SLURM_FIRST_JOB_ID:-1}

# loopback_alias HOST: a name from /etc/hosts, neither localhost nor HOST, for a loopback address (127.*, ::1).
loopback_alias() {
  awk -v host="$1" '$1 ~ /^(127\.|::1$)/ {for (i = 2; i <= NF; i++) if ($i !~ /^#/ && $i != "localhost" &&
    $i != host) {print $i; exit}}' /etc/hosts
}

[ "$(id -u)" = 0 ] || die "must run as root (slurmd starts job steps as their owner)"
[[ "$first_job_id" =~ ^[1-9][0-9]{0,6}$ ]] || die "GD_SLURM_FIRST_JOB_ID=$first_job_id: expected 1 to 9999999"
case "$nodes" in 1|2) ;; *) die "GD_SLURM_NODES=$nodes: expected 1 or 2" ;; esac
not_node_local() {
  case "$1/" in /tmp/*|/dev/shm/*) die "state dir $1 is under /tmp or /dev/shm, which each of the two nodes replaces" \
    "with its own: choose one outside them (default $GD_SLURM_DEFAULT_DIR)" ;; esac
}
if [ "$nodes" = 1 ]; then
  names=(localhost)
else
  # SLURM reads NodeName=localhost as this machine's hostname, so it cannot be one of two nodes: the default is the
  # hostname and another name /etc/hosts gives a loopback address (Debian's ip6-localhost, say).
  # shellcheck disable=SC2206
  names=(${GD_SLURM_NODE_NAMES:-$(hostname) $(loopback_alias "$(hostname)")})
  [ "${#names[@]}" = 2 ] && [ "${names[0]}" != "${names[1]}" ] ||
    die "two nodes need two different names (GD_SLURM_NODE_NAMES='${names[*]}'; this machine's hostname is" \
      "$(hostname))"
  # The first node's name is the job's rendezvous address (MASTER_ADDR) on every node.
  for name in "${names[@]}"; do
    [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9.-]*$ ]] || die "node name '$name': expected letters, digits, '.' and '-'"
    getent hosts "$name" >/dev/null ||
      die "node name '$name' does not resolve: add '127.0.0.1 $name' to /etc/hosts or set GD_SLURM_NODE_NAMES"
  done
  command -v unshare >/dev/null 2>&1 || die "'unshare' not found (util-linux): each node needs its own /tmp, /dev/shm"
  # The shared folders under /tmp, resolved, without those inside another (binding the outer one shows them).
  IFS=: read -r -a wanted <<<"$(cd "$here/.." && pwd -P)${GD_SLURM_SHARED_DIRS:+:$GD_SLURM_SHARED_DIRS}"
  under_tmp=()
  for dir in "${wanted[@]}"; do
    [ -n "$dir" ] || continue
    case "$dir" in /*) ;; *) die "GD_SLURM_SHARED_DIRS entry '$dir': expected an absolute path" ;; esac
    [ -d "$dir" ] || die "GD_SLURM_SHARED_DIRS entry '$dir': not a directory"
    real=$(realpath -e "$dir")
    case "$real/" in
      /tmp/) die "shared folder $dir is /tmp itself: each node needs its own /tmp; name the folders inside it" ;;
      /dev/shm/*) die "shared folder $dir is under /dev/shm, which each node replaces with its own" ;;
      /tmp/*) under_tmp+=("$real") ;;
    esac
  done
  keep=()
  for dir in "${under_tmp[@]}"; do
    inside=""
    for other in "${under_tmp[@]}"; do
      [ "$other" != "$dir" ] && case "$dir/" in "$other"/*) inside=1 ;; esac
    done
    [ -n "$inside" ] || [[ " ${keep[*]} " == *" $dir "* ]] || keep+=("$dir")
  done
fi
state=${1:-${GD_SLURM_DIR:-$GD_SLURM_DEFAULT_DIR}}
case "$state" in /*) ;; *) state="$PWD/$state" ;; esac
# Each node mounts its own /tmp and /dev/shm over the machine's: state kept there would be hidden from start.sh.
[ "$nodes" = 1 ] || not_node_local "$state"
state=$(check_state_dir "$state" create)
[ "$nodes" = 1 ] || not_node_local "$state"
for bin in munged slurmctld slurmd sinfo sbatch srun; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] ||
    die "'$bin' not found: install Debian's slurm-wlm slurm-client munge (bash tools/system-deps.sh)"
done
export PATH="$PATH:/usr/sbin"
conf="$state/slurm.conf"
export SLURM_CONF="$conf"

# shellcheck disable=SC2206
ports=(${GD_SLURM_SLURMD_PORTS:-})
for i in "${!names[@]}"; do
  [ -n "${ports[$i]:-}" ] || ports[i]=$((slurmd_port + i))
done
slurmd_pid() { printf '%s/run/slurmd-%s.pid' "$state" "$1"; }
for f in "$conf" "$state/run/slurmctld.pid" $(for n in "${names[@]}"; do slurmd_pid "$n"; echo; done); do
  [ -L "$f" ] && die "$f is a symbolic link: refusing to use $state"
done
up() {
  ours "$state/run/slurmctld.pid" slurmctld "$conf" || return 1
  local name
  for name in "${names[@]}"; do ours "$(slurmd_pid "$name")" slurmd "$conf" || return 1; done
}
# The running cluster has the requested nodes (and no others).
same_nodes() {
  [ "$(sinfo -h -N -o %N 2>/dev/null | sort -u | xargs)" = "$(printf '%s\n' "${names[@]}" | sort | xargs)" ]
}

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

if up && sinfo -h >/dev/null 2>&1 && same_nodes; then
  echo "SLURM already running under $state"
else
  "$here/stop.sh" "$state" >/dev/null 2>&1 || true
  (umask 077 && mkdir -p "$state/ctld" "$state/spool" "$state/run" "$state/log")
  cpus=$(( $(nproc) / ${#names[@]} )); [ "$cpus" -ge 1 ] || cpus=1
  mem_mb=$(awk -v n="${#names[@]}" '/^MemTotal:/ {printf "%d", $2 * 0.9 / 1024 / n}' /proc/meminfo)
  node_lines=""
  for i in "${!names[@]}"; do
    node_lines+="NodeName=${names[$i]} NodeAddr=127.0.0.1 Port=${ports[$i]} CPUs=$cpus"
    node_lines+=" RealMemory=$mem_mb State=UNKNOWN"$'\n'
  done
  node_lines+="PartitionName=debug Nodes=$(IFS=,; echo "${names[*]}") Default=YES MaxTime=INFINITE State=UP"
  tmp=$(mktemp "$state/slurm.conf.XXXXXX")
  sed -e "s|@STATE@|$state|g" -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|${ports[0]}|g" \
      -e "s|@FIRST_JOB_ID@|$first_job_id|g" \
      "$here/slurm.conf.in" | awk -v nodes="$node_lines" '$0 == "@NODES@" {print nodes; next} {print}' >"$tmp"
  chmod 0644 "$tmp"  # readable by the users of the cluster once they may enter STATE_DIR (slurm/README.md)
  mv -f "$tmp" "$conf"
  # -c: start from a clean state (job ids restart at FirstJobId, so each run needs a fresh submitit folder).
  slurmctld -c -f "$conf"
  for name in "${names[@]}"; do
    if [ "${#names[@]}" = 1 ]; then
      slurmd -N "$name" -f "$conf"  # the machine's hostname is not "localhost": name the node explicitly
    else
      # A private mount namespace per node: its own empty /tmp and /dev/shm, inherited by its job steps. The new
      # /tmp is built aside (at $fresh, outside /tmp), the shared folders bound into it at their paths, and then
      # moved over /tmp: nothing of the machine's /tmp but those folders shows through.
      fresh="$state/run/tmp-$name"
      mkdir -p "$fresh"
      unshare -m --propagation private sh -c 'set -e; name=$1 conf=$2 fresh=$3; shift 3
        mount -t tmpfs -o mode=1777 tmpfs /dev/shm
        mount -t tmpfs -o mode=1777 tmpfs "$fresh"
        for dir in "$@"; do mkdir -p "$fresh${dir#/tmp}"; mount --bind "$dir" "$fresh${dir#/tmp}"; done
        mount --move "$fresh" /tmp
        exec slurmd -N "$name" -f "$conf"' sh "$name" "$conf" "$fresh" "${keep[@]}" ||
        die "could not start slurmd for node $name in its own mount namespace (unshare/mount refused?)"
    fi
  done
fi

# Our own daemons must be the ones answering: with ports taken by another cluster they exit at once, and
# sinfo would report the other cluster's nodes.
# Every node answers idle (or busy), none is down.
ready() { local t; t=$(sinfo -h -N -o %t 2>/dev/null) && [ -n "$t" ] && ! grep -qvxE 'idle|mix|alloc' <<<"$t"; }
for _ in $(seq 300); do
  if ready; then up && same_nodes && break; fi
  sinfo -h -N -o %t 2>/dev/null | grep -qE 'down|drain' &&
    { scontrol update nodename="$(IFS=,; echo "${names[*]}")" state=resume >/dev/null 2>&1 || true; }
  sleep 0.1
done
up || die "slurmctld/slurmd exited (ports $ctld_port/${ports[*]} in use?); logs: $state/log/"
ready && same_nodes || die "nodes not idle (sinfo: '$(sinfo -h -N -o '%N %t' 2>/dev/null | xargs)'); logs:" \
  "$state/log/slurmctld.log $state/log/slurmd-*.log"

cat <<MSG
SLURM is up: node(s) ${names[*]} ($(sinfo -h -N -o '%N:%c' | sort -u | xargs) CPUs), partition debug, state in $state.
Use it from this shell with:
  export SLURM_CONF=$conf
  sinfo; srun -N${#names[@]} -n${#names[@]} hostname
  python -m gd.launch +cluster=slurm +exp=demo cluster.nodes=${#names[@]}
Stop it with: slurm/stop.sh $state
MSG
