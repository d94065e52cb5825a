"""The committed params.yaml is what conf/ composes to, and config mistakes fail with the choices."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.core.config import (
    ConfigError,
    apply_overrides,
    compose,
    get,
    main_repo_root,
    select_run,
)

ROOT = Path(__file__).resolve().parent.parent


def test_params_yaml_equals_the_composed_conf():
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == compose([]), "params.yaml is stale: run `python -m pipeline.core.config > params.yaml`"


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    cfg = compose([f"experiment={experiment}"])
    for model in cfg["grid"]["models"]:
        assert model in cfg["models"], f"experiment {experiment}: grid model {model} has no config"
    for loss in cfg["grid"]["losses"]:
        assert loss in cfg["losses"]


def test_paper_experiment_is_the_study_protocol():
    cfg = compose(["experiment=paper"])
    t = cfg["train"]
    assert (t["image_size"], t["epochs"], t["batch_size"], t["optimizer"]["lr"]) == (224, 50, 16, 1e-4)
    assert len(cfg["grid"]["models"]) * len(cfg["grid"]["losses"]) == 14
    assert cfg["folds"]["k"] == 5


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(ConfigError, match="valid choices for 'experiment'.*paper"):
        compose(["experiment=papper"])


def test_malformed_override_is_a_config_error():
    with pytest.raises(ConfigError, match="train.epochs"):
        compose(["train.epochs=[3"])
    remote = "benchmark.remote={host: 'pi@raspberrypi.local', key: '~/.ssh/id_ed25519'}"
    assert compose([remote])["benchmark"]["remote"]["host"] == "pi@raspberrypi.local"


def test_unknown_key_is_an_error_with_the_valid_keys():
    params = compose([])
    with pytest.raises(ConfigError, match="'tran' is not under <top level>.*train"):
        apply_overrides(params, ["tran.epochs=3"])
    with pytest.raises(ConfigError, match="valid keys: .*epochs"):
        get(params, "train.epoch")
    assert apply_overrides(params, ["train.epochs=3"])["train"]["epochs"] == 3
    with pytest.raises(ConfigError, match="unknown model 'mobilenet'.*mini_covidnet"):
        select_run(params, "mobilenet", "ce")
    with pytest.raises(ConfigError, match="unknown loss 'focl'"):
        select_run(params, "mini_covidnet", "focl")


def test_queued_experiment_workspace_resolves_to_the_checkout(tmp_path):
    inner = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    inner.mkdir(parents=True)
    assert main_repo_root(inner) == tmp_path / "repo"
    assert main_repo_root(tmp_path / "repo") == tmp_path / "repo"
