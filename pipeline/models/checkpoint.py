"""Checkpoint format shared by training, evaluation, export and prediction.

A checkpoint is a ``torch.save`` dict::

    {"state_dict": ..., "model_cfg": {...}, "classes": [...], "image_size": int,
     "interpolation": str, "epoch": int, "meta": {...}}

``model_cfg`` is the model's config group (``conf/model/<name>.yaml``) exactly as trained, so a
checkpoint rebuilds its model without the params file that produced it. ``interpolation`` is
how its frames were resized (``dataset.resize_interpolation``); checkpoints written before the
key existed were all trained on ``area``, which ``load_checkpoint`` fills in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn


def save_checkpoint(path: str | Path, model: nn.Module, *, model_cfg: dict, classes: list[str],
                    image_size: int, interpolation: str = "area", **extra: Any) -> None:
    """Write a checkpoint atomically (temporary file + rename), so a killed run never leaves a
    truncated file that a later run would load."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "model_cfg": model_cfg, "classes": list(classes), "image_size": int(image_size),
               "interpolation": interpolation, **extra}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def half_precision_copy(src: str | Path, dst: str | Path) -> None:
    """Write ``src`` again as ``dst`` with its floating-point weights in float16 (half the
    bytes; :func:`load_model` casts them back to the model's float32). A tensor with values
    outside float16's range keeps its dtype; the payload records ``weights_dtype``."""
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    limit = torch.finfo(torch.float16).max
    ckpt["state_dict"] = {
        k: v.half() if v.is_floating_point() and (v.numel() == 0 or bool(v.abs().max() <= limit))
        else v
        for k, v in ckpt["state_dict"].items()}
    ckpt["weights_dtype"] = "float16"
    torch.save(ckpt, dst)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: run the train stage first "
                                f"(dvc repro) or pass the path of a trained model")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ckpt.setdefault("interpolation", "area")
    return ckpt


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the trained model of a checkpoint, in eval mode, on the CPU.

    Returns:
        The model and the checkpoint dict (without its state dict).
    """
    from pipeline.models.build import build_model

    ckpt = load_checkpoint(path)
    cfg = dict(ckpt["model_cfg"])
    cfg["pretrained"] = "none"  # the trained weights below replace any initialisation
    model = build_model(cfg, num_classes=len(ckpt["classes"]))
    model.load_state_dict(ckpt.pop("state_dict"))
    model.eval()
    return model, ckpt


def fold_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """``{k: <run_dir>/fold_<k>/best.pt}`` for every trained fold of a run, sorted by fold.

    Raises:
        FileNotFoundError: the run folder or every checkpoint in it is missing.
    """
    run_dir = Path(run_dir)
    found = {}
    for path in run_dir.glob("fold_*/best.pt"):
        k = path.parent.name.removeprefix("fold_")
        if k.isdigit():
            found[int(k)] = path
    if not found:
        what = "does not exist" if not run_dir.is_dir() else "holds no fold_<k>/best.pt"
        raise FileNotFoundError(f"run directory {run_dir} {what}: train it first "
                                f"(dvc repro train@{run_dir.name})")
    return dict(sorted(found.items()))
