# Sourced by start.sh and stop.sh (bash). The state directory holds slurm.conf, whose Prolog/Epilog lines root runs,
# and the pid files stop.sh signals: anyone who can change it controls root. So it must be a real directory (not a
# symlink), owned by root, not writable by the group or others, under folders only root can rename entries in
# (/tmp itself is fine: it is root's and sticky). It is created with mode 0700.
GD_SLURM_DEFAULT_DIR=/var/lib/gd-slurm

# check_state_dir DIR [create]: die unless DIR is safe (creating it, 0700, when asked and absent); prints its
# physical path, which the caller uses from then on instead of DIR.
check_state_dir() {
  local dir=$1 create=${2:-} real p uid mode
  case "$dir" in /*) ;; *) dir="$PWD/$dir" ;; esac
  [ -L "$dir" ] && die "state dir $dir is a symbolic link: refusing it (whoever owns the link chooses the target)"
  if [ ! -e "$dir" ]; then
    [ -n "$create" ] || die "state dir $dir does not exist"
    p=$dir
    while [ ! -e "$p" ]; do p=$(dirname -- "$p"); done
    check_ancestors "$(cd -P -- "$p" && pwd -P)/."
    (umask 077 && mkdir -p -- "$dir") || die "cannot create the state dir $dir"
  fi
  [ -d "$dir" ] || die "state dir $dir is not a directory"
  real=$(cd -P -- "$dir" && pwd -P)
  read -r uid mode < <(stat -c '%u %a' -- "$real")
  [ "$uid" = 0 ] || die "state dir $real is owned by uid $uid, not root: it may have been made by another user" \
    "to plant slurm.conf or pid files; remove it or choose another directory"
  (( 8#$mode & 8#022 )) && die "state dir $real is writable by its group or others (mode $mode): remove it or" \
    "choose another directory"
  check_ancestors "$real"
  printf '%s\n' "$real"
}

# check_ancestors PATH: every folder above PATH is root's and, unless sticky, not writable by the group or others.
check_ancestors() {
  local p=$1 uid mode
  while [ "$p" != / ]; do
    p=$(dirname -- "$p")
    read -r uid mode < <(stat -c '%u %a' -- "$p")
    [ "$uid" = 0 ] || die "$p (above the state dir) is owned by uid $uid, not root: its owner could replace the" \
      "state dir; use a directory under root-owned folders (default $GD_SLURM_DEFAULT_DIR)"
    if (( 8#$mode & 8#022 )) && ! (( 8#$mode & 8#1000 )); then
      die "$p (above the state dir) is writable by its group or others (mode $mode, not sticky)"
    fi
  done
}

# ours PIDFILE DAEMON CONF: whether PIDFILE (a plain file) names a running DAEMON started with our CONF. A pid file
# is only a hint: a stale one may name a pid reused by any other process.
ours() {
  local pidfile=$1 daemon=$2 conf=$3 pid
  [ -f "$pidfile" ] && [ ! -L "$pidfile" ] || return 1
  pid=$(head -c 32 -- "$pidfile" | tr -dc '0-9')
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$daemon" ] || return 1
  tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF -- "$conf"
}
