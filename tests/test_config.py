"""The committed params.yaml is what conf/ composes to, its typed schemas hold every value conf/
gives, and config mistakes (unknown key, wrong type, unknown choice) fail with the valid ones:
in-process, through every ``python -m pipeline.stages.<stage>`` and under ``dvc exp run -S``."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import (
    ConfigError,
    apply_overrides,
    compose,
    compose_unchecked,
    get,
    load_params,
    main_repo_root,
    select_run,
)
from pipeline.core.schema import DATASET_KINDS, LOSS_NAMES, validate
from tests.conftest import write_pinned_source

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def test_params_yaml_equals_the_composed_conf():
    out = subprocess.run([sys.executable, "-m", "pipeline.core.config"], cwd=ROOT, check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout == (ROOT / "params.yaml").read_text(), (
        "params.yaml is stale: run `python -m pipeline.core.config > params.yaml`")


@pytest.mark.parametrize("experiment", [None, *EXPERIMENTS])
def test_schemas_keep_every_composed_value_and_its_type(experiment):
    """The checked params are what Hydra (and so DVC) composes, to the byte: no key added,
    dropped or reordered, no int turned float."""
    raw = compose_unchecked([f"experiment={experiment}"] if experiment else [])
    assert (yaml.safe_dump(validate(raw), sort_keys=False)
            == yaml.safe_dump(raw, sort_keys=False))


def test_schema_tables_match_the_code_registries():
    from pipeline.data.sources import ADAPTERS
    from pipeline.training.losses import _LOSS_KEYS

    assert set(DATASET_KINDS) == set(ADAPTERS)
    assert set(LOSS_NAMES) == set(_LOSS_KEYS)
    kinds = {yaml.safe_load(p.read_text())["kind"]
             for p in (ROOT / "conf" / "dataset").glob("*.yaml")}
    assert kinds <= set(DATASET_KINDS)


# Per group: a key, a value of the wrong type for it, and the stage that reads the group.
BAD_VALUES = [
    ("seed", "forty-two", "fetch_data"),
    ("profile", [1, 2], "extract_frames"),
    ("dataset.workers", "many", "fetch_data"),
    ("folds.k", "five", "split_folds"),
    ("audit.report", {"a": 1}, "audit"),
    ("train.epochs", "abc", "train"),
    ("models.mini_covidnet.head.dropout", "half", "train"),
    ("losses.ce.label_smoothing", "none at all", "train"),
    ("grid.models", "mini_covidnet", "evaluate"),
    ("evaluate.bootstrap", 1.5, "evaluate"),
    ("export.opset", "eighteen", "export"),
    ("benchmark.runs", "fifty", "benchmark"),
    ("binary.tsne", "sometimes", "binary_eval"),
    ("tracking.required", "maybe", "train"),
    ("report.dir", ["reports"], "report"),
]
STAGE_ARGS = {"train": ["model=mini_covidnet", "loss=ce"], "export": ["--run-dir", "models/x-ce"],
              "benchmark": ["--run-dir", "models/x-ce", "--out", "x.json"]}


def _changed(params: dict, dotted: str, value, typo: bool = False) -> dict:
    """``params`` with ``dotted`` set to ``value``, or (typo) renamed with its last letter
    doubled."""
    out = copy.deepcopy(params)
    *parents, last = dotted.split(".")
    node = out
    for p in parents:
        node = node[p]
    if typo:
        node[last + last[-1]] = node.pop(last)
    else:
        node[last] = value
    return out


def _valid_keys_of(dotted: str) -> tuple[str, str]:
    parent = dotted.rsplit(".", 1)[0] if "." in dotted else "<top level>"
    return parent, dotted.rsplit(".", 1)[-1]


@pytest.mark.parametrize("dotted,value,stage", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_every_group_refuses_a_wrong_type_and_an_unknown_key(tmp_path, monkeypatch, dotted,
                                                             value, stage):
    parent, last = _valid_keys_of(dotted)
    monkeypatch.chdir(tmp_path)
    params = compose([])
    Path("params.yaml").write_text(yaml.safe_dump(_changed(params, dotted, value)))
    with pytest.raises(ConfigError) as info:
        load_params()
    message = str(info.value)
    assert message.startswith(f"params.yaml: wrong type for '{dotted}'") and "\n" not in message
    assert f"valid keys under {parent}: " in message and last in message.split("valid keys")[1]
    Path("params.yaml").write_text(yaml.safe_dump(_changed(params, dotted, None, typo=True)))
    with pytest.raises(ConfigError) as info:
        load_params()
    message = str(info.value)
    assert f"unknown key '{dotted}{dotted[-1]}'" in message, message
    assert f"valid keys under {parent}: " in message and last in message.split("valid keys")[1]


def _stage(module: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1"}
    env.pop("PIPELINE_VERBOSE", None)
    return subprocess.run([sys.executable, "-m", f"pipeline.stages.{module}",
                           *STAGE_ARGS.get(module, [])], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("dotted,value,stage", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_stage_refuses_a_bad_params_yaml_in_one_line(tmp_path, dotted, value, stage):
    """Every stage module, run as DVC runs it, stops on the params of its group before any
    work: one ``error:`` line naming the key and the valid keys (a wrong type for half of the
    groups, an unknown key for the others)."""
    parent, last = _valid_keys_of(dotted)
    typo = BAD_VALUES.index((dotted, value, stage)) % 2 == 1
    bad = _changed(compose([]), dotted, value, typo=typo)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
    proc = _stage(stage, tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    expected = (f"error: params.yaml: unknown key '{dotted}{dotted[-1]}'" if typo
                else f"error: params.yaml: wrong type for '{dotted}'")
    assert lines[-1].startswith(expected), lines[-1]
    assert f"valid keys under {parent}: " in lines[-1] and last in lines[-1].split("valid keys")[1]
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]


def test_missing_key_and_unknown_kind_name_the_fix():
    params = compose([])
    del params["export"]["opset"]
    with pytest.raises(ConfigError, match=r"missing key 'export.opset' \(valid keys under export: "
                                          r".*opset.*python -m pipeline.core.config"):
        validate(params, "params.yaml")
    with pytest.raises(ConfigError, match=r"dataset.kind='videos' is unknown \(valid: .*lus_vid"):
        validate({"dataset": {**params["dataset"], "kind": "videos"}})
    with pytest.raises(ConfigError, match=r"losses.ce.name='cee' is unknown \(valid: ce, focal\)"):
        validate({"losses": {"ce": {**params["losses"]["ce"], "name": "cee"}}})
    with pytest.raises(ConfigError, match=r"unknown key 'models.resnet50.stem' .*arch, freeze"):
        validate({"models": {"resnet50": {**params["models"]["resnet50"], "stem": "cifar"}}})
    rules = [{"pattern": "^(p\\d+)_", "grop": "\\1"}]
    with pytest.raises(ConfigError, match=r"unknown key 'dataset.patient_rules\[\].grop' "
                                          r"\(valid keys under dataset.patient_rules\[\]: group"):
        validate({"dataset": {**params["dataset"], "patient_rules": rules}})


def test_values_convert_to_their_declared_type():
    params = compose([])
    checked = validate({"train": {**params["train"], "epochs": "3"},
                        "export": {**params["export"], "tolerance": {
                            **params["export"]["tolerance"], "onnx": 1}}})
    assert checked["train"]["epochs"] == 3
    assert checked["export"]["tolerance"]["onnx"] == 1.0
    assert isinstance(checked["export"]["tolerance"]["onnx"], float)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
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


def test_wrong_type_in_an_override_is_a_config_error():
    with pytest.raises(ConfigError, match=r"wrong type for 'train.epochs'.*valid keys under "
                                          r"train: .*epochs"):
        compose(["train.epochs=abc"])
    with pytest.raises(ConfigError, match=r"wrong type for 'train.epochs'"):
        apply_overrides(compose([]), ["train.epochs=abc"])


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


def test_queued_experiment_workspace_resolves_to_the_checkout(tmp_path, monkeypatch):
    inner = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    inner.mkdir(parents=True)
    assert main_repo_root(inner) == tmp_path / "repo"
    assert main_repo_root(tmp_path / "repo") == tmp_path / "repo"
    # The working directory decides, not DVC's DVC_ROOT variable.
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "elsewhere"))
    monkeypatch.chdir(inner)
    assert main_repo_root() == tmp_path / "repo"


def _dvc_project(root: Path) -> Path:
    """A DVC checkout with the project's conf/ (Hydra composition on) and one real stage,
    ``fetch_data``, whose source folder is git-ignored: a ``dvc exp run --temp`` workspace (a
    copy of the commit under .dvc/tmp/exps/) finds it only through the checkout holding it."""
    shutil.copytree(ROOT / "conf", root / "conf")
    write_pinned_source(root)
    ds_file = root / "conf" / "dataset" / "lus_convex.yaml"
    ds = yaml.safe_load(ds_file.read_text())
    ds.update(sources=["src"], checksums="sums.sha256")
    ds_file.write_text(yaml.safe_dump(ds, sort_keys=False))
    stage = {"cmd": "python -m pipeline.stages.fetch_data", "deps": ["${dataset.checksums}"],
             "params": ["dataset.checksums", "dataset.sources", "seed"],
             "outs": ["${dataset.raw_dir}", {"data/fetch.json": {"cache": False}}]}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"fetch_data": stage}}))
    (root / ".gitignore").write_text("/src/\n")
    composed = _run([sys.executable, "-m", "pipeline.core.config"], root)
    (root / "params.yaml").write_text(composed.stdout)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"],
                ["dvc", "config", "hydra.enabled", "true"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@localhost", "-c", "user.name=t", "commit", "-qm", "i"]):
        out = _run(cmd, root)
        assert out.returncode == 0, out.stderr
    return root


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_dvc_exp_run_set_refuses_typos_and_wrong_types(tmp_path):
    """``dvc exp run -S`` composes conf/ in DVC's process: an unknown key stops there (Hydra's
    struct check); an added key (``+``) or a wrong type reaches params.yaml, and the stage
    refuses it in one line that lists the valid keys. A good override runs in a temporary
    workspace whose relative data source resolves against the checkout."""
    project = _dvc_project(tmp_path / "project")
    ok = _run(["dvc", "exp", "run", "--temp", "-S", "seed=7"], project)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-3000:]
    assert "took 2 files" in ok.stdout + ok.stderr

    typed = _run(["dvc", "exp", "run", "--temp", "-S", "dataset.workers=many"], project)
    text = typed.stdout + typed.stderr
    assert typed.returncode != 0
    assert ("error: params.yaml: wrong type for 'dataset.workers': Value 'many' of type 'str' "
            "could not be converted to Integer; expected int (valid keys under dataset: ") in text
    assert "workers" in text.split("valid keys under dataset: ")[1]

    added = _run(["dvc", "exp", "run", "--temp", "-S", "+dataset.worker=3"], project)
    text = added.stdout + added.stderr
    assert added.returncode != 0
    assert "error: params.yaml: unknown key 'dataset.worker' (valid keys under dataset: " in text

    typo = _run(["dvc", "exp", "run", "--temp", "-S", "dataset.worker=3"], project)
    assert typo.returncode != 0 and "Key 'worker' is not in struct" in typo.stderr
    assert "Running stage" not in typo.stdout
    check = _run([sys.executable, "-m", "pipeline.core.config", "check", "dataset.worker=3"],
                 project)
    assert check.returncode == 2 and "valid keys" in check.stderr and "workers" in check.stderr
