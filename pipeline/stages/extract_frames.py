"""Stage ``extract_frames``: the dataset's files -> frame images + ``manifest.csv``.

The adapter of ``dataset.kind`` (:data:`pipeline.data.sources.ADAPTERS`) reads the files; the
store is replaced only by a finished one (:func:`pipeline.data.frames.build_store`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.core.cli import run_main
from pipeline.core.config import get, load_params
from pipeline.data.frames import build_store, summary
from pipeline.data.sources import prepare

log = logging.getLogger("pipeline.stages.extract_frames")


def main(argv: Sequence[str] | None = None) -> None:
    ds = get(load_params(), "dataset")
    raw_dir = Path(ds["raw_dir"])
    Path(ds["frames_summary"]).unlink(missing_ok=True)  # no stale summary beside a failed run

    def build(out_dir: Path) -> pd.DataFrame:
        return prepare(ds["kind"], raw_dir, out_dir, ds, strict=bool(ds["strict"]))

    manifest = build_store(Path(ds["frames_dir"]), build)
    info = summary(manifest)
    Path(ds["frames_summary"]).write_text(json.dumps(info, indent=2) + "\n")
    log.info("frames: %s", info)


if __name__ == "__main__":
    run_main(main)
