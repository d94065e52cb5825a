#!/usr/bin/env bash
# One device session's work, as run on the GPU machine (`run` of the device tool), so the committed
# results say exactly what produced them:
#   * with PMNIST=1: PneumoniaMNIST (experiment=pneumoniamnist) at 28 px and at 224 px, full
#     MedMNIST protocol (100 epochs), each in its own copy of the project
#     (scripts/gpu_experiment_run.sh); committed in reports/pneumoniamnist_gpu_*px/;
#   * the paper grid's jobs listed in $JOBS, 13 at a time (scripts/gpu_paper_run.sh), then the
#     training-throughput benchmark of $BENCH_MODELS.
# The machine has no DVC/MLflow: wheels carried in .whl/ (hydra-core, omegaconf, antlr4, timm,
# pytorchcv) go to /tmp/site; the PneumoniaMNIST npz is carried in .gpu/medmnist/.
#
# usage (device): [PMNIST=1] [GRAPH=1] bash scripts/gpu_session.sh [deadline_s=540]
#   carry: data/frames data/folds .whl .gpu   (made here by scripts/gpu_prepare.sh; JOBS defaults
#   to .gpu/jobs.txt, else every fold of the grid)
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE=${1:-540}
export OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
pip install --no-deps --target /tmp/site -q .whl/*.whl 2>&1 | tail -2
export PYTHONPATH="/tmp/site:$PWD"
NPZ_DIR=$PWD/.gpu/medmnist
if [ "${PMNIST:-0}" = 1 ] && [ ! -f "$NPZ_DIR/pneumoniamnist.npz" ]; then
  echo "no $NPZ_DIR/pneumoniamnist.npz (scripts/gpu_prepare.sh): PneumoniaMNIST skipped"; PMNIST=0
fi
[ "${PMNIST:-0}" = 1 ] && (
  sleep 30  # after gpu_paper_run.sh has started the MPS daemon
  bash scripts/gpu_experiment_run.sh pmnist_28 $((DEADLINE - 120)) experiment=pneumoniamnist \
    "dataset.sources=[$NPZ_DIR]" &
  bash scripts/gpu_experiment_run.sh pmnist_224 $((DEADLINE - 120)) experiment=pneumoniamnist \
    train.image_size=224 models.resnet18.stem=imagenet "dataset.sources=[$NPZ_DIR]" &
  wait
) &
[ -z "${JOBS:-}" ] && [ -f .gpu/jobs.txt ] && JOBS=.gpu/jobs.txt
# GRAPH=1: train with the step replayed from a CUDA graph (train.cuda_graph) if the parity check
# of pipeline/training/steps.py passes on this GPU (else eager), and benchmark both kinds of step.
if [ "${GRAPH:-0}" = 1 ]; then
  if python3 -m pipeline.training.steps --check >> "$OUT/log.txt" 2>&1; then
    export EXTRA="${EXTRA:-} train.cuda_graph=true" BENCH_ARGS="--cuda-graph both"
    echo "CUDA-graph parity check passed: train.cuda_graph=true" | tee -a "$OUT/log.txt"
  else
    echo "CUDA-graph parity check failed (log.txt): eager steps" | tee -a "$OUT/log.txt"
  fi
fi
JOBS=${JOBS:-} BENCH_MODELS=${BENCH_MODELS:-"nasnet_mobile covid_caps covid_caps_scaled"} \
  bash scripts/gpu_paper_run.sh "$DEADLINE" 13 70
wait
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >> "$OUT/machine.txt" 2>&1
ls -la "$OUT"
n=$(find "$OUT" -type f | wc -l)
[ "$n" -le 8 ] || echo "WARNING: $n files under \$OUT: the device tool brings back 8"
