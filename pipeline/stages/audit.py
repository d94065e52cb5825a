"""Stage ``audit``: the leakage check that training requires. ``python -m pipeline.stages.audit``.

Checks, from the frame manifest and the splits table (paths from ``params.yaml``), that in no
fold a patient, a source file, or a copy of a frame is on two sides: train vs test, train vs
validation, and validation vs test unless the validation is the test fold by design
(``folds.validation: test_fold``, labelled leaky elsewhere). Patients are taken from the
manifest, not from the splits' own copy, so a splits table that misnames a patient cannot hide
a leak; any disagreement is an error.

Copies are found with the hashes of :mod:`pipeline.data.duplicates`, the ones ``split_folds`` links
patients with: a byte-identical frame on two sides is always a leak; a perceptual near-duplicate
(pHash within ``folds.link_duplicates.threshold``) of another patient is a leak when the folds
promise to link such copies (``method: perceptual``), and a warning otherwise.

Writes ``audit.report`` (with the SHA-256 of the manifest and splits it vouches for, which the
train stage checks) and exits 1 on any leak or error, with a last line that says what was found
and which option resolves it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.core.cli import run_main
from pipeline.core.config import get, load_params
from pipeline.core.files import audit_inputs
from pipeline.data.duplicates import cross_patient_pairs, frame_hashes

log = logging.getLogger("pipeline.stages.audit")

SIDES = ("train", "val", "test")
MAX_LISTED = 200  # items listed per finding; the counts are always complete


def side_pairs(leaky_validation: bool) -> list[tuple[str, str]]:
    """Pairs of sides that must not share anything in a fold."""
    pairs = [("train", "test"), ("train", "val")]
    return pairs if leaky_validation else pairs + [("val", "test")]


def check_consistency(frames: pd.DataFrame, splits: pd.DataFrame) -> list[str]:
    """Errors that make the audit unable to vouch for the splits."""
    errors = []
    patient_of = frames.drop_duplicates("source").set_index("source")["patient"]
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


def sides_by_fold(splits: pd.DataFrame) -> dict[int, dict[str, str]]:
    """``{fold: {source: side}}``; a source listed twice keeps its test side (what leaks)."""
    out: dict[int, dict[str, str]] = {}
    order = {"train": 0, "val": 1, "test": 2}
    for fold, part in splits.sort_values("split", key=lambda s: s.map(order)).groupby("fold"):
        out[int(fold)] = dict(zip(part["source"], part["split"]))
    return out


def find_leaks(frames: pd.DataFrame, splits: pd.DataFrame, copies: pd.DataFrame,
               leaky_validation: bool) -> list[dict]:
    """Patients, sources and copies of a frame on two sides of a fold.

    Args:
        frames: used frames with ``frame, source, patient`` (patients from the manifest).
        splits: ``fold, source, split`` rows.
        copies: the frame pairs of different patients that count as copies
            (:func:`pipeline.data.duplicates.cross_patient_pairs`).
    """
    leaks = []
    patient_of = frames.drop_duplicates("source").set_index("source")["patient"]
    for fold, part in splits.groupby("fold"):
        sources = {s: set(part.loc[part["split"] == s, "source"]) for s in SIDES}
        patients = {s: {patient_of.get(src, f"?{src}") for src in v} for s, v in sources.items()}
        for a, b in side_pairs(leaky_validation):
            for kind, by_side in (("patient", patients), ("source", sources)):
                both = sorted(by_side[a] & by_side[b])
                if both:
                    leaks.append({"fold": int(fold), "sides": [a, b], "kind": kind,
                                  "count": len(both), "items": both[:MAX_LISTED]})
            across = copies[(copies["source_a"].isin(sources[a]) & copies["source_b"].isin(sources[b]))
                            | (copies["source_a"].isin(sources[b]) & copies["source_b"].isin(sources[a]))]
            for kind, part_kind in across.groupby("kind"):
                leaks.append({"fold": int(fold), "sides": [a, b], "kind": f"{kind}_frame",
                              "count": int(len(part_kind)),
                              "items": [{"frames": [r.frame_a, r.frame_b],
                                         "patients": [r.patient_a, r.patient_b],
                                         "sources": [r.source_a, r.source_b],
                                         "distance": int(r.distance)}
                                        for r in part_kind.head(MAX_LISTED).itertuples()]})
    return leaks


def near_duplicate_summary(pairs: pd.DataFrame, threshold: int, splits: pd.DataFrame) -> dict:
    """Near-duplicate frame pairs of different patients, per patient pair, with the folds in
    which the two sit on different sides."""
    sides = sides_by_fold(splits)
    listed = []
    for (pa, pb), part in pairs.groupby(["patient_a", "patient_b"]):
        opposite = sorted({fold for fold, side in sides.items() for r in part.itertuples()
                           if side.get(r.source_a) and side.get(r.source_b)
                           and side[r.source_a] != side[r.source_b]})
        listed.append({"patients": [pa, pb], "frame_pairs": int(len(part)),
                       "min_distance": int(part["distance"].min()),
                       "examples": [{"frames": [r.frame_a, r.frame_b], "distance": int(r.distance)}
                                    for r in part.head(5).itertuples()],
                       "opposite_sides_in_folds": opposite})
    listed.sort(key=lambda e: (e["min_distance"], -e["frame_pairs"]))
    return {"threshold": int(threshold), "frame_pairs": int(len(pairs)),
            "patient_pairs": len(listed), "pairs": listed[:MAX_LISTED]}


def audit(manifest: pd.DataFrame, splits: pd.DataFrame, frames_dir: str | Path, *,
          threshold: int, link_method: str = "perceptual", leaky_validation: bool = False) -> dict:
    """The full audit; ``report['ok']`` is False on any leak or error.

    Args:
        threshold: largest pHash distance (of 256 bits) at which frames of different patients
            count as near-duplicates.
        link_method: ``folds.link_duplicates.method``; with ``perceptual`` a near-duplicate on
            two sides is a leak, otherwise a warning.
    """
    splits = splits.assign(patient=splits["patient"].astype(str), source=splits["source"].astype(str))
    frames, unreadable = frame_hashes(manifest, frames_dir)
    errors = check_consistency(frames, splits)
    if unreadable:
        errors.append(f"{len(unreadable)} frame file(s) missing or unreadable under {frames_dir}: "
                      f"{unreadable[:MAX_LISTED]}")
    pairs = cross_patient_pairs(frames, "perceptual", threshold)
    gated = pairs if link_method == "perceptual" else pairs[pairs["kind"] == "identical"]
    leaks = find_leaks(frames, splits, gated, leaky_validation)
    return {
        "ok": not leaks and not errors,
        "folds": sorted(int(f) for f in splits["fold"].unique()),
        "checked": {"frames": int(len(frames)), "sources": int(frames["source"].nunique()),
                    "patients": int(frames["patient"].nunique()),
                    "side_pairs": [list(p) for p in side_pairs(leaky_validation)],
                    "link_method": link_method},
        "leaky_validation": leaky_validation,
        "leaks": leaks,
        "errors": errors,
        "warnings": {
            "identical_frames_across_patients": int((pairs["kind"] == "identical").sum()),
            "near_duplicates": near_duplicate_summary(pairs, threshold, splits)},
    }


def verdict(report: dict, link_method: str, report_path: str | Path) -> str:
    """One line: what the audit found and what resolves it."""
    if report["ok"]:
        return (f"audit passed: {report['checked']['frames']} frames / "
                f"{report['checked']['patients']} patients over folds {report['folds']} ({report_path})")
    counts: dict[str, int] = {}
    for leak in report["leaks"]:
        counts[leak["kind"]] = counts.get(leak["kind"], 0) + leak["count"]
    found = ", ".join(f"{n} {kind.replace('_', ' ')}(s)" for kind, n in sorted(counts.items()))
    found = "; ".join(x for x in (found and f"leaks: {found} on two sides of a fold",
                                  report["errors"] and f"{len(report['errors'])} error(s)") if x)
    copies = {"identical_frame", "near_frame"} & set(counts)
    if copies and link_method != "perceptual" and not {"patient", "source"} & set(counts):
        fix = ("copies of one image are filed under different patient ids: set "
               "folds.link_duplicates.method=perceptual (dvc exp run -S ...) so that such "
               "patients form one split group")
    else:
        fix = "the splits do not match the frames: rerun `dvc repro split_folds`"
    return f"audit FAILED: {found}; {fix}; details in {report_path}"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (1 on any leak or error)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages.audit", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    ds, fcfg = get(params, "dataset"), get(params, "folds")
    link = get(fcfg, "link_duplicates")
    manifest = pd.read_csv(Path(ds["frames_dir"]) / "manifest.csv", dtype={"patient": str})
    splits = pd.read_csv(Path(fcfg["dir"]) / "splits.csv", dtype={"patient": str})
    report = audit(manifest, splits, ds["frames_dir"], threshold=int(link["threshold"]),
                   link_method=str(link["method"]),
                   leaky_validation=fcfg["validation"] == "test_fold")
    out = Path(get(params, "audit.report"))
    if fcfg["method"] == "fixed" and report["leaks"]:
        # A fixed split is the dataset's published one (e.g. MedMNIST's): overlaps in it are a
        # property of that benchmark, kept so results stay comparable, and reported as such.
        report["official_split_overlaps"] = report["leaks"]
        report["leaks"] = []
        report["ok"] = not report["errors"]
        for leak in report["official_split_overlaps"]:
            log.warning("the dataset's own split shares %d %s(s) between %s and %s (kept as "
                        "published; listed in %s)", leak["count"], leak["kind"], *leak["sides"], out)
    report["inputs"] = audit_inputs(params)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for e in report["warnings"]["near_duplicates"]["pairs"][:10]:
        log.warning("near-duplicate frames of patients %s and %s: %d pair(s), distance >= %d%s",
                    *e["patients"], e["frame_pairs"], e["min_distance"],
                    f", opposite sides in folds {e['opposite_sides_in_folds']}"
                    if e["opposite_sides_in_folds"] else "")
    for err in report["errors"]:
        log.error("%s", err)
    for leak in report["leaks"]:
        log.error("LEAK fold %d, %s vs %s: %d %s(s), e.g. %s", leak["fold"], *leak["sides"],
                  leak["count"], leak["kind"], leak["items"][:3])
    line = verdict(report, str(link["method"]), out)
    if report["ok"]:
        log.info("%s", line)
        return 0
    print(f"error: {line}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    run_main(main)
