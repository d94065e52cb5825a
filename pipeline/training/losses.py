"""Training losses: cross-entropy and the multi-class focal loss of Mini-COVIDNet.

Both take LOGITS ``(B, C)`` and integer targets ``(B,)``. Built from the ``loss`` config group
(``conf/loss/<name>.yaml``) by :func:`build_loss`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

REDUCTIONS = ("mean", "sum", "none")

# Valid keys of each loss config, with the defaults of conf/loss/<name>.yaml; `name` picks the
# loss. Focal: gamma 1 / alpha 0.8 is one of the two settings in the study's notebooks.
_LOSS_KEYS: dict[str, dict[str, object]] = {
    "ce": {"label_smoothing": 0.0, "class_weights": None, "reduction": "mean"},
    "focal": {"gamma": 1.0, "alpha": 0.8, "reduction": "mean"},
}


class FocalLoss(nn.Module):
    """Multi-class focal loss on the softmax of logits (Lin et al. 2017; paper eq. 11).

    ``FL = -alpha_t * (1 - p_t) ** gamma * log(p_t)``, with ``p_t`` the softmax probability of
    the true class. ``gamma = 0`` and no ``alpha`` is cross-entropy.

    Args:
        gamma: Focusing parameter (>= 0); larger values down-weight well-classified samples.
        alpha: None (1 for every class), a scalar (the same weight for every class: with a
            softmax it only scales the loss, i.e. the learning rate, unlike the binary sigmoid
            focal loss where it balances positives and negatives), or one weight per class
            (the paper's lambda).
        reduction: ``mean`` (divides by the batch size, also with per-class alpha, unlike
            ``nn.CrossEntropyLoss(weight=...)`` which divides by the summed weights), ``sum``
            (as the study's Keras notebooks did) or ``none``.
    """

    def __init__(self, gamma: float = 1.0, alpha: float | Sequence[float] | None = None,
                 reduction: str = "mean") -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"loss.gamma must be >= 0; got {gamma}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"loss.reduction={reduction!r} is not valid; choose one of "
                             f"{', '.join(REDUCTIONS)}")
        self.gamma = float(gamma)
        self.reduction = reduction
        alpha_t = None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
        if alpha_t is not None and alpha_t.dim() > 1:
            raise ValueError(f"loss.alpha must be null, a number or a list of per-class weights; "
                             f"got {alpha}")
        # A buffer so that .to(device) moves it; not persistent because it comes from the config.
        self.register_buffer("alpha", alpha_t, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` ``(B, C)`` against class indices ``target`` ``(B,)``."""
        log_p = F.log_softmax(logits.float(), dim=1)  # float: stable under autocast
        log_pt = log_p.gather(1, target.long().unsqueeze(1)).squeeze(1)
        pt = log_pt.exp()
        loss = -((1.0 - pt).clamp_min(0.0) ** self.gamma) * log_pt
        if self.alpha is not None:
            if self.alpha.dim() == 1:
                if self.alpha.numel() != logits.shape[1]:
                    raise ValueError(f"loss.alpha has {self.alpha.numel()} per-class weights but "
                                     f"the model has {logits.shape[1]} classes")
                loss = self.alpha[target.long()] * loss
            else:
                loss = self.alpha * loss
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss

    def extra_repr(self) -> str:
        alpha = None if self.alpha is None else self.alpha.tolist()
        return f"gamma={self.gamma}, alpha={alpha}, reduction={self.reduction}"


def build_loss(loss_cfg: Mapping, num_classes: int) -> nn.Module:
    """Build the loss of a ``loss`` config group.

    Args:
        loss_cfg: ``name`` (``ce`` or ``focal``) plus that loss's keys: ``ce``:
            ``label_smoothing``, ``class_weights`` (null or one per class), ``reduction``;
            ``focal``: ``gamma``, ``alpha`` (null, a number or one per class), ``reduction``.
        num_classes: Number of classes, to check per-class weights.

    Returns:
        ``nn.CrossEntropyLoss`` or :class:`FocalLoss`, taking logits and class indices.

    Raises:
        ValueError: Unknown name or key, or per-class weights of the wrong length.
    """
    cfg = dict(loss_cfg)
    name = cfg.pop("name", None)
    if name not in _LOSS_KEYS:
        raise ValueError(f"unknown loss.name={name!r}; valid names: {', '.join(_LOSS_KEYS)}")
    for key in cfg:
        if key not in _LOSS_KEYS[name]:
            raise ValueError(f"unknown key loss.{key} for loss {name}; valid keys: "
                             f"{', '.join(_LOSS_KEYS[name])}")
    cfg = {**_LOSS_KEYS[name], **cfg}
    per_class = cfg["class_weights"] if name == "ce" else cfg["alpha"]
    if isinstance(per_class, Sequence) and not isinstance(per_class, str):
        per_class = [float(w) for w in per_class]
        if len(per_class) != num_classes:
            key = "class_weights" if name == "ce" else "alpha"
            raise ValueError(f"loss.{key} has {len(per_class)} weights but there are "
                             f"{num_classes} classes")
    elif per_class is not None:
        if name == "ce":
            raise ValueError(f"loss.class_weights must be null or a list of {num_classes} "
                             f"weights; got {per_class!r}")
        per_class = float(per_class)
    if name == "ce":
        weight = None if per_class is None else torch.tensor(per_class, dtype=torch.float32)
        if cfg["reduction"] not in REDUCTIONS:
            raise ValueError(f"loss.reduction={cfg['reduction']!r} is not valid; choose one of "
                             f"{', '.join(REDUCTIONS)}")
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=float(cfg["label_smoothing"]),
                                   reduction=cfg["reduction"])
    return FocalLoss(gamma=float(cfg["gamma"]), alpha=per_class, reduction=cfg["reduction"])
