"""Many trainings outside ``dvc repro``.

The grid (grid.models x grid.losses x train.folds) trains as one process per (model, loss,
fold), written where the DVC ``train`` stage writes.

``python -m pipeline.grid [--backend ray|local] ...`` trains the grid here:

* ``ray`` (default): Ray tasks, each on a GPU of its own (``--gpus-per-task``), on this machine
  (``--address local``) or a cluster (``--address auto``; the project on a filesystem every node
  mounts at the same path, MLflow on a tracking server, ``tracking.uri=http://<head>:5000``);
* ``local``: processes on this machine without Ray, ``--parallel N`` at a time spread over its
  GPUs (``--gpus 0,1``; several per GPU when N exceeds them).

When the folds of a cell are done, its ``predictions.csv``, ``metrics.json`` and ``run.json``
are written as the stage does, so ``dvc commit train@<cell>`` records them and ``dvc repro``
finds them up to date. Training parameters come from ``params.yaml`` only; ``tracking.*=...``
may be given on the command line.

For a machine without DVC, MLflow or network (``pipeline.grid.offline``)::

    python -m pipeline.grid bundle --out grid_bundle.tar [--wheels DIR]   # here
    tar xf grid_bundle.tar -C B && python B/run.py --parallel 12          # there
    python -m pipeline.grid merge results.tar [--store reports/paper_gpu] # here, then dvc commit

``report-paper`` and ``report-experiment`` regenerate the committed GPU reports from their runs
store or archive (``pipeline.grid.runs_store``, ``pipeline.grid.archive_report``); ``latency``
times the models at the study's input size (``pipeline.grid.latency``); ``export-paper`` puts
paper-trained fold models that came back from a session through the export stage's code
(``pipeline.grid.paper_export``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.core.config import apply_overrides, load_params
from pipeline.grid.backends import run_backend
from pipeline.grid.tasks import (
    FoldTask,
    check_overrides,
    check_training_inputs,
    plan_tasks,
    summarize_cells,
    warm_frame_cache,
)

__all__ = ["FoldTask", "plan_tasks", "run_grid"]

log = logging.getLogger("pipeline.grid")


def run_grid(project_dir: str | Path = ".", *, backend: str = "ray",
             cells: Sequence[str] | None = None, folds: Sequence[int] | None = None,
             overrides: Sequence[str] = (), **options: Any) -> list[dict[str, Any]]:
    """Train the grid's folds, then summarize every cell whose folds are all in.

    Args:
        project_dir: The project (``params.yaml``, ``data/``, ``models/``).
        backend: ``ray`` or ``local``.
        cells: ``<model>-<loss>`` cells to run (default: the whole grid).
        folds: Folds to run (default: ``train.folds``); the other folds of a cell must already
            be trained for it to be summarized.
        overrides: ``tracking.*=value`` overrides passed to every training.
        **options: The backend's own (``run_ray``: address, gpus_per_task, cpus_per_task;
            ``run_local``: parallel, gpus, cpus_per_task).

    Returns:
        One record per task, in completion order (see ``tasks.train_fold``).
    """
    project = Path(project_dir).resolve()
    check_overrides(overrides)
    params = apply_overrides(load_params(project / "params.yaml"), overrides)
    tasks = plan_tasks(params, cells, folds)
    check_training_inputs(project, params)
    warm_frame_cache(project, params)
    records = run_backend(backend, project, tasks, overrides, options)
    finish_cells(project, params, tasks, records)
    return records


def finish_cells(project: Path, params: Mapping, tasks: Sequence[FoldTask],
                 records: Sequence[Mapping]) -> list[str]:
    """Summarize the cells of ``tasks`` none of whose folds failed; returns the others.

    A cell with a failed fold keeps its old summary: an older fold_<k> left in its folder must
    not be summarized as if it were this run's.
    """
    done = {r["task"] for r in records if r["ok"]}
    failed = sorted({t.cell for t in tasks if t not in done})
    summarize_cells(project, params, sorted({t.cell for t in tasks} - set(failed)))
    return failed
