"""The learning-rate and stopping schedule of a training run (``conf/train/*.yaml``).

The study's protocol, as its Keras notebooks ran it (``conf/train/paper.yaml``):

* time-based decay: Adam's rate at optimiser step ``t`` is ``lr / (1 + decay * t)``, as Keras'
  ``decay`` argument (``t`` counts steps over the whole run, not per epoch);
* plateau: after ``lr_plateau.patience`` epochs without a lower validation loss the rate is
  multiplied by ``lr_plateau.factor`` (Keras ``ReduceLROnPlateau``); factor 1 turns it off;
* early stopping: training ends once ``early_stopping.patience`` epochs in a row brought no lower
  validation loss, and the best epoch's weights are restored (Keras ``EarlyStopping`` with
  ``restore_best_weights``);
* optional steps (``lr_steps``): x ``factor`` from each milestone epoch on, as torch's MultiStepLR.

:class:`ScheduleState` is the part of a run that a resume must restore; :class:`Schedule` reads
the config and moves that state forward one epoch at a time.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.core.config import ConfigError


def lr_milestones(tcfg: Mapping) -> tuple[list[int], float]:
    """``train.lr_steps``: epochs at which the learning rate is multiplied by ``factor`` (as
    torch's MultiStepLR; MedMNIST's benchmark uses x0.1 at 50% and 75% of the epochs)."""
    cfg = tcfg["lr_steps"]
    milestones = sorted(int(m) for m in cfg["milestones"])
    if any(m <= 0 for m in milestones):
        raise ConfigError(f"train.lr_steps.milestones={milestones}: epochs must be positive")
    return milestones, float(cfg["factor"])


def milestones_passed(milestones: Sequence[int], epoch: int) -> int:
    """How many milestones lie at or before ``epoch`` (0-based epochs, as MultiStepLR counts)."""
    return sum(1 for m in milestones if epoch >= m)


@dataclass
class ScheduleState:
    """Where a run stands after its last finished epoch: everything a resume restores besides
    the model and optimiser. Stored as a plain dict (:meth:`as_dict`) in the resume file."""

    epoch: int = -1  # last finished epoch
    step: int = 0  # optimiser steps so far (drives the time-based decay)
    history: list[dict] = field(default_factory=list)  # one row per finished epoch
    best_loss: float = float("inf")
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None  # CPU copy of the best epoch's weights
    plateau_wait: int = 0  # epochs since the plateau schedule last saw a lower loss
    plateau_best: float = float("inf")
    lr_scale: float = 1.0  # product of the plateau cuts so far
    stop_wait: int = 0  # epochs since the best one (early stopping)
    train_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class Schedule:
    """The schedule's parameters, read from the ``train`` params group."""

    base_lr: float
    decay: float
    stop_patience: int
    plateau_factor: float
    plateau_patience: int
    milestones: tuple[int, ...] = ()
    step_factor: float = 0.1

    @classmethod
    def from_config(cls, tcfg: Mapping) -> Schedule:
        opt, plateau = tcfg["optimizer"], tcfg["lr_plateau"]
        milestones, step_factor = lr_milestones(tcfg)
        return cls(base_lr=float(opt["lr"]), decay=float(opt["decay"]),
                   stop_patience=int(tcfg["early_stopping"]["patience"]),
                   plateau_factor=float(plateau["factor"]),
                   plateau_patience=int(plateau["patience"]),
                   milestones=tuple(milestones), step_factor=step_factor)

    def stopped(self, state: ScheduleState) -> bool:
        """Early stopping: ``stop_patience`` epochs in a row without a lower validation loss."""
        return state.stop_wait >= self.stop_patience

    def epoch_scale(self, state: ScheduleState, epoch: int) -> float:
        """The factor on the base rate during ``epoch``: plateau cuts times the step schedule."""
        return state.lr_scale * self.step_factor ** milestones_passed(self.milestones, epoch)

    def step_lr(self, state: ScheduleState, scale: float) -> float:
        """The rate of the next optimiser step (time-based decay over ``state.step`` steps)."""
        return self.base_lr * scale / (1.0 + self.decay * state.step)

    def end_epoch(self, state: ScheduleState, epoch: int, val_loss: float,
                  model: torch.nn.Module) -> bool:
        """Move ``state`` past ``epoch`` given its validation loss: keep a copy of the weights when
        the loss is the best so far, count stalled epochs for early stopping and the plateau
        schedule. Returns whether the plateau schedule cut the rate."""
        if val_loss < state.best_loss:
            state.best_loss, state.best_epoch, state.stop_wait = val_loss, epoch, 0
            state.best_state = copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})
        else:
            state.stop_wait += 1
        cut = False
        if val_loss < state.plateau_best:
            state.plateau_best, state.plateau_wait = val_loss, 0
        elif self.plateau_factor != 1.0:  # factor 1 turns the plateau schedule off
            state.plateau_wait += 1
            if state.plateau_wait > self.plateau_patience - 1:
                state.lr_scale *= self.plateau_factor
                state.plateau_wait = 0
                cut = True
        state.epoch = epoch
        return cut
