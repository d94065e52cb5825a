"""``pipeline.predict`` end to end: a tiny trained 2-fold run, real and generated videos, both
backends (PyTorch checkpoints and ONNX Runtime on files exported here), and the user errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline import predict
from pipeline.data.frames import sample_indices, to_rgb8
from pipeline.evaluation.aggregation import ensemble_probabilities
from pipeline.models.build import build_model
from pipeline.models.checkpoint import load_model, save_checkpoint
from pipeline.models.catalog import default_model_config
from tests.conftest import SHARED_LUS, require_shared_lus, write_video

SIZE = 32
CLASSES = ["covid", "pneumonia", "healthy"]
FOLDS = (0, 1)
FALLBACK_RATE = predict.FALLBACK_RATE_HZ
REAL_VIDEO = SHARED_LUS / "pocus_videos" / "convex" / "Cov_combatting_Image1.mp4"


def train_tiny(seed: int) -> torch.nn.Module:
    """Mini-COVIDNet after two Adam steps on random frames: trained BatchNorm statistics and
    weights that differ between folds, so the ensemble is not a trivial average."""
    torch.manual_seed(seed)
    model = build_model(default_model_config("mini_covidnet"), len(CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(6, 3, SIZE, SIZE)
    y = torch.arange(6) % len(CLASSES)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """``<tmp>/models/tiny-ce/fold_{0,1}/best.pt`` and their ONNX files in ``<tmp>/exports/``.

    The TorchScript exporter (fast; the dynamo one takes ~10 s per model here) needs a fixed
    batch for this head: fold 0 takes batches of 1, fold 1 of 3 (so the last chunk of a video
    is padded); neither input is named "input". The dynamic-batch case has its own test."""
    root = tmp_path_factory.mktemp("predict")
    run = root / "models" / "tiny-ce"
    for k in FOLDS:
        model = train_tiny(seed=10 + k)
        save_checkpoint(run / f"fold_{k}" / "best.pt", model,
                        model_cfg=default_model_config("mini_covidnet"), classes=CLASSES,
                        image_size=SIZE, epoch=0, meta={"fold": k})
        onnx_path = root / "exports" / "tiny-ce" / f"fold_{k}" / "model.onnx"
        onnx_path.parent.mkdir(parents=True)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
            torch.onnx.export(model, (torch.rand(1 + 2 * k, 3, SIZE, SIZE),), str(onnx_path),
                              dynamo=False, input_names=[f"frames_{k}"],
                              output_names=["logits"], opset_version=18)
    return run


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """40 frames at 12 fps: the 3 Hz rule keeps every 4th frame."""
    return write_video(tmp_path_factory.mktemp("clip") / "clip.avi", n_frames=40, fps=12, size=48)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = predict.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def pipeline_frames(path: Path, rate_hz: float, max_frames: int, max_side: int = 320) -> np.ndarray:
    """The frames training would see, rebuilt here without pipeline.predict: the sampling rule,
    ``to_rgb8``, the longest-side cap, a JPEG (quality 95) round trip and the square resize."""
    cap = cv2.VideoCapture(str(path))
    keep = set(sample_indices(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), cap.get(cv2.CAP_PROP_FPS),
                              rate_hz, max_frames))
    out, i = [], 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if i in keep:
            img = to_rgb8(frame)
            h, w = img.shape[:2]
            if max(h, w) > max_side:
                s = max_side / max(h, w)
                img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))),
                                 interpolation=cv2.INTER_AREA)
            img = cv2.imdecode(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1],
                               cv2.IMREAD_COLOR)
            img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
            out.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB).transpose(2, 0, 1))
        i += 1
    cap.release()
    return np.stack(out)


def fold_outputs(run: Path, images: np.ndarray) -> list[np.ndarray]:
    """Each fold model's softmax, computed directly from the checkpoints."""
    x = torch.from_numpy(images).float() / 255
    probs = []
    for k in FOLDS:
        model, _ = load_model(run / f"fold_{k}" / "best.pt")
        with torch.no_grad():
            probs.append(torch.softmax(model(x), 1).double().numpy())
    return probs


def frame_probs(video: dict) -> np.ndarray:
    return np.array([[f["probs"][c] for c in CLASSES] for f in video["frames"]])


def check_result(result: dict, run: Path, videos: list[Path], rate_hz: float,
                 max_frames: int) -> None:
    assert [v["file"] for v in result["videos"]] == [str(p) for p in videos]
    assert result["classes"] == CLASSES and result["folds"] == list(FOLDS)
    for path, video in zip(videos, result["videos"]):
        cap = cv2.VideoCapture(str(path))
        expected = sample_indices(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)),
                                  cap.get(cv2.CAP_PROP_FPS), rate_hz, max_frames)
        cap.release()
        assert [f["frame_index"] for f in video["frames"]] == expected
        assert video["n_frames"] == len(expected) > 1
        probs = frame_probs(video)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
        assert sum(video["probs"].values()) == pytest.approx(1.0, abs=1e-6)
        # Ensemble = mean of the fold models run independently on independently extracted frames.
        direct = fold_outputs(run, pipeline_frames(path, rate_hz, max_frames))
        np.testing.assert_allclose(probs, np.mean(direct, axis=0), atol=1e-5)
        # Video = mean of its frames; its class = the argmax.
        np.testing.assert_allclose([video["probs"][c] for c in CLASSES], probs.mean(0), atol=1e-9)
        assert video["pred"] == CLASSES[int(probs.mean(0).argmax())]


def test_real_video_json(run_dir, capsys):
    shared = require_shared_lus()  # missing: fails under CI, skips elsewhere
    assert REAL_VIDEO.is_file(), f"{REAL_VIDEO.relative_to(shared)} missing from {shared}"
    rc, out, err = run_cli(capsys, "--run", run_dir, "--json", "--rate-hz", 3, "--max-frames", 30,
                           REAL_VIDEO)
    assert rc == 0, err
    result = json.loads(out)
    assert len(result["videos"]) == 1 and result["backend"] == "torch"
    check_result(result, run_dir, [REAL_VIDEO], 3, 30)


def test_generated_video_json_and_table(run_dir, clip, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "--run", run_dir, "--json", "--rate-hz", 3, "--max-frames", 6,
                           clip)
    assert rc == 0, err
    result = json.loads(out)
    assert len(result["videos"]) == 1 and result["videos"][0]["fps"] == pytest.approx(12)
    check_result(result, run_dir, [clip], 3, 6)
    # A still image is one frame; two inputs give two entries, and the table names both.
    image = tmp_path / "still.png"
    cv2.imwrite(str(image), np.full((40, 60, 3), 90, np.uint8))
    rc, out, err = run_cli(capsys, "--run", run_dir, "--rate-hz", 3, "--max-frames", 6, clip, image)
    assert rc == 0, err
    assert str(clip) in out and str(image) in out and "6 frame(s)" in out and "1 frame(s)" in out
    assert out.count("  video ") == 2


def test_vote_ensemble(run_dir, clip):
    result = predict.predict_files([clip], run_dir, ensemble="vote", max_frames=5)
    video = result["videos"][0]
    fold_probs = [np.array([[f["fold_probs"][str(k)][c] for c in CLASSES]
                            for f in video["frames"]]) for k in FOLDS]
    np.testing.assert_allclose(frame_probs(video), ensemble_probabilities(fold_probs, "vote"))
    np.testing.assert_allclose(frame_probs(video).sum(1), 1.0, atol=1e-9)


def test_onnx_backend_matches_torch(run_dir, clip, capsys):
    torch_result = predict.predict_files([clip], run_dir, "torch", max_frames=8)
    rc, out, err = run_cli(capsys, "--run", run_dir, "--backend", "onnx", "--json",
                           "--max-frames", 8, clip)
    assert rc == 0, err
    onnx_result = json.loads(out)
    assert onnx_result["backend"] == "onnx"
    assert all(p.endswith("model.onnx") for p in onnx_result["model_files"].values())
    a, b = torch_result["videos"][0], onnx_result["videos"][0]
    np.testing.assert_allclose(frame_probs(a), frame_probs(b), atol=1e-4)
    for k in FOLDS:
        for fa, fb in zip(a["frames"], b["frames"]):
            np.testing.assert_allclose(list(fa["fold_probs"][str(k)].values()),
                                       list(fb["fold_probs"][str(k)].values()), atol=1e-4)
    assert a["pred"] == b["pred"]


def test_onnx_dynamic_batch(tmp_path):
    """An ONNX file with a dynamic batch axis (as the export stage writes) runs in one call."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 15 * 15, 3)).eval()
    path = tmp_path / "model.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.rand(2, 3, SIZE, SIZE),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "n"}}, opset_version=18)
    x = np.random.default_rng(0).random((5, 3, SIZE, SIZE), dtype=np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(predict.onnx_logit_fn(path)(x), expected, atol=1e-5)


def test_missing_onnx_files(tmp_path, run_dir, clip, capsys):
    fold = tmp_path / "models" / "noexport-ce" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "best.pt").write_bytes((run_dir / "fold_0" / "best.pt").read_bytes())
    rc, _, err = run_cli(capsys, "--run", fold.parent, "--backend", "onnx", clip)
    assert rc == 2
    assert "model.onnx" in err and "pipeline.stages.export" in err and "--backend torch" in err


def test_user_errors(tmp_path, run_dir, clip, capsys):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is a text file, not a video\n")
    rc, out, err = run_cli(capsys, "--run", run_dir, fake)
    assert rc == 2 and out == ""
    assert str(fake) in err and "not a decodable video" in err and "re-encode" in err

    missing = tmp_path / "nowhere.mp4"
    rc, _, err = run_cli(capsys, "--run", run_dir, clip, missing)
    assert rc == 2 and str(missing) in err and "not found" in err

    untrained = tmp_path / "models" / "untrained-ce"
    untrained.mkdir(parents=True)
    rc, _, err = run_cli(capsys, "--run", untrained, clip)
    assert rc == 2 and str(untrained) in err and "dvc repro" in err

    rc, _, err = run_cli(capsys, "--run", run_dir, tmp_path / "notes.txt")
    assert rc == 2 and "not found" in err
    (tmp_path / "notes.txt").write_text("x")
    rc, _, err = run_cli(capsys, "--run", run_dir, tmp_path / "notes.txt")
    assert rc == 2 and "unsupported file type .txt" in err


def test_default_run_is_first_grid_cell():
    params = {"grid": {"models": ["mini_covidnet", "mobilenet_v2"], "losses": ["focal", "ce"]}}
    assert predict.default_run_dir(params) == Path("models/mini_covidnet-focal")
    with pytest.raises(predict.PredictError, match="--run"):
        predict.default_run_dir({})


def test_bad_file_costs_only_itself(run_dir, clip, tmp_path):
    """``python -m pipeline.predict good.avi bad.avi still.mp4``: the good video is predicted and
    printed, each bad file gets one ``error:`` line naming it and the fix, exit status 2."""
    import os
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT

    bad = tmp_path / "bad.avi"
    bad.write_text("this is a text file, not a video\n")
    still = tmp_path / "still.mp4"  # a PNG under a video name: one frame
    still.write_bytes(cv2.imencode(".png", np.full((48, 48, 3), 90, np.uint8))[1].tobytes())
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.predict", "--run", str(run_dir),
                           "--json", "--max-frames", "6", str(clip), str(bad), str(still)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    result = json.loads(proc.stdout)
    check_result(result, run_dir, [clip], FALLBACK_RATE, 6)
    assert [e["file"] for e in result["errors"]] == [str(bad), str(still)]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and errors == proc.stderr.strip().splitlines()[-2:]
    assert errors[0].startswith(f"error: {bad}: not a decodable video") and "re-encode" in errors[0]
    assert errors[1].startswith(f"error: {still}: a 'video' that decodes to a single frame "
                                f"(its content is a PNG image)")
