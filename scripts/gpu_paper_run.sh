#!/usr/bin/env bash
# The paper profile (experiment=paper) on one GPU machine without DVC/MLflow installed: the same
# stage code (python -m pipeline.train ...), one process per (model, loss, fold), several at a
# time on the GPU (batch-16 training of these small models is launch-bound, so processes overlap
# well), most important rows first, under a wall-clock deadline. Then the training-throughput
# benchmark. Results are packed into $OUT (or ./gpu_out) for `scripts/collect_gpu_run.py`.
#
# usage: bash scripts/gpu_paper_run.sh [deadline_s=480] [parallel=12] [bench_s=60]
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE=${1:-480}; PARALLEL=${2:-12}; BENCH=${3:-60}
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
START=$(date +%s)
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)'; nproc; } > "$OUT/machine.txt" 2>&1
# MPS lets kernels of the concurrent processes share the GPU instead of time-slicing it.
if command -v nvidia-cuda-mps-control >/dev/null 2>&1 && nvidia-cuda-mps-control -d; then
  if timeout 60 python3 -c 'import torch; torch.zeros(1).cuda(); torch.cuda.synchronize()'; then
    echo "MPS on" >> "$OUT/machine.txt"
  else  # a server that cannot start would block every CUDA client: run without it
    echo quit | nvidia-cuda-mps-control; echo "MPS failed, off" >> "$OUT/machine.txt"
  fi
fi

python3 -m pipeline.config experiment=paper ${EXTRA:-} > params.yaml
# Decode the 224-px frame cache once, before the workers start.
python3 -c 'from pipeline.config import load_params; from pipeline.data import FrameStore, used_frames; p=load_params(); d=p["dataset"]; FrameStore(d["frames_dir"], used_frames(d["frames_dir"]), p["train"]["image_size"])'

MODELS=$(python3 -c 'from pipeline.config import load_params; print(" ".join(load_params()["grid"]["models"]))')
jobs=()
for m in $MODELS; do for f in 0 1 2 3 4; do for l in ce focal; do jobs+=("$m $l $f"); done; done; done
printf '%s\n' "${jobs[@]}" > "$OUT/jobs.txt"
LEFT=$(( DEADLINE - BENCH - ($(date +%s) - START) ))
echo "grid: ${#jobs[@]} jobs, $PARALLEL at a time, ${LEFT}s" | tee -a "$OUT/log.txt"
GRID_START=$(date +%s)
printf '%s\n' "${jobs[@]}" | timeout --signal=KILL "$LEFT" xargs -P "$PARALLEL" -L 1 sh -c \
  'python3 -m pipeline.train model=$0 loss=$1 fold=$2 > "'"$OUT"'/train_$0-$1-$2.log" 2>&1; echo "$(date +%s) $0 $1 $2 exit $?" >> "'"$OUT"'/done.txt"'
echo "grid wall: $(( $(date +%s) - GRID_START ))s" | tee -a "$OUT/log.txt"

timeout --signal=KILL "$BENCH" python3 -m pipeline.throughput --experiment params --models $MODELS \
  --batch-sizes 16 128 --steps 20 --warmup 5 --out "$OUT/throughput" >> "$OUT/log.txt" 2>&1
tar czf "$OUT/results.tgz" models/*/fold_*/test_predictions.csv models/*/fold_*/history.csv \
  models/*/fold_*/metrics.json "$OUT"/train_*.log 2>/dev/null
rm -f "$OUT"/train_*.log
echo "total: $(( $(date +%s) - START ))s" | tee -a "$OUT/log.txt"
