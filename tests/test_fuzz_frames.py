"""Fuzzing the decoder: byte flips, truncations and header damage of a real dataset video, a
generated video and a JPEG, each decoded by ``process_file`` in its own process under a time
bound. The contract: a result with ``error`` set, or frames that exist and read back; never a
crash, an exception or a hang. Seeded, so a failure names a reproducible case."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.data.frames import InputFile, _decode_all, process_file
from tests.conftest import SHARED_LUS, write_video

SEED = 20240611
CASES_PER_SOURCE = 300
BATCH = 60
TIME_BUDGET_S = 45.0  # no new batch after this: ~10 s for all 900 cases on an idle 2-core box
PER_FILE_LIMIT_S = 15.0
# Errors the isolation harness adds: process_file itself crashed, raised or hung.
HARNESS_ERRORS = ("decoder process died", "decoder raised", "decode timed out")


def mutate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One random corruption of ``data``; returns its description and the damaged bytes."""
    buf = bytearray(data)
    n = len(buf)
    kind = rng.choice(["flip", "header", "truncate", "truncate_garbage", "zero_chunk",
                       "swap_chunks", "magic"])
    if kind == "flip":
        for pos in rng.integers(0, n, int(rng.integers(1, 64))):
            buf[pos] ^= 1 << int(rng.integers(0, 8))
    elif kind == "header":  # box sizes, chunk lengths, codec ids live in the first bytes
        for pos in rng.integers(0, min(n, 512), int(rng.integers(1, 16))):
            buf[pos] = int(rng.integers(0, 256))
    elif kind == "truncate":
        buf = buf[: int(rng.integers(1, n))]
    elif kind == "truncate_garbage":
        buf = buf[: int(rng.integers(1, n))] + bytearray(rng.bytes(int(rng.integers(1, 4096))))
    elif kind == "zero_chunk":
        a = int(rng.integers(0, n))
        buf[a: a + int(rng.integers(1, 4096))] = b"\0" * len(buf[a: a + 4096])
    elif kind == "swap_chunks":
        a, b = sorted(int(x) for x in rng.integers(0, n, 2))
        size = int(rng.integers(1, max(2, min(4096, b - a + 1))))
        buf[a: a + size], buf[b: b + size] = buf[b: b + size], buf[a: a + size]
    else:  # the container's magic numbers
        for magic in (b"ftyp", b"moov", b"mdat", b"RIFF", b"AVI ", b"movi", b"idx1", b"\xff\xd8"):
            pos = data.find(magic)
            if pos >= 0:
                buf[pos: pos + len(magic)] = rng.bytes(len(magic))
    return str(kind), bytes(buf)


def _sources(tmp: Path) -> list[tuple[str, bytes]]:
    out = []
    real = sorted(SHARED_LUS.glob("pocus_videos/convex/*.mp4"), key=lambda p: p.stat().st_size)
    if real:
        out.append(("real.mp4", real[0].read_bytes()))
    out.append(("generated.avi", write_video(tmp / "gen.avi", 40, 30.0).read_bytes()))
    cv2.imwrite(str(tmp / "gen.jpg"), np.random.default_rng(0).integers(0, 255, (40, 60, 3),
                                                                        dtype=np.uint8))
    out.append(("generated.jpg", (tmp / "gen.jpg").read_bytes()))
    return out


@pytest.mark.slow
def test_decoder_survives_corrupted_files(tmp_path):
    rng = np.random.default_rng(SEED)
    raw, out = tmp_path / "raw", tmp_path / "frames"
    raw.mkdir()
    out.mkdir()
    items = []
    sources = _sources(tmp_path)
    if not any(name == "real.mp4" for name, _ in sources):
        print(f"real dataset not found at {SHARED_LUS}: fuzzing generated files only")
    for i in range(CASES_PER_SOURCE):  # interleaved, so a cut-short run still covers each source
        for name, data in sources:
            kind, damaged = mutate(data, rng)
            case = f"Cov_{Path(name).stem}_{i:03d}_{kind}{Path(name).suffix}"
            items.append((InputFile(case, "image" if name.endswith(".jpg") else "video", "convex",
                                    cls="covid", label=0, patient="p"), damaged))
    started = time.monotonic()
    failures, outcomes, done = [], {"error": 0, "frames": 0}, 0
    for start in range(0, len(items), BATCH):
        if time.monotonic() - started > TIME_BUDGET_S:
            break
        batch = items[start:start + BATCH]
        for item, damaged in batch:
            (raw / item.source).write_bytes(damaged)
        results = _decode_all([item for item, _ in batch], (str(raw), str(out), 3.0, 30, 64), 2,
                              PER_FILE_LIMIT_S, process_file)
        done += len(batch)
        for (item, _), res in zip(batch, results):
            failures.extend(check_result(item, res, out, outcomes))
    print(f"{done}/{len(items)} corrupted files in {time.monotonic() - started:.1f} s: {outcomes}")
    assert done >= BATCH
    assert not failures, "\n".join(failures)


def check_result(item: InputFile, res, out: Path, outcomes: dict) -> list[str]:
    """Violations of ``process_file``'s contract by one result."""
    if res.excluded:  # an implausible input (e.g. damage left one frame): no frame kept
        outcomes["excluded"] = outcomes.get("excluded", 0) + 1
        if res.error or res.rows:
            return [f"{item.source}: excluded ({res.excluded}) but {len(res.rows)} rows, "
                    f"error {res.error!r}"]
        return []
    if res.error:
        outcomes["error"] += 1
        if res.error.startswith(HARNESS_ERRORS) or res.rows:
            return [f"{item.source}: {res.error} ({len(res.rows)} rows)"]
        return []
    outcomes["frames"] += 1
    if not res.rows:
        return [f"{item.source}: neither frames nor an error"]
    failures = []
    indices = [r["frame_index"] for r in res.rows]
    if indices != sorted(set(indices)):
        failures.append(f"{item.source}: frame indices {indices}")
    for r in res.rows:
        img = cv2.imread(str(out / r["frame"]))
        if img is None or r["width"] <= 0 or r["height"] <= 0:
            failures.append(f"{item.source}: frame {r['frame']} unreadable")
    return failures
