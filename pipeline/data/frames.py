"""Frames from media files: decoding, the manifest, and the store the ``extract_frames`` stage builds.

The study's rule (Mini-COVIDNet, after POCOVID-Net): keep every ``int(fps / rate_hz)``-th frame,
at most ``max_frames`` per video; a still image is one frame. Every input file gets at least one
manifest row: a row per frame kept, or one row saying why the file gave none (``excluded`` by the
selection, or ``skipped`` because it could not be used), so no input file vanishes from the
accounting. Implausible inputs are ``excluded`` with the reason: frames with a side below
``dataset.min_side`` pixels, and a "video" that decodes to a single frame.

:func:`build_store` writes a store into ``<frames_dir>.partial`` and moves it into place only when
it succeeds; when strict mode stops it, ``<frames_dir>`` holds only ``manifest.csv`` with no
``used`` row, so no later stage can take it for a finished store.
"""

from __future__ import annotations

import csv
import logging
import math
import multiprocessing
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_connections
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.core.cli import UserError

log = logging.getLogger("pipeline.data.frames")

VIDEO_EXTS = {".mp4", ".mov", ".avi", ".mpeg", ".mpg", ".gif", ".m4v", ".webm", ".mkv"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
MANIFEST_COLUMNS = ["frame", "source", "class", "label", "probe", "kind", "patient",
                    "frame_index", "time_s", "fps", "width", "height", "status", "reason"]


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

    def write(img: np.ndarray, name: str) -> None:
        _write(img, Path(out_dir), name, max_side, quality)

    try:
        if path.stat().st_size == 0:
            res.error = "empty file (0 bytes)"
        elif item.kind == "image":
            _decode_image(path, item, base, res, write, min_side)
        else:
            _decode_video(path, item, base, res, write, rate_hz, max_frames, min_side)
            if res.rows and res.excluded:  # a single-frame "video": its frame is not kept
                for row in res.rows:
                    (Path(out_dir) / row["frame"]).unlink(missing_ok=True)
                res.rows = []
    except (OSError, cv2.error) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


FrameWriter = Callable[[np.ndarray, str], None]


def _decode_image(path: Path, item: InputFile, base: dict, res: Result, write: FrameWriter,
                  min_side: int | None) -> None:
    """A still image: its one frame (``res.rows``), or why it gives none."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        res.error = "not a readable image (OpenCV could not decode it)"
        return
    img = to_rgb8(img)
    res.excluded = too_small(img.shape[1], img.shape[0], min_side)
    if res.excluded:
        return
    name = _frame_name(item.source, 0)
    write(img, name)
    res.rows.append({**base, "frame": name, "frame_index": 0, "time_s": 0.0, "fps": "",
                     "width": img.shape[1], "height": img.shape[0]})


def _decode_video(path: Path, item: InputFile, base: dict, res: Result, write: FrameWriter,
                  rate_hz: float, max_frames: int, min_side: int | None) -> None:
    """A video: its frames sampled at ``rate_hz`` (``res.rows``), or why it gives none. A video
    that decodes to a single frame is ``excluded`` with its rows still listed (the caller
    deletes their files)."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            res.error = "not a decodable video (OpenCV/FFmpeg could not open it)"
            return
        fps = cap.get(cv2.CAP_PROP_FPS)
        if not (fps and math.isfinite(fps) and 0 < fps <= 240):
            fps = item.fps_hint or 0.0
        if not fps:
            res.error = "unknown frame rate (container gives none and metadata has none)"
            return
        sampled = _sample_video(cap, item, fps, base, res, write, rate_hz, max_frames, min_side)
    finally:
        cap.release()
    if sampled is None:  # excluded by the size of its first frame
        return
    index, exhausted = sampled
    if not res.rows:
        res.error = "video has no decodable frame"
    elif index == 1 and exhausted:
        fmt = still_image_format(path)
        res.excluded = "a 'video' that decodes to a single frame" + (
            f" (its content is a {fmt} image): a still image under a video name; give it "
            f"an image extension to use it as an image" if fmt else
            ": a still image or a damaged video; replace it with the real video, or save "
            "the frame as an image to use it")


def _sample_video(cap: cv2.VideoCapture, item: InputFile, fps: float, base: dict, res: Result,
                  write: FrameWriter, rate_hz: float, max_frames: int,
                  min_side: int | None) -> tuple[int, bool] | None:
    """Write every ``fps / rate_hz``-th frame, up to ``max_frames``; return (frames read, whether
    the video ended), or None when its first frame is below ``min_side`` (``res.excluded``)."""
    step = max(1, int(fps / rate_hz))
    index = 0
    exhausted = False
    while len(res.rows) < max_frames:
        sample = index % step == 0
        # Frames between samples are only grabbed: decoded, never converted to an image.
        ok, frame = cap.read() if sample else (cap.grab(), None)
        if not ok:
            exhausted = True
            break
        if index == 0:
            res.excluded = too_small(frame.shape[1], frame.shape[0], min_side, "video frames")
            if res.excluded:
                return None
        if sample:
            frame = to_rgb8(frame)
            name = _frame_name(item.source, index)
            write(frame, name)
            res.rows.append({**base, "frame": name, "frame_index": index,
                             "time_s": round(index / fps, 4), "fps": round(fps, 3),
                             "width": frame.shape[1], "height": frame.shape[0]})
        index += 1
    if index == 1 and not exhausted:  # stopped by max_frames: is there a second frame?
        exhausted = not cap.read()[0]
    return index, exhausted


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
    ctx.set_forkserver_preload(["numpy", "cv2", "pandas", "pipeline.core.config"])
    out_dir = Path(args[1])
    results: list[Result | None] = [None] * len(items)
    todo = list(range(len(items)))[::-1]
    running: dict = {}  # read end of a pipe -> (item index, process, deadline)
    started, done = time.monotonic(), 0
    try:
        while todo or running:
            while todo and len(running) < max(1, workers):
                i = todo.pop()
                conn, entry = _start_decoder(ctx, decode, items[i], i, args, timeout_s)
                running[conn] = entry
            for i, res in _collect_answers(running, items, out_dir):
                results[i] = res
                done += 1
                if done % 20 == 0 or done == len(items):
                    log.info("decoded %d/%d files (%.0f s)", done, len(items),
                             time.monotonic() - started)
            for i, res in _kill_overdue(running, items, out_dir, timeout_s):
                results[i] = res
                done += 1
    finally:
        for conn, (_, proc, _) in running.items():  # interrupted: leave no decoder behind
            proc.kill()
            proc.join()
            conn.close()
    return results  # type: ignore[return-value]


def _start_decoder(ctx, decode: Callable[..., Result], item: InputFile, i: int, args: tuple,
                   timeout_s: float | None) -> tuple[Connection, tuple]:
    """Start the process decoding ``item``: (read end of its pipe, (i, process, deadline))."""
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_decode_child, args=(send, decode, item, args), daemon=True,
                       name=f"decode-{i}")
    proc.start()
    send.close()  # only the child holds the write end: its death reads as EOF
    return recv, (i, proc, time.monotonic() + timeout_s if timeout_s else math.inf)


def _collect_answers(running: dict, items: Sequence[InputFile],
                     out_dir: Path) -> list[tuple[int, Result]]:
    """Wait until a decoder answers or dies, or the next deadline passes; remove the finished
    decoders from ``running`` and return their results (a crash is that file's error)."""
    next_deadline = min(d for _, _, d in running.values())
    wait_s = None if math.isinf(next_deadline) else max(0.0, next_deadline - time.monotonic())
    finished = []
    for conn in wait_for_connections(list(running), timeout=wait_s):
        i, proc, _ = running.pop(conn)
        try:
            res = conn.recv()
        except (EOFError, OSError):  # died without an answer: crashed or was killed
            proc.join()
            res = Result(items[i].source, error=(
                f"decoder process died (exit code {proc.exitcode}): the file crashes "
                f"the decoder"))
            _remove_partial_frames(items[i].source, out_dir)
        conn.close()
        proc.join()
        finished.append((i, res))
    return finished


def _kill_overdue(running: dict, items: Sequence[InputFile], out_dir: Path,
                  timeout_s: float | None) -> list[tuple[int, Result]]:
    """Kill the decoders past their deadline, remove them from ``running``, return their errors."""
    now = time.monotonic()
    killed = []
    for conn, (i, proc, deadline) in list(running.items()):
        if now >= deadline:
            proc.kill()
            proc.join()
            conn.close()
            del running[conn]
            killed.append((i, Result(items[i].source,
                                     error=f"decode timed out after {timeout_s:g} s")))
            _remove_partial_frames(items[i].source, out_dir)
            log.warning("%s: decode timed out after %g s, process killed",
                        items[i].source, timeout_s)
    return killed


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
