"""COVID-CAPS (Afshar et al. 2020; Keras code: github.com/ShahinSHH/COVID-CAPS) and its scaled
variant: a small conv stem whose pixels are primary capsules, capsule layers with dynamic routing,
and a class capsule layer as the head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.classifier import KERAS_BN, ImageClassifier
from pipeline.models.registry import register


def squash(s: torch.Tensor, dim: int = -1, eps: float = 1e-7) -> torch.Tensor:
    """COVID-CAPS' squash: ``s * |s| / (0.5 + |s|^2)`` (0.5, not the usual 1, in the denominator;
    ``eps`` as Keras' ``K.epsilon()``), so a capsule's length is ``|s|^2 / (0.5 + |s|^2)``."""
    squared_norm = s.pow(2).sum(dim, keepdim=True) + eps
    return s * (squared_norm.sqrt() / (0.5 + squared_norm))


class CapsuleLayer(nn.Module):
    """Capsule layer with shared weights and dynamic routing, as the Keras ``Capsule`` layer.

    One ``(in_dim, num_capsules * dim_capsules)`` matrix (no bias) predicts every output capsule
    from every input capsule; routing logits are replaced (not accumulated) each iteration and
    coupling coefficients are a softmax over the output capsules, as in the Keras code.
    """

    def __init__(self, in_dim: int, num_capsules: int, dim_capsules: int,
                 routings: int = 3) -> None:
        super().__init__()
        self.num_capsules = num_capsules
        self.dim_capsules = dim_capsules
        self.routings = routings
        self.weight = nn.Parameter(torch.empty(in_dim, num_capsules * dim_capsules))
        # Keras glorot_uniform on a (1, in_dim, N*D) kernel: fan_in = in_dim, fan_out = N*D.
        nn.init.xavier_uniform_(self.weight)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Map input capsules ``(B, N_in, in_dim)`` to output capsules ``(B, N, D)``."""
        batch, n_in, _ = u.shape
        u_hat = (u @ self.weight).view(batch, n_in, self.num_capsules, self.dim_capsules)
        u_hat = u_hat.permute(0, 2, 1, 3)  # (B, N, N_in, D)
        b = u_hat.new_zeros(batch, self.num_capsules, n_in)
        for i in range(self.routings):
            c = b.softmax(dim=1)
            v = squash(torch.einsum("bni,bnid->bnd", c, u_hat))
            if i < self.routings - 1:
                b = torch.einsum("bnd,bnid->bni", v, u_hat)
        return v


class ConvReLU(nn.Conv2d):
    """Keras ``Conv2D(..., activation='relu')``: one layer, so Grad-CAM sees the activated map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class CapsuleBackbone(nn.Module):
    """Conv -> BN -> Conv -> AvgPool2 -> Conv -> Conv (3x3 'valid', ReLU), each pixel of the
    last map a primary capsule (``Reshape((-1, C))``), then the hidden capsule layers."""

    def __init__(self, channels: Sequence[int], capsules: Sequence[Sequence[int]],
                 routings: int) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.conv1 = ConvReLU(3, c1, 3)
        self.bn1 = nn.BatchNorm2d(c1, **KERAS_BN)
        self.conv2 = ConvReLU(c1, c2, 3)
        self.pool = nn.AvgPool2d(2)
        self.conv3 = ConvReLU(c2, c3, 3)
        self.conv4 = ConvReLU(c3, c4, 3)
        layers, in_dim = [], c4
        for num, dim in capsules:
            layers.append(CapsuleLayer(in_dim, num, dim, routings))
            in_dim = dim
        self.capsules = nn.ModuleList(layers)
        self.out_dim = in_dim
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):  # Keras Conv2D defaults
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv4(self.conv3(self.pool(self.conv2(self.bn1(self.conv1(x))))))
        x = x.permute(0, 2, 3, 1).flatten(1, 2)  # NHWC order, as Keras' Reshape((-1, C))
        for layer in self.capsules:
            x = layer(x)
        return x


class ClassCapsuleHead(nn.Module):
    """The class capsule layer; returns ``log(capsule length)`` as logits.

    The Keras model outputs the capsule lengths ``l`` and trains with Keras' categorical
    cross-entropy, which divides its input by its sum; ``softmax(log l) = l / sum(l)``, so
    cross-entropy on these logits is exactly that loss, and argmax is unchanged.
    """

    def __init__(self, in_dim: int, num_classes: int, dim_capsules: int, routings: int) -> None:
        super().__init__()
        self.capsules = CapsuleLayer(in_dim, num_classes, dim_capsules, routings)

    def lengths(self, u: torch.Tensor) -> torch.Tensor:
        """Class capsule lengths in [0, 1), shape ``(B, num_classes)``."""
        # clamp: the gradient of sqrt at 0 is infinite
        return self.capsules(u).pow(2).sum(-1).clamp_min(1e-14).sqrt()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.lengths(u).clamp_min(1e-7).log()  # 1e-7: Keras' clip in its cross-entropy


class CapsuleClassifier(ImageClassifier):
    """:class:`ImageClassifier` whose outputs are ``log`` capsule lengths."""

    def capsule_lengths(self, x: torch.Tensor) -> torch.Tensor:
        """The Keras model's output: class capsule lengths ``(B, num_classes)`` in [0, 1)."""
        return self.head.lengths(self.backbone(self.normalize(x)))



def _capsule_network(arch: str, cfg: dict, num_classes: int) -> CapsuleClassifier:
    if cfg["pretrained"] == "imagenet":
        raise ValueError(f"model.pretrained=imagenet: no ImageNet weights exist for {arch} (a "
                         f"capsule network trained from scratch); use none or a local weights file")
    if cfg["head"]["kind"] != "pool_mlp":
        raise ValueError(f"model.head.kind={cfg['head']['kind']!r}: {arch} has no such head (its "
                         f"head is the class capsule layer; the head group is unused)")
    channels, capsules = cfg["channels"], cfg["capsules"]
    if len(channels) != 4 or any(len(c) != 2 for c in capsules):
        raise ValueError(f"model.channels must list 4 conv widths and model.capsules [number, "
                         f"dimension] pairs; got channels={channels}, capsules={capsules}")
    backbone = CapsuleBackbone(channels, capsules, cfg["routings"])
    head = ClassCapsuleHead(backbone.out_dim, num_classes, cfg["class_capsule_dim"],
                            cfg["routings"])
    blocks = [("conv1",), ("bn1",), ("conv2",), ("conv3",), ("conv4",)]
    blocks += [(f"capsules.{i}",) for i in range(len(capsules))]
    return CapsuleClassifier(backbone, head, arch=arch, normalize=cfg["normalize"],
                             blocks=blocks, gradcam_layer="conv4")


_CAPS_DEFAULTS = {"normalize": "none",  # the Keras model saw pixels / 255
                  "channels": [64, 64, 128, 128], "capsules": [[32, 8], [32, 8]],
                  "class_capsule_dim": 16, "routings": 3}


@register(None, **_CAPS_DEFAULTS)
def covid_caps(cfg: dict, num_classes: int) -> CapsuleClassifier:
    """COVID-CAPS: 4 convs -> capsules 32x8 -> 32x8 -> num_classes x 16, 3 routing iterations.

    Outputs ``log`` of the class capsule lengths (see :class:`ClassCapsuleHead`); the lengths
    themselves are ``model.capsule_lengths(x)``. The ``head`` config group is unused.
    """
    return _capsule_network("covid_caps", cfg, num_classes)


@register(None, **{**_CAPS_DEFAULTS, "channels": [224, 224, 448, 448]})
def covid_caps_scaled(cfg: dict, num_classes: int) -> CapsuleClassifier:
    """COVID-CAPS with 3.5x wider convs (3,286,048 parameters at 3 classes, 1.6% below
    Mini-COVIDNet's 3,338,947); the paper does not publish its scaled layout."""
    return _capsule_network("covid_caps_scaled", cfg, num_classes)
