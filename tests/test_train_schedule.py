"""Learning-rate schedules (MedMNIST's step schedule, the plateau switch) and the resize
interpolation that a run trains with and records in its checkpoints."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.core.config import ConfigError
from pipeline.data.loading import FrameStore, decode_frames, resize_square
from pipeline.training.schedule import lr_milestones, milestones_passed
from tests.conftest import make_tiny_project
from tests.test_resume import _train_in_process


def test_milestones_count_as_multisteplr():
    # MultiStepLR(milestones=[50, 75]) with scheduler.step() after each epoch: epochs 0-49 at
    # the base rate, 50-74 at x0.1, 75+ at x0.01.
    ms, factor = lr_milestones({"lr_steps": {"milestones": [75, 50], "factor": 0.1}})
    assert (ms, factor) == ([50, 75], 0.1)
    assert [milestones_passed(ms, e) for e in (0, 49, 50, 74, 75, 99)] == [0, 0, 1, 1, 2, 2]
    assert lr_milestones({}) == ([], 0.1)  # configs without the key keep their schedule
    with pytest.raises(ConfigError, match="lr_steps.milestones"):
        lr_milestones({"lr_steps": {"milestones": [0, 10]}})


def test_training_follows_the_step_schedule_and_a_factor_one_plateau_is_off(tmp_path, monkeypatch):
    params = make_tiny_project(tmp_path, epochs=4)
    params["train"]["lr_steps"] = {"milestones": [1, 3], "factor": 0.1}
    # Patience 1 with a real factor would cut the rate after any stalled epoch; factor 1 is off.
    params["train"]["lr_plateau"] = {"factor": 1.0, "patience": 1}
    params["train"]["optimizer"]["decay"] = 0.0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _train_in_process(tmp_path, monkeypatch)

    history = pd.read_csv(tmp_path / "models" / "mini_covidnet-ce" / "fold_0" / "history.csv")
    base = params["train"]["optimizer"]["lr"]
    np.testing.assert_allclose(history["lr"], [base, base * 0.1, base * 0.1, base * 0.01])
    ckpt = torch.load(tmp_path / "models" / "mini_covidnet-ce" / "fold_0" / "best.pt",
                      weights_only=False)
    assert ckpt["interpolation"] == params["dataset"]["resize_interpolation"] == "area"


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
