#!/usr/bin/env bash
# The test command: installs what the tests need, then runs pytest. The tests themselves start the local
# S3 endpoint (moto_server) and the SLURM clusters (slurm/) they talk to.
#   bash tools/test.sh [pytest args]            # every test, the `long` proofs included (CI; see README "Tests")
#   bash tools/test.sh --quick [pytest args]    # without the `long` ones (two-node SLURM, the demo script, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
select=()
if [ "${1:-}" = "--quick" ]; then
  select=(-m "not long")
  shift
fi
bash tools/system-deps.sh
bash tools/install.sh
# shellcheck disable=SC1091
. "${GD_VENV:-.venv}/bin/activate"
export DS_ACCELERATOR=cpu
exec python -m pytest "${select[@]}" "$@"
