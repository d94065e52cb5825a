"""Screenshot of what a reviewer sees: one (model, loss) run's page in the MLflow UI, rendered by
headless Chromium (Debian's ``chromium`` package).

    python scripts/mlflow_screenshot.py [--uri URI] [--experiment lus_convex]
        [--cell mini_covidnet-ce] [--tab overview|model-metrics|artifacts] [--out PNG]

``--uri`` is a running tracking server (http://...) or a store (``sqlite:///...``, by default
the checkout's ``mlruns/mlflow.db``), for which a ``mlflow ui`` is started on a free port of
127.0.0.1 for the shot and stopped afterwards. The run is the newest top-level run tagged with
the cell.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.core.tracking import TrackingError, free_port, wait_for_server

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def ui_for(uri: str) -> Iterator[str]:
    """An http URL serving ``uri``: the URI itself, or a ``mlflow ui`` started for a store."""
    if uri.startswith(("http://", "https://")):
        yield uri.rstrip("/")
        return
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen([str(mlflow_bin), "ui", "--backend-store-uri", uri, "--host",
                             "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_server(url, proc)
        except TrackingError as exc:
            sys.exit(f"error: {exc}")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def run_page(uri: str, experiment: str, cell: str) -> str:
    """``#/experiments/<id>/runs/<id>`` of the newest top-level run of the cell."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        sys.exit(f"error: no experiment {experiment!r} at {uri}: run `dvc repro` first, or pass "
                 f"--experiment")
    runs = [r for r in client.search_runs([exp.experiment_id], f"tags.cell = '{cell}'",
                                          order_by=["attributes.start_time DESC"])
            if "mlflow.parentRunId" not in r.data.tags]
    if not runs:
        sys.exit(f"error: no run tagged cell={cell!r} in experiment {experiment!r}: pass --cell "
                 f"<model>-<loss> of the grid")
    return f"#/experiments/{exp.experiment_id}/runs/{runs[0].info.run_id}"


def screenshot(url: str, out: Path, width: int, height: int, wait_ms: int) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("error: chromium not found: `apt-get install chromium` (Debian's package)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", f"--user-data-dir={profile}",
                        f"--window-size={width},{height}", f"--virtual-time-budget={wait_ms}",
                        f"--screenshot={out.resolve()}", url],
                       check=True, capture_output=True, timeout=180)
    if not out.is_file() or out.stat().st_size < 10_000:
        sys.exit(f"error: chromium wrote no screenshot at {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", default=f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}")
    parser.add_argument("--experiment", default="lus_convex")
    parser.add_argument("--cell", default="mini_covidnet-ce")
    parser.add_argument("--tab", default="overview",
                        help="the run page's tab: overview, model-metrics, artifacts")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "mlflow_run_page.png")
    parser.add_argument("--size", default="2400x1800", help="window WIDTHxHEIGHT")
    parser.add_argument("--wait-ms", type=int, default=20000, help="time the page gets to render")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    with ui_for(args.uri) as url:
        page = run_page(url, args.experiment, args.cell)
        if args.tab != "overview":
            page += f"/{args.tab}"
        page += "?workflowType=machine_learning"  # the UI's model-training view, not GenAI
        screenshot(f"{url}/{page}", args.out, width, height, args.wait_ms)
    print(f"wrote {args.out} ({url}/{page})")


if __name__ == "__main__":
    main()
