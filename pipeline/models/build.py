"""Building a model from its config group: the registered architecture, its initial weights
(``model.pretrained``) and its freezing policy (``model.freeze``)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from pipeline.models.classifier import ImageClassifier
from pipeline.models.freeze import apply_freeze
from pipeline.models.catalog import builder, resolve_model_config
from pipeline.models.registry import few_names


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
    model = builder(cfg["arch"])(cfg, int(num_classes))
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
            raise ValueError(f"weights file {path}: unexpected keys {few_names(other)} (expected "
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


def _mismatch(module: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
                    for k, v in expected.items() if k in state and state[k].shape != v.shape)
    groups = (("missing", missing), ("unexpected", unexpected),
              ("mis-shaped (file vs model)", shapes))
    parts = [f"{label} keys: {few_names(keys)}" for label, keys in groups if keys]
    return "; ".join(parts)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones once; BatchNorm running statistics are buffers, not
    counted, which matches Keras' "trainable" count when nothing is frozen)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
