"""File digests shared by the stages that vouch for data (checksums, duplicates, the audit
and the training gate that reads its report)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from pipeline.core.config import get


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def audit_inputs(params: Mapping) -> dict[str, str]:
    """SHA-256 of the two files the audit vouches for: the frame manifest and the splits."""
    ds, folds = get(params, "dataset"), get(params, "folds")
    return {"manifest": sha256_file(Path(ds["frames_dir"]) / "manifest.csv"),
            "splits": sha256_file(Path(folds["dir"]) / "splits.csv")}
