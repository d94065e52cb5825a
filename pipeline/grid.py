"""The training grid (grid.models x grid.losses x folds) as Ray tasks, one per (model, loss, fold).

``python -m pipeline.grid [--address local|auto|ray://host:port] [--gpus-per-task 1]
[--cpus-per-task 1] [--cells mini_covidnet-ce ...] [--folds 0 1 ...] [tracking.uri=...]``

Each task trains one fold with the ``train`` stage's own code in a fresh Python process (CUDA
state, memory and crashes stay in that process), on a GPU of its own when the cluster has GPUs:
Ray reserves ``--gpus-per-task`` and sets ``CUDA_VISIBLE_DEVICES``. When the folds of a cell are
done, ``pipeline.stages.train.summarize_cell`` writes ``models/<cell>/predictions.csv`` and
``metrics.json`` as the DVC stage does, and a ``run.json`` joins the folds' run records, so
``dvc commit`` can record the outputs and a later ``dvc repro`` finds them up to date.

One machine: ``--address local`` starts Ray there and uses all its GPUs. Several machines:
``ray start --head`` on one, ``ray start --address=<head>:6379`` on the others, then
``--address auto`` on the head. The project directory (code, ``params.yaml``, ``data/``,
``models/``, ``.cache/``) must then be on a filesystem that every node mounts at the same path:
tasks read the frames and write their fold there. (Ray's ``runtime_env`` ``working_dir`` would
ship the code instead, but the frames and the trained folds would then have to travel back and
forth through the object store; this module implements only the shared-filesystem setup.) For
MLflow, the embedded SQLite store is valid on one machine only; several machines log to one
tracking server (``scripts/mlflow_server.sh``, then ``tracking.uri=http://<head>:5000``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import ConfigError, apply_overrides, get, load_params, select_run

log = logging.getLogger("pipeline.grid")

CODE_ROOT = Path(__file__).resolve().parent.parent
# Per-task scratch under the project (on the shared filesystem, ignored by git and DVC).
STAGING_DIR = Path(".cache/grid")
LOG_TAIL_CHARS = 3000

# One fold with the stage's code (``pipeline.stages.train.run``), written under a private out_root: the
# folds of one cell finishing at the same time would otherwise race on the cell's
# predictions.csv / metrics.json / run.json, which the driver writes once all folds are in.
FOLD_SCRIPT = """\
import logging, sys
from pathlib import Path
from pipeline.core.config import apply_overrides, load_params
from pipeline.stages.train import run
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
model, loss, fold, out_root = sys.argv[1:5]
run(apply_overrides(load_params(), sys.argv[5:]), model, loss, [int(fold)], out_root=Path(out_root))
"""


@dataclass(frozen=True)
class FoldTask:
    """One (model, loss, fold) of the grid."""

    model: str
    loss: str
    fold: int

    @property
    def cell(self) -> str:
        return f"{self.model}-{self.loss}"

    def __str__(self) -> str:
        return f"{self.cell} fold {self.fold}"


def plan_tasks(params: Mapping, cells: Sequence[str] | None = None,
               folds: Sequence[int] | None = None) -> list[FoldTask]:
    """The grid's (model, loss, fold) tasks, optionally narrowed to some cells and folds.

    Raises:
        ConfigError: a cell or fold that is not in the grid of ``params``.
    """
    grid = [(m, l) for m in get(params, "grid.models") for l in get(params, "grid.losses")]
    names = [f"{m}-{l}" for m, l in grid]
    unknown = sorted(set(cells or ()) - set(names))
    if unknown:
        raise ConfigError(f"cells {unknown} are not in the grid (grid.models x grid.losses: "
                          f"{', '.join(names)})")
    all_folds = [int(k) for k in get(params, "train.folds")]
    bad = sorted(set(folds or ()) - set(all_folds))
    if bad:
        raise ConfigError(f"folds {bad} are not in train.folds {all_folds}")
    for m, l in grid:
        select_run(params, m, l)  # an unknown model/loss fails here, before any task starts
    return [FoldTask(m, l, k) for (m, l), name in zip(grid, names) if not cells or name in cells
            for k in (folds if folds else all_folds)]


def check_overrides(overrides: Sequence[str]) -> None:
    """Allow only overrides that the ``train`` stage does not track.

    A trained fold must match ``params.yaml``: ``dvc commit`` records its values as the ones the
    outputs came from. ``tracking.*`` changes where runs are logged, not what is trained.
    """
    for item in overrides:
        if not item.startswith("tracking."):
            raise ConfigError(f"override '{item}': only tracking.* can be overridden here; put "
                              f"training parameters into params.yaml (`python -m pipeline.core.config "
                              f"<overrides> > params.yaml`) so that DVC records what was trained")


def train_fold_task(project_dir: str, task: FoldTask, overrides: Sequence[str],
                    code_root: str, gpus: float, cpus: float) -> dict[str, Any]:
    """Body of the Ray task: train one fold in a subprocess and move it into ``models/<cell>/``.

    Returns a record of where and how it ran (``ok``, ``returncode``, ``log_tail``, node, host,
    GPU ids, seconds, and the fold's run record); a failed training is a record with
    ``ok=False``, not an exception, so the driver can show its log.
    """
    import ray

    project = Path(project_dir)
    staging = project / STAGING_DIR / task.cell
    out_root = staging / f"fold_{task.fold}"
    log_path = staging / f"fold_{task.fold}.log"
    shutil.rmtree(out_root, ignore_errors=True)  # what a killed earlier attempt left
    out_root.mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [code_root, os.environ.get("PYTHONPATH")])),
           # torch would use every core of the node otherwise, against the other tasks there.
           "OMP_NUM_THREADS": str(max(1, int(cpus))), "MKL_NUM_THREADS": str(max(1, int(cpus)))}
    if not gpus:
        # Ray leaves CUDA_VISIBLE_DEVICES alone for a task without GPUs: every such task on a GPU
        # node would pick cuda:0. No GPU reserved means no GPU used.
        env["CUDA_VISIBLE_DEVICES"] = ""
    ctx = ray.get_runtime_context()
    record: dict[str, Any] = {"task": task, "node_id": ctx.get_node_id(),
                              "host": socket.gethostname(), "gpu_ids": list(ray.get_gpu_ids()),
                              "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
                              "log": str(log_path)}
    started = time.monotonic()
    cmd = [sys.executable, "-c", FOLD_SCRIPT, task.model, task.loss, str(task.fold),
           str(out_root), *overrides]
    with log_path.open("w") as out:
        proc = subprocess.run(cmd, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
    record.update(returncode=proc.returncode, seconds=time.monotonic() - started,
                  ok=proc.returncode == 0)
    if not record["ok"]:
        text = log_path.read_text(errors="replace")
        record["log_tail"] = text[-LOG_TAIL_CHARS:]
        return record
    fold_dir = project / "models" / task.cell / f"fold_{task.fold}"
    fold_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(fold_dir, ignore_errors=True)
    os.replace(out_root / task.cell / f"fold_{task.fold}", fold_dir)
    run_info = json.loads((out_root / task.cell / "run.json").read_text())
    run_info["grid"] = {k: record[k] for k in ("node_id", "host", "gpu_ids", "seconds")}
    # Kept beside the staging folder: the cell's run.json joins its folds' records, also those
    # of folds trained by an earlier grid run (a rerun of the failed ones).
    (staging / f"fold_{task.fold}.json").write_text(json.dumps(run_info, indent=2) + "\n")
    shutil.rmtree(out_root)
    record["run_info"] = run_info
    return record


def cell_run_info(records: Sequence[Mapping], folds: Sequence[int]) -> dict:
    """The cell's ``run.json`` from its folds' records (each a ``run.json`` of one fold).

    Fields that differ between folds (a cluster of mixed GPUs) are joined with ", ";
    ``wall_seconds`` is the folds' sum, what one process training them in turn would report.
    """
    def joined(key: str) -> Any:
        values = sorted({str(r.get(key)) for r in records})
        return records[0].get(key) if len(values) == 1 else ", ".join(values)

    info = dict(records[0])
    info.pop("grid", None)
    info.update(folds=list(folds), device=joined("device"), device_name=joined("device_name"),
                torch=joined("torch"), wall_seconds=sum(float(r["wall_seconds"]) for r in records))
    reasons = sorted({r["mlflow"]["skipped_reason"] for r in records} - {""})
    info["mlflow"] = {"enabled": all(r["mlflow"]["enabled"] for r in records),
                      "skipped_reason": "; ".join(reasons)}
    info["grid"] = {str(r["folds"][0]): r["grid"] for r in records if "grid" in r}
    return info


def summarize_cells(project_dir: Path, params: Mapping, cells: Sequence[str]) -> list[str]:
    """Write ``predictions.csv``, ``metrics.json`` and ``run.json`` of every cell whose folds
    (``train.folds``) are all trained; returns the cells that still miss folds."""
    from pipeline.stages.train import summarize_cell

    folds = [int(k) for k in get(params, "train.folds")]
    classes = list(get(params, "dataset.classes"))
    incomplete = []
    for cell in cells:
        out_dir = project_dir / "models" / cell
        missing = [k for k in folds
                   if not (out_dir / f"fold_{k}" / "test_predictions.csv").is_file()]
        if missing:
            log.warning("%s: folds %s are not trained; cell not summarized", cell, missing)
            incomplete.append(cell)
            continue
        extra = sorted(p.name for p in out_dir.glob("fold_*")
                       if p.name not in {f"fold_{k}" for k in folds})
        if extra:
            log.warning("%s: %s are not in train.folds but DVC will record them with the cell; "
                        "remove them before `dvc commit`", cell, extra)
        metrics, _ = summarize_cell(out_dir, folds, classes)
        staging = project_dir / STAGING_DIR / cell
        records = [json.loads((staging / f"fold_{k}.json").read_text()) for k in folds
                   if (staging / f"fold_{k}.json").is_file()]
        if records:
            (out_dir / "run.json").write_text(json.dumps(cell_run_info(records, folds), indent=2)
                                              + "\n")
        log.info("%s: pooled accuracy %.3f over folds %s", cell, metrics["accuracy"], folds)
    return incomplete


def warm_frame_cache(project_dir: Path, params: Mapping) -> None:
    """Decode the frames once before the tasks start, instead of once per task at the same time."""
    from pipeline.data.loading import CACHE_DIR, cached_frames, used_frames

    frames_dir = project_dir / get(params, "dataset.frames_dir")
    # Same names and size as FrameStore, so the same cache key as the tasks compute.
    cached_frames(frames_dir, list(used_frames(frames_dir)["frame"]),
                  int(get(params, "train.image_size")), cache_dir=project_dir / CACHE_DIR)


def _connect(address: str) -> bool:
    """Connect to (or start) Ray; returns whether this call did, so the caller shuts it down."""
    import ray

    if ray.is_initialized():
        return False
    if address == "local":
        # The dashboard needs ray[default]; this pipeline installs plain ray.
        ray.init(address="local", include_dashboard=False)
    else:
        ray.init(address=address)
    return True


def run_grid(project_dir: str | Path = ".", *, address: str = "local",
             cells: Sequence[str] | None = None, folds: Sequence[int] | None = None,
             gpus_per_task: float | None = None, cpus_per_task: float = 1.0,
             overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Train the grid's folds as Ray tasks, then summarize every cell whose folds are all in.

    Args:
        project_dir: The project (``params.yaml``, ``data/``, ``models/``), at the same path on
            every node.
        address: ``local`` (start Ray on this machine), ``auto`` (the cluster this machine
            joined with ``ray start``) or ``ray://host:port`` (Ray Client).
        cells: ``<model>-<loss>`` cells to run (default: the whole grid).
        folds: Folds to run (default: ``train.folds``); the other folds of a cell must already
            be trained for it to be summarized.
        gpus_per_task: GPUs reserved per task (default: 1 when the cluster has GPUs, else 0);
            a fraction such as 0.5 packs several trainings on one GPU.
        cpus_per_task: CPUs reserved per task; also the task's torch thread count.
        overrides: ``tracking.*=value`` overrides passed to every training.

    Returns:
        One record per task, in completion order (see ``train_fold_task``).
    """
    project_dir = Path(project_dir).resolve()
    check_overrides(overrides)
    params = apply_overrides(load_params(project_dir / "params.yaml"), overrides)
    tasks = plan_tasks(params, cells, folds)
    import ray  # only the grid needs Ray: the DVC stages run without it

    started_ray = _connect(address)
    try:
        if gpus_per_task is None:
            gpus_per_task = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
        if gpus_per_task and not ray.cluster_resources().get("GPU", 0):
            raise ConfigError(f"--gpus-per-task {gpus_per_task} but the Ray cluster has no GPU")
        warm_frame_cache(project_dir, params)
        remote = ray.remote(train_fold_task).options(num_gpus=gpus_per_task,
                                                     num_cpus=cpus_per_task)
        pending = {remote.remote(str(project_dir), t, list(overrides), str(CODE_ROOT),
                                 gpus_per_task, cpus_per_task): t for t in tasks}
        log.info("grid: %d tasks (%d cells), %s GPU and %s CPU each, on %s", len(tasks),
                 len({t.cell for t in tasks}), gpus_per_task, cpus_per_task,
                 ", ".join(f"{k}={v:g}" for k, v in sorted(ray.cluster_resources().items())
                           if k in ("CPU", "GPU")))
        records: list[dict[str, Any]] = []
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(ref)
            try:
                record = ray.get(ref)
            except ray.exceptions.RayError as exc:  # a lost node or worker, reported as a failure
                record = {"task": task, "ok": False, "returncode": None, "host": "?",
                          "log_tail": f"{type(exc).__name__}: {exc}"[-LOG_TAIL_CHARS:]}
            records.append(record)
            n = f"[{len(records)}/{len(tasks)}]"
            if record["ok"]:
                log.info("%s done   %s in %.0f s on %s (node %s, GPU %s)", n, task,
                         record["seconds"], record["host"], record["node_id"][:8],
                         record["gpu_ids"] or "none")
            else:
                log.error("%s FAILED %s (exit %s) on %s, log %s:\n%s", n, task,
                          record["returncode"], record["host"], record.get("log", "-"),
                          record["log_tail"])
    finally:
        if started_ray:
            ray.shutdown()
    # A cell with a failed fold keeps its old summary: an older fold_<k> left in its folder must
    # not be summarized as if it were this run's.
    failed = {r["task"].cell for r in records if not r["ok"]}
    summarize_cells(project_dir, params, sorted({t.cell for t in tasks} - failed))
    return records


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: run the grid; exit non-zero when any training failed (after all have finished)."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    # key=value overrides may stand anywhere, also after --folds 0 1 (which argparse would eat).
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.grid", description=__doc__.split("\n")[0],
        epilog="Further arguments tracking.KEY=VALUE are passed to every training.")
    parser.add_argument("--address", default="local",
                        help="local (start Ray here; default), auto (the cluster this machine "
                             "joined with `ray start`) or ray://host:port")
    parser.add_argument("--gpus-per-task", type=float, default=None,
                        help="GPUs per training (default: 1 if the cluster has GPUs, else 0)")
    parser.add_argument("--cpus-per-task", type=float, default=1.0)
    parser.add_argument("--cells", nargs="+", default=None, metavar="MODEL-LOSS")
    parser.add_argument("--folds", nargs="+", type=int, default=None)
    parser.add_argument("--project-dir", default=".")
    args = parser.parse_args([a for a in argv if a not in overrides])
    records = run_grid(args.project_dir, address=args.address, cells=args.cells, folds=args.folds,
                       gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task,
                       overrides=overrides)
    failed = [r for r in records if not r["ok"]]
    if failed:
        sys.exit(f"{len(failed)} of {len(records)} trainings failed: "
                 + ", ".join(str(r["task"]) for r in failed))


if __name__ == "__main__":
    # Through the importable module, so Ray ships its functions by reference, not __main__'s.
    from pipeline import grid
    from pipeline.core.cli import run_main

    run_main(grid.main)
