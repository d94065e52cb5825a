"""Leakage audit of the folds: ``python -m pipeline.audit [--near-duplicate-threshold 4]``.

Checks, from the frame manifest and the splits table (paths from ``params.yaml``), that in no
fold a patient, a source file, or a byte-identical frame (sha256 of the frame file) is on two
sides: train vs test, train vs validation, and validation vs test unless the validation is the
test fold by design (``folds.validation: test_fold``, labelled leaky elsewhere). Patients are
taken from the manifest, not from the splits' own copy, so a splits table that misnames a
patient cannot hide a leak; any disagreement is an error.

Near-duplicate frames of *different* patients (perceptual hash within a Hamming distance) are
reported as warnings: they may be one patient under two ids, or a figure reused by two papers,
but similar ultrasound frames also occur by chance, so only a person can decide.

Writes a JSON report (``reports/audit.json`` by default); exits 1 on any leak or error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.config import get, load_params

log = logging.getLogger("pipeline.audit")

SIDES = ("train", "val", "test")
MAX_LISTED = 200  # items listed per finding; the counts are always complete


def side_pairs(leaky_validation: bool) -> list[tuple[str, str]]:
    """Pairs of sides that must not share anything in a fold."""
    pairs = [("train", "test"), ("train", "val")]
    return pairs if leaky_validation else pairs + [("val", "test")]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def perceptual_hash(img: np.ndarray) -> int:
    """64-bit DCT hash (pHash): the signs of the 8 x 8 lowest frequencies of the 32 x 32
    grayscale image against their median. Survives re-encoding, resizing and mild noise."""
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.ndim == 3 else img
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low > np.median(low)
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise distance between uint64 hashes (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(a, b))


def frame_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest's used frames: ``frame, source, patient``."""
    used = manifest[manifest["status"] == "used"]
    return used[["frame", "source", "patient"]].astype(str).reset_index(drop=True)


def hash_frames(frames: pd.DataFrame, frames_dir: str | Path, perceptual: bool = True
                ) -> tuple[pd.DataFrame, list[str]]:
    """Add ``sha256`` (and ``phash``) columns; returns the table and the unreadable frames."""
    frames_dir = Path(frames_dir)
    shas, phashes, missing = [], [], []
    for name in frames["frame"]:
        path = frames_dir / name
        if not path.is_file():
            missing.append(name)
            shas.append("")
            phashes.append(0)
            continue
        shas.append(sha256_file(path))
        img = cv2.imread(str(path), cv2.IMREAD_COLOR) if perceptual else None
        if perceptual and img is None:
            missing.append(name)
        phashes.append(perceptual_hash(img) if img is not None else 0)
    out = frames.assign(sha256=shas)
    if perceptual:
        out["phash"] = np.array(phashes, dtype=np.uint64)
    return out, missing


def check_consistency(manifest_frames: pd.DataFrame, splits: pd.DataFrame,
                      leaky_validation: bool) -> list[str]:
    """Errors that make the audit unable to vouch for the splits."""
    errors = []
    patient_of = manifest_frames.drop_duplicates("source").set_index("source")["patient"]
    unknown = sorted(set(splits["source"]) - set(patient_of.index))
    if unknown:
        errors.append(f"{len(unknown)} source(s) in the splits have no used frame in the "
                      f"manifest: {unknown[:MAX_LISTED]}")
    known = splits[splits["source"].isin(patient_of.index)]
    wrong = known[known["patient"].astype(str) != known["source"].map(patient_of)]
    if not wrong.empty:
        pairs = sorted({f"{r.source}: splits say {r.patient}, manifest says {patient_of[r.source]}"
                        for r in wrong.itertuples()})
        errors.append(f"{len(pairs)} source(s) carry another patient in the splits than in the "
                      f"manifest: {pairs[:MAX_LISTED]}")
    bad_sides = sorted(set(splits["split"]) - set(SIDES))
    if bad_sides:
        errors.append(f"unknown split names {bad_sides} (expected {list(SIDES)})")
    for fold, part in splits.groupby("fold"):
        missing = sorted(set(patient_of.index) - set(part["source"]))
        if missing:
            errors.append(f"fold {fold}: {len(missing)} used source(s) on no side: "
                          f"{missing[:MAX_LISTED]}")
        if not (part["split"] == "test").any() or not (part["split"] == "train").any():
            errors.append(f"fold {fold} lacks a train or a test side")
    return errors


def find_leaks(frames: pd.DataFrame, splits: pd.DataFrame, leaky_validation: bool
               ) -> list[dict]:
    """Patients, sources and frame contents on two sides of a fold.

    Args:
        frames: used frames with ``frame, source, patient, sha256`` (patients from the manifest).
        splits: ``fold, source, split`` rows.
    """
    leaks = []
    patient_of = frames.drop_duplicates("source").set_index("source")["patient"]
    for fold, part in splits.groupby("fold"):
        sources = {s: set(part.loc[part["split"] == s, "source"]) for s in SIDES}
        sets = {
            "patient": {s: {patient_of.get(src, f"?{src}") for src in v} for s, v in sources.items()},
            "source": sources,
            "identical_frame": {s: set(frames.loc[frames["source"].isin(v) & (frames["sha256"] != ""),
                                                  "sha256"]) for s, v in sources.items()},
        }
        for a, b in side_pairs(leaky_validation):
            for kind, by_side in sets.items():
                both = sorted(by_side[a] & by_side[b])
                if not both:
                    continue
                leak = {"fold": int(fold), "sides": [a, b], "kind": kind, "count": len(both),
                        "items": both[:MAX_LISTED]}
                if kind == "identical_frame":  # name the frames, not only their hashes
                    hit = frames[frames["sha256"].isin(set(both))]
                    leak["items"] = [
                        {"sha256": h, "frames": sorted(g["frame"])[:10],
                         "patients": sorted(set(g["patient"])), "sources": sorted(set(g["source"]))}
                        for h, g in list(hit.groupby("sha256"))[:MAX_LISTED]]
                leaks.append(leak)
    return leaks


def sides_by_fold(splits: pd.DataFrame) -> dict[int, dict[str, str]]:
    """``{fold: {source: side}}``; a source listed twice keeps its test side (what leaks)."""
    out: dict[int, dict[str, str]] = {}
    order = {"train": 0, "val": 1, "test": 2}
    for fold, part in splits.sort_values("split", key=lambda s: s.map(order)).groupby("fold"):
        out[int(fold)] = dict(zip(part["source"], part["split"]))
    return out


def near_duplicates(frames: pd.DataFrame, threshold: int, splits: pd.DataFrame | None = None,
                    chunk: int = 1024) -> dict:
    """Frame pairs of different patients whose perceptual hashes are within ``threshold`` bits,
    summarised per patient pair, with the folds in which the two sit on different sides."""
    h = frames["phash"].to_numpy(dtype=np.uint64)
    patients = frames["patient"].to_numpy()
    found: list[tuple[int, int, int]] = []
    for start in range(0, len(h), chunk):
        block = hamming(h[start:start + chunk, None], h[None, :])
        rows, cols = np.nonzero(block <= threshold)
        keep = (cols > rows + start) & (patients[rows + start] != patients[cols])
        found.extend(zip((rows + start)[keep].tolist(), cols[keep].tolist(),
                         block[rows[keep], cols[keep]].tolist()))
    sides = sides_by_fold(splits) if splits is not None else {}
    pairs: dict[tuple[str, str], dict] = {}
    for i, j, d in sorted(found, key=lambda t: t[2]):
        fi, fj = frames.iloc[i], frames.iloc[j]
        if fi["patient"] > fj["patient"]:
            fi, fj = fj, fi
        key = (fi["patient"], fj["patient"])
        entry = pairs.setdefault(key, {"patients": list(key), "frame_pairs": 0, "min_distance": d,
                                       "examples": [], "opposite_sides_in_folds": set()})
        entry["frame_pairs"] += 1
        if len(entry["examples"]) < 5:
            entry["examples"].append({"frames": [fi["frame"], fj["frame"]], "distance": int(d)})
        for fold, side in sides.items():
            a, b = side.get(fi["source"]), side.get(fj["source"])
            if a and b and a != b:
                entry["opposite_sides_in_folds"].add(fold)
    listed = sorted(pairs.values(), key=lambda e: (e["min_distance"], -e["frame_pairs"]))
    for e in listed:
        e["opposite_sides_in_folds"] = sorted(e["opposite_sides_in_folds"])
    return {"threshold": int(threshold), "frame_pairs": len(found), "patient_pairs": len(listed),
            "pairs": listed[:MAX_LISTED]}


def audit(manifest: pd.DataFrame, splits: pd.DataFrame, frames_dir: str | Path, *,
          near_duplicate_threshold: int | None = 4, leaky_validation: bool = False) -> dict:
    """The full audit; ``report['ok']`` is False on any leak or error.

    Args:
        near_duplicate_threshold: largest Hamming distance (of 64 bits) reported; None or a
            negative value skips the perceptual hashing.
    """
    splits = splits.assign(patient=splits["patient"].astype(str), source=splits["source"].astype(str))
    perceptual = near_duplicate_threshold is not None and near_duplicate_threshold >= 0
    frames, unreadable = hash_frames(frame_table(manifest), frames_dir, perceptual)
    errors = check_consistency(frames, splits, leaky_validation)
    if unreadable:
        errors.append(f"{len(unreadable)} frame file(s) missing or unreadable under {frames_dir}: "
                      f"{unreadable[:MAX_LISTED]}")
    leaks = find_leaks(frames, splits, leaky_validation)
    identical = frames[frames["sha256"] != ""].groupby("sha256")["patient"].nunique()
    warnings = {"identical_frames_across_patients": int((identical > 1).sum())}
    if perceptual:
        warnings["near_duplicates"] = near_duplicates(frames[frames["sha256"] != ""]
                                                      .reset_index(drop=True),
                                                      int(near_duplicate_threshold), splits)
    return {
        "ok": not leaks and not errors,
        "folds": sorted(int(f) for f in splits["fold"].unique()),
        "checked": {"frames": int(len(frames)), "sources": int(frames["source"].nunique()),
                    "patients": int(frames["patient"].nunique()),
                    "side_pairs": [list(p) for p in side_pairs(leaky_validation)]},
        "leaky_validation": leaky_validation,
        "leaks": leaks,
        "errors": errors,
        "warnings": warnings,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (1 on any leak or error)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.audit", description=__doc__.split("\n")[0])
    parser.add_argument("--near-duplicate-threshold", type=int, default=4,
                        help="Hamming distance (of 64 bits) up to which frames of different "
                             "patients are reported; negative: skip (default 4)")
    parser.add_argument("--out", default="reports/audit.json", help="report path")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params(args.params)
    ds, fcfg = get(params, "dataset"), get(params, "folds")
    manifest = pd.read_csv(Path(ds["frames_dir"]) / "manifest.csv", dtype={"patient": str})
    splits = pd.read_csv(Path(fcfg["dir"]) / "splits.csv", dtype={"patient": str})
    report = audit(manifest, splits, ds["frames_dir"],
                   near_duplicate_threshold=args.near_duplicate_threshold,
                   leaky_validation=fcfg.get("validation") == "test_fold")
    if fcfg.get("method") == "fixed" and report["leaks"]:
        # A fixed split is the dataset's published one (e.g. MedMNIST's): overlaps in it are a
        # property of that benchmark, kept so results stay comparable, and reported as such.
        report["official_split_overlaps"] = report["leaks"]
        report["leaks"] = []
        report["ok"] = not report["errors"]
        for leak in report["official_split_overlaps"]:
            log.warning("the dataset's own split shares %d %s(s) between %s and %s (kept as "
                        "published; listed in %s)", leak["count"], leak["kind"], *leak["sides"],
                        args.out)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    near = report["warnings"].get("near_duplicates", {})
    for e in near.get("pairs", [])[:10]:
        log.warning("near-duplicate frames of patients %s and %s: %d pair(s), distance >= %d%s",
                    *e["patients"], e["frame_pairs"], e["min_distance"],
                    f", opposite sides in folds {e['opposite_sides_in_folds']}"
                    if e["opposite_sides_in_folds"] else "")
    for err in report["errors"]:
        log.error("%s", err)
    for leak in report["leaks"]:
        log.error("LEAK fold %d, %s vs %s: %d %s(s), e.g. %s", leak["fold"], *leak["sides"],
                  leak["count"], leak["kind"], leak["items"][:3])
    log.info("audit of %d frames / %d patients over folds %s: %s (%s)", report["checked"]["frames"],
             report["checked"]["patients"], report["folds"],
             "no leak" if report["ok"] else "FAILED", out)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
