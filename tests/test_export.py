"""Export to ONNX / TFLite with real runtimes (ONNX Runtime, LiteRT interpreter) on a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from pipeline.core.config import compose
from pipeline.deploy import edge_runner, formats
from pipeline.stages import export

SIZE = 32
EXPORT = compose([])["export"]  # the gates of conf/config.yaml


class TinyNet(nn.Module):
    """The layer types of the study's models: conv, depthwise conv, BN, ReLU, pooling, a dense
    head with BatchNorm1d + PReLU + dropout; returns logits."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(16 * 4 * 4, 12),
                                  nn.BatchNorm1d(12), nn.PReLU(12), nn.Dropout(0.5),
                                  nn.Linear(12, classes))

    def forward(self, x):
        return self.head(self.features(x))


def tiny_model(seed: int = 0) -> nn.Module:
    """A TinyNet whose BatchNorm parameters and statistics are random: with default BN
    (scale 1 or 0, zero stats) converters fold branches away and parity means little."""
    torch.manual_seed(seed)
    model = TinyNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every format of one tiny model, exported and checked once for the module."""
    model = tiny_model()
    labels = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(3))
    out = tmp_path_factory.mktemp("export")
    records = formats.export_model(model, out, SIZE, images(12, 1), labels,
                                  calibration=images(16, 2), tolerance=EXPORT["tolerance"],
                                  min_top1_agreement=EXPORT["min_top1_agreement"],
                                  opset=EXPORT["opset"], extra={"fold": 0})
    return model, out, {r["format"]: r for r in records}


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_every_format_matches_pytorch(exported, fmt):
    model, out, records = exported
    record = records[fmt]
    path = out / formats.FILE_NAMES[fmt]
    assert record["file"] == str(path) and path.stat().st_size == record["size_bytes"] > 0
    assert record["passed"] and record["fold"] == 0 and record["n_frames"] == 12
    assert record["tolerance"] == EXPORT["tolerance"][fmt]
    # Tighter than conf/'s gates: a tiny model with random weights drifts little.
    assert record["max_abs_diff"] <= {"onnx": 1e-5, "tflite_fp32": 1e-5}.get(fmt, 0.05)
    assert record["top1_agreement"] == 1.0
    assert {"accuracy_torch", "accuracy", "accuracy_change"} <= set(record)
    # Fresh frames, not the ones the parity check used.
    again = formats.runtime_parity(model, path, images(5, 9))
    assert again["n"] == 5 and again["max_abs_diff"] <= 0.05


def test_float_exports_are_near_exact_and_quantized_ones_smaller(exported):
    _, _, records = exported
    assert records["onnx"]["max_abs_diff"] < 1e-5
    assert records["tflite_fp32"]["max_abs_diff"] < 1e-5
    # The quantized variants really are quantized: they drift a little from fp32 ...
    assert records["tflite_int8_dynamic"]["max_abs_diff"] > records["tflite_fp32"]["max_abs_diff"]
    assert records["tflite_int8_full"]["max_abs_diff"] > records["tflite_fp32"]["max_abs_diff"]
    # ... and carry smaller weights (the tiny model's flatbuffer overhead blurs fp16 vs int8).
    assert records["tflite_int8_dynamic"]["size_bytes"] < records["tflite_fp32"]["size_bytes"]
    assert records["tflite_fp16"]["size_bytes"] < records["tflite_fp32"]["size_bytes"]


def test_onnx_has_a_dynamic_batch_axis(exported):
    model, out, _ = exported
    session = edge_runner.OnnxModel(out / "model.onnx")
    for n in (1, 2, 7):
        x = images(n, 10 + n)
        y = session(x.numpy())
        assert y.shape == (n, 3)
        np.testing.assert_allclose(y, model(x).detach().numpy(), atol=1e-5)


def test_full_int8_tflite_has_int8_io_and_the_runner_dequantizes(exported):
    _, out, _ = exported
    runner = edge_runner.TFLiteModel(out / "model_int8_full.tflite")
    assert runner.input["dtype"] == np.int8 and runner.input["quantization"][0] > 0
    y = runner(images(3, 4).numpy())  # batch 3 through a batch-1 model
    assert y.dtype == np.float32 and y.shape == (3, 3)


def test_onnx_exporter_traces_once_and_writes_each_model_with_its_own_weights(tmp_path):
    """The folds of a run share one trace: each file carries its own model's weights and is
    optimized as torch.onnx.export leaves a file; another architecture is refused by name."""
    import onnx

    first, second = tiny_model(0), tiny_model(1)
    exporter = formats.OnnxExporter(SIZE, EXPORT["opset"])
    x = images(5, 7)
    outputs = {}
    for name, model in (("first", first), ("second", second)):
        path = exporter.save(model, tmp_path / f"{name}.onnx")
        outputs[name] = edge_runner.OnnxModel(path)(x.numpy())
        np.testing.assert_allclose(outputs[name], model(x).detach().numpy(), atol=1e-5)
    assert np.abs(outputs["first"] - outputs["second"]).max() > 1e-2  # not the first's weights

    with torch.no_grad():
        torch.onnx.export(second, (x,), str(tmp_path / "direct.onnx"), dynamo=True,
                          opset_version=EXPORT["opset"], verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    ops = [[n.op_type for n in onnx.load(tmp_path / f"{name}.onnx").graph.node]
           for name in ("second", "direct")]
    assert ops[0] == ops[1] and "BatchNormalization" not in ops[0]  # folded into the convs

    with pytest.raises(ValueError, match=r"weight 'head.6.weight' is .* \[3, 12\] in the traced "
                                         r"graph but .* \[5, 12\] in this model"):
        exporter.save(TinyNet(classes=5).eval(), tmp_path / "other.onnx")


def test_onnx_exporter_reads_the_trace_of_its_architecture_from_the_cache(tmp_path,
                                                                          monkeypatch):
    """A second process exporting the same architecture (another loss, another run) reads the
    kept graph instead of tracing; another architecture, size or opset is another key."""
    cache, x = tmp_path / "traces", images(5, 3)
    formats.OnnxExporter(SIZE, EXPORT["opset"], cache).save(tiny_model(0), tmp_path / "a.onnx")
    assert [p.name for p in cache.iterdir()] == [
        f"{formats.trace_key(tiny_model(0), SIZE, EXPORT['opset'])}.onnx"]

    def no_tracing(*args, **kwargs):
        raise AssertionError("traced although the cache holds this architecture")

    monkeypatch.setattr(torch.onnx, "export", no_tracing)
    model = tiny_model(1)
    path = formats.OnnxExporter(SIZE, EXPORT["opset"], cache).save(model, tmp_path / "b.onnx")
    np.testing.assert_allclose(edge_runner.OnnxModel(path)(x.numpy()), model(x).detach().numpy(),
                               atol=1e-5)
    keys = {formats.trace_key(tiny_model(0), SIZE, EXPORT["opset"]),
            formats.trace_key(tiny_model(1), SIZE, EXPORT["opset"]),  # weights: not in the key
            formats.trace_key(TinyNet(classes=5), SIZE, EXPORT["opset"]),
            formats.trace_key(tiny_model(0), SIZE * 2, EXPORT["opset"]),
            formats.trace_key(tiny_model(0), SIZE, EXPORT["opset"] - 1)}
    assert len(keys) == 4


def test_onnx_exporter_falls_back_to_torchscript_when_dynamo_cannot_trace(tmp_path, monkeypatch,
                                                                        caplog):
    export_onnx = torch.onnx.export

    def no_dynamo(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("cannot trace this model")
        return export_onnx(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    exporter, x = formats.OnnxExporter(SIZE, EXPORT["opset"]), images(3, 8)
    for seed in (0, 1):
        model = tiny_model(seed)
        path = exporter.save(model, tmp_path / f"model_{seed}.onnx")
        np.testing.assert_allclose(edge_runner.OnnxModel(path)(x.numpy()),
                                   model(x).detach().numpy(), atol=1e-5)
    assert caplog.text.count("dynamo ONNX export failed (RuntimeError: cannot trace") == 1


def test_accuracy_change_on_labelled_images(exported):
    model, out, _ = exported
    x = images(10, 5)
    labels = model(x).argmax(1)  # PyTorch is right on every frame by construction
    result = formats.accuracy_change(model, out / "model_int8_dynamic.tflite", x, labels)
    assert result["accuracy_torch"] == 1.0 and result["n"] == 10
    assert result["accuracy_change"] == pytest.approx(result["accuracy"] - 1.0)


def test_tolerance_breach_raises_with_numbers_and_file(tmp_path):
    model = tiny_model(1)
    with pytest.raises(formats.ParityError) as info:
        formats.export_model(model, tmp_path, SIZE, images(4, 6), formats=["tflite_int8_dynamic"],
                            tolerance={"tflite_int8_dynamic": 1e-7})
    message = str(info.value)
    assert "model_int8_dynamic.tflite" in message and "tolerance 1e-07" in message
    assert "max |logit diff|" in message and "on 4 frames" in message
    assert len(info.value.failures) == 1 and not info.value.records[0]["passed"]
    # Written all the same, so the failing file can be inspected.
    assert (tmp_path / "model_int8_dynamic.tflite").is_file()


def test_compare_outputs():
    ref = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    out = np.array([[0.9, 0.0, 0.2], [0.0, 0.0, 2.5]])
    result = formats.compare_outputs(ref, out, labels=[0, 1])
    assert result == pytest.approx({"max_abs_diff": 2.5, "mean_abs_diff": 0.8,
                                    "rel_max_abs_diff": 1.25,
                                    "top1_agreement": 0.5, "n": 2, "accuracy_torch": 1.0,
                                    "accuracy": 0.5, "accuracy_change": -0.5})
    with pytest.raises(ValueError, match="shape"):
        formats.compare_outputs(ref, out[:1])


def test_gates():
    result = {"max_abs_diff": 3.0, "top1_agreement": 0.6}
    assert formats.within_tolerance(result, None, 0.5)  # null tolerance: top-1 gate only
    assert not formats.within_tolerance(result, 1.0, 0.5)
    assert not formats.within_tolerance(result, None, 0.9)


def test_bad_requests_name_the_valid_choices():
    with pytest.raises(ValueError, match="valid"):
        formats.export_model(tiny_model(), "unused", SIZE, images(1, 0), formats=["tflite_int4"])
    with pytest.raises(ValueError, match="valid"):
        formats.quantize_tflite(b"", "int4")
    with pytest.raises(ValueError, match="calibration"):
        formats.quantize_tflite(b"", "int8_full", calibration=None)
    with pytest.raises(ValueError, match="export.formats.*tflite_int4.*valid"):
        export.export_config({"export": {**EXPORT, "formats": ["onnx", "tflite_int4"]}})
    with pytest.raises(ValueError, match="export.tolerance: no entry for.*onnx.*valid keys"):
        export.export_config({"export": {**EXPORT, "tolerance": {"tflite_fp32": 1.0}}})
    with pytest.raises(ValueError, match="export.min_top1_agreement: unknown.*tflite_fp61"):
        export.export_config({"export": {**EXPORT, "min_top1_agreement": {
            **EXPORT["min_top1_agreement"], "tflite_fp61": 0.5}}})
    cfg = export.export_config({"export": {**EXPORT, "tolerance": {**EXPORT["tolerance"],
                                                                  "tflite_int8_full": 2.0}}})
    assert cfg["tolerance"]["tflite_int8_full"] == 2.0


def _log_a_file_line() -> None:
    import logging

    logging.getLogger("pipeline.deploy.formats").info("ok   probe.onnx")


def test_export_workers_log_each_file(capfd):
    """Spawned workers start without the parent's logging: the stage's initializer sets it up,
    or the per-file lines of the jobs would be lost from the stage's output."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=export._worker_setup) as pool:
        pool.submit(_log_a_file_line).result()
    assert "INFO pipeline.deploy.formats: ok   probe.onnx" in capfd.readouterr().err


def test_export_run_hands_the_first_jobs_records_to_meanwhile_before_the_others(monkeypatch):
    """The ONNX job runs in the stage's own process and its records go to ``meanwhile`` (the
    MLflow logging of the models) before the TFLite jobs end; the records come back sorted."""
    calls = []

    def job(folds, fmts, checkpoints, cfg, out_root, trace_cache=None):
        calls.append((list(folds), list(fmts)))
        return [{"fold": k, "format": f} for k in folds for f in fmts]

    monkeypatch.setattr(export, "export_job", job)
    cfg = {**EXPORT, "formats": ["onnx", "tflite_fp32"], "all_formats_folds": None, "workers": 1}
    records, seen = export.export_run({0: Path("a"), 1: Path("b")}, cfg, Path("out"), True,
                                      meanwhile=lambda first: (list(calls), first))
    assert seen == ([([0, 1], ["onnx"])], [{"fold": 0, "format": "onnx"},
                                            {"fold": 1, "format": "onnx"}])
    assert calls == [([0, 1], ["onnx"]), ([0], ["tflite_fp32"]), ([1], ["tflite_fp32"])]
    assert [(r["fold"], r["format"]) for r in records] == [
        (0, "onnx"), (0, "tflite_fp32"), (1, "onnx"), (1, "tflite_fp32")]


def test_main_exports_every_fold_and_writes_parity_json(tmp_path, monkeypatch):
    """The stage's I/O: folds found, files laid out, parity.json written, failure after it."""
    import pipeline.models.checkpoint

    run_dir = tmp_path / "models" / "tiny-ce"
    for k in (0, 1):
        (run_dir / f"fold_{k}").mkdir(parents=True)
        (run_dir / f"fold_{k}" / "best.pt").write_bytes(b"stand-in: load_model is patched")
    monkeypatch.setattr(pipeline.models.checkpoint, "load_model",
                        lambda path: (tiny_model(), {"image_size": SIZE, "classes": list("abc")}))
    frames = []
    monkeypatch.setattr(export, "_frames", lambda fold, split, size, limit: (
        frames.append((fold, split, size, limit)) or images(4, fold).numpy(), np.zeros(4, int)))
    # One process: the patched loaders live in this one (the e2e tests run export.workers=2).
    params = {"export": {**EXPORT, "formats": ["onnx", "tflite_fp32"], "parity_frames": 4,
                         "all_formats_folds": None, "workers": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)

    export.main(["--run-dir", "models/tiny-ce"])
    out_dir = tmp_path / "exports" / "tiny-ce"  # beside the run, not inside the train output
    summary = json.loads((out_dir / "parity.json").read_text())
    assert summary["passed"] and summary["n_files"] == 4 and summary["run"] == "tiny-ce"
    assert set(summary["per_format"]) == {"onnx", "tflite_fp32"}
    assert summary["per_format"]["onnx"]["mean_accuracy_change"] == 0.0
    assert [(r["fold"], r["format"]) for r in summary["records"]] == [
        (0, "onnx"), (0, "tflite_fp32"), (1, "onnx"), (1, "tflite_fp32")]
    for r in summary["records"]:
        assert {"format", "file", "max_abs_diff", "top1_agreement", "n_frames", "size_bytes",
                "tolerance", "passed"} <= set(r)
    assert (out_dir / "fold_1" / "model_fp32.tflite").is_file()
    # Parity frames per fold for the ONNX job, per fold for each fold's TFLite job (no int8_full:
    # no calibration), then again for the models logged to MLflow (every fold has every format).
    assert frames == [(0, "test", SIZE, 4), (1, "test", SIZE, 4)] * 3

    # export.all_formats_folds: the other folds get ONNX only
    params["export"]["all_formats_folds"] = [1]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.rmtree(out_dir)
    export.main(["--run-dir", "models/tiny-ce"])
    summary = json.loads((out_dir / "parity.json").read_text())
    assert [(r["fold"], r["format"]) for r in summary["records"]] == [
        (0, "onnx"), (1, "onnx"), (1, "tflite_fp32")]
    assert not (out_dir / "fold_0" / "model_fp32.tflite").exists()
    # A grid run of a loss other than the grid's first is never benchmarked: ONNX alone.
    params["grid"] = {"models": ["tiny"], "losses": ["focal", "ce"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.rmtree(out_dir)
    export.main(["--run-dir", "models/tiny-ce"])
    summary = json.loads((out_dir / "parity.json").read_text())
    assert [(r["fold"], r["format"]) for r in summary["records"]] == [(0, "onnx"), (1, "onnx")]
    del params["grid"]
    params["export"]["all_formats_folds"] = None

    params["export"].update(formats=["onnx"], tolerance={"onnx": -1.0})  # impossible to meet
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(formats.ParityError, match="model.onnx"):
        export.main(["--run-dir", "models/tiny-ce", "--folds", "1"])
    summary = json.loads((out_dir / "parity.json").read_text())
    assert not summary["passed"] and [r["passed"] for r in summary["records"]] == [False]


def test_export_paper_checks_every_test_frame_and_calibrates_full_int8_per_size(tmp_path,
                                                                                   monkeypatch):
    """``python -m pipeline.grid export-paper``: the stage's export code on a checkout's fold
    models, parity on every test frame of the fold (from the split), full-int8 once per
    calibration size, PyTorch under bf16 autocast against float32, one JSON per size and a
    README table with a row per file."""
    import pipeline.data.loading
    import pipeline.models.checkpoint
    from pipeline.grid.paper_export import export_paper

    (tmp_path / "models" / "tiny-ce" / "fold_0").mkdir(parents=True)
    (tmp_path / "models" / "tiny-ce" / "fold_0" / "best.pt").write_bytes(b"stand-in")
    monkeypatch.setattr(pipeline.models.checkpoint, "load_model",
                        lambda path: (tiny_model(), {"image_size": SIZE, "classes": list("abc")}))
    frames = []
    monkeypatch.setattr(export, "_frames", lambda fold, split, size, limit: (
        frames.append((split, limit)) or images(4, fold).numpy(), np.arange(4) % 3))
    monkeypatch.setattr(pipeline.data.loading, "load_split_images",
                        lambda fold, split, size, limit, params: (
                            frames.append((split, limit)) or images(4, fold).mul(255).byte(),
                            torch.arange(4) % 3))
    params = compose(["train.image_size=32", "export.workers=1",
                      "export.formats=[onnx,tflite_int8_full]"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / params["folds"]["dir"]).mkdir(parents=True)
    (tmp_path / params["folds"]["dir"] / "splits.csv").write_text(
        "fold,source,split,frames\n0,a.mp4,test,30\n0,b.mp4,test,7\n0,c.mp4,train,50\n"
        "1,a.mp4,train,30\n")
    monkeypatch.chdir(tmp_path)

    text = export_paper(["tiny-ce"], [8, 16], tmp_path / "out")
    first = json.loads((tmp_path / "out" / "tiny-ce-calib8.json").read_text())
    second = json.loads((tmp_path / "out" / "tiny-ce-calib16.json").read_text())
    assert [r["format"] for r in first["records"]] == ["onnx", "tflite_int8_full"]
    assert [r["format"] for r in second["records"]] == ["tflite_int8_full"]
    assert first["calibration_frames"] == 8 and "file" not in first["records"][0]
    # Parity on the fold's 37 test frames; calibration on 8, then 16, training frames.
    assert ("test", 37) in frames and ("train", 8) in frames and ("train", 16) in frames
    bf16 = json.loads((tmp_path / "out" / "tiny-ce-bf16.json").read_text())["records"]
    assert [(r["format"], r["n_frames"]) for r in bf16] == [("torch_bf16_autocast", 4)]
    assert 0 < bf16[0]["max_abs_diff"] < 0.1  # bf16 rounding: small, never zero
    table = [line for line in text.splitlines() if line.startswith("| tiny-ce")]
    assert len(table) == 4 and "Export of paper-trained models at 32 px" in text
    assert "torch_bf16_autocast" in table[-1]
    # A later call adds a calibration size; the table keeps the earlier files' rows.
    text = export_paper(["tiny-ce"], [32], tmp_path / "out", full_int8_only=True)
    later = json.loads((tmp_path / "out" / "tiny-ce-calib32.json").read_text())
    assert [r["format"] for r in later["records"]] == ["tflite_int8_full"]
    assert len([line for line in text.splitlines() if line.startswith("| tiny-ce")]) == 5
    assert (tmp_path / "out" / "README.md").read_text() == text
