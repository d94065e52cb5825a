"""A PyTorch model to ONNX and TFLite files, each checked against PyTorch by its own runtime.

Formats (``export.formats``) and their files in ``<run-dir>/export/fold_<k>/``:

=====================  =========================  ===============================================
format                 file                       how
=====================  =========================  ===============================================
onnx                   model.onnx                 ``torch.onnx.export`` (dynamo), dynamic batch
tflite_fp32            model_fp32.tflite          ``litert_torch.convert`` (no TensorFlow), batch 1
tflite_fp16            model_fp16.tflite          fp16 weights (ai-edge-quantizer float casting)
tflite_int8_dynamic    model_int8_dynamic.tflite  int8 weights, activations quantized at run time
tflite_int8_full       model_int8_full.tflite     int8 weights and activations, int8 input/output,
                                                  calibrated on training frames of the fold
=====================  =========================  ===============================================

Every file is run by its own runtime (ONNX Runtime, the LiteRT interpreter, through
``pipeline.deploy.edge_runner``: the loaders the benchmark times) on real test frames of its fold, and
compared with the PyTorch logits: max |diff| must stay within ``export.tolerance[format]`` and the
top-1 agreement at or above ``export.min_top1_agreement[format]`` (the values and why: the
``export`` group of ``conf/config.yaml``). ``parity.json`` records every file (also the failing
ones), then the stage fails naming each file over its tolerance.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.deploy import edge_runner

log = logging.getLogger("pipeline.deploy.formats")

TFLITE_PRECISIONS = ("fp32", "fp16", "int8_dynamic", "int8_full")
FORMATS = ("onnx",) + tuple(f"tflite_{p}" for p in TFLITE_PRECISIONS)
FILE_NAMES = {"onnx": "model.onnx",
              **{f"tflite_{p}": f"model_{p}.tflite" for p in TFLITE_PRECISIONS}}

INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ParityError(RuntimeError):
    """An exported file whose outputs differ from PyTorch's by more than its tolerance."""

    def __init__(self, failures: Sequence[Mapping], records: Sequence[Mapping] = ()):
        self.failures, self.records = list(failures), list(records)
        lines = [f"  {r['file']} ({r['format']}): max |logit diff| {r['max_abs_diff']:.3g} "
                 f"(tolerance {_fmt(r['tolerance'])}), top-1 agreement "
                 f"{r['top1_agreement']:.3f} (minimum {r['min_top1_agreement']:.3f}) on "
                 f"{r['n_frames']} frames" for r in self.failures]
        super().__init__("exported model(s) disagree with PyTorch beyond tolerance:\n"
                         + "\n".join(lines) + "\nloosen export.tolerance / "
                         "export.min_top1_agreement only if the drift is expected (quantization)")


def _fmt(tolerance: float | None) -> str:
    return "none" if tolerance is None else f"{tolerance:.3g}"


def within_tolerance(result: Mapping, tolerance: float | None, min_top1: float) -> bool:
    """Whether a parity result passes its gates (``tolerance`` None: not gated on logits)."""
    return ((tolerance is None or result["max_abs_diff"] <= tolerance)
            and result["top1_agreement"] >= min_top1)


# ---------------------------------------------------------------------------------- ONNX
class OnnxExporter:
    """ONNX files of one architecture, traced once.

    The first :meth:`save` traces its model with the dynamo exporter into an unoptimized graph
    whose initializers keep their module paths. Every later :meth:`save` (another fold, other
    weights of the same architecture) puts its model's parameters and buffers into a copy of
    that graph and runs the exporter's own last step, the ONNX optimizer (constant folding,
    fusions): a fraction of a second where tracing takes many. When dynamo cannot trace the
    model, each :meth:`save` runs the TorchScript exporter on its model instead.

    With ``cache_dir``, the traced graph is also kept there under :func:`trace_key` of the
    model, so that another process exporting the same architecture (the other loss of a grid
    model, a rerun after retraining) reads it instead of tracing again. Every file written from
    it is still checked against PyTorch by the caller, as any other.
    """

    def __init__(self, image_size: int, opset: int | None = None,
                 cache_dir: str | Path | None = None):
        self.image_size, self.opset = int(image_size), opset
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._graph: bytes | None = None
        self._dynamo = True

    def save(self, model: nn.Module, path: str | Path) -> Path:
        """Write ``model`` as a self-contained ONNX file with a dynamic batch axis, then run it
        with ONNX Runtime at batch 1 and batch 3 (a wrong batch axis fails here, not on the
        device).

        Raises:
            ValueError: a tensor of ``model`` differs in shape or dtype from the weight of its
                name in the traced graph: it is not the architecture traced first.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        model = model.eval()
        if self._dynamo and self._graph is None:
            self._trace(model)
        if self._graph is None:
            with torch.no_grad():
                torch.onnx.export(model, (self._sample(),), str(path), dynamo=False,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                                  opset_version=self.opset, verbose=False)
        else:
            self._write_with_weights(model, path)
        session = edge_runner.OnnxModel(path)
        for n in (1, 3):
            out = session(np.zeros((n, 3, self.image_size, self.image_size), np.float32))
            if out.shape[0] != n:
                raise RuntimeError(f"{path}: batch {n} gave output shape {out.shape}: the batch "
                                   f"axis is not dynamic")
        return path

    def _sample(self) -> torch.Tensor:
        return torch.rand(2, 3, self.image_size, self.image_size)

    def _trace(self, model: nn.Module) -> None:
        """The unoptimized dynamo graph of ``model``, kept serialized (read from ``cache_dir``
        when a trace of this architecture is there, written there when not); on failure, note
        that this architecture goes through the TorchScript exporter."""
        cached = None
        if self.cache_dir is not None:
            cached = self.cache_dir / f"{trace_key(model, self.image_size, self.opset)}.onnx"
            if cached.is_file():
                self._graph = cached.read_bytes()
                log.info("ONNX graph of %s from %s", type(model).__name__, cached)
                return
        batch = torch.export.Dim("batch", min=1, max=4096)
        try:
            with torch.no_grad():
                program = torch.onnx.export(model, (self._sample(),), dynamo=True, optimize=False,
                                            dynamic_shapes=({0: batch},),
                                            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                            opset_version=self.opset, verbose=False)
            self._graph = program.model_proto.SerializeToString()
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                partial = cached.with_name(f"{cached.name}.{os.getpid()}.part")
                partial.write_bytes(self._graph)
                os.replace(partial, cached)  # whole or absent for another process reading it
        except Exception as exc:  # noqa: BLE001 - any dynamo failure: the legacy exporter may cope
            self._dynamo = False
            log.warning("dynamo ONNX export failed (%s: %s); using the TorchScript exporter",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")

    def _write_with_weights(self, model: nn.Module, path: Path) -> None:
        """The traced graph with ``model``'s tensors as its weights, optimized, saved to ``path``.
        Initializers that name no tensor of the model (constants of the architecture) stay."""
        import onnx
        import onnx_ir as ir

        graph = ir.from_proto(onnx.load_from_string(self._graph))
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        for name, init in graph.graph.initializers.items():
            if name not in tensors:
                continue
            value = ir.tensor(tensors[name].detach().cpu().numpy(), name=name)
            if value.shape != init.const_value.shape or value.dtype != init.const_value.dtype:
                raise ValueError(
                    f"{path}: weight '{name}' is {init.const_value.dtype} "
                    f"{list(init.const_value.shape)} in the traced graph but {value.dtype} "
                    f"{list(value.shape)} in this model; export it with its own OnnxExporter")
            init.const_value = value
        program = torch.onnx.ONNXProgram(graph, None)
        program.optimize()  # the step torch.onnx.export(optimize=True) ends with
        program.save(path, external_data=False)


def trace_key(model: nn.Module, image_size: int, opset: int | None) -> str:
    """Digest of what an ONNX trace of ``model`` depends on: its module tree as printed, the
    names, shapes and dtypes of its tensors, the source files of its module classes, the input
    size, the opset and the versions of torch and the ONNX packages. The weights' values are not
    in it: :class:`OnnxExporter` writes those into the graph for every file."""
    sources = sorted({inspect.getsourcefile(type(m)) or "" for m in model.modules()} - {""})
    parts = [repr(model), int(image_size), opset,
             [(name, list(t.shape), str(t.dtype)) for name, t in model.state_dict().items()],
             {pkg: version(pkg) for pkg in ("torch", "onnx", "onnxscript", "onnx-ir")}]
    h = hashlib.sha256(json.dumps(parts).encode())
    for source in sources:
        h.update(Path(source).read_bytes())
    return h.hexdigest()[:32]


def export_onnx(model: nn.Module, path: str | Path, image_size: int,
                opset: int | None = None) -> Path:
    """One model to an ONNX file with a dynamic batch axis (:class:`OnnxExporter`).

    Returns:
        The path written.
    """
    return OnnxExporter(image_size, opset).save(model, path)


# -------------------------------------------------------------------------------- TFLite
def convert_tflite_fp32(model: nn.Module, image_size: int) -> bytes:
    """Convert to a float32 TFLite flatbuffer with ``litert_torch`` (NCHW input, batch 1)."""
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")  # its own progress lines
    import litert_torch

    sample = torch.rand(1, 3, image_size, image_size)
    edge_model = litert_torch.convert(model.eval(), (sample,))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.tflite"
        edge_model.export(str(out))
        return out.read_bytes()


def quantize_tflite(fp32_model: bytes, precision: str,
                    calibration: np.ndarray | torch.Tensor | None = None) -> bytes:
    """Post-training quantization of a float32 TFLite model with ai-edge-quantizer.

    Args:
        fp32_model: the float32 flatbuffer (``convert_tflite_fp32``).
        precision: ``fp32`` (unchanged), ``fp16`` (fp16 weights, float compute),
            ``int8_dynamic`` (int8 weights, activations quantized at run time) or ``int8_full``
            (int8 weights and activations, int8 input/output).
        calibration: float images N x 3 x H x W in [0, 1], needed by ``int8_full``: real frames
            of the training split, so activation ranges match what the model will see.
    """
    if precision not in TFLITE_PRECISIONS:
        raise ValueError(f"unknown TFLite precision '{precision}' (valid: {TFLITE_PRECISIONS})")
    if precision == "fp32":
        return bytes(fp32_model)
    from ai_edge_quantizer import qtyping, quantizer, recipe

    if precision == "fp16":
        q = quantizer.Quantizer(bytearray(fp32_model))
        for op in (qtyping.TFLOperationName.CONV_2D, qtyping.TFLOperationName.DEPTHWISE_CONV_2D,
                   qtyping.TFLOperationName.FULLY_CONNECTED):
            q.add_weight_only_config(regex=".*", operation_name=op, num_bits=16,
                                     algorithm_key=quantizer.AlgorithmName.FLOAT_CASTING)
        return bytes(q.quantize(enable_progress_report=False).quantized_model)
    if precision == "int8_dynamic":
        q = quantizer.Quantizer(bytearray(fp32_model), recipe.dynamic_wi8_afp32())
        return bytes(q.quantize(enable_progress_report=False).quantized_model)
    if calibration is None or len(calibration) == 0:
        raise ValueError("int8_full quantization needs calibration images (N x 3 x H x W floats "
                         "in [0, 1]); set export.calibration_frames > 0")
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_content=bytes(fp32_model)).get_signature_list()
    signature, io = next(iter(signatures.items()))
    x = np.asarray(calibration, dtype=np.float32)
    data = {signature: [{io["inputs"][0]: x[i:i + 1]} for i in range(len(x))]}
    q = quantizer.Quantizer(bytearray(fp32_model), recipe.static_wi8_ai8())
    with warnings.catch_warnings():
        # The calibrator keeps every tensor on purpose; the interpreter warns about it.
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
        result = q.calibrate(data, num_threads=max(1, min(4, os.cpu_count() or 1)))
        return bytes(q.quantize(result, enable_progress_report=False).quantized_model)


def export_tflite(model: nn.Module, path: str | Path, image_size: int, precision: str = "fp32",
                  calibration: np.ndarray | torch.Tensor | None = None,
                  fp32_model: bytes | None = None) -> Path:
    """Export to TFLite at one precision (see ``quantize_tflite``).

    Args:
        fp32_model: an already converted float32 flatbuffer of the same model, to convert once
            and quantize several times.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fp32_model = fp32_model if fp32_model is not None else convert_tflite_fp32(model, image_size)
    path.write_bytes(quantize_tflite(fp32_model, precision, calibration))
    return path


# -------------------------------------------------------------------------------- parity
@torch.no_grad()
def torch_logits(model: nn.Module, images: torch.Tensor | np.ndarray,
                 batch_size: int = 16) -> np.ndarray:
    """PyTorch outputs of the model (eval mode, CPU) for float images in [0, 1], as float32
    (also when called under an autocast context)."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    model = model.eval()
    return torch.cat([model(x[i:i + batch_size]).float()
                      for i in range(0, len(x), batch_size)]).numpy()


def compare_outputs(reference: np.ndarray, output: np.ndarray,
                    labels: Sequence[int] | np.ndarray | torch.Tensor | None = None) -> dict:
    """Agreement of an exported model's logits with PyTorch's.

    Returns:
        ``max_abs_diff``, ``mean_abs_diff``, ``rel_max_abs_diff`` (max_abs_diff over PyTorch's
        largest |logit|), ``top1_agreement``, ``n``; with labels also
        ``accuracy_torch``, ``accuracy`` (the exported model's) and ``accuracy_change``.
    """
    reference, output = np.asarray(reference, np.float64), np.asarray(output, np.float64)
    if reference.shape != output.shape:
        raise ValueError(f"output shape {output.shape} differs from PyTorch's {reference.shape}")
    diff = np.abs(reference - output)
    ref_top1, out_top1 = reference.argmax(1), output.argmax(1)
    scale = float(np.abs(reference).max())
    result = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
              "rel_max_abs_diff": float(diff.max() / scale) if scale > 0 else float("inf"),
              "top1_agreement": float((ref_top1 == out_top1).mean()), "n": int(len(reference))}
    if labels is not None:
        labels = np.asarray(labels)
        result["accuracy_torch"] = float((ref_top1 == labels).mean())
        result["accuracy"] = float((out_top1 == labels).mean())
        result["accuracy_change"] = result["accuracy"] - result["accuracy_torch"]
    return result


def runtime_parity(model: nn.Module, path: str | Path, images: torch.Tensor | np.ndarray,
                   labels=None, threads: int = 1, reference: np.ndarray | None = None) -> dict:
    """Run an exported file with its runtime and compare with PyTorch (``compare_outputs``)."""
    x = np.asarray(images, dtype=np.float32)
    reference = torch_logits(model, x) if reference is None else reference
    return compare_outputs(reference, edge_runner.load_model(path, threads)(x), labels)


def accuracy_change(model: nn.Module, path: str | Path, images, labels) -> dict:
    """Accuracy of an exported (e.g. int8) file vs PyTorch's on labelled images.

    Returns:
        ``accuracy_torch``, ``accuracy``, ``accuracy_change`` (exported minus PyTorch), ``n``.
    """
    result = runtime_parity(model, path, images, labels)
    return {k: result[k] for k in ("accuracy_torch", "accuracy", "accuracy_change", "n")}


def check_parity(records: Sequence[Mapping]) -> None:
    """Raise ``ParityError`` listing every record whose ``passed`` is false."""
    failures = [r for r in records if not r["passed"]]
    if failures:
        raise ParityError(failures, records)


# ------------------------------------------------------------------------------ one model
def _record(fmt: str, path: Path, result: dict, gate: float | None, min_agreement: float,
            seconds: float, extra: Mapping) -> dict:
    """One file's parity record (``result``: :func:`compare_outputs`), logged as a line."""
    passed = within_tolerance(result, gate, min_agreement)
    record = {**extra, "format": fmt, "file": str(path), "size_bytes": path.stat().st_size,
              "n_frames": result.pop("n"), **result,
              "tolerance": None if gate is None else float(gate),
              "min_top1_agreement": min_agreement, "export_seconds": round(seconds, 2),
              "passed": bool(passed)}
    log.info("%s %s: %.1f KiB, max |diff| %.3g (tol %s), top-1 agreement %.3f%s [%.1f s]",
             "ok  " if passed else "FAIL", path, record["size_bytes"] / 1024,
             record["max_abs_diff"], _fmt(record["tolerance"]), record["top1_agreement"],
             f", accuracy change {record['accuracy_change']:+.3f}"
             if "accuracy_change" in record else "", seconds)
    return record


def export_model(model: nn.Module, out_dir: str | Path, image_size: int, images,
                 labels=None, calibration=None, formats: Sequence[str] = FORMATS,
                 tolerance: Mapping[str, float] | None = None,
                 min_top1_agreement: Mapping[str, float] | None = None,
                 opset: int | None = None, strict: bool = True,
                 extra: Mapping | None = None,
                 onnx_exporter: OnnxExporter | None = None) -> list[dict]:
    """Export one model to every format in ``out_dir`` and check each file against PyTorch.

    Args:
        images: float frames N x 3 x S x S in [0, 1] for the parity check.
        labels: their classes, for the accuracy change of each file (optional).
        calibration: float frames for ``tflite_int8_full`` (training frames).
        tolerance / min_top1_agreement: the gates per format (``export.tolerance`` /
            ``export.min_top1_agreement``); a format without an entry is recorded, not gated.
        opset: the ONNX opset (``export.opset``; None: the exporter's own).
        strict: raise ``ParityError`` (after all formats are written and checked) if any file
            fails; otherwise only mark it ``passed: false``.
        extra: fields copied into every record (e.g. the fold).
        onnx_exporter: an :class:`OnnxExporter` of this architecture and size, to reuse its
            trace (default: a new one).

    Returns:
        One record per file: format, file, size_bytes, max_abs_diff, top1_agreement, n_frames,
        tolerance, passed, ...
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown} (valid: {list(FORMATS)})")
    tolerance = dict(tolerance or {})
    min_top1 = dict(min_top1_agreement or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x = np.asarray(images, dtype=np.float32)
    reference = torch_logits(model, x)
    onnx_exporter = onnx_exporter or OnnxExporter(image_size, opset)
    fp32_tflite = None  # converted once, for the first TFLite format
    records = []
    for fmt in formats:
        path = out_dir / FILE_NAMES[fmt]
        start = time.perf_counter()
        if fmt == "onnx":
            onnx_exporter.save(model, path)
        else:
            if fp32_tflite is None:
                fp32_tflite = convert_tflite_fp32(model, image_size)
            export_tflite(model, path, image_size, fmt.removeprefix("tflite_"),
                          calibration=calibration, fp32_model=fp32_tflite)
        seconds = time.perf_counter() - start
        result = runtime_parity(model, path, x, labels, reference=reference)
        records.append(_record(fmt, path, result, tolerance.get(fmt),
                               float(min_top1.get(fmt, 0.0)), seconds, extra or {}))
    if strict:
        check_parity(records)
    return records
