"""Grad-CAM figure of a trained run: where each fold model looks on its own test frames.

For every class, a few test frames of that class are taken from the run's
``fold_<k>/test_predictions.csv`` (frames of different videos first), and Grad-CAM
(``pytorch_grad_cam.GradCAM`` on :func:`pipeline.models.classifier.gradcam_target_layer`, for the TRUE class)
is computed with the model of the fold that held the frame out, so every map comes from a model
that never saw the frame. The grid has one row per class and one column per example; each cell is
the frame with its heat map, titled with the true and predicted class and the predicted class's
probability (red when wrong).

    python -m pipeline.evaluation.gradcam --run-dir models/mini_covidnet-ce \
        --out reports/figures/gradcam_mini_covidnet-ce.png [--frames-per-class 4]

Models whose Grad-CAM layer gives no spatial map get the plain frame and a note instead of a
heat map (and a warning), rather than a failed figure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.core.cli import UserError

log = logging.getLogger("pipeline.evaluation.gradcam")

PREDICTION_FILE = "test_predictions.csv"


class GradCamError(RuntimeError, UserError):
    """A missing input the user can produce (predictions, checkpoint, frame); exit code 2."""


class CamUnavailable(RuntimeError):
    """The model's Grad-CAM layer gives no spatial map (or no gradient), so no heat map exists."""


# --------------------------------------------------------------------------- Grad-CAM
def _layer_output_shape(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> Any:
    shapes: list[Any] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        shapes.append(tuple(output.shape) if isinstance(output, torch.Tensor)
                      else type(output).__name__)

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        handle.remove()
    return shapes[0] if shapes else None


def compute_cams(model: nn.Module, images: np.ndarray | torch.Tensor,
                 targets: Sequence[int], layer: nn.Module | None = None) -> np.ndarray:
    """Grad-CAM maps of a batch, each for its own target class.

    Args:
        model: A model from :func:`pipeline.models.build.build_model` (or ``load_model``); put in eval
            mode.
        images: ``N x 3 x S x S`` RGB, uint8 (0-255) or float in [0, 1].
        targets: Class index per image (the logit whose gradient weights the channels).
        layer: Target layer; default :func:`pipeline.models.classifier.gradcam_target_layer`.

    Returns:
        ``N x S x S`` float32 maps, each min-max normalised to [0, 1] (all zeros when no location
        raises the target's logit).

    Raises:
        CamUnavailable: The layer's output is not a ``(N, C, H, W)`` map, or no gradient reaches
            it; the message names the layer.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from pipeline.models.classifier import gradcam_target_layer

    if layer is None:
        layer = gradcam_target_layer(model)
    name = getattr(model, "gradcam_layer", type(layer).__name__)
    x = torch.as_tensor(np.asarray(images))
    x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
    if len(targets) != len(x):
        raise ValueError(f"{len(x)} images but {len(targets)} targets: one class per image")
    model.eval()
    shape = _layer_output_shape(model, layer, x)
    if not (isinstance(shape, tuple) and len(shape) == 4 and shape[2] * shape[3] > 0):
        raise CamUnavailable(
            f"{getattr(model, 'arch', type(model).__name__)}: Grad-CAM layer '{name}' outputs "
            f"{shape}, not a spatial (N, C, H, W) map; point the model's gradcam_layer at its "
            f"last convolutional block")
    # Gradients must reach the layer even when every layer before it is frozen (e.g. POCOVID-Net
    # trains only block5_conv3): an input that requires grad keeps the graph alive.
    x = x.clone().requires_grad_(True)
    with GradCAM(model=model, target_layers=[layer]) as cam:
        try:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
        except (IndexError, ValueError, RuntimeError) as exc:
            raise CamUnavailable(f"Grad-CAM on layer '{name}' failed ({type(exc).__name__}: "
                                 f"{exc})") from exc
    maps = np.asarray(maps, dtype=np.float32)
    if not np.isfinite(maps).all():
        raise CamUnavailable(f"Grad-CAM on layer '{name}' gave non-finite values")
    return np.clip(maps, 0.0, 1.0)  # the library's min-max scaling can overshoot by float error


def compute_cam(model: nn.Module, image: np.ndarray | torch.Tensor, target: int,
                layer: nn.Module | None = None) -> np.ndarray:
    """Grad-CAM map (``S x S``, float32 in [0, 1]) of one ``3 x S x S`` image for class ``target``.

    See :func:`compute_cams`.
    """
    return compute_cams(model, np.asarray(image)[None], [target], layer)[0]


def overlay(rgb: np.ndarray, cam: np.ndarray, image_weight: float = 0.55) -> np.ndarray:
    """The heat map (JET) of ``cam`` blended on an ``H x W x 3`` uint8 RGB frame.

    ``cam`` is resized to the frame (bilinear): the model saw the frame squashed to a square, so
    stretching the square map back puts every location where it was.
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    h, w = rgb.shape[:2]
    cam = cv2.resize(np.asarray(cam, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return show_cam_on_image(rgb.astype(np.float32) / 255.0, np.clip(cam, 0, 1), use_rgb=True,
                             image_weight=image_weight)


# --------------------------------------------------------------------------- run inputs
def load_test_predictions(run_dir: str | Path) -> pd.DataFrame:
    """All folds' ``test_predictions.csv`` of a run, one table.

    Raises:
        GradCamError: The run has no prediction file.
    """
    run_dir = Path(run_dir)
    paths = sorted(run_dir.glob(f"fold_*/{PREDICTION_FILE}"))
    if not paths:
        raise GradCamError(f"no {run_dir}/fold_<k>/{PREDICTION_FILE}: train the run first "
                           f"(dvc repro train@{run_dir.name}) or pass --run-dir with a trained run")
    return pd.concat([pd.read_csv(p, dtype={"patient": str}) for p in paths], ignore_index=True)


def pick_examples(preds: pd.DataFrame, label: int, n: int, seed: int = 0) -> pd.DataFrame:
    """Up to ``n`` test frames of true class ``label``, from as many different videos as possible.

    Frames are shuffled with ``seed``, then the first frame of each video comes before any
    second frame, so the figure shows different patients' videos rather than one clip n times.
    """
    part = preds[preds["y_true"] == label]
    if part.empty or n < 1:
        return part.iloc[:0]
    part = part.sample(frac=1.0, random_state=seed)
    rank = part.groupby("source", sort=False).cumcount().to_numpy()
    order = np.lexsort((np.arange(len(part)), rank))  # by rank, ties in shuffled order
    return part.iloc[order[:n]]


def _read_rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise GradCamError(f"cannot read frame {path}: re-run the extract_frames stage "
                           f"(dvc repro extract_frames) or pass --frames-dir")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _model_input(rgb: np.ndarray, image_size: int, interpolation: str = "area") -> np.ndarray:
    # The same square resize as pipeline.data.loading.decode_frames (training's input).
    from pipeline.data.loading import resize_square

    return resize_square(rgb, image_size, interpolation).transpose(2, 0, 1)


# --------------------------------------------------------------------------- figure
def gradcam_grid(run_dir: str | Path, frames_per_class: int = 4, out_png: str | Path | None = None,
                 *, frames_dir: str | Path = "data/frames", seed: int = 0, dpi: int = 100,
                 cell_inches: float = 2.2) -> dict[str, Any]:
    """Draw the Grad-CAM grid of a run (rows = classes, columns = examples) into a PNG.

    Args:
        run_dir: Trained run ``models/<model>-<loss>`` (``fold_<k>/best.pt`` and
            ``fold_<k>/test_predictions.csv``).
        frames_per_class: Columns of the grid.
        out_png: Output file (default ``reports/figures/gradcam_<run>.png``).
        frames_dir: Folder of the extracted frames the predictions name.
        seed: Seed of the example choice.
        dpi: PNG resolution; the PNG is ``cols * cell_inches * dpi`` wide and
            ``rows * cell_inches * dpi`` high (plus nothing: no tight bounding box).
        cell_inches: Size of one cell.

    Returns:
        ``{"out_png", "classes", "rows", "cols", "size_px": (width, height), "cells"}``;
        ``cells[r][c]`` is None for an empty cell, else ``{"frame", "fold", "y_true", "y_pred",
        "prob", "cam": bool (a heat map was drawn), "flat": bool (the map is all zero), "note"}``.

    Raises:
        GradCamError: Missing predictions, checkpoint or frame file.
    """
    run_dir, frames_dir = Path(run_dir), Path(frames_dir)
    out_png = Path(out_png) if out_png else Path("reports/figures") / f"gradcam_{run_dir.name}.png"
    if frames_per_class < 1:
        raise ValueError(f"frames_per_class must be >= 1; got {frames_per_class}")
    preds = load_test_predictions(run_dir)
    fold_model = _FoldModels(run_dir)
    classes = list(fold_model(int(preds["fold"].iloc[0]))[1]["classes"])
    missing = [f"prob_{c}" for c in classes if f"prob_{c}" not in preds.columns]
    if missing:
        raise GradCamError(f"{run_dir}: {PREDICTION_FILE} lacks columns {missing} for the "
                           f"checkpoint's classes {classes}: re-train the run")
    rows, cols = len(classes), int(frames_per_class)
    fig, axes = _grid_figure(rows, cols, cell_inches, dpi, run_dir.name)
    cells: list[list[dict | None]] = []
    warned: set[str] = set()
    for r, cls in enumerate(classes):
        picked = pick_examples(preds, r, cols, seed)
        row_cells: list[dict | None] = []
        for c in range(cols):
            ax = axes[r][c]
            _bare_axis(ax, cls if c == 0 else None)
            if c >= len(picked):
                ax.text(0.5, 0.5, "no test frame" if picked.empty else "", ha="center",
                        va="center", fontsize=8, transform=ax.transAxes)
                row_cells.append(None)
                continue
            row_cells.append(_draw_cell(ax, picked.iloc[c], r, classes, fold_model, frames_dir,
                                        warned))
        cells.append(row_cells)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    size = (int(round(cols * cell_inches * dpi)), int(round(rows * cell_inches * dpi)))
    log.info("wrote %s (%d classes x %d frames)", out_png, rows, cols)
    return {"out_png": str(out_png), "classes": classes, "rows": rows, "cols": cols,
            "size_px": size, "cells": cells}


class _FoldModels:
    """The fold models of a run, each loaded on first use: ``(model, checkpoint)`` by fold."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.models: dict[int, tuple[nn.Module, dict]] = {}

    def __call__(self, fold: int) -> tuple[nn.Module, dict]:
        from pipeline.models.checkpoint import load_model

        if fold not in self.models:
            path = self.run_dir / f"fold_{fold}" / "best.pt"
            if not path.is_file():
                raise GradCamError(f"{path} is missing but {PREDICTION_FILE} names fold {fold}: "
                                   f"re-train the run (dvc repro train@{self.run_dir.name})")
            self.models[fold] = load_model(path)
        return self.models[fold]


def _grid_figure(rows: int, cols: int, cell_inches: float, dpi: int, run_name: str) -> tuple:
    """The figure and its ``rows x cols`` axes, with fixed margins (no tight bounding box), so
    the PNG's size is known from rows and columns."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(cols * cell_inches, rows * cell_inches), dpi=dpi)
    fig.subplots_adjust(left=0.35 / cols, right=0.99, top=1 - 0.35 / rows, bottom=0.01,
                        wspace=0.06, hspace=0.35)
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.suptitle(f"Grad-CAM (true class) - {run_name}, each frame by its held-out fold's model",
                 fontsize=9)
    return fig, axes


def _bare_axis(ax: Any, label: str | None) -> None:
    """No ticks or frame; the class name as the row label on the first column."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if label is not None:
        ax.set_ylabel(label, fontsize=11, fontweight="bold")


def _draw_cell(ax: Any, row: pd.Series, r: int, classes: Sequence[str], fold_model: _FoldModels,
               frames_dir: Path, warned: set[str]) -> dict:
    """Draw one test frame of true class ``r`` with its Grad-CAM (by its held-out fold's model);
    return the cell's description (see :func:`gradcam_grid`)."""
    fold, y_pred = int(row["fold"]), int(row["y_pred"])
    model, ckpt = fold_model(fold)
    rgb = _read_rgb(frames_dir / row["frame"])
    note, flat = "", False
    try:
        cam = compute_cam(model, _model_input(rgb, int(ckpt["image_size"]), ckpt["interpolation"]), r)
        flat = float(cam.max()) == 0.0  # no location raises the class's logit
        shown = overlay(rgb, cam)
    except CamUnavailable as exc:
        note = str(exc)
        if note not in warned:
            log.warning("no heat map, plain frames shown: %s", note)
            warned.add(note)
        shown = rgb
    ax.imshow(shown)
    prob = float(row[f"prob_{classes[y_pred]}"])
    ax.set_title(f"true {classes[r]} / pred {classes[y_pred]} ({prob:.2f})\nfold {fold}"
                 + (" - no CAM" if note else " - flat CAM" if flat else ""), fontsize=7,
                 color="tab:green" if y_pred == r else "tab:red")
    return {"frame": str(row["frame"]), "fold": fold, "y_true": r, "y_pred": y_pred,
            "prob": prob, "cam": not note, "flat": flat, "note": note}


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.evaluation.gradcam --run-dir models/X --out reports/figures/gradcam_X.png``.

    Returns:
        0 on success, 2 when an input is missing (message on stderr).
    """
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluation.gradcam",
                                     description="Grad-CAM grid of a trained run's test frames.")
    parser.add_argument("--run-dir", help="models/<model>-<loss> (default: the first grid cell "
                                          "of params.yaml)")
    parser.add_argument("--out", help="PNG path (default: reports/figures/gradcam_<run>.png)")
    parser.add_argument("--frames-per-class", type=int, default=4)
    parser.add_argument("--frames-dir", help="extracted frames (default: params.yaml "
                                             "dataset.frames_dir, else data/frames)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    params: Mapping = {}
    if Path(args.params).is_file():
        from pipeline.core.config import load_params

        params = load_params(args.params)
    try:
        if args.run_dir:
            run_dir = Path(args.run_dir)
        else:
            grid = params.get("grid") or {}
            if not grid.get("models") or not grid.get("losses"):
                raise GradCamError("no --run-dir and no grid in params.yaml: pass --run-dir "
                                   "models/<model>-<loss>")
            run_dir = Path("models") / f"{grid['models'][0]}-{grid['losses'][0]}"
        frames_dir = args.frames_dir or (params.get("dataset") or {}).get("frames_dir",
                                                                          "data/frames")
        result = gradcam_grid(run_dir, args.frames_per_class, args.out, frames_dir=frames_dir,
                              seed=args.seed)
    except GradCamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result["out_png"])
    return 0


if __name__ == "__main__":
    from pipeline.core.cli import run_main

    run_main(main)
