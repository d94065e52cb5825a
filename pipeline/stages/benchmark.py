"""Stage ``benchmark``: batch-1 latency of a run's model in every runtime, plus Table II complexity.

Timed, each at every ``benchmark.threads`` count (``all`` = the machine's cores):

- PyTorch eager on the host CPU, and on CUDA when a GPU is visible;
- every exported file of fold ``benchmark.fold`` (``export`` stage outputs) with its own runtime
  (ONNX Runtime, LiteRT interpreter), each file in a fresh process running
  ``pipeline/deploy/edge_runner.py``, so the peak RSS recorded is that runtime's alone;
- optionally the same files on a remote device over SSH (``benchmark.remote``): the files and
  ``edge_runner.py`` are copied there and run by the device's Python (which needs only numpy +
  onnxruntime and/or ai-edge-litert / tflite-runtime), for the paper's Raspberry Pi / Jetson rows.

Every record carries where it ran (CPU model, cores, runtime versions). Timings vary from run to
run on a shared machine: compare numbers from one report only.

    python -m pipeline.stages.benchmark --run-dir models/mini_covidnet-ce \\
        --out reports/benchmark/mini_covidnet-ce.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from pipeline.deploy import edge_runner
from pipeline.deploy.formats import FILE_NAMES, FORMATS

log = logging.getLogger("pipeline.stages.benchmark")

RUNNER = Path(edge_runner.__file__).resolve()


@dataclasses.dataclass
class RemoteTarget:
    """An SSH-reachable device to time the exported files on (OpenSSH client commands).

    Attributes:
        host: ``user@host`` (or a Host alias of ~/.ssh/config).
        port: SSH port.
        key: private key file (None: ssh's defaults / agent).
        python: the device's Python, with numpy + onnxruntime and/or ai-edge-litert.
        workdir: where the runner and the files are copied (created; the copied files are
            removed afterwards).
        name: label for the records (default: ``host``).
        formats: the export formats to time there (None: every one timed locally), e.g. only
            TFLite ones on a device with ``tflite-runtime`` but no ONNX Runtime.
        options: ``-o`` options for ssh; the defaults never prompt.
    """

    host: str
    port: int = 22
    key: str | None = None
    python: str = "python3"
    workdir: str = "/tmp/pipeline-benchmark"
    name: str | None = None
    formats: Sequence[str] | None = None
    options: Sequence[str] = ("BatchMode=yes", "StrictHostKeyChecking=accept-new",
                              "ConnectTimeout=20")

    @classmethod
    def from_params(cls, cfg: Mapping | str) -> "RemoteTarget":
        """From ``benchmark.remote``: a ``user@host`` string or a mapping of these fields."""
        if isinstance(cfg, str):
            return cls(host=cfg)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - fields)
        if unknown:
            from pipeline.core.config import ConfigError
            raise ConfigError(f"unknown key(s) benchmark.remote.{unknown} "
                              f"(valid: {sorted(fields)})")
        return cls(**cfg)

    def _options(self) -> list[str]:
        args = ["-p", str(self.port)]
        if self.key:
            args += ["-i", os.path.expanduser(self.key)]
        for opt in self.options:
            args += ["-o", opt]
        return args

    def ssh(self, command: str, timeout: float | None = None,
            stdin=None) -> subprocess.CompletedProcess:
        """Run a shell command on the device; raise with its stderr if it fails."""
        cmd = ["ssh", *self._options(), self.host, command]
        return _run(cmd, timeout, f"ssh {self.host}", stdin=stdin)

    def copy(self, files: Sequence[str | Path], timeout: float | None = None) -> None:
        """Copy local files into ``workdir`` on the device.

        Streamed through ``ssh ... cat``, not scp: current scp needs the SFTP subsystem, which
        small devices' SSH servers (dropbear) and minimal sshd configs often lack.
        """
        for f in files:
            dest = shlex.quote(f"{self.workdir}/{Path(f).name}")
            with open(f, "rb") as src:
                self.ssh(f"cat > {dest}", timeout=timeout, stdin=src)


def _run(cmd: Sequence[str], timeout: float | None, what: str,
         stdin=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), stdin=stdin, capture_output=True, timeout=timeout)
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {shlex.join(cmd)}\n"
                           f"{err.strip()[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def resolve_threads(threads: Sequence[int | str], cores: int) -> list[int]:
    """Thread counts with ``all`` replaced by ``cores``; duplicates dropped, order kept."""
    out: list[int] = []
    for t in threads:
        n = cores if str(t) == "all" else int(t)
        if n < 1:
            raise ValueError(f"benchmark.threads: {t!r} is not a positive count or 'all'")
        if n not in out:
            out.append(n)
    return out


def parse_runner_output(stdout: str, stderr: str = "", what: str = "edge runner") -> list[dict]:
    """The records in ``edge_runner``'s output (the line after ``RESULT_MARKER``)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(edge_runner.RESULT_MARKER):
            return json.loads(line[len(edge_runner.RESULT_MARKER):])
    raise RuntimeError(f"{what} printed no result; its stderr ends with:\n{stderr[-2000:]}")


def _runner_args(files: Sequence[str], image_size: int, threads: Sequence[int | str], runs: int,
                 warmup: int) -> list[str]:
    return [*map(str, files), "--image-size", str(image_size), "--threads",
            *map(str, threads), "--runs", str(runs), "--warmup", str(warmup)]


def benchmark_files(files: Sequence[str | Path], image_size: int,
                    threads: Sequence[int | str] = (1,), runs: int = 50, warmup: int = 10,
                    python: str = sys.executable, timeout: float | None = 1800) -> list[dict]:
    """Time exported files on this machine, each file in its own ``edge_runner`` process.

    Returns:
        One record per (file, thread count): format, runtime, runtime_version, threads,
        median_ms, p90_ms, mean_ms, min_ms, max_ms, peak_rss_bytes, size_bytes, device, host.
    """
    records = []
    for f in files:
        cmd = [python, str(RUNNER), *_runner_args([f], image_size, threads, runs, warmup)]
        proc = _run(cmd, timeout, f"edge runner on {f}")
        for r in parse_runner_output(proc.stdout, proc.stderr, f"edge runner on {f}"):
            r["host"] = "local"
            records.append(r)
            log.info("local %-20s %2d threads: median %.2f ms, p90 %.2f ms", r["format"],
                     r["threads"], r["median_ms"], r["p90_ms"])
    return records


def benchmark_remote(files: Sequence[str | Path], image_size: int, target: RemoteTarget,
                     threads: Sequence[int | str] = (1,), runs: int = 50, warmup: int = 10,
                     timeout: float | None = 1800) -> list[dict]:
    """Copy the runner and the files to an SSH target, time each file there, collect records.

    The records have the same fields as ``benchmark_files``'s, with ``host`` = the target's name
    and ``device`` describing the remote machine.
    """
    files = [Path(f) for f in files]
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise ValueError(f"files to copy must have distinct names: {names}")
    workdir = shlex.quote(target.workdir)
    target.ssh(f"mkdir -p {workdir}", timeout=60)
    target.copy([RUNNER, *files], timeout=timeout)
    label = target.name or target.host
    records = []
    try:
        for name in names:
            command = (f"cd {workdir} && {target.python} {RUNNER.name} "
                       + shlex.join(_runner_args([name], image_size, threads, runs, warmup)))
            proc = target.ssh(command, timeout=timeout)
            for r in parse_runner_output(proc.stdout, proc.stderr, f"{label}: {name}"):
                r["host"] = label
                records.append(r)
                log.info("%s %-20s %2d threads: median %.2f ms, p90 %.2f ms", label,
                         r["format"], r["threads"], r["median_ms"], r["p90_ms"])
    finally:
        try:
            target.ssh(f"cd {workdir} && rm -f " + shlex.join([RUNNER.name, *names]), timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            log.warning("could not remove the copied files on %s: %s", label, exc)
    return records


@torch.inference_mode()
def benchmark_torch(model: nn.Module, image_size: int, threads: Sequence[int] = (1,),
                    runs: int = 50, warmup: int = 10, device: str = "cpu") -> list[dict]:
    """Batch-1 latency of eager PyTorch, one record per thread count (CUDA: one record).

    ``torch.set_num_threads`` is restored afterwards.
    """
    model = model.eval().to(device)
    x = torch.rand(1, 3, image_size, image_size, device=device)
    info = edge_runner.device_info()
    if device.startswith("cuda"):
        sync = torch.cuda.synchronize

        def call(inp):
            model(inp)
            sync()

        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        thread_counts = [torch.get_num_threads()]
    else:
        call, thread_counts = model, list(threads)
    before = torch.get_num_threads()
    records = []
    try:
        for n in thread_counts:
            torch.set_num_threads(int(n))
            record = {"format": "torch_eager", "runtime": "torch", "runtime_version":
                      torch.__version__, "file": None, "size_bytes": None,
                      "device_type": "cuda" if device.startswith("cuda") else "cpu",
                      "threads": int(n), "batch": 1, "image_size": int(image_size)}
            record.update(edge_runner.time_calls(call, x, runs, warmup))
            record.update(host="local", device=info)
            records.append(record)
            log.info("local torch %-4s %2d threads: median %.2f ms, p90 %.2f ms",
                     record["device_type"], n, record["median_ms"], record["p90_ms"])
    finally:
        torch.set_num_threads(before)
        model.to("cpu")
    return records


def benchmark_config(params: Mapping) -> dict:
    """The ``benchmark`` params group, checked against its schema (``pipeline.core.schema``)
    and its formats against the converters."""
    from pipeline.core.config import ConfigError, get
    from pipeline.core.schema import validate

    cfg = validate({"benchmark": get(params, "benchmark")})["benchmark"]
    bad = sorted(set(cfg["formats"]) - set(FORMATS))
    if bad:
        raise ConfigError(f"benchmark.formats has unknown format(s) {bad} (valid: {list(FORMATS)})")
    return cfg


def benchmark_run(model: nn.Module, image_size: int, export_dir: str | Path, cfg: Mapping,
                  python: str = sys.executable) -> dict:
    """Complexity and every latency record of one model (see the module docstring).

    Args:
        export_dir: the fold's export folder (``model.onnx``, ``model_fp32.tflite``, ...);
            formats in ``cfg['formats']`` without a file there are skipped with a warning.
        cfg: ``benchmark_config`` output.

    Returns:
        ``{"host": device_info, "complexity": {...}, "records": [...]}``.
    """
    from pipeline.models.complexity import complexity

    export_dir = Path(export_dir)
    files = {fmt: export_dir / FILE_NAMES[fmt] for fmt in cfg["formats"]}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        log.warning("not exported, not timed: %s (run the export stage)", ", ".join(missing))
    files = {fmt: p for fmt, p in files.items() if p.is_file()}
    host = edge_runner.device_info()
    threads = resolve_threads(cfg["threads"], host["cores"])
    records: list[dict] = []
    if cfg["torch"]:
        records += benchmark_torch(model, image_size, threads, cfg["runs"], cfg["warmup"])
        if cfg["cuda"] and torch.cuda.is_available():
            records += benchmark_torch(model, image_size, threads, cfg["runs"], cfg["warmup"],
                                       device="cuda")
    records += benchmark_files(list(files.values()), image_size, threads, cfg["runs"],
                               cfg["warmup"], python=python)
    if cfg["remote"]:
        target = RemoteTarget.from_params(cfg["remote"])
        remote_files = [p for fmt, p in files.items()
                        if target.formats is None or fmt in target.formats]
        # The device resolves 'all' to its own core count.
        records += benchmark_remote(remote_files, image_size, target, cfg["threads"],
                                    cfg["runs"], cfg["warmup"])
    return {"host": host, "complexity": complexity(model, image_size, files), "records": records}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Time a run's model in PyTorch, ONNX Runtime "
                                                 "and LiteRT (locally and over SSH).")
    parser.add_argument("--run-dir", required=True, help="models/<model>-<loss>")
    parser.add_argument("--out", required=True, help="reports/benchmark/<model>-<loss>.json")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--export-dir", help="the run's exports (default: exports/<model>-<loss>)")
    args = parser.parse_args(argv)

    from pipeline.core.config import load_params
    from pipeline.models.checkpoint import load_model

    cfg = benchmark_config(load_params(args.params))
    run_dir = Path(args.run_dir)
    fold = int(cfg["fold"])
    model, ckpt = load_model(run_dir / f"fold_{fold}" / "best.pt")
    export_dir = Path(args.export_dir) if args.export_dir else Path("exports") / run_dir.name
    result = benchmark_run(model, int(ckpt["image_size"]), export_dir / f"fold_{fold}", cfg)
    result = {"run": run_dir.name, "fold": fold, **result}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s (%d records)", out, len(result["records"]))
    from pipeline.core.review import log_benchmark

    log_benchmark(load_params(args.params), run_dir.name, result)


if __name__ == "__main__":
    from pipeline.core.cli import run_main

    run_main(main)
