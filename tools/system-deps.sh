#!/usr/bin/env bash
# Debian packages the tests and the demo use: a single-node SLURM (slurm-wlm, munge) and Fashion-MNIST.
# Installs them when missing and apt-get is usable; otherwise says what is missing and carries on.
set -uo pipefail
need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm slurm-client)
command -v munged >/dev/null 2>&1 || need+=(munge)
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "system-deps: missing Debian packages: ${need[*]} (install them as root: apt-get install ${need[*]})" >&2
fi
