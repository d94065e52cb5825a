"""Predict the class of new lung-ultrasound videos or images with a trained run's fold models.

Frames are taken exactly as the ``extract_frames`` stage takes them (every ``int(fps / rate_hz)``-th
frame, at most ``max_frames``, written as JPEG with the longest side capped, into a temporary
folder outside the repository) and resized exactly as training saw them (``decode_frames``: a
square, the run's interpolation, RGB). Every fold model of the run classifies every frame; the fold
models' probabilities are combined per frame (``ensemble_probabilities``: mean by default, or a vote) and
the frames' ensemble probabilities per video (``aggregate_videos``: mean by default).

    python -m pipeline.predict clip.mp4 still.png [--run models/mini_covidnet-focal]
        [--backend torch|onnx] [--ensemble mean|vote] [--video-agg mean|vote] [--json]
        [--rate-hz 3] [--max-frames 30]

``--run`` defaults to the first cell of ``params.yaml``'s grid (``grid.models[0]-grid.losses[0]``);
rate, frame cap and frame size default to ``params.yaml``'s ``dataset`` values. The ONNX backend
reads ``fold_<k>/model.onnx`` from ``--onnx-dir``, else ``exports/<run>/`` next to the run's
``models/`` folder, else ``<run>/export/`` (where ``pipeline.stages.export`` writes). Problems the user
can fix (missing file, undecodable input, untrained run, missing export) exit with status 2 and a
message naming the file and the fix. A file that cannot be used costs only itself: it is reported
on one ``error:`` line, the other files are still predicted, and the command exits 2 at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.cli import UserError, error_line, run_main
from pipeline.data.frames import IMAGE_EXTS, VIDEO_EXTS, InputFile, process_file

BACKENDS = ("torch", "onnx")
COMBINE_CHOICES = ("mean", "vote")
# Used only when params.yaml is absent; the same values as the study's configuration.
FALLBACK_RATE_HZ, FALLBACK_MAX_FRAMES, FALLBACK_MAX_SIDE = 3.0, 30, 320
ONNX_FILE = "model.onnx"

#: A fold model as a function: float32 RGB [0, 1] NCHW batch -> N x C logits.
LogitFn = Callable[[np.ndarray], np.ndarray]


class PredictError(RuntimeError, UserError):
    """A problem the user can fix (bad input path, untrained run, missing export); exit code 2."""


# --------------------------------------------------------------------------- run discovery
def default_run_dir(params: Mapping, models_dir: str | Path = "models") -> Path:
    """``models/<grid.models[0]>-<grid.losses[0]>``: the run ``dvc repro`` trains first."""
    grid = params.get("grid") or {}
    models, losses = grid.get("models") or [], grid.get("losses") or []
    if not models or not losses:
        raise PredictError("params.yaml has no grid.models / grid.losses to take the default run "
                           "from: pass --run models/<model>-<loss>")
    return Path(models_dir) / f"{models[0]}-{losses[0]}"


def find_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """``{k: <run_dir>/fold_<k>/best.pt}`` for every trained fold, sorted by fold.

    Raises:
        PredictError: The run folder or every checkpoint in it is missing.
    """
    from pipeline.models.checkpoint import fold_checkpoints

    try:
        return fold_checkpoints(run_dir)
    except FileNotFoundError as exc:
        raise PredictError(f"{exc}; run `dvc repro` first, or pass --run with a trained "
                           f"run") from exc


def onnx_candidates(run_dir: str | Path, onnx_dir: str | Path | None = None) -> list[Path]:
    """Folders that may hold the run's ``fold_<k>/model.onnx``, in the order they are tried."""
    run_dir = Path(run_dir)
    if onnx_dir is not None:
        return [Path(onnx_dir)]
    # models/<run> -> exports/<run> beside models/ (the export layout of the project), then the
    # export stage's own output folder inside the run.
    return [run_dir.parent.parent / "exports" / run_dir.name]


def find_onnx(run_dir: str | Path, folds: Sequence[int],
              onnx_dir: str | Path | None = None) -> dict[int, Path]:
    """The ONNX file of every fold, from the first candidate folder that has all of them.

    Raises:
        PredictError: No candidate folder holds an ONNX file for every fold.
    """
    candidates = onnx_candidates(run_dir, onnx_dir)
    for root in candidates:
        paths = {k: root / f"fold_{k}" / ONNX_FILE for k in folds}
        if all(p.is_file() for p in paths.values()):
            return paths
    looked = "; ".join(
        f"{root}/fold_<k>/{ONNX_FILE} missing for folds "
        f"{[k for k in folds if not (root / f'fold_{k}' / ONNX_FILE).is_file()]}"
        for root in candidates)
    raise PredictError(f"missing ONNX files for run {run_dir} (trained folds {list(folds)}): "
                       f"{looked}. Export the run first (python -m pipeline.stages.export --run-dir "
                       f"{run_dir}), pass --onnx-dir, or use --backend torch")


# --------------------------------------------------------------------------- fold models
def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)  # shift: exp never overflows
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def torch_logit_fn(path: str | Path) -> tuple[LogitFn, dict]:
    """A fold checkpoint as a logit function (eval mode, CPU) and its metadata."""
    import torch

    from pipeline.models.checkpoint import load_model

    model, ckpt = load_model(path)

    def logits(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).float().numpy()
    return logits, ckpt


def onnx_logit_fn(path: str | Path) -> LogitFn:
    """An ONNX file as a logit function run by ONNX Runtime (CPU), whatever its input's name and
    whether its batch axis is dynamic or fixed.

    Raises:
        PredictError: ONNX Runtime cannot load the file.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the CLI's output is the predictions, not ORT's graph notes
    try:
        session = ort.InferenceSession(str(path), sess_options=opts,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own (non-OSError) classes for unreadable models
        raise PredictError(f"cannot load ONNX file {path}: {exc}. Re-export the run "
                           f"(python -m pipeline.stages.export) or use --backend torch") from exc
    inp = session.get_inputs()[0]  # the exporter's input name varies ("input", "x", ...)
    # A model exported with a fixed batch runs in chunks of that size, the last one zero-padded.
    batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None

    def logits(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if batch is None or len(x) == batch:
            return session.run(None, {inp.name: x})[0]
        out = []
        for i in range(0, len(x), batch):
            chunk = x[i:i + batch]
            n = len(chunk)
            if n < batch:
                chunk = np.concatenate([chunk, np.zeros((batch - n, *x.shape[1:]), np.float32)])
            out.append(session.run(None, {inp.name: chunk})[0][:n])
        return np.concatenate(out)
    return logits


def load_fold_models(run_dir: str | Path, backend: str = "torch",
                     onnx_dir: str | Path | None = None) -> tuple[dict[int, LogitFn], dict]:
    """Every fold model of a run as a logit function, and the run's shared metadata.

    Args:
        run_dir: ``models/<model>-<loss>``.
        backend: ``torch`` (the checkpoints) or ``onnx`` (the exported files, run by ONNX Runtime;
            classes and image size still come from the checkpoints).
        onnx_dir: Folder with ``fold_<k>/model.onnx`` (default: see :func:`onnx_candidates`).

    Returns:
        ``({fold: fn}, {"classes", "image_size", "arch", "checkpoints", "model_files"})``.

    Raises:
        PredictError: No checkpoints, missing ONNX files, or folds that disagree on classes or
            image size.
    """
    if backend not in BACKENDS:
        raise PredictError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    from pipeline.models.checkpoint import load_checkpoint

    checkpoints = find_checkpoints(run_dir)
    fns: dict[int, LogitFn] = {}
    metas: dict[int, dict] = {}
    files: dict[int, Path] = {}
    if backend == "onnx":
        files = find_onnx(run_dir, list(checkpoints), onnx_dir)
    for k, path in checkpoints.items():
        if backend == "torch":
            fns[k], metas[k] = torch_logit_fn(path)
            files[k] = path
        else:
            metas[k] = load_checkpoint(path)
            fns[k] = onnx_logit_fn(files[k])
    first = metas[next(iter(metas))]
    for k, meta in metas.items():
        if (list(meta["classes"]) != list(first["classes"])
                or meta["image_size"] != first["image_size"]):
            raise PredictError(f"fold checkpoints of {run_dir} disagree: {checkpoints[k]} has "
                               f"classes {meta['classes']} at {meta['image_size']} px, another "
                               f"{first['classes']} at {first['image_size']} px; retrain the run "
                               f"(dvc repro)")
    info = {"classes": list(first["classes"]), "image_size": int(first["image_size"]),
            "interpolation": first["interpolation"],
            "arch": first.get("model_cfg", {}).get("arch", ""),
            "checkpoints": {k: str(p) for k, p in checkpoints.items()},
            "model_files": {k: str(p) for k, p in files.items()}}
    return fns, info


# --------------------------------------------------------------------------- frames
def input_kind(path: str | Path) -> str:
    """``video`` or ``image`` by extension, as the extraction stage decides.

    Raises:
        PredictError: Neither a video nor an image extension.
    """
    ext = Path(path).suffix.lower()
    if ext in VIDEO_EXTS:
        return "video"
    if ext in IMAGE_EXTS:
        return "image"
    raise PredictError(f"{path}: unsupported file type {ext or '(no extension)'}; pass a video "
                       f"({', '.join(sorted(VIDEO_EXTS))}) or an image "
                       f"({', '.join(sorted(IMAGE_EXTS))})")


def input_problem(path: str | Path) -> str:
    """Why ``path`` cannot be an input (missing, a folder, an unsupported extension), or ""."""
    path = Path(path)
    if not path.exists():
        return f"{path}: file not found; check the path"
    if not path.is_file():
        return f"{path}: not a file; pass video or image files, not folders"
    try:
        input_kind(path)
    except PredictError as exc:
        return str(exc)
    return ""


def check_inputs(paths: Sequence[str | Path]) -> list[dict[str, str]]:
    """The paths that cannot be inputs, as ``[{"file", "error"}]``, found before any model loads.

    Raises:
        PredictError: No path given, or none of them usable (nothing to predict).
    """
    if not paths:
        raise PredictError("no input given: pass one or more video or image files")
    problems = {str(p): input_problem(p) for p in paths}
    errors = [{"file": f, "error": e} for f, e in problems.items() if e]
    if len(errors) == len(problems):
        raise PredictError("; ".join(e["error"] for e in errors))
    return errors


def extract_input_frames(path: str | Path, image_size: int, rate_hz: float, max_frames: int,
                         max_side: int | None = FALLBACK_MAX_SIDE, fps: float | None = None,
                         interpolation: str = "area", min_side: int | None = None
                         ) -> tuple[np.ndarray, pd.DataFrame, str]:
    """The frames of one file, as training sees them.

    Runs the extraction stage's own ``process_file`` (same sampling rule, ``to_rgb8``, JPEG
    round trip and longest-side cap) into a temporary folder outside the repository, then
    ``decode_frames`` (square resize with the run's interpolation, RGB).

    Args:
        path: A video or image file.
        image_size: The run's input size (square).
        rate_hz: Frames kept per second of video.
        max_frames: At most this many frames per video.
        max_side: Longest side of the written frame (``dataset.frame_max_side``).
        fps: Frame rate to use when the container gives none.
        min_side: Inputs whose smaller side is below this are refused, as the stage excludes
            them (``dataset.min_side``); a "video" of one frame is refused too.

    Returns:
        ``(uint8 N x 3 x S x S RGB, table with frame_index/time_s/fps/width/height, kind)``.

    Raises:
        PredictError: The file cannot be decoded (message names it and what to do).
    """
    from pipeline.data.loading import decode_frames

    path = Path(path)
    kind = input_kind(path)
    item = InputFile(source=path.name, kind=kind, probe="", fps_hint=fps)
    with tempfile.TemporaryDirectory(prefix="lus_predict_") as tmp:
        res = process_file(item, str(path.parent), tmp, float(rate_hz), int(max_frames), max_side,
                           min_side)
        if res.excluded:
            raise PredictError(f"{path}: {res.excluded}")
        if res.error:
            if "frame rate" in res.error:
                fix = "pass its frame rate with --fps"
            elif kind == "video":
                fix = (f"check that it is a real video; re-encode it (e.g. `ffmpeg -i {path.name} "
                       f"out.mp4`) or pass its frames as images")
            else:
                fix = "check that it is a real image; re-save it as PNG or JPEG"
            raise PredictError(f"{path}: {res.error}; {fix}")
        try:
            images = decode_frames([Path(tmp) / r["frame"] for r in res.rows], int(image_size),
                                   interpolation)
        except OSError as exc:
            raise PredictError(f"{path}: a sampled frame could not be re-read ({exc})") from exc
    table = pd.DataFrame([{k: r[k] for k in ("frame_index", "time_s", "fps", "width", "height")}
                          for r in res.rows])
    return images, table, kind


# --------------------------------------------------------------------------- prediction
def fold_probabilities(fns: Mapping[int, LogitFn], images: np.ndarray,
                       batch_size: int = 64) -> dict[int, np.ndarray]:
    """Softmax probabilities (N x C) of every fold model on uint8 NCHW images."""
    x = images.astype(np.float32) / 255.0  # the models' input: RGB float in [0, 1]
    out = {}
    for k, fn in fns.items():
        parts = [fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        out[k] = _softmax(np.concatenate(parts))
    return out


def _probs_dict(classes: Sequence[str], row: np.ndarray) -> dict[str, float]:
    return {c: float(p) for c, p in zip(classes, row)}


def predict_files(paths: Sequence[str | Path], run_dir: str | Path, backend: str = "torch",
                  ensemble: str = "mean", *, video_agg: str = "mean",
                  rate_hz: float = FALLBACK_RATE_HZ, max_frames: int = FALLBACK_MAX_FRAMES,
                  max_side: int | None = FALLBACK_MAX_SIDE, fps: float | None = None,
                  onnx_dir: str | Path | None = None, batch_size: int = 64,
                  min_side: int | None = None) -> dict[str, Any]:
    """Classify videos/images with every fold model of a run; a file that cannot be used is
    listed in ``errors`` and the others are still predicted.

    Args:
        paths: Video or image files.
        run_dir: Trained run, ``models/<model>-<loss>`` with ``fold_<k>/best.pt``.
        backend: ``torch`` or ``onnx``.
        ensemble: How the fold models' probabilities combine per frame: ``mean`` or ``vote``
            (see :func:`pipeline.evaluation.aggregation.ensemble_probabilities`).
        video_agg: How a video's frame probabilities combine: ``mean`` or ``vote`` (see
            :func:`pipeline.evaluation.aggregation.aggregate_videos`).
        rate_hz: Frames kept per second of video.
        max_frames: At most this many frames per video.
        max_side: Longest side of the extracted frame before resizing.
        fps: Frame rate for videos whose container gives none.
        onnx_dir: Folder with ``fold_<k>/model.onnx`` for the ONNX backend.
        batch_size: Frames per forward pass.
        min_side: Smallest side of an input, in pixels (``dataset.min_side``; None: any).

    Returns:
        ``{"run", "backend", "ensemble", "video_agg", "classes", "folds", "image_size",
        "rate_hz", "max_frames", "videos": [...], "errors": [{"file", "error"}]}``; each video is ``{"file", "kind", "fps",
        "n_frames", "probs": {class: p}, "pred", "frames": [...]}`` and each frame
        ``{"frame_index", "time_s", "probs", "pred", "fold_probs": {fold: {class: p}}}``.

    Raises:
        PredictError: A problem of the whole command (options, run, models) or no usable input;
            the message names the file and the fix.
    """
    _check_options(ensemble, video_agg, rate_hz, max_frames)
    errors = check_inputs(paths)
    fns, info = load_fold_models(run_dir, backend, onnx_dir)
    classes = info["classes"]
    videos = []
    failed = {e["file"] for e in errors}
    for p in paths:
        if str(p) in failed:
            continue
        try:
            images, table, kind = extract_input_frames(p, info["image_size"], rate_hz,
                                                       max_frames, max_side, fps,
                                                       info["interpolation"], min_side)
        except PredictError as exc:
            errors.append({"file": str(p), "error": str(exc)})
            continue
        per_fold = fold_probabilities(fns, images, batch_size)
        videos.append({"file": str(p), "kind": kind,
                       **_video_prediction(per_fold, table, classes, ensemble, video_agg)})
    return {"run": str(run_dir), "backend": backend, "ensemble": ensemble,
            "video_agg": video_agg, "classes": classes,
            "folds": sorted(int(k) for k in fns), "image_size": info["image_size"],
            "model_files": {str(k): v for k, v in info["model_files"].items()},
            "rate_hz": float(rate_hz), "max_frames": int(max_frames), "videos": videos,
            "errors": sorted(errors, key=lambda e: [str(p) for p in paths].index(e["file"]))}


def _check_options(ensemble: str, video_agg: str, rate_hz: float, max_frames: int) -> None:
    for name, value in (("ensemble", ensemble), ("video_agg", video_agg)):
        if value not in COMBINE_CHOICES:
            raise PredictError(f"{name}={value!r}: use one of {', '.join(COMBINE_CHOICES)}")
    if not (rate_hz > 0 and math.isfinite(rate_hz)) or int(max_frames) < 1:
        raise PredictError(f"rate_hz must be > 0 and max_frames >= 1; got {rate_hz}, {max_frames}")


def _video_prediction(per_fold: Mapping[int, np.ndarray], table: pd.DataFrame,
                      classes: Sequence[str], ensemble: str, video_agg: str) -> dict[str, Any]:
    """One input's entry of :func:`predict_files` (less ``file`` and ``kind``): the fold models'
    frame probabilities combined over folds (``ensemble``), then over frames (``video_agg``)."""
    from pipeline.evaluation.aggregation import aggregate_videos, ensemble_probabilities

    probs = ensemble_probabilities(list(per_fold.values()), ensemble)
    frame_preds = pd.DataFrame({"frame": np.arange(len(probs)), "source": "input",
                                "y_true": -1, "y_pred": probs.argmax(1)})
    for i, c in enumerate(classes):
        frame_preds[f"prob_{c}"] = probs[:, i]
    video = aggregate_videos(frame_preds, classes, how=video_agg).iloc[0]
    video_probs = np.array([video[f"prob_{c}"] for c in classes], dtype=np.float64)
    fps_value = table["fps"].iloc[0]
    frames = []
    for j, row in enumerate(table.itertuples(index=False)):
        frames.append({"frame_index": int(row.frame_index), "time_s": float(row.time_s),
                       "probs": _probs_dict(classes, probs[j]),
                       "pred": classes[int(probs[j].argmax())],
                       "fold_probs": {str(k): _probs_dict(classes, v[j])
                                      for k, v in per_fold.items()}})
    return {"fps": float(fps_value) if fps_value != "" else None,
            "width": int(table["width"].iloc[0]), "height": int(table["height"].iloc[0]),
            "n_frames": len(frames), "probs": _probs_dict(classes, video_probs),
            "pred": classes[int(video["y_pred"])], "frames": frames}


def format_table(result: Mapping[str, Any]) -> str:
    """Human-readable report of :func:`predict_files`' result: a frame table per video."""
    classes = result["classes"]
    width = max(9, *(len(c) + 1 for c in classes))
    lines = [f"run {result['run']}: {len(result['folds'])} fold models ({result['backend']}), "
             f"{result['ensemble']} over folds, {result['video_agg']} over frames, "
             f"{result['image_size']} px"]
    head = f"{'frame':>7} {'time_s':>8}" + "".join(f"{c:>{width}}" for c in classes) + "  pred"
    for v in result["videos"]:
        fps = f"{v['fps']:g} fps, " if v["fps"] else ""
        lines += ["", f"{v['file']} ({v['kind']}, {fps}{v['n_frames']} frame(s)) -> "
                      f"{v['pred'].upper()} ({v['probs'][v['pred']]:.3f})", head]
        for f in v["frames"]:
            lines.append(f"{f['frame_index']:>7} {f['time_s']:>8.2f}"
                         + "".join(f"{f['probs'][c]:>{width}.3f}" for c in classes)
                         + f"  {f['pred']}")
        lines.append(f"{'video':>7} {'':>8}" + "".join(f"{v['probs'][c]:>{width}.3f}"
                                                     for c in classes) + f"  {v['pred']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def _params(path: str | Path) -> dict:
    from pipeline.core.config import load_params

    path = Path(path)
    return load_params(path) if path.is_file() else {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.predict",
        description="Classify lung-ultrasound videos/images (covid/pneumonia/healthy) with the "
                    "fold models of a trained run.")
    parser.add_argument("inputs", nargs="+", metavar="VIDEO_OR_IMAGE")
    parser.add_argument("--run", help="trained run models/<model>-<loss> (default: the first "
                                      "grid cell of params.yaml)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch")
    parser.add_argument("--ensemble", choices=COMBINE_CHOICES, default="mean",
                        help="combine fold models per frame by mean probability or majority vote")
    parser.add_argument("--video-agg", choices=COMBINE_CHOICES, default="mean",
                        help="combine a video's frames by mean probability or majority vote")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--rate-hz", type=float, help="frames per second kept (default: "
                                                      "params.yaml dataset.rate_hz)")
    parser.add_argument("--max-frames", type=int, help="frames per video at most (default: "
                                                       "params.yaml dataset.max_frames)")
    parser.add_argument("--fps", type=float, help="frame rate for videos that do not state one")
    parser.add_argument("--onnx-dir", help="folder with fold_<k>/model.onnx (ONNX backend)")
    parser.add_argument("--params", default="params.yaml")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: parse, call :func:`predict_files`, print.

    Returns:
        0 on success, 2 on a problem the user can fix: one ``error:`` line on stderr per file
        that could not be used (the others are still predicted and printed), or one for a
        problem of the whole command. Bad arguments exit through argparse (SystemExit 2).
    """
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        params = _params(args.params)
        ds = params.get("dataset") or {}
        run_dir = Path(args.run) if args.run else default_run_dir(params)
        # The extraction stage's settings, so that frames match what the models were trained on.
        rate_hz = args.rate_hz if args.rate_hz is not None else float(
            ds.get("rate_hz", FALLBACK_RATE_HZ))
        max_frames = args.max_frames if args.max_frames is not None else int(
            ds.get("max_frames", FALLBACK_MAX_FRAMES))
        result = predict_files(
            args.inputs, run_dir, args.backend, args.ensemble, video_agg=args.video_agg,
            rate_hz=rate_hz, max_frames=max_frames,
            max_side=ds.get("frame_max_side", FALLBACK_MAX_SIDE), fps=args.fps,
            onnx_dir=args.onnx_dir, min_side=ds.get("min_side"))
    except UserError as exc:  # PredictError, or a ConfigError from params.yaml
        print(error_line(exc), file=sys.stderr)
        return 2
    if result["videos"]:
        print(json.dumps(result, indent=2) if args.json else format_table(result), flush=True)
    for failure in result["errors"]:
        print(error_line(PredictError(failure["error"])), file=sys.stderr)
    return 2 if result["errors"] else 0


if __name__ == "__main__":
    run_main(main)
