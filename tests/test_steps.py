"""The training step, eager and as a CUDA graph (``train.cuda_graph``, ``pipeline/training/steps.py``).

On the CPU: the learning rate set in place reaches Adam's update, the graph step refuses an
optimizer it could not replay, ``train.cuda_graph`` leaves CPU training exactly as it was, the
throughput benchmark records how its steps ran, and ``train.cpu_amp`` trains a fold in bf16 and
channels-last where the CPU has native bf16 (and is refused where it has not). On a CUDA device (marked ``gpu``): the
replayed step trains a model to the same weights as eager steps, through a learning-rate change
and a partial batch, and a whole fold trains with its steps captured.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch import nn

import pipeline.training.steps as steps
from pipeline.core.config import ConfigError
from pipeline.training.steps import (
    CudaGraphStep,
    current_lr,
    make_adam,
    precision,
    set_lr,
    small_net,
)
from tests.conftest import make_tiny_project

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_set_lr_changes_a_tensor_learning_rate_in_place_and_the_update_follows_it():
    w = nn.Parameter(torch.zeros(4))
    lr = torch.tensor(0.1)
    opt = torch.optim.Adam([w], lr=lr, foreach=False)
    set_lr(opt, 0.01)
    assert opt.param_groups[0]["lr"] is lr and current_lr(opt) == pytest.approx(0.01)
    w.grad = torch.tensor([1.0, -2.0, 3.0, -4.0])
    opt.step()
    # Adam's first step moves each weight by lr against the sign of its gradient.
    assert torch.allclose(w.detach(), torch.tensor([-0.01, 0.01, -0.01, 0.01]), atol=1e-6)

    opt_float = make_adam([nn.Parameter(torch.zeros(1))], 0.1, (0.9, 0.999), 0.0,
                          torch.device("cpu"), cuda_graph=True)  # CPU: float lr, not capturable
    set_lr(opt_float, 0.5)
    assert opt_float.param_groups[0]["lr"] == 0.5
    assert not opt_float.param_groups[0]["capturable"]


def test_graph_step_refuses_an_optimizer_that_is_not_capturable():
    model = small_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="capturable=True"):
        CudaGraphStep(model, nn.CrossEntropyLoss(), opt, batch_size=4, amp=False)


def test_cuda_graph_key_leaves_cpu_training_unchanged(tmp_path, monkeypatch, caplog, one_thread):
    """``train.cuda_graph: true`` on a CPU trains with the same eager steps: same history and
    test probabilities, bit for bit, as the key off."""
    from pipeline.stages.train import run

    outputs = {}
    for flag in (False, True):
        root = tmp_path / str(flag)
        root.mkdir()
        params = make_tiny_project(root, epochs=2)
        params["train"]["cuda_graph"] = flag
        monkeypatch.chdir(root)
        with caplog.at_level("INFO", logger="pipeline.training.fold"):
            run(params, "mini_covidnet", "ce", [0])
        fold = root / "models" / "mini_covidnet-ce" / "fold_0"
        metrics = json.loads((fold / "metrics.json").read_text())
        assert "cuda_graph" not in metrics  # no graph step ran
        outputs[flag] = (pd.read_csv(fold / "history.csv").drop(columns="seconds"),
                         pd.read_csv(fold / "test_predictions.csv"))
    assert "train.cuda_graph is for CUDA devices; eager steps on cpu" in caplog.text
    pd.testing.assert_frame_equal(outputs[False][0], outputs[True][0])
    pd.testing.assert_frame_equal(outputs[False][1], outputs[True][1])


def test_throughput_records_eager_steps_on_cpu():
    from pipeline.core.config import apply_overrides, compose
    from pipeline.throughput import measure, step_kind

    params = apply_overrides(compose(["experiment=paper"]),
                             ["train.image_size=32", "train.device=cpu", "train.cuda_graph=true"])
    r = measure(params, "covid_caps", 4, "random", steps=2, warmup=1, cuda_graph=True)
    assert r["images_per_s"] > 0 and r["image_size"] == 32 and r["steps"] == 2
    assert r["cuda_graph"] is False  # no CUDA here: eager steps, and the record says so
    assert step_kind(r) == "eager" and step_kind({"cuda_graph": True}) == "cuda graph"


def test_amp_applies_on_cuda_and_on_a_cpu_only_when_asked_channels_last_everywhere(monkeypatch):
    on = {"amp": True, "channels_last": True, "cpu_amp": False}
    cuda_dev, cpu = torch.device("cuda"), torch.device("cpu")
    assert precision(on, cuda_dev) == (True, True)
    assert precision({**on, "amp": False}, cuda_dev) == (False, True)
    assert precision(on, cpu) == (False, True)  # cpu_amp off: no autocast, channels-last kept
    assert precision({**on, "channels_last": False}, cpu) == (False, False)
    monkeypatch.setattr(steps, "cpu_bf16_supported", lambda: True)
    assert precision({**on, "cpu_amp": True}, cpu) == (True, True)
    monkeypatch.setattr(steps, "cpu_bf16_supported", lambda: False)
    with pytest.raises(ConfigError, match="train.cpu_amp=true.*no native bf16"):
        precision({**on, "cpu_amp": True}, cpu)
    # Without autocast, channels-last needs no bf16.
    assert precision({"amp": False, "channels_last": True, "cpu_amp": True}, cpu) == (False, True)


@pytest.mark.skipif(not steps.cpu_bf16_supported(), reason="this CPU has no native bf16")
def test_cpu_amp_trains_a_fold_in_bf16_and_channels_last_and_records_it(tmp_path, monkeypatch, one_thread):
    from pipeline.stages.train import run

    outputs = {}
    for flag in (False, True):
        root = tmp_path / str(flag)
        root.mkdir()
        params = make_tiny_project(root, epochs=2)
        params["train"].update(amp=True, channels_last=True, cpu_amp=flag)
        monkeypatch.chdir(root)
        run(params, "mini_covidnet", "ce", [0])
        fold = root / "models" / "mini_covidnet-ce" / "fold_0"
        metrics = json.loads((fold / "metrics.json").read_text())
        assert metrics["precision"] == {"amp_bf16": flag, "channels_last": True}
        history = pd.read_csv(fold / "history.csv")
        assert history[["train_loss", "val_loss"]].notna().all().all()
        outputs[flag] = history
    # bf16 arithmetic: the same seeds and batches give other losses than fp32.
    assert not outputs[False]["train_loss"].equals(outputs[True]["train_loss"])


@pytest.mark.gpu
@cuda
def test_graph_replay_trains_to_the_same_weights_as_eager_steps():
    from pipeline.training.steps import main, parity_check

    torch.backends.cudnn.deterministic = True
    r = parity_check(torch.device("cuda"))
    # 3 warm-up steps, the capture and its replay + 1, a partial batch (eager), 2 replays
    assert r["captured"] and not r["failed"]
    assert r["calls"] == {"warmup": 3, "replay": 5, "eager": 1}
    assert r["max_loss_diff"] < 1e-5 and r["max_weight_diff"] < 1e-5
    assert r["lr"] == pytest.approx(1e-4)  # the change made after capture reached the graph
    assert main(["--check"]) == 0


@pytest.mark.gpu
@cuda
def test_a_fold_trains_with_its_steps_captured(tmp_path, monkeypatch):
    from pipeline.stages.train import run

    params = make_tiny_project(tmp_path, epochs=3)
    params["train"].update(device="cuda", amp=True, channels_last=True, cuda_graph=True)
    monkeypatch.chdir(tmp_path)
    run(params, "mini_covidnet", "ce", [0])
    metrics = json.loads((tmp_path / "models" / "mini_covidnet-ce" / "fold_0" / "metrics.json")
                         .read_text())
    graph = metrics["cuda_graph"]
    assert graph["captured"] and not graph["failed"] and graph["steps"]["replay"] > 0
    history = pd.read_csv(tmp_path / "models" / "mini_covidnet-ce" / "fold_0" / "history.csv")
    assert history["train_loss"].notna().all() and len(history) == 3


def test_predictions_are_float32_when_training_steps_run_in_bf16():
    """A learner that trains under bf16 autocast (``amp``) still predicts in float32: its
    logits equal the float32 model's exactly (autocast would round them to bf16 precision)."""
    from pipeline.training.loop import Learner

    model = steps.small_net()
    opt = make_adam(model.parameters(), 1e-3, (0.9, 0.999), 0.0, torch.device("cpu"))
    learner = Learner(model, nn.CrossEntropyLoss(), opt, torch.device("cpu"), amp=True)
    images = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval()(images.float() / 255)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = model(images.float() / 255).float()
    assert not torch.equal(rounded, want)  # bf16 autocast does move these logits
    assert torch.equal(learner.logits(images), want)
