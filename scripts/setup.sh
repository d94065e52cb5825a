#!/usr/bin/env bash
# Create .venv and install the pinned stack (torch first, so the constraint-free resolver never
# swaps it for another build). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[test]"
