#!/usr/bin/env bash
# A team MLflow tracking server: `scripts/mlflow_server.sh [extra mlflow server options]`.
#
# What several machines log to (pipeline/grid.py on a Ray cluster): the embedded SQLite store of
# pipeline/core/tracking.py is one file on one machine. Point every training at this server with
# `tracking.uri=http://<this host>:<port>` (python -m pipeline.grid / pipeline.stages.train, or
# `dvc exp run -S tracking.uri=...`).
#
# - Runs go to a database: MLFLOW_BACKEND_URI (e.g. postgresql://user@db/mlflow), by default a
#   SQLite file of its own, mlruns/server/mlflow.db. Not the checkout's mlruns/mlflow.db: the
#   experiments there keep their artifacts under a local file:// path that other machines
#   cannot write.
# - Artifacts are uploaded through the server (--serve-artifacts), so the clients need no access
#   to the artifact store: MLFLOW_ARTIFACTS_DESTINATION (default mlruns/server/artifacts, or
#   e.g. s3://bucket/mlflow).
# - The server has no authentication: it listens on 127.0.0.1 unless MLFLOW_HOST says otherwise.
#   For a cluster, bind it to the address the nodes use (MLFLOW_HOST=10.0.0.5) on a trusted
#   network, or reach it through SSH tunnels; MLflow only accepts Host headers of localhost and
#   private addresses unless --allowed-hosts widens that.
# MLFLOW_PORT picks the port (default 5000); MLFLOW_SERVER_DRY_RUN=1 prints the command instead.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/mlflow_common.sh
backend="${MLFLOW_BACKEND_URI:-sqlite:///$root/mlruns/server/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-$root/mlruns/server/artifacts}"

cmd=("$mlflow_bin" server
     --backend-store-uri "$backend"
     --serve-artifacts --artifacts-destination "$artifacts"
     --host "$host" --port "$port" "$@")
warn_if_exposed server "keep it on a trusted network (see --allowed-hosts)."

if [ "${MLFLOW_SERVER_DRY_RUN:-0}" = "1" ]; then
  echo "${cmd[*]}"
  exit 0
fi
case "$backend" in sqlite:///*) mkdir -p "$(dirname "${backend#sqlite:///}")" ;; esac
case "$artifacts" in *://*) ;; *) mkdir -p "$artifacts" ;; esac
exec "${cmd[@]}"
