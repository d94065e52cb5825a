"""Patient-level bootstrap confidence intervals.

Frames of one patient are strongly correlated, so uncertainty is estimated by resampling whole
patients: a frame-level interval would be far too narrow. :func:`patient_bootstrap` gives the
interval of one run; ``pipeline.evaluation.comparisons`` uses the same resampling for the
difference between two runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.evaluation.bootstrap_figures import FiguresOfMerit
from pipeline.evaluation.classification import metrics_to_flat, require_columns

#: A statistic of a prediction table: a float or a (nested) dict of floats.
Statistic = Callable[[pd.DataFrame], "float | Mapping[str, Any]"]


def group_codes(df: pd.DataFrame, group_col: str) -> tuple[np.ndarray, int]:
    """Group index (0 .. G-1, in sorted group order) of each row, and G."""
    require_columns(df, [group_col])
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


def replicate_statistic(df: pd.DataFrame, statistic: Statistic, codes: np.ndarray, n_groups: int,
                        draws: np.ndarray
                        ) -> tuple[dict[str, float], dict[str, np.ndarray], bool]:
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


def percentile_interval(reps: np.ndarray, ci: float) -> tuple[float, float, int]:
    """Two-sided percentile interval of the defined (non-NaN) replicates: (low, high, n_valid)."""
    valid = reps[~np.isnan(reps)]
    if valid.size == 0:
        return math.nan, math.nan, 0
    low, high = np.percentile(valid, [50 * (1 - ci), 50 * (1 + ci)])
    return float(low), float(high), int(valid.size)


def check_boot_args(n_boot: int, ci: float) -> None:
    """Raise a ValueError unless ``n_boot >= 1`` and ``0 < ci < 1``."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")


def unwrap(values: dict[str, Any], scalar: bool) -> Any:
    """The single value of a float statistic, or the flat dict of a dict statistic."""
    return values[""] if scalar else values


def patient_bootstrap(preds: pd.DataFrame, statistic: Statistic | None, classes: Sequence[str],
                      n_boot: int = 1000, seed: int = 0, group_col: str = "patient",
                      ci: float = 0.95) -> dict[str, Any]:
    """Percentile bootstrap confidence interval that resamples whole patients.

    Each resample draws as many patients as the table has, with replacement, and keeps all
    frames of every drawn patient. A patient drawn twice appears twice under the same id, so a
    statistic that groups rows by patient or video sees its copies merged: for video-level
    figures, aggregate first (:func:`pipeline.evaluation.aggregation.aggregate_videos` keeps
    ``patient``) and bootstrap the video table. Resamples where a figure is undefined (NaN, e.g. no patient of a class drawn) are left
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
    check_boot_args(n_boot, ci)
    statistic = FiguresOfMerit(classes) if statistic is None else statistic
    codes, n_groups = group_codes(preds, group_col)
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(n_boot, n_groups))
    point, reps, scalar = replicate_statistic(preds, statistic, codes, n_groups, draws)
    bounds = {k: percentile_interval(v, ci) for k, v in reps.items()}
    return {
        "point": unwrap(point, scalar),
        "low": unwrap({k: b[0] for k, b in bounds.items()}, scalar),
        "high": unwrap({k: b[1] for k, b in bounds.items()}, scalar),
        "n_valid": unwrap({k: b[2] for k, b in bounds.items()}, scalar),
        "n_groups": n_groups,
        "n_boot": n_boot,
    }
