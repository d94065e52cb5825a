"""Model registry: the architectures of the Mini-COVIDNet study and of the chest X-ray studies,
built by name.

Every model is ``normalize -> backbone -> head`` and maps an RGB float batch in [0, 1]
(``(B, 3, H, W)``) to LOGITS ``(B, num_classes)``; the caller applies softmax. The backbones
come from maintained packages (timm, pytorchcv); the heads and the COVID-CAPS capsule network
are defined here, following the Keras code of the study's notebooks and of COVID-CAPS.

A model is described by its config group ``conf/model/<arch>.yaml``::

    arch: mini_covidnet        # registry name (= file name)
    pretrained: none           # none | imagenet | <path to a weights file>
    normalize: imagenet        # imagenet | none | inception (mean = std = 0.5)
    head: {kind: pool_mlp, hidden: 128, activation: prelu, dropout: 0.5, pool: 4,
           feature_map: null}
    freeze: {policy: all, n: 0, layers: []}

Keys left out fall back to the architecture's defaults (:func:`default_model_config`, kept
equal to the YAML files by a test), so ``build_model({"arch": "pocovidnet"}, 3)`` is the
published POCOVID-Net.

Heads (``head.kind``):

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

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The TF/Keras-ported Xception and InceptionV3 weights expect pixels in [-1, 1] (Keras'
# "tf" preprocess_input mode), i.e. (x - 0.5) / 0.5.
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
_NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                   "inception": (INCEPTION_MEAN, INCEPTION_STD)}

NORMALIZE_CHOICES = ("imagenet", "none", "inception")
ACTIVATION_CHOICES = ("prelu", "relu")
HEAD_KINDS = ("pool_mlp", "flatten", "gap_linear")
STEM_CHOICES = ("imagenet", "cifar")
FREEZE_POLICIES = ("all", "last_n", "named", "head_only")

# Keras' BatchNormalization defaults (momentum 0.99 = PyTorch momentum 0.01, epsilon 1e-3): the
# layers this module defines itself follow the study's Keras code; timm/pytorchcv backbones keep
# their own.
_KERAS_BN = {"eps": 1e-3, "momentum": 0.01}

_BASE_CONFIG: dict[str, Any] = {
    "pretrained": "none",
    "normalize": "imagenet",
    # kind pool_mlp uses hidden/activation/dropout/pool; flatten uses dropout/feature_map (the
    # backbone's output size it is built for: the Linear layer's width depends on it);
    # gap_linear uses dropout.
    "head": {"kind": "pool_mlp", "hidden": 128, "activation": "prelu", "dropout": 0.5, "pool": 4,
             "feature_map": None},
    "freeze": {"policy": "all", "n": 0, "layers": []},
}

_REGISTRY: dict[str, Callable[[dict, int], "ImageClassifier"]] = {}
_DEFAULTS: dict[str, dict[str, Any]] = {}
_IMAGENET_SOURCES: dict[str, str | None] = {}


def _merge(base: dict, override: Mapping) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _register(imagenet_source: str | None, **overrides: Any) -> Callable:
    """Register a builder under its function name with its default config (timm-style).

    Args:
        imagenet_source: Where ``pretrained: imagenet`` loads from (for :func:`describe_init`);
            None when no ImageNet weights exist for the architecture.
        **overrides: Top-level config values that differ from ``_BASE_CONFIG`` (nested groups
            are merged key by key).
    """
    def wrap(fn: Callable[[dict, int], ImageClassifier]) -> Callable[[dict, int], ImageClassifier]:
        name = fn.__name__
        _REGISTRY[name] = fn
        _DEFAULTS[name] = _merge({"arch": name, **copy.deepcopy(_BASE_CONFIG)}, overrides)
        _IMAGENET_SOURCES[name] = imagenet_source
        return fn
    return wrap


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` so that the model's input stays RGB in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        # Non-persistent: the constants come from the config, so state dicts (checkpoints,
        # weight files) are the same with and without normalisation.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class PoolHead(nn.Module):
    """The study's Keras head: AvgPool(pool) -> Flatten -> Dense(hidden) -> BatchNorm ->
    activation -> Dropout -> Dense(num_classes) (logits; softmax is the caller's)."""

    def __init__(self, in_channels: int, num_classes: int, *, hidden: int, activation: str,
                 dropout: float, pool: int) -> None:
        super().__init__()
        self.pool = int(pool)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.bn = nn.BatchNorm1d(hidden, **_KERAS_BN)
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


class ImageClassifier(nn.Module):
    """``normalize -> backbone -> head``; built by :func:`build_model`.

    Attributes:
        arch: Registry name.
        blocks: The backbone's blocks in forward order, each a tuple of parameter-name prefixes
            (e.g. ``("backbone.layer4.2",)``); the ``last_n`` freeze policy counts these.
        gradcam_layer: Name of the submodule whose output Grad-CAM uses.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, *, arch: str, normalize: str,
                 blocks: Sequence[Sequence[str]], gradcam_layer: str) -> None:
        super().__init__()
        self.normalize = (Normalize(*_NORMALIZATIONS[normalize]) if normalize in _NORMALIZATIONS
                          else nn.Identity())
        self.backbone = backbone
        self.head = head
        self.arch = arch
        self.blocks = [tuple(f"backbone.{p}" for p in block) for block in blocks]
        self.gradcam_layer = f"backbone.{gradcam_layer}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.normalize(x)))

    def train(self, mode: bool = True) -> ImageClassifier:
        """Set train/eval mode; frozen BatchNorm layers stay in eval mode.

        Keras (TF2) runs a BatchNormalization layer with ``trainable=False`` in inference mode,
        so under a freeze policy its running statistics must not drift with the new data either.
        """
        super().train(mode)
        if mode:
            for module in self.modules():
                if (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine
                        and not any(p.requires_grad for p in module.parameters(recurse=False))):
                    module.eval()
        return self


# --------------------------------------------------------------------------------------------
# COVID-CAPS (Afshar et al. 2020; Keras code: github.com/ShahinSHH/COVID-CAPS)
# --------------------------------------------------------------------------------------------
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
        self.bn1 = nn.BatchNorm2d(c1, **_KERAS_BN)
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


# --------------------------------------------------------------------------------------------
# Backbones from maintained packages
# --------------------------------------------------------------------------------------------
def _imagenet_error(arch: str, source: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"model.pretrained=imagenet: could not load the ImageNet weights of {arch} ({source}): "
        f"{type(err).__name__}: {err}. Without internet access, put the weights in the package's "
        f"cache first (timm: the Hugging Face cache, HF_HOME, with HF_HUB_OFFLINE=1, or for "
        f"weights timm fetches by URL, legacy_xception's, the torch hub cache "
        f"$TORCH_HOME/hub/checkpoints; pytorchcv: ~/.torch/models), or set model.pretrained to "
        f"none or to a local weights file")


def _timm_backbone(arch: str, name: str, pretrained: bool) -> nn.Module:
    """A timm model without pooling/classifier: its forward returns the last feature map.

    ``pretrained=True`` goes through timm's own loading (Hugging Face hub/cache; honours
    HF_HUB_OFFLINE), i.e. timm's ImageNet-1k weights (``pretrained_cfg`` names the tag), not the
    Keras applications weights the study used.
    """
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="")
    except (OSError, RuntimeError) as err:  # hub/cache errors are OSErrors
        if not pretrained:
            raise
        raise _imagenet_error(arch, f"timm {name}", err) from err


def _head(cfg: dict, in_channels: int, num_classes: int) -> nn.Module:
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


def _blocks_of(prefix: str, module: nn.Module) -> list[tuple[str]]:
    return [(f"{prefix}.{name}",) for name, _ in module.named_children()]


def _mobilenet_blocks(backbone: nn.Module) -> list[tuple[str, ...]]:
    """Stem, then every block of every stage of a timm MobileNet (v1 or v2)."""
    blocks: list[tuple[str, ...]] = [("conv_stem", "bn1")]
    for stage_name, stage in backbone.blocks.named_children():
        blocks += _blocks_of(f"blocks.{stage_name}", stage)
    return blocks


@_register("timm mobilenetv1_100")
def mini_covidnet(cfg: dict, num_classes: int) -> ImageClassifier:
    """Mini-COVIDNet: MobileNet v1 (width 1.0) features + the 128-unit PReLU head."""
    backbone = _timm_backbone("mini_covidnet", "mobilenetv1_100", cfg["pretrained"] == "imagenet")
    blocks = _mobilenet_blocks(backbone)
    return ImageClassifier(backbone, _head(cfg, backbone.num_features, num_classes),
                           arch="mini_covidnet", normalize=cfg["normalize"], blocks=blocks,
                           gradcam_layer="blocks.4")


@_register("timm mobilenetv2_100")
def mobilenet_v2(cfg: dict, num_classes: int) -> ImageClassifier:
    """MobileNetV2 (width 1.0) features incl. the 1x1 conv to 1280 + the 128-unit PReLU head."""
    backbone = _timm_backbone("mobilenet_v2", "mobilenetv2_100", cfg["pretrained"] == "imagenet")
    blocks = _mobilenet_blocks(backbone) + [("conv_head", "bn2")]
    return ImageClassifier(backbone, _head(cfg, backbone.num_features, num_classes),
                           arch="mobilenet_v2", normalize=cfg["normalize"], blocks=blocks,
                           gradcam_layer="bn2")


@_register("pytorchcv nasnet_4a1056")
def nasnet_mobile(cfg: dict, num_classes: int) -> ImageClassifier:
    """NASNet-A Mobile (4@1056) features + the 128-unit PReLU head.

    The backbone is pytorchcv's ``nasnet_4a1056`` (same parameter count as Keras NASNetMobile)
    without its final 7x7 pooling. ``pretrained: imagenet`` uses pytorchcv's own download of its
    published ImageNet-1k weights (osmr/imgclsmob GitHub releases, cached in ~/.torch/models).
    """
    from pytorchcv.model_provider import get_model  # imported here: it takes seconds

    pretrained = cfg["pretrained"] == "imagenet"
    try:
        net = get_model("nasnet_4a1056", pretrained=pretrained)
    except (OSError, RuntimeError, ValueError) as err:  # requests' errors are OSErrors
        if not pretrained:
            raise
        raise _imagenet_error("nasnet_mobile", "pytorchcv nasnet_4a1056", err) from err
    backbone = net.features
    backbone.final_pool = nn.Identity()  # the head pools, as on Keras' include_top=False output
    blocks = []
    for name, child in backbone.named_children():
        if name.startswith("stage"):
            blocks += _blocks_of(name, child)
        elif any(True for _ in child.parameters()):
            blocks.append((name,))
    return ImageClassifier(backbone, _head(cfg, 1056, num_classes), arch="nasnet_mobile",
                           normalize=cfg["normalize"], blocks=blocks, gradcam_layer="activ")


@_register("timm vgg16 (convolutional base)",
           head={"hidden": 64, "activation": "relu"},
           # Published POCOVID-Net: only block5_conv3 (= features index 28) and the head train.
           freeze={"policy": "named", "layers": ["backbone.28"]})
def pocovidnet(cfg: dict, num_classes: int) -> ImageClassifier:
    """POCOVID-Net: the VGG16 convolutional base (13 convs + 5 max-pools) + the 64-unit ReLU head.

    Backbone parameter names follow torchvision/timm ``vgg16.features`` indices: Keras
    ``block5_conv3`` is ``backbone.28`` (its ReLU, ``backbone.29``, is the Grad-CAM layer).
    """
    vgg = _timm_backbone("pocovidnet", "vgg16", cfg["pretrained"] == "imagenet")
    backbone = vgg.features
    blocks = [(name,) for name, child in backbone.named_children() if isinstance(child, nn.Conv2d)]
    return ImageClassifier(backbone, _head(cfg, 512, num_classes), arch="pocovidnet",
                           normalize=cfg["normalize"], blocks=blocks, gradcam_layer="29")


@_register("timm resnet50", head={"hidden": 64, "activation": "relu"},
           # The paper's text fine-tunes "the last three layers" (policy last_n, n 3 = the three
           # conv5 bottlenecks); the study's notebooks trained all layers, the default here.
           freeze={"policy": "all", "n": 3})
def resnet50(cfg: dict, num_classes: int) -> ImageClassifier:
    """ResNet50 features (stem + 16 bottlenecks) + the 64-unit ReLU head."""
    backbone = _timm_backbone("resnet50", "resnet50", cfg["pretrained"] == "imagenet")
    return _resnet_classifier(backbone, "resnet50", cfg, num_classes)


def _resnet_classifier(backbone: nn.Module, arch: str, cfg: dict,
                       num_classes: int) -> ImageClassifier:
    """A timm ResNet + the configured head; blocks = the stem, then every residual block."""
    blocks = [("conv1", "bn1")]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        blocks += _blocks_of(stage, getattr(backbone, stage))
    return ImageClassifier(backbone, _head(cfg, backbone.num_features, num_classes),
                           arch=arch, normalize=cfg["normalize"], blocks=blocks,
                           gradcam_layer="layer4")


# --------------------------------------------------------------------------------------------
# Generic timm backbones (study 002's comparison table; MedMNIST's ResNet-18)
# --------------------------------------------------------------------------------------------
# The entries below are not in the Mini-COVIDNet study, whose pooled MLP head they do not need:
# they default to the size-independent gap_linear head without dropout (study 002's Keras head
# and MedMNIST's have none). Study 002's own head is `head.kind: flatten` with the feature map
# of its 224 px input (conf/experiment/cxr_pneumonia_mobilenetv2.yaml).
# ImageNet weights come from the timm tag in each timm name (pinned so that a timm release that
# changes its default tag cannot change the weights silently).
_GENERIC_HEAD = {"kind": "gap_linear", "dropout": 0.0}


def _param_blocks(module: nn.Module, prefix: str = "") -> list[tuple[str]]:
    """One block per child that holds parameters (parameter-free pools/activations skipped)."""
    return [(f"{prefix}{name}",) for name, child in module.named_children()
            if any(True for _ in child.parameters())]


@_register("timm legacy_xception.tf_in1k", normalize="inception", head=_GENERIC_HEAD)
def xception(cfg: dict, num_classes: int) -> ImageClassifier:
    """Xception (Chollet 2017) features + head.

    timm ``legacy_xception``: the original Keras Xception layout (entry flow, 8 middle-flow
    blocks, exit flow; 20.8M backbone parameters). ``pretrained: imagenet`` loads
    ``legacy_xception.tf_in1k``, the Keras/TF Xception weights ported to PyTorch (Cadene's
    pretrained-models file, a GitHub release URL cached in the torch hub cache, not the Hugging
    Face hub); they expect ``normalize: inception`` ([-1, 1] pixels, as Keras preprocess_input).
    """
    backbone = _timm_backbone("xception", "legacy_xception.tf_in1k",
                              cfg["pretrained"] == "imagenet")
    blocks = [("conv1", "bn1"), ("conv2", "bn2")]
    blocks += [(f"block{i}",) for i in range(1, 13)]
    blocks += [("conv3", "bn3"), ("conv4", "bn4")]
    return ImageClassifier(backbone, _head(cfg, backbone.num_features, num_classes),
                           arch="xception", normalize=cfg["normalize"], blocks=blocks,
                           gradcam_layer="act4")


@_register("timm inception_v3.tf_in1k", normalize="inception", head=_GENERIC_HEAD)
def inception_v3(cfg: dict, num_classes: int) -> ImageClassifier:
    """Inception v3 (Szegedy et al. 2016) features up to Mixed_7c + head; no auxiliary head.

    ``pretrained: imagenet`` loads ``inception_v3.tf_in1k`` (Hugging Face
    timm/inception_v3.tf_in1k): the TensorFlow-trained weights, the origin of Keras'
    InceptionV3 weights, which expect ``normalize: inception``. Inputs of at least 75 px; the
    map is 5x5 at 224 px (8x8 at the native 299 px).
    """
    backbone = _timm_backbone("inception_v3", "inception_v3.tf_in1k",
                              cfg["pretrained"] == "imagenet")
    return ImageClassifier(backbone, _head(cfg, backbone.num_features, num_classes),
                           arch="inception_v3", normalize=cfg["normalize"],
                           blocks=_param_blocks(backbone), gradcam_layer="Mixed_7c")


@_register("timm densenet121.ra_in1k", head=_GENERIC_HEAD)
def densenet121(cfg: dict, num_classes: int) -> ImageClassifier:
    """DenseNet-121 features (incl. the final BatchNorm + ReLU, ``features.norm5``) + head.

    ``pretrained: imagenet`` loads ``densenet121.ra_in1k`` (Hugging Face timm/densenet121.ra_in1k,
    timm's RandAugment recipe, ImageNet mean/std); ``densenet121.tv_in1k`` (torchvision's) is the
    other tag. Blocks: the stem, each of the 58 dense layers, the 3 transitions; ``norm5`` goes
    with the last dense layer.
    """
    backbone = _timm_backbone("densenet121", "densenet121.ra_in1k",
                              cfg["pretrained"] == "imagenet")
    blocks = [("features.conv0", "features.norm0")]
    for name, child in backbone.features.named_children():
        if name.startswith("denseblock"):
            blocks += _blocks_of(f"features.{name}", child)
        elif name.startswith("transition"):
            blocks.append((f"features.{name}",))
    blocks[-1] += ("features.norm5",)
    return ImageClassifier(backbone, _head(cfg, backbone.num_features, num_classes),
                           arch="densenet121", normalize=cfg["normalize"], blocks=blocks,
                           gradcam_layer="features.norm5")


def _vgg(arch: str, timm_name: str, cfg: dict, num_classes: int) -> ImageClassifier:
    """A VGG convolutional base (``features``, ending with the 5th max-pool: 7x7x512 at 224 px,
    as Keras' ``include_top=False``) + head; blocks = the conv layers, Grad-CAM on the last ReLU.
    timm's 4096-wide ``pre_logits`` (fc6/fc7 as convs) is dropped, as in Keras' convolutional
    base."""
    vgg = _timm_backbone(arch, timm_name, cfg["pretrained"] == "imagenet")
    backbone = vgg.features
    blocks = [(name,) for name, child in backbone.named_children() if isinstance(child, nn.Conv2d)]
    relus = [name for name, child in backbone.named_children() if isinstance(child, nn.ReLU)]
    return ImageClassifier(backbone, _head(cfg, 512, num_classes), arch=arch,
                           normalize=cfg["normalize"], blocks=blocks, gradcam_layer=relus[-1])


@_register("timm vgg16.tv_in1k (convolutional base)", head=_GENERIC_HEAD)
def vgg16(cfg: dict, num_classes: int) -> ImageClassifier:
    """VGG16 convolutional base (13 convs) + head; ``pretrained: imagenet`` loads
    ``vgg16.tv_in1k`` (torchvision's weights, Hugging Face timm/vgg16.tv_in1k). Same backbone as
    pocovidnet, with this registry's generic head and no freeze by default."""
    return _vgg("vgg16", "vgg16.tv_in1k", cfg, num_classes)


@_register("timm vgg19.tv_in1k (convolutional base)", head=_GENERIC_HEAD)
def vgg19(cfg: dict, num_classes: int) -> ImageClassifier:
    """VGG19 convolutional base (16 convs) + head; ``pretrained: imagenet`` loads
    ``vgg19.tv_in1k`` (torchvision's weights, Hugging Face timm/vgg19.tv_in1k)."""
    return _vgg("vgg19", "vgg19.tv_in1k", cfg, num_classes)


@_register("timm resnet18.a1_in1k", head=_GENERIC_HEAD, stem="imagenet")
def resnet18(cfg: dict, num_classes: int) -> ImageClassifier:
    """ResNet-18 features (stem + 8 basic blocks) + head (global pool + linear by default).

    ``stem: imagenet`` is the standard 7x7/2 conv + 3x3/2 max-pool (MedMNIST's "ResNet-18 (224)"
    row; ``pretrained: imagenet`` loads ``resnet18.a1_in1k``, Hugging Face
    timm/resnet18.a1_in1k, timm's A1 recipe). ``stem: cifar`` is MedMNIST's 28 px ResNet-18:
    conv1 3x3 stride 1 without bias and no max-pool, so a 28 px input keeps a 4x4 map at layer4
    (stride 8 instead of 32). MedMNIST feeds 1-channel images; this pipeline's input is RGB, so
    conv1 has 3 input channels (1,152 parameters more than MedMNIST's grey model).
    """
    _check_choice("model.stem", cfg["stem"], STEM_CHOICES)
    pretrained = cfg["pretrained"] == "imagenet"
    if pretrained and cfg["stem"] == "cifar":
        raise ValueError("model.stem=cifar replaces conv1 (3x3 stride 1), which the ImageNet "
                         "weights do not fit: use model.stem=imagenet with pretrained=imagenet, "
                         "or pretrained=none (MedMNIST trains the 28 px ResNet from scratch)")
    backbone = _timm_backbone("resnet18", "resnet18.a1_in1k", pretrained)
    if cfg["stem"] == "cifar":
        backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        # timm ResNet's own conv init, so the stem starts like the rest of the network
        nn.init.kaiming_normal_(backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
        backbone.maxpool = nn.Identity()
    return _resnet_classifier(backbone, "resnet18", cfg, num_classes)


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


@_register(None, **_CAPS_DEFAULTS)
def covid_caps(cfg: dict, num_classes: int) -> CapsuleClassifier:
    """COVID-CAPS: 4 convs -> capsules 32x8 -> 32x8 -> num_classes x 16, 3 routing iterations.

    Outputs ``log`` of the class capsule lengths (see :class:`ClassCapsuleHead`); the lengths
    themselves are ``model.capsule_lengths(x)``. The ``head`` config group is unused.
    """
    return _capsule_network("covid_caps", cfg, num_classes)


@_register(None, **{**_CAPS_DEFAULTS, "channels": [224, 224, 448, 448]})
def covid_caps_scaled(cfg: dict, num_classes: int) -> CapsuleClassifier:
    """COVID-CAPS with 3.5x wider convs (3,286,048 parameters at 3 classes, 1.6% below
    Mini-COVIDNet's 3,338,947); the paper does not publish its scaled layout."""
    return _capsule_network("covid_caps_scaled", cfg, num_classes)


# --------------------------------------------------------------------------------------------
# Config handling
# --------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """OmegaConf containers (or any Mapping/sequence) -> plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def list_models() -> list[str]:
    """Names of the registered architectures, sorted."""
    return sorted(_REGISTRY)


def default_model_config(arch: str) -> dict[str, Any]:
    """The default config of ``arch`` (what ``conf/model/<arch>.yaml`` holds)."""
    _check_arch(arch)
    return copy.deepcopy(_DEFAULTS[arch])


def _check_arch(arch: Any) -> None:
    if arch not in _REGISTRY:
        raise ValueError(f"unknown model.arch={arch!r}; valid names: {', '.join(list_models())}")


def resolve_model_config(model_cfg: Mapping) -> dict[str, Any]:
    """Validate a model config and fill in the architecture's defaults.

    Args:
        model_cfg: The ``model`` config group (dict or OmegaConf); ``arch`` is required.

    Returns:
        A complete plain-dict config.

    Raises:
        ValueError: Unknown arch, unknown key, or a value outside its valid choices.
    """
    cfg = _plain(model_cfg)
    if "arch" not in cfg:
        raise ValueError(f"model config has no 'arch' key; valid names: {', '.join(list_models())}")
    _check_arch(cfg["arch"])
    defaults = _DEFAULTS[cfg["arch"]]
    for key, value in cfg.items():
        if key not in defaults:
            raise ValueError(f"unknown key model.{key} for arch {cfg['arch']}; valid keys: "
                             f"{', '.join(defaults)}")
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"model.{key} must be a mapping with keys "
                                 f"{', '.join(defaults[key])}")
            for sub in value:
                if sub not in defaults[key]:
                    raise ValueError(f"unknown key model.{key}.{sub}; valid keys: "
                                     f"{', '.join(defaults[key])}")
    cfg = _merge(defaults, cfg)
    if cfg["pretrained"] is None:  # YAML null
        cfg["pretrained"] = "none"
    cfg["pretrained"] = str(cfg["pretrained"])
    _check_choice("model.normalize", cfg["normalize"], NORMALIZE_CHOICES)
    _check_choice("model.head.kind", cfg["head"]["kind"], HEAD_KINDS)
    _check_choice("model.head.activation", cfg["head"]["activation"], ACTIVATION_CHOICES)
    _check_choice("model.freeze.policy", cfg["freeze"]["policy"], FREEZE_POLICIES)
    head = cfg["head"]
    if int(head["hidden"]) < 1 or int(head["pool"]) < 1 or not 0 <= float(head["dropout"]) < 1:
        raise ValueError(f"model.head needs hidden >= 1, pool >= 1 and 0 <= dropout < 1; "
                         f"got {head}")
    fm = head["feature_map"]
    if fm is not None and (isinstance(fm, bool) or not isinstance(fm, int) or fm < 1):
        raise ValueError(f"model.head.feature_map must be null or an integer >= 1; got {fm!r}")
    if head["kind"] == "flatten" and fm is None:
        raise ValueError("model.head.kind=flatten needs model.head.feature_map: the side of the "
                         "backbone's output map at train.image_size (7 at 224 px for the "
                         "stride-32 backbones, 5 for inception_v3)")
    if int(cfg["freeze"]["n"]) < 0:
        raise ValueError(f"model.freeze.n must be >= 0; got {cfg['freeze']['n']}")
    return cfg


def _check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not valid; choose one of {', '.join(choices)}")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def build_model(model_cfg: Mapping, num_classes: int) -> ImageClassifier:
    """Build a model from its config group.

    Args:
        model_cfg: ``conf/model/<arch>.yaml`` content (missing keys take the arch's defaults).
        num_classes: Number of output logits.

    Returns:
        The model (train mode), initialised as ``pretrained`` says and frozen as ``freeze`` says.

    Raises:
        ValueError: Invalid config, or a weights file that does not fit the model.
        FileNotFoundError: ``pretrained`` names a file that does not exist.
        RuntimeError: ``pretrained: imagenet`` and the weights cannot be fetched.
    """
    cfg = resolve_model_config(model_cfg)
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    pretrained = cfg["pretrained"]
    if pretrained not in ("none", "imagenet") and not Path(pretrained).is_file():
        raise FileNotFoundError(f"model.pretrained={pretrained!r} is neither none, imagenet nor an "
                                f"existing weights file")
    model = _REGISTRY[cfg["arch"]](cfg, int(num_classes))
    if pretrained not in ("none", "imagenet"):
        load_weights_file(model, pretrained)
    freeze = cfg["freeze"]
    apply_freeze(model, freeze["policy"], n=int(freeze["n"]), layers=freeze["layers"])
    return model.train()


def load_weights_file(model: ImageClassifier, path: str | Path) -> None:
    """Load initial weights from a local file into ``model``.

    Accepted: a state dict of the backbone alone, a state dict of the whole model (keys
    ``backbone.*``/``head.*``), or a pipeline checkpoint (a dict with ``state_dict``). The
    backbone must match exactly; a whole model's head is loaded only if its shapes fit
    (otherwise, e.g. for another number of classes, the head keeps its fresh init, with a warning).

    Raises:
        ValueError: The file is not a state dict or does not fit the backbone; the message names
            the file and the missing, unexpected or mis-shaped keys.
    """
    path = Path(path)
    # weights_only=False as in pipeline.models.checkpoint: a pipeline checkpoint's metadata may hold
    # more than tensors; the file is the user's own.
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if (not isinstance(state, Mapping)
            or not all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ValueError(f"weights file {path} holds no state dict (a mapping of names to tensors)")
    if any(k.startswith("backbone.") for k in state):
        backbone_state = {k[len("backbone."):]: v for k, v in state.items()
                          if k.startswith("backbone.")}
        head_state = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        other = sorted(k for k in state if not k.startswith(("backbone.", "head.")))
        if other:
            raise ValueError(f"weights file {path}: unexpected keys {_few(other)} (expected "
                             f"backbone.* and head.*)")
    else:
        backbone_state, head_state = dict(state), {}
    problems = _mismatch(model.backbone, backbone_state)
    if problems:
        raise ValueError(f"weights file {path} does not fit the {model.arch} backbone: {problems}. "
                         f"It must hold the state dict of this backbone or of a whole {model.arch} "
                         f"model (as the train stage saves)")
    model.backbone.load_state_dict(backbone_state)
    if head_state:
        head_problems = _mismatch(model.head, head_state)
        if head_problems:
            warnings.warn(f"weights file {path}: head not loaded ({head_problems}); it keeps its "
                          f"fresh initialisation", stacklevel=2)
        else:
            model.head.load_state_dict(head_state)


def _few(names: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" ... ({len(names)} in all)" if len(names) > k else "")


def _mismatch(module: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
                    for k, v in expected.items() if k in state and state[k].shape != v.shape)
    groups = (("missing", missing), ("unexpected", unexpected),
              ("mis-shaped (file vs model)", shapes))
    parts = [f"{label} keys: {_few(keys)}" for label, keys in groups if keys]
    return "; ".join(parts)


def apply_freeze(model: ImageClassifier, policy: str = "all", *, n: int = 0,
                 layers: Sequence[str] = ()) -> None:
    """Set ``requires_grad`` of every parameter according to a freeze policy.

    Args:
        model: A model from :func:`build_model`.
        policy: ``all`` (everything trains), ``last_n`` (the last ``n`` of ``model.blocks`` +
            head), ``named`` (parameters under one of ``layers`` + head) or ``head_only``.
        n: Number of trailing backbone blocks for ``last_n``.
        layers: Parameter-name prefixes for ``named``, matched at dots (``backbone.28`` is
            ``backbone.28.*``, not ``backbone.280``); a leading ``backbone.`` may be left out.

    Raises:
        ValueError: Unknown policy, ``n`` beyond the number of blocks, or a layer that matches
            no parameter.
    """
    _check_choice("model.freeze.policy", policy, FREEZE_POLICIES)
    names = [name for name, _ in model.named_parameters()]
    layers = layers or ()  # YAML null
    prefixes: list[str] = ["head"]
    if policy == "all":
        prefixes = [""]
    elif policy == "last_n":
        if not 0 <= n <= len(model.blocks):
            raise ValueError(f"model.freeze.n={n} but {model.arch} has {len(model.blocks)} "
                             f"backbone blocks (see model.blocks)")
        prefixes += [p for block in model.blocks[len(model.blocks) - n:] for p in block]
    elif policy == "named":
        for layer in layers:
            layer = layer if layer.split(".")[0] in ("backbone", "head") else f"backbone.{layer}"
            if not any(_under(name, layer) for name in names):
                blocks = _few([b[0] for b in model.blocks], 8)
                raise ValueError(f"model.freeze.layers: {layer!r} matches no parameter of "
                                 f"{model.arch}; its blocks are {blocks}")
            prefixes.append(layer)
    for name, param in model.named_parameters():
        param.requires_grad_(any(_under(name, p) for p in prefixes))


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones once; BatchNorm running statistics are buffers, not
    counted, which matches Keras' "trainable" count when nothing is frozen)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def gradcam_target_layer(model: ImageClassifier) -> nn.Module:
    """The module whose output feeds Grad-CAM: the last convolutional block before the head
    (VGG16: block5_conv3's ReLU; COVID-CAPS: the last conv, before the capsules)."""
    return model.get_submodule(model.gradcam_layer)


def describe_init(model_cfg: Mapping) -> str:
    """Human-readable initialisation of a model config, for reports.

    Returns:
        E.g. ``"imagenet (timm mobilenetv1_100)"``, ``"none (from scratch)"`` or
        ``"file: weights.pt"``.
    """
    cfg = resolve_model_config(model_cfg)
    pretrained = cfg["pretrained"]
    if pretrained == "none":
        return "none (from scratch)"
    if pretrained == "imagenet":
        source = _IMAGENET_SOURCES[cfg["arch"]]
        if source is None:
            raise ValueError(f"model.pretrained=imagenet: no ImageNet weights exist for "
                             f"{cfg['arch']}; use none or a local weights file")
        return f"imagenet ({source})"
    return f"file: {Path(pretrained).name}"
