#!/usr/bin/env bash
# Prepare, on this machine, what `scripts/gpu_session.sh` needs on a GPU machine that has PyTorch
# but neither this project's other packages nor its data:
#   .whl/        wheels of hydra-core, omegaconf, antlr4 runtime, timm, pytorchcv (pure Python) and
#                imagehash + PyWavelets (duplicate linking and the audit; CPython 3.12 x86-64)
#   .gpu/medmnist/pneumoniamnist.npz   the PneumoniaMNIST archive (from the dataset's sources)
#   .gpu/jobs.txt                      the paper-grid folds not yet done, per
#                                      reports/paper_gpu/grid_progress.csv (nearly complete rows
#                                      first, NASNet last: its folds are the slowest)
# and the extracted frames, folds and their audit (data/frames, data/folds, reports/audit.json)
# via `dvc repro audit`: training refuses folds that the audit has not passed.
# Both folders are ignored by git (.git/info/exclude); carry them with the device tool:
#   carry: data/frames data/folds .whl .gpu
#
# usage: bash scripts/gpu_prepare.sh        (in the activated venv, from the project root)
set -euo pipefail
cd "$(dirname "$0")/.."
for d in /.whl/ /.gpu/; do grep -qxF "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
mkdir -p .whl .gpu/medmnist
# All five are pure Python (py3-none-any); antlr4 4.9.3 exists only as source, so pip builds it.
python -m pip wheel -q --no-deps -w .whl \
  hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 timm==1.0.31 pytorchcv==0.0.74
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_28_x86_64 -d .whl \
  imagehash==4.3.2 pywavelets==1.9.0
dvc repro audit
python - <<'PY'
from pathlib import Path
import shutil

import pandas as pd

from pipeline.core.config import compose, resolve_path

ds = compose(["experiment=pneumoniamnist"])["dataset"]
for src in ds["sources"]:
    f = resolve_path(src) / ds["file"]
    if f.is_file():
        shutil.copy(f, ".gpu/medmnist/")
        print(f"copied {f}")
        break
else:
    raise SystemExit(f"{ds['file']} not found in {ds['sources']}")

prog = pd.read_csv("reports/paper_gpu/grid_progress.csv")
todo = prog[prog["state"] != "done"].copy()
done_per_row = prog[prog["state"] == "done"].groupby(["model", "loss"]).size()
todo["row_done"] = [done_per_row.get((m, l), 0) for m, l in zip(todo["model"], todo["loss"])]
todo["nasnet"] = todo["model"] == "nasnet_mobile"
todo = todo.sort_values(["nasnet", "row_done", "model", "fold", "loss"],
                        ascending=[True, False, True, True, True])
lines = [f"{r.model} {r.loss} {r.fold}" for r in todo.itertuples()]
Path(".gpu/jobs.txt").write_text(
    "# paper-grid folds not yet done (scripts/gpu_prepare.sh from grid_progress.csv)\n"
    + "\n".join(lines) + "\n")
print(f".gpu/jobs.txt: {len(lines)} jobs")
PY
du -sh --apparent-size data/frames data/folds .whl .gpu
