"""Shared fixtures: small real media files written by the tests, and the real dataset path."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_LUS = PROJECT_ROOT.parent / "shared" / "datasets" / "covid19_ultrasound" / "data"


def write_video(path: Path, n_frames: int, fps: float, size: int = 48) -> Path:
    """A video whose frame i shows its index as two flat grey halves (i // 28 and i % 28, in
    steps of 8 grey levels, which survive lossy compression)."""
    codec = {".avi": "MJPG", ".mp4": "mp4v"}[path.suffix]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (size, size))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for i in range(n_frames):
        frame = np.empty((size, size, 3), dtype=np.uint8)
        frame[:, : size // 2] = 16 + 8 * (i // 28)
        frame[:, size // 2:] = 16 + 8 * (i % 28)
        writer.write(frame)
    writer.release()
    return path


def frame_level_to_index(img: np.ndarray) -> int:
    """Inverse of the ``write_video`` pattern (read away from the edge between the halves)."""
    w = img.shape[1]
    hi = int(round((float(img[:, : w // 2 - 4].mean()) - 16) / 8))
    lo = int(round((float(img[:, w // 2 + 4:].mean()) - 16) / 8))
    return 28 * hi + lo


@pytest.fixture
def shared_lus() -> Path:
    if not SHARED_LUS.is_dir():
        pytest.skip(f"real dataset not found at {SHARED_LUS}")
    return SHARED_LUS
