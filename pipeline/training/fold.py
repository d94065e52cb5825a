"""What one fold trains on and with: its frames per split (with the minority class oversampled
where asked), their tensors on the training device, and the model, loss and optimiser."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pandas as pd
import torch

from pipeline.core.config import ConfigError
from pipeline.data.loading import FrameStore, fold_frames, subsample_per_source
from pipeline.training.loop import Learner
from pipeline.training.steps import CudaGraphStep, make_adam

log = logging.getLogger("pipeline.training.fold")

SPLITS = ("train", "val", "test")


def oversample_minority(train: pd.DataFrame, factor: int) -> pd.DataFrame:
    """``factor`` copies of the minority class's rows (the chest X-ray study's x5): each copy
    goes through the random augmentation on its own, so each is a different image."""
    if factor <= 1:
        return train
    minority = train["label"].value_counts().idxmin()
    return pd.concat([train] + [train[train["label"] == minority]] * (factor - 1))


def fold_split(frames: pd.DataFrame, splits: pd.DataFrame, fold: int, tcfg: Mapping
               ) -> dict[str, pd.DataFrame]:
    """The frames of each split of ``fold``, at most ``train.max_frames_per_source`` per source."""
    limit = tcfg.get("max_frames_per_source")
    return {s: subsample_per_source(fold_frames(frames, splits, fold, s), limit) for s in SPLITS}


def training_parts(split: Mapping[str, pd.DataFrame], tcfg: Mapping) -> dict[str, pd.DataFrame]:
    """The frames a fold trains, validates and tests on: ``split`` with the training side
    oversampled by ``train.minority_oversample``."""
    factor = int(tcfg.get("minority_oversample") or 1)
    return {**split, "train": oversample_minority(split["train"], factor)}


def fold_tensors(store: FrameStore, parts: Mapping[str, pd.DataFrame], device: torch.device
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """uint8 images and labels of each split, on ``device`` when it is a GPU."""
    images = {s: store.tensor(list(p["frame"])) for s, p in parts.items()}
    labels = {s: torch.tensor(p["label"].to_numpy(), dtype=torch.long) for s, p in parts.items()}
    if device.type == "cuda":
        # The whole split fits on the GPU as uint8 (2,000 frames at 224 px = 300 MB): batches are
        # then gathered and augmented there, with no host-to-device copy per step.
        torch.backends.cudnn.benchmark = True
        images = {s: t.to(device) for s, t in images.items()}
        labels = {s: t.to(device) for s, t in labels.items()}
    return images, labels


def uses_cuda_graph(tcfg: Mapping, device: torch.device) -> bool:
    """``train.cuda_graph``, which applies on CUDA devices only."""
    use_graph = bool(tcfg["cuda_graph"])
    if use_graph and device.type != "cuda":
        log.info("train.cuda_graph is for CUDA devices; eager steps on %s", device)
        return False
    return use_graph


def build_learner(model_cfg: Mapping, loss_cfg: Mapping, tcfg: Mapping, num_classes: int,
                  device: torch.device, amp: bool, channels_last: bool) -> Learner:
    """The model (its initial weights drawn from torch's current seed), loss and Adam of a run,
    stepping in bf16 autocast when ``amp`` and channels-last when ``channels_last``, and through
    a CUDA graph with ``train.cuda_graph`` on a GPU."""
    from pipeline.models.build import build_model
    from pipeline.training.losses import build_loss

    model = build_model(model_cfg, num_classes=num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(loss_cfg, num_classes=num_classes).to(device)
    opt_cfg = tcfg["optimizer"]
    if opt_cfg["name"] != "adam":
        raise ConfigError(f"train.optimizer.name={opt_cfg['name']!r}: only 'adam' is implemented")
    trainable = [p for p in model.parameters() if p.requires_grad]
    use_graph = uses_cuda_graph(tcfg, device)
    optimizer = make_adam(trainable, float(opt_cfg["lr"]), tuple(opt_cfg["betas"]),
                          float(opt_cfg["weight_decay"]), device, cuda_graph=use_graph)
    batch_size = int(tcfg["batch_size"])
    graph = CudaGraphStep(model, loss_fn, optimizer, batch_size, amp) if use_graph else None
    eval_bs = 2 * batch_size if device.type == "cpu" else 256
    return Learner(model, loss_fn, optimizer, device, amp, channels_last, eval_bs, graph)
