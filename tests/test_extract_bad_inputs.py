"""Bad and unusual inputs through the real stage (``extract``), beyond those in
``test_extract_frames.py``: videos without frames, metadata/file mismatches, one name under two
probes, colliding frame names, CMYK/grayscale/alpha/palette images, and decoders that hang,
crash or raise. Each test checks the stage's accounting invariant: every input file is in the
manifest as used, excluded or skipped, and the frames folder holds exactly the used frames."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline.data.frames import ExtractionError, InputFile, Result, process_file
from pipeline.data.lus_videos import extract
from tests.conftest import PROJECT_ROOT, write_video

METADATA = "dataset_metadata.csv"


@pytest.fixture
def ds_cfg() -> dict:
    return {
        "classes": {"covid": ["Cov"], "pneumonia": ["Pneu", "pneu"], "healthy": ["Reg"]},
        "ignore_prefixes": ["Vir"], "probes": ["convex"], "include_images": True,
        "video_dir": "pocus_videos", "image_dir": "pocus_images",
        "metadata": {"file": METADATA, "filename_column": "Filename",
                     "patient_column": "Patient ID / Name", "fps_column": "Framerate"},
        "patient_rules": [{"pattern": r"^(Reg_pat\d+)Image_", "group": r"\1"}],
        "rate_hz": 3, "max_frames": 30, "frame_max_side": 64, "decode_timeout_s": 120}


def base_dataset(root: Path, metadata: str = "Filename,Patient ID / Name,Framerate\n") -> Path:
    """One small video per class (so strict mode has no empty class) and a metadata file."""
    raw = root / "raw"
    videos, images = raw / "pocus_videos" / "convex", raw / "pocus_images" / "convex"
    videos.mkdir(parents=True)
    images.mkdir(parents=True)
    write_video(videos / "Cov_base.avi", 10, 10.0)
    write_video(videos / "Pneu_base.avi", 10, 10.0)
    write_video(videos / "Reg_base.avi", 10, 10.0)
    (raw / METADATA).write_text(metadata)
    return raw


def assert_accounted(raw: Path, manifest: pd.DataFrame, frames_dir: Path) -> None:
    """The stage's invariant, checked from the outside."""
    media = {p.relative_to(raw).as_posix() for p in raw.rglob("*")
             if p.is_file() and p.name != METADATA}
    assert set(manifest["source"]) == media, "an input file is missing from the manifest"
    assert set(manifest["status"]) <= {"used", "excluded", "skipped"}
    for source, rows in manifest.groupby("source"):
        if not (rows["status"] == "used").all():  # a file that gave no frame has one row saying why
            assert len(rows) == 1 and rows.iloc[0]["reason"], source
    used = manifest[manifest["status"] == "used"]
    assert used["frame"].is_unique, "two manifest rows share a frame file"
    on_disk = {p.name for p in frames_dir.iterdir()}
    assert on_disk == set(used["frame"]), "frames on disk and used rows differ"


def by_source(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest.drop_duplicates("source").set_index("source")


@pytest.mark.parametrize("ext,reason", [
    (".avi", "video has no decodable frame"),      # container opens, first read fails
    (".mp4", "not a decodable video"),             # OpenCV refuses a moov with no samples
])
def test_video_with_zero_frames(tmp_path, ds_cfg, ext, reason):
    raw = base_dataset(tmp_path)
    empty = write_video(raw / "pocus_videos" / "convex" / f"Cov_noframes{ext}", 0, 30.0)
    assert empty.stat().st_size > 0  # a real container, not a zero-byte file
    with pytest.raises(ExtractionError, match=f"Cov_noframes{ext}"):
        extract(raw, tmp_path / "strict", ds_cfg, strict=True)
    manifest = extract(raw, tmp_path / "frames", ds_cfg, strict=False)
    row = by_source(manifest).loc[f"pocus_videos/convex/Cov_noframes{ext}"]
    assert row["status"] == "skipped" and reason in row["reason"]
    assert_accounted(raw, manifest, tmp_path / "frames")


def test_metadata_row_without_file_and_file_without_row(tmp_path, ds_cfg, caplog):
    raw = base_dataset(tmp_path, "Filename,Patient ID / Name,Framerate\n"
                                 "Cov_base,7,10\nCov_ghost,8,30\n")
    folder = raw / "pocus_videos" / "convex"
    write_video(folder / "Cov_unlisted.avi", 10, 10.0)
    write_video(folder / "Reg_pat9Image_1.avi", 10, 10.0)
    with caplog.at_level(logging.INFO, logger="pipeline.data"):
        manifest = extract(raw, tmp_path / "frames", ds_cfg, strict=True)
    assert_accounted(raw, manifest, tmp_path / "frames")
    # The row without a file is harmless: no input, no patient, but said in the log.
    assert not manifest["source"].str.contains("ghost").any()
    assert "meta:8" not in set(manifest["patient"])
    assert any("name no file" in r.message and "Cov_ghost" in r.message for r in caplog.records)
    # Files without a row: name rule, else their own patient; visible in the id and the log.
    pats = by_source(manifest)["patient"]
    assert pats["pocus_videos/convex/Cov_base.avi"] == "meta:7"
    assert pats["pocus_videos/convex/Reg_pat9Image_1.avi"] == "name:Reg_pat9"
    assert pats["pocus_videos/convex/Cov_unlisted.avi"] == "file:Cov_unlisted"
    warned = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no patient in the metadata" in m and "Cov_unlisted" in m for m in warned)


def test_same_name_under_two_probes(tmp_path, ds_cfg):
    raw = base_dataset(tmp_path)
    (raw / "pocus_videos" / "linear").mkdir()
    # Different sizes so each frame can be traced back to its own file.
    write_video(raw / "pocus_videos" / "convex" / "Cov_x.avi", 10, 10.0, size=48)
    write_video(raw / "pocus_videos" / "linear" / "Cov_x.avi", 10, 10.0, size=40)
    convex, linear = "pocus_videos/convex/Cov_x.avi", "pocus_videos/linear/Cov_x.avi"

    manifest = extract(raw, tmp_path / "one", ds_cfg, strict=True)  # convex only
    assert_accounted(raw, manifest, tmp_path / "one")
    assert by_source(manifest).loc[convex, "status"] == "used"
    assert by_source(manifest).loc[linear, "status"] == "excluded"

    manifest = extract(raw, tmp_path / "both", {**ds_cfg, "probes": ["convex", "linear"]},
                       strict=True)
    assert_accounted(raw, manifest, tmp_path / "both")
    used = manifest[manifest["status"] == "used"]
    frames = {src: set(used.loc[used["source"] == src, "frame"]) for src in (convex, linear)}
    assert frames[convex] and frames[linear] and not frames[convex] & frames[linear]
    for src, size in ((convex, 48), (linear, 40)):
        assert set(used.loc[used["source"] == src, "probe"]) == {src.split("/")[1]}
        for name in frames[src]:
            assert cv2.imread(str(tmp_path / "both" / name)).shape[:2] == (size, size)
    # Without metadata both fall back to the file name, so they share a patient: the same name
    # most likely is the same case, and grouping two files can never leak across folds.
    pats = by_source(manifest)["patient"]
    assert pats[convex] == pats[linear] == "file:Cov_x"


def test_paths_that_map_to_one_frame_name_are_not_overwritten(tmp_path, ds_cfg):
    raw = base_dataset(tmp_path)
    folder = raw / "pocus_videos" / "convex"
    write_video(folder / "Cov_y.avi", 10, 10.0, size=48)
    write_video(folder / "Cov_y.mp4", 10, 10.0, size=40)  # same path but the extension
    with pytest.raises(ExtractionError, match="collide"):
        extract(raw, tmp_path / "strict", ds_cfg, strict=True)
    manifest = extract(raw, tmp_path / "frames", ds_cfg, strict=False)
    assert_accounted(raw, manifest, tmp_path / "frames")
    rows = by_source(manifest)
    assert rows.loc["pocus_videos/convex/Cov_y.avi", "status"] == "used"
    assert rows.loc["pocus_videos/convex/Cov_y.mp4", "status"] == "skipped"
    assert "Cov_y.avi" in rows.loc["pocus_videos/convex/Cov_y.mp4", "reason"]
    used = manifest[manifest["source"] == "pocus_videos/convex/Cov_y.avi"]
    for name in used["frame"]:  # the frames are the .avi's own, not overwritten by the .mp4
        assert cv2.imread(str(tmp_path / "frames" / name)).shape[:2] == (48, 48)


def _write_images(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Images in unusual layouts; returns the BGR colour each must come out as."""
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(folder / "Cov_cmyk.jpg")  # pure red
    Image.new("L", (30, 20), 90).save(folder / "Reg_gray.png")
    Image.new("I;16", (30, 20), 30000).save(folder / "Reg_gray16.png")  # 30000 / 257 = 116.7
    Image.new("LA", (30, 20), (200, 255)).save(folder / "Reg_gray_alpha.png")
    Image.new("RGBA", (30, 20), (10, 120, 230, 255)).save(folder / "Pneu_rgba_opaque.png")
    Image.new("RGBA", (30, 20), (10, 120, 230, 0)).save(folder / "Pneu_rgba_clear.png")
    pal = Image.new("P", (30, 20), 1)
    pal.putpalette([0, 0, 0, 40, 160, 80] + [0] * 762)
    pal.save(folder / "Pneu_palette.png")
    return {"Cov_cmyk.jpg": (0, 0, 255), "Reg_gray.png": (90, 90, 90),
            "Reg_gray16.png": (117, 117, 117), "Reg_gray_alpha.png": (200, 200, 200),
            "Pneu_rgba_opaque.png": (230, 120, 10),
            "Pneu_rgba_clear.png": (0, 0, 0),  # transparency composited on black
            "Pneu_palette.png": (80, 160, 40)}


def test_cmyk_grayscale_alpha_and_palette_images(tmp_path, ds_cfg):
    raw = base_dataset(tmp_path)
    expected = _write_images(raw / "pocus_images" / "convex")
    manifest = extract(raw, tmp_path / "frames", ds_cfg, strict=True)
    assert_accounted(raw, manifest, tmp_path / "frames")
    used = manifest[manifest["status"] == "used"].set_index("source")
    for name, bgr in expected.items():
        row = used.loc[f"pocus_images/convex/{name}"]
        assert (row["width"], row["height"], row["kind"]) == (30, 20, "image")
        img = cv2.imread(str(tmp_path / "frames" / row["frame"]), cv2.IMREAD_UNCHANGED)
        assert img.shape == (20, 30, 3) and img.dtype == np.uint8, name
        assert np.abs(img.reshape(-1, 3).mean(0) - bgr).max() <= 3, (name, img[5, 5], bgr)


# Stand-in decoders. Module level, since the stage pickles the decoder into its processes.

def _hang_on_marked(item: InputFile, raw_dir: str, out_dir: str, *args) -> Result:
    if "Hang" in item.source:
        # Write one frame first: a killed decoder must not leave frames without manifest rows.
        cv2.imwrite(str(Path(out_dir) / (item.source.replace("/", "__")[:-4] + "__f00000.jpg")),
                    np.zeros((8, 8, 3), np.uint8))
        time.sleep(3600)
    return process_file(item, raw_dir, out_dir, *args)


def _crash_on_marked(item: InputFile, *args) -> Result:
    if "Crash" in item.source:
        os.kill(os.getpid(), signal.SIGSEGV)  # as a decoder bug on a corrupt file would
    if "Raise" in item.source:
        raise ValueError("unexpected layout")
    return process_file(item, *args)


def test_hung_decoder_times_out_and_is_recorded(tmp_path, ds_cfg):
    raw = base_dataset(tmp_path)
    write_video(raw / "pocus_videos" / "convex" / "Cov_Hang.avi", 10, 10.0)
    cfg = {**ds_cfg, "decode_timeout_s": 1}
    started = time.monotonic()
    with pytest.raises(ExtractionError, match=r"Cov_Hang.avi: decode timed out after 1 s"):
        extract(raw, tmp_path / "strict", cfg, strict=True, decode=_hang_on_marked)
    manifest = extract(raw, tmp_path / "frames", cfg, workers=2, strict=False,
                       decode=_hang_on_marked)
    assert time.monotonic() - started < 30  # two runs, each bounded by the 1 s limit
    row = by_source(manifest).loc["pocus_videos/convex/Cov_Hang.avi"]
    assert row["status"] == "skipped" and row["reason"] == "decode timed out after 1 s"
    assert (manifest["status"] == "used").sum() == 12  # the other three files, 4 frames each
    assert_accounted(raw, manifest, tmp_path / "frames")  # the partial frame was removed


def test_crashing_or_raising_decoder_costs_only_its_file(tmp_path, ds_cfg):
    raw = base_dataset(tmp_path)
    write_video(raw / "pocus_videos" / "convex" / "Cov_Crash.avi", 10, 10.0)
    write_video(raw / "pocus_videos" / "convex" / "Cov_Raise.avi", 10, 10.0)
    with pytest.raises(ExtractionError, match="Cov_Crash.avi: decoder process died"):
        extract(raw, tmp_path / "strict", ds_cfg, strict=True, decode=_crash_on_marked)
    manifest = extract(raw, tmp_path / "frames", ds_cfg, strict=False, decode=_crash_on_marked)
    rows = by_source(manifest)
    assert rows.loc["pocus_videos/convex/Cov_Crash.avi", "status"] == "skipped"
    assert f"exit code -{int(signal.SIGSEGV)}" in rows.loc["pocus_videos/convex/Cov_Crash.avi",
                                                          "reason"]
    assert rows.loc["pocus_videos/convex/Cov_Raise.avi", "reason"] == (
        "decoder raised ValueError: unexpected layout")
    assert_accounted(raw, manifest, tmp_path / "frames")


def test_no_timeout_configured_still_decodes(tmp_path, ds_cfg):
    raw = base_dataset(tmp_path)
    manifest = extract(raw, tmp_path / "frames", {**ds_cfg, "decode_timeout_s": None})
    assert (manifest["status"] == "used").sum() == 12
    assert_accounted(raw, manifest, tmp_path / "frames")


def test_inputs_below_min_side_are_excluded_with_size_and_key(tmp_path, ds_cfg, caplog):
    """A 1x1 PNG is not a lung-ultrasound frame, nor is a 16 px video: both are excluded with
    their size and the key (strict mode goes on: a rule, not a broken file), and said in the log."""
    raw = base_dataset(tmp_path)
    cv2.imwrite(str(raw / "pocus_images" / "convex" / "Cov_dot.png"), np.full((1, 1, 3), 200, np.uint8))
    write_video(raw / "pocus_videos" / "convex" / "Pneu_thumb.avi", 10, 10.0, size=16)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        manifest = extract(raw, tmp_path / "frames", {**ds_cfg, "min_side": 32}, strict=True)
    assert_accounted(raw, manifest, tmp_path / "frames")
    rows = by_source(manifest)
    dot, thumb = rows.loc["pocus_images/convex/Cov_dot.png"], rows.loc["pocus_videos/convex/Pneu_thumb.avi"]
    assert dot["status"] == thumb["status"] == "excluded"
    assert dot["reason"].startswith("image of 1x1 px, below dataset.min_side=32 px")
    assert thumb["reason"].startswith("video frames of 16x16 px, below dataset.min_side=32 px")
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "excluded 2 implausible input(s)" in warned and "Cov_dot.png: image of 1x1 px" in warned
    # Without the bound (min_side null) the same files are used, as before.
    manifest = extract(raw, tmp_path / "any", {**ds_cfg, "min_side": None}, strict=True)
    assert set(by_source(manifest).loc[["pocus_images/convex/Cov_dot.png",
                                        "pocus_videos/convex/Pneu_thumb.avi"], "status"]) == {"used"}


def test_single_frame_video_is_excluded_with_what_it_is(tmp_path, ds_cfg):
    """A PNG renamed .mp4, a JPEG renamed .avi, a one-frame GIF and a one-frame AVI decode to a
    single frame: excluded, the reason naming the still-image content where there is one."""
    raw = base_dataset(tmp_path)
    folder = raw / "pocus_videos" / "convex"
    still = np.full((48, 64, 3), 120, np.uint8)
    (folder / "Cov_png.mp4").write_bytes(cv2.imencode(".png", still)[1].tobytes())
    (folder / "Reg_jpeg.avi").write_bytes(cv2.imencode(".jpg", still)[1].tobytes())
    Image.new("RGB", (64, 48), (90, 90, 90)).save(folder / "Pneu_still.gif")
    write_video(folder / "Cov_oneframe.avi", 1, 10.0)
    manifest = extract(raw, tmp_path / "frames", ds_cfg, strict=True)
    assert_accounted(raw, manifest, tmp_path / "frames")
    rows = by_source(manifest)
    still = ": a still image under a video name; give it an image extension"
    for name, what in (("Cov_png.mp4", f" (its content is a PNG image){still}"),
                       ("Reg_jpeg.avi", f" (its content is a JPEG image){still}"),
                       ("Pneu_still.gif", f" (its content is a GIF image){still}"),
                       ("Cov_oneframe.avi", ": a still image or a damaged video")):
        row = rows.loc[f"pocus_videos/convex/{name}"]
        assert row["status"] == "excluded", (name, row["status"], row["reason"])
        assert row["reason"].startswith(f"a 'video' that decodes to a single frame{what}"), (
            name, row["reason"])
    # A two-frame video is a video: kept.
    write_video(folder / "Cov_twoframes.avi", 2, 10.0)
    manifest = extract(raw, tmp_path / "two", {**ds_cfg, "max_frames": 1}, strict=True)
    assert by_source(manifest).loc["pocus_videos/convex/Cov_twoframes.avi", "status"] == "used"


def stage_project_params(root: Path, ds_cfg: dict, **over) -> None:
    from pipeline.core.config import compose

    ds = {**compose([])["dataset"], **ds_cfg, "raw_dir": "data/raw", "frames_dir": "data/frames",
          "frames_summary": "data/frames_summary.json", "workers": 1, "strict": True,
          "min_side": 32, **over}
    (root / "params.yaml").write_text(yaml.safe_dump({"dataset": ds}))


def stage_project(root: Path, ds_cfg: dict, **over) -> Path:
    """A checkout for ``python -m pipeline.stages.extract_frames``: params.yaml + data/raw."""
    raw = base_dataset(root / "data")
    stage_project_params(root, ds_cfg, **over)
    return raw


def run_stage(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("PIPELINE_VERBOSE", None)
    return subprocess.run([sys.executable, "-m", "pipeline.stages.extract_frames"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_strict_stage_stops_with_one_line_and_a_full_manifest_but_no_store(tmp_path, ds_cfg):
    """Strict mode: exit 2 and one ``error:`` line naming the file, the key and where the rest
    is; data/frames/ then holds only manifest.csv, with a row for every input file and no
    ``used`` row, so no later stage can take it for a finished store (an older store is gone)."""
    raw = stage_project(tmp_path, ds_cfg)
    (raw / "pocus_videos" / "convex" / "Cov_notes.mp4").write_text("not a video\n")
    cv2.imwrite(str(raw / "pocus_images" / "convex" / "Reg_dot.png"), np.zeros((1, 1, 3), np.uint8))
    frames = tmp_path / "data" / "frames"
    frames.mkdir()
    (frames / "old__f00000.jpg").write_bytes(b"stale frame of an earlier run")
    proc = run_stage(tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert lines[-1].startswith("error: 1 input problem(s) in data/raw, first: "
                                "pocus_videos/convex/Cov_notes.mp4: not a decodable video")
    assert "dataset.strict=false" in lines[-1]
    assert lines[-1].endswith("every file's status and reason are in data/frames/manifest.csv]")
    assert [p.name for p in frames.iterdir()] == ["manifest.csv"]
    assert not (tmp_path / "data" / "frames.partial").exists()
    assert not (tmp_path / "data" / "frames_summary.json").exists()
    manifest = pd.read_csv(frames / "manifest.csv", keep_default_na=False)
    assert set(manifest["source"]) == {p.relative_to(raw).as_posix() for p in raw.rglob("*")
                                       if p.is_file() and p.name != METADATA}
    assert manifest["source"].is_unique and "used" not in set(manifest["status"])
    rows = manifest.set_index("source")
    assert rows.loc["pocus_videos/convex/Cov_notes.mp4", "status"] == "skipped"
    assert "not a decodable video" in rows.loc["pocus_videos/convex/Cov_notes.mp4", "reason"]
    assert rows.loc["pocus_images/convex/Reg_dot.png", "status"] == "excluded"
    assert "below dataset.min_side=32" in rows.loc["pocus_images/convex/Reg_dot.png", "reason"]
    fine = rows.loc["pocus_videos/convex/Cov_base.avi"]
    assert fine["status"] == "skipped" and fine["reason"].startswith(
        "not written: the stage stopped on 1 input problem(s) (dataset.strict=true); this file "
        "gave 4 frame(s)")

    # Non-strict: the same inputs give a finished store, the bad file recorded as skipped.
    lenient = tmp_path / "lenient"
    shutil.copytree(raw, lenient / "data" / "raw")
    stage_project_params(lenient, ds_cfg, strict=False)
    proc = run_stage(lenient)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames = lenient / "data" / "frames"
    manifest = pd.read_csv(frames / "manifest.csv", keep_default_na=False)
    rows = by_source(manifest)
    assert rows.loc["pocus_videos/convex/Cov_notes.mp4", "status"] == "skipped"
    assert rows.loc["pocus_images/convex/Reg_dot.png", "status"] == "excluded"
    assert {p.name for p in frames.iterdir()} == set(manifest.loc[manifest.status == "used",
                                                                  "frame"]) | {"manifest.csv"}
    assert (lenient / "data" / "frames_summary.json").is_file()
    assert not (lenient / "data" / "frames.partial").exists()
