"""Patient-level folds: no patient on two sides, stratified, reproducible, and Table I."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.split_folds import LeakageError, check_no_leakage, fold_table, make_splits

CFG = {"k": 5, "seed": 42, "validation": "train_patients", "val_fraction": 0.15}
CLASSES = ["covid", "pneumonia", "healthy"]


def synthetic_manifest(n_patients: int = 60, seed: int = 0) -> pd.DataFrame:
    """Patients with 1-3 videos of 3-12 frames each; class imbalance like the real data."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = int(rng.choice(3, p=[0.25, 0.25, 0.5]))
        for v in range(int(rng.integers(1, 4))):
            for f in range(int(rng.integers(3, 13))):
                rows.append({"frame": f"p{p}_v{v}_f{f}.jpg", "source": f"p{p}_v{v}.mp4",
                             "class": CLASSES[label], "label": label, "patient": f"pat{p}",
                             "status": "used"})
    rows.append({"frame": "", "source": "skipped.mp4", "class": "", "label": -1,
                 "patient": "x", "status": "skipped"})
    return pd.DataFrame(rows)


def test_no_patient_on_two_sides_and_every_patient_tested_once():
    manifest = synthetic_manifest()
    splits = make_splits(manifest, CFG)
    used = manifest[manifest.status == "used"]
    test = splits[splits.split == "test"]
    # every source in exactly one test fold, every patient tested exactly once
    assert test.groupby("source")["fold"].nunique().eq(1).all()
    assert set(test["source"]) == set(used["source"])
    assert test.groupby("patient")["fold"].nunique().max() == 1
    for fold, part in splits.groupby("fold"):
        sides = {s: set(part.loc[part.split == s, "patient"]) for s in ("train", "val", "test")}
        assert not sides["train"] & sides["test"]
        assert not sides["val"] & sides["test"]
        assert not sides["train"] & sides["val"]
        assert sides["val"], f"fold {fold} has no validation patients"
        # every source appears once per fold
        assert part["source"].is_unique


def test_folds_are_stratified_and_reproducible():
    manifest = synthetic_manifest(n_patients=100)
    a = make_splits(manifest, CFG)
    b = make_splits(manifest.sample(frac=1, random_state=3), CFG)
    key = ["fold", "source"]
    assert a.sort_values(key).reset_index(drop=True).equals(b.sort_values(key).reset_index(drop=True))
    c = make_splits(manifest, {**CFG, "seed": 7})
    assert not a.sort_values(key).reset_index(drop=True).equals(c.sort_values(key).reset_index(drop=True))
    table = fold_table(a, CLASSES)
    # each test fold holds every class, with frame counts near a fifth of the total
    for cls in CLASSES:
        frames = table[f"{cls}_frames"]
        assert (frames > 0).all()
        assert frames.max() < 2.5 * frames.sum() / 5
    assert table["total_frames"].sum() == (manifest.status == "used").sum()


def test_leakage_is_detected():
    splits = make_splits(synthetic_manifest(), CFG)
    bad = splits.copy()
    # put one training source of fold 0 under a patient tested in fold 0
    test_patient = bad.loc[(bad.fold == 0) & (bad.split == "test"), "patient"].iloc[0]
    idx = bad.index[(bad.fold == 0) & (bad.split == "train")][0]
    bad.loc[idx, "patient"] = test_patient
    with pytest.raises(LeakageError, match=test_patient):
        check_no_leakage(bad)


def test_test_fold_validation_is_the_leaky_study_protocol():
    splits = make_splits(synthetic_manifest(), {**CFG, "validation": "test_fold"})
    for _, part in splits.groupby("fold"):
        assert set(part.loc[part.split == "val", "source"]) == set(part.loc[part.split == "test", "source"])
    with pytest.raises(ValueError, match="train_patients"):
        make_splits(synthetic_manifest(), {**CFG, "validation": "typo"})


def test_too_few_patients_is_a_clear_error():
    with pytest.raises(ValueError, match="folds.k"):
        make_splits(synthetic_manifest(n_patients=3), CFG)
