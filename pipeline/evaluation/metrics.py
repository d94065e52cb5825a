"""Figures of merit, fold summaries, patient-level uncertainty and video/fold-model aggregation.

Every function works on the prediction table that the train stage writes, one row per test frame::

    frame, source, patient, fold, y_true, y_pred, prob_<class> (one per class; rows sum to 1)

The figures are the paper's (Mini-COVIDNet, Section V): per class sensitivity (recall),
specificity, precision and F1, plus overall accuracy; macro-F1, MCC and one-vs-rest ROC AUC are
added. Values come from scikit-learn; the bootstrap reproduces them from resampled confusion
matrices (tested against scikit-learn) because calling scikit-learn 1000 times is too slow.

Frames of one patient are strongly correlated, so uncertainty is estimated by resampling whole
patients (:func:`patient_bootstrap`, :func:`paired_bootstrap_difference`): a frame-level interval
would be far too narrow. Undefined figures (0/0, e.g. the sensitivity of a class with no test
samples) are NaN, never an exception, and :func:`classification_metrics` says why in ``notes``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import (
    confusion_matrix,
    matthews_corrcoef,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

__all__ = [
    "BINARY_FIGURES",
    "PER_CLASS_FIGURES",
    "BinaryFigures",
    "FiguresOfMerit",
    "aggregate_videos",
    "classification_metrics",
    "ensemble_probabilities",
    "mcnemar_test",
    "metrics_from_table",
    "metrics_to_flat",
    "paired_bootstrap_difference",
    "patient_bootstrap",
    "prob_columns",
    "summarize_folds",
]

#: Per-class figures reported in fold summaries and bootstraps (``support`` is a count, not a figure).
PER_CLASS_FIGURES = ("sensitivity", "specificity", "precision", "f1", "auc")
#: Overall figures reported in fold summaries and bootstraps.
OVERALL_FIGURES = ("accuracy", "macro_f1", "mcc", "auc_ovr")
#: Standard deviation across folds uses the sample estimate (ddof=1): the folds are a sample of
#: possible patient splits, and this is what "mean +- std over 5 folds" usually means in papers.
FOLD_STD_DDOF = 1
#: How far a tied vote winner is nudged above the other tied classes (see :func:`_vote_fractions`).
VOTE_TIE_NUDGE = 1e-6


# --------------------------------------------------------------------------- table helpers
def prob_columns(classes: Sequence[str]) -> list[str]:
    """Names of the probability columns of the prediction table, in class order."""
    return [f"prob_{c}" for c in classes]


def _require_columns(df: pd.DataFrame, columns: Sequence[str], what: str = "prediction table") -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(f"{what} lacks column(s) {missing}; it has {list(df.columns)}. Expected the "
                       f"train stage's schema: frame, source, patient, fold, y_true, y_pred, "
                       f"prob_<class> for each class")


def _table_arrays(df: pd.DataFrame, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cols = prob_columns(classes)
    _require_columns(df, ["y_true", "y_pred", *cols])
    return (df["y_true"].to_numpy(dtype=np.int64), df["y_pred"].to_numpy(dtype=np.int64),
            df[cols].to_numpy(dtype=np.float64))


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
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
    labels = list(range(n_cls))
    notes: list[str] = []

    cm = confusion_matrix(y_true, y_pred, labels=labels)
    prec, rec, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=np.nan)
    mcm = multilabel_confusion_matrix(y_true, y_pred, labels=labels)  # per class [[tn, fp], [fn, tp]]
    spec = _ratio(mcm[:, 0, 0], mcm[:, 0, 0] + mcm[:, 0, 1])
    with warnings.catch_warnings():
        # Single-label input only triggers scikit-learn's "pass labels" advice; MCC is then 0.
        warnings.simplefilter("ignore", UserWarning)
        mcc = matthews_corrcoef(y_true, y_pred)
    defined_f1 = f1[~np.isnan(f1)]
    macro_f1 = float(defined_f1.mean()) if defined_f1.size else math.nan

    auc = np.full(n_cls, np.nan)
    if y_prob is None:
        notes.append("no probabilities given: AUC not computed")
    else:
        y_prob = np.asarray(y_prob, dtype=np.float64)
        if y_prob.shape != (y_true.size, n_cls):
            raise ValueError(f"y_prob has shape {y_prob.shape}; expected ({y_true.size}, {n_cls}) "
                             f"= (samples, classes {classes})")
        for k in range(n_cls):
            positive = y_true == k
            if positive.all() or not positive.any():
                continue  # reported below with the other undefined figures
            auc[k] = roc_auc_score(positive, y_prob[:, k])

    for k, name in enumerate(classes):
        if support[k] == 0:
            notes.append(f"{name}: no true samples, so sensitivity and AUC are undefined (NaN)")
        if support[k] == y_true.size:
            notes.append(f"{name}: every sample is {name}, so specificity and AUC are undefined (NaN)")
        if cm[:, k].sum() == 0:
            notes.append(f"{name}: never predicted, so precision is undefined (NaN)")
    auc_ovr = math.nan
    if y_prob is not None:
        if np.isnan(auc).any():
            absent = [c for c, a in zip(classes, auc) if np.isnan(a)]
            notes.append(f"auc_ovr: undefined because the one-vs-rest AUC of {absent} is undefined")
        else:
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


def metrics_from_table(preds: pd.DataFrame, classes: Sequence[str]) -> dict[str, Any]:
    """:func:`classification_metrics` of a prediction table (``y_true``, ``y_pred``, ``prob_*``)."""
    y_true, y_pred, y_prob = _table_arrays(preds, classes)
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


def _figure_keys(classes: Sequence[str]) -> list[str]:
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
    _require_columns(preds, ["fold"])
    pooled = metrics_from_table(preds, classes)
    per_fold = {int(fold): metrics_from_table(rows, classes)
                for fold, rows in preds.groupby("fold", sort=True)}
    keys = _figure_keys(classes)
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


# --------------------------------------------------------------------------- vectorised figures
class FiguresOfMerit:
    """Bootstrap statistic giving every figure of :func:`classification_metrics` at once.

    Calling it on a prediction table returns the flat dict ``{"accuracy", "macro_f1", "mcc",
    "auc_ovr", "per_class.<class>.<figure>"}`` with the same values (and NaN rules) as
    ``metrics_to_flat(metrics_from_table(df, classes))``. Its :meth:`replicates` method lets
    :func:`patient_bootstrap` compute all resamples from per-patient confusion matrices and
    weighted AUCs, instead of calling scikit-learn once per resample.

    Args:
        classes: Class names in index order.
        auc: Include the (slower) AUC figures.
    """

    def __init__(self, classes: Sequence[str], auc: bool = True) -> None:
        self.classes = list(classes)
        self.auc = auc

    def keys(self) -> list[str]:
        keys = _figure_keys(self.classes)
        return keys if self.auc else [k for k in keys if not k.endswith("auc") and k != "auc_ovr"]

    def __call__(self, df: pd.DataFrame) -> dict[str, float]:
        codes = np.zeros(len(df), dtype=np.int64)
        reps = self.replicates(df, codes, np.ones((1, 1)))
        return {k: float(v[0]) for k, v in reps.items()}

    def replicates(self, df: pd.DataFrame, group_codes: np.ndarray,
                   counts: np.ndarray) -> dict[str, np.ndarray]:
        """Figures of B weighted copies of ``df``.

        Args:
            df: Prediction table.
            group_codes: Group index (0 .. G-1) of each row.
            counts: B x G, how many times each group is drawn in each resample.

        Returns:
            Flat key -> array of B values.
        """
        y_true, y_pred, y_prob = _table_arrays(df, self.classes)
        n_cls = len(self.classes)
        for name, arr in (("y_true", y_true), ("y_pred", y_pred)):
            if arr.size and (arr.min() < 0 or arr.max() >= n_cls):
                raise ValueError(f"column {name!r} holds class indices outside 0..{n_cls - 1} "
                                 f"(classes {self.classes})")
        n_groups = counts.shape[1]
        group_cm = np.zeros((n_groups, n_cls * n_cls))
        np.add.at(group_cm, (group_codes, y_true * n_cls + y_pred), 1.0)
        cms = (counts @ group_cm).reshape(-1, n_cls, n_cls)  # B x true x pred

        tp = np.diagonal(cms, axis1=1, axis2=2)
        t_sum, p_sum = cms.sum(axis=2), cms.sum(axis=1)
        n = t_sum.sum(axis=1)
        fp, fn = p_sum - tp, t_sum - tp
        tn = n[:, None] - tp - fp - fn
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
        out: dict[str, np.ndarray] = {
            "accuracy": _ratio(tp.sum(axis=1), n),
            "macro_f1": _nanmean_rows(f1),
            # scikit-learn's multiclass MCC, including its 0 for a zero denominator
            "mcc": _mcc(tp.sum(axis=1), n, t_sum, p_sum),
        }
        figures = {"sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
                   "precision": _ratio(tp, tp + fp), "f1": f1}
        if self.auc:
            row_weights = counts[:, group_codes]
            figures["auc"] = np.stack([_weighted_auc(y_prob[:, k], y_true == k, row_weights)
                                       for k in range(n_cls)], axis=1)
            out["auc_ovr"] = figures["auc"].mean(axis=1)  # NaN if any class is undefined
        for k, name in enumerate(self.classes):
            for fig, vals in figures.items():
                out[f"per_class.{name}.{fig}"] = vals[:, k]
        return {k: out[k] for k in self.keys()}


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    defined = ~np.isnan(a)
    return _ratio(np.where(defined, a, 0.0).sum(axis=1), defined.sum(axis=1))


def _mcc(n_correct: np.ndarray, n: np.ndarray, t_sum: np.ndarray, p_sum: np.ndarray) -> np.ndarray:
    cov_tp = n_correct * n - (t_sum * p_sum).sum(axis=1)
    cov_pp = n**2 - (p_sum * p_sum).sum(axis=1)
    cov_tt = n**2 - (t_sum * t_sum).sum(axis=1)
    den = cov_pp * cov_tt
    return np.where(den == 0, 0.0, cov_tp / np.sqrt(np.where(den == 0, 1.0, den)))


def _weighted_auc(scores: np.ndarray, positive: np.ndarray, row_weights: np.ndarray,
                  max_cells: int = 4_000_000) -> np.ndarray:
    """One-vs-rest ROC AUC of B weighted copies of the rows (Mann-Whitney; ties count 1/2).

    Equals ``roc_auc_score(positive, scores)`` of the table with each row repeated ``weight``
    times. Processed in chunks of resamples to bound memory at ``max_cells`` floats.
    """
    order = np.argsort(scores, kind="stable")
    s, pos = scores[order], positive[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # one bin per distinct score
    out = np.empty(row_weights.shape[0])
    step = max(1, max_cells // max(1, len(scores)))
    for lo in range(0, row_weights.shape[0], step):
        w = row_weights[lo:lo + step][:, order]
        wp = np.add.reduceat(np.where(pos, w, 0.0), starts, axis=1)
        wn = np.add.reduceat(np.where(pos, 0.0, w), starts, axis=1)
        neg_below = np.cumsum(wn, axis=1) - wn
        num = (wp * (neg_below + 0.5 * wn)).sum(axis=1)
        out[lo:lo + step] = _ratio(num, wp.sum(axis=1) * wn.sum(axis=1))
    return out


#: Figures of a two-class decision rule (``score >= threshold`` is positive), :class:`BinaryFigures`.
BINARY_FIGURES = ("accuracy", "sensitivity", "specificity", "precision", "f1")


class BinaryFigures:
    """Bootstrap statistic of a two-class task at one or more decision rules, plus the AUC.

    A row is called positive when its ``score_col`` is >= the rule's threshold. A rule's
    threshold is a number (one threshold for every row, e.g. a sweep value) or the name of a
    column holding each row's own threshold (e.g. the threshold chosen on the validation rows
    of the row's fold, so that pooled figures combine per-fold rules).

    Calling it on a prediction table returns ``{"auc", "<rule>.<figure>"}`` for every figure
    in :data:`BINARY_FIGURES`; :meth:`replicates` gives :func:`patient_bootstrap` all resamples
    at once from per-patient counts, like :class:`FiguresOfMerit`.

    Args:
        positive: Class index (``y_true``) of the positive class.
        score_col: Column of the positive-class score.
        rules: ``{name: threshold (float) or column name (str)}``.
        auc: Include the AUC of ``score_col``.
    """

    def __init__(self, positive: int, score_col: str, rules: Mapping[str, float | str],
                 auc: bool = True) -> None:
        self.positive, self.score_col, self.auc = int(positive), score_col, auc
        self.rules = dict(rules)
        for name in self.rules:
            if "." in str(name):
                raise ValueError(f"rule name {name!r} must not contain '.' (it separates the figure)")

    def keys(self) -> list[str]:
        return (["auc"] if self.auc else []) + [f"{r}.{f}" for r in self.rules for f in BINARY_FIGURES]

    def __call__(self, df: pd.DataFrame) -> dict[str, float]:
        reps = self.replicates(df, np.zeros(len(df), dtype=np.int64), np.ones((1, 1)))
        return {k: float(v[0]) for k, v in reps.items()}

    def replicates(self, df: pd.DataFrame, group_codes: np.ndarray,
                   counts: np.ndarray) -> dict[str, np.ndarray]:
        """Figures of B weighted copies of ``df`` (see :meth:`FiguresOfMerit.replicates`)."""
        _require_columns(df, ["y_true", self.score_col,
                              *(v for v in self.rules.values() if isinstance(v, str))])
        y = df["y_true"].to_numpy(dtype=np.int64) == self.positive
        s = df[self.score_col].to_numpy(dtype=np.float64)
        n_groups = counts.shape[1]

        def per_group(mask: np.ndarray) -> np.ndarray:
            return np.bincount(group_codes, weights=mask.astype(np.float64), minlength=n_groups)

        out: dict[str, np.ndarray] = {}
        if self.auc:
            out["auc"] = _weighted_auc(s, y, counts[:, group_codes])
        for name, rule in self.rules.items():
            thr = (df[rule].to_numpy(dtype=np.float64) if isinstance(rule, str)
                   else np.full(len(df), float(rule)))
            pred = s >= thr
            tp, fn = counts @ per_group(pred & y), counts @ per_group(~pred & y)
            fp, tn = counts @ per_group(pred & ~y), counts @ per_group(~pred & ~y)
            values = {"accuracy": _ratio(tp + tn, tp + tn + fp + fn),
                      "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
                      "precision": _ratio(tp, tp + fp), "f1": _ratio(2 * tp, 2 * tp + fp + fn)}
            for fig in BINARY_FIGURES:
                out[f"{name}.{fig}"] = values[fig]
        return {k: out[k] for k in self.keys()}


# --------------------------------------------------------------------------- bootstrap
Statistic = Callable[[pd.DataFrame], "float | Mapping[str, Any]"]


def _group_codes(df: pd.DataFrame, group_col: str) -> tuple[np.ndarray, int]:
    _require_columns(df, [group_col])
    # sort=True: the draw of a seed depends on the patients, not on the row order of the table
    codes, uniques = pd.factorize(df[group_col], sort=True)
    if (codes < 0).any():
        raise ValueError(f"column {group_col!r} has missing values in {(codes < 0).sum()} rows: "
                         f"every row needs a group to resample")
    return codes.astype(np.int64), len(uniques)


def _draw_counts(draws: np.ndarray, n_groups: int) -> np.ndarray:
    """B x G draws (group indices) -> B x G multiplicities."""
    n_boot = draws.shape[0]
    flat = (np.arange(n_boot)[:, None] * n_groups + draws).ravel()
    return np.bincount(flat, minlength=n_boot * n_groups).reshape(n_boot, n_groups).astype(np.float64)


def _as_flat(value: float | Mapping[str, Any], where: str) -> tuple[dict[str, float], bool]:
    """Statistic output -> (flat dict, was_scalar)."""
    if isinstance(value, Mapping):
        return metrics_to_flat(value), False
    if isinstance(value, (bool, int, float, np.integer, np.floating)):
        return {"": float(value)}, True
    raise TypeError(f"{where} returned {type(value).__name__}; a statistic must return a float "
                    f"or a (nested) dict of floats")


def _replicates(df: pd.DataFrame, statistic: Statistic, codes: np.ndarray, n_groups: int,
                draws: np.ndarray) -> tuple[dict[str, float], dict[str, np.ndarray], bool]:
    """Point value and B resampled values of ``statistic``, keyed by flat name."""
    point, scalar = _as_flat(statistic(df), "statistic")
    if hasattr(statistic, "replicates"):  # vectorised statistic, e.g. FiguresOfMerit
        reps = statistic.replicates(df, codes, _draw_counts(draws, n_groups))
        return point, {k: np.asarray(reps[k], dtype=np.float64) for k in point}, scalar
    order = np.argsort(codes, kind="stable")
    group_rows = np.split(order, np.cumsum(np.bincount(codes, minlength=n_groups))[:-1])
    reps = {k: np.full(draws.shape[0], np.nan) for k in point}
    for b, drawn in enumerate(draws):
        # whole groups, duplicated when drawn twice (they keep their id; see patient_bootstrap)
        sample = df.iloc[np.concatenate([group_rows[g] for g in drawn])].reset_index(drop=True)
        value, _ = _as_flat(statistic(sample), "statistic")
        for k in reps:
            reps[k][b] = value.get(k, np.nan)
    return point, reps, scalar


def _percentile_ci(reps: np.ndarray, ci: float) -> tuple[float, float, int]:
    valid = reps[~np.isnan(reps)]
    if valid.size == 0:
        return math.nan, math.nan, 0
    low, high = np.percentile(valid, [50 * (1 - ci), 50 * (1 + ci)])
    return float(low), float(high), int(valid.size)


def _check_boot_args(n_boot: int, ci: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")


def _shape(values: dict[str, Any], scalar: bool) -> Any:
    return values[""] if scalar else values


def patient_bootstrap(preds: pd.DataFrame, statistic: Statistic | None, classes: Sequence[str],
                      n_boot: int = 1000, seed: int = 0, group_col: str = "patient",
                      ci: float = 0.95) -> dict[str, Any]:
    """Percentile bootstrap confidence interval that resamples whole patients.

    Each resample draws as many patients as the table has, with replacement, and keeps all
    frames of every drawn patient. A patient drawn twice appears twice under the same id, so a
    statistic that groups rows by patient or video sees its copies merged: for video-level
    figures, aggregate first (:func:`aggregate_videos` keeps ``patient``) and bootstrap the video
    table. Resamples where a figure is undefined (NaN, e.g. no patient of a class drawn) are left
    out of its interval; ``n_valid`` counts the rest.

    Args:
        preds: Prediction table.
        statistic: Callable on a table returning a float or a (nested) dict of floats; None means
            :class:`FiguresOfMerit` (accuracy, macro-F1, MCC, AUCs and every per-class figure,
            vectorised: 1000 resamples of ~2000 rows take well under a second);
            :class:`BinaryFigures` gives a two-class task's figures at chosen thresholds.
        classes: Class names in index order (used when ``statistic`` is None).
        n_boot: Number of resamples.
        seed: Seed of ``numpy.random.default_rng``; same seed and patients -> same interval.
        group_col: Column whose values are resampled; ``"frame"`` gives the (too narrow)
            frame-level bootstrap.
        ci: Coverage of the two-sided interval.

    Returns:
        ``{"point", "low", "high", "n_valid", "n_groups", "n_boot"}``; point/low/high/n_valid are
        floats for a float statistic, else dicts keyed like :func:`metrics_to_flat`.
    """
    _check_boot_args(n_boot, ci)
    statistic = FiguresOfMerit(classes) if statistic is None else statistic
    codes, n_groups = _group_codes(preds, group_col)
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(n_boot, n_groups))
    point, reps, scalar = _replicates(preds, statistic, codes, n_groups, draws)
    bounds = {k: _percentile_ci(v, ci) for k, v in reps.items()}
    return {
        "point": _shape(point, scalar),
        "low": _shape({k: b[0] for k, b in bounds.items()}, scalar),
        "high": _shape({k: b[1] for k, b in bounds.items()}, scalar),
        "n_valid": _shape({k: b[2] for k, b in bounds.items()}, scalar),
        "n_groups": n_groups,
        "n_boot": n_boot,
    }


def _align(preds_a: pd.DataFrame, preds_b: pd.DataFrame, key: Sequence[str],
           group_col: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows of ``preds_b`` reordered to match ``preds_a`` on ``key``; errors if the sets differ."""
    key = list(key)
    for name, df in (("preds_a", preds_a), ("preds_b", preds_b)):
        _require_columns(df, [*key, group_col, "y_true"], what=name)
    index_a = pd.MultiIndex.from_frame(preds_a[key])
    index_b = pd.MultiIndex.from_frame(preds_b[key])
    for name, index in (("preds_a", index_a), ("preds_b", index_b)):
        if not index.is_unique:
            dup = index[index.duplicated()][:3].tolist()
            raise ValueError(f"{name} has duplicate rows for key {key}, e.g. {dup}: a paired "
                             f"comparison needs one row per {key}")
    only_a, only_b = index_a.difference(index_b), index_b.difference(index_a)
    if len(only_a) or len(only_b):
        raise ValueError(f"preds_a and preds_b are not evaluated on the same {key} set: "
                         f"{len(only_a)} only in a (e.g. {only_a[:3].tolist()}), {len(only_b)} "
                         f"only in b (e.g. {only_b[:3].tolist()}). Compare runs on the same folds")
    a = preds_a.reset_index(drop=True)
    b = preds_b.iloc[index_b.get_indexer(index_a)].reset_index(drop=True)
    for col in (group_col, "y_true"):
        differ = (a[col] != b[col]).to_numpy()
        if differ.any():
            raise ValueError(f"column {col!r} differs between preds_a and preds_b for "
                             f"{int(differ.sum())} matching {key} rows, e.g. "
                             f"{a.loc[differ, key].head(3).to_numpy().tolist()}")
    return a, b


def paired_bootstrap_difference(preds_a: pd.DataFrame, preds_b: pd.DataFrame,
                                statistic: Statistic | None, classes: Sequence[str],
                                n_boot: int = 1000, seed: int = 0, group_col: str = "patient",
                                ci: float = 0.95, key: Sequence[str] = ("frame",)) -> dict[str, Any]:
    """Difference statistic(a) - statistic(b) of two runs on the same frames, patients resampled jointly.

    Both tables are aligned on ``key`` and every resample draws the same patients for both, so
    the interval reflects only how the two runs differ on those patients.

    Args:
        preds_a: Prediction table of run a (e.g. one model + loss).
        preds_b: Prediction table of run b, same frames.
        statistic: As in :func:`patient_bootstrap` (None = :class:`FiguresOfMerit`).
        classes: Class names in index order.
        n_boot: Number of resamples.
        seed: Seed of ``numpy.random.default_rng``.
        group_col: Resampling unit.
        ci: Coverage of the two-sided interval.
        key: Columns identifying a row in both tables.

    Returns:
        ``{"diff", "low", "high", "p_value", "point_a", "point_b", "n_valid", "n_groups",
        "n_boot"}`` (floats, or dicts for a dict statistic). ``p_value`` is two-sided for
        "no difference", from the bootstrap distribution shifted to the null:
        ``(1 + #{|d* - d| >= |d|}) / (B + 1)``; identical runs give 1.

    Raises:
        ValueError: If the key sets differ, a key repeats, or a matched row has another
            patient or true label in the two tables.
    """
    _check_boot_args(n_boot, ci)
    statistic = FiguresOfMerit(classes) if statistic is None else statistic
    a, b = _align(preds_a, preds_b, key, group_col)
    codes, n_groups = _group_codes(a, group_col)
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(n_boot, n_groups))
    point_a, reps_a, scalar = _replicates(a, statistic, codes, n_groups, draws)
    point_b, reps_b, _ = _replicates(b, statistic, codes, n_groups, draws)
    if point_a.keys() != point_b.keys():
        raise ValueError(f"statistic returned different keys for a and b: "
                         f"{sorted(point_a)} vs {sorted(point_b)}")
    result: dict[str, dict[str, float]] = {f: {} for f in ("diff", "low", "high", "p_value", "n_valid")}
    for k in point_a:
        diff = point_a[k] - point_b[k]
        d = reps_a[k] - reps_b[k]
        low, high, n_valid = _percentile_ci(d, ci)
        d = d[~np.isnan(d)]
        p = math.nan
        if d.size and not math.isnan(diff):
            # shift the bootstrap distribution to the null (mean 0); +1 keeps p above 0
            p = (1 + np.sum(np.abs(d - diff) >= abs(diff))) / (d.size + 1)
        for f, v in zip(result, (diff, low, high, float(p), n_valid)):
            result[f][k] = v
    return {**{f: _shape(v, scalar) for f, v in result.items()},
            "point_a": _shape(point_a, scalar), "point_b": _shape(point_b, scalar),
            "n_groups": n_groups, "n_boot": n_boot}


def mcnemar_test(correct_a: Sequence[bool] | np.ndarray,
                 correct_b: Sequence[bool] | np.ndarray) -> dict[str, Any]:
    """McNemar's test of paired correctness of two classifiers on the same samples.

    Treats samples as independent, which frames of one patient are not: prefer
    :func:`paired_bootstrap_difference` for frames; use this for one row per patient or video.

    Args:
        correct_a: Per sample, whether classifier a is right.
        correct_b: Same samples, whether classifier b is right.

    Returns:
        ``{"b": a right & b wrong, "c": a wrong & b right, "statistic", "p_value", "exact"}``.
        When b + c < 25 the two-sided exact binomial test is used (statistic = min(b, c), as in
        statsmodels); otherwise chi-square with continuity correction, (|b - c| - 1)^2 / (b + c),
        1 degree of freedom. b + c = 0 gives p = 1.
    """
    a = np.asarray(correct_a, dtype=bool).ravel()
    b_ = np.asarray(correct_b, dtype=bool).ravel()
    if a.shape != b_.shape:
        raise ValueError(f"correct_a has {a.size} samples but correct_b has {b_.size}: McNemar "
                         f"needs the same samples in the same order")
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    if b + c < 25:
        p = stats.binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
        return {"b": b, "c": c, "statistic": float(min(b, c)), "p_value": float(p), "exact": True}
    chi2 = (abs(b - c) - 1) ** 2 / (b + c)
    return {"b": b, "c": c, "statistic": float(chi2), "p_value": float(stats.chi2.sf(chi2, df=1)),
            "exact": False}


# --------------------------------------------------------------------------- aggregation
def _vote_fractions(votes: np.ndarray, mean_probs: np.ndarray) -> np.ndarray:
    """Vote counts (N x C) -> vote fractions whose argmax follows the tie rule.

    A tie for the most votes goes to the tied class with the highest mean probability (then the
    lowest class index). So that ``argmax`` of the result gives that class, tied rows are nudged:
    the winner gains ``VOTE_TIE_NUDGE`` and the other tied classes share its loss (rows still sum
    to 1; rows without a tie are exact fractions).
    """
    votes = np.asarray(votes, dtype=np.float64)
    fractions = votes / votes.sum(axis=1, keepdims=True)
    top = votes == votes.max(axis=1, keepdims=True)
    winner = np.argmax(np.where(top, mean_probs, -np.inf), axis=1)
    n_top = top.sum(axis=1)
    rows = np.flatnonzero(n_top > 1)
    if rows.size:
        fractions[rows] -= top[rows] * (VOTE_TIE_NUDGE / (n_top[rows] - 1))[:, None]
        fractions[rows, winner[rows]] += VOTE_TIE_NUDGE + VOTE_TIE_NUDGE / (n_top[rows] - 1)
    return fractions


def aggregate_videos(preds: pd.DataFrame, classes: Sequence[str], how: str = "mean",
                     group_col: str = "source") -> pd.DataFrame:
    """Video-level prediction table: one row per ``group_col`` value.

    Args:
        preds: Frame-level prediction table.
        classes: Class names in index order.
        how: ``"mean"``: ``prob_*`` = mean frame probabilities, ``y_pred`` = their argmax.
            ``"vote"``: ``prob_*`` = fraction of frames predicted as each class, ``y_pred`` = the
            majority, a tie going to the tied class with the highest mean probability (the tied
            winner's fraction is nudged by 1e-6 so ``y_pred`` = argmax of ``prob_*``).
        group_col: Column naming the video (or image) each frame came from.

    Returns:
        Table with ``frame`` set to the video, ``group_col``, every other column that is constant
        within each video (patient, fold, ...), ``y_true``, ``y_pred``, ``prob_*`` and
        ``n_frames``; sorted by video. It has the frame table's schema, so every function here
        accepts it.

    Raises:
        ValueError: If frames of one video disagree on ``y_true``, ``patient`` or ``fold``, or
            ``how`` is unknown.
    """
    if how not in ("mean", "vote"):
        raise ValueError(f"how={how!r}: use 'mean' (average probabilities) or 'vote' (majority)")
    cols = prob_columns(classes)
    _require_columns(preds, [group_col, "y_true", "y_pred", *cols])
    if preds[group_col].isna().any():
        raise ValueError(f"column {group_col!r} has missing values: every frame needs its video")
    groups = preds.groupby(group_col, sort=True)
    for col in ("y_true", "patient", "fold"):
        if col not in preds.columns:
            continue
        n_values = groups[col].nunique(dropna=False)
        if (n_values > 1).any():
            bad = n_values.index[n_values > 1][:5].tolist()
            raise ValueError(f"frames of one {group_col} disagree on column {col!r} in "
                             f"{int((n_values > 1).sum())} videos, e.g. {bad}: fix the labels or "
                             f"the grouping")
    core = {"frame", group_col, "y_true", "y_pred", *cols}
    others = [c for c in preds.columns if c not in core]
    constant = [c for c in others if (groups[c].nunique(dropna=False) <= 1).all()]

    mean_probs = groups[cols].mean()
    out = groups[[*constant, "y_true"]].first()
    if how == "mean":
        probs = mean_probs.to_numpy()
    else:
        codes = groups.ngroup().to_numpy()
        votes = np.zeros((groups.ngroups, len(classes)))
        np.add.at(votes, (codes, preds["y_pred"].to_numpy(dtype=np.int64)), 1.0)
        probs = _vote_fractions(votes, mean_probs.to_numpy())
    videos = out.index.to_numpy()
    table = pd.DataFrame({"frame": videos, group_col: videos})
    for c in constant:
        table[c] = out[c].to_numpy()
    table["y_true"] = out["y_true"].to_numpy(dtype=np.int64)
    table["y_pred"] = np.argmax(probs, axis=1).astype(np.int64)
    for k, c in enumerate(cols):
        table[c] = probs[:, k]
    table["n_frames"] = groups.size().to_numpy()
    return table


def ensemble_probabilities(prob_list: Sequence[np.ndarray], how: str = "mean") -> np.ndarray:
    """Combine the fold models' class probabilities on the same samples.

    Args:
        prob_list: One N x C probability array per model, same samples and class order.
        how: ``"mean"``: average probability (the paper's 5-fold averaging). ``"vote"``: fraction
            of models whose argmax is each class; a tie goes to the tied class with the highest
            mean probability (then the lowest index), whose fraction is nudged up by 1e-6 so that
            ``argmax`` of the result is the ensemble's prediction.

    Returns:
        N x C array; rows sum to 1 when the inputs' rows do (``"vote"``: always).
    """
    if how not in ("mean", "vote"):
        raise ValueError(f"how={how!r}: use 'mean' (average probabilities) or 'vote' (majority)")
    if len(prob_list) == 0:
        raise ValueError("prob_list is empty: pass one probability array per model")
    arrays = [np.asarray(p, dtype=np.float64) for p in prob_list]
    for i, p in enumerate(arrays):
        if p.ndim != 2 or p.shape != arrays[0].shape:
            raise ValueError(f"prob_list[{i}] has shape {p.shape}; every model needs an N x C array "
                             f"like prob_list[0] {arrays[0].shape}")
    stacked = np.stack(arrays)  # models x N x C
    mean = stacked.mean(axis=0)
    if how == "mean":
        return mean
    n_cls = mean.shape[1]
    votes = (stacked.argmax(axis=2)[..., None] == np.arange(n_cls)).sum(axis=0)
    return _vote_fractions(votes, mean)
