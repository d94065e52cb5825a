"""Tracking failures and a real store: with the MLflow store unreachable, read-only or failing
mid-run, training still writes its outputs and says tracking was skipped (``tracking.required``
turns that into an error before any training); on a real SQLite store the runs land as a parent
with one child per fold and flattened params. Also the security defaults: no home paths or
credentials in ``params.yaml`` or a tracked run, and ``scripts/mlflow_ui.sh`` binds to
localhost unless told otherwise."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import compose
from pipeline.core.tracking import TrackingError, free_port
from tests.conftest import PROJECT_ROOT, TRAIN_CMD, make_tiny_project, project_env

pytestmark = pytest.mark.usefixtures("mlflow_state")

FORBIDDEN = ("/root", "/home/", "password", "token")


@pytest.fixture
def fast_http_failure(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")


def read_only_sqlite(tmp_path: Path) -> str:
    """A SQLite path in a directory that cannot be written. Root ignores permission bits, so
    then the directory is /proc, which refuses new files to everyone."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:
        ro = Path("/proc")
    return f"sqlite:///{ro / 'mlflow.db'}"


@pytest.fixture
def fast_sqlite_failure(monkeypatch):
    """Cut the waits before an unopenable SQLite store reports its error, so these tests check
    the Tracker's handling, not the waits (``test_read_only_store_fails_fast`` covers those):
    the Tracker's schema lock polls a lock file it cannot create for 120 s, and MLflow then
    retries the engine 10 times with backoff (about 100 s)."""
    import filelock
    import mlflow.store.db.utils

    import pipeline.core.tracking

    monkeypatch.setattr(mlflow.store.db.utils, "MAX_RETRY_COUNT", 1)
    monkeypatch.setattr(pipeline.core.tracking, "FileLock",
                        lambda path, timeout=-1: filelock.FileLock(path, timeout=min(timeout, 1)),
                        raising=False)


def train(project: Path, params: dict, monkeypatch, folds: list[int]) -> dict:
    from pipeline.stages.train import run

    with monkeypatch.context() as m:
        m.chdir(project)
        return run(params, "mini_covidnet", "ce", folds)


def _store(kind: str, tmp_path: Path) -> str:
    return (f"http://127.0.0.1:{free_port()}" if kind == "unreachable"
            else read_only_sqlite(tmp_path))


@pytest.mark.parametrize("kind", ["unreachable", "read_only"])
def test_broken_store_skips_tracking_but_not_training(tmp_path, monkeypatch, caplog,
                                                      fast_http_failure, fast_sqlite_failure, kind):
    params = make_tiny_project(tmp_path, epochs=1, tracking_uri=_store(kind, tmp_path))
    with caplog.at_level(logging.WARNING, logger="pipeline.core.tracking"):
        train(tmp_path, params, monkeypatch, [0])
    cell = tmp_path / "models" / "mini_covidnet-ce"
    for name in ("fold_0/best.pt", "fold_0/metrics.json", "fold_0/test_predictions.csv",
                 "predictions.csv", "metrics.json"):
        assert (cell / name).is_file(), name
    info = json.loads((cell / "run.json").read_text())["mlflow"]
    assert info["enabled"] is False and info["skipped_reason"]
    warned = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert any("tracking SKIPPED" in m and "outputs are still written" in m for m in warned)


@pytest.mark.parametrize("kind", ["unreachable", "read_only"])
def test_required_tracking_fails_before_training(tmp_path, monkeypatch, fast_http_failure,
                                                 fast_sqlite_failure, kind):
    params = make_tiny_project(tmp_path, epochs=1, tracking_uri=_store(kind, tmp_path),
                               required=True)
    with pytest.raises(TrackingError, match="tracking.required"):
        train(tmp_path, params, monkeypatch, [0])
    assert not list((tmp_path / "models").rglob("*.pt"))
    assert not (tmp_path / "models" / "mini_covidnet-ce" / "fold_0").exists()


@pytest.fixture
def mlflow_http_defaults(monkeypatch):
    """No MLFLOW_HTTP_* variables: only the project's tracking.max_retries / timeout_s bound
    the waits (MLflow's own defaults took 4.5 minutes on a closed port)."""
    for name in list(os.environ):
        if name.startswith("MLFLOW_HTTP_REQUEST"):
            monkeypatch.delenv(name)


def test_unreachable_server_costs_seconds_and_says_so_once(tmp_path, monkeypatch, caplog,
                                                           mlflow_http_defaults):
    """The default config (conf/config.yaml) and a server that is down: tracking is given up
    within seconds of the start, said once with the reason, and training goes on."""
    uri = f"http://127.0.0.1:{free_port()}"
    params = make_tiny_project(tmp_path, epochs=1, tracking_uri=uri)
    started = time.time()
    with caplog.at_level(logging.WARNING):
        train(tmp_path, params, monkeypatch, [0])
    skipped = [r for r in caplog.records if "tracking SKIPPED" in r.getMessage()]
    assert len(skipped) == 1
    given_up_s = skipped[0].created - started
    print(f"\ntracking given up after {given_up_s:.2f} s (required=false, {uri})")
    assert given_up_s < 15
    assert "cannot connect to 127.0.0.1" in skipped[0].getMessage()
    assert not [r for r in caplog.records if r.name.startswith("urllib3")], "HTTP retries ran"
    cell = tmp_path / "models" / "mini_covidnet-ce"
    assert (cell / "fold_0" / "best.pt").is_file()
    info = json.loads((cell / "run.json").read_text())["mlflow"]
    assert info["enabled"] is False and "cannot connect" in info["skipped_reason"]


def test_required_but_unreachable_is_one_error_line(tmp_path):
    """``python -m pipeline.stages.train`` with tracking.required and the server down: exit 2, one
    ``error:`` line naming the URI, the key and the fix, no traceback, no training."""
    uri = f"http://127.0.0.1:{free_port()}"
    make_tiny_project(tmp_path, epochs=1, tracking_uri=uri, required=True)
    env = {k: v for k, v in project_env().items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    started = time.monotonic()
    proc = subprocess.run(TRAIN_CMD, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    wall = time.monotonic() - started
    print(f"\nrequired=true: exit {proc.returncode} after {wall:.1f} s (imports included)")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert lines[-1].startswith(f"error: MLflow tracking to {uri} failed and tracking.required "
                                f"is set: ConnectionError: cannot connect to 127.0.0.1")
    assert "tracking.required=false" in lines[-1]
    assert not (tmp_path / "models" / "mini_covidnet-ce" / "fold_0").exists()
    assert wall < 60  # imports of torch & co. (~10 s on a loaded 2-core machine) + seconds


@pytest.mark.parametrize("limits", [{"max_retries": 1, "timeout_s": 1}, "defaults"])
def test_hung_server_is_bounded_by_the_configured_retries_and_timeout(mlflow_http_defaults,
                                                                      limits):
    """A server that accepts connections but never answers: each MLflow request waits
    tracking.timeout_s, retried tracking.max_retries times, then tracking is skipped; with the
    defaults of conf/config.yaml that stays under 15 s (MLflow's own: 7 x 120 s + backoff)."""
    from pipeline.core.tracking import Tracker

    cfg = {**compose([])["tracking"], **({} if limits == "defaults" else limits)}
    attempts = cfg["max_retries"] + 1
    with socket.socket() as server:  # listening, never accepting: the request hangs
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        started = time.monotonic()
        tracker = Tracker({**cfg, "uri": uri, "experiment": "x"})
        elapsed = time.monotonic() - started
    print(f"\nhung server, max_retries={cfg['max_retries']}, timeout_s={cfg['timeout_s']}: "
          f"skipped after {elapsed:.1f} s")
    assert not tracker.enabled
    assert f"read timeout={cfg['timeout_s']}" in tracker.reason
    assert attempts * cfg["timeout_s"] <= elapsed < 15, elapsed  # every attempt waited, no more
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ  # restored after the calls


def test_read_only_store_fails_fast(tmp_path):
    code = ("from pipeline.core.tracking import Tracker; "
            f"t = Tracker({{'uri': {read_only_sqlite(tmp_path)!r}, 'experiment': 'x', 'required': False}}); "
            "assert not t.enabled")
    # 30 s: the imports (slow on a loaded machine) plus a prompt failure, far below 100 s.
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=30,
                   env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})


def test_store_failing_mid_run_is_survived(tmp_path, monkeypatch, caplog):
    import mlflow

    params = make_tiny_project(tmp_path, epochs=2)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mlflow, "log_metrics", full_disk)  # the store works until the 1st epoch
    with caplog.at_level(logging.WARNING, logger="pipeline.core.tracking"):
        train(tmp_path, params, monkeypatch, [0])
    info = json.loads((tmp_path / "models" / "mini_covidnet-ce" / "run.json").read_text())
    assert info["mlflow"] == {"enabled": False,
                              "skipped_reason": "OSError: [Errno 28] No space left on device"}
    assert (tmp_path / "models" / "mini_covidnet-ce" / "fold_0" / "best.pt").is_file()
    assert any("tracking SKIPPED" in r.message for r in caplog.records)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> dict:
    """One real training (2 folds, 2 epochs) tracked into a SQLite store; returns its runs."""
    import mlflow
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("tracked")
    params = make_tiny_project(root, epochs=2, folds=(0, 1))
    mp = pytest.MonkeyPatch()
    try:
        train(root, params, mp, [0, 1])
    finally:
        mp.undo()
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
    client = MlflowClient(params["tracking"]["uri"])
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])
    runs = client.search_runs([exp.experiment_id])
    return {"root": root, "params": params, "client": client, "runs": runs}


def test_runs_land_as_parent_and_children_with_flat_params(tracked_run):
    runs, client = tracked_run["runs"], tracked_run["client"]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.run_name == "mini_covidnet-ce" and parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.info.run_name for c in children) == ["fold_0", "fold_1"]
    assert {c.data.tags["fold"] for c in children} == {"0", "1"}
    assert all(c.info.status == "FINISHED" for c in children)

    p = parent.data.params
    assert p["model.head.hidden"] == "128" and p["train.optimizer.lr"] == "0.001"
    assert p["folds.k"] == "2" and p["train.image_size"] == "32"
    assert json.loads(p["train.folds"]) == [0, 1]  # lists as JSON, not Python reprs
    assert not any(v.startswith("{") for v in p.values()), "a nested dict was logged unflattened"
    assert {"model", "loss", "git_revision", "profile", "leaky_validation"} <= set(parent.data.tags)
    assert {"accuracy", "macro_f1", "wall_seconds"} <= set(parent.data.metrics)

    child = children[0]
    history = client.get_metric_history(child.info.run_id, "val_loss")
    assert [m.step for m in history] == [0, 1]  # one value per epoch
    assert "test.accuracy" in child.data.metrics
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert "confusion_matrix.json" in artifacts


def _leaks(text: str) -> list[str]:
    low = text.lower()
    home = str(Path.home())
    found = [s for s in FORBIDDEN if s in low]
    return found + ([home] if home not in ("/", "") and home in text else [])


def _strings(node, key: str = "") -> Iterator[tuple[str, str]]:
    """Every string value of a nested config, with its dotted key."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{key}[{i}]")
    elif isinstance(node, str):
        yield key, node


def test_no_home_paths_or_credentials_in_params():
    for name, text in (("params.yaml", (PROJECT_ROOT / "params.yaml").read_text()),
                       ("compose([])", yaml.safe_dump(compose([]))),
                       ("experiment=paper", yaml.safe_dump(compose(["experiment=paper"])))):
        assert not _leaks(text), (name, _leaks(text))
        # Paths in params are relative to the checkout (or URLs): nothing names this machine.
        absolute = [(k, v) for k, v in _strings(yaml.safe_load(text))
                    if v.startswith(("/", "~")) or v[1:3] == ":\\"]
        assert not absolute, (name, absolute)


def test_no_home_paths_or_credentials_in_tracked_run(tracked_run):
    for run in tracked_run["runs"]:
        for kind, values in (("param", run.data.params), ("tag", run.data.tags)):
            for key, value in values.items():
                assert not _leaks(f"{key}={value}"), (run.info.run_name, kind, key, value)


def test_no_absolute_checkout_path_in_tracked_run(tracked_run):
    roots = {str(PROJECT_ROOT), str(tracked_run["root"])}
    bad = [(r.info.run_name, k, v) for r in tracked_run["runs"]
           for k, v in {**r.data.params, **r.data.tags}.items() if any(x in v for x in roots)]
    assert not bad, bad


def _ui_command(env: dict[str, str]) -> list[str]:
    out = subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "mlflow_ui.sh")],
                         env={**os.environ, "MLFLOW_UI_DRY_RUN": "1", **env},
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return out.strip().split("\n")[-1].split()


def test_mlflow_ui_binds_to_localhost_by_default():
    cmd = _ui_command({"MLFLOW_HOST": ""})  # empty counts as unset
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{PROJECT_ROOT}/mlruns/mlflow.db"
    assert cmd[cmd.index("--default-artifact-root") + 1] == f"{PROJECT_ROOT}/mlruns/artifacts"
    assert "--disable-security-middleware" not in cmd
    cmd = _ui_command({"MLFLOW_HOST": "0.0.0.0", "MLFLOW_PORT": "5123"})
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "5123"
