"""Typed schemas of every params group, applied with OmegaConf structured configs.

The values live only in ``conf/``: a field has no default unless it is optional by design, so a
params file that lacks a key is refused as well as one with an unknown key or a value of the
wrong type. ``validate`` checks the groups a params mapping holds (a stage's test may write only
the groups that stage reads) and returns them with each value converted to its declared type.

``dvc exp run -S`` composes ``conf/`` in DVC's own process, which never imports this module, so
the stages apply it when they load ``params.yaml`` (``pipeline.core.config.load_params``).
"""

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from pipeline.core.cli import UserError

# An int stays an int and a float a float (``rotation: 10``, ``shift: 0.1``).
Number = Union[int, float]


class ConfigError(ValueError, UserError):
    """A configuration key or value that the pipeline cannot run with."""


# ------------------------------------------------------------------------------------ dataset
@dataclass
class PatientRule:
    pattern: str = MISSING
    group: str = MISSING


@dataclass
class Dataset:
    """Keys of every dataset kind; each kind adds its own below."""

    name: str = MISSING
    kind: str = MISSING
    sources: List[str] = MISSING
    checksums: Optional[str] = MISSING  # null: not pinned yet (fetch_data says how)
    raw_dir: str = MISSING
    frames_dir: str = MISSING
    frames_summary: str = MISSING
    classes: Dict[str, List[Any]] = MISSING  # label values: names or numbers
    positive_class: Optional[str] = MISSING
    frame_max_side: Optional[int] = MISSING
    min_side: int = MISSING
    resize_interpolation: str = MISSING
    workers: int = MISSING
    strict: bool = MISSING


@dataclass
class LusMetadata:
    file: str = MISSING
    filename_column: str = MISSING
    patient_column: str = MISSING
    fps_column: str = MISSING


@dataclass
class LusVideos(Dataset):
    video_dir: str = MISSING
    image_dir: str = MISSING
    metadata: LusMetadata = MISSING
    probes: List[str] = MISSING
    include_images: bool = MISSING
    ignore_prefixes: List[str] = MISSING
    patient_rules: List[PatientRule] = MISSING
    rate_hz: Number = MISSING
    max_frames: int = MISSING
    decode_timeout_s: Optional[Number] = MISSING


@dataclass
class ManifestColumns:
    file: str = MISSING
    path_column: str = MISSING
    label_column: str = MISSING
    patient_column: str = MISSING
    view_column: Optional[str] = MISSING
    finding_column: Optional[str] = MISSING


@dataclass
class ImageManifest(Dataset):
    image_dir: str = MISSING
    manifest: ManifestColumns = MISSING
    ignore_labels: List[Union[int, str]] = MISSING
    views: Optional[List[str]] = MISSING
    frame_format: str = MISSING


@dataclass
class ImageFolders(Dataset):
    image_root: str = MISSING
    split_dirs: Dict[str, str] = MISSING
    ignore_folders: List[str] = MISSING
    patient_rules: List[PatientRule] = MISSING
    frame_format: str = MISSING


@dataclass
class MedmnistNpz(Dataset):
    file: str = MISSING
    frame_format: str = MISSING


#: ``dataset.kind`` -> its schema (the same kinds as ``pipeline.data.sources.ADAPTERS``).
DATASET_KINDS: dict[str, type] = {"lus_videos": LusVideos, "image_manifest": ImageManifest,
                                  "image_folders": ImageFolders, "medmnist_npz": MedmnistNpz}


# -------------------------------------------------------------------------------------- folds
@dataclass
class LinkDuplicates:
    method: str = MISSING
    threshold: int = MISSING


@dataclass
class Folds:
    method: str = MISSING
    k: int = MISSING
    seed: int = MISSING
    validation: str = MISSING
    val_fraction: float = MISSING
    dir: str = MISSING
    link_duplicates: LinkDuplicates = MISSING
    val_candidates: int = MISSING


# -------------------------------------------------------------------------------------- train
@dataclass
class Optimizer:
    name: str = MISSING
    lr: float = MISSING
    decay: float = MISSING
    betas: List[float] = MISSING
    weight_decay: float = MISSING


@dataclass
class EarlyStopping:
    patience: int = MISSING


@dataclass
class LrPlateau:
    factor: float = MISSING
    patience: int = MISSING


@dataclass
class LrSteps:
    milestones: List[int] = MISSING
    factor: float = MISSING


@dataclass
class Augment:
    rotation: Number = MISSING
    shift: Number = MISSING
    hflip: bool = MISSING
    vflip: bool = MISSING
    zoom: Number = MISSING
    shear: Number = MISSING


@dataclass
class Train:
    image_size: int = MISSING
    epochs: int = MISSING
    batch_size: int = MISSING
    max_frames_per_source: Optional[int] = MISSING
    optimizer: Optimizer = MISSING
    early_stopping: EarlyStopping = MISSING
    lr_plateau: LrPlateau = MISSING
    lr_steps: LrSteps = MISSING
    minority_oversample: int = MISSING
    augment: Augment = MISSING
    folds: List[int] = MISSING
    device: str = MISSING
    amp: bool = MISSING
    channels_last: bool = MISSING
    cpu_amp: bool = MISSING
    cuda_graph: bool = MISSING
    num_workers: int = MISSING
    deterministic: bool = MISSING


# ------------------------------------------------------------------------------------- models
@dataclass
class Head:
    kind: str = MISSING
    hidden: int = MISSING
    activation: str = MISSING
    dropout: float = MISSING
    pool: int = MISSING
    feature_map: Optional[int] = MISSING


@dataclass
class Freeze:
    policy: str = MISSING
    n: int = MISSING
    layers: List[str] = MISSING


@dataclass
class Model:
    arch: str = MISSING
    pretrained: str = MISSING
    normalize: str = MISSING
    head: Head = MISSING
    freeze: Freeze = MISSING


@dataclass
class ResNet18(Model):
    stem: str = MISSING


@dataclass
class CapsuleNet(Model):
    channels: List[int] = MISSING
    capsules: List[List[int]] = MISSING
    class_capsule_dim: int = MISSING
    routings: int = MISSING


#: ``models.<name>.arch`` -> its schema, for the architectures with keys of their own.
MODEL_ARCHS: dict[str, type] = {"resnet18": ResNet18, "covid_caps": CapsuleNet,
                                "covid_caps_scaled": CapsuleNet}


# ------------------------------------------------------------------------------------- losses
@dataclass
class CrossEntropy:
    name: str = MISSING
    label_smoothing: float = MISSING
    class_weights: Optional[List[float]] = MISSING
    reduction: str = MISSING


@dataclass
class Focal:
    name: str = MISSING
    gamma: float = MISSING
    alpha: Any = MISSING  # null | a number | one weight per class
    reduction: str = MISSING


#: ``losses.<name>.name`` -> its schema.
LOSS_NAMES: dict[str, type] = {"ce": CrossEntropy, "focal": Focal}


# ------------------------------------------------------------------------------ other groups
@dataclass
class Audit:
    report: str = MISSING


@dataclass
class Grid:
    models: List[str] = MISSING
    losses: List[str] = MISSING


@dataclass
class Evaluate:
    bootstrap: int = MISSING
    ci: float = MISSING


@dataclass
class Export:
    formats: List[str] = MISSING
    all_formats_folds: Optional[List[int]] = MISSING
    opset: int = MISSING
    parity_frames: int = MISSING
    parity_split: str = MISSING
    calibration_frames: int = MISSING
    calibration_split: str = MISSING
    tolerance: Dict[str, Optional[float]] = MISSING
    min_top1_agreement: Dict[str, float] = MISSING
    workers: int = MISSING


@dataclass
class Benchmark:
    fold: int = MISSING
    formats: List[str] = MISSING
    torch: bool = MISSING
    cuda: bool = MISSING
    runs: int = MISSING
    warmup: int = MISSING
    threads: List[Union[int, str]] = MISSING
    remote: Any = MISSING  # null | user@host | the fields of benchmark.RemoteTarget


@dataclass
class Binary:
    thresholds: List[float] = MISSING
    target_sensitivity: float = MISSING
    z: float = MISSING
    bootstrap: int = MISSING
    ci: float = MISSING
    bins: int = MISSING
    tsne: bool = MISSING
    tsne_fold: int = MISSING
    tsne_max: int = MISSING
    dir: str = MISSING
    metrics: str = MISSING


@dataclass
class Tracking:
    uri: Optional[str] = MISSING
    experiment: str = MISSING
    required: bool = MISSING
    max_retries: Optional[int] = MISSING
    timeout_s: Optional[Number] = MISSING


@dataclass
class Report:
    dir: str = MISSING


@dataclass
class Params:
    """The top level of ``params.yaml``. ``dataset``, ``models`` and ``losses`` hold the schema
    their entry names (``kind``, ``arch``, ``name``); ``validate`` picks it."""

    dataset: Any = MISSING
    folds: Folds = MISSING
    train: Train = MISSING
    models: Dict[str, Any] = MISSING
    losses: Dict[str, Any] = MISSING
    profile: str = MISSING
    seed: int = MISSING
    audit: Audit = MISSING
    grid: Grid = MISSING
    evaluate: Evaluate = MISSING
    export: Export = MISSING
    benchmark: Benchmark = MISSING
    binary: Binary = MISSING
    tracking: Tracking = MISSING
    report: Report = MISSING


def _keys(schema: type) -> str:
    return ", ".join(sorted(f.name for f in dataclasses.fields(schema)))


def _choose(table: Mapping[str, type], value: Any, key: str, where: str,
            default: type | None = None) -> type:
    """The schema that ``value`` (an entry's ``kind``/``arch``/``name``) selects."""
    if value in table:
        return table[value]
    if default is not None:
        return default
    raise ConfigError(f"{where}: {key}={value!r} is unknown (valid: {', '.join(sorted(table))})")


def _group_schema(group: str, value: Any, where: str) -> Any:
    """The schema of one top-level group: a dataclass, or a mapping of entry -> dataclass."""
    if group == "dataset":
        kind = value.get("kind") if isinstance(value, Mapping) else None
        return _choose(DATASET_KINDS, kind, "dataset.kind", where)
    if group in ("models", "losses"):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: '{group}' must be a mapping of name -> config, "
                              f"got {value!r}")
        key, table, default = (("arch", MODEL_ARCHS, Model) if group == "models"
                               else ("name", LOSS_NAMES, None))
        return {name: _choose(table, (entry or {}).get(key) if isinstance(entry, Mapping)
                              else None, f"{group}.{name}.{key}", where, default)
                for name, entry in value.items()}
    return typing.get_type_hints(Params)[group]


def _apply(schema: Any, value: Any, prefix: str, where: str) -> Any:
    """``value`` merged into ``schema`` and back to plain containers, or one ConfigError line."""
    if isinstance(schema, dict):
        return {name: _apply(schema[name], value[name], f"{prefix}.{name}", where)
                for name in value}
    scalar = not dataclasses.is_dataclass(schema)  # seed, profile: checked as a one-field holder
    holder = (dataclasses.make_dataclass("ScalarGroup", [(prefix, schema, dataclasses.field(
        default=MISSING))]) if scalar else schema)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(holder), {prefix: value} if scalar else value)
        checked = OmegaConf.to_container(merged, throw_on_missing=True)
    except (OmegaConfBaseException, ValueError) as exc:
        raise _explain(exc, Params if scalar else schema, "" if scalar else prefix,
                       where) from None
    return checked[prefix] if scalar else checked


def _explain(exc: Exception, schema: type, prefix: str, where: str) -> ConfigError:
    """One line naming the key, what is wrong with it and the valid keys beside it."""
    full_key = str(getattr(exc, "full_key", "") or "")
    key = ".".join(p for p in (prefix, full_key) if p)
    if not full_key:  # the group itself is not a mapping
        return ConfigError(f"{where}: '{key}' must be a mapping of its keys "
                           f"(valid keys under {key}: {_keys(schema)})")
    owner = getattr(exc, "object_type", None)
    if getattr(owner, "__name__", "") == "ScalarGroup":  # seed, profile
        owner = Params
    if dataclasses.is_dataclass(owner):
        parent = key.rsplit(".", 1)[0] if "." in key else "<top level>"
        found = _path_to(schema, owner, prefix)
        field = key.rsplit(".", 1)[-1]
        if found is not None and not parent.startswith(found):
            parent = found  # an entry of a list (patient_rules) names its key without the path
            key = f"{found}.{field}"
    else:  # inside a dict or list field of the group (export.tolerance, dataset.classes)
        owner, parent, field = schema, prefix or "<top level>", full_key.split(".")[0]
    valid = f"valid keys under {parent}: {_keys(owner)}"
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, ConfigKeyError):
        return ConfigError(f"{where}: unknown key '{key}' ({valid})")
    if isinstance(exc, MissingMandatoryValue):
        return ConfigError(f"{where}: missing key '{key}' ({valid}); compose params from conf/ "
                           f"(`python -m pipeline.core.config > params.yaml`)")
    hint = typing.get_type_hints(owner).get(field)
    expected = f"; expected {_type_name(hint)}" if hint is not None else ""
    return ConfigError(f"{where}: wrong type for '{key}': {first}{expected} ({valid})")


def _path_to(schema: Any, target: type, path: str) -> str | None:
    """The dotted path of the ``target`` dataclass inside ``schema`` (``[]``: a list entry)."""
    if schema is target:
        return path
    origin, args = typing.get_origin(schema), typing.get_args(schema)
    if origin is Union:
        args = tuple(a for a in args if a is not type(None))
        return _path_to(args[0], target, path) if len(args) == 1 else None
    if origin in (list, dict):
        return _path_to(args[-1], target, path + ("[]" if origin is list else ".<name>"))
    if dataclasses.is_dataclass(schema):
        for name, hint in typing.get_type_hints(schema).items():
            found = _path_to(hint, target, f"{path}.{name}" if path else name)
            if found is not None:
                return found
    return None


def _type_name(hint: Any) -> str:
    return (hint.__name__ if isinstance(hint, type) else str(hint)).replace("typing.", "")


def validate(params: Mapping, where: str = "params") -> dict:
    """Check every group of ``params`` against its schema.

    Args:
        params: the composed parameters (all groups, or only some of them).
        where: what the params came from, for the error (e.g. ``params.yaml``).

    Returns:
        The same groups with each value converted to its declared type.

    Raises:
        ConfigError: an unknown group or key, a missing key or a value of the wrong type; the
            message names the key and lists the valid keys beside it.
    """
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}: expected a mapping of params groups, got {params!r}")
    groups = [f.name for f in dataclasses.fields(Params)]
    out = {}
    for group, value in params.items():
        if group not in groups:
            raise ConfigError(f"{where}: unknown key '{group}' (valid keys under <top level>: "
                              f"{', '.join(sorted(groups))})")
        out[group] = _apply(_group_schema(group, value, where), value, group, where)
    return _in_order(out, params)


def _in_order(checked: Any, original: Any) -> Any:
    """``checked`` with the key order of ``original`` (a schema lists a kind's own keys last)."""
    if isinstance(checked, dict) and isinstance(original, Mapping):
        first = {k: _in_order(checked[k], original[k]) for k in original if k in checked}
        return {**first, **{k: v for k, v in checked.items() if k not in first}}
    if isinstance(checked, list) and isinstance(original, list):
        return [_in_order(c, o) for c, o in zip(checked, original)]
    return checked
