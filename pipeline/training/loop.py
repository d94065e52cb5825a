"""The training loop of one fold: seeded epochs of optimiser steps, validation, the schedule
(:mod:`pipeline.training.schedule`) and a resume file written after every epoch.

Each epoch reseeds torch from (seed, fold, epoch) (:func:`epoch_seed`), so a run resumed at an
epoch boundary replays the same random stream and, on the CPU, ends with the same weights as
an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.core.config import ConfigError
from pipeline.data.loading import augment_batch
from pipeline.training.schedule import Schedule, ScheduleState
from pipeline.training.steps import CudaGraphStep, current_lr, lr_to_device, optimize_step, set_lr

log = logging.getLogger("pipeline.training.loop")


def pick_device(name: str) -> torch.device:
    """``train.device``: ``auto`` (CUDA when visible), ``cpu``, ``cuda`` or ``cuda:<k>``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is visible (use auto or cpu)")
    return torch.device(name)


def epoch_seed(seed: int, fold: int, epoch: int) -> int:
    """Seed of one epoch: resuming at an epoch boundary replays the same random stream."""
    return (seed * 1_000_003 + fold * 10_007 + epoch) % (2**31 - 1)


def batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Index batches over ``n`` items: shuffled by ``generator``, in order without one."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


def to_input(x_uint8: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 images to float in [0, 1] on ``device``."""
    x = x_uint8.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, device: torch.device,
                   batch_size: int = 64, channels_last: bool = False) -> torch.Tensor:
    """Logits for uint8 images (N x 3 x S x S), in eval mode and float32.

    Never under bf16 autocast, which trains as well but moves logits enough to flip frames near
    a tie: on fold 0 of the paper grid, bf16 and float32 predictions of Mini-COVIDNet differ on
    13% of the test frames (``reports/paper_gpu/export_224/README.md``). Validation losses,
    predictions and the exported files' parity checks all see the float32 model."""
    model.eval()
    outs = []
    for idx in batches(len(images), batch_size, None):
        x = to_input(images[idx], device, channels_last)
        outs.append(model(x).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def train_step(model: torch.nn.Module, loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer,
               x_uint8: torch.Tensor, y: torch.Tensor, augment: Mapping, generator: torch.Generator,
               device: torch.device, amp: bool, channels_last: bool,
               graph: CudaGraphStep | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a uint8 batch: scale, augment on the batch's device, then
    forward (bf16 autocast when ``amp``), backward, update, eagerly or replayed from ``graph``.
    Returns the detached loss and the number of correct predictions, both still on the device.
    The throughput benchmark times this too."""
    x = augment_batch(to_input(x_uint8, device, channels_last), augment, generator)
    y = y.to(device, non_blocking=True)
    if graph is not None:
        return graph(x, y)
    return optimize_step(model, loss_fn, optimizer, x, y, amp)


@dataclass
class Learner:
    """A model with its loss and optimiser, and how its steps run on ``device``."""

    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    amp: bool = False
    channels_last: bool = False
    eval_batch_size: int = 64
    graph: CudaGraphStep | None = None

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return predict_logits(self.model, images, self.device, self.eval_batch_size,
                              self.channels_last)

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """Mean loss and accuracy on labelled images (NaN for none)."""
        logits = self.logits(images)
        if not len(labels):
            return float("nan"), float("nan")
        labels = labels.to(self.device)
        loss = float(self.loss_fn(logits.to(self.device), labels).item())
        acc = float((logits.to(self.device).argmax(1) == labels).float().mean().item())
        return loss, acc


@dataclass(frozen=True)
class EpochPlan:
    """What every epoch of one fold shares: its data, batch size, augmentation and seeds."""

    images: Mapping[str, torch.Tensor]  # "train" and "val" at least, uint8
    labels: Mapping[str, torch.Tensor]
    epochs: int
    batch_size: int
    augment: Mapping
    seed: int
    fold: int


def train_epoch(learner: Learner, plan: EpochPlan, schedule: Schedule, state: ScheduleState,
                epoch: int, generator: torch.Generator) -> tuple[float, float]:
    """One pass over the shuffled training images, each step at the schedule's rate. Returns the
    mean training loss and accuracy."""
    learner.model.train()
    # Running sums stay on the device: no host sync per step.
    total = torch.zeros((), device=learner.device)
    correct = torch.zeros((), device=learner.device, dtype=torch.long)
    seen = 0
    scale = schedule.epoch_scale(state, epoch)
    images, labels = plan.images["train"], plan.labels["train"]
    for idx in batches(len(images), plan.batch_size, generator):
        if len(idx) < 2:  # BatchNorm cannot train on a batch of one
            continue
        set_lr(learner.optimizer, schedule.step_lr(state, scale))
        loss, n_correct = train_step(learner.model, learner.loss_fn, learner.optimizer,
                                     images[idx], labels[idx], plan.augment, generator,
                                     learner.device, learner.amp, learner.channels_last,
                                     learner.graph)
        state.step += 1
        total += loss * len(idx)
        correct += n_correct
        seen += len(idx)
    return float(total.item()) / max(seen, 1), int(correct.item()) / max(seen, 1)


class ResumeFile:
    """The state of an unfinished fold (model, optimiser, :class:`ScheduleState`), replaced
    atomically after every epoch and removed when the fold is done."""

    def __init__(self, path: Path):
        self.path = path

    def load(self, learner: Learner) -> ScheduleState | None:
        """Restore the model and optimiser from the file and return its schedule state; None
        where there is no file."""
        if not self.path.is_file():
            return None
        saved = torch.load(self.path, map_location="cpu", weights_only=False)
        learner.model.load_state_dict(saved["model"])
        learner.optimizer.load_state_dict(saved["optimizer"])
        lr_to_device(learner.optimizer, learner.device)
        return ScheduleState(**saved["state"])

    def save(self, learner: Learner, state: ScheduleState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"model": learner.model.state_dict(),
                    "optimizer": learner.optimizer.state_dict(), "state": state.as_dict()}, tmp)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def fit(learner: Learner, plan: EpochPlan, schedule: Schedule, state: ScheduleState,
        resume: ResumeFile, on_epoch: Callable[[dict], None]) -> ScheduleState:
    """Train from the epoch after ``state.epoch`` until ``plan.epochs`` or early stopping, then
    restore the best epoch's weights (as Keras' ``restore_best_weights``). Calls ``on_epoch`` with
    each finished epoch's history row and saves ``resume`` after it."""
    for epoch in range(state.epoch + 1, plan.epochs):
        if schedule.stopped(state):
            break
        started = time.monotonic()
        torch.manual_seed(epoch_seed(plan.seed, plan.fold, epoch))
        gen = torch.Generator().manual_seed(epoch_seed(plan.seed, plan.fold, epoch))
        train_loss, train_acc = train_epoch(learner, plan, schedule, state, epoch, gen)
        val_loss, val_acc = learner.evaluate(plan.images["val"], plan.labels["val"])
        seconds = time.monotonic() - started
        state.train_seconds += seconds
        row = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
               "val_loss": val_loss, "val_accuracy": val_acc,
               "lr": current_lr(learner.optimizer), "seconds": seconds}
        state.history.append(row)
        on_epoch(row)
        log.info("fold %d epoch %d/%d: train loss %.4f acc %.3f | val loss %.4f acc %.3f | %.1fs",
                 plan.fold, epoch + 1, plan.epochs, train_loss, train_acc, val_loss, val_acc,
                 seconds)
        if schedule.end_epoch(state, epoch, val_loss, learner.model):
            log.info("fold %d: validation loss stalled %d epochs, lr x%s", plan.fold,
                     schedule.plateau_patience, schedule.plateau_factor)
        resume.save(learner, state)
    if state.best_state is not None:
        learner.model.load_state_dict(state.best_state)
    return state

