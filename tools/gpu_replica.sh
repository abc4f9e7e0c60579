#!/usr/bin/env bash
# The prepared GPU check's dry run under a replica of the GPU machine's Python software, on this machine's CPU: so an
# API that exists only in the newer torch here, or a numpy 2 change, fails here instead of in a GPU lease.
#   bash tools/gpu_replica.sh OUT_DIR [hydra overrides]      # OUT_DIR/gpu_check.{json,md,log}, as tools/gpu_check.sh
# The replica: Python 3.12 (pyenv's 3.12.1; the image has 3.12.3) with the image's torch 2.11.0, torchvision 0.26.0,
# numpy 2.5.2, the image packages that deepspeed, hydra and omegaconf require (einops, msgpack, ninja, packaging,
# psutil, py-cpuinfo, tqdm, PyYAML) and those the check's `tests` part uses (pytest, pytest-timeout), plus timm; nothing
# else. deepspeed and hydra come only from the wheels of tools/fetch_gpu_wheels.sh, installed by tools/gpu_check.sh
# itself, as on the GPU machine. The venv is built once from PyPI (a few minutes, ~5 GB: the CUDA
# build of torch, which runs on the CPU) under $GD_REPLICA_CACHE (default ~/.cache/gd-gpu-replica), one folder per
# set of versions, and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: tools/gpu_replica.sh OUT_DIR [overrides]}
shift
python_version=3.12.1
pins=(torch==2.11.0 torchvision==0.26.0 numpy==2.5.2 timm==1.0.31
      einops==0.8.2 msgpack==1.2.4 ninja==1.13.2 packaging==26.4 psutil==7.2.2 py-cpuinfo==9.0.0 tqdm==4.70.1
      pyyaml==6.0.4 pytest==9.2.0 pytest-timeout==2.4.0)
key="py$python_version-$(printf '%s\n' "${pins[@]}" | sha1sum | cut -c1-12)"
cache=${GD_REPLICA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gd-gpu-replica}
venv="$cache/$key"
base="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")/versions/$python_version/bin/python${python_version%.*}"
mkdir -p "$cache"

exec 9>"$cache/$key.lock"
flock 9  # one builder per replica; a second caller waits and reuses it
if [ ! -f "$venv/.complete" ]; then
  if [ ! -x "$base" ]; then
    echo "gpu_replica.sh: no Python $python_version at $base (pyenv install $python_version)" >&2
    exit 2
  fi
  rm -rf "$venv"
  "$base" -m venv "$venv"
  started=$SECONDS
  if uv=$(command -v uv) || { python3 -m uv --version >/dev/null 2>&1 && uv="python3 -m uv"; }; then
    $uv pip install --python "$venv/bin/python" --quiet "${pins[@]}"
  else
    "$venv/bin/python" -m pip install -q --no-compile "${pins[@]}"
  fi
  printf '%s\n' "${pins[@]}" >"$venv/.complete"
  echo "gpu_replica.sh: built $venv in $((SECONDS - started)) s" >&2
fi
flock -u 9

bash tools/fetch_gpu_wheels.sh >/dev/null
# Only the replica's packages: nothing from a caller's venv, user site or PYTHONPATH. The check's install of the
# wheels goes into the replica's folder, not the GPU machine's /tmp/gd-site; DeepSpeed's JIT-built CPU op is kept
# per torch build (another torch would rebuild it for each other on every alternate run).
unset PYTHONPATH VIRTUAL_ENV
export PYTHONNOUSERSITE=1 DS_ACCELERATOR=cpu GD_SITE="$venv/gd-site" TORCH_EXTENSIONS_DIR="$venv/torch_extensions"
export PATH="$venv/bin:$PATH"
started=$SECONDS
PYTHON="$venv/bin/python" bash tools/gpu_check.sh "$out" --dry-run "$@"
echo "gpu_replica.sh: dry run under the replica in $((SECONDS - started)) s" >&2
