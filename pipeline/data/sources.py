"""Image datasets -> the same frame images + manifest as the lung-ultrasound extraction.

Each adapter turns one on-disk layout into frame images (8-bit, 3 channels, longer side capped
at ``dataset.frame_max_side``) and a manifest with the columns of
:data:`pipeline.data.frames.MANIFEST_COLUMNS` (one row per image; ``source`` = the image,
``kind`` = ``image``), plus optional columns: ``split`` (a dataset's fixed train/val/test split),
``finding`` (a subgroup for score histograms) and ``view``. Training, evaluation and the report
then need no change; ``split_folds`` makes the folds (patient-grouped k-fold, or the
dataset's own fixed split).

Kinds (``dataset.kind``):

* ``image_manifest``: an image folder plus a CSV with one row per image (path, label, optional
  patient id, view, finding); labels map to classes through ``dataset.classes``.
* ``image_folders``: the Keras ``flow_from_directory`` layout ``<split>/<class folder>/<image>``.
* ``medmnist_npz``: a MedMNIST ``.npz`` (``train_images``, ``train_labels``, ``val_*``, ``test_*``).

As in the video extraction, every input is accounted for: an image that gives no frame has a
row with status ``excluded`` (left out by the selection) or ``skipped`` (unusable: missing or
unreadable file, unknown label), and in strict mode any ``skipped`` input raises
:class:`DatasetError` naming it. An image whose smaller side is below ``dataset.min_side`` is
``excluded`` with the reason (implausible input).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.core.cli import UserError
from pipeline.core.config import ConfigError
from pipeline.data.frames import (
    IMAGE_EXTS,
    MANIFEST_COLUMNS,
    strict_error,
    to_rgb8,
    too_small,
)
from pipeline.data.lus_videos import prepare_lus_videos

log = logging.getLogger("pipeline.data.sources")

EXTRA_COLUMNS = ["split", "finding", "view"]
SPLITS = ("train", "val", "test")
JPEG_QUALITY = 95


class DatasetError(RuntimeError, UserError):
    """An input image or label the adapter cannot use (strict mode), or a malformed dataset.

    ``manifest``: in strict mode, the manifest as stopped (for the stage to write).
    """

    manifest: pd.DataFrame | None = None


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------
def label_map(classes: Mapping[str, Sequence], key: str = "dataset.classes") -> dict[str, str]:
    """``{label value (as text): class name}`` from ``class name -> [label values]``.

    Raises:
        ConfigError: a label value listed under two classes.
    """
    out: dict[str, str] = {}
    for cls, values in classes.items():
        for value in ([values] if isinstance(values, (str, int)) else values):
            text = str(value).strip()
            if text in out and out[text] != cls:
                raise ConfigError(f"{key}: label '{text}' is listed under both '{out[text]}' and "
                                  f"'{cls}'; give each label value to one class")
            out[text] = cls
    return out


def _frame_name(source: str, ext: str, taken: set[str]) -> str:
    """A flat, unique file name for the frame of ``source`` (its path with '/' -> '__')."""
    stem = re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(source).with_suffix("").as_posix().replace("/", "__"))
    name, n = f"{stem}.{ext}", 2
    while name in taken:  # a.png and a.jpg in one folder
        name, n = f"{stem}__{n}.{ext}", n + 1
    taken.add(name)
    return name


def _convert(job: tuple[str, str, int | None, str, int | None]) -> tuple[str, object]:
    """Read one image file, write it as an 8-bit 3-channel frame: ``("used", (width, height))``,
    ``("skipped", error)``, or ``("excluded", reason)`` below ``min_side`` (nothing written)."""
    src, dst, max_side, fmt, min_side = job
    try:
        img = cv2.imread(src, cv2.IMREAD_UNCHANGED)
        if img is None:
            return "skipped", "not a readable image (OpenCV could not decode it)"
        small = too_small(img.shape[1], img.shape[0], min_side)
        if small:
            return "excluded", small
        return "used", _write_frame(to_rgb8(img), Path(dst), max_side, fmt)
    except (OSError, cv2.error) as exc:
        return "skipped", f"{type(exc).__name__}: {exc}"


def _write_frame(bgr: np.ndarray, path: Path, max_side: int | None, fmt: str) -> tuple[int, int]:
    img = bgr
    h, w = img.shape[:2]
    if max_side and max(h, w) > max_side:  # shrink only (as the video frames); never enlarge
        scale = max_side / max(h, w)
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))),
                         interpolation=cv2.INTER_AREA)
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if fmt == "jpg" else []
    if not cv2.imwrite(str(path), img, params):
        raise OSError(f"could not write frame {path}")
    return int(img.shape[1]), int(img.shape[0])


def _convert_all(jobs: list[tuple[str, str, int | None, str, int | None]], workers: int) -> list:
    if workers > 1 and len(jobs) > 64:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(_convert, jobs, chunksize=32))
    return [_convert(j) for j in jobs]


def _convert_pending(pending: list[tuple[str, Path, dict]], frames_dir: Path, ds: Mapping,
                     fmt: str, rows: list[dict], problems: list[str]) -> None:
    """Write one frame per ``(source, image path, row fields)`` (``dataset.workers`` processes)
    and add its manifest row: used, skipped with the reason the image could not be read, or
    excluded below ``dataset.min_side``."""
    taken: set[str] = set()
    names = [_frame_name(source, fmt, taken) for source, _, _ in pending]
    jobs = [(str(path), str(frames_dir / name), ds.get("frame_max_side"), fmt, ds.get("min_side"))
            for (_, path, _), name in zip(pending, names)]
    results = _convert_all(jobs, int(ds.get("workers") or 1))
    implausible = []
    for (source, _, base), name, (status, result) in zip(pending, names, results):
        if status == "skipped":
            problems.append(f"{source}: {result}")
            rows.append(_row(source, status="skipped", reason=result, **base))
        elif status == "excluded":
            implausible.append(f"{source}: {result}")
            rows.append(_row(source, status="excluded", reason=result, **base))
        else:
            rows.append(_row(source, status="used", frame=name, size=result, **base))
    if implausible:
        log.warning("excluded %d implausible image(s) (recorded in the manifest):\n  %s",
                    len(implausible), "\n  ".join(implausible[:50]))


def _frame_format(ds: Mapping, default: str) -> str:
    fmt = str(ds.get("frame_format") or default).lower().lstrip(".")
    fmt = "jpg" if fmt == "jpeg" else fmt
    if fmt not in ("jpg", "png"):
        raise ConfigError(f"dataset.frame_format={fmt!r}: use jpg or png")
    return fmt


def _row(source: str, *, cls: str = "", label: int = -1, patient: str = "", status: str,
         reason: str = "", frame: str = "", size: tuple[int, int] | None = None,
         **extra: str) -> dict:
    """One manifest row of a still image (frame 0) or of an input that gave no frame."""
    used = status == "used"
    return {"frame": frame, "source": source, "class": cls, "label": label, "probe": "",
            "kind": "image", "patient": patient, "frame_index": 0 if used else "",
            "time_s": 0.0 if used else "", "fps": "",
            "width": size[0] if size else "", "height": size[1] if size else "",
            "status": status, "reason": reason, **extra}


def _finish(rows: list[dict], problems: list[str], classes: Sequence[str], strict: bool,
            what: str) -> pd.DataFrame:
    """The manifest of ``rows``; raise (strict) or log the problems; check every class is used."""
    extra = [c for c in EXTRA_COLUMNS if any(c in r for r in rows)]
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS + extra)
    used = manifest[manifest["status"] == "used"]
    for cls in classes:
        if not (used["class"] == cls).any():
            problems.append(f"class '{cls}' has no image in {what}: check dataset.classes")
    if problems:
        msg = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more"
                                            if len(problems) > 50 else "")
        if strict:
            raise strict_error(DatasetError, problems, what, manifest)
        log.warning("skipped %d input(s) of %s (recorded in the manifest):\n  %s",
                    len(problems), what, msg)
    log.info("%s: %d images used, %d excluded, %d skipped", what, len(used),
             int((manifest["status"] == "excluded").sum()), int((manifest["status"] == "skipped").sum()))
    return manifest


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _patient_from_rules(stem: str, rules: Sequence[Mapping]) -> str | None:
    for rule in rules or ():
        m = re.match(rule["pattern"], stem)
        if m:
            return "name:" + m.expand(rule["group"])
    return None


# --------------------------------------------------------------------------------------------
# image_manifest: an image folder + a CSV
# --------------------------------------------------------------------------------------------
def prepare_image_manifest(raw_dir: Path, frames_dir: Path, ds: Mapping, strict: bool) -> pd.DataFrame:
    """Images listed in a CSV -> frames + manifest.

    ``ds`` keys: ``image_dir`` (folder of the images under ``raw_dir``; paths in the CSV are
    relative to it), ``manifest`` (``file`` under ``raw_dir``; ``path_column``,
    ``label_column``; optional ``patient_column``, ``view_column``, ``finding_column``),
    ``classes`` (class -> label values), optional ``ignore_labels`` (excluded), ``views``
    (views kept; null = all), ``frame_max_side``, ``frame_format`` (default jpg), ``workers``.

    A CSV row whose file is missing or unreadable, or whose label maps to no class, is
    ``skipped``; an image file the CSV does not list is ``excluded``. A row without a patient id
    is its own patient.

    Raises:
        DatasetError: the CSV or a column is missing; in strict mode, any skipped row.
    """
    raw_dir, frames_dir = Path(raw_dir), Path(frames_dir)
    csv_path, table, columns = _read_manifest_csv(raw_dir, ds)
    selection = _ManifestSelection(ds, csv_path, columns, raw_dir / (ds.get("image_dir") or ""))
    fmt = _frame_format(ds, "jpg")
    frames_dir.mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    problems: list[str] = []
    pending: list[tuple[str, Path, dict]] = []
    for i, rec in enumerate(table.to_dict("records"), start=2):  # line 1 is the header
        source, base, outcome = selection.triage(rec, i)
        if isinstance(outcome, Path):
            pending.append((source, outcome, base))
            continue
        status, reason = outcome
        if status == "skipped":
            problems.append(f"{source}: {reason}")
        rows.append(_row(source, status=status, reason=reason, **base))
    _convert_pending(pending, frames_dir, ds, fmt, rows, problems)
    rows += _unlisted_images(raw_dir, selection.image_root, csv_path, selection.first_row)
    return _finish(rows, problems, selection.classes, strict, f"{csv_path}")


_MANIFEST_COLUMN_KEYS = ("path_column", "label_column", "patient_column", "view_column",
                         "finding_column")


def _read_manifest_csv(raw_dir: Path, ds: Mapping) -> tuple[Path, pd.DataFrame, dict[str, str | None]]:
    """The CSV of ``dataset.manifest``, its table (all text) and the configured column names."""
    mcfg = ds["manifest"]
    csv_path = raw_dir / mcfg["file"]
    if not csv_path.is_file():
        raise DatasetError(f"manifest CSV {csv_path} not found (dataset.manifest.file): the "
                           f"dataset folder must hold it (see conf/dataset/{ds.get('name', '')}.yaml)")
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    columns = {k: mcfg.get(k) for k in _MANIFEST_COLUMN_KEYS}
    for key, col in columns.items():
        if col and col not in table.columns:
            raise DatasetError(f"{csv_path}: column '{col}' (dataset.manifest.{key}) missing; its "
                               f"columns are {list(table.columns)}")
    for key in ("path_column", "label_column"):
        if not columns[key]:
            raise ConfigError(f"dataset.manifest.{key} must name a column of {csv_path.name}")
    return csv_path, table, columns


class _ManifestSelection:
    """Which rows of an image-manifest CSV become frames: the dataset's classes, ignored labels
    and selected views; remembers the first line of each image to catch repeated rows."""

    def __init__(self, ds: Mapping, csv_path: Path, columns: Mapping[str, str | None],
                 image_root: Path) -> None:
        self.ds, self.csv_path, self.columns, self.image_root = ds, csv_path, columns, image_root
        self.classes = list(ds["classes"])
        self.to_class = label_map(ds["classes"])
        self.ignore = {str(v).strip() for v in ds.get("ignore_labels") or ()}
        self.views = None if ds.get("views") is None else {str(v).strip() for v in ds["views"]}
        if self.views is not None and not columns["view_column"]:
            raise ConfigError("dataset.views selects views but dataset.manifest.view_column names "
                              "no column: set both, or views: null")
        self.first_row: dict[str, tuple[int, str]] = {}

    def triage(self, rec: Mapping[str, str], i: int) -> tuple[str, dict, Path | tuple[str, str]]:
        """``(source, row fields, image path to convert or (status, reason))`` of CSV line ``i``."""
        columns, where = self.columns, f"{self.csv_path.name} line {i}"
        rel = rec[columns["path_column"]].strip().replace("\\", "/").removeprefix("./")
        source = (Path(self.ds.get("image_dir") or "") / rel).as_posix() if rel else f"<{where}>"
        label_text = rec[columns["label_column"]].strip()
        pid = rec[columns["patient_column"]].strip() if columns["patient_column"] else ""
        extra = {}
        if columns["finding_column"]:
            extra["finding"] = rec[columns["finding_column"]].strip()
        if columns["view_column"]:
            extra["view"] = rec[columns["view_column"]].strip()
        cls = self.to_class.get(label_text)
        base = {"cls": cls or "", "label": self.classes.index(cls) if cls else -1,
                "patient": f"meta:{pid}" if pid else f"file:{source}", **extra}
        return source, base, self._outcome(rel, i, label_text, cls, extra)

    def _outcome(self, rel: str, i: int, label_text: str, cls: str | None,
                 extra: Mapping[str, str]) -> Path | tuple[str, str]:
        where = f"{self.csv_path.name} line {i}"
        if not rel:
            return "skipped", f"{where}: empty path (column '{self.columns['path_column']}')"
        if rel in self.first_row:
            line, first_label = self.first_row[rel]
            if first_label == label_text:
                return "excluded", f"{where}: listed again (duplicate of line {line})"
            return "skipped", (f"{where}: listed again with label '{label_text}' (line {line} says "
                               f"'{first_label}'); keep one row per image")
        self.first_row[rel] = (i, label_text)
        if cls is None:
            if label_text in self.ignore:
                return "excluded", f"label '{label_text}' ignored (dataset.ignore_labels)"
            return "skipped", (f"{where}: label '{label_text}' maps to no class (dataset.classes: "
                               f"{ {c: list(v) for c, v in self.ds['classes'].items()} })")
        if self.views is not None and extra.get("view", "") not in self.views:
            return "excluded", (f"view '{extra.get('view', '')}' not selected "
                                f"(dataset.views={sorted(self.views)})")
        path = self.image_root / rel
        if not path.is_file():
            return "skipped", f"{where}: file listed in the CSV but missing under {self.image_root}"
        if path.suffix.lower() not in IMAGE_EXTS:
            return "skipped", f"{where}: not an image file ({path.suffix or 'no extension'})"
        return path


def _unlisted_images(raw_dir: Path, image_root: Path, csv_path: Path,
                     listed_rel: Iterable[str]) -> list[dict]:
    """``excluded`` rows of the image files under ``image_root`` that the CSV does not list."""
    listed = {(image_root / rel).resolve() for rel in listed_rel}
    return [_row(path.relative_to(raw_dir).as_posix(), status="excluded",
                 reason=f"not listed in {csv_path.name}")
            for path in _image_files(image_root)
            if path.resolve() not in listed and path.resolve() != csv_path.resolve()]


# --------------------------------------------------------------------------------------------
# image_folders: <split>/<class folder>/<image>
# --------------------------------------------------------------------------------------------
def prepare_image_folders(raw_dir: Path, frames_dir: Path, ds: Mapping, strict: bool) -> pd.DataFrame:
    """A ``flow_from_directory`` tree -> frames + manifest with a ``split`` column.

    ``ds`` keys: ``image_root`` (folder under ``raw_dir`` holding the split folders; empty =
    ``raw_dir``), ``split_dirs`` (split -> folder name, e.g. ``{train: train, val: val, test:
    test}``; a split may be absent), ``classes`` (class -> class-folder names), optional
    ``ignore_folders`` (class folders excluded), ``patient_rules`` (``{pattern, group}`` on the
    file stem; unmatched images, and all of them without rules, are their own patient),
    ``frame_max_side``, ``frame_format``, ``workers``.

    Raises:
        DatasetError: the root or every split folder is missing; in strict mode, a class folder
            that maps to no class or an unreadable image.
    """
    raw_dir, frames_dir = Path(raw_dir), Path(frames_dir)
    root = raw_dir / (ds.get("image_root") or "")
    split_dirs = dict(ds.get("split_dirs") or {s: s for s in SPLITS})
    unknown = sorted(set(split_dirs) - set(SPLITS))
    if unknown:
        raise ConfigError(f"dataset.split_dirs: unknown split(s) {unknown}; use {list(SPLITS)}")
    if not any((root / d).is_dir() for d in split_dirs.values()):
        raise DatasetError(f"{root} holds none of the split folders {sorted(split_dirs.values())} "
                           f"(dataset.image_root, dataset.split_dirs)")
    split_of = {folder: split for split, folder in split_dirs.items()}
    classes = list(ds["classes"])
    to_class = label_map(ds["classes"])
    ignore = set(ds.get("ignore_folders") or ())
    rules = ds.get("patient_rules") or []
    fmt = _frame_format(ds, "jpg")
    frames_dir.mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    problems: list[str] = []
    pending: list[tuple[str, Path, dict]] = []
    for path in _image_files(root):
        source = path.relative_to(raw_dir).as_posix()
        parts = path.relative_to(root).parts
        split = split_of.get(parts[0]) if len(parts) > 1 else None
        patient = _patient_from_rules(path.stem, rules) or f"file:{source}"
        cls = to_class.get(parts[1]) if len(parts) == 3 else None
        base = {"cls": cls or "", "label": classes.index(cls) if cls else -1, "patient": patient,
                "split": split or ""}
        status, reason = _folder_image_status(path, parts, split, cls, split_of, ignore, ds)
        if status == "used":
            pending.append((source, path, base))
            continue
        if status == "skipped":
            problems.append(f"{source}: {reason}")
        rows.append(_row(source, status=status, reason=reason, **base))
    _convert_pending(pending, frames_dir, ds, fmt, rows, problems)
    return _finish(rows, problems, classes, strict, str(root))


def _folder_image_status(path: Path, parts: tuple[str, ...], split: str | None, cls: str | None,
                         split_of: Mapping[str, str], ignore: set[str],
                         ds: Mapping) -> tuple[str, str]:
    """``("used", "")`` for an image to convert, else ``("excluded" | "skipped", reason)``;
    ``parts`` is the path under the image root (``<split>/<class folder>/<image>``)."""
    if path.name.startswith("."):
        return "excluded", "hidden file"
    if split is None:
        return "excluded", f"outside the split folders {sorted(split_of)} (dataset.split_dirs)"
    if len(parts) != 3:
        return "excluded", ("directly in the split folder (no class folder)" if len(parts) == 2
                            else f"in sub-folder '{'/'.join(parts[2:-1])}' of a class folder")
    if path.suffix.lower() not in IMAGE_EXTS:
        return "excluded", f"not an image ({path.suffix or 'no extension'})"
    if cls is None and parts[1] in ignore:
        return "excluded", f"class folder '{parts[1]}' ignored (dataset.ignore_folders)"
    if cls is None:
        return "skipped", (f"class folder '{parts[1]}' maps to no class (dataset.classes: "
                           f"{ {c: list(v) for c, v in ds['classes'].items()} })")
    return "used", ""


# --------------------------------------------------------------------------------------------
# medmnist_npz
# --------------------------------------------------------------------------------------------
def prepare_medmnist_npz(raw_dir: Path, frames_dir: Path, ds: Mapping, strict: bool) -> pd.DataFrame:
    """A MedMNIST ``.npz`` -> one PNG per image + manifest with the npz's split.

    ``ds`` keys: ``file`` (the npz under ``raw_dir``), ``classes`` (class -> label values,
    e.g. ``{normal: [0], pneumonia: [1]}``), ``frame_format`` (default png: lossless).
    ``source`` is ``<file>:<split>/<index>`` and each image is its own patient (MedMNIST keeps
    no patient ids).

    Raises:
        DatasetError: missing file or arrays, images and labels of different lengths; in strict
            mode, a label that maps to no class.
    """
    raw_dir, frames_dir = Path(raw_dir), Path(frames_dir)
    path = raw_dir / ds["file"]
    if not path.is_file():
        raise DatasetError(f"{path} not found (dataset.file): run the fetch_data stage")
    classes = list(ds["classes"])
    to_class = label_map(ds["classes"])
    fmt = _frame_format(ds, "png")
    frames_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    problems: list[str] = []
    with np.load(path) as npz:
        present = [s for s in SPLITS if f"{s}_images" in npz.files]
        if not present:
            raise DatasetError(f"{path}: no '<split>_images' arrays (has {npz.files}); expected "
                               f"MedMNIST's train_images, train_labels, val_*, test_*")
        for split in present:
            if f"{split}_labels" not in npz.files:
                raise DatasetError(f"{path}: '{split}_images' without '{split}_labels'")
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
            labels = labels.reshape(len(labels), -1)
            if len(images) != len(labels) or labels.shape[1] != 1:
                raise DatasetError(f"{path}: {split} has {len(images)} images and labels of shape "
                                   f"{labels.shape}; expected one label per image (multi-label "
                                   f"MedMNIST sets are not supported)")
            for i, (img, lab) in enumerate(zip(images, labels[:, 0])):
                source = f"{path.name}:{split}/{i:05d}"
                cls = to_class.get(str(int(lab)))
                base = {"cls": cls or "", "label": classes.index(cls) if cls else -1,
                        "patient": f"file:{source}", "split": split}
                if cls is None:
                    msg = f"label {int(lab)} maps to no class (dataset.classes)"
                    problems.append(f"{source}: {msg}")
                    rows.append(_row(source, status="skipped", reason=msg, **base))
                    continue
                name = f"{split}_{i:05d}.{fmt}"
                img = np.asarray(img)
                small = too_small(img.shape[1], img.shape[0], ds.get("min_side"))
                if small:
                    rows.append(_row(source, status="excluded", reason=small, **base))
                    continue
                if img.ndim == 3 and img.shape[2] == 3:  # MedMNIST colour sets are RGB
                    img = img[:, :, ::-1]
                size = _write_frame(to_rgb8(img), frames_dir / name,
                                    ds.get("frame_max_side"), fmt)
                rows.append(_row(source, status="used", frame=name, size=size, **base))
    return _finish(rows, problems, classes, strict, str(path))


# --------------------------------------------------------------------------------------------
# Dispatch and fixed splits
# --------------------------------------------------------------------------------------------
ADAPTERS: dict[str, Callable[[Path, Path, Mapping, bool], pd.DataFrame]] = {
    "lus_videos": prepare_lus_videos,
    "image_manifest": prepare_image_manifest,
    "image_folders": prepare_image_folders,
    "medmnist_npz": prepare_medmnist_npz,
}


def prepare(kind: str, raw_dir: Path, frames_dir: Path, ds: Mapping, strict: bool = True) -> pd.DataFrame:
    """Run the adapter of ``dataset.kind``; returns the manifest (the caller writes it).

    Raises:
        ConfigError: unknown kind (the message lists the valid ones).
    """
    if kind not in ADAPTERS:
        raise ConfigError(f"dataset.kind={kind!r} is not known; valid kinds: "
                          f"{', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[kind](Path(raw_dir), Path(frames_dir), ds, strict)


