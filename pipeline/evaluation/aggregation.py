"""Aggregation of predictions: frames into videos (:func:`aggregate_videos`) and the fold
models' probabilities into an ensemble (:func:`ensemble_probabilities`), by mean or vote."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from pipeline.evaluation.classification import prob_columns, require_columns

#: How far a tied vote winner is nudged above the other tied classes (see :func:`_vote_fractions`).
VOTE_TIE_NUDGE = 1e-6


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


def _check_video_labels(preds: pd.DataFrame, groups: pd.core.groupby.DataFrameGroupBy,
                        group_col: str) -> None:
    """Raise a ValueError if frames of one video disagree on ``y_true``, ``patient`` or ``fold``."""
    for col in ("y_true", "patient", "fold"):
        if col not in preds.columns:
            continue
        n_values = groups[col].nunique(dropna=False)
        if (n_values > 1).any():
            bad = n_values.index[n_values > 1][:5].tolist()
            raise ValueError(f"frames of one {group_col} disagree on column {col!r} in "
                             f"{int((n_values > 1).sum())} videos, e.g. {bad}: fix the labels or "
                             f"the grouping")


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
    require_columns(preds, [group_col, "y_true", "y_pred", *cols])
    if preds[group_col].isna().any():
        raise ValueError(f"column {group_col!r} has missing values: every frame needs its video")
    groups = preds.groupby(group_col, sort=True)
    _check_video_labels(preds, groups, group_col)
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
