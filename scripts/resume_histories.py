"""Write the per-epoch history of every training cut off before it finished (its resume state
under ``.cache/resume/``) as ``<model>-<loss>-fold_<k>.csv`` into a folder, so a run stopped at
a deadline still shows how far each fold got and how fast.

usage: python scripts/resume_histories.py OUT_DIR [RESUME_DIR=.cache/resume]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch


def main(out: Path, resume_dir: Path = Path(".cache/resume")) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(resume_dir.glob("*/fold_*.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)["state"]
        name = f"{f.parent.name}-{f.name.split('-')[0]}.csv"
        pd.DataFrame(state["history"]).to_csv(out / name, index=False)
        print(f"partial {name}: {len(state['history'])} epochs")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *(Path(a) for a in sys.argv[2:3]))
