"""Study 001's protocol on a user's own chest X-ray folder, as the README tells a new user to run
it: images + a CSV of path, label, patient id; pin it with --write-checksums; then one
`dvc exp run -S experiment=cxr_covid_resnet50` (shrunk here: 3 folds, 32 px, 1 epoch, no ImageNet
weights offline). The run must land in `dvc exp show`, MLflow, the binary-task outputs and the
report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.test_pipeline_e2e import ROOT, run

pytestmark = pytest.mark.slow


def write_cxr_folder(folder: Path, n_patients: int = 12, seed: int = 0) -> None:
    """Grey/RGB/RGBA PNG and JPEG images, 2-3 per patient; COVID images are brighter."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    lines = ["image,label,patient_id,finding"]
    for p in range(n_patients):
        covid = p % 3 == 0  # the minority class, as in the study
        for k in range(int(rng.integers(2, 4))):
            base = rng.integers(40, 120, (48, 40)).astype(np.uint8) + (80 if covid else 0)
            ext = ".png" if k % 2 else ".jpg"
            img = base if k == 0 else cv2.cvtColor(base, cv2.COLOR_GRAY2BGR)
            if k == 2 and ext == ".png":
                img = cv2.cvtColor(base, cv2.COLOR_GRAY2BGRA)
            name = f"p{p}_{k}{ext}"
            cv2.imwrite(str(folder / "images" / name), img)
            lines.append(f"{name},{'covid' if covid else 'non_covid'},P{p},"
                         f"{'covid' if covid else ('normal' if p % 2 else 'other')}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")


def test_new_user_runs_study_001_on_their_folder(tmp_path):
    proj = tmp_path / "project"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (proj / f).parent.mkdir(parents=True, exist_ok=True)
            (proj / f).write_bytes((ROOT / f).read_bytes())
    data = proj / "data" / "external" / "cxr_covid"
    write_cxr_folder(data)
    sums = run([sys.executable, "-m", "pipeline.fetch_data", "--write-checksums", str(data)], proj)
    (proj / "data" / "external" / "cxr_covid.sha256").write_text(sums)
    run(["git", "init", "-q"], proj)
    run(["git", "add", "-A"], proj)
    run(["git", "-c", "user.email=t@localhost", "-c", "user.name=t", "commit", "-qm", "init"], proj)
    overrides = ["experiment=cxr_covid_resnet50", "folds.k=3", "train.folds=[0,1,2]",
                 "folds.val_fraction=0.34", "train.image_size=32", "train.epochs=1",
                 "train.batch_size=8", "models.resnet50.pretrained=none",
                 "models.resnet50.freeze.policy=all", "export.formats=[onnx]",
                 "benchmark.formats=[onnx]", "benchmark.runs=5", "benchmark.warmup=1",
                 "binary.tsne=false", "evaluate.bootstrap=50"]
    args = ["dvc", "exp", "run", "-n", "study001"]
    for o in overrides:
        args += ["-S", o]
    run(args, proj, timeout=1500)

    manifest = (proj / "data/frames/manifest.csv").read_text()
    assert manifest.count("\n") - 1 == len((data / "metadata.csv").read_text().splitlines()) - 1
    splits = (proj / "data/folds/splits.csv").read_text()
    assert "test" in splits
    binary = json.loads((proj / "reports/binary_metrics.json").read_text())
    op = binary["resnet50-ce"]["operating_point"]
    assert op["sensitivity"] >= 0.973  # the highest threshold that reaches the target
    assert set(binary["resnet50-ce"]["sweep"]) == {"0.15", "0.20", "0.25", "0.30"}
    assert (proj / "reports/binary/resnet50-ce/histogram.png").is_file()
    page = (proj / "reports/README.md").read_text()
    assert "resnet50-ce" in page and "Table VII " in page
    shown = json.loads(run(["dvc", "exp", "show", "--json"], proj))
    names = {r.get("name") for e in shown for x in (e.get("experiments") or []) for r in x.get("revs", [])}
    assert "study001" in names
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{proj / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cxr_covid")
    runs = client.search_runs([exp.experiment_id])
    assert len([r for r in runs if "mlflow.parentRunId" in r.data.tags]) == 3
