"""Stage ``report``: the study's tables and figures, generated from the runs.

Every table is written as Markdown, LaTeX and CSV under ``reports/tables/`` with the published
numbers beside ours and a provenance line (profile, data revision, initialisation, code
revision); figures go to ``reports/figures/``; ``reports/README.md`` shows them all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from pipeline.config import get, load_params  # noqa: E402
from pipeline.tracking import git_revision  # noqa: E402

log = logging.getLogger("pipeline.report")


def fmt(x: object, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, (float, np.floating)):
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
    checks = Path(ds["checksums"])
    data_rev = hashlib.sha256(checks.read_bytes()).hexdigest()[:12] if checks.is_file() else "?"
    inits = sorted({r.get("init", "?") for r in runs.values()})
    devices = sorted({r.get("device_name", "?") for r in runs.values()})
    r0 = next(iter(runs.values()), {})
    return (f"profile {params.get('profile')} ({r0.get('image_size')} px, {r0.get('epochs')} epochs, "
            f"frames/source {r0.get('max_frames_per_source') or 'all'}); data {ds['name']} "
            f"(checksum list {data_rev}); validation {get(params, 'folds.validation')}; "
            f"init {', '.join(inits)}; device {', '.join(devices)}; code {git_revision()[:12]}")


def ci_text(boot: Mapping, key: str) -> str:
    return f"{fmt(boot['point'][key])} [{fmt(boot['low'][key])}, {fmt(boot['high'][key])}]"


def build_tables(params: Mapping, evaluation: Mapping, runs: Mapping[str, dict],
                 folds_table: pd.DataFrame, published: Mapping, complexity: Mapping[str, dict],
                 out_dir: Path) -> list[str]:
    """All tables; returns their Markdown sections in the study's order."""
    classes = evaluation["classes"]
    prov = provenance(params, runs)
    leak = ["Validation used the TEST fold (the study's notebooks' protocol): these numbers leak."
            ] if get(params, "folds.validation") == "test_fold" else []
    pub = published.get("rows", {})
    sections = []
    sections.append(write_table(folds_table, out_dir, "table1_folds",
                                "Table I — frames (videos, patients) per class in each test fold",
                                prov))
    rows = []
    for cell, r in runs.items():
        model = r["model"]
        c = complexity.get(cell, {})
        rows.append({"model": model, "loss": r["loss"], "parameters": r.get("parameters"),
                     "trainable": r.get("trainable_parameters"),
                     "published": published.get("parameters", {}).get(model),
                     "checkpoint MB": r.get("checkpoint_mb"), "onnx MB": c.get("onnx_mb"),
                     "GFLOPs": c.get("gflops"), "init": r.get("init")})
    sections.append(write_table(pd.DataFrame(rows), out_dir, "table2_complexity",
                                "Table II — parameters, file size and FLOPs", prov))
    for num, cls in zip(("4", "5", "6"), classes):
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
        roman = {"4": "IV", "5": "V", "6": "VI"}[num]
        sections.append(write_table(pd.DataFrame(rows), out_dir, f"table{num}_{cls}",
                                    f"Table {roman} — {cls} class, frame level, pooled over folds "
                                    "(95% CI by bootstrap over patients)", prov, leak))
    rows = []
    for cell, e in evaluation["cells"].items():
        f = e["frame"]
        p = pub.get(cell, {})
        rows.append({"row": cell, "accuracy [95% CI]": ci_text(e["bootstrap"], "accuracy"),
                     "fold mean": f["fold_mean"]["accuracy"], "fold std": f["fold_std"]["accuracy"],
                     "macro F1": f["pooled"]["macro_f1"], "MCC": f["pooled"]["mcc"],
                     "video acc. (mean)": e["video"]["mean"]["pooled"]["accuracy"],
                     "video acc. (vote)": e["video"]["vote"]["pooled"]["accuracy"],
                     "train min/fold": runs.get(cell, {}).get("train_minutes_per_fold"),
                     "published acc.": p.get("accuracy")})
    sections.append(write_table(pd.DataFrame(rows), out_dir, "table7_accuracy",
                                "Table VII — accuracy over all classes and training time", prov,
                                leak + [f"Published training time: {published.get('training_minutes_per_fold')}."]))
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
    sections.append(write_table(pd.DataFrame(rows), out_dir, "table8_ablation",
                                "Table VIII — cross-entropy vs focal loss (paired over the same patients)",
                                prov, leak))
    rows = []
    for name, comp in evaluation["comparisons"].items():
        a, b = name.split(" vs ")
        if not b.startswith("mini_covidnet-") or a.rsplit("-", 1)[1] != b.rsplit("-", 1)[1]:
            continue
        d, mc = comp["accuracy_difference"], comp["mcnemar_videos"]
        rows.append({"row": a, "vs": b, "accuracy difference [95% CI]":
                     f"{fmt(d['diff'])} [{fmt(d['low'])}, {fmt(d['high'])}]",
                     "McNemar p (videos)": mc["p_value"]})
    if rows:
        sections.append(write_table(pd.DataFrame(rows), out_dir, "comparisons_vs_mini_covidnet",
                                    "Each row vs Mini-COVIDNet (paired over the same patients)", prov))
    return sections


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
        roc = plots_dir / f"roc_{cell}.csv"
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
    from pipeline.checkpoint import load_model
    from pipeline.models import build_model, count_parameters

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


def load_complexity(cells: Sequence[str], exports_dir: Path) -> dict[str, dict]:
    out = {}
    for cell in cells:
        f = exports_dir / cell / "complexity.json"
        if f.is_file():
            out[cell] = json.loads(f.read_text())
    return out


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params()
    out = Path(get(params, "report.dir"))
    cells = [f"{m}-{l}" for m in get(params, "grid.models") for l in get(params, "grid.losses")]
    evaluation = json.loads((out / "evaluation.json").read_text())
    runs = load_runs(cells, Path("models"), params)
    published = yaml.safe_load(Path("data/published.yaml").read_text())
    folds_table = pd.read_csv(Path(get(params, "folds.dir")) / "table1.csv")
    sections = build_tables(params, evaluation, runs, folds_table, published,
                            load_complexity(cells, Path("exports")), out / "tables")
    figs = figures(evaluation, out / "figures", out / "plots", Path("models"))
    page = ["# Generated report\n",
            "Regenerated by `dvc repro` from the runs of this workspace; do not edit by hand. "
            "Published numbers come from `data/published.yaml` (see REFERENCE).\n"]
    if params.get("profile") == "quick":
        page.append("> **Quick profile**: small inputs, few epochs and a subset of frames per "
                    "video, so that every stage runs on a 2-core CPU in minutes. The numbers show "
                    "the pipeline works; they are not the study's protocol "
                    "(`dvc exp run -S experiment=paper`).\n")
    page += sections
    page.append("## Figures\n")
    page += [f"![{f}](figures/{f})\n" for f in figs]
    (out / "README.md").write_text("\n".join(page))
    log.info("wrote %d tables and %d figures under %s", len(sections), len(figs), out)


if __name__ == "__main__":
    main(sys.argv[1:])
