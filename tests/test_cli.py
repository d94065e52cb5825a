"""User errors end in one ``error:`` line and exit 2 (``pipeline.core.cli.run_main``), through the real
``python -m pipeline.<stage>`` commands: a config typo (with the valid keys), an altered or
missing source file, a missing checksum list; the traceback only with PIPELINE_VERBOSE=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.cli import UserError, run_main
from tests.conftest import PROJECT_ROOT, write_pinned_source


def stage(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "PIPELINE_VERBOSE"}
    full_env.update(PYTHONPATH=str(PROJECT_ROOT), DVC_NO_ANALYTICS="1", **env)
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=120)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The last stderr line, checked to be the only ``error:`` line and no traceback before it."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]], proc.stderr
    return lines[-1]


def test_config_typo_names_the_valid_keys(tmp_path):
    line = error_line(stage(["pipeline.core.config", "check", "tran.epochs=3"], PROJECT_ROOT))
    assert line.startswith("error: override 'tran.epochs=3': unknown config key 'tran.epochs'")
    assert "valid keys: " in line and "train" in line.split("valid keys: ")[1]
    line = error_line(stage(["pipeline.core.config", "experiment=papper"], PROJECT_ROOT))
    assert "no option 'papper' in conf/experiment/" in line and "paper" in line
    ok = stage(["pipeline.core.config", "check", "train.epochs=3"], PROJECT_ROOT)
    assert ok.returncode == 0 and ok.stdout == "" and "ok" in ok.stderr


def test_verbose_shows_the_traceback_too(tmp_path):
    proc = stage(["pipeline.core.config", "check", "tran.epochs=3"], PROJECT_ROOT, PIPELINE_VERBOSE="1")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: override 'tran.epochs=3'")
    flag = stage(["pipeline.core.config", "check", "--verbose", "tran.epochs=3"], PROJECT_ROOT)
    assert flag.returncode == 2 and "Traceback" in flag.stderr


def fetch_project(root: Path) -> Path:
    """A project whose only source is a folder pinned by a checksum list."""
    src = write_pinned_source(root)
    from pipeline.core.config import compose

    params = {"dataset": {**compose([])["dataset"], "sources": [str(src)],
                          "checksums": "sums.sha256", "raw_dir": "data/raw"}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return src


def test_fetch_altered_missing_source_file_and_list(tmp_path):
    src = fetch_project(tmp_path)
    assert stage(["pipeline.stages.fetch_data"], tmp_path).returncode == 0  # intact: taken
    (src / "pocus_videos/convex/Cov_a.mp4").write_bytes(b"tampered")
    line = error_line(stage(["pipeline.stages.fetch_data"], tmp_path))
    assert "altered file pocus_videos/convex/Cov_a.mp4" in line and "dataset.sources" in line
    (src / "pocus_videos/convex/Cov_a.mp4").unlink()
    line = error_line(stage(["pipeline.stages.fetch_data"], tmp_path))
    assert "missing file pocus_videos/convex/Cov_a.mp4" in line and "Restore the files" in line
    (tmp_path / "sums.sha256").unlink()
    line = error_line(stage(["pipeline.stages.fetch_data"], tmp_path))
    assert "sums.sha256 (dataset.checksums) not found" in line and "--write-checksums" in line


def test_run_main_exit_codes_and_condensed_message(capsys):
    class Details(UserError):
        details = "see data/frames/manifest.csv"

    def fails(argv):
        raise Details("3 input problems in x\n  a: bad\n  b: bad")

    with pytest.raises(SystemExit) as exit_:
        run_main(fails, [])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("error: 3 input problems in x [2 more line(s): see "
                                       "data/frames/manifest.csv]\n")
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda argv: 3, [])
    assert exit_.value.code == 3
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda argv: None, ["--verbose"])
    assert exit_.value.code == 0
    with pytest.raises(KeyError):  # a bug is not a user error: its traceback stays
        run_main(lambda argv: {}["x"], [])


@pytest.mark.parametrize("module", ["stages.fetch_data", "stages.extract_frames", "stages.train",
                                    "stages.evaluate", "grid"])
def test_stage_outside_a_checkout_names_params_yaml(tmp_path, module):
    args = ["model=mini_covidnet", "loss=ce"] if module == "stages.train" else []
    line = error_line(stage([f"pipeline.{module}", *args], tmp_path))
    assert "params.yaml not found" in line and "python -m pipeline.core.config > params.yaml" in line


def test_train_typo_lists_the_valid_keys_before_any_work():
    line = error_line(stage(["pipeline.stages.train", "model=mini_covidnet", "loss=ce", "tran.epochs=3"],
                            PROJECT_ROOT))
    assert line.startswith("error: unknown config key 'tran.epochs': 'tran' is not under <top "
                           "level> (valid keys: ")
    line = error_line(stage(["pipeline.stages.train", "model=mobilenet", "loss=ce"], PROJECT_ROOT))
    assert "unknown model 'mobilenet'" in line and "mini_covidnet" in line
