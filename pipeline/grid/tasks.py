"""The grid's tasks: which (model, loss, fold) to train, one fold trained in a process of its own,
and the cell summaries written once all folds of a cell are in.

Every backend trains a fold the same way (:func:`train_fold`): the ``train`` stage's own code
(``pipeline.stages.train.run``) in a fresh Python process, so CUDA state, memory and crashes stay
in that process, under a private output folder; the finished fold then moves into
``models/<cell>/fold_<k>/`` and its run record into ``.cache/grid/<cell>/fold_<k>.json``, from
which :func:`summarize_cells` writes the cell's ``predictions.csv``, ``metrics.json`` and
``run.json`` as the DVC stage does.
"""

from __future__ import annotations

import contextlib
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

from pipeline.core.cli import UserError
from pipeline.core.config import ConfigError, get, select_run

log = logging.getLogger("pipeline.grid")

CODE_ROOT = Path(__file__).resolve().parents[2]
# Per-task scratch under the project (ignored by git and DVC).
STAGING_DIR = Path(".cache/grid")
LOG_TAIL_CHARS = 3000
# Packages an offline fold must not import: the machine it runs on has neither, and a fold
# that imported them here would not prove that it runs there.
OFFLINE_BLOCKED = ("mlflow", "dvc")

# One fold with the stage's code, written under a private out_root: the folds of one cell
# finishing at the same time would otherwise race on the cell's predictions.csv / metrics.json /
# run.json, which the driver writes once all folds are in. argv: model loss fold out_root
# blocked(comma-separated top-level packages) overrides...
FOLD_SCRIPT = """\
import importlib.abc, sys
from pathlib import Path
model, loss, fold, out_root, blocked = sys.argv[1:6]
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked.split(","):
            raise ModuleNotFoundError(f"{name} is not used in an offline grid run", name=name)
if blocked:
    sys.meta_path.insert(0, Blocked())
from pipeline.core.cli import setup_logging
from pipeline.core.config import apply_overrides, load_params
from pipeline.stages.train import run
setup_logging()
run(apply_overrides(load_params(), sys.argv[6:]), model, loss, [int(fold)], out_root=Path(out_root))
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

    @property
    def name(self) -> str:
        """``<model>-<loss>-<fold>``: the task's log and job name."""
        return f"{self.cell}-{self.fold}"

    def __str__(self) -> str:
        return f"{self.cell} fold {self.fold}"


def plan_tasks(params: Mapping, cells: Sequence[str] | None = None,
               folds: Sequence[int] | None = None) -> list[FoldTask]:
    """The grid's (model, loss, fold) tasks, optionally narrowed to some cells and folds; in
    the order of ``cells`` when given (the order a local run starts them), else the grid's.

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
    by_name = dict(zip(names, grid))
    return [FoldTask(*by_name[name], k) for name in (dict.fromkeys(cells) if cells else names)
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


def fold_env(threads: int, cuda_visible_devices: str | None, code_root: str | Path) -> dict:
    """The environment of one fold's process: the code on its path, ``threads`` torch threads
    (torch would use every core otherwise, against the other trainings there), and the GPUs it
    may see (``""``: none; ``None``: what this process sees)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(code_root),
                                                       os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(max(1, threads)), "MKL_NUM_THREADS": str(max(1, threads))}
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    return env


def train_fold(project: Path, task: FoldTask, overrides: Sequence[str], env: Mapping[str, str],
               *, offline: bool = False, timeout_s: float | None = None,
               where: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train one fold in a subprocess and move it into ``models/<cell>/fold_<k>/``.

    Args:
        project: The project (``params.yaml``, frames, folds, audit report).
        task: The fold.
        overrides: ``tracking.*`` overrides for the training.
        env: The process environment (:func:`fold_env`).
        offline: Block imports of ``mlflow`` and ``dvc`` in the training (tracking then says
            why it was skipped).
        timeout_s: Kill the training after this many seconds (its resume state keeps the
            epochs done; the record says ``cut_off``).
        where: What the backend knows of where it ran (node, GPU ids), kept in the record.

    Returns:
        A record: ``ok``, ``returncode``, ``seconds``, ``started``/``ended`` (epoch seconds),
        ``pid``, ``log`` and, on failure, ``log_tail``; on success ``run_info`` (the fold's
        run record). A failed training is a record with ``ok=False``, not an exception.
    """
    staging = project / STAGING_DIR / task.cell
    out_root = staging / f"fold_{task.fold}"
    log_path = staging / f"fold_{task.fold}.log"
    shutil.rmtree(out_root, ignore_errors=True)  # what a killed earlier attempt left
    out_root.mkdir(parents=True)
    record: dict[str, Any] = {"task": task, "host": socket.gethostname(), "log": str(log_path),
                              "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
                              "cut_off": False, **dict(where or {})}
    blocked = ",".join(OFFLINE_BLOCKED) if offline else ""
    cmd = [sys.executable, "-c", FOLD_SCRIPT, task.model, task.loss, str(task.fold),
           str(out_root), blocked, *overrides]
    record["started"] = time.time()
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=project, env=dict(env), stdout=out,
                                stderr=subprocess.STDOUT)
        record["pid"] = proc.pid
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            record["cut_off"] = True
    record.update(returncode=proc.returncode, ended=time.time(),
                  ok=proc.returncode == 0 and not record["cut_off"])
    record["seconds"] = record["ended"] - record["started"]
    if not record["ok"]:
        record["log_tail"] = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        return record
    fold_dir = project / "models" / task.cell / f"fold_{task.fold}"
    fold_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(fold_dir, ignore_errors=True)
    os.replace(out_root / task.cell / f"fold_{task.fold}", fold_dir)
    run_info = json.loads((out_root / task.cell / "run.json").read_text())
    run_info["grid"] = {k: record[k] for k in ("host", "cuda_visible_devices", "seconds",
                                                *(where or {}))}
    write_fold_record(project, task, run_info)
    shutil.rmtree(out_root)
    record["run_info"] = run_info
    return record


def write_fold_record(project: Path, task: FoldTask, run_info: Mapping) -> Path:
    """Keep a fold's run record beside the staging folder: the cell's ``run.json`` joins its
    folds' records, also those of folds trained by an earlier grid run (a rerun of the failed
    ones) or merged from an offline run."""
    path = project / STAGING_DIR / task.cell / f"fold_{task.fold}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run_info, indent=2) + "\n")
    return path


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


def check_training_inputs(project: Path, params: Mapping) -> None:
    """Fail before any training starts where every one would: no frames, or folds that have
    not passed the leakage audit.

    Raises:
        UserError: naming the missing file or the failed audit, and the stage that makes it.
    """
    from pipeline.data.loading import audited_splits

    manifest = project / get(params, "dataset.frames_dir") / "manifest.csv"
    if not manifest.is_file():
        raise UserError(f"{manifest} not found: extract the frames first (`dvc repro audit` "
                        f"runs extract_frames, split_folds and the audit)")
    with contextlib.chdir(project):
        audited_splits(params)


def warm_frame_cache(project_dir: Path, params: Mapping) -> None:
    """Decode the frames once before the tasks start, instead of once per task at the same time."""
    from pipeline.data.loading import CACHE_DIR, cached_frames, interpolation_of, used_frames

    frames_dir = project_dir / get(params, "dataset.frames_dir")
    # Same names, size and interpolation as FrameStore, so the same cache key as the tasks compute.
    cached_frames(frames_dir, list(used_frames(frames_dir)["frame"]),
                  int(get(params, "train.image_size")), cache_dir=project_dir / CACHE_DIR,
                  interpolation=interpolation_of(get(params, "dataset")))


def log_record(record: Mapping, n_done: int, n_all: int) -> None:
    """One line per finished task; a failure with its log tail."""
    n = f"[{n_done}/{n_all}]"
    task = record["task"]
    where = record.get("host", "?")
    if record.get("node_id"):
        where += f" (node {record['node_id'][:8]}, GPU {record.get('gpu_ids') or 'none'})"
    elif record.get("cuda_visible_devices"):
        where += f" (GPU {record['cuda_visible_devices']})"
    if record["ok"]:
        log.info("%s done   %s in %.0f s on %s", n, task, record["seconds"], where)
    elif record.get("cut_off"):
        log.warning("%s CUT OFF %s at the deadline after %.0f s on %s (log %s)", n, task,
                    record["seconds"], where, record.get("log", "-"))
    else:
        log.error("%s FAILED %s (exit %s) on %s, log %s:\n%s", n, task, record["returncode"],
                  where, record.get("log", "-"), record["log_tail"])
