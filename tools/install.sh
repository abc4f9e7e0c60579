#!/usr/bin/env bash
# Creates .venv (or $GD_VENV) and installs the gd package with everything its tests and demo need.
# A torch that already imports is kept (GPU users install their CUDA torch first); otherwise the matching
# torch/torchvision pair below is installed, since a lone torch pulls a torchvision that does not import beside it.
# Installer: uv (from PyPI, into the venv) downloads and unpacks in parallel: a cold install took 43 s instead of
# ~2 min 40 s with pip on a 2-core VM, with the same package versions. GD_INSTALLER=pip uses pip (it reads
# pip.conf: a private index or mirror); pip is also the fallback when uv cannot be had or fails.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${GD_VENV:-.venv}
installer=${GD_INSTALLER:-uv}
case "$installer" in
  uv|pip) ;;
  *) echo "install.sh: GD_INSTALLER=$installer: expected uv or pip" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
uv_ready() { [ "$installer" = uv ] && python -m uv --version >/dev/null 2>&1; }

install_pkgs() {
  if uv_ready; then
    python -m uv pip install --python "$venv/bin/python" --quiet "$@" && return
    echo "install.sh: uv pip install $* failed; retrying with pip" >&2
  fi
  # --no-compile: Python compiles the modules it imports on first use instead of pip compiling every file it
  # installs (torch's pair alone took 39 s instead of 55 s from a warm pip cache).
  python -m pip install -q --no-compile "$@"
}

stamp="$venv/.gd-installed-$(cat pyproject.toml tools/install.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  if [ "$installer" = uv ]; then
    python -m pip install -q uv || echo "install.sh: could not install uv; using pip" >&2
  fi
  uv_ready || python -m pip install -q --upgrade pip
  if ! python -c "import torch, torchvision" 2>/dev/null; then
    install_pkgs "torch==2.14.1" "torchvision==0.29.1"
  fi
  install_pkgs -e ".[cpu,test]"
  touch "$stamp"
fi
