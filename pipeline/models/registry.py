"""The model registry: architecture names, the default config of each, and config validation.

Architectures register themselves with :func:`register` (``pipeline.models.backbones`` and
``pipeline.models.capsules``; the package imports both, so the table is complete whenever any
``pipeline.models`` module is imported). A model is described by its config group
``conf/model/<arch>.yaml``::

    arch: mini_covidnet        # registry name (= file name)
    pretrained: none           # none | imagenet | <path to a weights file>
    normalize: imagenet        # imagenet | none | inception (mean = std = 0.5)
    head: {kind: pool_mlp, hidden: 128, activation: prelu, dropout: 0.5, pool: 4,
           feature_map: null}
    freeze: {policy: all, n: 0, layers: []}

Keys left out fall back to the architecture's defaults (:func:`default_model_config`, kept
equal to the YAML files by a test), so ``build_model({"arch": "pocovidnet"}, 3)`` is the
published POCOVID-Net.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
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


def builder(arch: str) -> Builder:
    """The registered builder of ``arch``."""
    _check_arch(arch)
    return _REGISTRY[arch]


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
    check_choice("model.normalize", cfg["normalize"], NORMALIZE_CHOICES)
    check_choice("model.head.kind", cfg["head"]["kind"], HEAD_KINDS)
    check_choice("model.head.activation", cfg["head"]["activation"], ACTIVATION_CHOICES)
    check_choice("model.freeze.policy", cfg["freeze"]["policy"], FREEZE_POLICIES)
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


def check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    """Raise a ValueError naming ``key`` and the valid choices unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not valid; choose one of {', '.join(choices)}")


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


def few_names(names: Sequence[str], k: int = 5) -> str:
    """The first ``k`` names, comma-separated, with the total when there are more (for messages)."""
    shown = ", ".join(names[:k])
    return shown + (f" ... ({len(names)} in all)" if len(names) > k else "")
