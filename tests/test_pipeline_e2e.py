"""The real thing, small: `dvc repro` in a temporary copy of the project on a real subset of the
lung-ultrasound videos, then `dvc exp run`, a queued experiment, `dvc exp show`, and the MLflow
store those runs land in."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import E2E_SUBSET, build_project, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory, request) -> Path:
    return build_project(tmp_path_factory.mktemp("e2e"))


def test_dvc_repro_produces_every_output(project):
    out = run(["dvc", "repro"], project, timeout=900)
    assert "Running stage 'train@mini_covidnet-focal'" in out
    manifest = (project / "data/frames/manifest.csv").read_text()
    # every input file of the subset is in the manifest, the linear one as excluded
    for rel in E2E_SUBSET[:-1]:
        assert rel in manifest, rel
    assert "probe 'linear' not selected" in manifest
    splits = (project / "data/folds/splits.csv").read_text()
    assert "test" in splits and "val" in splits
    for cell in ("mini_covidnet-ce", "mini_covidnet-focal"):
        d = project / "models" / cell
        assert (d / "fold_0" / "best.pt").is_file() and (d / "fold_1" / "best.pt").is_file()
        m = json.loads((d / "metrics.json").read_text())
        assert 0.0 <= m["accuracy"] <= 1.0
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert set(metrics) == {"mini_covidnet-ce", "mini_covidnet-focal"}
    page = (project / "reports/README.md").read_text()
    for table in ("Table I ", "Validation ", "Table II ", "Table IV ", "Table V ", "Table VI ",
                  "Table VII ", "Table VIII "):
        assert table in page, table
    assert "Duplicate linking (perceptual, pHash distance <= 12)" in page
    audit = json.loads((project / "reports/audit.json").read_text())
    assert audit["ok"] and audit["checked"]["link_method"] == "perceptual"
    assert (project / "reports/tables/table7_accuracy.tex").is_file()
    # every fold model exported, each file checked against PyTorch: fold 0 of the timed run (the
    # grid's first loss) in every format, every other model to ONNX
    for cell, n_files in (("mini_covidnet-ce", 5 + 1), ("mini_covidnet-focal", 1 + 1)):
        parity = json.loads((project / "exports" / cell / "parity.json").read_text())
        assert parity["passed"] and parity["n_files"] == n_files, (cell, parity["n_files"])
        assert (project / "exports" / cell / "fold_1" / "model.onnx").is_file()
    assert (project / "exports" / "mini_covidnet-ce" / "fold_0" / "model_int8_full.tflite").is_file()
    assert not list((project / "exports" / "mini_covidnet-focal").rglob("*.tflite"))
    bench = json.loads((project / "reports/benchmark/mini_covidnet.json").read_text())
    assert {r["format"] for r in bench["records"]} >= {"torch_eager", "onnx", "tflite_fp32"}
    assert "Table IX " in page and "Export parity" in page
    # a second repro reruns nothing
    again = run(["dvc", "repro"], project)
    assert "Running stage" not in again
    # MLflow: one parent per cell, a child per fold, in the embedded store of the checkout
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lus_convex")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert {r.data.tags["loss"] for r in parents} == {"ce", "focal"}
    assert len(children) == 4
    assert all("test.accuracy" in r.data.metrics for r in children)
    assert parents[0].data.params["train.image_size"] == "32"


def test_experiments_and_queue_land_in_main_store(project):
    run(["dvc", "exp", "run", "-S", "train.batch_size=4", "-n", "bs4"], project, timeout=900)
    run(["dvc", "exp", "run", "--queue", "-S", "seed=7", "-n", "queued-seed7"], project)
    run(["dvc", "queue", "start", "-j", "1"], project)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], project)
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert "Success" in status, status
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project))
    names = set()
    for entry in shown:
        for exp in entry.get("experiments") or []:
            for r in exp.get("revs", []):
                names.add(r.get("name"))
    assert {"bs4", "queued-seed7"} <= names, names
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lus_convex")
    runs = client.search_runs([exp.experiment_id])
    tagged = {r.data.tags.get("dvc_exp_name") for r in runs}
    assert "queued-seed7" in tagged, tagged   # the queued run landed in the main checkout's store
    assert "bs4" in tagged
