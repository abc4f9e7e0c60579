#!/usr/bin/env bash
# The test command: installs what the tests need, then runs pytest. The tests themselves start the local
# S3 endpoint (moto_server) and the SLURM clusters (slurm/) they talk to.
#   bash tools/test.sh [pytest args]          # every test except those marked `long` (CI; ~15 min on 2 cores)
#   bash tools/test.sh --all [pytest args]    # also the `long` ones: two-node SLURM, the demo script, ... (~+10 min)
set -euo pipefail
cd "$(dirname "$0")/.."
select=(-m "not long")
if [ "${1:-}" = "--all" ]; then
  select=()
  shift
fi
bash tools/system-deps.sh
bash tools/install.sh
# shellcheck disable=SC1091
. "${GD_VENV:-.venv}/bin/activate"
export DS_ACCELERATOR=cpu
exec python -m pytest "${select[@]}" "$@"
