"""Stage ``extract_frames``: videos and still images -> frame images + a manifest.

The study's rule (Mini-COVIDNet, after POCOVID-Net): keep every ``int(fps / rate_hz)``-th frame,
at most ``max_frames`` per video; a still image is one frame. Every file under the media folders
gets at least one manifest row: a row per frame kept, or one row saying why the file gave none
(``excluded`` by the selection, or ``skipped`` because it could not be used), so no input file
vanishes from the accounting.

Implausible inputs are ``excluded`` with the reason, never used silently: an image or video
whose frames have a side below ``dataset.min_side`` pixels, and a "video" that decodes to a single
frame (a still image under a video name, e.g. a PNG renamed ``.mp4`` or a one-frame GIF).

The stage writes its frames into ``<frames_dir>.partial`` and moves that into place, manifest
included, only when it succeeds. When strict mode stops it, ``<frames_dir>`` holds only
``manifest.csv``, accounting for every file: the problems (``skipped`` with the reason), the
exclusions, and the files that were fine (``skipped``, "not written: ..."), so no later stage can
take it for a finished store (it has no ``used`` row).
"""

from __future__ import annotations

import csv
import logging
import math
import multiprocessing
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_connections
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.cli import UserError, run_main
from pipeline.config import get, load_params

log = logging.getLogger("pipeline.extract_frames")

VIDEO_EXTS = {".mp4", ".mov", ".avi", ".mpeg", ".mpg", ".gif", ".m4v", ".webm", ".mkv"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
MANIFEST_COLUMNS = ["frame", "source", "class", "label", "probe", "kind", "patient",
                    "frame_index", "time_s", "fps", "width", "height", "status", "reason"]
# Per-file wall-clock limit of decoding (``dataset.decode_timeout_s``). The slowest file of the
# real dataset takes about 1 s, so only a hung decoder reaches this.
DEFAULT_DECODE_TIMEOUT_S = 120.0


class ExtractionError(RuntimeError, UserError):
    """A selected input file could not be turned into frames (strict mode).

    ``manifest``: the stage's manifest as stopped (see :func:`stopped_manifest`), when known.
    """

    manifest: pd.DataFrame | None = None


# Magic bytes of still-image formats, to say what a one-frame "video" really is.
_IMAGE_MAGIC = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
                (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


@dataclass
class InputFile:
    """One file under the media folders and what the selection decided about it."""

    source: str                 # path relative to the raw folder
    kind: str                   # video | image | other
    probe: str
    cls: str | None = None      # class name, None if not selected
    label: int = -1
    patient: str = ""
    fps_hint: float | None = None
    excluded: str = ""          # reason the selection left it out ("" = selected)


@dataclass
class Result:
    source: str
    rows: list[dict] = field(default_factory=list)
    error: str = ""
    excluded: str = ""          # an implausible input (too small, a still as a video): why


def sample_indices(n_frames: int, fps: float, rate_hz: float, max_frames: int) -> list[int]:
    """Frame indices the study keeps: every ``int(fps / rate_hz)``-th frame, at most ``max_frames``.

    A video slower than ``rate_hz`` keeps every frame (step 1).
    """
    step = max(1, int(fps / rate_hz))
    return list(range(0, n_frames, step))[:max_frames]


def to_rgb8(img: np.ndarray) -> np.ndarray:
    """Any decoded image (grayscale, BGR, BGRA, 16-bit) -> 8-bit 3-channel BGR for writing."""
    if img.dtype == np.uint16:
        img = (img / 257.0).round().astype(np.uint8)
    elif img.dtype != np.uint8:
        lo, hi = float(np.min(img)), float(np.max(img))
        img = ((img - lo) / (hi - lo or 1.0) * 255).round().astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        # Composite transparency on black, the background of ultrasound frames.
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        return (img[:, :, :3].astype(np.float32) * alpha).round().astype(np.uint8)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    return img


def _resize_max_side(img: np.ndarray, max_side: int | None) -> np.ndarray:
    h, w = img.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return img
    scale = max_side / max(h, w)
    return cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))),
                      interpolation=cv2.INTER_AREA)


def _frame_name(source: str, index: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(source).with_suffix("").as_posix().replace("/", "__"))
    return f"{stem}__f{index:05d}.jpg"


def _write(img: np.ndarray, out_dir: Path, name: str, max_side: int | None, quality: int) -> None:
    ok = cv2.imwrite(str(out_dir / name), _resize_max_side(img, max_side),
                     [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError(f"could not write frame {out_dir / name}")


def too_small(width: int, height: int, min_side: int | None, what: str = "image") -> str:
    """The exclusion reason of an input whose smaller side is below ``min_side`` ("" if not)."""
    if not min_side or min(width, height) >= int(min_side):
        return ""
    return (f"{what} of {width}x{height} px, below dataset.min_side={int(min_side)} px "
            f"(implausible input; lower dataset.min_side if such inputs are real)")


def still_image_format(path: Path) -> str:
    """``PNG``, ``JPEG``, ... if the file's first bytes are those of a still-image format."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError:
        return ""
    if head[:4] == b"RIFF" and path.stat().st_size >= 12:
        with path.open("rb") as f:
            return "WebP" if f.read(12)[8:12] == b"WEBP" else ""
    return next((name for magic, name in _IMAGE_MAGIC if head.startswith(magic)), "")


def process_file(item: InputFile, raw_dir: str, out_dir: str, rate_hz: float, max_frames: int,
                 max_side: int | None, min_side: int | None = None, quality: int = 95) -> Result:
    """Decode one selected file and write its frames. Errors are returned, not raised, so the
    caller decides (strict or skip) with the whole picture; an implausible input (smaller side
    below ``min_side``, or a "video" of a single frame) is returned as ``excluded``, no frame
    written."""
    path = Path(raw_dir) / item.source
    res = Result(item.source)
    base = {"source": item.source, "class": item.cls, "label": item.label, "probe": item.probe,
            "kind": item.kind, "patient": item.patient, "status": "used", "reason": ""}
    try:
        if path.stat().st_size == 0:
            res.error = "empty file (0 bytes)"
            return res
        if item.kind == "image":
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if img is None:
                res.error = "not a readable image (OpenCV could not decode it)"
                return res
            img = to_rgb8(img)
            res.excluded = too_small(img.shape[1], img.shape[0], min_side)
            if res.excluded:
                return res
            name = _frame_name(item.source, 0)
            _write(img, Path(out_dir), name, max_side, quality)
            res.rows.append({**base, "frame": name, "frame_index": 0, "time_s": 0.0, "fps": "",
                             "width": img.shape[1], "height": img.shape[0]})
            return res
        cap = cv2.VideoCapture(str(path))
        try:
            if not cap.isOpened():
                res.error = "not a decodable video (OpenCV/FFmpeg could not open it)"
                return res
            fps = cap.get(cv2.CAP_PROP_FPS)
            if not (fps and math.isfinite(fps) and 0 < fps <= 240):
                fps = item.fps_hint or 0.0
            if not fps:
                res.error = "unknown frame rate (container gives none and metadata has none)"
                return res
            step = max(1, int(fps / rate_hz))
            index = 0
            exhausted = False
            while len(res.rows) < max_frames:
                ok, frame = cap.read()
                if not ok:
                    exhausted = True
                    break
                if index == 0:
                    res.excluded = too_small(frame.shape[1], frame.shape[0], min_side,
                                             "video frames")
                    if res.excluded:
                        return res
                if index % step == 0:
                    frame = to_rgb8(frame)
                    name = _frame_name(item.source, index)
                    _write(frame, Path(out_dir), name, max_side, quality)
                    res.rows.append({**base, "frame": name, "frame_index": index,
                                     "time_s": round(index / fps, 4), "fps": round(fps, 3),
                                     "width": frame.shape[1], "height": frame.shape[0]})
                index += 1
            if index == 1 and not exhausted:  # stopped by max_frames: is there a second frame?
                exhausted = not cap.read()[0]
        finally:
            cap.release()
        if not res.rows:
            res.error = "video has no decodable frame"
        elif index == 1 and exhausted:
            fmt = still_image_format(path)
            res.excluded = "a 'video' that decodes to a single frame" + (
                f" (its content is a {fmt} image): a still image under a video name; give it "
                f"an image extension to use it as an image" if fmt else
                ": a still image or a damaged video; replace it with the real video, or save "
                "the frame as an image to use it")
            for row in res.rows:
                (Path(out_dir) / row["frame"]).unlink(missing_ok=True)
            res.rows = []
    except (OSError, cv2.error) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


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


def _decode_child(conn, decode: Callable[..., Result], item: InputFile, args: tuple) -> None:
    """Body of a decoder process: decode one file and send its ``Result`` to the parent."""
    try:
        res = decode(item, *args)
    except Exception as exc:  # noqa: BLE001 - an unexpected failure is this file's error
        res = Result(item.source, error=f"decoder raised {type(exc).__name__}: {exc}")
    conn.send(res)
    conn.close()


def _remove_partial_frames(source: str, out_dir: Path) -> None:
    """Delete the frames a killed decoder wrote, so no frame file exists without a manifest row."""
    stem = _frame_name(source, 0).removesuffix("__f00000.jpg")
    for path in out_dir.glob(f"{stem}__f*.jpg"):
        if re.fullmatch(r"\d{5,}", path.name[len(stem) + 3:-4]):
            path.unlink(missing_ok=True)


def _decode_all(items: Sequence[InputFile], args: tuple, workers: int, timeout_s: float | None,
                decode: Callable[..., Result]) -> list[Result]:
    """Decode every item in its own process, at most ``workers`` at a time, each within
    ``timeout_s`` seconds (``None``: no limit).

    A process per file is what makes the limit enforceable: a decoder stuck inside FFmpeg's C
    code ignores Python signals and cannot be cancelled in a pool, but its process can be killed.
    It also turns a decoder crash (a segfault on a corrupt file) into that file's error instead
    of the end of the stage. Processes fork from a clean forkserver with the heavy imports
    preloaded: cheap per file, and safe when the parent already runs threads (MLflow, torch, a
    test runner), which plain fork is not.
    """
    ctx = multiprocessing.get_context("forkserver")
    # Not this module itself: run as ``python -m`` it is re-executed in each child as
    # ``__mp_main__``, which warns (and runs its code twice) if it was preloaded.
    ctx.set_forkserver_preload(["numpy", "cv2", "pandas", "pipeline.config"])
    out_dir = Path(args[1])
    results: list[Result | None] = [None] * len(items)
    todo = list(range(len(items)))[::-1]
    running: dict = {}  # read end of a pipe -> (item index, process, deadline)
    started, done = time.monotonic(), 0
    try:
        while todo or running:
            while todo and len(running) < max(1, workers):
                i = todo.pop()
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_decode_child, args=(send, decode, items[i], args),
                                   daemon=True, name=f"decode-{i}")
                proc.start()
                send.close()  # only the child holds the write end: its death reads as EOF
                running[recv] = (i, proc, time.monotonic() + timeout_s if timeout_s else math.inf)
            next_deadline = min(d for _, _, d in running.values())
            wait_s = None if math.isinf(next_deadline) else max(0.0, next_deadline - time.monotonic())
            for conn in wait_for_connections(list(running), timeout=wait_s):
                i, proc, _ = running.pop(conn)
                try:
                    results[i] = conn.recv()
                except (EOFError, OSError):  # died without an answer: crashed or was killed
                    proc.join()
                    results[i] = Result(items[i].source, error=(
                        f"decoder process died (exit code {proc.exitcode}): the file crashes "
                        f"the decoder"))
                    _remove_partial_frames(items[i].source, out_dir)
                conn.close()
                proc.join()
                done += 1
                if done % 20 == 0 or done == len(items):
                    log.info("decoded %d/%d files (%.0f s)", done, len(items),
                             time.monotonic() - started)
            now = time.monotonic()
            for conn, (i, proc, deadline) in list(running.items()):
                if now >= deadline:
                    proc.kill()
                    proc.join()
                    conn.close()
                    del running[conn]
                    done += 1
                    results[i] = Result(items[i].source,
                                        error=f"decode timed out after {timeout_s:g} s")
                    _remove_partial_frames(items[i].source, out_dir)
                    log.warning("%s: decode timed out after %g s, process killed",
                                items[i].source, timeout_s)
    finally:
        for conn, (_, proc, _) in running.items():  # interrupted: leave no decoder behind
            proc.kill()
            proc.join()
            conn.close()
    return results  # type: ignore[return-value]


def _frameless_row(item: InputFile, status: str, reason: str) -> dict:
    """The manifest row of an input that gave no frame (excluded or skipped, with the reason)."""
    return {"frame": "", "source": item.source, "class": item.cls, "label": item.label,
            "probe": item.probe, "kind": item.kind, "patient": item.patient, "frame_index": "",
            "time_s": "", "fps": "", "width": "", "height": "", "status": status, "reason": reason}


def extract(raw_dir: Path, out_dir: Path, ds: Mapping, *, workers: int = 1,
            strict: bool = True, decode: Callable[..., Result] = process_file) -> pd.DataFrame:
    """Run the extraction over ``raw_dir`` and return the manifest (also for excluded files).

    Each file is decoded in its own process within ``ds['decode_timeout_s']`` seconds (default
    ``DEFAULT_DECODE_TIMEOUT_S``; null or 0: no limit); a file over the limit, or one that
    crashes the decoder, is a problem like an unreadable one (skipped and recorded, or an error
    in strict mode).

    Args:
        decode: the per-file decoder, ``process_file``; replaceable (a module-level function,
            for pickling) so tests can stand in a decoder that hangs or crashes.

    Raises:
        ExtractionError: in strict mode, any selected file that gives no frame, or a selected
            class that ends up empty; the message names the files and the fix.
    """
    items = inventory(raw_dir, ds)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    problems: list[str] = []
    selected = [i for i in items if not i.excluded]
    # Frame names come from the path with its extension dropped and odd characters replaced:
    # two files mapping to one name (Cov_x.mp4 + Cov_x.avi, "Cov x" + "Cov_x") would overwrite
    # each other's frames silently; the later one is skipped and reported instead.
    owner: dict[str, str] = {}
    for item in list(selected):
        name = _frame_name(item.source, 0)
        if name in owner:
            selected.remove(item)
            item.excluded = (f"frame names collide with those of {owner[name]} (same path up to "
                             f"extension/characters): rename one of the files")
            item.kind = "unlabelled:" + item.kind  # recorded as skipped: a problem, not a choice
        else:
            owner[name] = item.source
    for item in items:
        if item.excluded:
            kind = item.kind.removeprefix("unlabelled:")
            status = "skipped" if item.kind.startswith("unlabelled:") else "excluded"
            if status == "skipped":
                problems.append(f"{item.source}: {item.excluded}")
            rows.append({**_frameless_row(item, status, item.excluded), "class": item.cls or "",
                         "label": -1 if status == "excluded" else item.label, "kind": kind})
    args = (str(raw_dir), str(out_dir), float(ds["rate_hz"]), int(ds["max_frames"]),
            ds.get("frame_max_side"), ds.get("min_side"))
    timeout_s = ds.get("decode_timeout_s", DEFAULT_DECODE_TIMEOUT_S)
    timeout_s = float(timeout_s) if timeout_s else None
    results = _decode_all(selected, args, workers, timeout_s, decode)
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


def strict_error(cls: type, problems: Sequence[str], where: str, manifest: pd.DataFrame):
    """The error strict mode stops with: the first problem and the fix on the first line (what
    ``run_main`` prints), every problem on the next lines and in the log, and the manifest as
    stopped (:func:`stopped_manifest`) attached for the caller to write."""
    shown = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more"
                                          if len(problems) > 50 else "")
    log.error("%d input problem(s) in %s:\n  %s", len(problems), where, shown)
    exc = cls(f"{len(problems)} input problem(s) in {where}, first: {problems[0]}; fix or remove "
              f"the files, or set dataset.strict=false to skip them\n  {shown}")
    exc.manifest = stopped_manifest(manifest, len(problems))
    return exc


def stopped_manifest(manifest: pd.DataFrame, n_problems: int) -> pd.DataFrame:
    """The manifest of a stage that strict mode stopped: every input keeps its row, but no frame
    is kept, so a file that gave frames becomes one ``skipped`` row saying it was not written.
    With no ``used`` row, no later stage can mistake it for a finished frames store."""
    used = manifest["status"] == "used"
    rest = manifest[~used]
    fine = manifest[used].groupby("source", sort=False)
    notes = []
    for source, part in fine:
        row = part.iloc[0].to_dict()
        row.update(frame="", frame_index="", time_s="", status="skipped",
                   reason=f"not written: the stage stopped on {n_problems} input problem(s) "
                          f"(dataset.strict=true); this file gave {len(part)} frame(s)")
        notes.append(row)
    return pd.concat([rest, pd.DataFrame(notes, columns=manifest.columns)], ignore_index=True)


def build_store(frames_dir: Path, build: Callable[[Path], pd.DataFrame]) -> pd.DataFrame:
    """Run ``build(folder)`` (writes frames into ``folder``, returns the manifest) so that
    ``frames_dir`` is replaced only by a finished store: frames and ``manifest.csv`` go to
    ``<frames_dir>.partial`` first, which is moved into place on success. When strict mode stops
    the build, ``frames_dir`` is left holding only the stopped manifest (see
    :func:`stopped_manifest`), and the error points to it.
    """
    frames_dir = Path(frames_dir)
    partial = frames_dir.with_name(frames_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        manifest = build(partial)
        manifest.to_csv(partial / "manifest.csv", index=False, quoting=csv.QUOTE_MINIMAL)
    except UserError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        stopped = getattr(exc, "manifest", None)
        if stopped is not None:
            shutil.rmtree(frames_dir, ignore_errors=True)
            frames_dir.mkdir(parents=True)
            stopped.to_csv(frames_dir / "manifest.csv", index=False, quoting=csv.QUOTE_MINIMAL)
            exc.details = f"every file's status and reason are in {frames_dir / 'manifest.csv'}"
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(frames_dir, ignore_errors=True)
    partial.rename(frames_dir)
    return manifest


def check_accounting(items: Sequence[InputFile], manifest: pd.DataFrame) -> None:
    """Every input file appears in the manifest (the invariant the stage guarantees)."""
    missing = {i.source for i in items} - set(manifest["source"])
    if missing:
        raise AssertionError(f"input files missing from the manifest: {sorted(missing)}")


def summary(manifest: pd.DataFrame) -> dict:
    used = manifest[manifest.status == "used"]
    return {
        "frames": int(len(used)),
        "frames_per_class": {k: int(v) for k, v in Counter(used["class"]).items()},
        "files_per_class": {k: int(v) for k, v in used.groupby("class")["source"].nunique().items()},
        "patients": int(used["patient"].nunique()),
        "files": {s: int(n) for s, n in manifest.drop_duplicates("source")["status"].value_counts().items()},
    }


def main(argv: Sequence[str] | None = None) -> None:
    import json

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params()
    ds = get(params, "dataset")
    kind = ds.get("kind", "lus_videos")
    raw_dir = Path(ds["raw_dir"])
    Path(ds["frames_summary"]).unlink(missing_ok=True)  # no stale summary beside a failed run
    if kind == "lus_videos":
        def build(out_dir: Path) -> pd.DataFrame:
            return extract(raw_dir, out_dir, ds, workers=int(ds["workers"]),
                           strict=bool(ds["strict"]))
    else:  # image datasets (chest X-ray folders, MedMNIST) produce the same manifest
        from pipeline.datasets import prepare

        def build(out_dir: Path) -> pd.DataFrame:
            return prepare(kind, raw_dir, out_dir, ds, strict=bool(ds["strict"]))
    manifest = build_store(Path(ds["frames_dir"]), build)
    info = summary(manifest)
    Path(ds["frames_summary"]).write_text(json.dumps(info, indent=2) + "\n")
    log.info("frames: %s", info)


if __name__ == "__main__":
    run_main(main)
