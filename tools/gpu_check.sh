#!/usr/bin/env bash
# The prepared GPU check (README, "Benchmarks"; conf/bench/gpu_check.yaml): every part of gd.bench.gpu_check on this
# machine's GPU in about 7.5 minutes; results in OUT_DIR/gpu_check.json and gpu_check.md, the console in
# OUT_DIR/gpu_check.log.
#   bash tools/gpu_check.sh OUT_DIR [--dry-run] [hydra overrides, e.g. 'parts=[peak,train]' 'train.run=[explore]']
# Uses the python3 on PATH (or $PYTHON): on the GPU machine, the image's. When deepspeed or hydra is missing there,
# the wheels in .whl/ (tools/fetch_gpu_wheels.sh) are installed into $GD_SITE (default /tmp/gd-site) first.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: tools/gpu_check.sh OUT_DIR [--dry-run] [overrides]}
shift
py=${PYTHON:-python3}
has() { "$py" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in sys.argv[1:]))" "$@"; }
if ! has deepspeed hydra omegaconf; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "deepspeed or hydra does not import and there is no .whl/: run tools/fetch_gpu_wheels.sh" >&2
    exit 2
  fi
  site=${GD_SITE:-/tmp/gd-site}
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$out"
"$py" -m gd.bench.gpu_check out="$out" "$@" 2>&1 | tee "$out/gpu_check.log"
