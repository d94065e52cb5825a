"""Interruptions: a training killed with SIGKILL mid-run resumes to the same weights and metrics
as an uninterrupted run (CPU), and a killed ``dvc repro`` leaves no stage that a later
``dvc repro`` takes as done.

The tiny projects come from ``tests.conftest.make_tiny_project``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import TRAIN_CMD, make_tiny_project, project_env, train_in_process


def _train_subprocess(cwd: Path, timeout: float = 300) -> None:
    proc = subprocess.run(TRAIN_CMD, cwd=cwd, env=project_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _kill_after_first_epoch(cwd: Path, epochs: int) -> None:
    """Start the training and SIGKILL it as soon as its first epoch's resume state exists."""
    resume_dir = cwd / ".cache" / "resume"
    proc = subprocess.Popen(TRAIN_CMD, cwd=cwd, env=project_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while not list(resume_dir.glob("*/fold_0-*.pt")):
            assert proc.poll() is None, f"training ended before its first epoch: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no resume state after 240 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    state = torch.load(next(resume_dir.glob("*/fold_0-*.pt")), weights_only=False)["state"]
    assert state["epoch"] < epochs - 1, "killed after the last epoch: nothing left to resume"
    assert not (cwd / "models" / "mini_covidnet-ce" / "fold_0" / "metrics.json").exists()


def _outputs(cwd: Path) -> tuple[dict, dict, pd.DataFrame, pd.DataFrame]:
    fold = cwd / "models" / "mini_covidnet-ce" / "fold_0"
    ckpt = torch.load(fold / "best.pt", map_location="cpu", weights_only=False)
    metrics = json.loads((fold / "metrics.json").read_text())
    history = pd.read_csv(fold / "history.csv")
    preds = pd.read_csv(fold / "test_predictions.csv")
    return ckpt, metrics, history, preds


@pytest.mark.parametrize("rerun", ["in_process", pytest.param("subprocess", marks=pytest.mark.slow)])
def test_killed_training_resumes_to_identical_weights(tmp_path, monkeypatch, one_thread, rerun):
    epochs = 4
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"  # one store: created once
    for d in (clean, killed):
        make_tiny_project(d, epochs=epochs, tracking_uri=store)
    train_in_process(clean, monkeypatch)  # the uninterrupted reference

    _kill_after_first_epoch(killed, epochs)
    if rerun == "subprocess":
        _train_subprocess(killed)
    else:
        train_in_process(killed, monkeypatch)
    assert not list((killed / ".cache" / "resume").glob("*/fold_0-*.pt"))  # cleaned up when done

    (ck_a, m_a, h_a, p_a), (ck_b, m_b, h_b, p_b) = _outputs(clean), _outputs(killed)
    assert ck_a["state_dict"].keys() == ck_b["state_dict"].keys()
    for k in ck_a["state_dict"]:
        assert torch.equal(ck_a["state_dict"][k], ck_b["state_dict"][k]), k
    assert {k: v for k, v in ck_a.items() if k != "state_dict"} == \
           {k: v for k, v in ck_b.items() if k != "state_dict"}
    # Wall-clock fields are the only ones allowed to differ.
    assert m_a.pop("train_seconds") > 0 and m_b.pop("train_seconds") > 0
    assert m_a == m_b
    pd.testing.assert_frame_equal(h_a.drop(columns="seconds"), h_b.drop(columns="seconds"),
                                  check_exact=True)
    pd.testing.assert_frame_equal(p_a, p_b, check_exact=True)
    assert len(h_b) == epochs


DVC_YAML = """\
stages:
  prepare:
    cmd: python -c "open('a.txt', 'w').write('a\\n')"
    outs: [a.txt]
  slow:
    cmd: python slow.py
    deps: [a.txt, slow.py]
    outs: [b.txt]
"""
SLOW_PY = """\
import time
with open("b.txt", "w") as f:
    f.write("partial\\n")
    f.flush()
    time.sleep(float(open("sleep_s").read()))
    f.write("complete\\n")
"""


def _dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"
    proc = subprocess.run([dvc, *args], cwd=cwd, env=project_env(), capture_output=True, text=True,
                          timeout=120)
    if check:
        assert proc.returncode == 0, f"dvc {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc


def test_killed_dvc_repro_is_not_taken_as_done(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)  # a scratch repo, not the project's
    _dvc(repo, "init", "-q")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "slow.py").write_text(SLOW_PY)
    (repo / "sleep_s").write_text("60")

    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"
    proc = subprocess.Popen([dvc, "repro"], cwd=repo, env=project_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not (repo / "b.txt").is_file() or (repo / "b.txt").stat().st_size == 0:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "stage 'slow' never started"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # dvc and the stage it runs, as a power cut would
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    lock = yaml.safe_load((repo / "dvc.lock").read_text()) if (repo / "dvc.lock").exists() else {}
    assert "prepare" in lock.get("stages", {}) and "slow" not in lock.get("stages", {})
    status = _dvc(repo, "status", "--json")
    assert "slow" in json.loads(status.stdout)  # changed / not in the lock, never "up to date"
    assert "prepare" not in json.loads(status.stdout)

    (repo / "sleep_s").write_text("0")  # not a dependency: the rerun is not forced by it
    out = _dvc(repo, "repro").stdout
    assert "Running stage 'slow'" in out and "Running stage 'prepare'" not in out
    assert (repo / "b.txt").read_text() == "partial\ncomplete\n"
    assert json.loads(_dvc(repo, "status", "--json").stdout) == {}
