"""Stage ``train``: one (model, loss) cell of the grid, trained on every fold.

``python -m pipeline.stages.train model=mini_covidnet loss=focal [fold=0] [train.epochs=3 ...]`` reads the
composed ``params.yaml`` (so ``dvc exp run -S`` overrides reach it) and applies any further
``key=value`` overrides to existing keys. Writes, under ``models/<model>-<loss>/``:
``fold_<k>/best.pt`` (best validation loss), ``fold_<k>/history.csv``,
``fold_<k>/test_predictions.csv``, ``fold_<k>/val_predictions.csv`` (same columns, the
validation rows), ``predictions.csv`` (all folds' test rows), ``metrics.json`` and
``run.json``; logs a parent MLflow run with one child per fold.

A fold interrupted at any point resumes from its last finished epoch (state under
``.cache/resume/``); the per-epoch seeding makes the resumed run end with the same weights as an
uninterrupted one on the CPU.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.core import review
from pipeline.core.cli import run_main
from pipeline.core.config import ConfigError, apply_overrides, get, load_params, select_run
from pipeline.core.files import sha256_file
from pipeline.core.tracking import Tracker, standard_tags
from pipeline.data.loading import (
    FrameStore,
    audited_splits,
    augment_batch,
    fold_frames,
    interpolation_of,
    subsample_per_source,
    used_frames,
)
from pipeline.models.checkpoint import save_checkpoint
from pipeline.training.steps import (
    CudaGraphStep,
    current_lr,
    lr_to_device,
    make_adam,
    optimize_step,
    precision,
    set_lr,
)

log = logging.getLogger("pipeline.stages.train")

RESUME_DIR = Path(".cache/resume")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is visible (use auto or cpu)")
    return torch.device(name)


def epoch_seed(seed: int, fold: int, epoch: int) -> int:
    """Seed of one epoch: resuming at an epoch boundary replays the same random stream."""
    return (seed * 1_000_003 + fold * 10_007 + epoch) % (2**31 - 1)


def run_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


def _to_input(x_uint8: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x_uint8.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, device: torch.device,
                   batch_size: int = 64, amp: bool = False, channels_last: bool = False) -> torch.Tensor:
    """Logits for uint8 images (N x 3 x S x S), in eval mode."""
    model.eval()
    outs = []
    for idx in _batches(len(images), batch_size, None):
        x = _to_input(images[idx], device, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outs.append(model(x).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def lr_milestones(tcfg: Mapping) -> tuple[list[int], float]:
    """``train.lr_steps``: epochs at which the learning rate is multiplied by ``factor`` (as
    torch's MultiStepLR; MedMNIST's benchmark uses x0.1 at 50% and 75% of the epochs)."""
    cfg = tcfg.get("lr_steps") or {}
    milestones = sorted(int(m) for m in cfg.get("milestones") or [])
    if any(m <= 0 for m in milestones):
        raise ConfigError(f"train.lr_steps.milestones={milestones}: epochs must be positive")
    return milestones, float(cfg.get("factor", 0.1))


def milestones_passed(milestones: Sequence[int], epoch: int) -> int:
    """How many milestones lie at or before ``epoch`` (0-based epochs, as MultiStepLR counts)."""
    return sum(1 for m in milestones if epoch >= m)


def train_step(model: torch.nn.Module, loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer,
               x_uint8: torch.Tensor, y: torch.Tensor, augment: Mapping, generator: torch.Generator,
               device: torch.device, amp: bool, channels_last: bool,
               graph: CudaGraphStep | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a uint8 batch: scale, augment on the batch's device, then
    forward (bf16 autocast when ``amp``), backward, update, eagerly or replayed from ``graph``.
    Returns the detached loss and the number of correct predictions, both still on the device.
    The throughput benchmark times this too."""
    x = augment_batch(_to_input(x_uint8, device, channels_last), augment, generator)
    y = y.to(device, non_blocking=True)
    if graph is not None:
        return graph(x, y)
    return optimize_step(model, loss_fn, optimizer, x, y, amp)


def evaluate_loss(model, loss_fn, images, labels, device, batch_size, amp, channels_last):
    logits = predict_logits(model, images, device, batch_size, amp, channels_last)
    if not len(labels):
        return float("nan"), float("nan"), logits
    labels = labels.to(device)
    loss = float(loss_fn(logits.to(device), labels).item())
    acc = float((logits.to(device).argmax(1) == labels).float().mean().item())
    return loss, acc, logits


def prediction_table(part: pd.DataFrame, fold: int, probs: np.ndarray,
                     classes: Sequence[str]) -> pd.DataFrame:
    """One row per frame of ``part``: its ids, true and predicted class, class probabilities."""
    preds = pd.DataFrame({"frame": part["frame"].to_numpy(), "source": part["source"].to_numpy(),
                          "patient": part["patient"].astype(str).to_numpy(), "fold": fold,
                          "y_true": part["label"].to_numpy(), "y_pred": probs.argmax(1)})
    for i, c in enumerate(classes):
        preds[f"prob_{c}"] = probs[:, i]
    return preds


def train_fold(params: Mapping, model_name: str, loss_name: str, fold: int, store: FrameStore,
               splits: pd.DataFrame, out_dir: Path, tracker: Tracker) -> pd.DataFrame:
    """Train one fold; write its checkpoint, history and test predictions; return the latter."""
    from pipeline.models.zoo import build_model
    from pipeline.training.losses import build_loss

    tcfg = get(params, "train")
    classes = list(get(params, "dataset.classes"))
    model_cfg, loss_cfg = select_run(params, model_name, loss_name)
    seed = int(get(params, "seed"))
    device = pick_device(str(tcfg["device"]))
    amp, channels_last = precision(tcfg, device)
    if device.type == "cpu" and tcfg.get("deterministic", True):
        torch.use_deterministic_algorithms(True, warn_only=True)

    limit = tcfg.get("max_frames_per_source")
    parts = {s: subsample_per_source(fold_frames(store.frames, splits, fold, s), limit)
             for s in ("train", "val", "test")}
    split = dict(parts)  # the fold's frames, before any oversampling
    factor = int(tcfg.get("minority_oversample") or 1)
    if factor > 1:
        # The chest X-ray study's x5 augmentation of the minority class: the copies are drawn
        # through the same random augmentation, so each is a different image.
        train = parts["train"]
        minority = train["label"].value_counts().idxmin()
        parts["train"] = pd.concat([train] + [train[train["label"] == minority]] * (factor - 1))
    images = {s: store.tensor(list(p["frame"])) for s, p in parts.items()}
    labels = {s: torch.tensor(p["label"].to_numpy(), dtype=torch.long) for s, p in parts.items()}
    if device.type == "cuda":
        # The whole split fits on the GPU as uint8 (2,000 frames at 224 px = 300 MB): batches are
        # then gathered and augmented there, with no host-to-device copy per step.
        torch.backends.cudnn.benchmark = True
        images = {s: t.to(device) for s, t in images.items()}
        labels = {s: t.to(device) for s, t in labels.items()}
    eval_bs = 2 * int(tcfg["batch_size"]) if device.type == "cpu" else 256
    log.info("fold %d: %d train / %d val / %d test frames on %s", fold,
             *(len(parts[s]) for s in ("train", "val", "test")), device)

    torch.manual_seed(epoch_seed(seed, fold, -1))
    model = build_model(model_cfg, num_classes=len(classes)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(loss_cfg, num_classes=len(classes)).to(device)
    opt_cfg = tcfg["optimizer"]
    if opt_cfg["name"] != "adam":
        raise ConfigError(f"train.optimizer.name={opt_cfg['name']!r}: only 'adam' is implemented")
    trainable = [p for p in model.parameters() if p.requires_grad]
    use_graph = bool(tcfg.get("cuda_graph", False))
    if use_graph and device.type != "cuda":
        log.info("train.cuda_graph is for CUDA devices; eager steps on %s", device)
        use_graph = False
    optimizer = make_adam(trainable, float(opt_cfg["lr"]), tuple(opt_cfg["betas"]),
                          float(opt_cfg["weight_decay"]), device, cuda_graph=use_graph)

    key = run_key(model_cfg, loss_cfg, dict(tcfg), get(params, "folds"), seed, fold,
                  list(parts["train"]["frame"]))
    resume_path = RESUME_DIR / f"{model_name}-{loss_name}" / f"fold_{fold}-{key}.pt"
    state = {"epoch": -1, "step": 0, "history": [], "best_loss": float("inf"), "best_epoch": -1,
             "best_state": None, "plateau_wait": 0, "plateau_best": float("inf"), "lr_scale": 1.0,
             "stop_wait": 0, "train_seconds": 0.0}
    if resume_path.is_file():
        saved = torch.load(resume_path, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        lr_to_device(optimizer, device)
        state = saved["state"]
        log.info("fold %d: resuming after epoch %d from %s", fold, state["epoch"] + 1, resume_path)

    base_lr, decay = float(opt_cfg["lr"]), float(opt_cfg.get("decay", 0.0))
    es_patience = int(tcfg["early_stopping"]["patience"])
    pl_cfg = tcfg["lr_plateau"]
    milestones, step_factor = lr_milestones(tcfg)
    bs = int(tcfg["batch_size"])
    n_train = len(images["train"])
    graph = CudaGraphStep(model, loss_fn, optimizer, bs, amp) if use_graph else None
    with tracker.run(f"fold_{fold}", nested=True, tags={"fold": str(fold)}):
        review.log_fold_split(tracker, params, fold, f"{model_name}-{loss_name}", split)
        for h in state["history"]:  # a resumed run re-logs the epochs it already has
            tracker.log_metrics({k: v for k, v in h.items() if k != "epoch"}, step=h["epoch"])
        for epoch in range(state["epoch"] + 1, int(tcfg["epochs"])):
            if state["stop_wait"] >= es_patience:
                break
            started = time.monotonic()
            torch.manual_seed(epoch_seed(seed, fold, epoch))
            gen = torch.Generator().manual_seed(epoch_seed(seed, fold, epoch))
            model.train()
            # Running sums stay on the device: no host sync per step.
            total = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            scale = state["lr_scale"] * step_factor ** milestones_passed(milestones, epoch)
            for idx in _batches(n_train, bs, gen):
                if len(idx) < 2:  # BatchNorm cannot train on a batch of one
                    continue
                set_lr(optimizer, base_lr * scale / (1.0 + decay * state["step"]))
                loss, n_correct = train_step(model, loss_fn, optimizer, images["train"][idx],
                                             labels["train"][idx], tcfg["augment"], gen, device,
                                             amp, channels_last, graph)
                state["step"] += 1
                total += loss * len(idx)
                correct += n_correct
                seen += len(idx)
            total, correct = float(total.item()), int(correct.item())
            val_loss, val_acc, _ = evaluate_loss(model, loss_fn, images["val"], labels["val"],
                                                 device, eval_bs, amp, channels_last)
            seconds = time.monotonic() - started
            state["train_seconds"] += seconds
            row = {"epoch": epoch, "train_loss": total / max(seen, 1),
                   "train_accuracy": correct / max(seen, 1), "val_loss": val_loss,
                   "val_accuracy": val_acc, "lr": current_lr(optimizer), "seconds": seconds}
            state["history"].append(row)
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            log.info("fold %d epoch %d/%d: train loss %.4f acc %.3f | val loss %.4f acc %.3f | %.1fs",
                     fold, epoch + 1, tcfg["epochs"], row["train_loss"], row["train_accuracy"],
                     val_loss, val_acc, seconds)
            if val_loss < state["best_loss"]:
                state.update(best_loss=val_loss, best_epoch=epoch, stop_wait=0,
                             best_state=copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()}))
            else:
                state["stop_wait"] += 1
            if val_loss < state["plateau_best"]:
                state.update(plateau_best=val_loss, plateau_wait=0)
            elif float(pl_cfg["factor"]) != 1.0:  # factor 1 turns the plateau schedule off
                state["plateau_wait"] += 1
                if state["plateau_wait"] > int(pl_cfg["patience"]) - 1:
                    state["lr_scale"] *= float(pl_cfg["factor"])
                    state["plateau_wait"] = 0
                    log.info("fold %d: validation loss stalled %d epochs, lr x%s", fold,
                             pl_cfg["patience"], pl_cfg["factor"])
            state["epoch"] = epoch
            resume_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = resume_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "state": state}, tmp)
            os.replace(tmp, resume_path)

        if state["best_state"] is not None:  # restore the best epoch, as Keras restore_best_weights
            model.load_state_dict(state["best_state"])
        fold_dir = out_dir / f"fold_{fold}"
        save_checkpoint(fold_dir / "best.pt", model, model_cfg=model_cfg, classes=classes,
                        image_size=int(tcfg["image_size"]), epoch=state["best_epoch"],
                        interpolation=store.interpolation,
                        meta={"model": model_name, "loss": loss_name, "fold": fold, "seed": seed})
        pd.DataFrame(state["history"]).to_csv(fold_dir / "history.csv", index=False)

        # Validation predictions of the restored weights too: binary_eval picks its held-out
        # operating threshold on them.
        probs = {split: torch.softmax(predict_logits(model, images[split], device, eval_bs, amp,
                                                     channels_last), 1).numpy()
                 for split in ("val", "test")}
        tables = {split: prediction_table(parts[split], fold, p, classes)
                  for split, p in probs.items()}
        for split, table in tables.items():
            table.to_csv(fold_dir / f"{split}_predictions.csv", index=False)
        preds = tables["test"]

        from pipeline.evaluation.metrics import classification_metrics, metrics_to_flat

        m = classification_metrics(preds["y_true"].to_numpy(), preds["y_pred"].to_numpy(),
                                   probs["test"], classes)
        fold_record = {"fold": fold, "best_epoch": state["best_epoch"],
                       "epochs_run": len(state["history"]), "train_seconds": state["train_seconds"],
                       "precision": {"amp_bf16": amp, "channels_last": channels_last},
                       "metrics": m}
        if graph is not None:  # how the steps ran: captured and replayed, or eager
            fold_record["cuda_graph"] = {"captured": graph.captured, "failed": graph.failed,
                                         "steps": dict(graph.calls)}
        (fold_dir / "metrics.json").write_text(json.dumps(fold_record, indent=2) + "\n")
        tracker.log_metrics({f"test.{k}": v for k, v in metrics_to_flat(m).items()})
        tracker.log_metrics({"train_seconds": state["train_seconds"],
                             "best_epoch": state["best_epoch"]})
        tracker.log_dict({"classes": classes, "matrix": m["confusion_matrix"]},
                         "confusion_matrix.json")
    resume_path.unlink(missing_ok=True)
    return preds


def summarize_cell(out_dir: Path, folds: Sequence[int], classes: Sequence[str]) -> tuple[dict, dict]:
    """Join the folds' test predictions into ``predictions.csv`` and write the cell's
    ``metrics.json`` (what ``dvc exp show`` lists). Also used to collect folds trained in
    separate processes (e.g. in parallel on one GPU)."""
    from pipeline.evaluation.metrics import summarize_folds

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
    return metrics, summary


def run(params: Mapping, model_name: str, loss_name: str, folds: Sequence[int],
        out_root: Path = Path("models")) -> dict:
    """Train the given folds of one grid cell; write the cell's predictions and metrics."""
    from pipeline.models.zoo import describe_init

    model_cfg, loss_cfg = select_run(params, model_name, loss_name)
    ds, fcfg, tcfg = get(params, "dataset"), get(params, "folds"), get(params, "train")
    # First: a required but unreachable store fails in seconds, before any data is loaded.
    tracker = Tracker(params.get("tracking", {}))
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
                            "profile": params.get("profile", "")})
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    model, loss, folds, overrides = parse_args(argv)
    params = apply_overrides(load_params(), overrides)
    select_run(params, model, loss)  # unknown names fail before any work
    run(params, model, loss, folds if folds is not None else list(get(params, "train.folds")))


if __name__ == "__main__":
    run_main(main)
