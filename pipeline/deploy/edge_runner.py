"""Run and time exported models (.onnx, .tflite) with their own runtimes; no torch needed.

This file is self-contained on purpose: ``pipeline.stages.benchmark`` copies it to a remote device
(a Raspberry Pi, a Jetson) that has only numpy plus ONNX Runtime and/or a TFLite interpreter
(``ai_edge_litert``, or the older ``tflite_runtime``), runs it there and reads the JSON it prints.
Locally, export parity checks and the benchmark use the same loaders, so what is checked is what
is timed. Keep it to the standard library + numpy, and Python 3.8 syntax.

    python edge_runner.py model.onnx model_fp32.tflite --image-size 224 --threads 1 4 \\
        --runs 50 --warmup 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

#: The line of stdout that carries the result (runtimes may print their own lines).
RESULT_MARKER = "EDGE_RUNNER_JSON "


def format_of(path) -> str:
    """The export format a file name stands for: ``onnx``, ``tflite_fp32``, ``tflite_int8_full``...

    ``model_fp16.tflite`` -> ``tflite_fp16``; a .tflite without a precision suffix is fp32.
    """
    path = Path(path)
    if path.suffix == ".onnx":
        return "onnx"
    if path.suffix == ".tflite":
        stem = path.stem
        precision = stem.split("_", 1)[1] if "_" in stem else "fp32"
        return "tflite_" + precision
    raise ValueError(f"{path}: unknown export format (expected .onnx or .tflite)")


def _tflite_interpreter_class():
    try:
        import ai_edge_litert
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter, "ai_edge_litert", getattr(ai_edge_litert, "__version__", "unknown")
    except ImportError:
        pass
    try:
        import tflite_runtime
        from tflite_runtime.interpreter import Interpreter
        return Interpreter, "tflite_runtime", getattr(tflite_runtime, "__version__", "unknown")
    except ImportError as exc:
        raise ImportError("no TFLite interpreter: pip install ai-edge-litert (or tflite-runtime "
                          "on older devices)") from exc


class OnnxModel:
    """An ONNX Runtime CPU session; ``model(x)`` maps float32 NCHW images to float32 logits."""

    def __init__(self, path, threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.runtime, self.version = "onnxruntime", ort.__version__

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})[0]


class TFLiteModel:
    """A TFLite interpreter; ``model(x)`` maps float32 NCHW images to float32 logits.

    Fully-integer models take int8/uint8 input and give int8 output: the input is quantized
    and the output dequantized here with the tensors' own scale and zero point, as an app on
    the device would. A batch larger than the model's fixed batch runs frame by frame.
    """

    def __init__(self, path, threads: int = 1):
        interpreter_cls, self.runtime, self.version = _tflite_interpreter_class()
        self.interpreter = interpreter_cls(model_path=str(path), num_threads=int(threads))
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = int(self.input["shape"][0])

    def _run(self, x: np.ndarray) -> np.ndarray:
        scale, zero = self.input["quantization"]
        if scale:
            info = np.iinfo(self.input["dtype"])
            x = np.clip(np.round(x / scale) + zero, info.min, info.max)
        self.interpreter.set_tensor(self.input["index"], x.astype(self.input["dtype"]))
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.output["index"])
        scale, zero = self.output["quantization"]
        if scale:
            y = (y.astype(np.float32) - zero) * scale
        return y.astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.shape[0] == self.batch:
            return self._run(x)
        return np.concatenate([self._run(x[i:i + self.batch])
                               for i in range(0, x.shape[0], self.batch)])


def load_model(path, threads: int = 1):
    """An ``OnnxModel`` or ``TFLiteModel`` for the file, by its suffix."""
    return OnnxModel(path, threads) if Path(path).suffix == ".onnx" else TFLiteModel(path, threads)


def time_calls(fn, x, runs: int, warmup: int) -> dict:
    """Call ``fn(x)`` ``warmup`` times untimed, then ``runs`` times; latency statistics in ms."""
    for _ in range(int(warmup)):
        fn(x)
    times = []
    for _ in range(int(runs)):
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1e3)
    t = np.asarray(times)
    return {"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)),
            "mean_ms": float(t.mean()), "min_ms": float(t.min()), "max_ms": float(t.max()),
            "runs": int(runs), "warmup": int(warmup)}


def _cpuinfo() -> dict[str, str]:
    """The first value of each key of ``/proc/cpuinfo`` (empty where there is none)."""
    names: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            names.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return names


def cpu_model() -> str:
    """The CPU's marketing name (x86 ``model name``; on a Raspberry Pi the board's ``Model``)."""
    names = _cpuinfo()
    for key in ("model name", "Model", "Hardware", "cpu model"):
        if names.get(key):
            return names[key]
    return platform.processor() or platform.machine()


def vector_extensions() -> list[str]:
    """The x86 vector extensions PyTorch's CPU kernels are chosen by, those this CPU has
    (kernels differ by them, and so may the last bits of what a run computes)."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]


def device_info() -> dict:
    """What the numbers were measured on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"hostname": platform.node(), "cpu": cpu_model(), "cores": cores,
            "machine": platform.machine(), "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "numpy": np.__version__}


def _peak_rss_bytes() -> int:
    # VmHWM belongs to this process image alone; ru_maxrss (the fallback off Linux) would also
    # count the RSS of the parent this process was forked from (a big Python running torch).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024)


def benchmark_file(path, image_size: int, threads=(1,), runs: int = 50, warmup: int = 10,
                   seed: int = 0) -> list:
    """Batch-1 latency of one exported file at each thread count, one record per count."""
    path = Path(path)
    x = np.random.default_rng(seed).random((1, 3, image_size, image_size), dtype=np.float32)
    rss_before = _peak_rss_bytes()
    records = []
    for n in threads:
        model = load_model(path, n)
        record = {"format": format_of(path), "runtime": model.runtime,
                  "runtime_version": model.version, "file": path.name,
                  "size_bytes": path.stat().st_size, "device_type": "cpu", "threads": int(n),
                  "batch": 1, "image_size": int(image_size)}
        record.update(time_calls(model, x, runs, warmup))
        records.append(record)
        del model
    for record in records:
        # Peak RSS of this process over all thread counts: the runtime + model + activations.
        record["peak_rss_bytes"] = _peak_rss_bytes()
        record["rss_before_load_bytes"] = rss_before
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", help=".onnx / .tflite files")
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--threads", nargs="+", default=["1"],
                        help="thread counts; 'all' = this machine's cores")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    info = device_info()
    threads = []
    for t in args.threads:
        n = int(info["cores"]) if t == "all" else int(t)
        if n not in threads:
            threads.append(n)
    records = []
    for f in args.files:
        for record in benchmark_file(f, args.image_size, threads, args.runs, args.warmup,
                                     args.seed):
            record["device"] = info
            records.append(record)
    sys.stdout.write(RESULT_MARKER + json.dumps(records) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
