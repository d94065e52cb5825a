"""Stage ``binary_eval``: the binary-task figures of the chest X-ray COVID-19 study (ResNet50).

For each grid cell, from ``models/<cell>/predictions.csv`` (score = probability of
``dataset.positive_class``): accuracy, sensitivity, specificity, precision and F1 at fixed
thresholds (the study's 0.15/0.20/0.25/0.30), and two operating points at a target sensitivity
(the study's 97.3%):

- **fitted on test** (the study's): the highest threshold whose pooled *test* sensitivity reaches
  the target. Optimistic: the test set chose it.
- **held out**: per fold, the threshold that reaches the target on that fold's *validation* rows
  (``fold_<k>/val_predictions.csv``, written by the train stage from the restored weights),
  applied to that fold's test rows and pooled. A fold whose validation has fewer positives than
  the target can resolve (``ceil(1 / (1 - target))``, 38 at 97.3%) still uses them (the
  threshold then keeps every validation positive) and is flagged; a fold without a validation
  positive takes the mean of the other folds' validation thresholds (flagged). Without
  validation predictions the held-out point is reported as unavailable, never estimated.

Every figure at every threshold and both points, and the AUC, get a 95% percentile interval from
:func:`pipeline.evaluation.bootstrap.patient_bootstrap` (whole patients resampled, seeded by ``seed``;
statistic :class:`pipeline.evaluation.bootstrap_figures.BinaryFigures`); the study's Wald intervals
(``z * sqrt(p (1 - p) / N)`` over images) stay beside them for comparison with the paper. Also
the ROC with both points and the predicted-score histogram per subgroup (the manifest's
``finding`` column, else the true class). The t-SNE of penultimate features is optional
(``binary.tsne``): it needs the fold's checkpoint and test images.

A sample is called positive when its score is >= the threshold.
Writes ``reports/binary/<cell>/`` (``sweep.csv``, ``sweep_by_fold.csv``, ``sweep.md``,
``operating_point.json`` (the test-fitted point, with ``held_out`` and the intervals),
``operating_points.csv``, ``held_out_thresholds.csv``, ``roc.png`` + ``.csv``,
``histogram.png`` + ``.csv``, ``tsne.png``) and the compact figures to
``reports/binary_metrics.json`` (outside the folder, so DVC can track it as metrics).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from pipeline.core.config import ConfigError, get, load_params  # noqa: E402
from pipeline.evaluation.bootstrap import patient_bootstrap  # noqa: E402
from pipeline.evaluation.bootstrap_figures import BINARY_FIGURES, BinaryFigures  # noqa: E402

log = logging.getLogger("pipeline.stages.binary_eval")

#: How the two operating points are labelled in every output.
FITTED_LABEL = "fitted on test (optimistic, as in the study)"
HELD_OUT_LABEL = "held out (threshold chosen on validation, applied to test)"


class WaldCI(NamedTuple):
    """A Wald interval: ``point +- half_width``, bounds clipped to [0, 1]."""

    low: float
    high: float
    half_width: float


def wald_ci(p: float, n: int, z: float = 1.96) -> WaldCI:
    """The study's interval of a proportion ``p`` over ``n`` samples: ``z sqrt(p(1-p)/n)``.

    NaN when ``n`` is 0 or ``p`` is undefined.
    """
    if not n or p is None or not math.isfinite(p):
        return WaldCI(math.nan, math.nan, math.nan)
    r = z * math.sqrt(p * (1.0 - p) / n)
    return WaldCI(max(0.0, p - r), min(1.0, p + r), r)


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _check(y_true: Sequence[int] | np.ndarray, score: Sequence[float] | np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != s.shape or y.size == 0:
        raise ValueError(f"y_true ({y.size}) and score ({s.size}) must be equal-length and non-empty")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true must be 0/1 (1 = positive class); got values {np.unique(y).tolist()}")
    return y, s


def confusion_at(y_true: np.ndarray, score: np.ndarray, threshold: float, z: float = 1.96) -> dict:
    """Counts and figures of merit when ``score >= threshold`` is called positive."""
    y, s = _check(y_true, score)
    pred = s >= threshold
    tp, fn = int((pred & (y == 1)).sum()), int((~pred & (y == 1)).sum())
    fp, tn = int((pred & (y == 0)).sum()), int((~pred & (y == 0)).sum())
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    acc = (tp + tn) / y.size
    return {"threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "accuracy": acc, "sensitivity": sens, "specificity": spec,
            "precision": _ratio(tp, tp + fp), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "accuracy_ci": wald_ci(acc, y.size, z).half_width,
            "sensitivity_ci": wald_ci(sens, tp + fn, z).half_width,
            "specificity_ci": wald_ci(spec, tn + fp, z).half_width}


def threshold_sweep(y_true: Sequence[int] | np.ndarray, score: Sequence[float] | np.ndarray,
                    thresholds: Sequence[float], z: float = 1.96) -> pd.DataFrame:
    """One row per threshold: counts, accuracy, sensitivity, specificity, precision, F1 and the
    Wald half-widths (``*_ci``) of accuracy, sensitivity and specificity."""
    return pd.DataFrame([confusion_at(y_true, score, t, z) for t in thresholds])


def operating_point(y_true: Sequence[int] | np.ndarray, score: Sequence[float] | np.ndarray,
                    target_sensitivity: float = 0.973, z: float = 1.96) -> dict:
    """The highest threshold whose sensitivity is at least ``target_sensitivity`` (so the
    highest specificity at that sensitivity), with the figures reached there.

    Raises:
        ValueError: no positive sample, or a target outside (0, 1].
    """
    y, s = _check(y_true, score)
    if not 0 < target_sensitivity <= 1:
        raise ValueError(f"target_sensitivity must be in (0, 1]; got {target_sensitivity}")
    pos = np.sort(s[y == 1])[::-1]
    if pos.size == 0:
        raise ValueError("no positive sample: sensitivity is undefined")
    # Sensitivity at t counts positives with score >= t: the k-th highest positive score is the
    # highest threshold that keeps k of them (the epsilon absorbs 0.973 * 1000 = 973.0000000001).
    k = max(1, math.ceil(target_sensitivity * pos.size - 1e-9))
    point = confusion_at(y, s, float(pos[k - 1]), z)
    return {"target_sensitivity": float(target_sensitivity), **point,
            "n_positive": int(pos.size), "n_negative": int((y == 0).sum())}


def score_histograms(df: pd.DataFrame, score_col: str, subgroup_col: str, out_png: str | Path,
                     bins: int = 20, threshold: float | Mapping[str, float] | None = None,
                     title: str = "") -> pd.DataFrame:
    """Histogram of ``score_col`` for each value of ``subgroup_col`` (the study's Fig. 6), with
    a dashed line at ``threshold`` (or one line per ``{label: threshold}``).

    Returns:
        The counts: ``subgroup, bin_low, bin_high, count`` (also the plotted data).
    """
    edges = np.linspace(0.0, 1.0, int(bins) + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = []
    for group, part in df.groupby(subgroup_col, sort=True):
        counts, _ = np.histogram(np.clip(part[score_col].to_numpy(float), 0, 1), bins=edges)
        ax.hist(edges[:-1], bins=edges, weights=counts, histtype="step", linewidth=1.5,
                label=f"{group} (n={len(part)})")
        rows += [{"subgroup": group, "bin_low": lo, "bin_high": hi, "count": int(c)}
                 for lo, hi, c in zip(edges[:-1], edges[1:], counts)]
    lines = (threshold if isinstance(threshold, Mapping)
             else {} if threshold is None else {"threshold": threshold})
    for (label, t), style in zip(lines.items(), ("--", ":", "-.")):
        ax.axvline(t, color="k", linestyle=style, linewidth=1, label=f"{label} {t:.3g}")
    ax.set_xlabel(f"predicted score ({score_col})")
    ax.set_ylabel("images")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return pd.DataFrame(rows, columns=["subgroup", "bin_low", "bin_high", "count"])


@torch.no_grad()
def penultimate_features(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64,
                         module: torch.nn.Module | None = None) -> np.ndarray:
    """Features entering the classification head (``model.head`` unless ``module`` is given),
    captured by a forward pre-hook; feature maps are averaged over their spatial dimensions.

    Args:
        images: ``N x 3 x S x S``, uint8 (0-255) or float in [0, 1].
    """
    target = module if module is not None else model.head
    captured: list[torch.Tensor] = []
    handle = target.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0].detach()))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size]
            x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
            model(x.to(device))
    finally:
        handle.remove()
        model.train(was_training)
    feats = torch.cat([c.flatten(2).mean(2) if c.dim() > 2 else c for c in captured])
    return feats.cpu().numpy()


def tsne_plot(features: np.ndarray, labels: Sequence, out_png: str | Path, seed: int,
              perplexity: float = 30.0, title: str = "") -> np.ndarray:
    """2-D t-SNE of ``features`` coloured by ``labels`` (the study's Fig. 8); returns the
    embedding. The perplexity is lowered for small sample counts (it must be < n)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    features = np.asarray(features, dtype=np.float64)
    n = len(features)
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 samples; got {n}")
    perplexity = min(float(perplexity), max(1.0, (n - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, random_state=int(seed), init="pca")
    # On small inputs OpenMP threads cost more than they gain (seconds per call on a busy
    # machine, where idle threads spin); large inputs keep them.
    with threadpool_limits(1 if n < 5000 else None, user_api="openmp"):
        emb = tsne.fit_transform(features)
    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(5, 5))
    for lab in pd.unique(labels):
        m = labels == lab
        ax.scatter(emb[m, 0], emb[m, 1], s=6, alpha=0.7, label=f"{lab} (n={int(m.sum())})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    ax.legend(fontsize=8, markerscale=2)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return emb


# --------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------
def min_positives(target_sensitivity: float) -> int:
    """Fewest positives whose sensitivity steps (1/n) can tell ``target`` from 100%: below it
    the threshold reaching the target keeps every positive."""
    return 1 if target_sensitivity >= 1 else math.ceil(1.0 / (1.0 - target_sensitivity) - 1e-9)


def held_out_thresholds(val: pd.DataFrame | None, test: pd.DataFrame, positive_index: int,
                        score_col: str, target_sensitivity: float, z: float = 1.96) -> pd.DataFrame:
    """Per fold of ``test``: the threshold reaching ``target_sensitivity`` on that fold's
    validation rows only (:func:`operating_point`), and what it gives on the fold's test rows.

    Columns: ``fold, threshold, source, n_val, n_val_positive, val_sensitivity,
    val_specificity, test_sensitivity, test_specificity, note``. ``source`` is ``validation``,
    ``fallback`` (the fold has no validation positive: the mean of the other folds' validation
    thresholds) or ``missing`` (no validation predictions: threshold NaN). The test rows are
    only used for the ``test_*`` columns, never for the threshold.
    """
    rows = []
    need = min_positives(target_sensitivity)
    for fold in sorted(test["fold"].unique()):
        part = val[val["fold"] == fold] if val is not None else None
        row = {"fold": int(fold), "threshold": math.nan, "source": "missing", "n_val": 0,
               "n_val_positive": 0, "val_sensitivity": math.nan, "val_specificity": math.nan,
               "note": ""}
        if part is None or part.empty:
            row["note"] = f"no validation predictions (fold_{fold}/val_predictions.csv)"
        else:
            y = (part["y_true"].to_numpy() == positive_index).astype(int)
            row.update(n_val=int(y.size), n_val_positive=int(y.sum()))
            notes = []
            if set(part["frame"]) == set(test.loc[test["fold"] == fold, "frame"]):
                notes.append("validation rows are the test rows (folds.validation=test_fold): "
                             "not held out")
            if y.sum():
                op = operating_point(y, part[score_col].to_numpy(float), target_sensitivity, z)
                row.update(threshold=op["threshold"], source="validation",
                           val_sensitivity=op["sensitivity"], val_specificity=op["specificity"])
                if y.sum() < need:
                    notes.append(f"{int(y.sum())} validation positives < {need} needed to resolve "
                                 f"{target_sensitivity:.3f}: the threshold keeps every one")
            row["note"] = "; ".join(notes)
        rows.append(row)
    out = pd.DataFrame(rows)
    chosen = out["source"] == "validation"
    for i in out.index[(out["source"] == "missing") & (out["n_val"] > 0)]:
        others = out.loc[chosen & (out.index != i), "threshold"]
        if len(others):
            out.loc[i, ["threshold", "source"]] = [float(others.mean()), "fallback"]
            out.loc[i, "note"] = ("no validation positive: mean of the other folds' validation "
                                  "thresholds")
        else:
            out.loc[i, "note"] = "no validation positive in any fold"
    test_figs = []
    for r in out.itertuples():
        m = test["fold"].to_numpy() == r.fold
        if math.isnan(r.threshold):
            test_figs.append((math.nan, math.nan))
            continue
        c = confusion_at((test.loc[m, "y_true"].to_numpy() == positive_index).astype(int),
                         test.loc[m, score_col].to_numpy(float), r.threshold, z)
        test_figs.append((c["sensitivity"], c["specificity"]))
    out["test_sensitivity"] = [a for a, _ in test_figs]
    out["test_specificity"] = [b for _, b in test_figs]
    return out[["fold", "threshold", "source", "n_val", "n_val_positive", "val_sensitivity",
                "val_specificity", "test_sensitivity", "test_specificity", "note"]]


def _rule_name(threshold: float) -> str:
    return f"t{threshold:.4f}".replace(".", "_")


def roc_figure(y: np.ndarray, s: np.ndarray, points: Mapping[str, Mapping], out_png: Path,
               title: str) -> pd.DataFrame:
    """Pooled ROC curve with the operating points (``{label: {"sensitivity", "specificity"}}``)
    marked; returns the curve (``fpr, tpr, threshold``)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, s)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, lw=1.5, label="pooled test ROC")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    for (label, pt), marker in zip(points.items(), ("o", "s", "^", "D")):
        if pt and math.isfinite(pt.get("sensitivity", math.nan)):
            ax.plot(1 - pt["specificity"], pt["sensitivity"], marker, ms=8, label=
                    f"{label}: sens {pt['sensitivity']:.3f}, spec {pt['specificity']:.3f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thr})


def _interval(boot: Mapping, key: str) -> tuple[float, float]:
    return float(boot["low"][key]), float(boot["high"][key])


def _markdown(pooled: pd.DataFrame, by_fold: pd.DataFrame, points: pd.DataFrame, cell: str,
              positive: str, boot: Mapping) -> str:
    cols = list(BINARY_FIGURES)
    shown = pd.DataFrame({"threshold": pooled["threshold"].map(lambda t: f"{t:.2f}")})
    for c in cols:
        shown[c] = [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in
                    zip(pooled[c], pooled[f"{c}_low"], pooled[f"{c}_high"])]
    for c in ("sensitivity", "specificity"):
        shown[f"{c} ± Wald"] = [f"{v:.3f} ± {h:.3f}" for v, h in zip(pooled[c], pooled[f"{c}_ci"])]
    stats = by_fold.groupby("threshold")[cols].agg(["mean", "std"]).fillna(0.0)
    folds = pd.DataFrame({"threshold": [f"{t:.2f}" for t in stats.index]})
    for c in cols:
        folds[c] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(stats[(c, "mean")], stats[(c, "std")])]
    ops = pd.DataFrame({"point": points["point"],
                        "threshold": [f"{t:.4f}" if isinstance(t, float) else str(t)
                                      for t in points["threshold_shown"]]})
    for c in ("sensitivity", "specificity", "accuracy"):
        ops[c] = [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if math.isfinite(v) else "not available"
                  for v, lo, hi in zip(points[c], points[f"{c}_low"], points[f"{c}_high"])]
    return (f"# {cell}: {positive} vs rest\n\n"
            f"Pooled over folds (95% interval by bootstrap over {boot['n_groups']} patients, "
            f"{boot['n_boot']} resamples; the study's Wald half-width over images beside):\n\n"
            f"{shown.to_markdown(index=False, disable_numparse=True)}\n\n"
            f"Per fold (mean ± std over {by_fold['fold'].nunique()} folds):\n\n"
            f"{folds.to_markdown(index=False, disable_numparse=True)}\n\n"
            f"Operating points:\n\n{ops.to_markdown(index=False, disable_numparse=True)}\n")


def _bootstrap(preds: pd.DataFrame, classes: Sequence[str], pos_idx: int, col: str,
               held: pd.DataFrame, fitted: float, cfg: Mapping, seed: int) -> dict:
    """Patient-bootstrap intervals of every figure at each sweep threshold, the test-fitted
    threshold and (when every fold has one) each fold's held-out threshold, and of the AUC."""
    table = preds.assign(held_out_threshold=preds["fold"].map(held.set_index("fold")["threshold"]))
    rules: dict[str, float | str] = {_rule_name(t): float(t) for t in cfg["thresholds"]}
    rules["fitted"] = fitted
    if held["threshold"].notna().all():
        rules["held_out"] = "held_out_threshold"
    return patient_bootstrap(table, BinaryFigures(pos_idx, col, rules), classes,
                             n_boot=int(cfg["bootstrap"]), seed=seed, ci=float(cfg["ci"]))


def _held_out_point(held: pd.DataFrame, folds: np.ndarray, y: np.ndarray, s: np.ndarray,
                    target: float, z: float, boot: Mapping) -> dict:
    """The held-out point: pooled counts at each fold's own threshold, its figures with
    bootstrap and Wald intervals, and the folds' notes; ``available`` False without one
    threshold per fold."""
    point: dict = {"label": HELD_OUT_LABEL, "available": bool(held["threshold"].notna().all()),
                   "target_sensitivity": target, "per_fold": held.to_dict("records")}
    if not point["available"]:
        point["notes"] = sorted({n for n in held["note"] if n}) or ["no held-out threshold"]
        return point
    c = {k: 0 for k in ("tp", "fp", "tn", "fn")}
    for r in held.itertuples():
        m = folds == r.fold
        part = confusion_at(y[m], s[m], r.threshold, z)
        for k in c:
            c[k] += part[k]
    n_pos, n_neg = c["tp"] + c["fn"], c["tn"] + c["fp"]
    sens, spec = _ratio(c["tp"], n_pos), _ratio(c["tn"], n_neg)
    point.update(c, thresholds=held["threshold"].tolist(),
                 **{f: boot["point"][f"held_out.{f}"] for f in BINARY_FIGURES},
                 sensitivity_ci=wald_ci(sens, n_pos, z).half_width,
                 specificity_ci=wald_ci(spec, n_neg, z).half_width,
                 accuracy_ci=wald_ci(boot["point"]["held_out.accuracy"], len(y), z).half_width,
                 bootstrap={f: _interval(boot, f"held_out.{f}") for f in BINARY_FIGURES},
                 notes=[n for n in held["note"] if n])
    return point


def _points_table(op: Mapping, held_point: Mapping, held: pd.DataFrame) -> pd.DataFrame:
    """One row per operating point (test-fitted, held out): threshold, figures with their
    bootstrap bounds and Wald half-widths, counts; an unavailable point's row says why."""
    held_ok = held_point["available"]
    rows = []
    for label, pt, shown_thr in ((FITTED_LABEL, op, op["threshold"]),
                                 (HELD_OUT_LABEL, held_point if held_ok else None,
                                  ", ".join(f"{t:.4f}" for t in held["threshold"]) if held_ok
                                  else "not available")):
        row = {"point": label, "threshold_shown": shown_thr}
        for f in BINARY_FIGURES:
            lo, hi = pt["bootstrap"][f] if pt else (math.nan, math.nan)
            row.update({f: pt[f] if pt else math.nan, f"{f}_low": lo, f"{f}_high": hi})
        for f in ("sensitivity", "specificity", "accuracy"):
            row[f"{f}_wald"] = pt[f"{f}_ci"] if pt else math.nan
        row.update({k: pt[k] if pt else math.nan for k in ("tp", "fp", "tn", "fn")})
        row["note"] = "" if pt else "; ".join(held_point["notes"])
        rows.append(row)
    return pd.DataFrame(rows)


def evaluate_cell(preds: pd.DataFrame, classes: Sequence[str], positive: str, cfg: Mapping,
                  out_dir: Path, subgroups: pd.Series | None = None,
                  val: pd.DataFrame | None = None, seed: int = 0) -> dict:
    """Write one cell's sweep, operating points, intervals, ROC and histogram; return its
    compact figures. ``val``: the folds' validation predictions (same columns), or None."""
    col = f"prob_{positive}"
    if col not in preds.columns:
        raise KeyError(f"predictions lack column {col} (classes {list(classes)})")
    pos_idx = list(classes).index(positive)
    y = (preds["y_true"].to_numpy() == pos_idx).astype(int)
    s = preds[col].to_numpy(float)
    z, target = float(cfg["z"]), float(cfg["target_sensitivity"])
    out_dir.mkdir(parents=True, exist_ok=True)
    pooled = threshold_sweep(y, s, cfg["thresholds"], z)
    by_fold = pd.concat([threshold_sweep(y[m], s[m], cfg["thresholds"], z).assign(fold=f)
                         for f in sorted(preds["fold"].unique())
                         for m in [preds["fold"].to_numpy() == f]], ignore_index=True)
    by_fold.to_csv(out_dir / "sweep_by_fold.csv", index=False)
    op = operating_point(y, s, target, z)  # fitted on the pooled test rows, as the study did
    auc = float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else math.nan

    held = held_out_thresholds(val, preds, pos_idx, col, target, z)
    held.to_csv(out_dir / "held_out_thresholds.csv", index=False)
    boot = _bootstrap(preds, classes, pos_idx, col, held, op["threshold"], cfg, seed)
    for c in BINARY_FIGURES:
        keys = [f"{_rule_name(t)}.{c}" for t in cfg["thresholds"]]
        pooled[f"{c}_low"] = [boot["low"][k] for k in keys]
        pooled[f"{c}_high"] = [boot["high"][k] for k in keys]
    pooled.to_csv(out_dir / "sweep.csv", index=False)

    held_point = _held_out_point(held, preds["fold"].to_numpy(), y, s, target, z, boot)
    op["label"] = FITTED_LABEL
    op["bootstrap"] = {f: _interval(boot, f"fitted.{f}") for f in BINARY_FIGURES}
    op["auc"] = auc
    op["auc_bootstrap"] = _interval(boot, "auc")
    op["bootstrap_resamples"], op["bootstrap_patients"] = boot["n_boot"], boot["n_groups"]
    op["bootstrap_seed"] = seed
    op["held_out"] = held_point
    (out_dir / "operating_point.json").write_text(json.dumps(op, indent=2) + "\n")
    points = _points_table(op, held_point, held)
    points.to_csv(out_dir / "operating_points.csv", index=False)
    (out_dir / "sweep.md").write_text(_markdown(pooled, by_fold, points, out_dir.name, positive, boot))

    _cell_figures(y, s, op, held_point, out_dir, auc, positive, int(cfg["bins"]),
                  subgroups if subgroups is not None else pd.Series(
                      [classes[i] for i in preds["y_true"]], index=preds.index))
    return _compact_figures(op, held_point, pooled, auc)


def _cell_figures(y: np.ndarray, s: np.ndarray, op: Mapping, held_point: Mapping, out_dir: Path,
                  auc: float, positive: str, bins: int, groups: pd.Series) -> None:
    """A cell's ROC with both operating points (when both classes occur) and the score
    histogram per subgroup, as PNG and CSV."""
    held_ok = held_point["available"]
    if 0 < y.sum() < len(y):
        roc_figure(y, s, {"fitted on test": op, "held out": held_point if held_ok else {}},
                   out_dir / "roc.png", f"{out_dir.name}: AUC {auc:.3f}").to_csv(
                       out_dir / "roc.csv", index=False)
    hist = score_histograms(pd.DataFrame({"score": s, "subgroup": groups.fillna("?").to_numpy()}),
                            "score", "subgroup", out_dir / "histogram.png", bins,
                            {"fitted on test": op["threshold"],
                             **({"held out": held_point["thresholds"][0]} if held_ok
                                and len(set(held_point["thresholds"])) == 1 else {})},
                            f"{out_dir.name}: P({positive})")
    hist.to_csv(out_dir / "histogram.csv", index=False)


def _compact_figures(op: Mapping, held_point: Mapping, pooled: pd.DataFrame, auc: float) -> dict:
    """A cell's entry of ``binary_metrics.json``: AUC, both operating points, the sweep."""
    compact_held = ({k: held_point[k] for k in ("sensitivity", "specificity", "accuracy")}
                    | {"thresholds": held_point["thresholds"]} if held_point["available"]
                    else {"available": False})
    return {"auc": auc, "auc_ci": list(op["auc_bootstrap"]),
            "operating_point": {k: op[k] for k in
                                ("threshold", "sensitivity", "specificity", "accuracy")},
            "held_out_point": compact_held,
            "sweep": {f"{r.threshold:.2f}": {"accuracy": r.accuracy, "sensitivity": r.sensitivity,
                                             "specificity": r.specificity, "f1": r.f1}
                      for r in pooled.itertuples()}}


def read_val_predictions(cell_dir: Path, folds: Sequence[int]) -> pd.DataFrame | None:
    """The folds' ``fold_<k>/val_predictions.csv`` joined (those that exist), or None."""
    parts = [pd.read_csv(f, dtype={"patient": str}) for k in folds
             for f in [cell_dir / f"fold_{k}" / "val_predictions.csv"] if f.is_file()]
    return pd.concat(parts, ignore_index=True) if parts else None


def _tsne_cell(cell_dir: Path, preds: pd.DataFrame, frames_dir: Path, cfg: Mapping, seed: int,
               out_png: Path) -> None:
    from pipeline.data.loading import decode_frames
    from pipeline.models.checkpoint import load_model

    fold = int(cfg["tsne_fold"])
    part = preds[preds["fold"] == fold]
    if len(part) > int(cfg["tsne_max"]):
        part = part.sample(int(cfg["tsne_max"]), random_state=seed)
    model, ckpt = load_model(cell_dir / f"fold_{fold}" / "best.pt")
    images = torch.from_numpy(decode_frames([frames_dir / f for f in part["frame"]], ckpt["image_size"],
                                            ckpt["interpolation"]))
    feats = penultimate_features(model, images)
    classes = ckpt["classes"]
    tsne_plot(feats, [classes[i] for i in part["y_true"]], out_png, seed,
              title=f"{cell_dir.name}, fold {fold}: features entering the head")


def main(argv: Sequence[str] | None = None) -> None:
    params = load_params()
    ds = get(params, "dataset")
    classes = list(ds["classes"])
    cfg = get(params, "binary")
    out = Path(cfg["dir"])
    out.mkdir(parents=True, exist_ok=True)
    positive = ds["positive_class"]
    metrics_path = Path(cfg["metrics"])
    if positive is None:
        metrics_path.write_text("{}\n")
        (out / "README.md").write_text("dataset.positive_class is not set: no binary figures.\n")
        log.info("dataset.positive_class not set: nothing to do")
        return
    if positive not in classes:
        raise ConfigError(f"dataset.positive_class={positive!r} is not one of dataset.classes {classes}")
    manifest_path = Path(ds["frames_dir"]) / "manifest.csv"
    findings = None
    if manifest_path.is_file():
        manifest = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
        if "finding" in manifest.columns:
            findings = manifest[manifest["status"] == "used"].set_index("frame")["finding"]
    compact = {}
    for model_name in get(params, "grid.models"):
        for loss_name in get(params, "grid.losses"):
            cell = f"{model_name}-{loss_name}"
            path = Path("models") / cell / "predictions.csv"
            if not path.is_file():
                raise FileNotFoundError(f"{path} missing: train stage for {cell} has not run (dvc repro)")
            preds = pd.read_csv(path, dtype={"patient": str})
            groups = None
            if findings is not None:
                groups = preds["frame"].map(findings).replace("", np.nan)
            val = read_val_predictions(Path("models") / cell, sorted(preds["fold"].unique()))
            compact[cell] = evaluate_cell(preds, classes, positive, cfg, out / cell, groups, val,
                                          get(params, "seed"))
            if cfg["tsne"]:
                _tsne_cell(Path("models") / cell, preds, Path(ds["frames_dir"]), cfg,
                           get(params, "seed"), out / cell / "tsne.png")
            log.info("%s: AUC %.3f; at sensitivity >= %.3f: threshold %.3f, specificity %.3f "
                     "(fitted on test); held out: %s", cell, compact[cell]["auc"],
                     cfg["target_sensitivity"], compact[cell]["operating_point"]["threshold"],
                     compact[cell]["operating_point"]["specificity"], compact[cell]["held_out_point"])
    metrics_path.write_text(json.dumps(compact, indent=2) + "\n")
    from pipeline.core.review import log_binary

    log_binary(params, compact, out)


if __name__ == "__main__":
    from pipeline.core.cli import run_main

    run_main(main)
