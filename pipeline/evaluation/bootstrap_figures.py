"""Figures of merit of many bootstrap resamples at once.

:func:`pipeline.evaluation.bootstrap.patient_bootstrap` would otherwise call scikit-learn once
per resample (too slow for 1000 resamples). The statistics here compute every resample from
per-patient confusion counts and weighted AUCs, with the same values as scikit-learn (tested
against it): :class:`FiguresOfMerit` for the multi-class figures, :class:`BinaryFigures` for a
two-class task at chosen decision thresholds, :class:`Accuracy` for the accuracy alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline.evaluation.classification import (
    figure_keys,
    nan_ratio,
    require_columns,
    table_arrays,
)


class FiguresOfMerit:
    """Bootstrap statistic giving every figure of
    :func:`pipeline.evaluation.classification.classification_metrics` at once.

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
        keys = figure_keys(self.classes)
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
        y_true, y_pred, y_prob = table_arrays(df, self.classes)
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
        f1 = nan_ratio(2 * tp, 2 * tp + fp + fn)
        out: dict[str, np.ndarray] = {
            "accuracy": nan_ratio(tp.sum(axis=1), n),
            "macro_f1": _nanmean_rows(f1),
            # scikit-learn's multiclass MCC, including its 0 for a zero denominator
            "mcc": _mcc(tp.sum(axis=1), n, t_sum, p_sum),
        }
        figures = {"sensitivity": nan_ratio(tp, tp + fn), "specificity": nan_ratio(tn, tn + fp),
                   "precision": nan_ratio(tp, tp + fp), "f1": f1}
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
    return nan_ratio(np.where(defined, a, 0.0).sum(axis=1), defined.sum(axis=1))


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
        out[lo:lo + step] = nan_ratio(num, wp.sum(axis=1) * wn.sum(axis=1))
    return out


class Accuracy:
    """Bootstrap statistic: the share of rows whose ``y_pred`` is ``y_true``, as a float.

    :meth:`replicates` gives every resample from per-group counts of rows and of correct rows;
    each value is the same ratio of integers as the accuracy of the resampled table.
    """

    def __call__(self, df: pd.DataFrame) -> float:
        return float(self.replicates(df, np.zeros(len(df), dtype=np.int64), np.ones((1, 1)))[""][0])

    def replicates(self, df: pd.DataFrame, group_codes: np.ndarray,
                   counts: np.ndarray) -> dict[str, np.ndarray]:
        """Accuracy of B weighted copies of ``df``, under the key ``""`` of a float statistic
        (see :meth:`FiguresOfMerit.replicates`)."""
        require_columns(df, ["y_true", "y_pred"])
        correct = (df["y_true"].to_numpy() == df["y_pred"].to_numpy()).astype(np.float64)
        n_groups = counts.shape[1]
        rows = np.bincount(group_codes, minlength=n_groups).astype(np.float64)
        right = np.bincount(group_codes, weights=correct, minlength=n_groups)
        return {"": nan_ratio(counts @ right, counts @ rows)}


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
        require_columns(df, ["y_true", self.score_col,
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
            values = {"accuracy": nan_ratio(tp + tn, tp + tn + fp + fn),
                      "sensitivity": nan_ratio(tp, tp + fn), "specificity": nan_ratio(tn, tn + fp),
                      "precision": nan_ratio(tp, tp + fp), "f1": nan_ratio(2 * tp, 2 * tp + fp + fn)}
            for fig in BINARY_FIGURES:
                out[f"{name}.{fig}"] = values[fig]
        return {k: out[k] for k in self.keys()}
