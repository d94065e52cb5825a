#!/usr/bin/env bash
# The paper profile (experiment=paper) on one GPU machine without DVC/MLflow installed: the same
# stage code (python -m pipeline.stages.train ...), one process per (model, loss, fold), several at a
# time on the GPU (batch-16 training of these small models is launch-bound, so processes overlap
# well), in the order of the job list, under a wall-clock deadline. Then the training-throughput
# benchmark. Each finished fold's outputs are appended to $OUT/results.tar as soon as it ends
# (so a run killed from outside keeps them); folds still running at the deadline add their
# per-epoch history (partial/), and the benchmark its tables, at the end. The device tool brings
# back at most 8 files, at most 2 folders down: $OUT holds results.tar, logs.tgz (one log per
# training), machine.txt, log.txt and done.txt. `scripts/collect_gpu_run.py` reads them.
#
# usage: [JOBS=jobs.txt] [BENCH_MODELS="a b"] [BENCH_ARGS="--cuda-graph both"] [EXTRA="key=value ..."] [OUT=dir] \
#          bash scripts/gpu_paper_run.sh [deadline_s=480] [parallel=12] [bench_s=60 (0: no benchmark)]
#   JOBS: lines "model loss fold" to run (default: every model x loss x fold of the grid)
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE=${1:-480}; PARALLEL=${2:-12}; BENCH=${3:-60}
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/paper_run_XXXX)  # logs, partial histories and the benchmark, packed at the end
START=$(date +%s)
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
# machine.txt line 2 names the device (scripts/collect_gpu_run.py): the GPU, or the CPU on a machine
# without one (the same script then trains on the CPU).
{ if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  else echo "name, memory.total, driver_version"
       echo "CPU $(lscpu | sed -n 's/^Model name: *//p' | head -1) ($(nproc) cores), $(free -m | awk '/^Mem:/{print $2}') MiB, none"; fi
  python3 -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)'; nproc; } > "$OUT/machine.txt" 2>&1
# MPS lets kernels of the concurrent processes share the GPU instead of time-slicing it.
if command -v nvidia-cuda-mps-control >/dev/null 2>&1 && nvidia-cuda-mps-control -d; then
  if timeout 60 python3 -c 'import torch; torch.zeros(1).cuda(); torch.cuda.synchronize()'; then
    echo "MPS on" >> "$OUT/machine.txt"
  else  # a server that cannot start would block every CUDA client: run without it
    echo quit | nvidia-cuda-mps-control; echo "MPS failed, off" >> "$OUT/machine.txt"
  fi
fi

python3 -m pipeline.core.config experiment=paper ${EXTRA:-} > params.yaml
# Decode the 224-px frame cache once, before the workers start.
python3 -c 'from pipeline.core.config import load_params; from pipeline.data.loading import FrameStore, interpolation_of, used_frames; p=load_params(); d=p["dataset"]; FrameStore(d["frames_dir"], used_frames(d["frames_dir"]), p["train"]["image_size"], interpolation_of(d))'

MODELS=$(python3 -c 'from pipeline.core.config import load_params; print(" ".join(load_params()["grid"]["models"]))')
if [ -n "${JOBS:-}" ]; then
  grep -v '^\s*\(#\|$\)' "$JOBS" > "$WORK/jobs.txt"
else
  for m in $MODELS; do for f in 0 1 2 3 4; do for l in ce focal; do echo "$m $l $f"; done; done; done > "$WORK/jobs.txt"
fi
tar cf "$OUT/results.tar" -C "$WORK" jobs.txt
mkdir -p "$WORK/logs"
LEFT=$(( DEADLINE - BENCH - ($(date +%s) - START) ))
echo "grid: $(wc -l < "$WORK/jobs.txt") jobs, $PARALLEL at a time, ${LEFT}s" | tee -a "$OUT/log.txt"
GRID_START=$(date +%s)
# flock: one writer at a time appends to the shared tar.
timeout --signal=KILL "$LEFT" xargs -r -P "$PARALLEL" -L 1 -a "$WORK/jobs.txt" sh -c '
  python3 -m pipeline.stages.train model=$0 loss=$1 fold=$2 > "'"$WORK"'/logs/train_$0-$1-$2.log" 2>&1
  code=$?
  d=models/$0-$1/fold_$2
  [ $code -eq 0 ] && flock "'"$WORK"'/tar.lock" tar rf "'"$OUT"'/results.tar" $d/test_predictions.csv $d/history.csv $d/metrics.json
  echo "$(date +%s) $0 $1 $2 exit $code" >> "'"$OUT"'/done.txt"'
echo "grid wall: $(( $(date +%s) - GRID_START ))s" | tee -a "$OUT/log.txt"
# Folds cut off by the deadline: their per-epoch history from the resume state.
python3 scripts/resume_histories.py "$WORK/partial" >> "$OUT/log.txt" 2>&1

[ "$BENCH" -gt 0 ] && timeout --signal=KILL "$BENCH" python3 -m pipeline.throughput --experiment params \
  --models ${BENCH_MODELS:-$MODELS} --batch-sizes 16 128 --steps 20 --warmup 5 ${BENCH_ARGS:-} \
  --out "$WORK/throughput" >> "$OUT/log.txt" 2>&1
flock "$WORK/tar.lock" tar rf "$OUT/results.tar" -C "$WORK" partial $(cd "$WORK" && ls throughput.* 2>/dev/null)
tar czf "$OUT/logs.tgz" -C "$WORK" logs
echo "total: $(( $(date +%s) - START ))s" | tee -a "$OUT/log.txt"
