#!/usr/bin/env bash
# One experiment's data stages and training on a GPU machine without DVC/MLflow, in a private
# copy of the project (so several experiments can run beside each other and beside
# scripts/gpu_paper_run.sh): compose params, fetch_data -> extract_frames -> split_folds -> audit, then
# `python -m pipeline.stages.train` for every grid cell, under a deadline. The cells' per-fold outputs
# (history, test predictions, metrics, run.json; no weights), the params and the log land in
# one file, $OUT/<tag>.tgz (the device tool brings back at most 8 files).
#
# usage: bash scripts/gpu_experiment_run.sh TAG DEADLINE_S [compose overrides...]
#   e.g. bash scripts/gpu_experiment_run.sh pmnist_224 500 experiment=pneumoniamnist \
#          train.image_size=224 models.resnet18.stem=imagenet 'dataset.sources=[/data/medmnist]'
set -uo pipefail
cd "$(dirname "$0")/.."
TAG=$1; DEADLINE=$2; shift 2
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
WORK=$(mktemp -d "/tmp/exp_${TAG}_XXXX")
cp -r pipeline conf "$WORK"/
mkdir -p "$WORK/data" && cp data/*.sha256 "$WORK/data"/ && cp -r data/published "$WORK/data"/
cp scripts/resume_histories.py "$WORK"/
cd "$WORK"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$WORK" PYTHONUNBUFFERED=1
LOG="$WORK/run.log"
pack() {
  python3 resume_histories.py partial >> "$LOG" 2>&1  # folds cut off by the deadline
  tar czf "$OUT/$TAG.tgz" params.yaml data/*.json models/*/run.json models/*/metrics.json \
    models/*/predictions.csv models/*/fold_*/history.csv models/*/fold_*/test_predictions.csv models/*/fold_*/val_predictions.csv \
    models/*/fold_*/metrics.json partial run.log 2>/dev/null
}
trap pack EXIT
{
  python3 -m pipeline.core.config "$@" > params.yaml
  for stage in fetch_data extract_frames split_folds audit; do python3 -m "pipeline.stages.$stage" || exit 1; done
  CELLS=$(python3 -c 'from pipeline.core.config import load_params; g=load_params()["grid"]; print(" ".join(f"{m}:{l}" for m in g["models"] for l in g["losses"]))')
  for cell in $CELLS; do
    timeout --signal=TERM "$DEADLINE" python3 -m pipeline.stages.train "model=${cell%%:*}" "loss=${cell##*:}"
    code=$?
    echo "$(date +%s) $TAG $cell exit $code"
  done
} > "$LOG" 2>&1
