"""Lookups in the complete model registry: every architecture module is imported here, so the
names, default configs and validation below always see all of them."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.models import backbones, capsules  # noqa: F401  (they fill the registry)
from pipeline.models.registry import (_DEFAULTS, _IMAGENET_SOURCES, _REGISTRY, ACTIVATION_CHOICES,
                                      FREEZE_POLICIES, HEAD_KINDS, NORMALIZE_CHOICES, Builder,
                                      _merge, check_choice)


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
