"""Paired comparisons of two runs on the same samples: the paired patient bootstrap of the
difference of any figure, and McNemar's test of paired correctness."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from pipeline.evaluation.bootstrap import (
    Statistic,
    check_boot_args,
    group_codes,
    percentile_interval,
    replicate_statistic,
    unwrap,
)
from pipeline.evaluation.bootstrap_figures import FiguresOfMerit
from pipeline.evaluation.classification import require_columns


def _align(preds_a: pd.DataFrame, preds_b: pd.DataFrame, key: Sequence[str],
           group_col: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows of ``preds_b`` reordered to match ``preds_a`` on ``key``; errors if the sets differ."""
    key = list(key)
    for name, df in (("preds_a", preds_a), ("preds_b", preds_b)):
        require_columns(df, [*key, group_col, "y_true"], what=name)
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
    check_boot_args(n_boot, ci)
    statistic = FiguresOfMerit(classes) if statistic is None else statistic
    a, b = _align(preds_a, preds_b, key, group_col)
    codes, n_groups = group_codes(a, group_col)
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(n_boot, n_groups))
    point_a, reps_a, scalar = replicate_statistic(a, statistic, codes, n_groups, draws)
    point_b, reps_b, _ = replicate_statistic(b, statistic, codes, n_groups, draws)
    if point_a.keys() != point_b.keys():
        raise ValueError(f"statistic returned different keys for a and b: "
                         f"{sorted(point_a)} vs {sorted(point_b)}")
    result: dict[str, dict[str, float]] = {f: {} for f in ("diff", "low", "high", "p_value", "n_valid")}
    for k in point_a:
        diff = point_a[k] - point_b[k]
        d = reps_a[k] - reps_b[k]
        low, high, n_valid = percentile_interval(d, ci)
        d = d[~np.isnan(d)]
        p = math.nan
        if d.size and not math.isnan(diff):
            # shift the bootstrap distribution to the null (mean 0); +1 keeps p above 0
            p = (1 + np.sum(np.abs(d - diff) >= abs(diff))) / (d.size + 1)
        for f, v in zip(result, (diff, low, high, float(p), n_valid)):
            result[f][k] = v
    return {**{f: unwrap(v, scalar) for f, v in result.items()},
            "point_a": unwrap(point_a, scalar), "point_b": unwrap(point_b, scalar),
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
