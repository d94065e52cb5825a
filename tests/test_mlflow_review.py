"""What a reviewer sees in MLflow (pipeline/core/review.py).

Fast: the evaluate stage on a tiny trained project finds the training runs by their tags and
adds its intervals; with the store unreachable, or without a training run, it still writes its
outputs and says so once.

Slow, for real: a real `mlflow server` (SQLite backend, local artifact root) on a free port of
127.0.0.1, a small project run through `dvc repro` with `tracking.uri` pointing at it, and the
store read back through `MlflowClient`: every (model, loss) run has its logged PyTorch and ONNX
models (loaded back, the ONNX model's output equal to PyTorch's), the figures, the dataset
input, the interval, parity and latency metrics; each fold run its split; a second `dvc repro`
logs nothing new."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.core.tracking import TrackingError, free_port, wait_for_server
from tests.conftest import build_project, make_tiny_project, run

pytestmark = pytest.mark.usefixtures("mlflow_state")

CELLS = ("mini_covidnet-ce", "mini_covidnet-focal")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny project with both cells of a one-model grid trained (1 fold, 1 epoch), tracked
    to its embedded SQLite store."""
    from pipeline.stages.train import run as train

    root = tmp_path_factory.mktemp("tiny")
    params = make_tiny_project(root, epochs=1)
    params["grid"] = {"models": ["mini_covidnet"], "losses": ["ce", "focal"]}
    params["evaluate"]["bootstrap"] = 50
    with contextlib.chdir(root):
        for cell in CELLS:
            train(params, *cell.split("-"), [0])
    return root, params


def evaluate(root: Path, params: dict, caplog, **tracking) -> list[str]:
    """The evaluate stage in ``root`` with these ``tracking`` settings; returns its warnings."""
    from pipeline.stages.evaluate import main

    params = copy.deepcopy(params)
    params["tracking"].update(tracking)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    caplog.clear()
    with contextlib.chdir(root), caplog.at_level(logging.WARNING):
        main([])
    assert set(json.loads((root / "reports/metrics.json").read_text())) == set(CELLS)
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_evaluate_adds_intervals_to_the_training_runs(trained, caplog):
    from mlflow import MlflowClient

    root, params = trained
    assert evaluate(root, params, caplog) == []
    client = MlflowClient(params["tracking"]["uri"])
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])
    runs = client.search_runs([exp.experiment_id])
    cells = {r.data.tags["cell"]: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert set(cells) == set(CELLS) and len(runs) == 4  # no run added, two parents + two folds
    for cell, r in cells.items():
        m = r.data.metrics
        assert m["accuracy_ci_low"] <= m["accuracy"] <= m["accuracy_ci_high"]
        assert "video.accuracy" in m and m["n_patients"] == 3
        table = json.loads(Path(client.download_artifacts(r.info.run_id,
                                                          "evaluation/comparisons.json")).read_text())
        assert table["data"][0][0] == "mini_covidnet-focal vs mini_covidnet-ce"
        assert [i.dataset.name for i in r.inputs.dataset_inputs] == ["lus_convex"]


def test_evaluate_says_once_that_tracking_is_unreachable(trained, caplog):
    warned = evaluate(*trained, caplog, uri=f"http://127.0.0.1:{free_port()}")
    assert len(warned) == 1 and "tracking SKIPPED" in warned[0], warned


def test_evaluate_says_once_that_no_training_run_is_there(trained, caplog, tmp_path_factory):
    other = tmp_path_factory.mktemp("other_store") / "mlflow.db"
    warned = evaluate(*trained, caplog, uri=f"sqlite:///{other}")
    assert len(warned) == 1 and "evaluate: no MLflow training run" in warned[0], warned


# --- the real server and `dvc repro` ---------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1:<free port>; yields its URI, stopped afterwards."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()  # free now, the server's next
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(uri, proc)
    except TrackingError as exc:
        pytest.fail(f"{exc}\n{(root / 'server.log').read_text()[-3000:]}")
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def repro(tmp_path_factory, server):
    """The e2e project (real data subset, 2 folds, mini_covidnet x {ce, focal}) tracked to the
    server, after `dvc repro`; returns (project, client, experiment id,
    server URI)."""
    from mlflow import MlflowClient

    proj = build_project(tmp_path_factory.mktemp("review"))
    cfg = yaml.safe_load((proj / "conf" / "config.yaml").read_text())
    cfg["tracking"].update(uri=server, required=True, timeout_s=30, max_retries=2)
    cfg["benchmark"].update(runs=5, warmup=1)
    (proj / "conf" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    params = run([sys.executable, "-m", "pipeline.core.config"], cwd=proj)
    (proj / "params.yaml").write_text(params)
    run(["git", "commit", "-qam", "track to the server"], proj)
    run(["dvc", "repro"], proj, timeout=1500)
    client = MlflowClient(server)
    exp = client.get_experiment_by_name("lus_convex")
    return proj, client, exp.experiment_id, server


def parents(client, exp_id):
    runs = client.search_runs([exp_id], max_results=1000)
    return ({r.data.tags["cell"]: r for r in runs if "mlflow.parentRunId" not in r.data.tags},
            [r for r in runs if "mlflow.parentRunId" in r.data.tags])


@pytest.mark.slow
def test_each_cell_run_has_every_stage_result(repro):
    proj, client, exp_id, uri = repro
    cells, folds = parents(client, exp_id)
    assert set(cells) == {"mini_covidnet-ce", "mini_covidnet-focal"}
    for cell, r in cells.items():
        m = r.data.metrics
        # evaluate: pooled figures with patient-level intervals, video level
        for key in ("accuracy", "macro_f1", "per_class.covid.sensitivity"):
            assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"], (cell, key)
        assert "video.accuracy" in m
        # export: parity and size per format
        assert m["parity.onnx.max_abs_diff"] < 1e-4
        assert m["parity.onnx.min_top1_agreement"] == 1.0
        timed = cell.endswith("-ce")  # the grid's first loss: the benchmark's run, every format
        assert (m.get("size_mb.tflite_int8_full", 0) < m.get("size_mb.tflite_fp32", 0)) == timed
        artifacts = {f.path for f in client.list_artifacts(r.info.run_id, "figures")}
        assert {f"figures/confusion_roc_{cell}.png", f"figures/training_{cell}.png",
                f"figures/gradcam_{cell}.png"} <= artifacts, artifacts
        tables = {f.path for f in client.list_artifacts(r.info.run_id, "evaluation")}
        assert "evaluation/comparisons.json" in tables
        tflite = {f.path for f in client.list_artifacts(r.info.run_id, "tflite/fold_0")}
        assert ("tflite/fold_0/model_int8_full.tflite" in tflite) == timed, (cell, tflite)
        # data lineage: the dataset input with its source and digest
        inputs = r.inputs.dataset_inputs
        assert [i.dataset.name for i in inputs] == ["lus_convex"]
        assert inputs[0].dataset.digest and "lus_subset" in inputs[0].dataset.source
        assert r.data.tags["mlflow.note.content"].startswith(cell)
    # benchmark: the latency of the loss it timed (the grid's first), per runtime and threads
    m = cells["mini_covidnet-ce"].data.metrics
    assert m["latency.onnx.cpu.1t.median_ms"] > 0 and m["latency.torch_eager.cpu.1t.p90_ms"] > 0
    assert not any(k.startswith("latency.") for k in cells["mini_covidnet-focal"].data.metrics)
    exp = client.get_experiment(exp_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "Deviations from the published protocol" in exp.tags["mlflow.note.content"]


@pytest.mark.slow
def test_fold_runs_carry_their_split(repro):
    proj, client, exp_id, uri = repro
    _, folds = parents(client, exp_id)
    assert len(folds) == 4
    for r in folds:
        p = r.data.params
        assert p["fold"] == r.data.tags["fold"] and p["model"] == "mini_covidnet"
        assert int(p["train.frames"]) > 0 and int(p["test.patients"]) > 0
        contexts = sorted({t.key: t.value for t in i.tags}["mlflow.data.context"]
                          for i in r.inputs.dataset_inputs)
        assert contexts == ["test", "train", "validation"]
    sizes = {(r.data.params["loss"], r.data.params["fold"]): r.data.params["test.frames"]
             for r in folds}
    assert sizes[("ce", "0")] == sizes[("focal", "0")] != sizes[("ce", "1")]


@pytest.mark.slow
def test_logged_models_load_back_and_agree(repro):
    import mlflow
    import mlflow.artifacts
    import mlflow.models
    import mlflow.onnx
    import mlflow.pytorch
    import onnxruntime
    import torch

    proj, client, exp_id, uri = repro
    cells, _ = parents(client, exp_id)
    mlflow.set_tracking_uri(uri)  # models:/ URIs resolve through it
    models = client.search_logged_models([exp_id], max_results=100)
    for cell, r in cells.items():
        mine = {m.name: m for m in models if m.source_run_id == r.info.run_id}
        assert set(mine) == {"pytorch_fold_0", "onnx_fold_0"}, (cell, set(mine))
        assert "fold_0.test.accuracy" in {x.key for x in mine["pytorch_fold_0"].metrics}
        assert "fold_0.onnx.max_abs_diff" in {x.key for x in mine["onnx_fold_0"].metrics}
        # a torch.export program (its module, in eval mode): loads without the project's code
        torch_model = mlflow.pytorch.load_model(mine["pytorch_fold_0"].model_uri)
        onnx_model = mlflow.onnx.load_model(mine["onnx_fold_0"].model_uri)
        x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
        with torch.no_grad():
            expected = torch_model(torch.from_numpy(x)).numpy()
        session = onnxruntime.InferenceSession(onnx_model.SerializeToString(),
                                               providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        np.testing.assert_allclose(got, expected, atol=1e-4)
        # signature: batches of the model's size; input example: real frames, floats in [0, 1]
        path = mlflow.artifacts.download_artifacts(mine["onnx_fold_0"].model_uri)
        model = mlflow.models.Model.load(path)
        shape = model.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]
        assert tuple(shape) == (-1, 3, 32, 32)
        example = model.load_input_example(path)
        assert example.shape == (2, 3, 32, 32) and 0 <= example.min() < example.max() <= 1
        assert len(np.unique(example)) > 50  # an image, not a constant


@pytest.mark.slow
def test_second_repro_logs_nothing_new(repro):
    proj, client, exp_id, uri = repro
    before = client.search_runs([exp_id], max_results=1000)
    n_models = len(client.search_logged_models([exp_id], max_results=100))
    out = run(["dvc", "repro"], proj)
    assert "Running stage" not in out
    after = client.search_runs([exp_id], max_results=1000)
    assert {r.info.run_id for r in after} == {r.info.run_id for r in before}
    assert len(client.search_logged_models([exp_id], max_results=100)) == n_models
    # the export stage forced to rerun on the same models adds no second copy of them
    run(["dvc", "repro", "-f", "-s", "export@mini_covidnet-ce"], proj, timeout=900)
    assert len(client.search_logged_models([exp_id], max_results=100)) == n_models
