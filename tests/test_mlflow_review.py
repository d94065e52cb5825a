"""What a reviewer sees in MLflow, for real: a real `mlflow server` (SQLite backend, local
artifact root) on a free port of 127.0.0.1, a small project run through `dvc repro` with
`tracking.uri` pointing at it, and the store read back through `MlflowClient`: every (model,
loss) run has its logged PyTorch and ONNX models (loaded back, the ONNX model's output equal to
PyTorch's), the figures, the dataset input, the interval, parity and latency metrics; each fold
run its split; a second `dvc repro` logs nothing new."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.test_pipeline_e2e import build_project, run

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1:<free port>; yields its URI, stopped afterwards."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "mlflow server did not start within 120 s"
        time.sleep(1)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def repro(tmp_path_factory, server):
    """The e2e project (real data subset, 2 folds, mini_covidnet x {ce, focal}) tracked to the
    server, after `dvc repro`; returns (project, client, experiment id)."""
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
    return proj, client, exp.experiment_id


def parents(client, exp_id):
    runs = client.search_runs([exp_id], max_results=1000)
    return ({r.data.tags["cell"]: r for r in runs if "mlflow.parentRunId" not in r.data.tags},
            [r for r in runs if "mlflow.parentRunId" in r.data.tags])


def test_each_cell_run_has_every_stage_result(repro):
    proj, client, exp_id = repro
    cells, folds = parents(client, exp_id)
    assert set(cells) == {"mini_covidnet-ce", "mini_covidnet-focal"}
    for cell, r in cells.items():
        m = r.data.metrics
        # evaluate: pooled figures with patient-level intervals, video level
        for key in ("accuracy", "macro_f1", "per_class.covid.recall"):
            assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"], (cell, key)
        assert "video.accuracy" in m
        # export: parity and size per format
        assert m["parity.onnx.max_abs_diff"] < 1e-4
        assert m["parity.onnx.min_top1_agreement"] == 1.0
        assert m["size_mb.tflite_int8_full"] < m["size_mb.tflite_fp32"]
        artifacts = {f.path for f in client.list_artifacts(r.info.run_id, "figures")}
        assert {f"figures/confusion_roc_{cell}.png", f"figures/training_{cell}.png",
                f"figures/gradcam_{cell}.png"} <= artifacts, artifacts
        tables = {f.path for f in client.list_artifacts(r.info.run_id, "evaluation")}
        assert "evaluation/comparisons.json" in tables
        tflite = {f.path for f in client.list_artifacts(r.info.run_id, "tflite/fold_0")}
        assert "tflite/fold_0/model_int8_full.tflite" in tflite
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


def test_fold_runs_carry_their_split(repro):
    proj, client, exp_id = repro
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


def test_logged_models_load_back_and_agree(repro):
    import mlflow.models
    import mlflow.onnx
    import mlflow.pytorch
    import onnxruntime
    import torch

    proj, client, exp_id = repro
    cells, _ = parents(client, exp_id)
    models = client.search_logged_models([exp_id], max_results=100)
    for cell, r in cells.items():
        mine = {m.name: m for m in models if m.source_run_id == r.info.run_id}
        assert set(mine) == {"pytorch_fold_0", "onnx_fold_0"}, (cell, set(mine))
        assert "test.accuracy" in {x.key for x in mine["pytorch_fold_0"].metrics}
        assert "parity.max_abs_diff" in {x.key for x in mine["onnx_fold_0"].metrics}
        torch_model = mlflow.pytorch.load_model(mine["pytorch_fold_0"].model_uri)
        onnx_model = mlflow.onnx.load_model(mine["onnx_fold_0"].model_uri)
        x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
        with torch.no_grad():
            expected = torch_model.eval()(torch.from_numpy(x)).numpy()
        session = onnxruntime.InferenceSession(onnx_model.SerializeToString(),
                                               providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        np.testing.assert_allclose(got, expected, atol=1e-4)
        # the input example: real frames of the model's size, as floats in [0, 1]
        info = mlflow.models.get_model_info(mine["onnx_fold_0"].model_uri)
        shape = info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]
        assert shape[1:] == [3, 32, 32]


def test_second_repro_logs_nothing_new(repro):
    proj, client, exp_id = repro
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
