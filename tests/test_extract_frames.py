"""Frame extraction on generated videos with known frame rate and frame count, on images of
every colour layout, and on bad inputs (each accounted for in the manifest)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.data.frames import ExtractionError, InputFile, process_file, sample_indices, to_rgb8
from pipeline.data.lus_videos import extract
from tests.conftest import frame_level_to_index, write_video


def test_sample_indices_follow_the_study_rule():
    # 30 fps at 3 Hz: every 10th frame.
    assert sample_indices(95, 30.0, 3, 30) == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    # 25 fps -> int(25/3) = 8.
    assert sample_indices(20, 25.0, 3, 30) == [0, 8, 16]
    # capped at max_frames
    assert len(sample_indices(10_000, 60.0, 3, 30)) == 30
    # slower than the rate: every frame
    assert sample_indices(4, 2.0, 3, 30) == [0, 1, 2, 3]


@pytest.mark.parametrize("ext,fps,n", [(".avi", 30.0, 95), (".mp4", 25.0, 40), (".avi", 12.0, 400)])
def test_video_frames_have_exact_indices_and_times(tmp_path, ext, fps, n):
    video = write_video(tmp_path / f"Cov_test{ext}", n, fps)
    out = tmp_path / "frames"
    out.mkdir()
    item = InputFile(source=video.name, kind="video", probe="convex", cls="covid", label=0,
                     patient="p1")
    res = process_file(item, str(tmp_path), str(out), rate_hz=3, max_frames=30, max_side=None)
    assert not res.error
    expected = sample_indices(n, fps, 3, 30)
    assert [r["frame_index"] for r in res.rows] == expected
    assert [r["time_s"] for r in res.rows] == [round(i / fps, 4) for i in expected]
    for r in res.rows:  # the written image is really that frame of the video
        img = cv2.imread(str(out / r["frame"]))
        assert frame_level_to_index(img) == r["frame_index"]


def test_to_rgb8_handles_every_layout():
    gray = np.full((5, 6), 100, np.uint8)
    rgba = np.dstack([np.full((5, 6, 3), 200, np.uint8), np.full((5, 6), 255, np.uint8)])
    rgba[0, 0, 3] = 0
    deep = np.full((5, 6, 3), 65535, np.uint16)
    for img in (gray, rgba, deep, gray[:, :, None]):
        out = to_rgb8(img)
        assert out.dtype == np.uint8 and out.shape == (5, 6, 3)
    assert to_rgb8(deep).max() == 255
    assert to_rgb8(rgba)[0, 0].tolist() == [0, 0, 0] and to_rgb8(rgba)[1, 1].tolist() == [200] * 3


def _tiny_dataset(root: Path) -> Path:
    raw = root / "raw"
    v, i = raw / "pocus_videos" / "convex", raw / "pocus_images" / "convex"
    v.mkdir(parents=True)
    i.mkdir(parents=True)
    (raw / "pocus_videos" / "linear").mkdir()
    write_video(v / "Cov_a.avi", 30, 30.0)
    write_video(v / "Pneu_b.avi", 30, 15.0)
    write_video(v / "Reg_pat1Image_1.avi", 12, 10.0)
    write_video(v / "Reg_pat1Image_2.avi", 12, 10.0)
    write_video(v / "Vir_c.avi", 10, 10.0)
    write_video(raw / "pocus_videos" / "linear" / "Cov_lin.avi", 10, 10.0)
    cv2.imwrite(str(i / "Reg_img.png"), np.full((20, 30), 90, np.uint8))
    cv2.imwrite(str(i / "Cov_rgba.png"), np.full((20, 30, 4), 90, np.uint8))
    cv2.imwrite(str(i / "Pneu_deep.png"), np.full((20, 30, 3), 4000, np.uint16))
    (raw / "dataset_metadata.csv").write_text(
        "Filename,Patient ID / Name,Framerate\nCov_a,7,30\nPneu_b,,15\n")
    return raw


@pytest.fixture
def ds_cfg():
    return {
        "classes": {"covid": ["Cov"], "pneumonia": ["Pneu", "pneu"], "healthy": ["Reg"]},
        "ignore_prefixes": ["Vir"], "probes": ["convex"], "include_images": True,
        "video_dir": "pocus_videos", "image_dir": "pocus_images",
        "metadata": {"file": "dataset_metadata.csv", "filename_column": "Filename",
                     "patient_column": "Patient ID / Name", "fps_column": "Framerate"},
        "patient_rules": [{"pattern": r"^(Reg_pat\d+)Image_", "group": r"\1"}],
        "rate_hz": 3, "max_frames": 30, "frame_max_side": 32, "decode_timeout_s": 120}


def test_every_input_file_is_accounted_for(tmp_path, ds_cfg):
    raw = _tiny_dataset(tmp_path)
    manifest = extract(raw, tmp_path / "frames", ds_cfg, workers=1, strict=True)
    media = {p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file()
             and p.name != "dataset_metadata.csv"}
    assert set(manifest["source"]) == media
    by_src = manifest.drop_duplicates("source").set_index("source")
    assert by_src.loc["pocus_videos/convex/Vir_c.avi", "status"] == "excluded"
    assert "probe 'linear'" in by_src.loc["pocus_videos/linear/Cov_lin.avi", "reason"]
    used = manifest[manifest.status == "used"]
    assert set(used["class"]) == {"covid", "pneumonia", "healthy"}
    # patient ids: metadata first, then the name rule, then the file itself
    pats = used.drop_duplicates("source").set_index("source")["patient"]
    assert pats["pocus_videos/convex/Cov_a.avi"] == "meta:7"
    assert pats["pocus_videos/convex/Reg_pat1Image_1.avi"] == "name:Reg_pat1"
    assert pats["pocus_videos/convex/Reg_pat1Image_2.avi"] == "name:Reg_pat1"
    assert pats["pocus_videos/convex/Pneu_b.avi"] == "file:Pneu_b"
    # 30 frames at 30 fps -> every 10th; 15 fps -> every 5th
    assert len(used[used.source.str.endswith("Cov_a.avi")]) == 3
    assert len(used[used.source.str.endswith("Pneu_b.avi")]) == 6
    # frames are stored with the longer side capped
    h, w = cv2.imread(str(tmp_path / "frames" / used.iloc[0]["frame"])).shape[:2]
    assert max(h, w) <= 32


@pytest.mark.parametrize("name,content,reason", [
    ("Cov_empty.mp4", b"", "empty file"),
    ("Cov_text.mp4", b"this is not a video\n" * 50, "not a decodable video"),
    ("Cov_bad.png", b"\x89PNG garbage", "not a readable image"),
    ("Xyz_unknown.avi", None, "maps to no class"),
])
def test_bad_inputs_error_in_strict_and_are_recorded_otherwise(tmp_path, ds_cfg, name, content, reason):
    raw = _tiny_dataset(tmp_path)
    folder = raw / ("pocus_images" if name.endswith(".png") else "pocus_videos") / "convex"
    if content is None:
        write_video(folder / name, 10, 10.0)
    else:
        (folder / name).write_bytes(content)
    with pytest.raises(ExtractionError, match=name):
        extract(raw, tmp_path / "frames_strict", ds_cfg, strict=True)
    manifest = extract(raw, tmp_path / "frames", ds_cfg, strict=False)
    row = manifest[manifest.source.str.endswith(name)]
    assert len(row) == 1 and row.iloc[0]["status"] == "skipped"
    assert reason in row.iloc[0]["reason"]


def test_truncated_video_keeps_what_decodes(tmp_path, ds_cfg):
    raw = _tiny_dataset(tmp_path)
    full = write_video(tmp_path / "full.avi", 60, 30.0)
    data = full.read_bytes()
    (raw / "pocus_videos" / "convex" / "Cov_trunc.avi").write_bytes(data[: len(data) // 2])
    manifest = extract(raw, tmp_path / "frames", ds_cfg, strict=False)
    rows = manifest[manifest.source.str.endswith("Cov_trunc.avi")]
    assert len(rows) >= 1  # frames before the cut, or a recorded skip: never silently lost
    assert set(rows["status"]) <= {"used", "skipped"}


def test_empty_class_is_an_error(tmp_path, ds_cfg):
    raw = _tiny_dataset(tmp_path)
    cfg = {**ds_cfg, "classes": {**ds_cfg["classes"], "viral": ["Vir"]}, "ignore_prefixes": [],
           "probes": ["linear"]}
    with pytest.raises(ExtractionError, match="has no frame"):
        extract(raw, tmp_path / "frames", cfg, strict=True)


def test_parallel_and_serial_agree(tmp_path, ds_cfg):
    raw = _tiny_dataset(tmp_path)
    a = extract(raw, tmp_path / "f1", ds_cfg, workers=1)
    b = extract(raw, tmp_path / "f2", ds_cfg, workers=2)
    assert a.sort_values(["source", "frame"]).reset_index(drop=True).equals(
        b.sort_values(["source", "frame"]).reset_index(drop=True))
