"""Stage ``report``: the study's tables and figures, generated from the runs.

Every table is written as Markdown, LaTeX and CSV under ``reports/tables/`` with the published
numbers beside ours and a provenance line (profile, data revision, initialisation, code
revision); figures go to ``reports/figures/``; ``reports/README.md`` shows them all.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from pipeline.core.config import get, grid_cells, load_params  # noqa: E402
from pipeline.core.tracking import git_revision  # noqa: E402

log = logging.getLogger("pipeline.stages.report")


def fmt(x: object, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "NO"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
        if x != 0 and abs(x) < 10 ** -digits:  # parity differences of 1e-6 must not read as 0
            return f"{float(x):.1e}"
        return f"{float(x):.{digits}f}"
    return str(x)


def write_table(df: pd.DataFrame, out_dir: Path, name: str, title: str, provenance: str,
                notes: Sequence[str] = ()) -> str:
    """Write one table as CSV, LaTeX and Markdown; return the Markdown section."""
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / f"{name}.csv", index=False)
    shown = df.map(fmt)
    (out_dir / f"{name}.tex").write_text(
        f"% {title}\n% {provenance}\n" + shown.to_latex(index=False, escape=True))
    md = f"### {title}\n\n{shown.to_markdown(index=False)}\n\n" + "".join(
        f"> {n}\n" for n in notes) + f"\n_{provenance}_\n"
    (out_dir / f"{name}.md").write_text(md)
    return md


def provenance(params: Mapping, runs: Mapping[str, dict]) -> str:
    ds = get(params, "dataset")
    checks = Path(ds["checksums"]) if ds.get("checksums") else None
    data_rev = (hashlib.sha256(checks.read_bytes()).hexdigest()[:12] if checks and checks.is_file()
                else "unpinned")
    inits = sorted({r.get("init", "?") for r in runs.values()})
    devices = sorted({r.get("device_name", "?") for r in runs.values()})
    # The code that trained the runs where they record it (runs trained elsewhere), else this
    # checkout's.
    here = git_revision()[:12]
    code = sorted({r.get("code_revision") or here for r in runs.values()}) or [here]
    r0 = next(iter(runs.values()), {})
    return (f"profile {params.get('profile')} ({r0.get('image_size')} px, {r0.get('epochs')} epochs, "
            f"frames/source {r0.get('max_frames_per_source') or 'all'}); data {ds['name']} "
            f"(checksum list {data_rev}); validation {get(params, 'folds.validation')}; "
            f"init {', '.join(inits)}; device {', '.join(devices)}; code {', '.join(code)}")


def ci_text(boot: Mapping, key: str) -> str:
    return f"{fmt(boot['point'][key])} [{fmt(boot['low'][key])}, {fmt(boot['high'][key])}]"


def split_notes(folds_dir: Path) -> list[str]:
    """What the split summary says of linked patients (duplicate linking before splitting)."""
    summary_path = folds_dir / "summary.json"
    link = json.loads(summary_path.read_text()).get("link_duplicates") if summary_path.is_file() else None
    if not link:
        return ["Patients were split by their own ids (this split predates duplicate linking)."]
    if link["method"] == "off":
        return ["Duplicate linking was off (folds.link_duplicates.method=off): patients were "
                "split by their own ids."]
    return [f"Duplicate linking ({link['method']}"
            + (f", pHash distance <= {link['threshold']}" if link["method"] == "perceptual" else "")
            + f"): {link['linked_patients']} patient ids joined into {link['linked_groups']} "
            f"split group(s), listed with their evidence in `{folds_dir}/links.json`."]


def build_tables(params: Mapping, evaluation: Mapping, runs: Mapping[str, dict],
                 folds_table: pd.DataFrame, published: Mapping, benchmarks: Mapping[str, dict],
                 parity: Mapping[str, dict], out_dir: Path) -> list[str]:
    """All tables; returns their Markdown sections in the study's order."""
    folds_dir = Path(get(params, "folds.dir"))
    prov = provenance(params, runs)
    leak = ["Validation used the TEST fold (the study's notebooks' protocol): these numbers leak."
            ] if get(params, "folds.validation") == "test_fold" else []
    pub = published.get("rows", {})
    sections: list[str] = []

    def add(rows: pd.DataFrame | list[dict], name: str, title: str,
            notes: Sequence[str] = ()) -> None:
        sections.append(write_table(pd.DataFrame(rows), out_dir, name, title, prov, notes))

    add(folds_table, "table1_folds",
        "Table I — frames (videos, patients) per class in each test fold", split_notes(folds_dir))
    val_path = folds_dir / "val_table.csv"
    if val_path.is_file():
        add(pd.read_csv(val_path), "table1_validation",
            "Validation — frames (videos, patients) per class in each fold's validation set, "
            "with each class's share of validation and of training frames")
    add(complexity_rows(runs, benchmarks, published), "table2_complexity",
        "Table II — parameters, FLOPs, memory and file size per model",
        ["FLOPs = 2 x MACs at the input size (torch FlopCounterMode); "
         "memory = weights + activations of one forward."])
    if rows := parity_rows(parity):
        add(rows, "export_parity",
            "Export parity — every fold's files vs PyTorch on real test frames (worst fold)")
    if rows := latency_rows(benchmarks):
        add(rows, "table9_latency",
            "Table IX — batch-1 latency (median, p90 over the runs after warm-up) per runtime",
            ["The study timed TFLite models on a Raspberry Pi 4 and a Jetson AGX Xavier; run this "
             "stage against such a device with `-S benchmark.remote=...` (README)."])
    for number, roman, cls in zip((4, 5, 6), ("IV", "V", "VI"), evaluation["classes"]):
        add(class_rows(evaluation, cls, pub), f"table{number}_{cls}",
            f"Table {roman} — {cls} class, frame level, pooled over folds "
            "(95% CI by bootstrap over patients)", leak)
    add(accuracy_rows(evaluation, runs, pub), "table7_accuracy",
        "Table VII — accuracy over all classes and training time", leak + published_notes(published))
    if rows := ablation_rows(evaluation, pub):  # the ablation needs both losses in the grid
        add(rows, "table8_ablation",
            "Table VIII — cross-entropy vs focal loss (paired over the same patients)", leak)
    if rows := vs_mini_covidnet_rows(evaluation):
        add(rows, "comparisons_vs_mini_covidnet",
            "Each row vs Mini-COVIDNet (paired over the same patients)")
    return sections


def complexity_rows(runs: Mapping[str, dict], benchmarks: Mapping[str, dict],
                    published: Mapping) -> list[dict]:
    """Table II: one row per model (parameters from the runs, the rest from the benchmark)."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in runs.values()):
        r = next(r for r in runs.values() if r["model"] == model)
        c = benchmarks.get(model, {}).get("complexity", {})
        sizes = c.get("file_size_bytes", {})
        rows.append({"model": model, "parameters": r.get("parameters"),
                     "trainable": r.get("trainable_parameters"),
                     "published": published.get("parameters", {}).get(model),
                     "GMACs": c["macs"] / 1e9 if c.get("macs") else None,
                     "GFLOPs": c["flops"] / 1e9 if c.get("flops") else None,
                     "memory MB": c["memory_bytes"] / 1e6 if c.get("memory_bytes") else None,
                     **{f"{name} MB": sizes[name] / 1e6 for name in sizes},
                     "input px": c.get("image_size"), "init": r.get("init")})
    return rows


def parity_rows(parity: Mapping[str, dict]) -> list[dict]:
    """Export parity: one row per run and exported format."""
    rows = []
    for cell, p in parity.items():
        for fmt_name, f in p.get("per_format", {}).items():
            rows.append({"row": cell, "format": fmt_name, "max |logit diff|": f.get("max_abs_diff"),
                         "min top-1 agreement": f.get("min_top1_agreement"),
                         "accuracy change": f.get("mean_accuracy_change"),
                         "within tolerance": f.get("passed")})
    return rows


def latency_rows(benchmarks: Mapping[str, dict]) -> list[dict]:
    """Table IX: one row per model and timed runtime."""
    rows = []
    for model, b in benchmarks.items():
        sizes = b.get("complexity", {}).get("file_size_bytes", {})
        for rec in b.get("records", []):
            rows.append({"model": model, "runtime": rec["format"], "device": rec.get("device_type"),
                         "threads": rec.get("threads"), "median ms": rec.get("median_ms"),
                         "p90 ms": rec.get("p90_ms"),
                         "file MB": (sizes.get(rec["format"]) or 0) / 1e6 or None,
                         "host": f"{rec.get('host')}: {rec.get('device', {}).get('cpu')} "
                                 f"({rec.get('device', {}).get('cores')} cores)"})
    return rows


def class_rows(evaluation: Mapping, cls: str, pub: Mapping[str, dict]) -> list[dict]:
    """Tables IV-VI: the figures of class ``cls`` for every run."""
    rows = []
    for cell, e in evaluation["cells"].items():
        pc = e["frame"]["pooled"]["per_class"][cls]
        boot = e["bootstrap"]
        p = pub.get(cell, {})
        rows.append({"row": cell,
                     "sensitivity [95% CI]": ci_text(boot, f"per_class.{cls}.sensitivity"),
                     "specificity [95% CI]": ci_text(boot, f"per_class.{cls}.specificity"),
                     "precision": pc["precision"], "F1": pc["f1"], "AUC": pc.get("auc"),
                     "published sens.": p.get("sensitivity", {}).get(cls),
                     "published spec.": p.get("specificity", {}).get(cls)})
    return rows


def accuracy_rows(evaluation: Mapping, runs: Mapping[str, dict],
                  pub: Mapping[str, dict]) -> list[dict]:
    """Table VII: accuracy (frame, fold, video), macro-F1, MCC, AUC and training time per run."""
    rows = []
    for cell, e in evaluation["cells"].items():
        f = e["frame"]
        p = pub.get(cell, {})
        rows.append({"row": cell, "accuracy [95% CI]": ci_text(e["bootstrap"], "accuracy"),
                     "fold mean": f["fold_mean"]["accuracy"], "fold std": f["fold_std"]["accuracy"],
                     "macro F1": f["pooled"]["macro_f1"], "MCC": f["pooled"]["mcc"],
                     "video acc. (mean)": e["video"]["mean"]["pooled"]["accuracy"],
                     "video acc. (vote)": e["video"]["vote"]["pooled"]["accuracy"],
                     "AUC": f["pooled"].get("auc_ovr"),
                     "train min/fold": runs.get(cell, {}).get("train_minutes_per_fold"),
                     "published acc.": p.get("accuracy"), "published AUC": p.get("auc")})
    return rows


def published_notes(published: Mapping) -> list[str]:
    """Notes naming the published source and its training time."""
    notes = [f"Published: {published['source']}."] if published.get("source") else []
    if published.get("training_minutes_per_fold"):
        notes.append(f"Published training time: {published['training_minutes_per_fold']} min per fold.")
    return notes


def ablation_rows(evaluation: Mapping, pub: Mapping[str, dict]) -> list[dict]:
    """Table VIII: focal vs cross-entropy of the same model (comparisons ``<m>-focal vs <m>-ce``)."""
    rows = []
    for name, comp in evaluation["comparisons"].items():
        if "-focal vs " not in name or not name.split(" vs ")[1].endswith("-ce"):
            continue
        a, b = name.split(" vs ")
        if a.rsplit("-", 1)[0] != b.rsplit("-", 1)[0]:
            continue
        d, mc = comp["accuracy_difference"], comp["mcnemar_videos"]
        rows.append({"model": a.rsplit("-", 1)[0],
                     "CE acc.": evaluation["cells"][b]["frame"]["pooled"]["accuracy"],
                     "focal acc.": evaluation["cells"][a]["frame"]["pooled"]["accuracy"],
                     "focal − CE [95% CI]": f"{fmt(d['diff'])} [{fmt(d['low'])}, {fmt(d['high'])}]",
                     "bootstrap p": d.get("p_value"), "McNemar p (videos)": mc["p_value"],
                     "published CE": pub.get(b, {}).get("accuracy"),
                     "published focal": pub.get(a, {}).get("accuracy")})
    return rows


def vs_mini_covidnet_rows(evaluation: Mapping) -> list[dict]:
    """Each run vs Mini-COVIDNet with the same loss (comparisons ``<m>-<loss> vs mini_covidnet-<loss>``)."""
    rows = []
    for name, comp in evaluation["comparisons"].items():
        a, b = name.split(" vs ")
        if not b.startswith("mini_covidnet-") or a.rsplit("-", 1)[1] != b.rsplit("-", 1)[1]:
            continue
        d, mc = comp["accuracy_difference"], comp["mcnemar_videos"]
        rows.append({"row": a, "vs": b, "accuracy difference [95% CI]":
                     f"{fmt(d['diff'])} [{fmt(d['low'])}, {fmt(d['high'])}]",
                     "McNemar p (videos)": mc["p_value"]})
    return rows


def _ci(value: float, low: float, high: float) -> str:
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]" if np.isfinite(value) else "–"


def _wald(value: float | None, half: float | None) -> str:
    if value is None or half is None or not np.isfinite(value) or not np.isfinite(half):
        return "–"
    return f"{fmt(value)} ± {fmt(half)}"


BINARY_SHOWN = (("sensitivity", "sensitivity"), ("specificity", "specificity"),
                ("accuracy", "accuracy"), ("precision", "precision"), ("f1", "F1"))


def _measured(value: Callable[[str], float], wald: Sequence[str], wald_suffix: str) -> dict:
    """Columns of measured figures: ``<figure> [95% CI]`` from ``<key>``, ``<key>_low`` and
    ``<key>_high``, then ``<key> ± Wald`` from ``<key><wald_suffix>``."""
    row = {f"{name} [95% CI]": _ci(value(key), value(f"{key}_low"), value(f"{key}_high"))
           for key, name in BINARY_SHOWN}
    row.update({f"{key} ± Wald": _wald(value(key), value(f"{key}{wald_suffix}")) for key in wald})
    return row


def _published(values: Mapping, wald: Sequence[str]) -> dict:
    """The same columns for published figures (no bootstrap; Wald from ``<key>_wald``)."""
    row = {f"{name} [95% CI]": fmt(values[key]) if key in values else "–"
           for key, name in BINARY_SHOWN}
    row.update({f"{key} ± Wald": _wald(values.get(key), values.get(f"{key}_wald")) for key in wald})
    return row


def _sweep_rows(cell: str, sweep: pd.DataFrame, published: Mapping) -> list[dict]:
    """The pooled sweep of a cell, then its published sweep rows."""
    wald = ("sensitivity", "specificity", "accuracy")
    rows = [{"row": cell, "threshold": f"{r.threshold:.2f}",
             **_measured(lambda k, r=r: getattr(r, k), wald, "_ci")} for r in sweep.itertuples()]
    rows += [{"row": f"{cell} (published)", "threshold": f"{float(thr):.2f}",
              **_published(vals, wald)} for thr, vals in (published.get("sweep") or {}).items()]
    return rows


def _point_rows(cell: str, d: Path, op: Mapping, published: Mapping) -> tuple[list[dict], list[str]]:
    """Both operating points of a cell (``operating_points.csv``), its published point, and the
    points' notes."""
    wald = ("sensitivity", "specificity")
    auc_text = _ci(op.get("auc", np.nan), *op.get("auc_bootstrap", (np.nan, np.nan)))
    rows, notes = [], []
    path = d / "operating_points.csv"
    points = pd.read_csv(path, keep_default_na=False, na_values=[""]) if path.is_file() else None
    for r in points.itertuples() if points is not None else ():
        try:
            shown_thr = f"{float(r.threshold_shown):.4f}"
        except ValueError:  # several folds' thresholds, or "not available"
            shown_thr = str(r.threshold_shown)
        rows.append({"row": cell, "operating point": r.point, "threshold": shown_thr,
                     **_measured(lambda k, r=r: getattr(r, k), wald, "_wald"),
                     "AUC [95% CI]": auc_text})
        if isinstance(r.note, str) and r.note:
            notes.append(f"{cell}, {r.point}: {r.note}.")
    q = published.get("operating_point")
    if q:
        rows.append({"row": f"{cell} (published)", "operating point":
                     f"published: threshold for {fmt(q.get('target_sensitivity'))} sensitivity, "
                     "fitted on test", "threshold": "–", **_published(q, wald),
                     "AUC [95% CI]": fmt(published.get("auc"))})
    return rows, notes


def _mean_std(values: pd.Series, n: int) -> str:
    return _wald(values.mean(), values.std(ddof=1)) if n > 1 else fmt(values.mean())


def _fold_rows(cell: str, d: Path) -> tuple[list[dict], list[str]]:
    """Per-threshold spread over folds, the held-out thresholds' own row, and the folds the
    held-out point flags."""
    by_fold = pd.read_csv(d / "sweep_by_fold.csv")
    n_folds = by_fold["fold"].nunique()
    figures = ("sensitivity", "specificity", "accuracy")
    rows = [{"row": cell, "threshold": f"{thr:.2f}", "folds": n_folds,
             **{f"{k} mean ± std": _mean_std(part[k], n_folds) for k in figures},
             "threshold range": "–"}
            for thr, part in by_fold.groupby("threshold")[list(figures)]]
    held = d / "held_out_thresholds.csv"
    if not held.is_file():
        return rows, []
    h = pd.read_csv(held, dtype={"note": str, "source": str})
    h["note"] = h["note"].fillna("")
    ok = h["threshold"].notna()
    flagged = h[h["note"] != ""].groupby("note")["fold"].apply(list)
    notes = [f"{cell}, held out, fold{'s' if len(f) > 1 else ''} {', '.join(map(str, f))}: {n}."
             for n, f in flagged.items() if ok.any()]  # else the point's own row says why
    if ok.any():
        rows.append({"row": cell, "threshold": "held out (per fold)", "folds": int(ok.sum()),
                     **{f"{k} mean ± std": _mean_std(h.loc[ok, f"test_{k}"], int(ok.sum()))
                        for k in ("sensitivity", "specificity")},
                     "accuracy mean ± std": "–",
                     "threshold range": f"{fmt(h.loc[ok, 'threshold'].min(), 4)} – "
                                        f"{fmt(h.loc[ok, 'threshold'].max(), 4)}"})
    return rows, notes


def _copy_binary_figures(cell: str, d: Path, figures_dir: Path) -> list[str]:
    """The cell's ROC, histogram and t-SNE that exist, copied under the report's figures."""
    import shutil

    names = []
    for kind in ("roc", "histogram", "tsne"):
        if (d / f"{kind}.png").is_file():
            figures_dir.mkdir(parents=True, exist_ok=True)
            names.append(f"binary_{kind}_{cell}.png")
            shutil.copy(d / f"{kind}.png", figures_dir / names[-1])
    return names


def binary_sections(binary_dir: Path, cells: Sequence[str], published: Mapping, prov: str,
                    tables_dir: Path, figures_dir: Path) -> tuple[list[str], list[str]]:
    """The two-class study's tables and figures from ``binary_eval``'s outputs
    (``<binary_dir>/<cell>/``): the threshold sweep, the two operating points (fitted on test
    as in the study, and held out), the per-fold spread, with patient-bootstrap intervals and the
    study's Wald intervals; published figures (``published["binary"]``) as rows marked
    published. Figures (ROC with both points, score histograms, t-SNE) are copied to
    ``figures_dir`` when they exist. Returns (Markdown sections, figure file names)."""
    cells = [c for c in cells if (binary_dir / c / "operating_point.json").is_file()]
    if not cells:
        return [], []
    pub = published.get("binary") or {}
    sweep_rows, point_rows, fold_rows, notes, figs = [], [], [], [], []
    for cell in cells:
        d = binary_dir / cell
        op = json.loads((d / "operating_point.json").read_text())
        p = pub.get("rows", {}).get(cell, {})
        sweep_rows += _sweep_rows(cell, pd.read_csv(d / "sweep.csv"), p)
        rows, point_notes = _point_rows(cell, d, op, p)
        point_rows += rows
        notes += point_notes
        rows, fold_notes = _fold_rows(cell, d)
        fold_rows += rows
        notes += fold_notes
        figs += _copy_binary_figures(cell, d, figures_dir)
    src_note = ([f"Rows marked (published): {pub['source']}; the study fitted its threshold on "
                 "its test images and gave Wald intervals over images."] if pub.get("source") else [])
    first = json.loads((binary_dir / cells[0] / "operating_point.json").read_text())
    ci_note = (f"[95% CI]: percentile bootstrap over patients ({first.get('bootstrap_resamples')} "
               f"resamples, seed {first.get('bootstrap_seed')}), as in the three-class tables; "
               "± Wald: the study's z·sqrt(p(1-p)/N) over images, for comparison with the paper.")
    sections = [write_table(pd.DataFrame(sweep_rows), tables_dir, "binary_sweep",
                            "Two-class threshold sweep (study 001's Table 2 thresholds), pooled "
                            "over folds", prov, [ci_note, *src_note])]
    if point_rows:
        sections.append(write_table(
            pd.DataFrame(point_rows), tables_dir, "binary_operating_points",
            f"Two-class operating points at {fmt(first['target_sensitivity'])} sensitivity: fitted "
            "on test (the study's, optimistic) and held out (each fold's threshold chosen on its "
            "validation patients, applied to its test patients, pooled)", prov,
            [ci_note, *src_note, *notes]))
    sections.append(write_table(pd.DataFrame(fold_rows), tables_dir, "binary_folds",
                                "Two-class figures per fold (mean ± sample std over folds)", prov,
                                ["Held out (per fold): each fold's test sensitivity and "
                                 "specificity at its own validation threshold."]))
    return sections, figs


def figures(evaluation: Mapping, out_dir: Path, plots_dir: Path, models_dir: Path) -> list[str]:
    """Confusion matrices (counts, row-normalised), ROC curves and training curves as PNG."""
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = evaluation["classes"]
    made = []
    for cell, e in evaluation["cells"].items():
        cm = np.asarray(e["frame"]["pooled"]["confusion_matrix"], dtype=float)
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for ax, mat, title in ((axes[0], cm, "counts"),
                               (axes[1], cm / np.maximum(cm.sum(1, keepdims=True), 1), "row-normalised")):
            ax.imshow(mat, cmap="Blues")
            for i in range(len(classes)):
                for j in range(len(classes)):
                    ax.text(j, i, f"{mat[i, j]:.0f}" if title == "counts" else f"{mat[i, j]:.2f}",
                            ha="center", va="center")
            ax.set_xticks(range(len(classes)), classes)
            ax.set_yticks(range(len(classes)), classes)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(f"{cell}: {title}")
        roc = plots_dir / "roc" / f"{cell}.csv"
        if roc.is_file():
            r = pd.read_csv(roc)
            for cls, part in r.groupby("class"):
                auc = e["frame"]["pooled"]["per_class"][cls].get("auc")
                axes[2].plot(part["fpr"], part["tpr"], label=f"{cls} (AUC {fmt(auc)})")
            axes[2].plot([0, 1], [0, 1], "k:", lw=0.8)
            axes[2].set_xlabel("false positive rate")
            axes[2].set_ylabel("true positive rate")
            axes[2].set_title("ROC, one vs rest")
            axes[2].legend(loc="lower right")
        fig.tight_layout()
        name = f"confusion_roc_{cell}.png"
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        made.append(name)
        hist = sorted((models_dir / cell).glob("fold_*/history.csv"))
        if hist:
            fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
            for h in hist:
                d = pd.read_csv(h)
                k = h.parent.name
                axes[0].plot(d["epoch"] + 1, d["train_loss"], label=f"{k} train")
                axes[0].plot(d["epoch"] + 1, d["val_loss"], "--", label=f"{k} val")
                axes[1].plot(d["epoch"] + 1, d["val_accuracy"], label=k)
            axes[0].set_title(f"{cell}: loss")
            axes[1].set_title(f"{cell}: validation accuracy")
            for ax in axes:
                ax.set_xlabel("epoch")
            axes[0].legend(fontsize=6, ncol=2)
            fig.tight_layout()
            name = f"training_{cell}.png"
            fig.savefig(out_dir / name, dpi=90)
            plt.close(fig)
            made.append(name)
    return made


def load_runs(cells: Sequence[str], models_dir: Path, params: Mapping) -> dict[str, dict]:
    """Each cell's run record and metrics, with its model's parameter counts (from the trained
    checkpoint, or built from the config when only the predictions were kept)."""
    from pipeline.models.checkpoint import load_model
    from pipeline.models.build import build_model, count_parameters

    runs = {}
    for cell in cells:
        d = models_dir / cell
        info = json.loads((d / "run.json").read_text())
        info.update(json.loads((d / "metrics.json").read_text()))
        ckpt = d / f"fold_{info['folds'][0]}" / "best.pt"
        if ckpt.is_file():
            model, _ = load_model(ckpt)
            info["checkpoint_mb"] = ckpt.stat().st_size / 1e6
        else:
            cfg = {**get(params, f"models.{info['model']}"), "pretrained": "none"}
            model = build_model(cfg, num_classes=len(get(params, "dataset.classes")))
        info["parameters"] = count_parameters(model)
        info["trainable_parameters"] = count_parameters(model, trainable_only=True)
        runs[cell] = info
    return runs


def load_json_files(names: Sequence[str], pattern: str) -> dict[str, dict]:
    """``{name: json}`` for the files ``pattern.format(name)`` that exist."""
    out = {}
    for name in names:
        f = Path(pattern.format(name))
        if f.is_file():
            out[name] = json.loads(f.read_text())
    return out


def tradeoff_figure(evaluation: Mapping, benchmarks: Mapping[str, dict], grid_loss: str,
                    out_png: Path) -> bool:
    """Accuracy vs ONNX Runtime 1-thread latency, marker area ~ file size: the study's argument."""
    pts = []
    for model, b in benchmarks.items():
        cell = f"{model}-{grid_loss}"
        rec = next((r for r in b.get("records", []) if r["format"] == "onnx" and r.get("threads") == 1), None)
        if cell not in evaluation["cells"] or rec is None:
            continue
        size = b.get("complexity", {}).get("file_size_bytes", {}).get("onnx", 0) / 1e6
        pts.append((model, rec["median_ms"], evaluation["cells"][cell]["frame"]["pooled"]["accuracy"], size))
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, ms, acc, mb in pts:
        ax.scatter(ms, acc, s=max(mb, 1) * 8, alpha=0.6)
        ax.annotate(f"{model}\n{mb:.1f} MB", (ms, acc), fontsize=8)
    ax.set_xlabel("batch-1 latency, ONNX Runtime 1 thread (ms)")
    ax.set_ylabel(f"pooled accuracy ({grid_loss})")
    ax.set_title("accuracy vs latency vs size")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return True


def published_for(published: Mapping, image_size: int) -> dict:
    """The published numbers for this input size: ``rows_by_image_size[<size>]`` replaces
    ``rows`` where a study reports several sizes (MedMNIST's 28 and 224 px rows)."""
    out = dict(published)
    by_size = published.get("rows_by_image_size") or {}
    if image_size in by_size:
        out["rows"] = by_size[image_size]
    return out


def gradcam_figures(cells: Sequence[str], fig_dir: Path, frames_dir: Path
                    ) -> tuple[list[str], list[str]]:
    """A Grad-CAM grid per cell (``gradcam_<cell>.png``); a cell that fails is skipped with a
    note for the page, not lost from it."""
    from pipeline.evaluation.gradcam import gradcam_grid

    figs, skipped = [], []
    for cell in cells:
        name = f"gradcam_{cell}.png"
        try:
            gradcam_grid(Path("models") / cell, 4, fig_dir / name, frames_dir=frames_dir)
            figs.append(name)
        except Exception as exc:  # noqa: BLE001 - a figure must not cost the tables
            log.warning("Grad-CAM for %s skipped: %s", cell, exc)
            skipped.append(f"Grad-CAM for {cell} skipped: {exc}")
    return figs, skipped


def main(argv: Sequence[str] | None = None) -> None:
    params = load_params()
    out = Path(get(params, "report.dir"))
    cells = grid_cells(params)
    evaluation = json.loads((out / "evaluation.json").read_text())
    runs = load_runs(cells, Path("models"), params)
    pub_file = Path("data/published") / f"{get(params, 'dataset.name')}.yaml"
    published = published_for(yaml.safe_load(pub_file.read_text()) if pub_file.is_file() else {},
                              int(get(params, "train.image_size")))
    folds_table = pd.read_csv(Path(get(params, "folds.dir")) / "table1.csv")
    models = list(get(params, "grid.models"))
    benchmarks = load_json_files(models, str(out / "benchmark" / "{}.json"))
    parity = load_json_files(cells, "exports/{}/parity.json")
    sections = build_tables(params, evaluation, runs, folds_table, published, benchmarks, parity,
                            out / "tables")
    binary_figs: list[str] = []
    if get(params, "dataset").get("positive_class"):
        more, binary_figs = binary_sections(Path(get(params, "binary.dir")), cells, published,
                                            provenance(params, runs), out / "tables",
                                            out / "figures")
        sections += more
    figs = figures(evaluation, out / "figures", out / "plots", Path("models"))
    if tradeoff_figure(evaluation, benchmarks, get(params, "grid.losses")[0],
                       out / "figures" / "tradeoff.png"):
        figs.append("tradeoff.png")
    cams, skipped = gradcam_figures(cells, out / "figures", Path(get(params, "dataset.frames_dir")))
    figs += cams
    page = ["# Generated report\n",
            "Regenerated by `dvc repro` from the runs of this workspace; do not edit by hand. "
            "Published numbers come from `data/published/<dataset>.yaml` (see REFERENCE).\n"]
    if params.get("profile") == "quick":
        page.append("> **Quick profile**: small inputs, few epochs and a subset of frames per "
                    "video, so that every stage runs on a 2-core CPU in minutes. The numbers show "
                    "the pipeline works; they are not the study's protocol "
                    "(`dvc exp run -S experiment=paper`).\n")
    page += sections
    page.append("## Figures\n")
    page += [f"> {note}\n" for note in skipped]
    page += [f"![{f}](figures/{f})\n" for f in figs]
    if binary_figs:
        page.append("### Two-class figures (ROC with both operating points, score histograms "
                    "per finding, t-SNE)\n")
        page += [f"![{f}](figures/{f})\n" for f in binary_figs]
    (out / "README.md").write_text("\n".join(page))
    log.info("wrote %d tables and %d figures under %s", len(sections), len(figs), out)
    from pipeline.core.review import log_figures

    log_figures(params, {cell: [out / "figures" / f for f in figs + binary_figs
                                if f.removesuffix(".png").endswith(f"_{cell}")]
                         for cell in cells})


if __name__ == "__main__":
    from pipeline.core.cli import run_main

    run_main(main)
