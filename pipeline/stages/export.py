"""Stage ``export``: each fold's model of a run to ONNX and TFLite (:mod:`pipeline.deploy.formats`),
every file checked against PyTorch on real frames of its fold; ``parity.json`` records every file
(also the failing ones), then the stage fails naming each file over its tolerance. The work runs
as jobs (:func:`export_jobs`) in ``export.workers`` processes; a run's ONNX files share one trace,
kept in ``.cache/onnx_traces/`` for the next run of the same architecture.

    python -m pipeline.stages.export --run-dir models/mini_covidnet-ce
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TypeVar

import numpy as np

from pipeline.deploy.formats import FORMATS, check_parity, export_model

log = logging.getLogger("pipeline.stages.export")
T = TypeVar("T")

TRACE_CACHE = Path(".cache/onnx_traces")


def export_config(params: Mapping) -> dict:
    """The ``export`` params group (typed by ``pipeline.core.schema``), its formats checked
    against the converters and each one's gates present."""
    from pipeline.core.config import ConfigError, get
    from pipeline.core.schema import validate

    cfg = validate({"export": get(params, "export")})["export"]
    bad = sorted(set(cfg["formats"]) - set(FORMATS))
    if bad:
        raise ConfigError(f"export.formats has unknown format(s) {bad} (valid: {list(FORMATS)})")
    for key in ("tolerance", "min_top1_agreement"):
        unknown = sorted(set(cfg[key]) - set(FORMATS))
        missing = [f for f in cfg["formats"] if f not in cfg[key]]
        if unknown or missing:
            raise ConfigError(f"export.{key}: " + (f"unknown format(s) {unknown}" if unknown else
                              f"no entry for {missing}") + f" (valid keys: {list(FORMATS)})")
    return cfg


def benchmarked(params: Mapping, run: str) -> bool:
    """False for a grid run of a loss other than the grid's first, which the benchmark never
    times (it times ``<model>-<first loss>``, as ``dvc.yaml`` says); True for any other run."""
    from pipeline.core.config import get, grid_cells

    if "grid" not in params:
        return True
    return run not in grid_cells(params, get(params, "grid.losses")[1:])


def chosen_folds(cfg: Mapping, folds: Sequence[int]) -> list[int]:
    """The folds of ``export.all_formats_folds`` (null: all of ``folds``): exported in every
    format in a benchmarked run, and logged to MLflow in every run."""
    chosen = cfg["all_formats_folds"]
    return [f for f in folds if chosen is None or f in chosen]


def fold_formats(cfg: Mapping, fold: int, all_formats: bool) -> list[str]:
    """Formats of one fold: all of ``export.formats`` for a chosen fold (:func:`chosen_folds`)
    of a benchmarked run, or for every fold with ``export.all_formats_folds: null``; ONNX alone
    for the others."""
    chosen = cfg["all_formats_folds"]
    if chosen is None or (all_formats and fold in chosen):
        return list(cfg["formats"])
    return [f for f in cfg["formats"] if f == "onnx"]


def summarize(records: Sequence[Mapping]) -> dict:
    """Per format over folds: worst max |diff|, lowest top-1 agreement, mean accuracy change."""
    out: dict[str, dict] = {}
    for fmt in dict.fromkeys(r["format"] for r in records):
        rs = [r for r in records if r["format"] == fmt]
        out[fmt] = {"max_abs_diff": max(r["max_abs_diff"] for r in rs),
                    "min_top1_agreement": min(r["top1_agreement"] for r in rs),
                    "size_bytes": max(r["size_bytes"] for r in rs),
                    "passed": all(r["passed"] for r in rs)}
        if all("accuracy_change" in r for r in rs):
            out[fmt]["mean_accuracy_change"] = float(np.mean([r["accuracy_change"] for r in rs]))
    return out


def _frames(fold: int, split: str, image_size: int, limit: int | None):
    from pipeline.data.loading import (
        load_split_images,  # the data stage's outputs are needed only here
    )

    images, labels = load_split_images(fold, split, image_size, limit)
    return images.float().div(255).numpy(), np.asarray(labels)


def export_jobs(folds: Sequence[int], cfg: Mapping, all_formats: bool
                ) -> list[tuple[list[int], list[str]]]:
    """The stage's work as independent ``(folds, formats)`` jobs: ONNX for every fold in one job
    (one trace of the architecture, :class:`~pipeline.deploy.formats.OnnxExporter`), and the
    TFLite formats of each fold that :func:`fold_formats` gives them to, a job per fold."""
    jobs = [(list(folds), ["onnx"])] if "onnx" in cfg["formats"] else []
    for fold in folds:
        tflite = [f for f in fold_formats(cfg, fold, all_formats) if f != "onnx"]
        if tflite:
            jobs.append(([fold], tflite))
    return jobs


def export_job(folds: Sequence[int], formats: Sequence[str], checkpoints: Mapping[int, Path],
               cfg: Mapping, out_root: Path, trace_cache: Path | None = None) -> list[dict]:
    """Export the models of ``folds`` in ``formats``, each file checked against PyTorch on
    real frames of its fold; the ONNX files of all folds share one trace (read from and kept in
    ``trace_cache``, when given)."""
    from pipeline.deploy.formats import OnnxExporter
    from pipeline.models.checkpoint import load_model

    records, onnx_exporter = [], None
    for fold in folds:
        model, ckpt = load_model(checkpoints[fold])
        size = int(ckpt["image_size"])
        log.info("fold %d: %s (%s, %d px) -> %s %s", fold, checkpoints[fold],
                 type(model).__name__, size, out_root / f"fold_{fold}", ", ".join(formats))
        if "onnx" in formats and onnx_exporter is None:
            onnx_exporter = OnnxExporter(size, cfg["opset"], trace_cache)
        images, labels = _frames(fold, cfg["parity_split"], size, cfg["parity_frames"])
        calibration = None
        if "tflite_int8_full" in formats:
            calibration, _ = _frames(fold, cfg["calibration_split"], size,
                                     cfg["calibration_frames"])
        records += export_model(model, out_root / f"fold_{fold}", size, images, labels,
                                calibration, formats, cfg["tolerance"], cfg["min_top1_agreement"],
                                cfg["opset"], strict=False, extra={"fold": fold},
                                onnx_exporter=onnx_exporter)
    return records


def _worker_setup() -> None:
    """A worker process of :func:`export_run`: the stage's logging, one thread each."""
    import torch

    from pipeline.core.cli import setup_logging

    setup_logging()
    torch.set_num_threads(1)


def export_run(checkpoints: Mapping[int, Path], cfg: Mapping, out_root: Path,
               all_formats: bool, trace_cache: Path | None = None,
               meanwhile: Callable[[list[dict]], T] | None = None) -> tuple[list[dict], T | None]:
    """Every job of :func:`export_jobs`: the first in this process, the others in up to
    ``export.workers - 1`` worker processes started before it (in this one after it, with
    ``export.workers: 1``). ``meanwhile`` gets the first job's records once it is done and runs
    here while the workers finish.

    Returns:
        The records, ordered by fold, then format as in ``export.formats``; and what
        ``meanwhile`` returned (None without it).
    """
    jobs = export_jobs(list(checkpoints), cfg, all_formats)
    if not jobs:
        return [], meanwhile([]) if meanwhile else None
    (first_folds, first_formats), rest = jobs[0], jobs[1:]
    workers = min(int(cfg["workers"]) - 1, len(rest))
    with ExitStack() as stack:
        futures = []
        if workers > 0:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # Spawned, not forked: the converters hold threads and state a fork would copy half-made.
            pool = stack.enter_context(ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_setup))
            futures = [pool.submit(export_job, folds, formats, dict(checkpoints), dict(cfg),
                                   out_root, trace_cache) for folds, formats in rest]
        records = export_job(first_folds, first_formats, checkpoints, cfg, out_root, trace_cache)
        extra = meanwhile(list(records)) if meanwhile else None
        if workers > 0:
            records += [r for f in futures for r in f.result()]
        else:
            records += [r for folds, formats in rest
                        for r in export_job(folds, formats, checkpoints, cfg, out_root,
                                            trace_cache)]
    order = list(cfg["formats"])
    return sorted(records, key=lambda r: (r["fold"], order.index(r["format"]))), extra


def _logged_models(checkpoints: Mapping[int, Path], cfg: Mapping) -> dict[int, tuple]:
    """``{fold: (model, two parity frames)}`` of the chosen folds (:func:`chosen_folds`),
    whose models go to MLflow."""
    from pipeline.models.checkpoint import load_model

    logged = {}
    for fold in chosen_folds(cfg, list(checkpoints)):
        model, ckpt = load_model(checkpoints[fold])
        images, _ = _frames(fold, cfg["parity_split"], int(ckpt["image_size"]),
                            cfg["parity_frames"])
        logged[fold] = (model, images[:2])
    return logged


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a run's fold models to ONNX/TFLite and "
                                                 "check each file against PyTorch.")
    parser.add_argument("--run-dir", required=True, help="models/<model>-<loss>")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--folds", type=int, nargs="*", help="only these folds (default: all)")
    parser.add_argument("--out-dir", help="where the files go (default: exports/<model>-<loss>)")
    args = parser.parse_args(argv)

    from pipeline.core.config import load_params

    params = load_params(args.params)
    cfg = export_config(params)
    run_dir = Path(args.run_dir)
    all_formats = benchmarked(params, run_dir.name)
    from pipeline.models.checkpoint import fold_checkpoints

    checkpoints = fold_checkpoints(run_dir)
    if args.folds:
        missing = sorted(set(args.folds) - set(checkpoints))
        if missing:
            raise FileNotFoundError(f"no checkpoint for fold(s) {missing} in {run_dir} "
                                    f"(trained folds: {sorted(checkpoints)})")
        checkpoints = {k: checkpoints[k] for k in args.folds}
    # Beside, not inside, the train stage's output: DVC outputs must not overlap.
    out_root = Path(args.out_dir) if args.out_dir else Path("exports") / run_dir.name
    from pipeline.core import review

    def log_models(onnx_records: list[dict]) -> review.ResultLog:
        """The chosen folds' PyTorch and ONNX models to MLflow, while TFLite jobs run."""
        results = review.ResultLog(params, "export")
        review.log_export_models(results, run_dir.name, onnx_records,
                                 _logged_models(checkpoints, cfg), run_dir.parent)
        return results

    records, results = export_run(checkpoints, cfg, out_root, all_formats, TRACE_CACHE,
                                  meanwhile=log_models)
    summary = {"run": run_dir.name, "passed": all(r["passed"] for r in records),
               "n_files": len(records), "per_format": summarize(records), "records": records}
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "parity.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("wrote %s (%d files, %s)", out_root / "parity.json", len(records),
             "all within tolerance" if summary["passed"] else "SOME FAILED")
    review.log_export(results, run_dir.name, summary, run_dir.parent)
    check_parity(records)


if __name__ == "__main__":
    from pipeline.core.cli import run_main

    run_main(main)
