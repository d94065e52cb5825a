# Sourced by mlflow_ui.sh and mlflow_server.sh, from the project root: where MLflow listens
# (MLFLOW_HOST, default 127.0.0.1; MLFLOW_PORT, default 5000), which mlflow runs (the project
# venv's when there is one), no telemetry (as pipeline/core/tracking.py sets for the runs), and a
# warning when an unauthenticated MLflow is bound beyond this machine.
root="$(pwd)"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
mlflow_bin="mlflow"
[ -x .venv/bin/mlflow ] && mlflow_bin="$root/.venv/bin/mlflow"
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true

# warn_if_exposed WHAT ADVICE
warn_if_exposed() {
  case "$host" in
    127.0.0.1|localhost|::1) ;;
    *) echo "WARNING: MLflow $1 on $host:$port is reachable from the network and has no" \
            "authentication; $2" >&2 ;;
  esac
}
