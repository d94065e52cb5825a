"""``pipeline.evaluation.gradcam`` on tiny trained models (a CNN and a capsule network) and a fake run
folder: fold checkpoints, test predictions and frame images written here."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import pipeline.models.classifier
from pipeline.evaluation import gradcam
from pipeline.models.build import build_model
from pipeline.models.checkpoint import load_model, save_checkpoint
from pipeline.models.catalog import default_model_config

SIZE = 64  # Mini-COVIDNet's Grad-CAM layer is 2x2 here (1x1, a flat map, at 32 px)
CLASSES = ["covid", "pneumonia", "healthy"]
CONFIGS = {
    "mini_covidnet": default_model_config("mini_covidnet"),
    # COVID-CAPS' layout with narrow layers: the same capsule code path, a fraction of the cost.
    "covid_caps": {**default_model_config("covid_caps"), "channels": [8, 8, 8, 8],
                   "capsules": [[4, 4]]},
}


def train_tiny(cfg: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg, len(CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.rand(6, 3, SIZE, SIZE), torch.arange(6) % len(CLASSES)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


_TRAINED: dict[str, torch.nn.Module] = {}


def trained(arch: str) -> torch.nn.Module:
    """A tiny trained ``arch``, trained once per session: training dominates this file's run
    time on a shared CPU, and every fold of a fake run may share the weights."""
    if arch not in _TRAINED:
        _TRAINED[arch] = train_tiny(CONFIGS[arch], 20)
    return _TRAINED[arch]


def fake_run(root: Path, arch: str, per_class: tuple[int, ...] = (3, 3, 1)) -> tuple[Path, Path]:
    """A 2-fold run of ``arch`` with test predictions for ``per_class[c]`` frames of class c
    (non-square JPEGs, two frames per video), and the frames folder they live in."""
    run, frames = root / "models" / f"{arch}-ce", root / "frames"
    frames.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for k in (0, 1):
        save_checkpoint(run / f"fold_{k}" / "best.pt", trained(arch), model_cfg=CONFIGS[arch],
                        classes=CLASSES, image_size=SIZE)
    for c, n in enumerate(per_class):
        for i in range(n):
            name = f"{CLASSES[c]}_v{i // 2}__f{i:05d}.jpg"
            img = rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)
            img[20:50, 30:60] = 255  # a bright patch: some structure for the model to respond to
            cv2.imwrite(str(frames / name), img)
            probs = rng.dirichlet(np.ones(len(CLASSES)))
            rows.append({"frame": name, "source": f"{CLASSES[c]}_v{i // 2}.mp4",
                         "patient": f"p{c}{i // 2}", "fold": (c + i // 2) % 2, "y_true": c,
                         "y_pred": int(probs.argmax()),
                         **{f"prob_{cl}": p for cl, p in zip(CLASSES, probs)}})
    table = pd.DataFrame(rows)
    for k in (0, 1):
        table[table["fold"] == k].to_csv(run / f"fold_{k}" / "test_predictions.csv", index=False)
    return run, frames


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_grid_png(tmp_path, arch):
    run, frames = fake_run(tmp_path, arch)
    out = tmp_path / "figs" / "gradcam.png"
    result = gradcam.gradcam_grid(run, 2, out, frames_dir=frames, dpi=50, cell_inches=2.0)
    assert out.is_file() and result["out_png"] == str(out)
    png = cv2.imread(str(out))
    # rows = classes, columns = examples, each cell 2 in at 50 dpi
    assert png.shape[:2] == (3 * 100, 2 * 100) and result["size_px"] == (200, 300)
    assert result["rows"] == 3 and result["cols"] == 2 and result["classes"] == CLASSES
    cells = result["cells"]
    assert [len(r) for r in cells] == [2, 2, 2]
    assert cells[2][1] is None  # the healthy class has one test frame
    preds = pd.concat(pd.read_csv(p) for p in run.glob("fold_*/test_predictions.csv"))
    by_frame = preds.set_index("frame")
    for r, row in enumerate(cells):
        for cell in row:
            if cell is None:
                continue
            assert cell["cam"] and not cell["note"]
            assert cell["y_true"] == r
            expected = by_frame.loc[cell["frame"]]
            assert cell["fold"] == expected["fold"] and cell["y_pred"] == expected["y_pred"]
            assert cell["prob"] == pytest.approx(expected[f"prob_{CLASSES[cell['y_pred']]}"])
    # Two examples of a class come from two different videos.
    assert len({by_frame.loc[c["frame"], "source"] for c in cells[0]}) == 2


def test_cam_is_finite_and_normalised(tmp_path):
    run, frames = fake_run(tmp_path, "mini_covidnet", per_class=(1, 1, 1))
    model, ckpt = load_model(run / "fold_0" / "best.pt")
    rgb = cv2.cvtColor(cv2.imread(str(next(frames.iterdir()))), cv2.COLOR_BGR2RGB)
    image = cv2.resize(rgb, (SIZE, SIZE), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    maxima = []
    for target in range(len(CLASSES)):
        cam = gradcam.compute_cam(model, image, target)
        assert cam.shape == (SIZE, SIZE) and cam.dtype == np.float32
        assert np.isfinite(cam).all() and cam.min() >= 0.0 and cam.max() <= 1.0
        maxima.append(float(cam.max()))
    # min-max normalised: a map reaches 1 unless no location raises the class (all zero)
    assert all(m == 0.0 or m == pytest.approx(1.0, abs=1e-5) for m in maxima)
    assert max(maxima) == pytest.approx(1.0, abs=1e-5)
    shown = gradcam.overlay(rgb, cam)
    assert shown.shape == rgb.shape and shown.dtype == np.uint8


def test_capsule_cam_is_spatial():
    model = trained("covid_caps")
    images = np.random.default_rng(1).integers(0, 256, (2, 3, SIZE, SIZE), dtype=np.uint8)
    cams = gradcam.compute_cams(model, images, [0, 2])
    assert cams.shape == (2, SIZE, SIZE) and np.isfinite(cams).all()
    assert cams.min() >= 0 and cams.max() <= 1 and cams.std() > 0


def test_no_spatial_map_falls_back(tmp_path, monkeypatch, caplog):
    model = trained("mini_covidnet")
    image = np.zeros((3, SIZE, SIZE), np.uint8)
    with pytest.raises(gradcam.CamUnavailable, match="not a spatial"):
        gradcam.compute_cam(model, image, 0, layer=model.head.fc1)
    # The grid still gets drawn: plain frames, a note per cell, one warning.
    run, frames = fake_run(tmp_path, "mini_covidnet", per_class=(1, 1, 1))
    monkeypatch.setattr(pipeline.models.classifier, "gradcam_target_layer", lambda m: m.head.fc1)
    with caplog.at_level("WARNING", logger="pipeline.evaluation.gradcam"):
        result = gradcam.gradcam_grid(run, 1, tmp_path / "g.png", frames_dir=frames, dpi=40)
    assert (tmp_path / "g.png").is_file()
    cells = [row[0] for row in result["cells"]]
    assert all(not c["cam"] and "not a spatial" in c["note"] for c in cells)
    assert sum("no heat map" in r.message for r in caplog.records) == 1


def test_cli_errors(tmp_path, capsys):
    missing = tmp_path / "models" / "none-ce"
    assert gradcam.main(["--run-dir", str(missing), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "dvc repro" in err
    run, _ = fake_run(tmp_path, "mini_covidnet", per_class=(1, 1, 1))
    rc = gradcam.main(["--run-dir", str(run), "--out", str(tmp_path / "x.png"),
                       "--frames-dir", str(tmp_path / "nowhere")])
    assert rc == 2 and "extract_frames" in capsys.readouterr().err
