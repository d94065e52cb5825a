"""The lung-ultrasound video dataset (``dataset.kind: lus_videos``): the folder layout of the
POCOVID-Net collection (convex videos and images, a metadata CSV with patient ids and frame
rates), class by file-name prefix, patient by metadata or name rules.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from pipeline.core.config import get
from pipeline.data.frames import (
    IMAGE_EXTS,
    MANIFEST_COLUMNS,
    VIDEO_EXTS,
    ExtractionError,
    InputFile,
    Result,
    _decode_all,
    _frame_name,
    check_accounting,
    process_file,
    strict_error,
)

log = logging.getLogger("pipeline.data.lus_videos")


def patient_id(stem: str, metadata_patient: Mapping[str, str], rules: Sequence[Mapping]) -> str:
    """Group id of a file: the metadata's patient id, else the first matching name rule, else
    the file itself (one video = one patient, the safe default)."""
    if stem in metadata_patient:
        return metadata_patient[stem]
    for rule in rules:
        m = re.match(rule["pattern"], stem)
        if m:
            return "name:" + m.expand(rule["group"])
    return "file:" + stem


def read_metadata(path: Path, filename_col: str, patient_col: str, fps_col: str
                  ) -> tuple[dict[str, str], dict[str, float]]:
    """Patient ids and frame rates by file stem from the dataset's metadata CSV."""
    if not path.is_file():
        log.warning("no metadata file %s: patients come from file-name rules", path)
        return {}, {}
    meta = pd.read_csv(path, dtype=str)
    for col in (filename_col, patient_col):
        if col not in meta.columns:
            raise ExtractionError(f"{path}: column '{col}' missing (columns: {list(meta.columns)})")
    patients, fps = {}, {}
    for _, row in meta.iterrows():
        stem = str(row[filename_col]).strip()
        pid = row[patient_col]
        if isinstance(pid, str) and pid.strip():
            pid = pid.strip()
            pid = pid[:-2] if pid.endswith(".0") else pid
            patients[stem] = f"meta:{pid}"
        if fps_col in meta.columns:
            try:
                value = float(row[fps_col])
                if math.isfinite(value) and value > 0:
                    fps[stem] = value
            except (TypeError, ValueError):
                pass
    return patients, fps


def classify(stem: str, classes: Mapping[str, Sequence[str]], ignore: Sequence[str]) -> str | None:
    """Class name from the file-name prefix; ``None`` for a known-but-unused prefix."""
    for name, prefixes in classes.items():
        if any(stem.startswith(p) for p in prefixes):
            return name
    if any(stem.startswith(p) for p in ignore):
        return None
    raise KeyError(stem)


def inventory(raw_dir: Path, ds: Mapping) -> list[InputFile]:
    """Every file under the media folders, with the selection's decision about each."""
    classes = get(ds, "classes")
    class_names = list(classes)
    metadata_patient, metadata_fps = read_metadata(
        raw_dir / ds["metadata"]["file"], ds["metadata"]["filename_column"],
        ds["metadata"]["patient_column"], ds["metadata"]["fps_column"])
    items = []
    for folder, kind in ((ds["video_dir"], "video"), (ds["image_dir"], "image")):
        root = raw_dir / folder
        if not root.is_dir():
            log.warning("media folder %s does not exist", root)
            continue
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(raw_dir).as_posix()
            sub = path.relative_to(root).parts
            probe = sub[0] if len(sub) > 1 else ""
            stem = path.stem
            ext = path.suffix.lower()
            real_kind = kind if ext in (VIDEO_EXTS if kind == "video" else IMAGE_EXTS) else (
                "image" if ext in IMAGE_EXTS else "video" if ext in VIDEO_EXTS else "other")
            item = InputFile(rel, real_kind, probe, patient=patient_id(
                stem, metadata_patient, ds.get("patient_rules", [])), fps_hint=metadata_fps.get(stem))
            if real_kind == "other":
                item.excluded = f"not a video or image ({ext or 'no extension'})"
            elif len(sub) > 2:
                item.excluded = f"in sub-folder '{'/'.join(sub[1:-1])}' (e.g. label uncertain)"
            elif probe not in ds["probes"]:
                item.excluded = f"probe '{probe}' not selected (dataset.probes={list(ds['probes'])})"
            elif real_kind == "image" and not ds["include_images"]:
                item.excluded = "still images not selected (dataset.include_images=false)"
            else:
                try:
                    cls = classify(stem, classes, ds.get("ignore_prefixes", []))
                except KeyError:
                    item.excluded = (f"file-name prefix maps to no class (classes: "
                                     f"{dict(classes)}; ignored: {list(ds.get('ignore_prefixes', []))})")
                    item.kind = "unlabelled:" + real_kind
                else:
                    if cls is None:
                        item.excluded = "class not selected (dataset.ignore_prefixes)"
                    else:
                        item.cls, item.label = cls, class_names.index(cls)
            items.append(item)
    # Mismatches between metadata and files are legal but must be visible: a row without a file
    # is ignored (the public repo lists videos it may not redistribute); a selected file without
    # a row gets its patient from the name rules or is its own patient (prefix name:/file:).
    stems = {Path(i.source).stem for i in items}
    orphan_rows = sorted((set(metadata_patient) | set(metadata_fps)) - stems)
    if orphan_rows:
        log.info("%d metadata row(s) name no file under the media folders (ignored), e.g. %s",
                 len(orphan_rows), orphan_rows[:5])
    unlisted = [i for i in items if not i.excluded and Path(i.source).stem not in metadata_patient]
    if unlisted and metadata_patient:
        log.warning("%d selected file(s) have no patient in the metadata; patient from the "
                    "file-name rules or the file itself: %s", len(unlisted),
                    {i.source: i.patient for i in unlisted})
    return items


def _frameless_row(item: InputFile, status: str, reason: str) -> dict:
    """The manifest row of an input that gave no frame (excluded or skipped, with the reason)."""
    return {"frame": "", "source": item.source, "class": item.cls, "label": item.label,
            "probe": item.probe, "kind": item.kind, "patient": item.patient, "frame_index": "",
            "time_s": "", "fps": "", "width": "", "height": "", "status": status, "reason": reason}


def extract(raw_dir: Path, out_dir: Path, ds: Mapping, *, workers: int = 1,
            strict: bool = True, decode: Callable[..., Result] = process_file) -> pd.DataFrame:
    """Run the extraction over ``raw_dir`` and return the manifest (also for excluded files).

    Each file is decoded in its own process within ``ds['decode_timeout_s']`` seconds (null or
    0: no limit); a file over the limit, or one that crashes the decoder, is a problem like an
    unreadable one (skipped and recorded, or an error in strict mode).

    Args:
        decode: the per-file decoder, ``process_file``; replaceable (a module-level function,
            for pickling) so tests can stand in a decoder that hangs or crashes.

    Raises:
        ExtractionError: in strict mode, any selected file that gives no frame, or a selected
            class that ends up empty; the message names the files and the fix.
    """
    items = inventory(raw_dir, ds)
    out_dir.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    selected = _without_name_collisions([i for i in items if not i.excluded])
    rows = _unselected_rows(items, problems)
    args = (str(raw_dir), str(out_dir), float(ds["rate_hz"]), int(ds["max_frames"]),
            ds.get("frame_max_side"), ds.get("min_side"))
    timeout_s = ds["decode_timeout_s"]
    timeout_s = float(timeout_s) if timeout_s else None
    results = _decode_all(selected, args, workers, timeout_s, decode)
    rows += _decoded_rows(selected, results, problems)
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    used = manifest[manifest.status == "used"]
    for cls in get(ds, "classes"):
        if not (used["class"] == cls).any():
            problems.append(f"class '{cls}' has no frame after the selection "
                            f"(probes={list(ds['probes'])}): widen the selection or drop the class")
    check_accounting(items, manifest)
    if problems:
        msg = "\n  ".join(problems)
        if strict:
            raise strict_error(ExtractionError, problems, str(raw_dir), manifest)
        log.warning("skipped %d input(s) (recorded in the manifest):\n  %s", len(problems), msg)
    return manifest


def _without_name_collisions(selected: list[InputFile]) -> list[InputFile]:
    """``selected`` less the files whose frame names collide with an earlier file's.

    Frame names come from the path with its extension dropped and odd characters replaced:
    two files mapping to one name (Cov_x.mp4 + Cov_x.avi, "Cov x" + "Cov_x") would overwrite
    each other's frames silently; the later one is marked as skipped and reported instead.
    """
    kept: list[InputFile] = []
    owner: dict[str, str] = {}
    for item in selected:
        name = _frame_name(item.source, 0)
        if name in owner:
            item.excluded = (f"frame names collide with those of {owner[name]} (same path up to "
                             f"extension/characters): rename one of the files")
            item.kind = "unlabelled:" + item.kind  # recorded as skipped: a problem, not a choice
        else:
            owner[name] = item.source
            kept.append(item)
    return kept


def _unselected_rows(items: Sequence[InputFile], problems: list[str]) -> list[dict]:
    """Manifest rows of the files left out before decoding: excluded by the selection, or
    skipped (unlabelled, colliding names; added to ``problems``)."""
    rows = []
    for item in items:
        if item.excluded:
            kind = item.kind.removeprefix("unlabelled:")
            status = "skipped" if item.kind.startswith("unlabelled:") else "excluded"
            if status == "skipped":
                problems.append(f"{item.source}: {item.excluded}")
            rows.append({**_frameless_row(item, status, item.excluded), "class": item.cls or "",
                         "label": -1 if status == "excluded" else item.label, "kind": kind})
    return rows


def _decoded_rows(selected: Sequence[InputFile], results: Sequence[Result],
                  problems: list[str]) -> list[dict]:
    """Manifest rows of the decoded files: their frames, or why they gave none (an unreadable
    file is added to ``problems``; an implausible one is logged)."""
    rows: list[dict] = []
    implausible = []
    for item, res in zip(selected, results):
        if res.excluded or res.error:
            status, reason = ("excluded", res.excluded) if res.excluded else ("skipped", res.error)
            (implausible if res.excluded else problems).append(f"{item.source}: {reason}")
            rows.append(_frameless_row(item, status, reason))
        rows.extend(res.rows)
    if implausible:
        log.warning("excluded %d implausible input(s) (recorded in the manifest):\n  %s",
                    len(implausible), "\n  ".join(implausible))
    return rows


def prepare_lus_videos(raw_dir: Path, frames_dir: Path, ds: Mapping, strict: bool) -> pd.DataFrame:
    """The adapter of ``dataset.kind: lus_videos``: :func:`extract` with ``dataset.workers``."""
    return extract(raw_dir, frames_dir, ds, workers=int(ds["workers"]), strict=strict)
