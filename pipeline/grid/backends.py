"""Where the grid's folds train: ``ray`` (a Ray cluster, one task per fold) or ``local`` (processes
on this machine, several at a time, spread over its GPUs).

Both run :func:`pipeline.grid.tasks.train_fold` and return its records in completion order.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from pipeline.core.config import ConfigError
from pipeline.grid.tasks import (
    CODE_ROOT,
    LOG_TAIL_CHARS,
    FoldTask,
    fold_env,
    log_record,
    train_fold,
)

log = logging.getLogger("pipeline.grid")

OnDone = Callable[[dict[str, Any]], None]


def ray_fold_task(project_dir: str, task: FoldTask, overrides: Sequence[str], code_root: str,
                  gpus: float, cpus: float) -> dict[str, Any]:
    """Body of the Ray task: one fold on the GPUs Ray reserved for it."""
    import ray

    ctx = ray.get_runtime_context()
    # Ray leaves CUDA_VISIBLE_DEVICES alone for a task without GPUs: every such task on a GPU
    # node would pick cuda:0. No GPU reserved means no GPU used.
    env = fold_env(int(cpus), None if gpus else "", code_root)
    return train_fold(Path(project_dir), task, overrides, env,
                      where={"node_id": ctx.get_node_id(), "gpu_ids": list(ray.get_gpu_ids())})


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


def run_ray(project: Path, tasks: Sequence[FoldTask], overrides: Sequence[str], *,
            address: str = "local", gpus_per_task: float | None = None,
            cpus_per_task: float = 1.0) -> list[dict[str, Any]]:
    """Train ``tasks`` as Ray tasks.

    Args:
        address: ``local`` (start Ray on this machine), ``auto`` (the cluster this machine
            joined with ``ray start``) or ``ray://host:port`` (Ray Client). On a cluster the
            project must be at the same path on every node (a shared filesystem).
        gpus_per_task: GPUs reserved per task (default: 1 when the cluster has GPUs, else 0);
            a fraction such as 0.5 packs several trainings on one GPU.
        cpus_per_task: CPUs reserved per task; also the task's torch thread count.
    """
    import ray  # only this backend needs Ray

    started_ray = _connect(address)
    try:
        cluster = ray.cluster_resources()
        if gpus_per_task is None:
            gpus_per_task = 1.0 if cluster.get("GPU", 0) else 0.0
        if gpus_per_task and not cluster.get("GPU", 0):
            raise ConfigError(f"--gpus-per-task {gpus_per_task} but the Ray cluster has no GPU")
        remote = ray.remote(ray_fold_task).options(num_gpus=gpus_per_task, num_cpus=cpus_per_task)
        pending = {remote.remote(str(project), t, list(overrides), str(CODE_ROOT),
                                 gpus_per_task, cpus_per_task): t for t in tasks}
        log.info("grid (ray): %d tasks, %s GPU and %s CPU each, on %s", len(tasks),
                 gpus_per_task, cpus_per_task,
                 ", ".join(f"{k}={v:g}" for k, v in sorted(cluster.items()) if k in ("CPU", "GPU")))
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
            log_record(record, len(records), len(tasks))
    finally:
        if started_ray:
            ray.shutdown()
    return records


def visible_gpus() -> list[str]:
    """The GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else every GPU torch
    counts (none on a machine without CUDA)."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def local_slots(parallel: int, gpus: Sequence[str]) -> list[str]:
    """The device of each of ``parallel`` training slots: GPUs taken in turn (``parallel`` 8 on
    2 GPUs puts 4 trainings on each), or ``""`` (CPU) on a machine without GPUs."""
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel}: at least 1 training at a time")
    return [gpus[i % len(gpus)] if gpus else "" for i in range(parallel)]


def run_local(project: Path, tasks: Sequence[FoldTask], overrides: Sequence[str], *,
              parallel: int = 1, gpus: Sequence[str] | None = None,
              cpus_per_task: int | None = None, offline: bool = False,
              deadline_s: float | None = None, code_root: Path = CODE_ROOT,
              on_done: OnDone | None = None) -> list[dict[str, Any]]:
    """Train ``tasks`` as processes on this machine, ``parallel`` at a time, in list order.

    Args:
        parallel: Trainings at a time; spread over ``gpus`` (default: every visible GPU), so
            more than one per GPU shares it.
        cpus_per_task: Torch threads per training (default: this machine's cores / parallel).
        offline: Trainings must not import MLflow or DVC (:func:`train_fold`).
        deadline_s: Seconds from now after which running trainings are killed and no new one
            starts (their records say ``cut_off``; a task never started has no record).
        on_done: Called with each record as its training ends (from a worker thread).
    """
    slots: queue.Queue[str] = queue.Queue()
    devices = local_slots(parallel, visible_gpus() if gpus is None else list(gpus))
    for device in devices:
        slots.put(device)
    threads = cpus_per_task or max(1, (os.cpu_count() or 1) // parallel)
    end = None if deadline_s is None else time.monotonic() + deadline_s

    def one(task: FoldTask) -> dict[str, Any] | None:
        device = slots.get()
        try:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return None
            record = train_fold(project, task, overrides, fold_env(threads, device, code_root),
                                offline=offline, timeout_s=left)
            if on_done is not None:
                on_done(record)
            return record
        finally:
            slots.put(device)

    log.info("grid (local): %d tasks, %d at a time on %s, %d threads each", len(tasks),
             parallel, ", ".join(f"GPU {d}" if d else "CPU" for d in sorted(set(devices))),
             threads)
    records: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = [pool.submit(one, t) for t in tasks]
        for future in as_completed(futures):
            record = future.result()
            if record is not None:
                records.append(record)
                log_record(record, len(records), len(tasks))
    skipped = len(tasks) - len(records)
    if skipped:
        log.warning("%d tasks not started before the deadline", skipped)
    return records


def run_backend(backend: str, project: Path, tasks: Sequence[FoldTask],
                overrides: Sequence[str], options: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Dispatch to :func:`run_ray` or :func:`run_local` with that backend's options."""
    if backend == "ray":
        return run_ray(project, tasks, overrides, **options)
    if backend == "local":
        return run_local(project, tasks, overrides, **options)
    raise ConfigError(f"--backend {backend!r}: choose ray or local")
