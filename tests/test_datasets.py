"""Image-dataset adapters: every input accounted for, frames 8-bit RGB, patients grouped,
fixed splits as the dataset gives them, and the three chest X-ray configs compose."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import ConfigError, compose
from pipeline.data.frames import MANIFEST_COLUMNS
from pipeline.data.sources import (
    DatasetError,
    label_map,
    prepare,
    prepare_image_folders,
    prepare_image_manifest,
    prepare_medmnist_npz,
)
from pipeline.stages.split_folds import check_no_leakage, make_fixed_splits, make_splits

ROOT = Path(__file__).resolve().parent.parent
REAL_NPZ = ROOT.parent / "shared" / "datasets" / "medmnist" / "pneumoniamnist.npz"


def fixed_splits(manifest: pd.DataFrame, **overrides) -> pd.DataFrame:
    """``make_fixed_splits`` with the ``folds=fixed`` config (and ``overrides`` of it)."""
    cfg = {**compose(["folds=fixed"])["folds"], **overrides}
    return make_fixed_splits(manifest, float(cfg["val_fraction"]), int(cfg["seed"]),
                             int(cfg["val_candidates"]))[0]


def _img(mode: str, size: tuple[int, int] = (12, 10), value: int = 100) -> np.ndarray:
    """A small test image in one of the modes X-ray files come in (OpenCV channel order)."""
    h, w = size
    if mode == "gray":
        return np.full((h, w), value, np.uint8)
    if mode == "gray16":
        return np.full((h, w), value * 257, np.uint16)
    if mode == "rgba":
        img = np.full((h, w, 4), value, np.uint8)
        img[..., 3] = 255
        return img
    return np.dstack([np.full((h, w), value + i, np.uint8) for i in range(3)])  # bgr


def _write(path: Path, mode: str, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), _img(mode, **kw))
    return path


def manifest_ds(**over) -> dict:
    ds = compose(["dataset=cxr_covid_manifest"])["dataset"]
    # Tiny test images: dataset.min_side has its own tests.
    ds.update({"workers": 1, "min_side": None, "frame_max_side": 8, **over})
    return ds


@pytest.fixture
def cxr_folder(tmp_path: Path) -> Path:
    """images/ + metadata.csv: repeated patients, PNG/JPEG in gray/16-bit/RGB/RGBA, and one of
    each problem: missing file, unknown label, ignored label, duplicate row, conflicting
    duplicate, unreadable image, unlisted file."""
    raw = tmp_path / "raw"
    img = raw / "images"
    rows = [("covid/a1.png", "p1", "covid", "covid", "gray"),
            ("covid/a2.jpg", "p1", "covid", "covid", "rgb"),
            ("covid/b1.png", "p2", "COVID-19", "covid", "rgba"),
            ("non/c1.png", "p3", "normal", "normal", "gray16"),
            ("non/c2.jpeg", "p3", "normal", "normal", "gray"),
            ("non/d1.png", "", "non_covid", "other_disease", "rgb")]
    for path, *_, mode in rows:
        _write(img / path, mode, size=(10, 20))
    _write(img / "non/unlisted.png", "gray")
    _write(img / "non/strange.png", "gray")
    _write(img / "non/ignored.png", "gray")
    (img / "non/broken.png").write_bytes(b"not a png")
    csv = [("image", "patient_id", "label", "finding")]
    csv += [r[:4] for r in rows]
    csv += [("non/missing.png", "p4", "normal", "normal"),
            ("non/strange.png", "p5", "fracture", "fracture"),
            ("non/ignored.png", "p6", "unsure", ""),
            ("covid/a1.png", "p1", "covid", "covid"),          # exact duplicate
            ("non/c1.png", "p3", "covid", "covid"),            # conflicting duplicate
            ("non/broken.png", "p7", "normal", "normal")]
    pd.DataFrame(csv[1:], columns=csv[0]).to_csv(raw / "metadata.csv", index=False)
    return raw


def test_image_manifest_accounts_for_every_input_and_writes_rgb8(cxr_folder: Path, tmp_path: Path):
    frames = tmp_path / "frames"
    ds = manifest_ds(ignore_labels=["unsure"], strict=False)
    m = prepare_image_manifest(cxr_folder, frames, ds, strict=False)
    assert list(m.columns[:len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
    by = {(r.source, r.status): r for r in m.itertuples()}
    used = m[m.status == "used"]
    assert sorted(used.source) == sorted(f"images/{p}" for p in
                                         ["covid/a1.png", "covid/a2.jpg", "covid/b1.png",
                                          "non/c1.png", "non/c2.jpeg", "non/d1.png"])
    # Every file on disk and every CSV row has a row; each non-used row says why.
    on_disk = {p.relative_to(cxr_folder).as_posix() for p in (cxr_folder / "images").rglob("*")
               if p.is_file()}
    assert on_disk <= set(m.source)
    assert len(m) == 6 + 6 + 1  # CSV rows + the unlisted file
    assert (m.loc[m.status != "used", "reason"] != "").all()
    assert by[("images/non/unlisted.png", "excluded")].reason.startswith("not listed")
    assert "missing" in by[("images/non/missing.png", "skipped")].reason
    assert "maps to no class" in by[("images/non/strange.png", "skipped")].reason
    assert "ignored" in by[("images/non/ignored.png", "excluded")].reason
    assert "duplicate" in by[("images/covid/a1.png", "excluded")].reason
    assert "listed again with label" in by[("images/non/c1.png", "skipped")].reason
    assert "readable" in by[("images/non/broken.png", "skipped")].reason
    # Classes, patients (repeated ids kept, empty id = the image), subgroups.
    assert dict(zip(used.source, used["class"]))["images/covid/b1.png"] == "covid"
    assert set(used["class"]) == {"covid", "non_covid"}
    assert (used.loc[used["class"] == "covid", "label"] == 0).all()
    pats = dict(zip(used.source, used.patient))
    assert pats["images/covid/a1.png"] == pats["images/covid/a2.jpg"] == "meta:p1"
    assert pats["images/non/d1.png"] == "file:images/non/d1.png"
    assert set(used.finding) == {"covid", "normal", "other_disease"}
    # Frames: 8-bit, 3 channels, longer side capped; grey stays grey through the conversions.
    for r in used.itertuples():
        f = cv2.imread(str(frames / r.frame), cv2.IMREAD_UNCHANGED)
        assert f.dtype == np.uint8 and f.shape == (4, 8, 3) and (r.width, r.height) == (8, 4)
    c1 = cv2.imread(str(frames / used.set_index("source").loc["images/non/c1.png", "frame"]))
    assert abs(int(c1.mean()) - 100) <= 1  # 16-bit 100*257 -> 100


def test_image_manifest_strict_names_the_file(cxr_folder: Path, tmp_path: Path):
    with pytest.raises(DatasetError, match=r"images/non/missing.png.*missing"):
        prepare_image_manifest(cxr_folder, tmp_path / "f", manifest_ds(ignore_labels=["unsure"]),
                               strict=True)
    bad = manifest_ds(manifest={**manifest_ds()["manifest"], "patient_column": "pid"})
    with pytest.raises(DatasetError, match="column 'pid'.*patient_column"):
        prepare_image_manifest(cxr_folder, tmp_path / "f", bad, strict=False)


def test_patients_stay_together_through_make_splits(tmp_path: Path):
    """30 patients with 1-3 images each: the k-fold never puts one patient on two sides."""
    raw = tmp_path / "raw"
    rng = np.random.default_rng(0)
    rows = []
    for p in range(30):
        label = "covid" if p % 3 == 0 else "non_covid"
        for k in range(int(rng.integers(1, 4))):
            _write(raw / "images" / f"p{p}_{k}.png", "gray", size=(6, 6))
            rows.append({"image": f"p{p}_{k}.png", "patient_id": f"P{p}", "label": label,
                         "finding": label})
    pd.DataFrame(rows).to_csv(raw / "metadata.csv", index=False)
    m = prepare_image_manifest(raw, tmp_path / "frames", manifest_ds(), strict=True)
    assert (m.status == "used").sum() == len(rows)
    cfg = compose(["experiment=cxr_covid_resnet50", "folds.k=5"])["folds"]
    splits, _ = make_splits(m, cfg)
    check_no_leakage(splits)
    for _, part in splits.groupby("fold"):
        sides = part.groupby("patient")["split"].nunique()
        assert sides.max() == 1
    # every image tested once, with all of its patient's images
    test = splits[splits.split == "test"]
    assert test.source.is_unique and len(test) == len(rows)


def folders_ds(**over) -> dict:
    ds = compose(["dataset=cxr_pneumonia_folders"])["dataset"]
    # Tiny test images: dataset.min_side has its own tests.
    ds.update({"workers": 1, "min_side": None, **over})
    return ds


@pytest.fixture
def kermany(tmp_path: Path) -> Path:
    """train/val/test with NORMAL/PNEUMONIA folders named as the Kermany set, plus strays."""
    raw = tmp_path / "raw"
    for k, (split, n) in enumerate((("train", 6), ("val", 2), ("test", 3)), start=1):
        for i in range(n):
            _write(raw / split / "NORMAL" / f"IM-{100 * k + i:04d}-0001.jpeg", "gray")
            _write(raw / split / "PNEUMONIA" / f"person{100 * k + i}_bacteria_{i}.jpeg", "rgb")
    _write(raw / "train" / "PNEUMONIA" / "person100_virus_9.jpeg", "gray")  # same patient
    (raw / "train" / ".DS_Store").write_bytes(b"\0")
    _write(raw / "train" / "loose.png", "gray")
    (raw / "test" / "NORMAL" / "notes.txt").write_text("x")
    return raw


def test_image_folders_split_column_and_accounting(kermany: Path, tmp_path: Path):
    m = prepare_image_folders(kermany, tmp_path / "frames", folders_ds(), strict=True)
    used = m[m.status == "used"]
    assert used.groupby("split").size().to_dict() == {"train": 13, "val": 4, "test": 6}
    assert used.groupby(["split", "class"]).size()[("train", "pneumonia")] == 7
    on_disk = {p.relative_to(kermany).as_posix() for p in kermany.rglob("*") if p.is_file()}
    assert set(m.source) == on_disk and m.source.is_unique
    reasons = dict(zip(m.source, m.reason))
    assert reasons["train/.DS_Store"] == "hidden file"
    assert "no class folder" in reasons["train/loose.png"]
    assert "not an image" in reasons["test/NORMAL/notes.txt"]
    pats = dict(zip(used.source, used.patient))
    assert pats["train/PNEUMONIA/person100_virus_9.jpeg"] == pats[
        "train/PNEUMONIA/person100_bacteria_0.jpeg"] == "name:person100"
    assert pats["train/NORMAL/IM-0100-0001.jpeg"] == "name:IM-0100"
    splits = fixed_splits(m)
    assert set(splits.fold) == {0}
    assert splits.groupby("split").frames.sum().to_dict() == {"train": 13, "val": 4, "test": 6}


def test_image_folders_unknown_class_folder_and_carved_validation(kermany: Path, tmp_path: Path):
    _write(kermany / "train" / "COVID" / "x.png", "gray")
    with pytest.raises(DatasetError, match=r"train/COVID/x.png: class folder 'COVID'"):
        prepare_image_folders(kermany, tmp_path / "f", folders_ds(), strict=True)
    ds = folders_ds(split_dirs={"train": "train", "test": "test"})
    m = prepare_image_folders(kermany, tmp_path / "f2", ds, strict=False)
    assert m.loc[m.source == "train/COVID/x.png", "status"].item() == "skipped"
    assert m.loc[m.source == "val/NORMAL/IM-0200-0001.jpeg", "status"].item() == "excluded"
    splits = fixed_splits(m, val_fraction=0.25, seed=1)
    sides = {s: set(splits.loc[splits.split == s, "patient"]) for s in ("train", "val", "test")}
    assert sides["val"] and not sides["val"] & sides["train"]
    assert splits.loc[splits.split == "test"].frames.sum() == 6
    # the patient with two images is carved as a whole
    pair = splits[splits.patient == "name:person100"]
    assert pair.split.nunique() == 1 and len(pair) == 2
    assert fixed_splits(m, val_fraction=0.25, seed=1).equals(splits)


def _npz(path: Path, sizes=(("train", 8), ("val", 3), ("test", 4)), labels=(0, 1)) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in sizes:
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.choice(labels, (n, 1)).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def test_medmnist_npz_lossless_frames_and_fixed_split(tmp_path: Path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _npz(raw / "pneumoniamnist.npz")
    ds = compose(["dataset=pneumoniamnist"])["dataset"]
    m = prepare("medmnist_npz", raw, tmp_path / "frames", ds, strict=True)
    assert m.split.value_counts().to_dict() == {"train": 8, "test": 4, "val": 3}
    with np.load(raw / "pneumoniamnist.npz") as npz:
        for r in m.itertuples():
            split, idx = r.source.split(":")[1].split("/")
            f = cv2.imread(str(tmp_path / "frames" / r.frame), cv2.IMREAD_UNCHANGED)
            assert f.shape == (28, 28, 3) and f.dtype == np.uint8
            assert np.array_equal(f[..., 0], npz[f"{split}_images"][int(idx)])
            assert r.label == int(npz[f"{split}_labels"][int(idx), 0])
    assert (m.patient == "file:" + m.source).all()
    splits = fixed_splits(m)
    assert splits.groupby("split").size().to_dict() == {"train": 8, "test": 4, "val": 3}


def test_medmnist_unknown_label(tmp_path: Path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _npz(raw / "pneumoniamnist.npz", labels=(0, 1, 2))
    ds = compose(["dataset=pneumoniamnist"])["dataset"]
    with pytest.raises(DatasetError, match=r"pneumoniamnist.npz:\w+/\d+: label 2"):
        prepare_medmnist_npz(raw, tmp_path / "f", ds, strict=True)
    m = prepare_medmnist_npz(raw, tmp_path / "f", ds, strict=False)
    assert ((m.label == -1) == (m.status == "skipped")).all() and len(m) == 15


@pytest.mark.skipif(not REAL_NPZ.is_file(), reason=f"{REAL_NPZ} not present")
def test_real_pneumoniamnist_reproduces_the_official_split(tmp_path: Path):
    from pipeline.stages.fetch_data import read_checksums, verify_folder

    ds = compose(["experiment=pneumoniamnist"])["dataset"]
    assert verify_folder(REAL_NPZ.parent, read_checksums(ROOT / ds["checksums"])) == []
    m = prepare(ds["kind"], REAL_NPZ.parent, tmp_path / "frames", ds, strict=True)  # reads only
    splits = fixed_splits(m)
    counts = splits.groupby(["split", "class"]).size().to_dict()
    assert counts == {("train", "normal"): 1214, ("train", "pneumonia"): 3494,
                      ("val", "normal"): 135, ("val", "pneumonia"): 389,
                      ("test", "normal"): 234, ("test", "pneumonia"): 390}


def test_dispatcher_and_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="valid kinds: image_folders, image_manifest, lus_videos, medmnist_npz"):
        prepare("dicom_folder", tmp_path, tmp_path, {}, True)
    with pytest.raises(ConfigError, match="'1' is listed under both"):
        label_map({"a": [1], "b": ["1"]})
    with pytest.raises(ValueError, match="needs a manifest 'split' column"):
        fixed_splits(pd.DataFrame({"source": ["a"], "patient": ["a"], "class": ["x"],
                                   "label": [0], "status": ["used"]}))


@pytest.mark.parametrize("experiment", ["cxr_covid_resnet50", "cxr_pneumonia_mobilenetv2",
                                        "pneumoniamnist"])
def test_chest_xray_experiments_compose(experiment):
    cfg = compose([f"experiment={experiment}"])
    ds, folds, train = cfg["dataset"], cfg["folds"], cfg["train"]
    assert ds["positive_class"] in ds["classes"] and len(ds["classes"]) == 2
    assert all(m in cfg["models"] for m in cfg["grid"]["models"])
    assert max(train["folds"]) < folds["k"]
    if experiment == "cxr_covid_resnet50":
        assert (folds["k"], folds["val_fraction"], train["batch_size"], train["minority_oversample"]
                ) == (10, 0.1, 30, 5)
        assert cfg["binary"]["thresholds"] == [0.15, 0.20, 0.25, 0.30]
    else:
        assert folds["method"] == "fixed"


def test_image_below_min_side_is_excluded_with_size_and_key(kermany: Path, tmp_path: Path, caplog):
    """A 1x1 PNG is no chest X-ray: excluded with its size and the key, not used as a frame;
    strict mode does not stop on it (a rule, like the class folders), and the log says so."""
    _write(kermany / "train" / "PNEUMONIA" / "person900_bacteria_1.png", "gray", size=(1, 1))
    with caplog.at_level("WARNING", logger="pipeline.data.sources"):
        m = prepare_image_folders(kermany, tmp_path / "frames", folders_ds(min_side=8),
                                  strict=True)
    row = m.set_index("source").loc["train/PNEUMONIA/person900_bacteria_1.png"]
    assert row["status"] == "excluded" and row["frame"] == ""
    assert row["reason"].startswith("image of 1x1 px, below dataset.min_side=8 px")
    assert any("person900_bacteria_1.png: image of 1x1 px" in r.getMessage()
               for r in caplog.records)
    assert {p.name for p in (tmp_path / "frames").iterdir()} == set(m.loc[m.status == "used", "frame"])
    assert (m.status == "used").sum() == 23  # the 12 x 10 images of the fixture are all kept


def test_medmnist_image_below_min_side_is_excluded(tmp_path: Path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _npz(raw / "pneumoniamnist.npz")
    ds = compose(["dataset=pneumoniamnist"])["dataset"]
    assert prepare_medmnist_npz(raw, tmp_path / "f28", ds, strict=True).status.eq("used").all()
    m = prepare_medmnist_npz(raw, tmp_path / "f32", {**ds, "min_side": 32}, strict=False)
    assert set(m.status) == {"excluded"}
    assert m.reason.str.startswith("image of 28x28 px, below dataset.min_side=32 px").all()
