#!/usr/bin/env bash
# Browse the project's MLflow store: `scripts/mlflow_ui.sh [extra mlflow ui options]`.
#
# The store is the one pipeline/core/tracking.py writes by default (the embedded SQLite database and
# artifact folder under mlruns/ of this checkout). The UI has no authentication, so it listens on
# 127.0.0.1 only; to reach it from another machine prefer an SSH tunnel
# (`ssh -L 5000:127.0.0.1:5000 host`). MLFLOW_HOST=0.0.0.0 exposes it to the network on purpose;
# then also restrict --allowed-hosts / --cors-allowed-origins.
# MLFLOW_PORT picks the port (default 5000); MLFLOW_UI_DRY_RUN=1 prints the command instead.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/mlflow_common.sh

cmd=("$mlflow_bin" ui
     --backend-store-uri "sqlite:///$root/mlruns/mlflow.db"
     --default-artifact-root "$root/mlruns/artifacts"
     --host "$host" --port "$port" "$@")
warn_if_exposed UI "restrict it with --allowed-hosts / --cors-allowed-origins."

if [ "${MLFLOW_UI_DRY_RUN:-0}" = "1" ]; then
  echo "${cmd[*]}"
  exit 0
fi
mkdir -p mlruns/artifacts
# The UI opens on its GenAI pages; this link opens its model-training view of the runs.
echo "MLflow UI: http://$host:$port/#/experiments?workflowType=machine_learning" >&2
exec "${cmd[@]}"
