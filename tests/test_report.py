"""Report generation from a small fixture of run outputs: every table's numbers equal its inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.core.config import compose
from pipeline.stages.evaluate import compare, evaluate_cell
from pipeline.stages.report import build_tables, fmt, tradeoff_figure

CLASSES = ["covid", "pneumonia", "healthy"]


def predictions(correct_every: int, seed: int) -> pd.DataFrame:
    """60 frames, 12 videos, 6 patients, 2 folds; every `correct_every`-th frame is wrong."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(60):
        y = i % 3
        pred = y if i % correct_every else (y + 1) % 3
        p = np.full(3, 0.1)
        p[pred] = 0.8
        rows.append({"frame": f"f{i}.jpg", "source": f"v{i % 12}.mp4", "patient": f"p{i % 6}",
                     "fold": (i % 6) % 2, "y_true": y, "y_pred": pred,
                     **{f"prob_{c}": p[k] for k, c in enumerate(CLASSES)}})
    df = pd.DataFrame(rows)
    # one label per video: videos v0..v11 hold frames i = v, v+12, ... whose i % 3 agree
    assert df.groupby("source")["y_true"].nunique().max() == 1
    return df.sample(frac=1, random_state=int(rng.integers(100))).reset_index(drop=True)


@pytest.fixture
def fixture(tmp_path):
    params = compose([])
    params["grid"] = {"models": ["mini_covidnet"], "losses": ["ce", "focal"]}
    preds = {"mini_covidnet-ce": predictions(4, 0), "mini_covidnet-focal": predictions(5, 1)}
    evaluation = {"classes": CLASSES,
                  "cells": {c: evaluate_cell(p, CLASSES, 50, 0.95, 0) for c, p in preds.items()},
                  "comparisons": {"mini_covidnet-focal vs mini_covidnet-ce": compare(
                      preds["mini_covidnet-focal"], preds["mini_covidnet-ce"], CLASSES, 50, 0.95, 0)}}
    runs = {c: {"model": "mini_covidnet", "loss": c.split("-")[1], "folds": [0, 1],
                "init": "none (from scratch)", "device_name": "cpu", "image_size": 64, "epochs": 2,
                "parameters": 3338947, "trainable_parameters": 3338947,
                "train_minutes_per_fold": 1.25 if c.endswith("ce") else 2.5} for c in preds}
    folds_table = pd.DataFrame([{"fold": 0, "covid_frames": 10, "total_frames": 30},
                                {"fold": 1, "covid_frames": 11, "total_frames": 30}])
    published = {"source": "the study", "rows": {"mini_covidnet-ce": {
        "accuracy": 0.812, "sensitivity": {"covid": 0.916}, "specificity": {"covid": 0.697}}},
        "parameters": {"mini_covidnet": 3338947}}
    benchmarks = {"mini_covidnet": {
        "complexity": {"macs": 46_475_648, "flops": 92_951_296, "memory_bytes": 14_969_872,
                       "image_size": 64, "file_size_bytes": {"onnx": 13_469_449}},
        "records": [{"format": "onnx", "device_type": "cpu", "threads": 1, "median_ms": 1.126,
                     "p90_ms": 1.194, "host": "local", "device": {"cpu": "EPYC", "cores": 2}}]}}
    parity = {"mini_covidnet-ce": {"per_format": {"onnx": {
        "max_abs_diff": 6.2e-05, "min_top1_agreement": 1.0, "mean_accuracy_change": 0.0,
        "passed": True}}}}
    out = tmp_path / "tables"
    sections = build_tables(params, evaluation, runs, folds_table, published, benchmarks, parity, out)
    return {"out": out, "sections": sections, "preds": preds, "params": params,
            "evaluation": evaluation, "benchmarks": benchmarks, "tmp": tmp_path}


def read(out, name) -> pd.DataFrame:
    return pd.read_csv(out / f"{name}.csv")


def test_every_table_is_written_in_three_formats(fixture):
    for name in ("table1_folds", "table2_complexity", "export_parity", "table9_latency",
                 "table4_covid", "table5_pneumonia", "table6_healthy", "table7_accuracy",
                 "table8_ablation"):
        for ext in ("csv", "md", "tex"):
            assert (fixture["out"] / f"{name}.{ext}").is_file(), f"{name}.{ext}"
    md = (fixture["out"] / "table7_accuracy.md").read_text()
    assert "profile quick" in md and "init none (from scratch)" in md and "code " in md


def test_numbers_equal_the_inputs(fixture):
    out, preds = fixture["out"], fixture["preds"]
    t7 = read(out, "table7_accuracy").set_index("row")
    for cell, p in preds.items():
        acc = (p["y_true"] == p["y_pred"]).mean()
        assert t7.loc[cell, "accuracy [95% CI]"].startswith(fmt(acc))
    assert t7.loc["mini_covidnet-ce", "published acc."] == 0.812
    assert t7.loc["mini_covidnet-focal", "train min/fold"] == 2.5
    t4 = read(out, "table4_covid").set_index("row")
    p = preds["mini_covidnet-ce"]
    tp = ((p.y_true == 0) & (p.y_pred == 0)).sum()
    assert t4.loc["mini_covidnet-ce", "precision"] == pytest.approx(tp / (p.y_pred == 0).sum())
    assert t4.loc["mini_covidnet-ce", "published sens."] == 0.916
    assert t4.loc["mini_covidnet-ce", "sensitivity [95% CI]"].startswith(
        fmt(tp / (p.y_true == 0).sum()))
    t2 = read(out, "table2_complexity").iloc[0]
    assert t2["parameters"] == 3338947 and t2["published"] == 3338947
    assert t2["GFLOPs"] == pytest.approx(0.092951296) and t2["onnx MB"] == pytest.approx(13.469449)
    t9 = read(out, "table9_latency").iloc[0]
    assert (t9["runtime"], t9["threads"], t9["median ms"]) == ("onnx", 1, 1.126)
    par = read(out, "export_parity").iloc[0]
    assert par["max |logit diff|"] == pytest.approx(6.2e-05) and bool(par["within tolerance"])
    t8 = read(out, "table8_ablation").iloc[0]
    acc = {c: (q["y_true"] == q["y_pred"]).mean() for c, q in preds.items()}
    assert t8["CE acc."] == pytest.approx(acc["mini_covidnet-ce"])
    assert t8["focal acc."] == pytest.approx(acc["mini_covidnet-focal"])
    assert t8["focal − CE [95% CI]"].startswith(fmt(acc["mini_covidnet-focal"] - acc["mini_covidnet-ce"]))
    t1 = read(out, "table1_folds")
    assert t1["covid_frames"].tolist() == [10, 11]


def test_leaky_validation_is_stated_in_the_tables(fixture, tmp_path):
    params = {**fixture["params"], "folds": {**fixture["params"]["folds"], "validation": "test_fold"}}
    ev = fixture["evaluation"]
    runs = {c: {"model": "mini_covidnet", "loss": c.split("-")[1], "folds": [0, 1]} for c in ev["cells"]}
    build_tables(params, ev, runs, pd.DataFrame([{"fold": 0}]), {}, {}, {}, tmp_path / "t")
    assert "leak" in (tmp_path / "t" / "table7_accuracy.md").read_text()


def test_tradeoff_figure_uses_the_measurements(fixture):
    png = fixture["tmp"] / "tradeoff.png"
    assert tradeoff_figure(fixture["evaluation"], fixture["benchmarks"], "ce", png)
    assert png.stat().st_size > 1000
    assert not tradeoff_figure(fixture["evaluation"], {}, "ce", fixture["tmp"] / "none.png")


def test_fmt_keeps_small_differences_visible():
    assert fmt(6.2e-05) == "6.2e-05" and fmt(0.5) == "0.500" and fmt(3338947) == "3,338,947"
    assert fmt(True) == "yes" and fmt(None) == "–" and fmt(float("nan")) == "–"


def test_published_rows_follow_the_input_size():
    import yaml

    from pipeline.stages.report import published_for
    from tests.conftest import PROJECT_ROOT

    pub = yaml.safe_load((PROJECT_ROOT / "data" / "published" / "pneumoniamnist.yaml").read_text())
    assert published_for(pub, 28)["rows"]["resnet18-ce"] == {"accuracy": 0.854, "auc": 0.944}
    assert published_for(pub, 224)["rows"]["resnet18-ce"] == {"accuracy": 0.864, "auc": 0.956}
    assert published_for(pub, 64)["rows"] == pub["rows"]  # no rows for the size: the default ones
    assert published_for({}, 224) == {}


def test_provenance_names_the_code_that_trained_the_runs():
    """Runs trained elsewhere (a GPU session's bundle) carry their code revision; the footer
    names it, and this checkout's revision only for runs that record none."""
    from pipeline.core.tracking import git_revision
    from pipeline.stages.report import provenance

    params = compose([])
    elsewhere = provenance(params, {"a-ce": {"code_revision": "52ece572d3cf"},
                                    "a-focal": {"code_revision": "52ece572d3cf"}})
    assert elsewhere.endswith("; code 52ece572d3cf")
    here = provenance(params, {"a-ce": {}})
    assert here.endswith(f"; code {git_revision()[:12]}")
