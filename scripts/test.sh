#!/usr/bin/env bash
# The test suite: the fast set, then the slow set that fits CI (real dvc repro on a data subset).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
python -m pytest -q "$@"
