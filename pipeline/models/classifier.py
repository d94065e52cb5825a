"""The model every architecture builds: ``normalize -> backbone -> head``.

A model maps an RGB float batch in [0, 1] (``(B, 3, H, W)``) to LOGITS ``(B, num_classes)``; the
caller applies softmax. The backbones come from maintained packages (timm, pytorchcv:
``pipeline.models.backbones``) or are defined here (COVID-CAPS: ``pipeline.models.capsules``);
the heads are in ``pipeline.models.heads``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The TF/Keras-ported Xception and InceptionV3 weights expect pixels in [-1, 1] (Keras'
# "tf" preprocess_input mode), i.e. (x - 0.5) / 0.5.
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
_NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                   "inception": (INCEPTION_MEAN, INCEPTION_STD)}

# Keras' BatchNormalization defaults (momentum 0.99 = PyTorch momentum 0.01, epsilon 1e-3): the
# layers this package defines itself follow the study's Keras code; timm/pytorchcv backbones keep
# their own.
KERAS_BN = {"eps": 1e-3, "momentum": 0.01}


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


class ImageClassifier(nn.Module):
    """``normalize -> backbone -> head``; built by :func:`pipeline.models.build.build_model`.

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




def gradcam_target_layer(model: ImageClassifier) -> nn.Module:
    """The module whose output feeds Grad-CAM: the last convolutional block before the head
    (VGG16: block5_conv3's ReLU; COVID-CAPS: the last conv, before the capsules)."""
    return model.get_submodule(model.gradcam_layer)
