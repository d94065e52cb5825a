"""The grid's backends and its offline round trip, on tiny real projects.

Ray: a real cluster of two worker nodes on this machine; every (cell, fold) task trains on a
worker (the head has no CPU for them), the folds come back into ``models/<cell>/`` with the
cell's summary, every task's MLflow runs reach the one store, and ``dvc commit`` of the real
``train`` stage makes a later ``dvc repro`` rerun nothing. Local: two folds train in two
processes at the same time. Offline: bundle here, run in another directory with neither ``dvc``
nor ``mlflow`` on PATH (and their imports blocked), merge back, ``dvc commit``, ``dvc status``
clean.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import PROJECT_ROOT, make_tiny_project

pytestmark = pytest.mark.slow

CELLS = ["mini_covidnet-ce", "mini_covidnet-focal"]
FOLDS = [0, 1]
OBJECT_STORE_BYTES = 80 * 1024**2  # the minimum Ray accepts; the tasks pass only small records
FOLD_FILES = {"best.pt", "history.csv", "test_predictions.csv", "val_predictions.csv", "metrics.json"}


@pytest.fixture(scope="module")
def ray_cluster():
    """A head (no CPUs, so no task runs there) and two 1-CPU worker nodes, all on 127.0.0.1.

    Yields the cluster's address and the worker nodes' ids.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_DISABLE_USAGE_STATS", "1")
        # Ray swaps 127.0.0.1 for the machine's network address when it connects; this keeps
        # every node and the driver on the loopback (read when ray is imported, so set before).
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        pytest.importorskip("ray")
        import ray
        from ray.cluster_utils import Cluster

        node = {"object_store_memory": OBJECT_STORE_BYTES, "node_ip_address": "127.0.0.1"}
        cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                          head_node_args={"num_cpus": 0, "include_dashboard": False, **node})
        try:
            workers = [cluster.add_node(num_cpus=1, **node) for _ in range(2)]
            cluster.wait_for_nodes()
            yield cluster.address, {w.node_id for w in workers}
        finally:
            ray.shutdown()
            cluster.shutdown()


def _dvc(cwd: Path, *args: str) -> str:
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"
    proc = subprocess.run([dvc, *args], cwd=cwd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _tiny_dvc_project(root: Path, losses: tuple[str, ...] = ("ce", "focal")) -> Path:
    """``make_tiny_project`` (1 epoch, 32 px, 2 folds) with the grid narrowed to Mini-COVIDNet
    with ``losses``, the code the train stage depends on, and the real ``train`` stage of
    ``dvc.yaml``."""
    store = root / "mlruns" / "mlflow.db"
    params = make_tiny_project(root, epochs=1, folds=tuple(FOLDS),
                               tracking_uri=f"sqlite:///{store}")
    params["grid"] = {"models": ["mini_covidnet"], "losses": list(losses)}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(PROJECT_ROOT / "pipeline", root / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    stage = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]["train"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}, sort_keys=False))
    _dvc(root, "init", "--no-scm", "-q")
    return store


def test_grid_on_two_ray_nodes_then_dvc_commit(tmp_path, ray_cluster):
    from pipeline.grid import run_grid

    address, worker_ids = ray_cluster
    project = tmp_path / "project"
    store = _tiny_dvc_project(project)

    records = run_grid(project, address=address, cpus_per_task=1)

    assert all(r["ok"] for r in records), [r.get("log_tail") for r in records if not r["ok"]]
    assert sorted((r["task"].cell, r["task"].fold) for r in records) == \
           sorted((c, k) for c in CELLS for k in FOLDS)
    # Every task ran on a worker, and both workers got tasks.
    assert {r["node_id"] for r in records} == worker_ids

    for cell in CELLS:
        d = project / "models" / cell
        files = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}
        # What the DVC train stage writes, and nothing else.
        assert files == {f"fold_{k}/{f}" for k in FOLDS for f in FOLD_FILES} | \
                        {"predictions.csv", "metrics.json", "run.json"}
        preds = pd.read_csv(d / "predictions.csv")
        assert sorted(preds["fold"].unique()) == FOLDS
        assert 0.0 <= json.loads((d / "metrics.json").read_text())["accuracy"] <= 1.0
        info = json.loads((d / "run.json").read_text())
        assert info["folds"] == FOLDS and info["mlflow"]["enabled"]
        assert {g["node_id"] for g in info["grid"].values()} <= worker_ids
    assert not list((project / ".cache" / "grid").glob("*/fold_*/"))  # staging cleaned up

    # Every task's runs arrived in the one store: a parent per (cell, fold) task with its fold.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("lus_convex").experiment_id])
    parents = {r.info.run_id: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(f"{r.data.tags['model']}-{r.data.tags['loss']}" for r in parents.values()) == \
           sorted(CELLS * len(FOLDS))
    assert sorted((parents[c.data.tags["mlflow.parentRunId"]].info.run_name, c.data.tags["fold"])
                  for c in children) == sorted((c, str(k)) for c in CELLS for k in FOLDS)
    assert all("test.accuracy" in c.data.metrics for c in children)

    # DVC: the grid's outputs are not yet recorded; `dvc commit` records them with the current
    # deps and params, after which the stage is up to date and `dvc repro` trains nothing.
    stages = [f"train@{c}" for c in CELLS]
    assert set(json.loads(_dvc(project, "status", "--json"))) == set(stages)
    _dvc(project, "commit", "-f", *stages)
    assert json.loads(_dvc(project, "status", "--json")) == {}
    before = (project / "models" / CELLS[0] / "fold_0" / "best.pt").stat().st_mtime_ns
    out = _dvc(project, "repro")
    assert "Running stage" not in out, out
    assert (project / "models" / CELLS[0] / "fold_0" / "best.pt").stat().st_mtime_ns == before


def test_failed_task_is_reported_and_fails_the_command(tmp_path, ray_cluster, caplog):
    """One cell's training fails: the other still finishes and is summarized, the failure is
    logged with its log tail, and the command exits non-zero."""
    from pipeline.grid.__main__ import main

    address, _ = ray_cluster
    project = tmp_path / "project"
    params = make_tiny_project(project, epochs=1, folds=(0,),
                               tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    params["grid"] = {"models": ["mini_covidnet"], "losses": ["ce", "focal"]}
    # Valid params (the command checks them before any task), but a loss the task cannot build:
    # two class weights for three classes.
    params["losses"]["focal"]["alpha"] = [1.0, 2.0]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    with pytest.raises(SystemExit) as exit_info:
        main(["--address", address, "--project-dir", str(project)])
    assert exit_info.value.code not in (0, None)
    assert "mini_covidnet-focal fold 0" in str(exit_info.value.code)
    failure = next(r for r in caplog.records if "FAILED" in r.getMessage())
    assert "mini_covidnet-focal fold 0" in failure.getMessage()
    assert "has 2 weights" in failure.getMessage()  # the training's own error, from its log
    assert (project / "models" / "mini_covidnet-ce" / "metrics.json").is_file()
    assert not (project / "models" / "mini_covidnet-focal").exists()


def test_local_backend_trains_two_folds_in_parallel_processes(tmp_path):
    from pipeline.grid import run_grid

    project = tmp_path / "project"
    _tiny_dvc_project(project, losses=("ce",))

    records = run_grid(project, backend="local", parallel=2, gpus=[], cpus_per_task=1)

    assert all(r["ok"] for r in records), [r.get("log_tail") for r in records if not r["ok"]]
    assert sorted(r["task"].fold for r in records) == FOLDS
    a, b = records
    assert a["pid"] != b["pid"]
    # Both trainings ran at the same time: each started before the other ended.
    assert a["started"] < b["ended"] and b["started"] < a["ended"]
    assert {r["cuda_visible_devices"] for r in records} == {""}  # no GPU asked for: none used
    cell = project / "models" / "mini_covidnet-ce"
    assert sorted(pd.read_csv(cell / "predictions.csv")["fold"].unique()) == FOLDS
    assert json.loads((cell / "run.json").read_text())["folds"] == FOLDS


def _probe_wheel(directory: Path) -> Path:
    """A real (tiny) wheel, for the bundle's offline install."""
    import zipfile

    directory.mkdir()
    path = directory / "offline_probe-1.0-py3-none-any.whl"
    meta = "offline_probe-1.0.dist-info"
    files = {"offline_probe.py": "VALUE = 42\n",
             f"{meta}/METADATA": "Metadata-Version: 2.1\nName: offline-probe\nVersion: 1.0\n",
             f"{meta}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{meta}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{meta}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return directory


def test_offline_round_trip_bundle_run_elsewhere_merge_then_dvc_clean(tmp_path):
    """bundle -> run in another directory without DVC/MLflow -> merge -> dvc commit/status."""
    import tarfile

    from pipeline.core.cli import UserError
    from pipeline.grid.merge import merge
    from pipeline.grid.offline import bundle

    project = tmp_path / "project"
    _tiny_dvc_project(project, losses=("ce",))
    archive = tmp_path / "grid_bundle.tar"
    record = bundle(project, archive, wheels=_probe_wheel(tmp_path / "wheels"))
    assert record["jobs"] == 2 and record["wheels"] == ["offline_probe-1.0-py3-none-any.whl"]

    there = tmp_path / "airgapped"
    there.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(there, filter="data")
    bundle_dir = there / "grid_bundle"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"
    assert shutil.which("dvc", path=env["PATH"]) is None
    assert shutil.which("mlflow", path=env["PATH"]) is None
    proc = subprocess.run([sys.executable, str(bundle_dir / "run.py"), "--parallel", "2",
                           "--gpus", "none", "--cpus-per-task", "1",
                           "--throughput", "--models mini_covidnet --batch-sizes 4 --steps 2"],
                          cwd=there, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (bundle_dir / ".site" / "offline_probe.py").is_file()  # the wheel, installed there

    results = bundle_dir / "results.tar"
    with tarfile.open(results) as tar:
        names = set(tar.getnames())
        info = json.loads(tar.extractfile("models/mini_covidnet-ce/fold_0.json").read())
        done = tar.extractfile("done.txt").read().decode().splitlines()
        throughput = tar.extractfile("throughput.json").read()
    assert {f"models/mini_covidnet-ce/fold_{k}/{f}" for k in FOLDS for f in FOLD_FILES} <= names
    assert {f"logs/train_mini_covidnet-ce-{k}.log" for k in FOLDS} <= names
    assert json.loads(throughput)["image_size"] == 32  # the benchmark, on the bundle's frames
    assert sorted(line.split()[1:] for line in done) == \
        [["mini_covidnet", "ce", str(k), "exit", "0"] for k in FOLDS]
    # MLflow was not imported there: the training's tracker says why it skipped.
    assert not info["mlflow"]["enabled"]
    assert "mlflow is not used in an offline grid run" in info["mlflow"]["skipped_reason"]

    # Trained with other parameters than the checkout's: refused, naming the key.
    params = yaml.safe_load((project / "params.yaml").read_text())
    changed = {**params, "train": {**params["train"], "epochs": 2}}
    (project / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    with pytest.raises(UserError, match="params.yaml differs in train"):
        merge(results, project)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # Other folds here than the ones trained on: refused too.
    splits = project / "data" / "folds" / "splits.csv"
    original = splits.read_bytes()
    splits.write_bytes(original + b"\n")
    with pytest.raises(UserError, match="the splits here differ"):
        merge(results, project)
    splits.write_bytes(original)
    assert not (project / "models").exists()

    out = merge(results, project)
    assert out["cells"] == ["mini_covidnet-ce"] and len(out["placed"]) == 2
    cell = project / "models" / "mini_covidnet-ce"
    files = {str(p.relative_to(cell)) for p in cell.rglob("*") if p.is_file()}
    assert files == {f"fold_{k}/{f}" for k in FOLDS for f in FOLD_FILES} | \
                    {"predictions.csv", "metrics.json", "run.json"}
    assert json.loads((cell / "run.json").read_text())["folds"] == FOLDS

    assert set(json.loads(_dvc(project, "status", "--json"))) == {"train@mini_covidnet-ce"}
    _dvc(project, "commit", "-f", "train@mini_covidnet-ce")
    assert json.loads(_dvc(project, "status", "--json")) == {}
    assert "Running stage" not in _dvc(project, "repro")


def test_offline_deadline_cuts_a_fold_off_and_brings_back_its_partial_history(tmp_path):
    """A bundle whose first fold cannot finish before ``--deadline``: the fold is killed, its
    per-epoch history so far comes back under ``partial/``, the other fold never starts, and
    ``merge`` places nothing."""
    import tarfile

    from pipeline.core.cli import UserError
    from pipeline.grid.merge import merge
    from pipeline.grid.offline import bundle

    project = tmp_path / "project"
    _tiny_dvc_project(project, losses=("ce",))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(epochs=100_000)
    params["train"]["early_stopping"]["patience"] = 100_000
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bundle(project, tmp_path / "b.tar")
    with tarfile.open(tmp_path / "b.tar") as tar:
        tar.extractall(tmp_path / "there", filter="data")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(tmp_path / "there" / "b" / "run.py"),
                           "--deadline", "45", "--gpus", "none"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # cut off is not a failure

    results = tmp_path / "there" / "b" / "results.tar"
    with tarfile.open(results) as tar:
        names = set(tar.getnames())
        text = {n: tar.extractfile(n).read().decode()
                for n in ("done.txt", "log.txt", "partial/mini_covidnet-ce-fold_0.csv")}
    assert not any(n.startswith("models/") for n in names)
    assert text["done.txt"].split()[1:] == ["mini_covidnet", "ce", "0", "exit", "cut", "off"]
    assert "1 not started" in text["log.txt"]
    history = pd.read_csv(io.StringIO(text["partial/mini_covidnet-ce-fold_0.csv"]))
    assert len(history) >= 1 and list(history["epoch"]) == list(range(len(history)))
    with pytest.raises(UserError, match="no models/"):
        merge(results, project)


def test_tasks_follow_the_order_of_the_cells_asked_for():
    """``--cells`` in the order a local run should start them (rows that finish first go
    first); without it, the grid's order; an unknown cell is refused by name."""
    from pipeline.core.config import ConfigError, compose
    from pipeline.grid.tasks import plan_tasks

    params = compose(["experiment=paper"])
    tasks = plan_tasks(params, ["pocovidnet-focal", "mini_covidnet-ce", "pocovidnet-focal"], [0, 1])
    assert [str(t) for t in tasks] == ["pocovidnet-focal fold 0", "pocovidnet-focal fold 1",
                                       "mini_covidnet-ce fold 0", "mini_covidnet-ce fold 1"]
    assert [t.cell for t in plan_tasks(params)][::5][:3] == \
        ["mini_covidnet-ce", "mini_covidnet-focal", "mobilenet_v2-ce"]
    with pytest.raises(ConfigError, match="nasnet-ce"):
        plan_tasks(params, ["nasnet-ce"])
