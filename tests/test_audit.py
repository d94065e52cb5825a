"""The leakage audit on constructed manifests and splits: a clean split passes, a planted leak of
each kind (same patient, same source, identical frame bytes under two patients) fails, and a
slightly noised copy of a frame under another patient fails where the folds promise to link such
copies (``link_duplicates.method: perceptual``) and is a warning otherwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline.data.duplicates import distances, perceptual_hash
from pipeline.stages.audit import audit, main
from tests.conftest import PROJECT_ROOT, natural_image

PATIENTS = [f"p{i}" for i in range(6)]
# Two hand-made folds over six patients, one video (three frames) each.
ROLES = {0: {"test": ["p0", "p1"], "val": ["p2"], "train": ["p3", "p4", "p5"]},
         1: {"test": ["p2", "p3"], "val": ["p4"], "train": ["p0", "p1", "p5"]}}


def smooth_image(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A colour frame with a natural image's spectrum (a stable perceptual hash)."""
    return cv2.cvtColor(natural_image(rng, size, size), cv2.COLOR_GRAY2BGR)


def source_of(patient: str, video: int = 0) -> str:
    return f"pocus_videos/convex/Cov_{patient}_v{video}.avi"


def frame_name(source: str, i: int) -> str:
    return source.replace("/", "__")[:-4] + f"__f{i:05d}.jpg"


def add_video(frames_dir: Path, rows: list[dict], patient: str, video: int,
              rng: np.random.Generator, n: int = 3) -> None:
    src = source_of(patient, video)
    for i in range(n):
        name = frame_name(src, i)
        cv2.imwrite(str(frames_dir / name), smooth_image(rng))
        rows.append({"frame": name, "source": src, "class": "covid", "label": 0,
                     "patient": patient, "status": "used", "reason": ""})


@pytest.fixture
def dataset(tmp_path) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """A clean manifest, its splits and the frames folder."""
    rng = np.random.default_rng(0)
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    rows: list[dict] = []
    for p in PATIENTS:
        add_video(frames_dir, rows, p, 0, rng)
    rows.append({"frame": "", "source": "pocus_videos/convex/Vir_x.avi", "class": "", "label": -1,
                 "patient": "file:Vir_x", "status": "excluded", "reason": "class not selected"})
    manifest = pd.DataFrame(rows)
    splits = pd.DataFrame([{"fold": f, "source": source_of(p), "patient": p, "class": "covid",
                            "label": 0, "frames": 3, "split": side}
                           for f, roles in ROLES.items() for side, ps in roles.items() for p in ps])
    return manifest, splits, frames_dir


THRESHOLD = 12


def kinds(report: dict) -> set[tuple[int, str, str, str]]:
    return {(leak["fold"], *leak["sides"], leak["kind"]) for leak in report["leaks"]}


def test_clean_split_passes(dataset):
    manifest, splits, frames_dir = dataset
    report = audit(manifest, splits, frames_dir, threshold=THRESHOLD)
    assert report["ok"], report
    assert report["checked"] == {"frames": 18, "sources": 6, "patients": 6,
                                 "side_pairs": [["train", "test"], ["train", "val"], ["val", "test"]],
                                 "link_method": "perceptual"}
    assert report["warnings"]["near_duplicates"]["frame_pairs"] == 0
    assert report["warnings"]["identical_frames_across_patients"] == 0


def test_same_patient_on_two_sides_is_a_leak(dataset):
    manifest, splits, frames_dir = dataset
    # p0 (test in fold 0) has a second video that the splits put on the training side.
    rows = manifest.to_dict("records")
    add_video(frames_dir, rows, "p0", 1, np.random.default_rng(1))
    manifest = pd.DataFrame(rows)
    extra = [{"fold": 0, "source": source_of("p0", 1), "patient": "p0", "class": "covid",
              "label": 0, "frames": 3, "split": "train"},
             {"fold": 1, "source": source_of("p0", 1), "patient": "p0", "class": "covid",
              "label": 0, "frames": 3, "split": "train"}]
    report = audit(manifest, pd.concat([splits, pd.DataFrame(extra)]), frames_dir, threshold=THRESHOLD)
    assert not report["ok"]
    assert kinds(report) == {(0, "train", "test", "patient")}
    assert report["leaks"][0]["items"] == ["p0"]


def test_patient_from_the_manifest_not_the_splits(dataset):
    manifest, splits, frames_dir = dataset
    # The same leak, hidden by a splits table that names p0's second video as patient "p9".
    rows = manifest.to_dict("records")
    add_video(frames_dir, rows, "p0", 1, np.random.default_rng(1))
    extra = pd.DataFrame([{"fold": f, "source": source_of("p0", 1), "patient": "p9",
                           "class": "covid", "label": 0, "frames": 3, "split": "train"}
                          for f in (0, 1)])
    report = audit(pd.DataFrame(rows), pd.concat([splits, extra]), frames_dir, threshold=THRESHOLD)
    assert (0, "train", "test", "patient") in kinds(report)
    assert any("another patient" in e for e in report["errors"])


def test_same_source_on_two_sides_is_a_leak(dataset):
    manifest, splits, frames_dir = dataset
    dup = splits[(splits["fold"] == 1) & (splits["patient"] == "p5")].assign(split="val")
    report = audit(manifest, pd.concat([splits, dup]), frames_dir, threshold=THRESHOLD)
    assert not report["ok"]
    # (its frames are copies of themselves, but of one patient: the patient leak covers them)
    assert kinds(report) == {(1, "train", "val", "source"), (1, "train", "val", "patient")}
    source_leak = next(x for x in report["leaks"] if x["kind"] == "source")
    assert source_leak["items"] == [source_of("p5")]


def test_identical_frame_under_two_patients_is_a_leak(dataset):
    manifest, splits, frames_dir = dataset
    # A frame of p4 (train in fold 0) is byte for byte a frame of p1 (test in fold 0): e.g. one
    # figure published in two papers, filed under two patients.
    shutil.copyfile(frames_dir / frame_name(source_of("p1"), 2), frames_dir / frame_name(source_of("p4"), 1))
    report = audit(manifest, splits, frames_dir, threshold=THRESHOLD)
    assert not report["ok"]
    assert kinds(report) == {(0, "train", "test", "identical_frame"),
                             (1, "train", "val", "identical_frame")}  # p1 train, p4 val in fold 1
    item = report["leaks"][0]["items"][0]
    assert item["patients"] == ["p1", "p4"] and len(item["frames"]) == 2
    assert report["warnings"]["identical_frames_across_patients"] == 1
    pair = report["warnings"]["near_duplicates"]["pairs"][0]
    assert pair["patients"] == ["p1", "p4"] and pair["min_distance"] == 0


def test_noised_copy_under_another_patient_fails_when_linking_promised_it(dataset):
    manifest, splits, frames_dir = dataset
    original = cv2.imread(str(frames_dir / frame_name(source_of("p0"), 0)))
    noise = np.random.default_rng(2).normal(0, 3, original.shape)
    noisy = (original.astype(np.float64) + noise).clip(0, 255).astype(np.uint8)
    cv2.imwrite(str(frames_dir / frame_name(source_of("p3"), 0)), noisy)
    # folds that link only byte-identical copies: the near-duplicate is a warning
    report = audit(manifest, splits, frames_dir, threshold=THRESHOLD, link_method="exact")
    assert report["ok"], report["leaks"]
    near = report["warnings"]["near_duplicates"]
    assert near["frame_pairs"] == 1
    pair = near["pairs"][0]
    assert pair["patients"] == ["p0", "p3"] and pair["min_distance"] <= THRESHOLD
    assert pair["opposite_sides_in_folds"] == [0, 1]  # p0 test / p3 train; p0 train / p3 test
    assert pair["examples"][0]["frames"] == [frame_name(source_of("p0"), 0),
                                             frame_name(source_of("p3"), 0)]
    # folds that promise to link perceptual copies: the same pair on two sides is a leak
    report = audit(manifest, splits, frames_dir, threshold=THRESHOLD)
    assert not report["ok"]
    assert kinds(report) == {(0, "train", "test", "near_frame"), (1, "train", "test", "near_frame")}


def test_validation_on_the_test_fold_is_not_a_leak_when_declared(dataset):
    manifest, splits, frames_dir = dataset
    # folds.validation=test_fold: the test rows are repeated as validation rows.
    leaky = splits.replace({"split": {"val": "train"}})
    leaky = pd.concat([leaky, leaky[leaky["split"] == "test"].assign(split="val")])
    assert audit(manifest, leaky, frames_dir, threshold=THRESHOLD, leaky_validation=True)["ok"]
    assert (0, "val", "test", "patient") in kinds(audit(manifest, leaky, frames_dir,
                                                       threshold=THRESHOLD))


def test_missing_frame_file_is_an_error(dataset):
    manifest, splits, frames_dir = dataset
    (frames_dir / frame_name(source_of("p2"), 1)).unlink()
    report = audit(manifest, splits, frames_dir, threshold=THRESHOLD)
    assert not report["ok"] and not report["leaks"]
    assert any("missing or unreadable" in e for e in report["errors"])


def test_perceptual_hash_distances():
    rng = np.random.default_rng(3)
    a, b = smooth_image(rng, 96), smooth_image(rng, 96)
    ha, hb = (perceptual_hash(Image.fromarray(x))[None] for x in (a, b))
    resized = perceptual_hash(Image.fromarray(cv2.resize(a, (60, 60), interpolation=cv2.INTER_AREA)))
    assert distances(ha, ha)[0, 0] == 0 and distances(ha, resized[None])[0, 0] <= THRESHOLD
    assert distances(ha, hb)[0, 0] > 3 * THRESHOLD


def test_cli_writes_report_and_exit_status(dataset, tmp_path, monkeypatch):
    manifest, splits, frames_dir = dataset
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["dataset"]["frames_dir"] = "frames"
    params["folds"]["dir"] = "folds"
    Path("params.yaml").write_text(yaml.safe_dump(params))
    Path("folds").mkdir()
    manifest.to_csv("frames/manifest.csv", index=False)
    splits.to_csv("folds/splits.csv", index=False)
    assert main([]) == 0
    assert json.loads(Path("reports/audit.json").read_text())["ok"] is True
    train_row = splits[splits["split"] == "train"].iloc[[0]]
    pd.concat([splits, train_row.assign(split="test")]).to_csv("folds/splits.csv", index=False)
    assert main([]) == 1
    report = json.loads(Path("reports/audit.json").read_text())
    assert not report["ok"] and report["leaks"][0]["kind"] == "patient"


def test_overlap_in_a_published_fixed_split_is_reported_not_fatal(dataset, tmp_path, monkeypatch):
    """MedMNIST's official split holds byte-identical images in train and val: a fixed split is
    the dataset's own, so the audit lists the overlap and passes; our own folds still fail."""
    manifest, splits, frames_dir = dataset
    shutil.copyfile(frames_dir / frame_name(source_of("p0"), 0),
                    frames_dir / frame_name(source_of("p4"), 0))  # p0 test, p4 val in fold 0
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["dataset"]["frames_dir"] = "frames"
    params["folds"].update(dir="folds", method="fixed")
    Path("params.yaml").write_text(yaml.safe_dump(params))
    Path("folds").mkdir()
    manifest.to_csv("frames/manifest.csv", index=False)
    splits.to_csv("folds/splits.csv", index=False)
    assert main([]) == 0
    report = json.loads(Path("reports/audit.json").read_text())
    assert report["ok"] and not report["leaks"]
    # p0 is tested in fold 0 and trained on in fold 1; p4 validates in both
    assert {(o["fold"], o["kind"]) for o in report["official_split_overlaps"]} == {
        (0, "identical_frame"), (1, "identical_frame")}
    params["folds"]["method"] = "stratified_group_kfold"
    Path("params.yaml").write_text(yaml.safe_dump(params))
    assert main([]) == 1
