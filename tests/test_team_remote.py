"""Teams (docs/teams.md), end to end on real DVC, Git and MLflow: two clones of one project share
a bare Git repository, a local-folder DVC remote and one MLflow store. Clone A runs an experiment
in its workspace and a queued one, pushes both with `dvc exp push`; clone B pulls them, shows
their metrics, applies the queued one, and then holds its models (`predict` classifies a real
video with them), with `dvc status` clean, `dvc repro` a no-op and `dvc plots diff` drawing both.

The project is this one, shrunk: its code, conf/ and dvc.yaml up to `evaluate` (the later
stages export and benchmark models, which this test does not need), on 12 real files of the
lung-ultrasound data, 32 px, 1 epoch, 2 folds, one grid cell."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import LUS_SUBSET, copy_lus_subset, run

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

SUBSET = [*LUS_SUBSET, "dataset_metadata.csv"]
UNSEEN_VIDEO = "pocus_videos/convex/Cov_combatting_Image2.mp4"  # not in SUBSET
CELL = "mini_covidnet-ce"
LATER_STAGES = ("export", "benchmark", "binary_eval", "report")


def project_files() -> list[str]:
    """What a clone of the project has (committed or about to be), less the committed results."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    keep = ("pipeline/", "conf/", ".dvc/", "dvc.yaml", ".dvcignore")
    return [f for f in listed if (f.startswith(keep) or f.endswith(".gitignore"))
            and (ROOT / f).is_file() and "__pycache__" not in f]


def make_origin(base: Path, shared: Path) -> tuple[Path, Path]:
    """The team's bare Git repository holding the shrunk project, and its DVC remote folder."""
    data = base / "lus_subset"
    sums = copy_lus_subset(shared, data, SUBSET)
    proj = base / "seed"
    for f in project_files():
        (proj / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, proj / f)
    (proj / "data" / "subset.sha256").write_text(sums)
    stages = yaml.safe_load((proj / "dvc.yaml").read_text())
    for name in LATER_STAGES:
        del stages["stages"][name]
    (proj / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    conf = proj / "conf"
    edits = {
        "dataset/lus_convex.yaml": {"sources": [str(data)], "checksums": "data/subset.sha256",
                                    "frame_max_side": 64, "max_frames": 8, "workers": 1},
        "folds/patient_kfold.yaml": {"k": 2, "val_fraction": 0.34},
        "train/quick.yaml": {"image_size": 32, "epochs": 1, "batch_size": 8,
                             "max_frames_per_source": 4, "folds": [0, 1]},
    }
    for rel, changes in edits.items():
        cfg = yaml.safe_load((conf / rel).read_text())
        cfg.update(changes)
        (conf / rel).write_text(yaml.safe_dump(cfg, sort_keys=False))
    cfg = yaml.safe_load((conf / "config.yaml").read_text())
    cfg["grid"] = {"models": ["mini_covidnet"], "losses": ["ce"]}
    cfg["evaluate"]["bootstrap"] = 20
    # One store for the whole team (a tracking server in real life; here a SQLite file).
    cfg["tracking"]["uri"] = f"sqlite:///{base / 'team-mlflow.db'}"
    (conf / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (proj / "params.yaml").write_text(run([sys.executable, "-m", "pipeline.core.config"], proj))
    remote = base / "dvc-remote"
    remote.mkdir()
    run(["git", "init", "-q", "-b", "main"], proj)
    run(["dvc", "remote", "add", "-d", "team", str(remote)], proj)
    run(["git", "add", "-A"], proj)
    run(["git", "-c", "user.email=a@localhost", "-c", "user.name=a", "commit", "-qm", "init"], proj)
    origin = base / "origin.git"
    run(["git", "clone", "-q", "--bare", str(proj), str(origin)], base)
    return origin, remote


def clone(origin: Path, dest: Path, user: str) -> Path:
    run(["git", "clone", "-q", str(origin), str(dest)], origin.parent)
    run(["git", "config", "user.email", f"{user}@localhost"], dest)
    run(["git", "config", "user.name", user], dest)
    return dest


def wait_for_queue(repo: Path, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], repo)
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(3)
    raise AssertionError(f"queue still busy after {timeout} s:\n{status}")


def exp_metrics(shown: list[dict]) -> dict[str, dict]:
    """``{experiment name: reports/metrics.json}`` from ``dvc exp show --json``."""
    found = {}
    for entry in shown:
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = (rev.get("data") or {}).get("metrics") or {}
                if "reports/metrics.json" in data:
                    found[rev["name"]] = data["reports/metrics.json"]["data"]
    return found


def test_experiments_travel_between_clones(tmp_path):
    from tests.conftest import require_shared_lus

    shared = require_shared_lus()
    origin, remote = make_origin(tmp_path, shared)

    # Clone A: one experiment in the workspace, one through the queue; both pushed.
    a = clone(origin, tmp_path / "a", "alice")
    run(["dvc", "exp", "run", "-n", "exp-a"], a, timeout=900)
    run(["dvc", "exp", "run", "--queue", "-n", "exp-b", "-S", "seed=7"], a)
    run(["dvc", "queue", "start", "-j", "1"], a)
    status = wait_for_queue(a)
    assert "Success" in status and "Failed" not in status, status
    run(["dvc", "exp", "push", "origin", "exp-a", "exp-b"], a)
    assert any(remote.rglob("*")), "dvc exp push sent nothing to the DVC remote"
    metrics_a = exp_metrics(json.loads(run(["dvc", "exp", "show", "--json"], a)))

    # Clone B: finds both on the Git remote, pulls them with their outputs.
    b = clone(origin, tmp_path / "b", "bob")
    listed = run(["dvc", "exp", "list", "--name-only", "origin"], b)
    assert {"exp-a", "exp-b"} <= set(listed.split()), listed
    run(["dvc", "exp", "pull", "origin", "exp-a", "exp-b"], b)
    metrics_b = exp_metrics(json.loads(run(["dvc", "exp", "show", "--json"], b)))
    assert set(metrics_b) >= {"exp-a", "exp-b"}, metrics_b
    for name in ("exp-a", "exp-b"):
        assert metrics_b[name] == metrics_a[name]
        assert 0.0 <= metrics_b[name][CELL]["accuracy"] <= 1.0

    # The queued experiment's outputs came through the DVC remote: B's cache had nothing.
    run(["dvc", "exp", "apply", "exp-b"], b)
    run(["dvc", "pull"], b)
    folds = sorted(p.parent.name for p in (b / "models" / CELL).glob("fold_*/best.pt"))
    assert folds == ["fold_0", "fold_1"]
    assert yaml.safe_load((b / "params.yaml").read_text())["seed"] == 7
    on_disk = json.loads((b / "reports/metrics.json").read_text())[CELL]
    shown = metrics_a["exp-b"][CELL]  # `dvc exp show` leaves the list-valued CI out
    assert {k: on_disk[k] for k in shown} == shown
    assert json.loads(run(["dvc", "status", "--json"], b)) == {}
    assert "Running stage" not in run(["dvc", "repro"], b)

    predicted = json.loads(run([sys.executable, "-m", "pipeline.predict", str(shared / UNSEEN_VIDEO),
                                "--run", f"models/{CELL}", "--json"], b))
    video, = predicted["videos"]
    assert predicted["folds"] == [0, 1] and not predicted["errors"]
    assert video["n_frames"] > 0 and sum(video["probs"].values()) == pytest.approx(1.0)

    # Both experiments, side by side in every chart: confusion and ROC of the cell, training
    # curves of each fold.
    plots = json.loads(run(["dvc", "plots", "diff", "exp-a", "exp-b", "--json"], b))["data"]
    curves = {f"reports/plots/training/{CELL}/fold_{k}.csv" for k in (0, 1)}
    ids = {f"reports/plots/confusion/{CELL}.csv", f"reports/plots/roc/{CELL}.csv", *curves}
    assert ids <= set(plots), sorted(plots)
    for plot_id in ids:
        values = plots[plot_id][0]["content"]["data"]["values"]
        assert {v["rev"] for v in values} == {"exp-a", "exp-b"}, plot_id
        if plot_id in curves:
            assert {v["field"] for v in values} == {"train_loss", "val_loss", "train_accuracy",
                                                    "val_accuracy"}

    # MLflow: both experiments' runs are in the team's store, found by the tag train sets.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'team-mlflow.db'}")
    experiment = client.get_experiment_by_name("lus_convex").experiment_id
    for name in ("exp-a", "exp-b"):
        runs = client.search_runs([experiment], f"tags.dvc_exp_name = '{name}'")
        assert [r.info.run_name for r in runs] == [f"{CELL} ({name})"]
        children = client.search_runs([experiment],
                                      f"tags.mlflow.parentRunId = '{runs[0].info.run_id}'")
        assert len(children) == 2  # one per fold
