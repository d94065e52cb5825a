"""Stage ``train``: one (model, loss) cell of the grid, trained on every fold.

``python -m pipeline.stages.train model=mini_covidnet loss=focal [fold=0] [train.epochs=3 ...]`` reads the
composed ``params.yaml`` (so ``dvc exp run -S`` overrides reach it) and applies any further
``key=value`` overrides to existing keys. Writes, under ``models/<model>-<loss>/``:
``fold_<k>/best.pt`` (best validation loss), ``fold_<k>/history.csv``,
``fold_<k>/test_predictions.csv``, ``fold_<k>/val_predictions.csv`` (same columns, the
validation rows), ``predictions.csv`` (all folds' test rows), ``metrics.json`` and
``run.json``; logs a parent MLflow run with one child per fold. Each fold's history is copied to
``reports/plots/training/<model>-<loss>/fold_<k>.csv``: small, kept in Git (``cache: false``)
so that ``dvc plots diff`` draws every fold's curves without the DVC cache.

A fold interrupted at any point resumes from its last finished epoch (state under
``.cache/resume/``); the per-epoch seeding makes the resumed run end with the same weights as an
uninterrupted one on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.core import review
from pipeline.core.cli import run_main
from pipeline.core.config import ConfigError, apply_overrides, get, load_params, select_run
from pipeline.core.files import sha256_file
from pipeline.core.tracking import Tracker, standard_tags
from pipeline.data.loading import FrameStore, audited_splits, interpolation_of, used_frames
from pipeline.models.checkpoint import save_checkpoint
from pipeline.training.fold import build_learner, fold_split, fold_tensors, training_parts
from pipeline.training.loop import EpochPlan, Learner, ResumeFile, epoch_seed, fit, pick_device
from pipeline.training.schedule import Schedule, ScheduleState
from pipeline.training.steps import precision

log = logging.getLogger("pipeline.stages.train")

RESUME_DIR = Path(".cache/resume")
TRAINING_PLOTS_DIR = Path("reports/plots/training")  # relative to the folder above models/


def run_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class FoldRun:
    """One fold ready to train: its frames, model, schedule and (possibly resumed) state."""

    fold: int
    split: dict[str, pd.DataFrame]  # the fold's frames per split, as selected
    parts: dict[str, pd.DataFrame]  # what it trains on: ``split``, the minority oversampled
    learner: Learner
    plan: EpochPlan
    schedule: Schedule
    state: ScheduleState
    resume: ResumeFile


def prepare_fold(params: Mapping, model_name: str, loss_name: str, fold: int, store: FrameStore,
                 splits: pd.DataFrame) -> FoldRun:
    """Select the fold's frames, load them onto the device, build the model, loss and optimiser
    and, where an interrupted run left one, restore its resume state."""
    tcfg = get(params, "train")
    model_cfg, loss_cfg = select_run(params, model_name, loss_name)
    seed = int(get(params, "seed"))
    device = pick_device(str(tcfg["device"]))
    amp, channels_last = precision(tcfg, device)
    if device.type == "cpu" and tcfg["deterministic"]:
        # torch.use_deterministic_algorithms(True, warn_only=True) without the compiler's flag:
        # setting that imports torch._inductor (seconds per stage), and training never compiles.
        torch._C._set_deterministic_algorithms(True, warn_only=True)

    split = fold_split(store.frames, splits, fold, tcfg)
    parts = training_parts(split, tcfg)
    images, labels = fold_tensors(store, parts, device)
    log.info("fold %d: %d train / %d val / %d test frames on %s", fold,
             *(len(parts[s]) for s in ("train", "val", "test")), device)

    torch.manual_seed(epoch_seed(seed, fold, -1))
    learner = build_learner(model_cfg, loss_cfg, tcfg, len(get(params, "dataset.classes")), device,
                            amp, channels_last)
    key = run_key(model_cfg, loss_cfg, dict(tcfg), get(params, "folds"), seed, fold,
                  list(parts["train"]["frame"]))
    resume = ResumeFile(RESUME_DIR / f"{model_name}-{loss_name}" / f"fold_{fold}-{key}.pt")
    state = resume.load(learner)
    if state is None:
        state = ScheduleState()
    else:
        log.info("fold %d: resuming after epoch %d from %s", fold, state.epoch + 1, resume.path)
    plan = EpochPlan(images, labels, epochs=int(tcfg["epochs"]), batch_size=int(tcfg["batch_size"]),
                     augment=tcfg["augment"], seed=seed, fold=fold)
    return FoldRun(fold, split, parts, learner, plan, Schedule.from_config(tcfg), state, resume)


def prediction_table(part: pd.DataFrame, fold: int, probs: np.ndarray,
                     classes: Sequence[str]) -> pd.DataFrame:
    """One row per frame of ``part``: its ids, true and predicted class, class probabilities."""
    preds = pd.DataFrame({"frame": part["frame"].to_numpy(), "source": part["source"].to_numpy(),
                          "patient": part["patient"].astype(str).to_numpy(), "fold": fold,
                          "y_true": part["label"].to_numpy(), "y_pred": probs.argmax(1)})
    for i, c in enumerate(classes):
        preds[f"prob_{c}"] = probs[:, i]
    return preds


def predict_fold(fold_run: FoldRun) -> dict[str, np.ndarray]:
    """Class probabilities of the validation and test frames with the restored best weights
    (binary_eval picks its held-out operating threshold on the validation ones)."""
    return {split: torch.softmax(fold_run.learner.logits(fold_run.plan.images[split]), 1).numpy()
            for split in ("val", "test")}


def save_fold(fold_run: FoldRun, fold_dir: Path, params: Mapping, model_name: str, loss_name: str,
              interpolation: str) -> None:
    """The fold's checkpoint (best epoch's weights) and its per-epoch history."""
    model_cfg, _ = select_run(params, model_name, loss_name)
    save_checkpoint(fold_dir / "best.pt", fold_run.learner.model, model_cfg=model_cfg,
                    classes=list(get(params, "dataset.classes")),
                    image_size=int(get(params, "train.image_size")),
                    epoch=fold_run.state.best_epoch,
                    interpolation=interpolation,
                    meta={"model": model_name, "loss": loss_name, "fold": fold_run.fold,
                          "seed": int(get(params, "seed"))})
    pd.DataFrame(fold_run.state.history).to_csv(fold_dir / "history.csv", index=False)


# Record: the MLflow calls of a fold, inside the child run that train_fold opens.

def record_resumed_epochs(tracker: Tracker, state: ScheduleState) -> None:
    """A resumed run re-logs the epochs it already has."""
    for h in state.history:
        tracker.log_metrics({k: v for k, v in h.items() if k != "epoch"}, step=h["epoch"])


def record_epoch(tracker: Tracker, row: Mapping) -> None:
    """One finished epoch's history row, at its epoch as the step."""
    tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])


def record_fold(fold_run: FoldRun, fold_dir: Path, probs: Mapping[str, np.ndarray],
                classes: Sequence[str], tracker: Tracker) -> pd.DataFrame:
    """Write the fold's prediction tables and ``metrics.json``, log its test metrics; return
    the test predictions."""
    from pipeline.evaluation.classification import classification_metrics, metrics_to_flat

    tables = {split: prediction_table(fold_run.parts[split], fold_run.fold, p, classes)
              for split, p in probs.items()}
    for split, table in tables.items():
        table.to_csv(fold_dir / f"{split}_predictions.csv", index=False)
    preds, state, graph = tables["test"], fold_run.state, fold_run.learner.graph
    m = classification_metrics(preds["y_true"].to_numpy(), preds["y_pred"].to_numpy(),
                               probs["test"], classes)
    fold_record = {"fold": fold_run.fold, "best_epoch": state.best_epoch,
                   "epochs_run": len(state.history), "train_seconds": state.train_seconds,
                   "precision": {"amp_bf16": fold_run.learner.amp,
                                 "channels_last": fold_run.learner.channels_last},
                   "metrics": m}
    if graph is not None:  # how the steps ran: captured and replayed, or eager
        fold_record["cuda_graph"] = {"captured": graph.captured, "failed": graph.failed,
                                     "steps": dict(graph.calls)}
    (fold_dir / "metrics.json").write_text(json.dumps(fold_record, indent=2) + "\n")
    tracker.log_metrics({f"test.{k}": v for k, v in metrics_to_flat(m).items()})
    tracker.log_metrics({"train_seconds": state.train_seconds,
                         "best_epoch": state.best_epoch})
    tracker.log_dict({"classes": list(classes), "matrix": m["confusion_matrix"]},
                     "confusion_matrix.json")
    return preds


def train_fold(params: Mapping, model_name: str, loss_name: str, fold: int, store: FrameStore,
               splits: pd.DataFrame, out_dir: Path, tracker: Tracker) -> pd.DataFrame:
    """Train one fold; write its checkpoint, history and test predictions; return the latter."""
    fold_run = prepare_fold(params, model_name, loss_name, fold, store, splits)
    fold_dir = out_dir / f"fold_{fold}"
    with tracker.run(f"fold_{fold}", nested=True, tags={"fold": str(fold)}):
        review.log_fold_split(tracker, params, fold, f"{model_name}-{loss_name}", fold_run.split)
        record_resumed_epochs(tracker, fold_run.state)
        fit(fold_run.learner, fold_run.plan, fold_run.schedule, fold_run.state, fold_run.resume,
            on_epoch=lambda row: record_epoch(tracker, row))
        save_fold(fold_run, fold_dir, params, model_name, loss_name, store.interpolation)
        classes = list(get(params, "dataset.classes"))
        preds = record_fold(fold_run, fold_dir, predict_fold(fold_run), classes, tracker)
    fold_run.resume.remove()
    return preds


def summarize_cell(out_dir: Path, folds: Sequence[int], classes: Sequence[str]) -> tuple[dict, dict]:
    """Join the folds' test predictions into ``predictions.csv``, write the cell's
    ``metrics.json`` (what ``dvc exp show`` lists) and the folds' training curves for
    ``dvc plots`` (``TRAINING_PLOTS_DIR`` beside ``models/``). Also used to collect folds trained in
    separate processes (e.g. in parallel on one GPU)."""
    from pipeline.evaluation.classification import summarize_folds

    preds = pd.concat([pd.read_csv(out_dir / f"fold_{k}" / "test_predictions.csv",
                                   dtype={"patient": str}) for k in folds], ignore_index=True)
    preds.to_csv(out_dir / "predictions.csv", index=False)
    summary = summarize_folds(preds, classes)
    fold_times = [json.loads((out_dir / f"fold_{k}" / "metrics.json").read_text())["train_seconds"]
                  for k in folds]
    metrics = {"accuracy": summary["pooled"]["accuracy"],
               "macro_f1": summary["pooled"]["macro_f1"],
               "fold_accuracy_mean": summary["fold_mean"]["accuracy"],
               "fold_accuracy_std": summary["fold_std"]["accuracy"],
               "train_minutes_per_fold": float(np.mean(fold_times)) / 60,
               "per_class": summary["pooled"]["per_class"]}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plots_dir = out_dir.parent.parent / TRAINING_PLOTS_DIR / out_dir.name
    plots_dir.mkdir(parents=True, exist_ok=True)
    for k in folds:
        shutil.copyfile(out_dir / f"fold_{k}" / "history.csv", plots_dir / f"fold_{k}.csv")
    return metrics, summary


def run(params: Mapping, model_name: str, loss_name: str, folds: Sequence[int],
        out_root: Path = Path("models")) -> dict:
    """Train the given folds of one grid cell; write the cell's predictions and metrics."""
    from pipeline.models.catalog import describe_init

    model_cfg, loss_cfg = select_run(params, model_name, loss_name)
    ds, fcfg, tcfg = get(params, "dataset"), get(params, "folds"), get(params, "train")
    # First: a required but unreachable store fails in seconds, before any data is loaded.
    tracker = Tracker(get(params, "tracking"))
    classes = list(ds["classes"])
    frames = used_frames(ds["frames_dir"])
    splits = audited_splits(params)
    unknown = sorted(set(folds) - set(splits["fold"]))
    if unknown:
        raise ConfigError(f"folds {unknown} do not exist (splits have {sorted(splits['fold'].unique())})")
    store = FrameStore(ds["frames_dir"], frames, int(tcfg["image_size"]), interpolation_of(ds))
    out_dir = out_root / f"{model_name}-{loss_name}"
    out_dir.mkdir(parents=True, exist_ok=True)

    leaky = fcfg["validation"] == "test_fold"
    init = describe_init(model_cfg)
    cell = run_name = f"{model_name}-{loss_name}"
    if os.environ.get("DVC_EXP_NAME"):
        run_name += f" ({os.environ['DVC_EXP_NAME']})"
    started = time.monotonic()
    with tracker.run(run_name, tags=standard_tags(params, model=model_name, loss=loss_name,
                                                  cell=cell, init=init, leaky_validation=leaky)):
        tracker.log_params({"model": model_cfg, "loss": loss_cfg, "train": tcfg, "folds": fcfg,
                            "dataset.name": ds["name"], "seed": params["seed"],
                            "profile": get(params, "profile")})
        review.describe_training(tracker, params, cell, folds)
        review.log_dataset(tracker, params, frames)
        for fold in folds:
            train_fold(params, model_name, loss_name, fold, store, splits, out_dir, tracker)
        metrics, summary = summarize_cell(out_dir, folds, classes)
        wall = time.monotonic() - started
        info = {"model": model_name, "loss": loss_name, "folds": list(folds), "init": init,
                "validation": fcfg["validation"], "leaky_validation": leaky,
                "device": str(pick_device(str(tcfg["device"]))),
                "device_name": (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"),
                "torch": torch.__version__, "wall_seconds": wall, "profile": params.get("profile"),
                "image_size": int(tcfg["image_size"]), "epochs": int(tcfg["epochs"]),
                "max_frames_per_source": tcfg.get("max_frames_per_source"),
                "mlflow": {"enabled": tracker.enabled, "skipped_reason": tracker.reason}}
        (out_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")
        tracker.log_metrics({"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                             "fold_accuracy_mean": metrics["fold_accuracy_mean"],
                             "wall_seconds": wall})
        tracker.log_dict(summary, "summary.json")
        # What the later stages find this run by: the predictions they read (pipeline.core.review).
        tracker.set_tags({review.DIGEST_TAG: sha256_file(out_dir / "predictions.csv")})
    log.info("%s-%s: pooled accuracy %.3f over folds %s in %.0f s", model_name, loss_name,
             metrics["accuracy"], list(folds), wall)
    return metrics


def parse_args(argv: Sequence[str]) -> tuple[str, str, list[int] | None, list[str]]:
    model = loss = None
    folds: list[int] | None = None
    rest = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "model":
            model = value
        elif key == "loss":
            loss = value
        elif key == "fold":
            folds = [int(v) for v in value.split(",")]
        else:
            rest.append(arg)
    if not model or not loss:
        raise ConfigError("usage: python -m pipeline.stages.train model=<name> loss=<name> [fold=K[,K]] "
                          "[key.path=value ...]")
    return model, loss, folds, rest


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    model, loss, folds, overrides = parse_args(argv)
    params = apply_overrides(load_params(), overrides)
    select_run(params, model, loss)  # unknown names fail before any work
    run(params, model, loss, folds if folds is not None else list(get(params, "train.folds")))


if __name__ == "__main__":
    run_main(main)
