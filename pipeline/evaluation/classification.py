"""Figures of merit of one prediction table, and fold summaries.

Every function in ``pipeline.evaluation`` works on the prediction table that the train stage
writes, one row per test frame::

    frame, source, patient, fold, y_true, y_pred, prob_<class> (one per class; rows sum to 1)

The figures are the paper's (Mini-COVIDNet, Section V): per class sensitivity (recall),
specificity, precision and F1, plus overall accuracy; macro-F1, MCC and one-vs-rest ROC AUC are
added. Values come from scikit-learn. Undefined figures (0/0, e.g. the sensitivity of a class
with no test samples) are NaN, never an exception, and :func:`classification_metrics` says why in
``notes``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    confusion_matrix,
    matthews_corrcoef,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

#: Per-class figures reported in fold summaries and bootstraps (``support`` is a count, not a figure).
PER_CLASS_FIGURES = ("sensitivity", "specificity", "precision", "f1", "auc")
#: Overall figures reported in fold summaries and bootstraps.
OVERALL_FIGURES = ("accuracy", "macro_f1", "mcc", "auc_ovr")
#: Standard deviation across folds uses the sample estimate (ddof=1): the folds are a sample of
#: possible patient splits, and this is what "mean +- std over 5 folds" usually means in papers.
FOLD_STD_DDOF = 1


# --------------------------------------------------------------------------- table helpers
def prob_columns(classes: Sequence[str]) -> list[str]:
    """Names of the probability columns of the prediction table, in class order."""
    return [f"prob_{c}" for c in classes]


def require_columns(df: pd.DataFrame, columns: Sequence[str], what: str = "prediction table") -> None:
    """Raise a KeyError naming the missing columns and the expected schema."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(f"{what} lacks column(s) {missing}; it has {list(df.columns)}. Expected the "
                       f"train stage's schema: frame, source, patient, fold, y_true, y_pred, "
                       f"prob_<class> for each class")


def table_arrays(df: pd.DataFrame, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``y_true``, ``y_pred`` (int64) and the N x C probabilities of a prediction table."""
    cols = prob_columns(classes)
    require_columns(df, ["y_true", "y_pred", *cols])
    return (df["y_true"].to_numpy(dtype=np.int64), df["y_pred"].to_numpy(dtype=np.int64),
            df[cols].to_numpy(dtype=np.float64))


def nan_ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """num / den, NaN where den == 0 (an undefined figure), without division warnings."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


# --------------------------------------------------------------------------- point metrics
def classification_metrics(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                           y_prob: np.ndarray | None, classes: Sequence[str]) -> dict[str, Any]:
    """Figures of merit of one set of predictions.

    Args:
        y_true: True class indices (0 .. len(classes)-1).
        y_pred: Predicted class indices.
        y_prob: N x C class probabilities (scores) in ``classes`` order, or None to skip AUC.
        classes: Class names; index i of ``y_true``/``y_pred`` is ``classes[i]``.

    Returns:
        ``{"n", "accuracy", "macro_f1", "mcc", "auc_ovr", "per_class": {name: {"sensitivity",
        "specificity", "precision", "f1", "auc", "support"}}, "confusion_matrix" (rows = true,
        columns = predicted), "notes"}``. Plain Python numbers and lists, so ``json.dumps`` works
        (NaN is written as ``NaN``). Figures that are 0/0 are NaN and ``notes`` says why.
        ``macro_f1`` averages the classes whose F1 is defined (scikit-learn's rule);
        ``auc_ovr`` is the mean of the per-class one-vs-rest AUCs and NaN if any is undefined.

    Raises:
        ValueError: On empty input, mismatched lengths or class indices outside the class list.
    """
    classes = list(classes)
    y_true, y_pred = _class_indices(y_true, y_pred, classes)
    labels = list(range(len(classes)))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    prec, rec, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=np.nan)
    mcm = multilabel_confusion_matrix(y_true, y_pred, labels=labels)  # per class [[tn, fp], [fn, tp]]
    spec = nan_ratio(mcm[:, 0, 0], mcm[:, 0, 0] + mcm[:, 0, 1])
    with warnings.catch_warnings():
        # Single-label input only triggers scikit-learn's "pass labels" advice; MCC is then 0.
        warnings.simplefilter("ignore", UserWarning)
        mcc = matthews_corrcoef(y_true, y_pred)
    defined_f1 = f1[~np.isnan(f1)]
    macro_f1 = float(defined_f1.mean()) if defined_f1.size else math.nan
    auc = _one_vs_rest_auc(y_true, y_prob, classes)
    notes = _undefined_figure_notes(classes, support, cm, auc, has_probs=y_prob is not None)
    auc_ovr = math.nan
    if y_prob is not None and not np.isnan(auc).any():
        auc_ovr = float(auc.mean())  # = roc_auc_score(multi_class="ovr", average="macro")
    per_class = {
        name: {"sensitivity": float(rec[k]), "specificity": float(spec[k]),
               "precision": float(prec[k]), "f1": float(f1[k]), "auc": float(auc[k]),
               "support": int(support[k])}
        for k, name in enumerate(classes)
    }
    return {
        "n": int(y_true.size),
        "accuracy": float(np.trace(cm) / y_true.size),
        "macro_f1": macro_f1,
        "mcc": float(mcc),
        "auc_ovr": auc_ovr,
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
        "notes": notes,
    }


def _class_indices(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                   classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``y_true`` and ``y_pred`` as int64 vectors, checked: non-empty, same length, valid indices."""
    n_cls = len(classes)
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.size == 0:
        raise ValueError("classification_metrics got no samples (empty y_true)")
    if y_pred.shape != y_true.shape:
        raise ValueError(f"y_pred has {y_pred.size} values but y_true has {y_true.size}")
    for name, arr in (("y_true", y_true), ("y_pred", y_pred)):
        bad = np.unique(arr[(arr < 0) | (arr >= n_cls)])
        if bad.size:
            raise ValueError(f"{name} holds class indices {bad.tolist()} outside 0..{n_cls - 1} "
                             f"(classes {classes})")
    return y_true, y_pred


def _one_vs_rest_auc(y_true: np.ndarray, y_prob: np.ndarray | None,
                     classes: list[str]) -> np.ndarray:
    """Per-class one-vs-rest ROC AUC; NaN where undefined (one class only) or without ``y_prob``."""
    n_cls = len(classes)
    auc = np.full(n_cls, np.nan)
    if y_prob is None:
        return auc
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_prob.shape != (y_true.size, n_cls):
        raise ValueError(f"y_prob has shape {y_prob.shape}; expected ({y_true.size}, {n_cls}) "
                         f"= (samples, classes {classes})")
    for k in range(n_cls):
        positive = y_true == k
        if positive.all() or not positive.any():
            continue  # reported with the other undefined figures
        auc[k] = roc_auc_score(positive, y_prob[:, k])
    return auc


def _undefined_figure_notes(classes: list[str], support: np.ndarray, cm: np.ndarray,
                            auc: np.ndarray, *, has_probs: bool) -> list[str]:
    """Why each undefined (NaN) figure is undefined, for the ``notes`` of the metrics."""
    notes = [] if has_probs else ["no probabilities given: AUC not computed"]
    n = int(support.sum())
    for k, name in enumerate(classes):
        if support[k] == 0:
            notes.append(f"{name}: no true samples, so sensitivity and AUC are undefined (NaN)")
        if support[k] == n:
            notes.append(f"{name}: every sample is {name}, so specificity and AUC are undefined (NaN)")
        if cm[:, k].sum() == 0:
            notes.append(f"{name}: never predicted, so precision is undefined (NaN)")
    if has_probs and np.isnan(auc).any():
        absent = [c for c, a in zip(classes, auc) if np.isnan(a)]
        notes.append(f"auc_ovr: undefined because the one-vs-rest AUC of {absent} is undefined")
    return notes


def metrics_from_table(preds: pd.DataFrame, classes: Sequence[str]) -> dict[str, Any]:
    """:func:`classification_metrics` of a prediction table (``y_true``, ``y_pred``, ``prob_*``)."""
    y_true, y_pred, y_prob = table_arrays(preds, classes)
    return classification_metrics(y_true, y_pred, y_prob, classes)


def metrics_to_flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten nested metric dicts to ``{"a.b.c": float}`` (MLflow metric names).

    Lists (the confusion matrix, notes), strings and None are skipped; numbers (including bools
    and numpy scalars) become floats, NaN included.

    Args:
        d: Nested mapping of metrics.
        prefix: Prepended to every key with a dot, e.g. ``"test"`` -> ``"test.accuracy"``.
    """
    flat: dict[str, float] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(metrics_to_flat(value, name))
        elif isinstance(value, (bool, int, float, np.integer, np.floating)):
            flat[name] = float(value)
    return flat


def _unflatten(flat: Mapping[str, float]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def figure_keys(classes: Sequence[str]) -> list[str]:
    """Flat keys (as :func:`metrics_to_flat` names them) of the figures summarised and bootstrapped."""
    return [*OVERALL_FIGURES,
            *(f"per_class.{c}.{f}" for c in classes for f in PER_CLASS_FIGURES)]


# --------------------------------------------------------------------------- folds
def summarize_folds(preds: pd.DataFrame, classes: Sequence[str]) -> dict[str, Any]:
    """Pooled and per-fold figures of a cross-validation prediction table.

    Args:
        preds: Prediction table with a ``fold`` column.
        classes: Class names in index order.

    Returns:
        ``{"pooled": metrics over all rows, "per_fold": {fold (int): metrics}, "fold_mean": ...,
        "fold_std": ..., "n_folds": int}``. ``fold_mean``/``fold_std`` hold accuracy, macro_f1, mcc,
        auc_ovr and ``per_class`` sensitivity/specificity/precision/f1/auc. The std is the sample
        std (ddof=1, NaN with a single fold). NaN propagates: a figure undefined in any fold has a
        NaN mean, so a missing class is visible rather than silently averaged away.
    """
    require_columns(preds, ["fold"])
    pooled = metrics_from_table(preds, classes)
    per_fold = {int(fold): metrics_from_table(rows, classes)
                for fold, rows in preds.groupby("fold", sort=True)}
    keys = figure_keys(classes)
    values = np.array([[metrics_to_flat(m)[k] for k in keys] for m in per_fold.values()])
    mean = values.mean(axis=0)
    std = (values.std(axis=0, ddof=FOLD_STD_DDOF) if len(per_fold) > FOLD_STD_DDOF
           else np.full(len(keys), np.nan))
    return {
        "pooled": pooled,
        "per_fold": per_fold,
        "fold_mean": _unflatten({k: float(v) for k, v in zip(keys, mean)}),
        "fold_std": _unflatten({k: float(v) for k, v in zip(keys, std)}),
        "n_folds": len(per_fold),
    }
