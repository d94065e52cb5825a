"""Copies of one image under different patient ids: find them, and join those patients.

Public image collections hold the same case posted by two sources, or one image re-exported at
another size or quality. Filed under two patient ids, such copies would land on both sides of a
fold. This module hashes every used frame twice, with SHA-256 of the frame file (byte-identical
copies) and with ImageHash's perceptual hash (pHash, 256 bits: resized, re-encoded or recoloured
copies), finds the frame pairs of *different* patients that match, and unions their patients
into split groups. ``split_folds`` splits by those groups; ``audit`` checks the folds with the
same hashes.

Frames of one patient (of one video, or of several) are never paired: they share a patient and
so a group already.

Methods (``folds.link_duplicates.method``): ``off``; ``exact`` (identical frame files);
``perceptual`` (identical files, and pHash distance <= ``threshold`` bits of 256).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from pipeline.core.files import sha256_file

HASH_SIZE = 16  # pHash of a 16 x 16 DCT block: 256 bits
METHODS = ("off", "exact", "perceptual")
MAX_EVIDENCE = 5  # frame pairs kept per linked patient pair


def perceptual_hash(image: Image.Image) -> np.ndarray:
    """The 256-bit pHash of an image as 4 big-endian uint64 words."""
    bits = imagehash.phash(image, hash_size=HASH_SIZE).hash.flatten()
    return np.packbits(bits).view(">u8").astype(np.uint64)


def hash_frames(frames_dir: str | Path, names: Sequence[str], perceptual: bool = True
                ) -> tuple[list[str], np.ndarray, list[str]]:
    """SHA-256 and (optionally) pHash of each frame file.

    Returns:
        ``(sha256 per frame ('' if unreadable), pHash words (n x 4 uint64; zeros if unreadable
        or not asked for), names of missing or unreadable frames)``.
    """
    frames_dir = Path(frames_dir)
    shas, unreadable = [], []
    words = np.zeros((len(names), HASH_SIZE * HASH_SIZE // 64), dtype=np.uint64)
    for i, name in enumerate(names):
        path = frames_dir / name
        if not path.is_file():
            shas.append("")
            unreadable.append(name)
            continue
        shas.append(sha256_file(path))
        if perceptual:
            try:
                with Image.open(path) as img:
                    words[i] = perceptual_hash(img)
            except (OSError, UnidentifiedImageError):
                unreadable.append(name)
    return shas, words, unreadable


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between the hashes in ``a`` (m x 4) and ``b`` (n x 4): m x n."""
    return np.bitwise_count(a[:, None, :] ^ b[None, :, :]).sum(axis=-1, dtype=np.int32)


def cross_patient_pairs(frames: pd.DataFrame, method: str, threshold: int = 0,
                        chunk: int = 512) -> pd.DataFrame:
    """Matching frame pairs of different patients.

    Args:
        frames: one row per frame with ``frame, source, patient, sha256`` and, for
            ``perceptual``, ``phash`` (a 4-word array per row); rows with an empty ``sha256``
            (unreadable) are left out.
        method: ``exact`` or ``perceptual`` (``off`` returns no pairs).
        threshold: largest pHash distance that links (``perceptual``).

    Returns:
        ``frame_a, frame_b, source_a, source_b, patient_a, patient_b, kind (identical |
        near), distance``, patient_a < patient_b, closest first.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r}: use one of {list(METHODS)}")
    columns = ["frame_a", "frame_b", "source_a", "source_b", "patient_a", "patient_b", "kind",
               "distance"]
    frames = frames[frames["sha256"] != ""].reset_index(drop=True)
    if method == "off" or frames.empty:
        return pd.DataFrame(columns=columns)
    patients = frames["patient"].to_numpy()
    found: set[tuple[int, int, int]] = set()
    for _, idx in frames.groupby("sha256").indices.items():
        if len(idx) > 1:
            found |= {(int(i), int(j), 0) for i in idx for j in idx
                      if i < j and patients[i] != patients[j]}
    if method == "perceptual":
        h = np.stack(frames["phash"].to_numpy())
        for start in range(0, len(h), chunk):
            block = distances(h[start:start + chunk], h)
            rows, cols = np.nonzero(block <= threshold)
            rows_abs = rows + start
            keep = (cols > rows_abs) & (patients[rows_abs] != patients[cols])
            found |= set(zip(rows_abs[keep].tolist(), cols[keep].tolist(),
                             block[rows[keep], cols[keep]].tolist()))
    rows_out = []
    sha = frames["sha256"].to_numpy()
    for i, j, d in sorted(found, key=lambda t: (t[2], t[0], t[1])):
        a, b = frames.iloc[i], frames.iloc[j]
        if a["patient"] > b["patient"]:
            a, b = b, a
        rows_out.append({"frame_a": a["frame"], "frame_b": b["frame"], "source_a": a["source"],
                         "source_b": b["source"], "patient_a": a["patient"],
                         "patient_b": b["patient"],
                         "kind": "identical" if sha[i] == sha[j] else "near", "distance": int(d)})
    return pd.DataFrame(rows_out, columns=columns).drop_duplicates(["frame_a", "frame_b"])


def link_groups(patients: Iterable[str], pairs: pd.DataFrame) -> dict[str, str]:
    """Split group of every patient: the connected components of the pairs (union-find),
    each named by its smallest patient id, so an unlinked patient is its own group."""
    parent = {p: p for p in patients}

    def root(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for a, b in zip(pairs["patient_a"], pairs["patient_b"]):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {p: root(p) for p in parent}


def linked_groups(groups: Mapping[str, str], pairs: pd.DataFrame) -> list[dict]:
    """The groups of more than one patient, each with the evidence that joined it: per linked
    patient pair, how many frame pairs, the smallest distance and up to five examples."""
    members: dict[str, list[str]] = {}
    for patient, group in groups.items():
        members.setdefault(group, []).append(patient)
    out = []
    for group, patients in sorted(members.items()):
        if len(patients) < 2:
            continue
        mine = pairs[pairs["patient_a"].map(groups) == group]
        links = []
        for (pa, pb), part in mine.groupby(["patient_a", "patient_b"], sort=True):
            links.append({
                "patients": [pa, pb], "frame_pairs": int(len(part)),
                "min_distance": int(part["distance"].min()),
                "kinds": sorted(set(part["kind"])),
                "examples": [{"frames": [r.frame_a, r.frame_b], "sources": [r.source_a, r.source_b],
                              "kind": r.kind, "distance": int(r.distance)}
                             for r in part.head(MAX_EVIDENCE).itertuples()]})
        out.append({"group": group, "patients": sorted(patients), "links": links})
    return out


def frame_hashes(manifest: pd.DataFrame, frames_dir: str | Path, perceptual: bool = True
                 ) -> tuple[pd.DataFrame, list[str]]:
    """The manifest's used frames (``frame, source, patient``) with ``sha256`` and ``phash``
    columns; also the names of frames that are missing or unreadable."""
    used = manifest[manifest["status"] == "used"]
    table = used[["frame", "source", "patient"]].astype(str).reset_index(drop=True)
    shas, words, unreadable = hash_frames(frames_dir, table["frame"].tolist(), perceptual)
    table["sha256"] = shas
    table["phash"] = list(words)
    return table, unreadable
