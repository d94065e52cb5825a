"""Frames as tensors: the fold/split tables, a decoded-frame cache, and batched augmentation.

Frames are decoded once per (frame set, image size) into a uint8 array file under
``.cache/frames/`` and memory-mapped afterwards, so training epochs, evaluation and export never
re-decode JPEGs. The cache key hashes the frame list and the size, so a changed extraction never
reads a stale cache.
"""

from __future__ import annotations

import hashlib
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

from pipeline.config import get, load_params

log = logging.getLogger("pipeline.data")

CACHE_DIR = Path(".cache/frames")


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


def decode_frames(paths: Sequence[str | Path], image_size: int) -> np.ndarray:
    """Read frame images into an ``N x 3 x S x S`` uint8 RGB array (resized, as the study, to a
    square without keeping the aspect ratio)."""
    out = np.empty((len(paths), 3, image_size, image_size), dtype=np.uint8)
    for i, p in enumerate(paths):
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            raise OSError(f"cannot read frame {p}: re-run extract_frames (dvc repro -f extract_frames)")
        img = cv2.resize(img, (image_size, image_size), interpolation=cv2.INTER_AREA)
        out[i] = cv2.cvtColor(img, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)
    return out


def cached_frames(frames_dir: str | Path, names: Sequence[str], image_size: int,
                  cache_dir: str | Path = CACHE_DIR) -> np.ndarray:
    """All frames in ``names`` at ``image_size``, decoded once and memory-mapped afterwards."""
    frames_dir = Path(frames_dir)
    key = hashlib.sha256()
    for n in names:
        st = (frames_dir / n).stat()
        key.update(f"{n}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    key.update(str(image_size).encode())
    path = Path(cache_dir) / f"{key.hexdigest()[:20]}_{image_size}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    log.info("decoding %d frames at %d px into %s", len(names), image_size, path)
    arr = decode_frames([frames_dir / n for n in names], image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)
    return arr


class FrameStore:
    """The frames of a dataset at one image size, addressed by manifest frame name."""

    def __init__(self, frames_dir: str | Path, frames: pd.DataFrame, image_size: int):
        self.frames = frames.reset_index(drop=True)
        self.index = {n: i for i, n in enumerate(self.frames["frame"])}
        self.array = cached_frames(frames_dir, list(self.frames["frame"]), image_size)

    def tensor(self, names: Sequence[str]) -> torch.Tensor:
        idx = np.fromiter((self.index[n] for n in names), dtype=np.int64, count=len(names))
        return torch.from_numpy(np.ascontiguousarray(self.array[idx]))


def load_split_images(fold: int, split: str, image_size: int, limit: int | None = None,
                      params: Mapping | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Real frames of one side of a fold as ``(uint8 N x 3 x S x S, labels)``: used by export
    parity checks and calibration. ``limit`` takes frames evenly across the split."""
    params = params or load_params()
    ds, folds = get(params, "dataset"), get(params, "folds")
    frames = used_frames(ds["frames_dir"])
    splits = pd.read_csv(Path(folds["dir"]) / "splits.csv", dtype={"patient": str})
    part = fold_frames(frames, splits, fold, split)
    if limit and len(part) > limit:
        part = part.iloc[np.linspace(0, len(part) - 1, limit).round().astype(int)]
    images = decode_frames([Path(ds["frames_dir"]) / n for n in part["frame"]], image_size)
    return torch.from_numpy(images), torch.as_tensor(part["label"].to_numpy(), dtype=torch.long)


def augment_batch(x: torch.Tensor, cfg: Mapping, generator: torch.Generator) -> torch.Tensor:
    """Random rotation, shifts and flips, drawn per image, applied to a float batch in one
    ``grid_sample`` (on whatever device the batch is on).

    Matches the study's Keras ImageDataGenerator settings: rotation in [-r, r] degrees, shifts of
    up to ``shift`` x size, horizontal/vertical flips with probability 0.5, edge pixels repeated
    (Keras ``fill_mode='nearest'`` = ``padding_mode='border'``).
    """
    n = x.shape[0]
    dev = x.device
    rnd = torch.rand((n, 5), generator=generator).to(dev)
    angle = (rnd[:, 0] * 2 - 1) * math.radians(float(cfg.get("rotation", 0)))
    shift = float(cfg.get("shift", 0))
    tx, ty = (rnd[:, 1] * 2 - 1) * shift * 2, (rnd[:, 2] * 2 - 1) * shift * 2  # grid spans [-1, 1]
    sx = torch.where((rnd[:, 3] < 0.5) & bool(cfg.get("hflip")), -1.0, 1.0)
    sy = torch.where((rnd[:, 4] < 0.5) & bool(cfg.get("vflip")), -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * sx, -sin * sy, tx], 1),
                         torch.stack([sin * sx, cos * sy, ty], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
