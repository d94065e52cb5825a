"""Latency records (PyTorch, ONNX Runtime, LiteRT), complexity, and the SSH remote runner against
a throwaway sshd on 127.0.0.1."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from pipeline.core.config import compose
from pipeline.core.tracking import free_port
from pipeline.deploy import edge_runner, formats
from pipeline.models import complexity
from pipeline.stages import benchmark

SIZE = 32
RUNS = {"runs": 3, "warmup": 1}
BENCHMARK = compose([])["benchmark"]  # conf/config.yaml's group, which the tests shrink
RECORD_FIELDS = {"format", "runtime", "runtime_version", "threads", "batch", "image_size",
                 "median_ms", "p90_ms", "mean_ms", "min_ms", "max_ms", "runs", "warmup",
                 "device_type", "host", "device"}
DEVICE_FIELDS = {"cpu", "cores", "machine", "system", "python", "hostname"}


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model()
    out = tmp_path_factory.mktemp("export")
    x = torch.rand(4, 3, SIZE, SIZE)
    formats.export_model(model, out, SIZE, x, formats=["onnx", "tflite_fp32", "tflite_int8_dynamic"])
    return model, out


def check_record(r: dict, host: str = "local") -> None:
    assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
    assert DEVICE_FIELDS <= set(r["device"])
    assert r["host"] == host and r["batch"] == 1 and r["image_size"] == SIZE
    assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["max_ms"]


def test_torch_records_restore_the_thread_count():
    before = torch.get_num_threads()
    records = benchmark.benchmark_torch(tiny_model(), SIZE, threads=[1, 2], **RUNS)
    assert [r["threads"] for r in records] == [1, 2] and torch.get_num_threads() == before
    for r in records:
        check_record(r)
        assert r["format"] == "torch_eager" and r["runtime_version"] == torch.__version__


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_cuda_record():
    (r,) = benchmark.benchmark_torch(tiny_model(), SIZE, device="cuda", **RUNS)
    check_record(r)
    assert r["device_type"] == "cuda" and r["device"]["gpu"]


def test_exported_files_each_in_their_own_runner_process(exported):
    _, out = exported
    files = [out / "model.onnx", out / "model_int8_dynamic.tflite"]
    records = benchmark.benchmark_files(files, SIZE, threads=[1, 2], **RUNS)
    assert [(r["format"], r["threads"]) for r in records] == [
        ("onnx", 1), ("onnx", 2), ("tflite_int8_dynamic", 1), ("tflite_int8_dynamic", 2)]
    for r in records:
        check_record(r)
        assert r["peak_rss_bytes"] > 10 * 2**20 and r["size_bytes"] > 0
    assert {r["runtime"] for r in records} == {"onnxruntime", "ai_edge_litert"}


def test_benchmark_run_has_complexity_and_skips_missing_formats(exported, caplog):
    model, out = exported
    cfg = benchmark.benchmark_config({"benchmark": {**BENCHMARK, **RUNS,
                                                     "threads": [1, "all"]}})
    result = benchmark.benchmark_run(model, SIZE, out, cfg)
    formats = {r["format"] for r in result["records"]}
    assert formats == {"torch_eager", "onnx", "tflite_fp32", "tflite_int8_dynamic"}
    assert "model_fp16.tflite" in caplog.text  # not exported: warned about, not timed
    assert result["complexity"]["params"] == sum(p.numel() for p in model.parameters())
    assert set(result["complexity"]["file_size_bytes"]) == formats - {"torch_eager"}
    assert result["host"]["cores"] >= 1


def test_complexity_of_a_conv_and_a_dense_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 2))
    c = complexity.complexity(model, 8, files={"onnx": "/nonexistent.onnx"})
    assert c["params"] == c["trainable_params"] == (3 * 4 * 9 + 4) + (256 * 2 + 2)
    assert c["macs"] == 8 * 8 * 4 * 27 + 256 * 2 and c["flops"] == 2 * c["macs"]
    assert c["weights_bytes"] == 4 * c["params"]
    # input + conv output (the in-place-free ReLU makes a new tensor) + relu + flatten view
    # shares storage with relu + linear output
    assert c["activation_bytes"] == 4 * (3 * 64 + 4 * 64 + 4 * 64 + 2)
    assert c["memory_bytes"] == c["weights_bytes"] + c["activation_bytes"]
    assert c["file_size_bytes"] == {}


def test_flops_follow_the_published_convention_for_mobilenet_v1():
    timm = pytest.importorskip("timm")
    model = timm.create_model("mobilenetv1_100", pretrained=False, num_classes=1000)
    macs = complexity.count_flops(model, 224)["macs"]
    assert 565e6 < macs < 575e6  # MobileNet v1 1.0-224: 569 M multiply-adds (Howard et al.)


def test_helpers():
    assert benchmark.resolve_threads([1, "all", 4], cores=4) == [1, 4]
    with pytest.raises(ValueError, match="threads"):
        benchmark.resolve_threads([0], cores=2)
    with pytest.raises(RuntimeError, match="boom"):
        benchmark.parse_runner_output("noise\n", "Traceback ... boom")
    assert edge_runner.format_of("a/model_int8_full.tflite") == "tflite_int8_full"
    assert edge_runner.format_of("model.tflite") == "tflite_fp32"
    with pytest.raises(ValueError, match="unknown key 'benchmark.thread'.*valid keys.*threads"):
        benchmark.benchmark_config({"benchmark": {**BENCHMARK, "thread": [1]}})
    with pytest.raises(ValueError, match="benchmark.formats.*tflite_int4.*valid"):
        benchmark.benchmark_config({"benchmark": {**BENCHMARK, "formats": ["tflite_int4"]}})
    target = benchmark.RemoteTarget.from_params({"host": "pi@pi.local", "port": 2222})
    assert target.port == 2222 and target.python == "python3"
    with pytest.raises(ValueError, match="remote.*valid"):
        benchmark.RemoteTarget.from_params({"hostname": "pi"})


def test_main_writes_the_report(exported, tmp_path, monkeypatch):
    import pipeline.models.checkpoint

    model, out = exported
    shutil.copytree(out, tmp_path / "exports" / "tiny-ce" / "fold_0")
    monkeypatch.setattr(pipeline.models.checkpoint, "load_model",
                        lambda path: (model, {"image_size": SIZE, "classes": list("abc")}))
    params = {"benchmark": {**BENCHMARK, **RUNS, "threads": [1], "formats": ["onnx"],
                            "cuda": False}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    benchmark.main(["--run-dir", "models/tiny-ce", "--out", "reports/benchmark/tiny-ce.json"])
    report = json.loads((tmp_path / "reports/benchmark/tiny-ce.json").read_text())
    assert report["run"] == "tiny-ce" and report["fold"] == 0
    assert [(r["format"], r["threads"]) for r in report["records"]] == [("torch_eager", 1),
                                                                         ("onnx", 1)]
    assert report["complexity"]["flops"] > 0


# ------------------------------------------------------------------------- SSH remote
@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An sshd on 127.0.0.1:<free port> with a throwaway host key, accepting one throwaway user
    key for the current user. CI installs Debian's openssh-server + openssh-client. Skips only
    where no sshd can be started (or logged into with plain ssh); the tests then use the
    project's runner (``benchmark.RemoteTarget``), whose errors fail them."""
    binary = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
                                           if os.path.exists(p)), None)
    if binary is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("sshd/ssh not installed (apt-get install openssh-server openssh-client)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                       check=True)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    port = free_port()
    (d / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {d / 'authorized_keys'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
""")
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen([binary, "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.skip(f"sshd exited at start: {(d / 'sshd.log').read_text()[-500:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.skip("sshd did not start listening within 15 s")
                time.sleep(0.2)
        options = ("BatchMode=yes", "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null",
                   "LogLevel=ERROR", "ConnectTimeout=10")
        host = f"{getpass.getuser()}@127.0.0.1"
        # The login is probed with plain ssh, not the project's runner: a runner that breaks
        # fails the tests below instead of skipping them.
        probe = subprocess.run(["ssh", "-p", str(port), "-i", str(d / "user_key"),
                                *(a for o in options for a in ("-o", o)), host, "true"],
                               capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            pytest.skip(f"the test sshd lets no ssh login as {host}: {probe.stderr.strip()[-300:]}")
        yield benchmark.RemoteTarget(host=host, port=port, key=str(d / "user_key"),
                                     python=sys.executable, workdir=str(d / "remote work"),
                                     name="test-device", options=options)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_remote_runner_over_ssh(exported, sshd):
    _, out = exported
    files = [out / "model.onnx", out / "model_fp32.tflite"]
    records = benchmark.benchmark_remote(files, SIZE, sshd, threads=[1, "all"], **RUNS)
    cores = edge_runner.device_info()["cores"]
    expected_threads = [1] if cores == 1 else [1, cores]
    assert [(r["format"], r["threads"]) for r in records] == (
        [("onnx", t) for t in expected_threads] + [("tflite_fp32", t) for t in expected_threads])
    for r in records:
        check_record(r, host="test-device")
        assert r["peak_rss_bytes"] > 0
    # The copies are removed afterwards; the work folder (with a space in its name) stays.
    assert list(Path(sshd.workdir).iterdir()) == []


def test_remote_failure_shows_the_remote_error(exported, sshd):
    _, out = exported
    broken = benchmark.RemoteTarget(**{**sshd.__dict__, "python": "/nonexistent/python"})
    with pytest.raises(RuntimeError, match="(?s)nonexistent/python.*No such file"):
        benchmark.benchmark_remote([out / "model.onnx"], SIZE, broken, **RUNS)


def test_benchmark_run_with_a_remote_device(exported, sshd):
    import dataclasses

    model, out = exported
    remote = {**dataclasses.asdict(sshd), "formats": ["tflite_fp32"]}
    cfg = benchmark.benchmark_config({"benchmark": {
        **BENCHMARK, **RUNS, "threads": [1], "torch": False, "formats": ["onnx", "tflite_fp32"],
        "remote": remote}})
    result = benchmark.benchmark_run(model, SIZE, out, cfg)
    assert [(r["host"], r["format"]) for r in result["records"]] == [
        ("local", "onnx"), ("local", "tflite_fp32"), ("test-device", "tflite_fp32")]
