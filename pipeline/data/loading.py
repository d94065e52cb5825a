"""Frames as tensors: the audited fold/split tables, a decoded-frame cache, and batched augmentation.

Frames are decoded once per (frame set, image size) into a uint8 array file under
``.cache/frames/`` and memory-mapped afterwards, so training epochs, evaluation and export never
re-decode JPEGs. The cache key hashes the frame list and the size, so a changed extraction never
reads a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.core.cli import UserError
from pipeline.core.config import get, load_params
from pipeline.core.files import audit_inputs

log = logging.getLogger("pipeline.data.loading")

CACHE_DIR = Path(".cache/frames")

# ``dataset.resize_interpolation``: how frames are brought to the square input size. ``area`` (the
# default) averages when shrinking video frames; when enlarging, OpenCV's area resize repeats
# pixels at integer factors (as ``nearest``) and blends them otherwise. MedMNIST's 224 px rows
# enlarged its 28 px images with nearest neighbour.
INTERPOLATIONS = {"area": cv2.INTER_AREA, "nearest": cv2.INTER_NEAREST, "linear": cv2.INTER_LINEAR}


def interpolation_of(ds: Mapping) -> str:
    """The dataset config's ``resize_interpolation``."""
    return str(ds["resize_interpolation"])


def _cv2_interpolation(name: str) -> int:
    if name not in INTERPOLATIONS:
        raise ValueError(f"dataset.resize_interpolation={name!r}: use one of "
                         f"{', '.join(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


def resize_square(img: np.ndarray, image_size: int, interpolation: str = "area") -> np.ndarray:
    """``img`` resized to ``image_size`` x ``image_size`` (aspect ratio not kept, as the study)."""
    return cv2.resize(img, (image_size, image_size), interpolation=_cv2_interpolation(interpolation))


def used_frames(frames_dir: str | Path) -> pd.DataFrame:
    """The manifest's frame rows (status ``used``)."""
    path = Path(frames_dir) / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the extract_frames stage first (dvc repro)")
    manifest = pd.read_csv(path, dtype={"patient": str})
    return manifest[manifest["status"] == "used"].reset_index(drop=True)


def subsample_per_source(frames: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """Keep at most ``limit`` frames per source file, evenly spread over the file's frames."""
    if not limit:
        return frames
    keep = []
    for _, part in frames.groupby("source", sort=False):
        idx = np.linspace(0, len(part) - 1, num=min(limit, len(part))).round().astype(int)
        keep.extend(part.index[np.unique(idx)])
    return frames.loc[sorted(keep)]


def fold_frames(frames: pd.DataFrame, splits: pd.DataFrame, fold: int, split: str) -> pd.DataFrame:
    """Frames of one side (train/val/test) of one fold."""
    part = splits[(splits["fold"] == fold) & (splits["split"] == split)]
    if part.empty:
        raise ValueError(f"fold {fold} has no '{split}' rows in the splits table "
                         f"(folds: {sorted(splits['fold'].unique())})")
    return frames[frames["source"].isin(set(part["source"]))]


def decode_frames(paths: Sequence[str | Path], image_size: int,
                  interpolation: str = "area") -> np.ndarray:
    """Read frame images into an ``N x 3 x S x S`` uint8 RGB array (``resize_square``)."""
    _cv2_interpolation(interpolation)  # a bad name fails before any file is read
    out = np.empty((len(paths), 3, image_size, image_size), dtype=np.uint8)
    for i, p in enumerate(paths):
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            raise OSError(f"cannot read frame {p}: re-run extract_frames (dvc repro -f extract_frames)")
        img = resize_square(img, image_size, interpolation)
        out[i] = cv2.cvtColor(img, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)
    return out


def cached_frames(frames_dir: str | Path, names: Sequence[str], image_size: int,
                  cache_dir: str | Path = CACHE_DIR, interpolation: str = "area") -> np.ndarray:
    """All frames in ``names`` at ``image_size``, decoded once and memory-mapped afterwards."""
    frames_dir = Path(frames_dir)
    key = hashlib.sha256()
    for n in names:
        st = (frames_dir / n).stat()
        key.update(f"{n}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    key.update(str(image_size).encode())
    if interpolation != "area":  # the default keeps the keys of caches written before the option
        key.update(interpolation.encode())
    path = Path(cache_dir) / f"{key.hexdigest()[:20]}_{image_size}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    log.info("decoding %d frames at %d px into %s", len(names), image_size, path)
    arr = decode_frames([frames_dir / n for n in names], image_size, interpolation)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)
    return arr


class FrameStore:
    """The frames of a dataset at one image size, addressed by manifest frame name."""

    def __init__(self, frames_dir: str | Path, frames: pd.DataFrame, image_size: int,
                 interpolation: str = "area"):
        self.frames = frames.reset_index(drop=True)
        self.interpolation = interpolation
        self.index = {n: i for i, n in enumerate(self.frames["frame"])}
        self.array = cached_frames(frames_dir, list(self.frames["frame"]), image_size,
                                   interpolation=interpolation)

    def tensor(self, names: Sequence[str]) -> torch.Tensor:
        idx = np.fromiter((self.index[n] for n in names), dtype=np.int64, count=len(names))
        return torch.from_numpy(np.ascontiguousarray(self.array[idx]))


class AuditError(RuntimeError, UserError):
    """The folds have not passed the leakage audit (or changed since they did)."""


def audited_splits(params: Mapping) -> pd.DataFrame:
    """The splits table, once the audit report (``audit.report``) shows that these very folds
    and frames passed. Every route that trains reads the folds through here.

    Raises:
        AuditError: no report, a failed audit, or folds/frames changed since the audit.
    """
    report_path = Path(get(params, "audit.report"))
    splits_path = Path(get(params, "folds.dir")) / "splits.csv"
    fix = "run `dvc repro audit` (or `python -m pipeline.stages.audit`) and resolve what it reports"
    if not report_path.is_file():
        raise AuditError(f"{splits_path} has no leakage audit ({report_path} not found): {fix}")
    report = json.loads(report_path.read_text())
    if not report.get("ok"):
        raise AuditError(f"{splits_path} FAILED the leakage audit ({report_path}): {fix}")
    if report.get("inputs") != audit_inputs(params):
        raise AuditError(f"{splits_path} or the frame manifest changed since the audit in "
                         f"{report_path}: {fix}")
    return pd.read_csv(splits_path, dtype={"patient": str})


def load_split_images(fold: int, split: str, image_size: int, limit: int | None = None,
                      params: Mapping | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Real frames of one side of a fold as ``(uint8 N x 3 x S x S, labels)``: used by export
    parity checks and calibration. ``limit`` takes frames evenly across the split."""
    params = params or load_params()
    ds = get(params, "dataset")
    frames = used_frames(ds["frames_dir"])
    part = fold_frames(frames, audited_splits(params), fold, split)
    if limit and len(part) > limit:
        part = part.iloc[np.linspace(0, len(part) - 1, limit).round().astype(int)]
    images = decode_frames([Path(ds["frames_dir"]) / n for n in part["frame"]], image_size,
                           interpolation_of(ds))
    return torch.from_numpy(images), torch.as_tensor(part["label"].to_numpy(), dtype=torch.long)


def affine_theta(angle: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, sx: torch.Tensor,
                 sy: torch.Tensor, zoom_w: torch.Tensor, zoom_h: torch.Tensor,
                 shear: torch.Tensor, aspect: float = 1.0) -> torch.Tensor:
    """``(N, 2, 3)`` matrices for ``F.affine_grid`` that map output to input coordinates.

    In the grid's ``(x, y)`` coordinates (x along the width, both in [-1, 1]):
    ``input = R(angle) @ Shear(shear) @ Zoom(zoom_w, zoom_h) @ Flip(sx, sy) @ output + (tx, ty)``,
    Keras' ``apply_affine_transform`` order (rotation, shift, shear, zoom; flips after the warp).
    The shift is not rotated (Keras rotates it; with rotations of a few degrees and symmetric
    ranges the distributions barely differ), kept as it was before zoom/shear existed.

    Keras' shear matrix in (row, col) pixels is ``[[1, -sin s], [0, cos s]]``: the output pixel
    at centred (row, col) reads the input at ``(row - sin(s) * col, cos(s) * col)``; ``aspect``
    (W / H) carries the pixel offset into the normalised y coordinate. Zoom factors scale the
    sampling coordinates as in Keras: a factor ``f`` shows the content magnified ``1 / f``.

    Args:
        angle: Rotation in radians. tx, ty: shifts in grid units (2 = the whole width/height).
        sx, sy: -1 to flip horizontally/vertically, else 1.
        zoom_w, zoom_h: Sampling scale along the width/height (1 = none).
        shear: Shear angle in radians (0 = none). All of shape ``(N,)``.
        aspect: Image width / height.
    """
    cos, sin = torch.cos(angle), torch.sin(angle)
    # M = Shear @ Zoom @ Flip = [[a, 0], [c, d]]; with no shear and no zoom, a = sx, c = 0, d = sy,
    # and R @ M below reproduces the former rotation/flip matrix bit for bit.
    a = torch.cos(shear) * zoom_w * sx
    c = -torch.sin(shear) * aspect * zoom_w * sx
    d = zoom_h * sy
    return torch.stack([torch.stack([cos * a - sin * c, -sin * d, tx], 1),
                        torch.stack([sin * a + cos * c, cos * d, ty], 1)], 1)


def augment_batch(x: torch.Tensor, cfg: Mapping, generator: torch.Generator) -> torch.Tensor:
    """Random rotation, shifts, zoom, shear and flips, drawn per image, applied to a float batch
    in one ``grid_sample`` (on whatever device the batch is on).

    Matches the studies' Keras ImageDataGenerator settings: ``rotation`` in [-r, r] degrees,
    shifts of up to ``shift`` x size, horizontal/vertical flips with probability 0.5, edge pixels
    repeated (Keras ``fill_mode='nearest'`` = ``padding_mode='border'``), and:

    * ``zoom`` = Keras ``zoom_range`` z: sampling scales drawn independently for width and height
      in [1 - z, 1 + z], as Keras draws ``zx, zy``; a scale below 1 magnifies (zooms in).
    * ``shear`` = Keras ``shear_range`` in DEGREES: the angle is drawn in [-s, s] degrees
      (Keras' ImageDataGenerator documents "shear angle ... in degrees" and converts with
      ``np.deg2rad`` in ``apply_affine_transform``; older Keras releases documented radians).
      So the common ``shear_range=0.2`` is a 0.2 degree shear: under half a pixel at 224 px.

    ``zoom``/``shear`` absent or 0 = off; their random numbers are then not drawn, so configs
    without them keep the exact former random stream and output.

    Args:
        x: Float batch ``(N, C, H, W)``.
        cfg: ``train.augment``: rotation, shift, hflip, vflip, zoom, shear.
        generator: CPU generator that draws the parameters (reproducible runs).
    """
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    dev = x.device
    rnd = torch.rand((n, 5), generator=generator).to(dev)
    angle = (rnd[:, 0] * 2 - 1) * math.radians(float(cfg.get("rotation", 0)))
    shift = float(cfg.get("shift", 0))
    tx, ty = (rnd[:, 1] * 2 - 1) * shift * 2, (rnd[:, 2] * 2 - 1) * shift * 2  # grid spans [-1, 1]
    sx = torch.where((rnd[:, 3] < 0.5) & bool(cfg.get("hflip")), -1.0, 1.0)
    sy = torch.where((rnd[:, 4] < 0.5) & bool(cfg.get("vflip")), -1.0, 1.0)
    zoom = float(cfg.get("zoom") or 0)
    shear = float(cfg.get("shear") or 0)
    if zoom < 0 or zoom >= 1 or shear < 0:
        raise ValueError(f"train.augment needs 0 <= zoom < 1 and shear >= 0 (degrees); got "
                         f"zoom={zoom}, shear={shear}")
    zoom_w = zoom_h = torch.ones(n, device=dev)
    if zoom:
        z = torch.rand((n, 2), generator=generator).to(dev)
        zoom_w, zoom_h = 1 + (z[:, 0] * 2 - 1) * zoom, 1 + (z[:, 1] * 2 - 1) * zoom
    shear_rad = torch.zeros(n, device=dev)
    if shear:
        shear_rad = (torch.rand(n, generator=generator).to(dev) * 2 - 1) * math.radians(shear)
    theta = affine_theta(angle, tx, ty, sx, sy, zoom_w, zoom_h, shear_rad,
                         aspect=w / h).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
