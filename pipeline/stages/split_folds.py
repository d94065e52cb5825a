"""Stage ``split_folds``: patient-level stratified k-fold, with validation carved by patient.

Frames of one video are near-duplicates and one patient may have several videos, so every split
is made over split groups, stratified by class. A split group is one patient, or several whose
ids share copies of one image (``folds.link_duplicates``, :mod:`pipeline.data.duplicates`): no copy
can then sit on two sides of a fold. Each fold's validation set (early stopping, best weights)
comes from that fold's training groups, chosen among seeded candidates so that it covers every
class and keeps each class's share of frames close to its share in training. The study's own
choice, validating on the test fold, is available as ``validation: test_fold`` and is labelled
as leaking wherever used.

Writes ``splits.csv`` (one row per fold and source, with its patient, group and side),
``table1.csv`` (test frames, videos and patients per class and fold, the study's Table I),
``val_table.csv`` (the same for each fold's validation set, with class shares),
``links.json`` (every linked group: which ids, which frames, which distance) and
``summary.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pipeline.core.cli import UserError, run_main
from pipeline.core.config import ConfigError, get, load_params
from pipeline.data.duplicates import (
    METHODS,
    cross_patient_pairs,
    frame_hashes,
    link_groups,
    linked_groups,
)

log = logging.getLogger("pipeline.stages.split_folds")

SIDES = ("train", "val", "test")
SPLIT_COLUMNS = ["fold", "source", "patient", "group", "class", "label", "frames", "split"]
MAX_SHARE_GAP = 0.10  # validation vs training share of a class's frames


class LeakageError(RuntimeError, UserError):
    """A patient appears on two sides of a split."""


def used_frames(manifest: pd.DataFrame, groups: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The manifest's used frames with ``patient`` as text and its split ``group``."""
    frames = manifest[manifest["status"] == "used"].copy()
    frames["patient"] = frames["patient"].astype(str)
    frames["group"] = [(groups or {}).get(p, p) for p in frames["patient"]]
    return frames


def group_strata(frames: pd.DataFrame) -> pd.Series:
    """Class label of each group: its most frequent one (ties: the lowest class index)."""
    return frames.groupby("group")["label"].agg(lambda s: s.value_counts().sort_index().idxmax())


def assign_folds(frames: pd.DataFrame, k: int, seed: int) -> dict[str, int]:
    """Test fold of every group: stratified group k-fold over frames.

    Args:
        frames: one row per frame with ``group`` and ``label``.
    """
    n_groups = frames["group"].nunique()
    if n_groups < k:
        raise ConfigError(f"{n_groups} patient groups cannot fill {k} folds: lower folds.k")
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold_of: dict[str, int] = {}
    for fold, (_, test_idx) in enumerate(sgkf.split(frames, frames["label"], frames["group"])):
        for g in frames["group"].iloc[test_idx].unique():
            fold_of[g] = fold
    return fold_of


def validation_quota(n_groups: int, fraction: float) -> int:
    """Validation groups of a class with ``n_groups`` training groups: about ``fraction`` of
    them, at least 2 where there are 6 or more, at least 1 where there are 2 or more, and
    never all of them."""
    floor = 2 if n_groups >= 6 else 1 if n_groups >= 2 else 0
    return min(max(floor, round(fraction * n_groups)), max(n_groups - 1, 0))


def share_gap(class_frames: pd.DataFrame, val: set[str]) -> float:
    """Largest difference, over classes, between a class's share of the validation frames and
    its share of the remaining training frames (``class_frames``: groups x classes)."""
    counts = class_frames.to_numpy()
    is_val = class_frames.index.isin(list(val))
    v, t = counts[is_val].sum(axis=0), counts[~is_val].sum(axis=0)
    if v.sum() == 0 or t.sum() == 0:
        return 1.0
    return float(np.abs(v / v.sum() - t / t.sum()).max())


def carve_validation(frames: pd.DataFrame, train_groups: Sequence[str], fraction: float,
                     seed: int, candidates: int) -> tuple[set[str], dict]:
    """Pick validation groups among ``train_groups``.

    Each class gets :func:`validation_quota` groups (by the class of the group); among
    ``candidates`` seeded random draws, the one with the smallest :func:`share_gap` wins (ties:
    the validation frame fraction closest to ``fraction``).

    Returns:
        The validation groups and ``{share_gap, frame_fraction, candidates}`` of the choice.
    """
    sub = frames[frames["group"].isin(set(train_groups))]
    class_frames = sub.groupby(["group", "label"]).size().unstack(fill_value=0)
    strata = group_strata(sub)
    pools = {c: sorted(strata.index[strata == c]) for c in sorted(strata.unique())}
    quota = {c: validation_quota(len(g), fraction) for c, g in pools.items()}
    if not any(quota.values()):  # one group per class: validate on one of the largest class
        quota[max(pools, key=lambda c: len(pools[c]))] = 1
    rng = np.random.default_rng(seed)
    total = class_frames.to_numpy().sum()
    best: tuple[float, float, float, set[str]] | None = None  # gap, |frac - fraction|, frac, val
    for _ in range(max(1, int(candidates))):
        val = {str(g) for c, n in quota.items()
               for g in rng.choice(pools[c], size=n, replace=False)}
        frac = float(class_frames.loc[sorted(val)].to_numpy().sum() / total)
        key = (round(share_gap(class_frames, val), 6), abs(frac - fraction), frac, val)
        if best is None or key[:2] < best[:2]:
            best = key
    gap, _, frac, val = best
    return val, {"share_gap": gap, "frame_fraction": round(frac, 4), "candidates": int(candidates)}


def per_source(frames: pd.DataFrame, extra: Sequence[str] = ()) -> pd.DataFrame:
    """One row per source: ``source, patient, group, class, label, *extra, frames``."""
    keys = ["source", "patient", "group", "class", "label", *extra]
    return frames.groupby(keys, as_index=False).size().rename(columns={"size": "frames"})


def make_splits(manifest: pd.DataFrame, cfg: Mapping, groups: Mapping[str, str] | None = None
                ) -> tuple[pd.DataFrame, dict]:
    """One row per (fold, source file): its patient, group, class, frame count and split role.

    Args:
        groups: split group of each patient (:func:`pipeline.data.duplicates.link_groups`); None =
            every patient its own group.

    Returns:
        The splits table and, per fold, how its validation set was chosen.
    """
    frames = used_frames(manifest, groups)
    k, seed = int(cfg["k"]), int(cfg["seed"])
    if cfg["validation"] not in ("train_patients", "test_fold"):
        raise ConfigError(f"folds.validation must be 'train_patients' or 'test_fold', "
                          f"not {cfg['validation']!r}")
    fold_of = assign_folds(frames, k, seed)
    sources = per_source(frames)
    rows, carving = [], {}
    for fold in range(k):
        test = {g for g, f in fold_of.items() if f == fold}
        if cfg["validation"] == "test_fold":
            val = test
        else:
            val, carving[fold] = carve_validation(frames, sorted(set(fold_of) - test),
                                                  float(cfg["val_fraction"]), seed + fold,
                                                  int(cfg["val_candidates"]))
        for src in sources.to_dict("records"):
            role = "test" if src["group"] in test else "val" if src["group"] in val else "train"
            rows.append({"fold": fold, **src, "split": role})
            if role == "test" and src["group"] in val:  # test_fold: validation = test
                rows.append({"fold": fold, **src, "split": "val"})
    splits = pd.DataFrame(rows)[SPLIT_COLUMNS]
    check_no_leakage(splits, leaky_validation=cfg["validation"] == "test_fold")
    return splits, carving


def make_fixed_splits(manifest: pd.DataFrame, val_fraction: float, seed: int, candidates: int,
                      groups: Mapping[str, str] | None = None) -> tuple[pd.DataFrame, dict]:
    """The splits table of a dataset's fixed split: one fold 0, each source's role taken from
    the manifest's ``split`` column.

    Without any ``val`` image, validation groups are carved from the training ones as in
    :func:`carve_validation`. A patient on two sides of the dataset's own split is logged as a
    warning, not an error: the split is the dataset's, reproduced as published.

    Raises:
        ConfigError: no ``split`` column, an unknown split name, or no train or test image.
    """
    if "split" not in manifest.columns:
        raise ConfigError("folds.method=fixed needs a manifest 'split' column (dataset kinds "
                          "image_folders, medmnist_npz); use folds.method=stratified_group_kfold")
    frames = used_frames(manifest, groups)
    frames["split"] = frames["split"].fillna("").astype(str)
    bad = sorted(set(frames["split"]) - set(SIDES))
    if bad:
        raise ConfigError(f"manifest split values {bad} are not train/val/test")
    for needed in ("train", "test"):
        if not (frames["split"] == needed).any():
            raise ConfigError(f"the fixed split has no '{needed}' image")
    sources = per_source(frames, ["split"])
    carving = {}
    if not (sources["split"] == "val").any():
        train = frames[frames["split"] == "train"]
        val, carving[0] = carve_validation(train, sorted(train["group"].unique()),
                                           val_fraction, seed, candidates)
        sources.loc[(sources["split"] == "train") & sources["group"].isin(val), "split"] = "val"
        log.info("no validation images in the fixed split: %d training groups carved as "
                 "validation (val_fraction %s, seed %s)", len(val), val_fraction, seed)
    sides = {s: set(sources.loc[sources["split"] == s, "patient"]) for s in SIDES}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        both = sides[a] & sides[b]
        if both:
            log.warning("fixed split: %d patient(s) in both %s and %s (the dataset's own split), "
                        "e.g. %s", len(both), a, b, sorted(both)[:5])
    sources.insert(0, "fold", 0)
    return sources[SPLIT_COLUMNS], carving


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
        sides = {s: set(part.loc[part["split"] == s, "patient"]) for s in SIDES}
        pairs = [("train", "test"), ("train", "val")] + ([] if leaky_validation else [("val", "test")])
        for a, b in pairs:
            both = sides[a] & sides[b]
            if both:
                raise LeakageError(f"fold {fold}: patients in both {a} and {b}: {sorted(both)}")


def fold_table(splits: pd.DataFrame, classes: Sequence[str], side: str = "test") -> pd.DataFrame:
    """Frames, videos and patients per class in each fold's ``side``: the study's Table I for
    ``test``; for ``val`` also each class's share of the validation and of the training frames."""
    rows = []
    for fold, part in splits.groupby("fold"):
        mine, train = part[part["split"] == side], part[part["split"] == "train"]
        row: dict = {"fold": int(fold)}
        for cls in classes:
            c = mine[mine["class"] == cls]
            row[f"{cls}_frames"] = int(c["frames"].sum())
            row[f"{cls}_videos"] = int(len(c))
            row[f"{cls}_patients"] = int(c["patient"].nunique())
        row["total_frames"] = int(mine["frames"].sum())
        if side == "val":
            for cls in classes:
                row[f"{cls}_share"] = round(row[f"{cls}_frames"] / max(row["total_frames"], 1), 3)
                row[f"{cls}_train_share"] = round(
                    int(train.loc[train["class"] == cls, "frames"].sum())
                    / max(int(train["frames"].sum()), 1), 3)
        rows.append(row)
    return pd.DataFrame(rows)


def duplicate_groups(manifest: pd.DataFrame, frames_dir: str | Path, link: Mapping
                     ) -> tuple[dict[str, str], list[dict]]:
    """Split groups from ``folds.link_duplicates`` and the linked groups with their evidence."""
    method = str(link["method"])
    if method not in METHODS:
        raise ConfigError(f"folds.link_duplicates.method={method!r}: use one of {list(METHODS)}")
    patients = sorted(manifest.loc[manifest["status"] == "used", "patient"].astype(str).unique())
    if method == "off":
        return {p: p for p in patients}, []
    frames, unreadable = frame_hashes(manifest, frames_dir, perceptual=method == "perceptual")
    if unreadable:
        raise ConfigError(f"{len(unreadable)} frame(s) of {frames_dir}/manifest.csv are missing or "
                          f"unreadable (e.g. {unreadable[:3]}): rerun extract_frames")
    pairs = cross_patient_pairs(frames, method, int(link["threshold"]))
    groups = link_groups(patients, pairs)
    return groups, linked_groups(groups, pairs)


def write_outputs(out: Path, splits: pd.DataFrame, classes: Sequence[str], summary: dict,
                  linked: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    splits.to_csv(out / "splits.csv", index=False)
    fold_table(splits, classes).to_csv(out / "table1.csv", index=False)
    fold_table(splits, classes, "val").to_csv(out / "val_table.csv", index=False)
    (out / "links.json").write_text(json.dumps(linked, indent=2) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    params = load_params()
    cfg, ds = get(params, "folds"), get(params, "dataset")
    manifest = pd.read_csv(Path(ds["frames_dir"]) / "manifest.csv", dtype={"patient": str})
    link = get(cfg, "link_duplicates")
    groups, linked = duplicate_groups(manifest, ds["frames_dir"], link)
    method = cfg["method"]
    if method == "fixed":  # the dataset's own train/val/test split (MedMNIST, folder layouts)
        splits, carving = make_fixed_splits(manifest, float(cfg["val_fraction"]), int(cfg["seed"]),
                                            int(cfg["val_candidates"]), groups)
    elif method == "stratified_group_kfold":
        splits, carving = make_splits(manifest, cfg, groups)
    else:
        raise ConfigError(f"folds.method={method!r}: use stratified_group_kfold or fixed")
    classes = list(get(ds, "classes"))
    table = fold_table(splits, classes)
    summary = {"method": method, "k": int(splits["fold"].nunique()), "seed": int(cfg["seed"]),
               "validation": cfg["validation"],
               "leaky_validation": cfg["validation"] == "test_fold",
               "patients": int(splits["patient"].nunique()),
               "groups": int(splits["group"].nunique()),
               "link_duplicates": {**dict(link), "linked_groups": len(linked),
                                   "linked_patients": sum(len(g["patients"]) for g in linked)},
               "validation_carving": {int(f): c for f, c in carving.items()},
               "test_frames_per_fold": {int(r.fold): int(r.total_frames) for r in table.itertuples()}}
    write_outputs(Path(cfg["dir"]), splits, classes, summary, linked)
    log.info("folds: %d patients in %d split groups, %s", summary["patients"], summary["groups"],
             {k: v for k, v in summary.items() if k not in ("patients", "groups")})
    for g in linked:
        log.warning("linked patients %s into one split group (%s; details in %s/links.json)",
                    g["patients"], "; ".join(f"{'/'.join(l['patients'])}: {l['frame_pairs']} "
                                               f"frame pair(s), {'+'.join(l['kinds'])}, distance "
                                               f">= {l['min_distance']}" for l in g["links"]),
                    cfg["dir"])
    for fold, c in carving.items():
        if c["share_gap"] > MAX_SHARE_GAP:
            log.warning("fold %d: the validation set's class shares differ from training by up to "
                        "%.0f points (best of %d candidates): too few patients per class",
                        fold, 100 * c["share_gap"], c["candidates"])
    if summary["leaky_validation"]:
        log.warning("folds.validation=test_fold: early stopping sees the test fold (LEAKS, as the "
                    "study's notebooks did); use only to reproduce the published protocol")


if __name__ == "__main__":
    run_main(main)
