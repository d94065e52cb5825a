"""Loading the pipeline's configuration.

``conf/`` is the Hydra source of truth; ``dvc exp run`` composes it into ``params.yaml``
(``hydra.enabled``), and every stage reads ``params.yaml`` so that ``-S`` overrides reach it.
``compose`` is the same composition in-process, for tests and for running a module outside DVC.
Both check the result against the typed schemas of :mod:`pipeline.core.schema`: DVC composes in
its own process, so a wrong type given with ``dvc exp run -S`` is refused when the stage loads
``params.yaml``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from pipeline.core.schema import ConfigError, validate

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"

__all__ = ["ConfigError", "apply_overrides", "compose", "compose_unchecked", "get", "load_params",
           "main_repo_root", "resolve_path", "select_run"]


def compose(overrides: Sequence[str] = (), conf_dir: str | Path = CONF_DIR) -> dict:
    """Compose ``conf/config.yaml`` with Hydra overrides, as ``dvc exp run -S`` does.

    Raises:
        ConfigError: an override names an unknown group option or key, or a value of the wrong
            type; the message lists the valid choices or keys.
    """
    where = f"{conf_dir} with overrides {list(overrides)}" if overrides else str(conf_dir)
    return validate(compose_unchecked(overrides, conf_dir), where)


def compose_unchecked(overrides: Sequence[str] = (), conf_dir: str | Path = CONF_DIR) -> dict:
    """What Hydra composes (as ``dvc exp run`` writes it to ``params.yaml``), before the schema
    check of ``compose``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )

    try:
        with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except (ConfigCompositionException, MissingConfigException, OverrideParseException) as exc:
        raise _explain(exc, list(overrides), Path(conf_dir)) from exc
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _explain(exc: Exception, overrides: list[str], conf_dir: Path) -> ConfigError:
    """One line that names the bad override and lists what is valid (Hydra's own message, e.g.
    "Key 'tran' is not in struct", names neither the valid keys nor the valid choices)."""
    groups = {p.name: sorted(q.stem for q in p.glob("*.yaml"))
              for p in conf_dir.iterdir() if p.is_dir()}
    selections = [o for o in overrides if o.split("=", 1)[0].split("@", 1)[0] in groups]
    for item in overrides:
        key, sep, value = item.partition("=")
        group = key.split("@", 1)[0]
        if sep and group in groups and value not in groups[group] and value != "null":
            return ConfigError(f"override '{item}': no option '{value}' in conf/{group}/ "
                               f"(valid choices for '{group}': {', '.join(groups[group])})")
    base = None
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or key.startswith(("+", "~")) or key.split("@", 1)[0] in groups:
            continue
        if base is None:
            try:
                base = compose(selections, conf_dir)
            except ConfigError:
                break
        try:
            get(base, key)
        except ConfigError as missing:
            return ConfigError(f"override '{item}': {missing}")
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), repr(exc))
    return ConfigError(f"cannot compose {conf_dir} with overrides {overrides}: {first}")


def load_params(path: str | Path = "params.yaml") -> dict:
    """Read the composed parameters that DVC tracks, checked against their schemas.

    Raises:
        ConfigError: the file is missing, or a group in it has an unknown or missing key or a
            value of the wrong type (the message lists the valid keys).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the project root, or compose it with "
                          f"`dvc exp run` / `python -m pipeline.core.config > params.yaml`")
    with path.open() as f:
        return validate(yaml.safe_load(f) or {}, str(path))


def get(params: Mapping, dotted: str) -> Any:
    """``params['a']['b']`` for ``'a.b'``, with an error that lists the keys available."""
    node: Any = params
    walked = []
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            where = ".".join(walked) or "<top level>"
            valid = ", ".join(sorted(map(str, node))) if isinstance(node, Mapping) else "none"
            raise ConfigError(f"unknown config key '{dotted}': '{part}' is not under {where} "
                              f"(valid keys: {valid})")
        node = node[part]
        walked.append(part)
    return node


def apply_overrides(params: dict, overrides: Sequence[str]) -> dict:
    """Apply ``key.path=value`` overrides to existing keys only (a typo is an error, not a new key)."""
    cfg = OmegaConf.create(params)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        get(params, key)  # raises with the valid keys if the key does not exist
        OmegaConf.update(cfg, key, yaml.safe_load(value), merge=False)
    return validate(OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
                    f"overrides {list(overrides)}")


def select_run(params: Mapping, model: str, loss: str) -> tuple[dict, dict]:
    """The model and loss configs of one grid cell."""
    models, losses = get(params, "models"), get(params, "losses")
    if model not in models:
        raise ConfigError(f"unknown model '{model}' (valid: {', '.join(sorted(models))})")
    if loss not in losses:
        raise ConfigError(f"unknown loss '{loss}' (valid: {', '.join(sorted(losses))})")
    return dict(models[model]), dict(losses[loss])


def grid_cells(params: Mapping, losses: Sequence[str] | None = None) -> list[str]:
    """The grid's cells ``<model>-<loss>``, model by model: ``grid.models`` x ``grid.losses``
    (x ``losses`` when given)."""
    losses = get(params, "grid.losses") if losses is None else losses
    return [f"{model}-{loss}" for model in get(params, "grid.models") for loss in losses]


def main_repo_root(start: str | Path | None = None) -> Path:
    """The user's checkout: the working directory (``start``), where DVC runs every stage, or
    the checkout that holds it when that is a ``dvc exp run --temp/--queue`` workspace.

    Queued and temporary experiments run in a copy under ``<repo>/.dvc/tmp/exps/`` that DVC
    deletes afterwards; anything meant to outlive the run (the MLflow store, data sources given
    relative to the project) must resolve against the checkout that holds that copy.
    """
    here = Path(start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return here


def resolve_path(path: str | Path, root: str | Path | None = None) -> Path:
    """Resolve a path from params against the user's checkout (see ``main_repo_root``), so a
    stage behaves the same from any directory and inside queued experiments."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_absolute():
        return p
    return Path(root) / p if root else main_repo_root() / p


def main(argv: Sequence[str] | None = None) -> None:
    """Print the composed config as YAML: ``python -m pipeline.core.config [overrides...] > params.yaml``;
    ``python -m pipeline.core.config check [overrides...]`` only checks them (the overrides of a
    ``dvc exp run -S ...``, whose own error, "Key 'tran' is not in struct", lists no valid keys):
    an unknown key or group option ends in one ``error:`` line with the valid ones."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["check"]:
        compose(args[1:])
        print(f"ok: conf/ composes with {args[1:]}", file=sys.stderr)
        return
    print(yaml.safe_dump(compose(args), sort_keys=False), end="")


if __name__ == "__main__":
    from pipeline.core.cli import run_main

    run_main(main)
