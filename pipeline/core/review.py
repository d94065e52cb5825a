"""What a reviewer sees in MLflow: every stage's results on the training run they belong to.

The train stage opens one parent run per (model, loss) cell and tags it with the cell, the code
revision, the DVC experiment and, once its folds are done, the SHA-256 of the cell's
``predictions.csv``. The stages after it (evaluate, export, benchmark, binary_eval, report) find
that run by those tags (:meth:`ResultLog.cell`): the cell and the digest of the predictions they
read identify the training that produced their inputs, wherever it sits among other runs;
among several such runs (the same models retrained), the one of this revision and experiment,
then the newest. Each stage reopens the run and adds its figures:

- train: the dataset as an MLflow dataset input (name, source, a digest of the checksum list and
  the frame manifest), the experiment's description, and per fold run its split (patients,
  videos and frames of train/val/test, each split a dataset input) as parameters;
- evaluate: pooled metrics with their patient-level intervals (``accuracy``,
  ``accuracy_ci_low``, ``accuracy_ci_high``, per class, video level) and the paired comparisons
  (table ``evaluation/comparisons.json``);
- export: per format the parity figures and file size, the PyTorch and ONNX models as MLflow
  logged models (see :func:`log_fold_models` for which folds), the TFLite files as artifacts;
- benchmark: latency per runtime and thread count (on the run of the loss it timed);
- binary_eval: the AUC, the sweep and both operating points;
- report: the row's figures (confusion matrix + ROC, training curves, Grad-CAM).

Tracking that is off or unreachable costs no stage its outputs: the stage says so once and goes
on (``tracking.required`` makes it an error, as in training).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core.config import get
from pipeline.core.files import sha256_file
from pipeline.core.tracking import Tracker, git_revision, standard_tags

log = logging.getLogger("pipeline.core.review")

DIGEST_TAG = "predictions_sha256"
SPLITS = {"train": "train", "val": "validation", "test": "test"}
# Columns of a frame table that describe the data (not the stage's bookkeeping).
DATA_COLUMNS = ("frame", "source", "patient", "class", "label", "probe", "kind")


def numbers(d: Mapping, prefix: str = "") -> dict[str, float]:
    """Nested dict -> ``{"a.b": float}`` for its numbers (bools included; strings, None, NaN
    and lists left out, but an interval ``x_ci: [low, high]`` becomes ``x_ci_low`` and
    ``x_ci_high``)."""
    out: dict[str, float] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(numbers(value, name))
        elif str(key).endswith("_ci") and isinstance(value, (list, tuple)) and len(value) == 2:
            out.update(numbers({f"{key}_low": value[0], f"{key}_high": value[1]}, prefix))
        elif isinstance(value, (bool, int, float)) or type(value).__module__ == "numpy":
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if v == v:
                out[name] = v
    return out


def predictions_digest(run_dir: str | Path) -> str | None:
    path = Path(run_dir) / "predictions.csv"
    return sha256_file(path) if path.is_file() else None


class ResultLog:
    """One stage's MLflow connection; :meth:`cell` reopens a cell's training run."""

    def __init__(self, params: Mapping, stage: str):
        self.params, self.stage = params, stage
        self.tracker = Tracker(params.get("tracking", {}))
        self.warned = False
        self.prefer = {"git_revision": git_revision(),
                       "dvc_exp_name": standard_tags(params)["dvc_exp_name"]}

    @contextmanager
    def cell(self, cell: str, models_dir: Path = Path("models")) -> Iterator[Tracker | None]:
        """The cell's training run, reopened for the block; None when tracking is off, the store
        unreachable, or no run of these predictions exists (said once per stage)."""
        digest = predictions_digest(models_dir / cell)
        run_id = None
        if self.tracker.enabled and digest:
            run_id = self.tracker.find_parent({"cell": cell, DIGEST_TAG: digest}, self.prefer)
        if run_id is None:
            if self.tracker.enabled and not self.warned:
                log.warning("%s: no MLflow training run in experiment %s for %s (trained with "
                            "tracking off or into another store); results are in the files only",
                            self.stage, self.tracker.experiment, cell)
                self.warned = True
            yield None
            return
        with self.tracker.resume(run_id):
            yield self.tracker if self.tracker.enabled else None


# --- train -----------------------------------------------------------------------------------

def data_digest(params: Mapping) -> str:
    """Changes exactly when the data change: the checksum list of the raw files and the frame
    manifest (which frames, of which patient and class)."""
    ds = get(params, "dataset")
    h = hashlib.sha256()
    for path in (Path(str(ds.get("checksums") or "")), Path(ds["frames_dir"]) / "manifest.csv"):
        if path.is_file():
            h.update(sha256_file(path).encode())
    return h.hexdigest()[:32]


def data_source(params: Mapping) -> str:
    """Where the raw files came from: the source fetch_data used (``data/fetch.json``), else the
    first of ``dataset.sources``."""
    fetched = Path("data/fetch.json")
    if fetched.is_file():
        source = json.loads(fetched.read_text()).get("source")
        if source:
            return str(source)
    sources = get(params, "dataset").get("sources") or [""]
    return str(sources[0])


def _log_frames(tracker: Tracker, frame_table, name: str, source: str, context: str,
                digest: str | None = None, tags: Mapping[str, str] | None = None) -> None:
    """A frame table as an MLflow dataset input: its data columns' schema and size, the source
    as params name it (a relative folder stays relative, a URL stays a URL)."""
    import warnings

    import mlflow.data

    cols = [c for c in DATA_COLUMNS if c in frame_table.columns]
    with warnings.catch_warnings():  # source "interpreted in multiple ways", integer columns
        warnings.simplefilter("ignore", UserWarning)
        dataset = tracker.safely(mlflow.data.from_pandas, frame_table[cols].reset_index(drop=True),
                                 source=source, name=name, digest=digest,
                                 targets="label" if "label" in cols else None)
        if dataset is not None:
            tracker.log_input(dataset, context, tags)


def log_dataset(tracker: Tracker, params: Mapping, frames) -> None:
    """The dataset on a cell's parent run: every used frame, its source and digest."""
    if not tracker.enabled:
        return
    ds = get(params, "dataset")
    _log_frames(tracker, frames, str(ds["name"]), data_source(params), "training",
                data_digest(params), {"sources": json.dumps(list(ds.get("sources") or []))[:5000]})


def log_fold_split(tracker: Tracker, params: Mapping, fold: int, cell: str,
                   parts: Mapping[str, Any]) -> None:
    """A fold run's split as parameters (sizes per split) and as three dataset inputs."""
    if not tracker.enabled:
        return
    model, _, loss = cell.partition("-")
    split = {"fold": fold, "model": model, "loss": loss}
    for name, part in parts.items():
        split.update({f"{name}.frames": len(part), f"{name}.videos": part["source"].nunique(),
                      f"{name}.patients": part["patient"].nunique()})
    tracker.log_params(split)
    ds_name, source = str(get(params, "dataset.name")), data_source(params)
    for name, part in parts.items():
        _log_frames(tracker, part, f"{ds_name}/fold_{fold}/{name}", source, SPLITS.get(name, name))


def experiment_note(params: Mapping) -> str:
    """The experiment's description: profile, protocol, data and the deviations the report
    states, and where each figure is on a run."""
    ds, folds, train = get(params, "dataset"), get(params, "folds"), get(params, "train")
    opt = train["optimizer"]
    leaky = folds["validation"] == "test_fold"
    lines = [
        f"# {ds['name']}: {params.get('profile')} profile",
        "",
        f"**Data.** `{ds['name']}` ({ds.get('kind', '')}), classes {', '.join(ds['classes'])}, "
        f"from {', '.join(map(str, ds.get('sources') or []))}; every file checked against "
        f"`{ds.get('checksums')}`.",
        "",
        f"**Protocol.** {folds['k']}-fold patient-level cross-validation ({folds['method']}), "
        f"{train['image_size']} px, {train['epochs']} epochs, batch {train['batch_size']}, "
        f"{opt['name']} lr {opt['lr']}, at most {train.get('max_frames_per_source') or 'all'} "
        f"frames per video; seed {params.get('seed')}. Grid: "
        f"{', '.join(get(params, 'grid.models'))} x {', '.join(get(params, 'grid.losses'))}.",
        "",
        "**Deviations from the published protocol.** "
        + ("Validation is the test fold, as in the study's notebooks: every figure LEAKS test "
           "data into model selection. " if leaky else
           "Validation for early stopping is carved from each fold's training patients (the "
           "study's notebooks used the test fold). ")
        + "Every fold is run for every row. "
        + ("The quick profile uses small inputs and few epochs: the numbers show the pipeline "
           "works, not the study's results." if params.get("profile") == "quick" else ""),
        "",
        "**On each (model, loss) run.** Metrics: pooled accuracy and per-class figures with "
        "patient-level bootstrap intervals (`*_ci_low`, `*_ci_high`), video level (`video.*`), "
        "export parity (`parity.*`), file sizes (`size_mb.*`), latency (`latency.*`). Logged "
        "models: PyTorch and ONNX. Datasets: the frames used, and each fold run's splits. "
        "Artifacts: `figures/`, `evaluation/comparisons.json`, `export/`, `benchmark/`.",
    ]
    return "\n".join(lines)


def describe_training(tracker: Tracker, params: Mapping, cell: str, folds: Iterable[int]) -> None:
    """The experiment's description and model-training view, and the run's own description."""
    if not tracker.enabled:
        return
    tracker.set_experiment_tags({"mlflow.note.content": experiment_note(params),
                                 "mlflow.experimentKind": "custom_model_development"})
    tracker.set_tags({"mlflow.note.content":
                      f"{cell} trained on `{get(params, 'dataset.name')}` folds {list(folds)} "
                      f"({params.get('profile')} profile). Child runs: one per fold, with its "
                      f"split as parameters and dataset inputs."})


# --- evaluate --------------------------------------------------------------------------------

def evaluation_metrics(result: Mapping) -> dict[str, float]:
    """A cell's pooled figures with their patient-level bootstrap intervals (``k``,
    ``k_ci_low``, ``k_ci_high``) and its video-level figures (``video.*``: mean probability,
    ``video_vote.*``: majority vote)."""
    boot = result["bootstrap"]
    point, low, high = (numbers(boot[k]) for k in ("point", "low", "high"))
    out: dict[str, float] = {}
    for key, value in point.items():
        out[key] = value
        if key in low and key in high:
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = low[key], high[key]
    out.update(numbers(result["video"]["mean"]["pooled"], "video"))
    out.update(numbers(result["video"]["vote"]["pooled"], "video_vote"))
    out.update({k: float(result[k]) for k in ("n_frames", "n_videos", "n_patients")})
    return out


def comparison_rows(comparisons: Mapping[str, Mapping], cell: str) -> list[dict]:
    """The paired comparisons that involve ``cell``, one row each (``"a vs b"`` keys)."""
    rows = []
    for name, figures in comparisons.items():
        a, _, b = name.partition(" vs ")
        if cell in (a, b):
            rows.append({"comparison": name, "a": a, "b": b, **numbers(figures)})
    return rows


def log_evaluation(params: Mapping, results: Mapping) -> None:
    """Stage evaluate: every cell's intervals and its paired comparisons on its run."""
    results_log = ResultLog(params, "evaluate")
    for cell, result in results["cells"].items():
        with results_log.cell(cell) as tracker:
            if tracker is None:
                continue
            tracker.log_metrics(evaluation_metrics(result))
            rows = comparison_rows(results.get("comparisons", {}), cell)
            if rows:
                import pandas as pd

                tracker.log_table(pd.DataFrame(rows), "evaluation/comparisons.json")
            tracker.log_dict(result, "evaluation/evaluation.json")


# --- export ----------------------------------------------------------------------------------

def parity_metrics(summary: Mapping) -> dict[str, float]:
    """Per format: worst logit difference, lowest top-1 agreement, accuracy change, size."""
    out: dict[str, float] = {}
    for fmt, s in summary["per_format"].items():
        out.update(numbers({k: v for k, v in s.items() if k != "size_bytes"}, f"parity.{fmt}"))
        out[f"size_mb.{fmt}"] = float(s["size_bytes"]) / 1e6
    return out


def _logged(tracker: Tracker, name: str, sha256: str) -> bool:
    """Whether the active run already has a logged model ``name`` of these very bytes."""
    run = tracker.mlflow.active_run()
    found = tracker.safely(tracker.mlflow.search_logged_models,
                           experiment_ids=[run.info.experiment_id],
                           filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{name}'",
                           output_format="list")
    return any((m.tags or {}).get("sha256") == sha256 for m in found or [])


def _requirements(*packages: str) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in packages:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def _log_torch(model: Any, **kwargs: Any) -> Any:
    """The model as a ``torch.export`` program (loads without this project's code; the batch
    axis is dynamic as the input example has two frames), else pickled."""
    import mlflow.pytorch

    try:
        return mlflow.pytorch.log_model(model, serialization_format="pt2", **kwargs)
    except Exception as exc:  # noqa: BLE001 - an architecture torch.export cannot trace
        log.info("torch.export of %s failed (%s): logging it pickled", kwargs.get("name"),
                 str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return mlflow.pytorch.log_model(model, serialization_format="pickle", **kwargs)


def log_fold_models(tracker: Tracker, model: Any, fold: int, checkpoint: Path, example: Any,
                    onnx_path: Path, fold_metrics: Mapping[str, float],
                    onnx_metrics: Mapping[str, float]) -> None:
    """One fold's PyTorch model and ONNX export as MLflow logged models, each with a signature,
    an input example (real frames of the fold: RGB float in [0, 1], the model normalises
    inside) and its metrics; skipped when the run already has these bytes logged."""
    import mlflow
    import mlflow.onnx
    import numpy as np
    import onnx
    import torch
    from mlflow.models import infer_signature

    example = np.ascontiguousarray(example, dtype=np.float32)
    with torch.no_grad():
        output = model.eval()(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    tags = {"fold": str(fold)}
    name, digest = f"pytorch_fold_{fold}", sha256_file(checkpoint)
    if not _logged(tracker, name, digest):
        info = tracker.safely(_log_torch, model, name=name, signature=signature,
                              input_example=example, tags={**tags, "sha256": digest},
                              pip_requirements=_requirements("torch", "numpy"))
        if info is not None:
            tracker.safely(mlflow.log_metrics, dict(fold_metrics), model_id=info.model_id)
    name, digest = f"onnx_fold_{fold}", sha256_file(onnx_path)
    if not _logged(tracker, name, digest):
        info = tracker.safely(mlflow.onnx.log_model, onnx.load(str(onnx_path)), name=name,
                              signature=signature, input_example=example,
                              save_as_external_data=False, tags={**tags, "sha256": digest},
                              pip_requirements=_requirements("onnx", "onnxruntime", "numpy"))
        if info is not None:
            tracker.safely(mlflow.log_metrics, dict(onnx_metrics), model_id=info.model_id)


def log_export_models(results: ResultLog, cell: str, records: Sequence[Mapping],
                      fold_models: Mapping[int, tuple], models_dir: Path = Path("models")) -> None:
    """Stage export: the logged models of ``fold_models`` (``{fold: (model, example
    frames)}``), each PyTorch model beside its ONNX file of ``records``."""
    with results.cell(cell, models_dir) as tracker:
        if tracker is None:
            return
        for fold, (model, example) in fold_models.items():
            onnx_rec = next((r for r in records
                             if r.get("fold") == fold and r["format"] == "onnx"), None)
            if onnx_rec is None:
                continue
            fold_dir = models_dir / cell / f"fold_{fold}"
            test = json.loads((fold_dir / "metrics.json").read_text())["metrics"]
            # The run's metrics are the models' too; these name the model's own fold and file.
            onnx_metrics = numbers({k: onnx_rec.get(k) for k in
                                    ("max_abs_diff", "top1_agreement", "accuracy_change")},
                                   f"fold_{fold}.onnx")
            onnx_metrics[f"fold_{fold}.onnx.size_mb"] = onnx_rec["size_bytes"] / 1e6
            test_metrics = numbers({k: test.get(k) for k in ("accuracy", "macro_f1", "mcc",
                                                             "auc_ovr")}, f"fold_{fold}.test")
            log_fold_models(tracker, model, fold, fold_dir / "best.pt", example,
                            Path(onnx_rec["file"]), test_metrics, onnx_metrics)


def log_export(results: ResultLog, cell: str, summary: Mapping,
               models_dir: Path = Path("models")) -> None:
    """Stage export: parity and sizes per format, and every TFLite file as an artifact."""
    with results.cell(cell, models_dir) as tracker:
        if tracker is None:
            return
        tracker.log_metrics(parity_metrics(summary))
        import pandas as pd

        tracker.log_table(pd.DataFrame(summary["records"]), "export/parity.json")
        for r in summary["records"]:
            if r["format"].startswith("tflite"):
                tracker.log_artifact(r["file"], f"tflite/fold_{r['fold']}")


# --- benchmark, binary_eval, report -----------------------------------------------------------

def latency_metrics(result: Mapping) -> dict[str, float]:
    """``latency.<format>.<device>.<threads>t.median_ms`` / ``.p90_ms`` per record (a remote
    host's records under its name) and the model's complexity (``complexity.*``)."""
    out: dict[str, float] = {}
    for r in result.get("records", []):
        host = "" if r.get("host", "local") == "local" else f"{r['host']}."
        key = f"latency.{host}{r['format']}.{r.get('device_type', 'cpu')}.{r['threads']}t"
        for stat in ("median_ms", "p90_ms"):
            if r.get(stat) is not None:
                out[f"{key}.{stat}"] = float(r[stat])
    out.update(numbers(result.get("complexity") or {}, "complexity"))
    return out


def log_benchmark(params: Mapping, cell: str, result: Mapping) -> None:
    """Stage benchmark: latency per runtime and thread count on the run it timed."""
    with ResultLog(params, "benchmark").cell(cell) as tracker:
        if tracker is None:
            return
        tracker.log_metrics(latency_metrics(result))
        tracker.log_dict(result, "benchmark/latency.json")


def log_binary(params: Mapping, compact: Mapping[str, Mapping], out_dir: Path) -> None:
    """Stage binary_eval: AUC, sweep and operating points per cell, and its files."""
    results_log = ResultLog(params, "binary_eval")
    for cell, figures in compact.items():
        with results_log.cell(cell) as tracker:
            if tracker is None:
                continue
            tracker.log_metrics(numbers(figures, "binary"))
            if (out_dir / cell).is_dir():
                tracker.safely(tracker.mlflow.log_artifacts, str(out_dir / cell), "binary_eval")


def log_figures(params: Mapping, figures: Mapping[str, list[Path]]) -> None:
    """Stage report: each cell's figures (``{cell: [png, ...]}``) under ``figures/``."""
    results_log = ResultLog(params, "report")
    for cell, paths in figures.items():
        with results_log.cell(cell) as tracker:
            if tracker is None:
                continue
            for path in paths:
                if Path(path).is_file():
                    tracker.log_artifact(path, "figures")
