"""The training schedule and the resize interpolation a run trains with and records in its
checkpoints.

Schedules: the study's protocol (``conf/train/paper.yaml``, Keras callbacks in its notebooks):
early stopping on the validation loss with the best epoch's weights restored, the rate x0.1 after
``lr_plateau.patience`` stalled epochs, time-based decay ``lr / (1 + decay * step)``; and
MedMNIST's step schedule. Each is checked against sequences worked out by hand, then on a tiny
model trained by the real loop and by the train stage.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.core.config import ConfigError
from pipeline.data.loading import FrameStore, decode_frames, resize_square
from pipeline.training.loop import EpochPlan, Learner, ResumeFile, fit
from pipeline.training.schedule import (
    Schedule,
    ScheduleState,
    lr_milestones,
    milestones_passed,
)
from pipeline.training.steps import small_net
from tests.conftest import PROJECT_ROOT, make_tiny_project, train_in_process

PAPER = yaml.safe_load((PROJECT_ROOT / "conf" / "train" / "paper.yaml").read_text())


def test_milestones_count_as_multisteplr():
    # MultiStepLR(milestones=[50, 75]) with scheduler.step() after each epoch: epochs 0-49 at
    # the base rate, 50-74 at x0.1, 75+ at x0.01.
    ms, factor = lr_milestones({"lr_steps": {"milestones": [75, 50], "factor": 0.1}})
    assert (ms, factor) == ([50, 75], 0.1)
    assert [milestones_passed(ms, e) for e in (0, 49, 50, 74, 75, 99)] == [0, 0, 1, 1, 2, 2]
    assert lr_milestones({"lr_steps": {"milestones": [], "factor": 0.1}}) == ([], 0.1)
    with pytest.raises(ConfigError, match="lr_steps.milestones"):
        lr_milestones({"lr_steps": {"milestones": [0, 10], "factor": 0.1}})


def test_training_follows_the_step_schedule_and_a_factor_one_plateau_is_off(tmp_path, monkeypatch):
    params = make_tiny_project(tmp_path, epochs=4)
    params["train"]["lr_steps"] = {"milestones": [1, 3], "factor": 0.1}
    # Patience 1 with a real factor would cut the rate after any stalled epoch; factor 1 is off.
    params["train"]["lr_plateau"] = {"factor": 1.0, "patience": 1}
    params["train"]["optimizer"]["decay"] = 0.0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    train_in_process(tmp_path, monkeypatch)

    history = pd.read_csv(tmp_path / "models" / "mini_covidnet-ce" / "fold_0" / "history.csv")
    base = params["train"]["optimizer"]["lr"]
    np.testing.assert_allclose(history["lr"], [base, base * 0.1, base * 0.1, base * 0.01])
    ckpt = torch.load(tmp_path / "models" / "mini_covidnet-ce" / "fold_0" / "best.pt",
                      weights_only=False)
    assert ckpt["interpolation"] == params["dataset"]["resize_interpolation"] == "area"


def _schedule(**kw) -> Schedule:
    base = {"base_lr": 1e-2, "decay": 0.0, "stop_patience": 100, "plateau_factor": 1.0,
            "plateau_patience": 1}
    return Schedule(**{**base, **kw})


def _replay(schedule: Schedule, val_losses, model=None):
    """Epochs as the loop runs them, with the given validation losses: the rate scale used in
    each epoch run, the plateau cuts, and the state at the end. ``model``'s weight is set to
    the epoch number before each epoch ends, so the kept best weights name their epoch."""
    model = model or torch.nn.Linear(1, 1, bias=False)
    state, scales, cuts = ScheduleState(), [], []
    for epoch, loss in enumerate(val_losses):
        if schedule.stopped(state):
            break
        scales.append(schedule.epoch_scale(state, epoch))
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        if schedule.end_epoch(state, epoch, loss, model):
            cuts.append(epoch)
    return scales, cuts, state


def test_early_stopping_ends_after_patience_stalled_epochs_and_keeps_the_best_weights():
    # patience 3: epoch 1 is the best (0.8); 2, 3 (equal is no improvement) and 4 stall, so
    # training stops after epoch 4 and epochs 5-6 never run.
    losses = [1.0, 0.8, 0.9, 0.8, 0.85, 0.1, 0.1]
    scales, cuts, state = _replay(_schedule(stop_patience=3), losses)
    assert len(scales) == 5 and state.epoch == 4
    assert (state.best_epoch, state.best_loss, state.stop_wait) == (1, 0.8, 3)
    assert state.best_state["weight"].item() == 1.0  # a copy taken at epoch 1, not the live weights
    assert scales == [1.0] * 5 and cuts == []  # the plateau schedule is off (factor 1)
    # A new best resets the count: 1 stall, a best, 2 stalls -> still running.
    _, _, state = _replay(_schedule(stop_patience=3), [1.0, 1.1, 0.9, 0.95, 0.96])
    assert not _schedule(stop_patience=3).stopped(state) and state.stop_wait == 2


def test_plateau_multiplies_the_rate_after_patience_stalled_epochs_then_counts_afresh():
    # patience 2, x0.1: stalls at 1, 2 -> cut after epoch 2; best at 3; stalls 4, 5 -> cut;
    # stalls 6, 7 -> cut; best at 8. The early-stopping counter is separate and keeps counting.
    losses = [1.0, 1.1, 1.2, 0.9, 0.95, 0.96, 0.97, 0.98, 0.5]
    scales, cuts, state = _replay(_schedule(plateau_factor=0.1, plateau_patience=2), losses)
    np.testing.assert_allclose(scales, [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-12)
    assert cuts == [2, 5, 7] and state.plateau_wait == 0 and state.best_epoch == 8
    # Factor 1 is off: the same stalls cut nothing.
    scales, cuts, _ = _replay(_schedule(plateau_factor=1.0, plateau_patience=2), losses)
    assert scales == [1.0] * len(losses) and cuts == []


def test_time_based_decay_counts_steps_over_the_whole_run_on_top_of_the_plateau_scale():
    # The paper's Adam: lr 1e-4, decay 2e-6 (Keras: lr / (1 + decay * iterations)).
    paper = Schedule.from_config(PAPER)
    state = ScheduleState()
    assert paper.step_lr(state, 1.0) == 1e-4  # the first step runs at the base rate
    state.step = 5000
    assert paper.step_lr(state, 1.0) == pytest.approx(1e-4 / 1.01, rel=1e-12)
    assert paper.step_lr(state, 0.1) == pytest.approx(1e-5 / 1.01, rel=1e-12)  # after one cut
    # The paper protocol's stopping and plateau rules, as the config gives them.
    assert (paper.stop_patience, paper.plateau_factor, paper.plateau_patience) == (
        PAPER["early_stopping"]["patience"], PAPER["lr_plateau"]["factor"],
        PAPER["lr_plateau"]["patience"])
    # With milestones the steps multiply in too.
    steps = _schedule(base_lr=0.01, decay=0.1, milestones=(2,), step_factor=0.5)
    state = ScheduleState(step=10, lr_scale=0.1)
    assert steps.epoch_scale(state, 1) == pytest.approx(0.1)
    assert steps.epoch_scale(state, 2) == pytest.approx(0.05)
    assert steps.step_lr(state, steps.epoch_scale(state, 2)) == pytest.approx(0.01 * 0.05 / 2)


def _tiny_plan(epochs: int) -> EpochPlan:
    gen = torch.Generator().manual_seed(0)
    images = {s: torch.randint(0, 256, (n, 3, 12, 12), generator=gen, dtype=torch.uint8)
              for s, n in (("train", 24), ("val", 12))}
    labels = {s: torch.randint(0, 3, (len(x),), generator=gen) for s, x in images.items()}
    still = {"rotation": 0, "shift": 0.0, "hflip": False, "vflip": False}
    return EpochPlan(images, labels, epochs=epochs, batch_size=8, augment=still, seed=1, fold=0)


@pytest.mark.usefixtures("one_thread")
def test_fit_stops_early_and_restores_the_best_epochs_weights(tmp_path):
    # Random validation labels and a high rate: the validation loss soon stops improving.
    model = small_net()
    learner = Learner(model, torch.nn.CrossEntropyLoss(),
                      torch.optim.Adam(model.parameters(), lr=0.05), torch.device("cpu"))
    plan, patience = _tiny_plan(epochs=40), 2
    snapshots = {}

    def snapshot(row):  # the weights each epoch ended with, before any restore
        snapshots[row["epoch"]] = {k: v.clone() for k, v in model.state_dict().items()}

    resume = ResumeFile(tmp_path / "resume.pt")
    state = fit(learner, plan, _schedule(base_lr=0.05, stop_patience=patience), ScheduleState(),
                resume, on_epoch=snapshot)
    val = [h["val_loss"] for h in state.history]
    best = int(np.argmin(val))
    assert len(val) == best + patience + 1 < plan.epochs  # stopped early, patience after the best
    assert state.best_epoch == best and state.best_loss == val[best]
    final = model.state_dict()
    for k, v in snapshots[best].items():  # weights and BatchNorm statistics of the best epoch
        assert torch.equal(final[k], v), k
    assert not all(torch.equal(final[k], v) for k, v in snapshots[len(val) - 1].items())
    assert learner.evaluate(plan.images["val"], plan.labels["val"])[0] == pytest.approx(val[best],
                                                                                         abs=1e-6)
    # The resume file holds the last epoch's state, as a plain dict (the resume layout).
    saved = torch.load(resume.path, weights_only=False)["state"]
    assert isinstance(saved, dict) and saved["epoch"] == len(val) - 1
    assert set(saved) == set(ScheduleState().as_dict())


def _keras_lrs(val_losses, steps_per_epoch, base, decay, factor, patience):
    """The rate of each epoch's last step under Keras' ReduceLROnPlateau (x factor once
    ``patience`` epochs passed without a lower validation loss) and Adam's time-based decay."""
    out, scale, best, wait = [], 1.0, float("inf"), 0
    for epoch, loss in enumerate(val_losses):
        last_step = steps_per_epoch * (epoch + 1) - 1
        out.append(base * scale / (1 + decay * last_step))
        if loss < best:
            best, wait = loss, 0
        else:
            wait += 1
            if wait >= patience:
                scale, wait = scale * factor, 0
    return out


@pytest.mark.usefixtures("one_thread")
def test_train_stage_follows_the_paper_protocol_on_a_tiny_project(tmp_path, monkeypatch):
    params = make_tiny_project(tmp_path, epochs=12)
    params["train"]["optimizer"].update(lr=3e-3, decay=0.05)
    params["train"].update(early_stopping={"patience": 3},
                           lr_plateau={"factor": 0.1, "patience": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    train_in_process(tmp_path, monkeypatch)

    fold = tmp_path / "models" / "mini_covidnet-ce" / "fold_0"
    history = pd.read_csv(fold / "history.csv")
    val = history["val_loss"].to_numpy()
    best = int(np.argmin(val))
    # Early stopping, patience 3; the 3 stalled epochs also cut the rate (plateau patience 1).
    assert len(history) == best + 3 + 1 < 12
    steps_per_epoch = 24 // 8  # 2 patients x 3 classes x 4 frames, batch 8
    np.testing.assert_allclose(history["lr"], _keras_lrs(val, steps_per_epoch, 3e-3, 0.05, 0.1, 1),
                               rtol=1e-9)
    ckpt = torch.load(fold / "best.pt", weights_only=False)
    assert ckpt["epoch"] == best
    # The saved predictions come from the restored weights: their loss is the best epoch's.
    preds = pd.read_csv(fold / "val_predictions.csv")
    probs = preds[[f"prob_{c}" for c in params["dataset"]["classes"]]].to_numpy()
    ce = -np.log(probs[np.arange(len(preds)), preds["y_true"]]).mean()
    assert ce == pytest.approx(val[best], rel=1e-5)
    metrics = json.loads((fold / "metrics.json").read_text())
    assert (metrics["best_epoch"], metrics["epochs_run"]) == (best, len(history))


def _checker(path, size=4):
    img = np.zeros((size, size, 3), np.uint8)
    img[::2, ::2] = 255
    img[1::2, 1::2] = 255
    cv2.imwrite(str(path), img)
    return img


def test_nearest_enlarges_pixels_into_blocks_and_area_interpolates(tmp_path):
    small = _checker(tmp_path / "a.png")
    near = decode_frames([tmp_path / "a.png"], 10, "nearest")[0]
    assert set(np.unique(near)) == {0, 255}  # no new grey levels
    area = decode_frames([tmp_path / "a.png"], 10, "area")[0]
    assert 128 in np.unique(area)  # a non-integer factor blends neighbours
    # At an integer factor (MedMNIST's 28 -> 224 is x8) OpenCV's area resize is nearest.
    np.testing.assert_array_equal(decode_frames([tmp_path / "a.png"], 16, "area"),
                                  decode_frames([tmp_path / "a.png"], 16, "nearest"))
    np.testing.assert_array_equal(decode_frames([tmp_path / "a.png"], 16, "nearest")[0, 0, ::4, ::4],
                                  small[:, :, 0])
    with pytest.raises(ValueError, match="resize_interpolation='cubic'"):
        resize_square(small, 16, "cubic")


def test_frame_cache_is_kept_apart_per_interpolation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _checker(tmp_path / "a.png")
    frames = pd.DataFrame({"frame": ["a.png"]})
    near = FrameStore(tmp_path, frames, 10, "nearest").tensor(["a.png"])
    area = FrameStore(tmp_path, frames, 10).tensor(["a.png"])
    assert not torch.equal(near, area)
    assert len(list((tmp_path / ".cache" / "frames").glob("*.npy"))) == 2
    # Read back from the cache, each keeps its own pixels.
    assert torch.equal(FrameStore(tmp_path, frames, 10, "nearest").tensor(["a.png"]), near)
    assert torch.equal(FrameStore(tmp_path, frames, 10, "area").tensor(["a.png"]), area)
