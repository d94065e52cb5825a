"""MLflow tracking that never costs a run its outputs.

The store defaults to an embedded SQLite database in the user's checkout (``mlruns/mlflow.db``,
artifacts beside it), resolved through ``main_repo_root`` so that runs from
``dvc exp run --queue/--temp`` (which work in a copy DVC deletes) land in the main store. If the
store is unreachable or read-only, training goes on and says once that tracking was skipped and
why, unless ``tracking.required`` is set (then a one-line :class:`TrackingError`).

A remote store costs seconds, not minutes, when it is down: an http(s) URI is first probed with
one TCP connection within ``tracking.timeout_s``, and MLflow's own HTTP calls run with
``tracking.max_retries`` retries and ``tracking.timeout_s`` per request (MLflow's defaults, 7
retries with exponential backoff and 120 s, took 4.5 minutes to give up on a closed port). Null
leaves MLflow's ``MLFLOW_HTTP_REQUEST_*`` environment variables or defaults in charge.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock

from pipeline.core.cli import UserError
from pipeline.core.config import main_repo_root

# Set before mlflow is imported anywhere: no telemetry from a reproducible pipeline.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

log = logging.getLogger("pipeline.core.tracking")


class TrackingError(RuntimeError, UserError):
    """The MLflow store could not be used and ``tracking.required`` is set."""


def http_limits(cfg: Mapping) -> dict[str, str]:
    """MLflow's HTTP environment variables for ``tracking.max_retries`` / ``tracking.timeout_s``
    (MLflow reads them at every request; its timeout is a whole number of seconds)."""
    env = {}
    if cfg.get("max_retries") is not None:
        env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(max(0, int(cfg["max_retries"])))
    if cfg.get("timeout_s") is not None:
        env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(float(cfg["timeout_s"]))))
    return env


@contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a block (MLflow calls), then restore."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def probe(uri: str, timeout_s: float | None) -> None:
    """Fail fast if an http(s) tracking server cannot even be connected to.

    Raises:
        ConnectionError: no TCP connection to the URI's host and port within ``timeout_s``.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    timeout = float(timeout_s) if timeout_s else 10.0
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise ConnectionError(f"cannot connect to {parts.hostname}:{port} within {timeout:g} s "
                              f"({why})") from exc


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (free when returned): where to start a
    local server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, proc: subprocess.Popen | None = None,
                    timeout_s: float = 120) -> None:
    """Return once the MLflow server (or UI) at ``url`` answers ``/health``.

    Raises:
        TrackingError: ``proc`` (the server, when started by the caller) exited, or no answer
            came within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise TrackingError(f"the MLflow server for {url} exited with {proc.returncode}")
        if time.monotonic() >= deadline:
            raise TrackingError(f"no MLflow server answering at {url} within {timeout_s:.0f} s")
        time.sleep(1)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def store_location(uri: str | None) -> tuple[str, str | None]:
    """Tracking URI and artifact root: the configured URI, or the embedded default."""
    if uri:
        return uri, None
    root = main_repo_root() / "mlruns"
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested params -> ``a.b.c`` keys (``log_params`` does not flatten)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=main_repo_root()).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Tracker:
    """A parent run with child runs; every call is a no-op once tracking is disabled."""

    def __init__(self, cfg: Mapping):
        self.required = bool(cfg.get("required", False))  # keys left out: MLflow's own behaviour
        self.enabled = True
        self.reason = ""
        self.env = http_limits(cfg)
        uri, artifacts = store_location(cfg.get("uri"))
        self.uri = uri
        self.experiment = str(cfg.get("experiment") or "default")
        try:
            probe(uri, cfg.get("timeout_s"))
            import mlflow

            self.mlflow = mlflow
            name = self.experiment
            if uri.startswith("sqlite:///"):
                db = Path(uri.removeprefix("sqlite:///"))
                db.parent.mkdir(parents=True, exist_ok=True)
                open(db, "ab").close()  # a read-only store fails here, at once, not at the lock
                # Parallel workers (dvc queue -j N, several trainings on one GPU) would otherwise
                # race on creating the schema ("duplicate column") and the experiment.
                with FileLock(str(db) + ".lock", timeout=120):
                    self._open(mlflow, uri, name, artifacts)
            else:
                with _environ(self.env):
                    self._open(mlflow, uri, name, artifacts)
            log.info("MLflow tracking to %s (experiment %s)", uri, name)
        except Exception as exc:  # noqa: BLE001 - any store failure is handled the same way
            self._disable(exc)

    @staticmethod
    def _open(mlflow, uri: str, name: str, artifacts: str | None) -> None:
        mlflow.set_tracking_uri(uri)
        if mlflow.get_experiment_by_name(name) is None:
            try:
                mlflow.create_experiment(name, artifact_location=artifacts)
            except Exception:  # another client of a shared server created it meanwhile
                if mlflow.get_experiment_by_name(name) is None:
                    raise
        mlflow.set_experiment(name)

    def _disable(self, exc: BaseException) -> None:
        reason = _one_line(exc)
        if self.required:
            raise TrackingError(
                f"MLflow tracking to {self.uri} failed and tracking.required is set: {reason}; "
                f"start the server or fix tracking.uri, or set tracking.required=false to train "
                f"without tracking") from exc
        self.enabled = False
        self.reason = reason
        log.warning("MLflow tracking SKIPPED (outputs are still written): %s", self.reason)

    def _call(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return None
        return self.safely(getattr(self.mlflow, fn), *args, **kwargs)

    def safely(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` under the HTTP limits; a failure disables tracking (or raises
        :class:`TrackingError` when required) and returns None."""
        if not self.enabled:
            return None
        try:
            with _environ(self.env):
                return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self._disable(exc)
            return None

    @contextmanager
    def run(self, name: str, *, nested: bool = False, tags: Mapping[str, str] | None = None
            ) -> Iterator[None]:
        # MLflow would tag the entry script's absolute path (a home folder, a user name).
        tags = {"mlflow.source.name": "pipeline/stages/train.py", **dict(tags or {})}
        active = self._call("start_run", run_name=name, nested=nested, tags=tags)
        try:
            yield
        finally:
            if active is not None and self.enabled:
                self._call("end_run")

    @contextmanager
    def resume(self, run_id: str) -> Iterator[None]:
        """Reopen a finished run (a later stage adding its results to the training run)."""
        active = self._call("start_run", run_id=run_id)
        try:
            yield
        finally:
            if active is not None and self.enabled:
                self._call("end_run")

    def find_parent(self, tags: Mapping[str, str], prefer: Mapping[str, str]) -> str | None:
        """The id of the top-level run of this experiment carrying every tag in ``tags``; among
        several, the one matching most of ``prefer``, then the newest. None if there is none."""
        if not self.enabled:
            return None
        where = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
        runs = self._call("search_runs", experiment_names=[self.experiment], filter_string=where,
                          order_by=["attributes.start_time DESC"], output_format="list")
        runs = [r for r in runs or [] if "mlflow.parentRunId" not in r.data.tags]
        if not runs:
            return None
        best = max(runs, key=lambda r: (sum(r.data.tags.get(k) == v for k, v in prefer.items()),
                                        r.info.start_time))
        return best.info.run_id

    def log_params(self, params: Mapping) -> None:
        flat = {k: ("" if v is None else str(v))[:6000] for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._call("log_params", dict(items[i:i + 100]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        clean = {k.replace("@", "_"): float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and v == v}
        self._call("log_metrics", clean, step=step)

    def log_dict(self, data: Any, name: str) -> None:
        self._call("log_dict", data, name)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", str(path), artifact_path)

    def log_table(self, table: Any, name: str) -> None:
        self._call("log_table", table, name)

    def log_input(self, dataset: Any, context: str, tags: Mapping[str, str] | None = None) -> None:
        self._call("log_input", dataset, context=context, tags=dict(tags or {}))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._call("set_tags", dict(tags))

    def set_experiment_tags(self, tags: Mapping[str, str]) -> None:
        self._call("set_experiment_tags", dict(tags))


def standard_tags(params: Mapping, **extra: str) -> dict[str, str]:
    """Tags every run carries: code revision, DVC experiment, profile."""
    tags = {"git_revision": git_revision(), "profile": str(params.get("profile", "")),
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "workspace")}
    tags.update({k: str(v) for k, v in extra.items()})
    return tags
