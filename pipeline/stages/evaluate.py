"""Stage ``evaluate``: every trained grid cell's test predictions -> the study's figures.

Frame-level and video-level metrics pooled over folds and per fold (mean +- std), 95% intervals
by bootstrap over patients, and paired comparisons over the same patients (cross-entropy vs
focal for each model, each row vs Mini-COVIDNet). Writes ``reports/metrics.json`` (the compact
numbers ``dvc exp show`` lists), ``reports/evaluation.json`` (everything) and the CSV tables
behind ``dvc plots``, one file per cell: ``reports/plots/confusion/<cell>.csv`` and
``reports/plots/roc/<cell>.csv``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from sklearn.metrics import roc_curve

from pipeline.core.config import get, grid_cells, load_params
from pipeline.evaluation.aggregation import aggregate_videos
from pipeline.evaluation.bootstrap import patient_bootstrap
from pipeline.evaluation.bootstrap_figures import Accuracy
from pipeline.evaluation.classification import summarize_folds
from pipeline.evaluation.comparisons import mcnemar_test, paired_bootstrap_difference

log = logging.getLogger("pipeline.stages.evaluate")


def evaluate_cell(preds: pd.DataFrame, classes: Sequence[str], n_boot: int, ci: float,
                  seed: int) -> dict:
    """All figures of one grid cell."""
    frame = summarize_folds(preds, classes)
    videos = {how: aggregate_videos(preds, classes, how=how) for how in ("mean", "vote")}
    video = {how: summarize_folds(v, classes) for how, v in videos.items()}
    # Every figure of merit from one bootstrap over patients (keys as metrics_to_flat gives them).
    boot = patient_bootstrap(preds, None, classes, n_boot=n_boot, seed=seed, ci=ci)
    return {"frame": frame, "video": video, "bootstrap": boot, "n_frames": int(len(preds)),
            "n_videos": int(preds["source"].nunique()), "n_patients": int(preds["patient"].nunique())}


def compare(a: pd.DataFrame, b: pd.DataFrame, classes: Sequence[str], n_boot: int, ci: float,
            seed: int) -> dict:
    """Paired comparison of two rows on the same frames: bootstrap of the accuracy difference
    over patients, and McNemar on video-level (mean-probability) predictions."""
    diff = paired_bootstrap_difference(a, b, Accuracy(), classes, n_boot=n_boot, seed=seed, ci=ci)
    va = aggregate_videos(a, classes, how="mean").set_index("source")
    vb = aggregate_videos(b, classes, how="mean").set_index("source").loc[va.index]
    mc = mcnemar_test((va["y_pred"] == va["y_true"]).to_numpy(), (vb["y_pred"] == vb["y_true"]).to_numpy())
    return {"accuracy_difference": diff, "mcnemar_videos": mc}


def plot_tables(preds: pd.DataFrame, classes: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long tables for ``dvc plots``: (actual, predicted) pairs and one-vs-rest ROC points."""
    cm = pd.DataFrame({"actual": [classes[i] for i in preds["y_true"]],
                       "predicted": [classes[i] for i in preds["y_pred"]]})
    rows = []
    for i, c in enumerate(classes):
        y = (preds["y_true"].to_numpy() == i).astype(int)
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, preds[f"prob_{c}"].to_numpy())
            rows += [{"class": c, "fpr": float(f), "tpr": float(t)} for f, t in zip(fpr, tpr)]
    return cm, pd.DataFrame(rows, columns=["class", "fpr", "tpr"])


def main(argv: Sequence[str] | None = None) -> None:
    params = load_params()
    classes = list(get(params, "dataset.classes"))
    ecfg, seed = get(params, "evaluate"), int(get(params, "seed"))
    n_boot, ci = int(ecfg["bootstrap"]), float(ecfg["ci"])
    out = Path(get(params, "report.dir"))
    for kind in ("confusion", "roc"):
        (out / "plots" / kind).mkdir(parents=True, exist_ok=True)
    preds: dict[str, pd.DataFrame] = {}
    for cell in grid_cells(params):
        path = Path("models") / cell / "predictions.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: train stage for {cell} has not run (dvc repro)")
        preds[cell] = pd.read_csv(path, dtype={"patient": str})
    results: dict = {"classes": classes, "cells": {}, "comparisons": {}}
    compact: dict = {}
    for cell, p in preds.items():
        log.info("evaluating %s (%d frames)", cell, len(p))
        r = evaluate_cell(p, classes, n_boot, ci, seed)
        results["cells"][cell] = r
        compact[cell] = {"accuracy": r["frame"]["pooled"]["accuracy"],
                         "accuracy_ci": [r["bootstrap"]["low"]["accuracy"],
                                         r["bootstrap"]["high"]["accuracy"]],
                         "fold_accuracy_mean": r["frame"]["fold_mean"]["accuracy"],
                         "macro_f1": r["frame"]["pooled"]["macro_f1"],
                         "video_accuracy": r["video"]["mean"]["pooled"]["accuracy"]}
        cm, roc = plot_tables(p, classes)
        cm.to_csv(out / "plots" / "confusion" / f"{cell}.csv", index=False)
        roc.to_csv(out / "plots" / "roc" / f"{cell}.csv", index=False)
    models = get(params, "grid.models")
    losses = get(params, "grid.losses")
    pairs = []
    if "ce" in losses and "focal" in losses:
        pairs += [(f"{m}-focal", f"{m}-ce") for m in models]
    ref = "mini_covidnet"
    if ref in models:
        pairs += [(f"{m}-{l}", f"{ref}-{l}") for m in models if m != ref for l in losses]
    for a, b in pairs:
        results["comparisons"][f"{a} vs {b}"] = compare(preds[a], preds[b], classes, n_boot, ci, seed)
    (out / "evaluation.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out / "metrics.json").write_text(json.dumps(compact, indent=2) + "\n")
    log.info("wrote %s and %s", out / "evaluation.json", out / "metrics.json")
    from pipeline.core.review import log_evaluation

    log_evaluation(params, results)


if __name__ == "__main__":
    from pipeline.core.cli import run_main

    run_main(main)
