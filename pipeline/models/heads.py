"""The classification heads (``model.head.kind``), on the backbone's last feature map.

* ``pool_mlp`` (the Mini-COVIDNet study's head): AvgPool(``pool``) -> Flatten -> Dense(``hidden``)
  -> BatchNorm -> ``activation`` -> Dropout(``dropout``) -> Dense(classes).
* ``flatten`` (chest X-ray study 002): Flatten -> Dropout(``dropout``) -> Dense(classes) on the
  whole ``C x feature_map x feature_map`` map, so it fits one input size only.
* ``gap_linear`` (torchvision/timm/MedMNIST classifiers): global average pool ->
  Dropout(``dropout``) -> Dense(classes); any input size.

Input sizes: the ``pool_mlp`` head pools with Keras' ``AveragePooling2D(4)`` and expects a 1x1
map after it, as at 224 px (7x7 features). The kernel is clipped to the feature map, so inputs
from 32 px up to 255 px work for the stride-32 backbones; larger inputs raise a ValueError. The
``flatten`` head needs the backbone's map to be exactly ``feature_map`` square (7 at 224 px for
the stride-32 backbones, 5 for inception_v3; the ValueError names ``train.image_size``).
inception_v3 needs inputs of at least 75 px (as Keras' InceptionV3), and batches of 2 or more
in training mode below 107 px (its last BatchNorms then see 1x1 maps). The capsule
networks take any input from 14 px up (their cost grows with the pixel count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.classifier import KERAS_BN


class PoolHead(nn.Module):
    """The study's Keras head: AvgPool(pool) -> Flatten -> Dense(hidden) -> BatchNorm ->
    activation -> Dropout -> Dense(num_classes) (logits; softmax is the caller's)."""

    def __init__(self, in_channels: int, num_classes: int, *, hidden: int, activation: str,
                 dropout: float, pool: int) -> None:
        super().__init__()
        self.pool = int(pool)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.bn = nn.BatchNorm1d(hidden, **KERAS_BN)
        # Keras PReLU is per-channel with alpha initialised to 0 (it starts as a ReLU).
        self.act = nn.PReLU(hidden, init=0.0) if activation == "prelu" else nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)
        for fc in (self.fc1, self.fc2):  # Keras Dense defaults: glorot_uniform, zero bias
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        # Clipping the kernel lets small inputs (32-223 px) reach the same 1x1 map as 224 px.
        x = F.avg_pool2d(x, (min(self.pool, h), min(self.pool, w)))
        if x.shape[-2:] != (1, 1):
            raise ValueError(
                f"the head's AvgPool({self.pool}) turned a {h}x{w} feature map into "
                f"{x.shape[-2]}x{x.shape[-1]}, but the head expects 1x1 (as at 224 px): use "
                f"inputs of at most 255 px for the stride-32 backbones")
        return self.fc2(self.drop(self.act(self.bn(self.fc1(x.flatten(1))))))


class FlattenHead(nn.Module):
    """Study 002's Keras head: Flatten -> Dropout -> Dense(num_classes) (logits).

    The Dense layer sees every position of the ``feature_map x feature_map`` map, so the head
    (and its parameter count) belongs to one input size. Flattening is in PyTorch's (C, H, W)
    order, not Keras' (H, W, C): the same function class, only a permutation of the weights.
    """

    def __init__(self, in_channels: int, num_classes: int, *, feature_map: int,
                 dropout: float) -> None:
        super().__init__()
        self.feature_map = int(feature_map)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels * self.feature_map ** 2, num_classes)
        nn.init.xavier_uniform_(self.fc.weight)  # Keras Dense defaults, as the study's code
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        fm = self.feature_map
        if (h, w) != (fm, fm):
            raise ValueError(
                f"the flatten head was built for a {fm}x{fm} feature map (model.head.feature_map"
                f"={fm}) but the backbone gave {h}x{w}: set train.image_size to the input size "
                f"that gives {fm}x{fm} (224 px gives 7x7 on the stride-32 backbones, 5x5 on "
                f"inception_v3), or model.head.feature_map to match train.image_size")
        return self.fc(self.drop(x.flatten(1)))


class GapLinearHead(nn.Module):
    """Global average pool -> Dropout -> Linear(num_classes): the torchvision/timm classifier
    (MedMNIST's ResNets), for any input size. PyTorch's default Linear init, as those models."""

    def __init__(self, in_channels: int, num_classes: int, *, dropout: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.mean((2, 3))))



def build_head(cfg: dict, in_channels: int, num_classes: int) -> nn.Module:
    """The head that ``cfg["head"]["kind"]`` names, on ``in_channels`` backbone channels."""
    head = cfg["head"]
    if head["kind"] == "flatten":
        return FlattenHead(in_channels, num_classes, feature_map=int(head["feature_map"]),
                           dropout=float(head["dropout"]))
    if head["kind"] == "gap_linear":
        return GapLinearHead(in_channels, num_classes, dropout=float(head["dropout"]))
    return PoolHead(in_channels, num_classes, hidden=int(head["hidden"]),
                    activation=head["activation"], dropout=float(head["dropout"]),
                    pool=int(head["pool"]))


