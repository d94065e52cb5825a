"""Stage ``split_folds``: patient-level stratified k-fold, with validation carved by patient.

Frames of one video are near-duplicates and one patient may have several videos, so every split
is made over patients (``group``), stratified by class. Each fold's validation set (for early
stopping) comes from that fold's training patients; the study's own choice, validating on the
test fold, is available as ``validation: test_fold`` and is labelled as leaking wherever used.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pipeline.config import get, load_params

log = logging.getLogger("pipeline.split_folds")


class LeakageError(RuntimeError):
    """A patient appears on two sides of a split."""


def _patient_labels(frames: pd.DataFrame) -> pd.Series:
    # A patient's stratum is its most frequent class (ties: the first class index).
    return frames.groupby("patient")["label"].agg(lambda s: s.value_counts().sort_index().idxmax())


def assign_folds(frames: pd.DataFrame, k: int, seed: int) -> dict[str, int]:
    """Test fold of every patient: stratified group k-fold over frames.

    Args:
        frames: one row per frame with ``patient`` and ``label``.
    """
    n_patients = frames["patient"].nunique()
    if n_patients < k:
        raise ValueError(f"{n_patients} patients cannot fill {k} folds: lower folds.k")
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold_of: dict[str, int] = {}
    for fold, (_, test_idx) in enumerate(sgkf.split(frames, frames["label"], frames["patient"])):
        for p in frames["patient"].iloc[test_idx].unique():
            fold_of[p] = fold
    return fold_of


def carve_validation(frames: pd.DataFrame, train_patients: Sequence[str], fraction: float,
                     seed: int) -> set[str]:
    """Pick about ``fraction`` of the training patients (stratified by class) for validation."""
    sub = frames[frames["patient"].isin(set(train_patients))]
    n_splits = max(2, round(1 / fraction))
    n_splits = min(n_splits, sub["patient"].nunique())
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    _, val_idx = next(sgkf.split(sub, sub["label"], sub["patient"]))
    return set(sub["patient"].iloc[val_idx])


def make_splits(manifest: pd.DataFrame, cfg: Mapping) -> pd.DataFrame:
    """One row per (fold, source file): its patient, class, frame count and split role."""
    frames = manifest[manifest["status"] == "used"].copy()
    frames["patient"] = frames["patient"].astype(str)
    k, seed = int(cfg["k"]), int(cfg["seed"])
    fold_of = assign_folds(frames, k, seed)
    per_source = (frames.groupby(["source", "patient", "class", "label"], as_index=False)
                  .size().rename(columns={"size": "frames"}))
    rows = []
    for fold in range(k):
        test = {p for p, f in fold_of.items() if f == fold}
        train = sorted(set(fold_of) - test)
        if cfg["validation"] == "test_fold":
            val = test
        elif cfg["validation"] == "train_patients":
            val = carve_validation(frames, train, float(cfg["val_fraction"]), seed + fold)
        else:
            raise ValueError(f"folds.validation must be 'train_patients' or 'test_fold', "
                             f"not {cfg['validation']!r}")
        for src in per_source.itertuples(index=False):
            if src.patient in test:
                role = "test"
            elif src.patient in val:
                role = "val"
            else:
                role = "train"
            rows.append({"fold": fold, "source": src.source, "patient": src.patient,
                         "class": src[2], "label": src.label, "frames": src.frames, "split": role})
            if role == "test" and src.patient in val and cfg["validation"] == "test_fold":
                rows.append({**rows[-1], "split": "val"})
    splits = pd.DataFrame(rows)
    check_no_leakage(splits, leaky_validation=cfg["validation"] == "test_fold")
    return splits


def check_no_leakage(splits: pd.DataFrame, leaky_validation: bool = False) -> None:
    """Fail if a patient sits in two test folds, or on two sides of any fold.

    Raises:
        LeakageError: naming the patients and folds.
    """
    test = splits[splits["split"] == "test"]
    multi = test.groupby("patient")["fold"].nunique()
    if (multi > 1).any():
        raise LeakageError(f"patients in more than one test fold: {sorted(multi[multi > 1].index)}")
    for fold, part in splits.groupby("fold"):
        sides = {s: set(part.loc[part["split"] == s, "patient"]) for s in ("train", "val", "test")}
        pairs = [("train", "test"), ("train", "val")] + ([] if leaky_validation else [("val", "test")])
        for a, b in pairs:
            both = sides[a] & sides[b]
            if both:
                raise LeakageError(f"fold {fold}: patients in both {a} and {b}: {sorted(both)}")


def fold_table(splits: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """The study's Table I: frames (and videos, patients) per class in each test fold."""
    test = splits[splits["split"] == "test"]
    rows = []
    for fold, part in test.groupby("fold"):
        row: dict = {"fold": int(fold)}
        for cls in classes:
            c = part[part["class"] == cls]
            row[f"{cls}_frames"] = int(c["frames"].sum())
            row[f"{cls}_videos"] = int(len(c))
            row[f"{cls}_patients"] = int(c["patient"].nunique())
        row["total_frames"] = int(part["frames"].sum())
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params()
    cfg, ds = get(params, "folds"), get(params, "dataset")
    manifest = pd.read_csv(Path(ds["frames_dir"]) / "manifest.csv", dtype={"patient": str})
    method = cfg.get("method", "stratified_group_kfold")
    if method == "fixed":  # the dataset's own train/val/test split (MedMNIST, folder layouts)
        from pipeline.datasets import make_fixed_splits

        splits = make_fixed_splits(manifest, val_fraction=float(cfg["val_fraction"]),
                                   seed=int(cfg["seed"]))
    elif method == "stratified_group_kfold":
        splits = make_splits(manifest, cfg)
    else:
        raise ValueError(f"folds.method={method!r}: use stratified_group_kfold or fixed")
    out = Path(cfg["dir"])
    out.mkdir(parents=True, exist_ok=True)
    splits.to_csv(out / "splits.csv", index=False)
    table = fold_table(splits, list(get(ds, "classes")))
    table.to_csv(out / "table1.csv", index=False)
    summary = {"method": method, "k": int(splits["fold"].nunique()), "seed": int(cfg["seed"]),
               "validation": cfg["validation"],
               "leaky_validation": cfg["validation"] == "test_fold",
               "patients": int(splits["patient"].nunique()),
               "test_frames_per_fold": {int(r.fold): int(r.total_frames) for r in table.itertuples()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("folds: %s", summary)
    if summary["leaky_validation"]:
        log.warning("folds.validation=test_fold: early stopping sees the test fold (LEAKS, as the "
                    "study's notebooks did); use only to reproduce the published protocol")


if __name__ == "__main__":
    main(sys.argv[1:])
