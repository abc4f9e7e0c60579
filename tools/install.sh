#!/usr/bin/env bash
# Creates .venv (or $GD_VENV) and installs the gd package with everything its tests and demo need.
# A torch that already imports is kept (GPU users install their CUDA torch first); otherwise the matching
# torch/torchvision pair below is installed, since a lone torch pulls a torchvision that does not import beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${GD_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.gd-installed-$(cat pyproject.toml tools/install.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  if ! python -c "import torch, torchvision" 2>/dev/null; then
    python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  fi
  python -m pip install -q -e ".[cpu,test]"
  touch "$stamp"
fi
