#!/usr/bin/env bash
# The test command: installs what the tests need, then runs pytest. The tests themselves start the local
# S3 endpoint (moto_server) and the single-node SLURM cluster (slurm/) they talk to.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/system-deps.sh
bash tools/install.sh
# shellcheck disable=SC1091
. "${GD_VENV:-.venv}/bin/activate"
export DS_ACCELERATOR=cpu
exec python -m pytest "$@"
