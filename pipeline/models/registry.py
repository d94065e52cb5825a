"""The model registry's table: architectures register themselves with :func:`register`
(``pipeline.models.backbones`` and ``pipeline.models.capsules``); :mod:`pipeline.models.catalog`
imports both and answers lookups. A model is described by its config group
``conf/model/<arch>.yaml``::

    arch: mini_covidnet        # registry name (= file name)
    pretrained: none           # none | imagenet | <path to a weights file>
    normalize: imagenet        # imagenet | none | inception (mean = std = 0.5)
    head: {kind: pool_mlp, hidden: 128, activation: prelu, dropout: 0.5, pool: 4,
           feature_map: null}
    freeze: {policy: all, n: 0, layers: []}

Keys left out fall back to the architecture's defaults (:func:`pipeline.models.catalog.default_model_config`, kept
equal to the YAML files by a test), so ``build_model({"arch": "pocovidnet"}, 3)`` is the
published POCOVID-Net.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

NORMALIZE_CHOICES = ("imagenet", "none", "inception")
ACTIVATION_CHOICES = ("prelu", "relu")
HEAD_KINDS = ("pool_mlp", "flatten", "gap_linear")
STEM_CHOICES = ("imagenet", "cifar")
FREEZE_POLICIES = ("all", "last_n", "named", "head_only")

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

#: A builder: (complete model config, number of classes) -> model.
Builder = Callable[[dict, int], Any]
_REGISTRY: dict[str, Builder] = {}
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


def register(imagenet_source: str | None, **overrides: Any) -> Callable[[Builder], Builder]:
    """Register a builder under its function name with its default config (timm-style).

    Args:
        imagenet_source: Where ``pretrained: imagenet`` loads from (for :func:`describe_init`);
            None when no ImageNet weights exist for the architecture.
        **overrides: Top-level config values that differ from ``_BASE_CONFIG`` (nested groups
            are merged key by key).
    """
    def wrap(fn: Builder) -> Builder:
        name = fn.__name__
        _REGISTRY[name] = fn
        _DEFAULTS[name] = _merge({"arch": name, **copy.deepcopy(_BASE_CONFIG)}, overrides)
        _IMAGENET_SOURCES[name] = imagenet_source
        return fn
    return wrap


def check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    """Raise a ValueError naming ``key`` and the valid choices unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not valid; choose one of {', '.join(choices)}")


def few_names(names: Sequence[str], k: int = 5) -> str:
    """The first ``k`` names, comma-separated, with the total when there are more (for messages)."""
    shown = ", ".join(names[:k])
    return shown + (f" ... ({len(names)} in all)" if len(names) > k else "")
