#!/usr/bin/env bash
# Debian packages the tests and the demo use: a single-node SLURM (slurm-wlm, munge) and Fashion-MNIST.
#   tools/system-deps.sh                  everything (the tests)
#   tools/system-deps.sh fashion-mnist    only the dataset (the demo)
# Installs what is missing when apt-get is usable as root; otherwise says what to install and carries on.
set -uo pipefail
want=("$@")
[ ${#want[@]} -eq 0 ] && want=(slurm fashion-mnist)
need=()
for w in "${want[@]}"; do
  case "$w" in
    slurm)
      command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm slurm-client)
      command -v munged >/dev/null 2>&1 || need+=(munge) ;;
    fashion-mnist)
      [ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist) ;;
    *) echo "system-deps: unknown component '$w' (expected: slurm, fashion-mnist)" >&2; exit 2 ;;
  esac
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "system-deps: missing Debian packages: ${need[*]} — install them as root (apt-get install ${need[*]})," \
       "or point the configs at your own copies" >&2
fi
