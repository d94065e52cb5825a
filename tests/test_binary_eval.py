"""Binary-task figures of study 001 on constructed scores whose answers are worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.core.config import compose
from pipeline.evaluation.bootstrap import patient_bootstrap
from pipeline.evaluation.bootstrap_figures import BinaryFigures
from pipeline.stages.binary_eval import (
    confusion_at,
    evaluate_cell,
    held_out_thresholds,
    main,
    min_positives,
    operating_point,
    penultimate_features,
    score_histograms,
    threshold_sweep,
    tsne_plot,
    wald_ci,
)

# 4 positives, 6 negatives. A score >= the threshold is called positive.
Y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
S = [0.9, 0.28, 0.22, 0.10, 0.30, 0.26, 0.18, 0.16, 0.05, 0.0]


def test_threshold_sweep_by_hand():
    sweep = threshold_sweep(Y, S, [0.15, 0.20, 0.25, 0.30]).set_index("threshold")
    assert list(sweep.index) == [0.15, 0.20, 0.25, 0.30]
    #            tp fp tn fn   accuracy sensitivity specificity precision f1
    expected = {0.15: (3, 4, 2, 1, 5 / 10, 3 / 4, 2 / 6, 3 / 7, 6 / 11),
                0.20: (3, 2, 4, 1, 7 / 10, 3 / 4, 4 / 6, 3 / 5, 6 / 9),
                0.25: (2, 2, 4, 2, 6 / 10, 2 / 4, 4 / 6, 2 / 4, 4 / 8),
                0.30: (1, 1, 5, 3, 6 / 10, 1 / 4, 5 / 6, 1 / 2, 2 / 6)}  # 0.30 itself is positive
    cols = ["tp", "fp", "tn", "fn", "accuracy", "sensitivity", "specificity", "precision", "f1"]
    for t, values in expected.items():
        assert sweep.loc[t, cols].to_numpy(float) == pytest.approx(values)
    assert sweep.loc[0.15, "sensitivity_ci"] == pytest.approx(1.96 * math.sqrt(0.75 * 0.25 / 4))
    assert sweep.loc[0.15, "specificity_ci"] == pytest.approx(1.96 * math.sqrt(2 / 6 * 4 / 6 / 6))


def test_undefined_figures_are_nan():
    row = threshold_sweep([0, 0, 1], [0.1, 0.2, 0.05], [0.5]).iloc[0]
    assert math.isnan(row["precision"]) and row["sensitivity"] == 0 and row["specificity"] == 1


@pytest.mark.parametrize("target, threshold, sensitivity, specificity",
                         [(0.973, 0.10, 1.0, 2 / 6),   # needs all 4 positives
                          (0.75, 0.22, 0.75, 4 / 6),   # 3 of 4: the 3rd highest positive score
                          (0.5, 0.28, 0.5, 5 / 6),
                          (0.2, 0.9, 0.25, 1.0)])
def test_operating_point_is_the_highest_threshold_reaching_the_target(target, threshold,
                                                                      sensitivity, specificity):
    op = operating_point(Y, S, target)
    assert (op["threshold"], op["sensitivity"], op["specificity"]) == pytest.approx(
        (threshold, sensitivity, specificity))
    assert (op["n_positive"], op["n_negative"]) == (4, 6)
    # any higher threshold falls below the target
    above = threshold_sweep(Y, S, [np.nextafter(op["threshold"], 1)]).iloc[0]
    assert above["sensitivity"] < target


def test_operating_point_at_973_of_1000_positives():
    """0.973 * 1000 is 973.0000000000001 in floating point: still 973 positives, not 974."""
    rng = np.random.default_rng(0)
    pos, neg = rng.permutation(1000) / 1000 + 0.0005, rng.random(1100) * 0.5
    y = np.r_[np.ones(1000, int), np.zeros(1100, int)]
    op = operating_point(y, np.r_[pos, neg], 0.973)
    assert op["tp"] == 973 and op["sensitivity"] == pytest.approx(0.973)
    assert op["threshold"] == pytest.approx(27 / 1000 + 0.0005)
    with pytest.raises(ValueError, match="no positive"):
        operating_point([0, 0], [0.1, 0.2])


def test_wald_ci_is_the_papers_formula():
    ci = wald_ci(0.982, 1100)
    assert ci.half_width == pytest.approx(0.0078569, abs=1e-6)
    assert (ci.low, ci.high) == pytest.approx((0.982 - ci.half_width, 0.982 + ci.half_width))
    assert wald_ci(1.0, 50).half_width == 0 and wald_ci(0.99, 10).high == 1.0  # clipped
    assert math.isnan(wald_ci(0.5, 0).half_width)


def test_score_histograms(tmp_path):
    df = pd.DataFrame({"score": [0.02, 0.07, 0.51, 0.97, 1.0, 0.3],
                       "finding": ["normal", "normal", "other", "covid", "covid", "other"]})
    counts = score_histograms(df, "score", "finding", tmp_path / "h.png", bins=10, threshold=0.5)
    assert (tmp_path / "h.png").stat().st_size > 0
    total = counts.groupby("subgroup")["count"].sum().to_dict()
    assert total == {"covid": 2, "normal": 2, "other": 2}
    covid = counts[counts.subgroup == "covid"].set_index("bin_low")["count"]
    assert covid.loc[0.9] == 2  # 0.97 and 1.0 (the closed last bin)


def test_penultimate_features_and_tsne(tmp_path):
    from pipeline.models.build import build_model

    torch.manual_seed(0)
    model = build_model({"arch": "mini_covidnet"}, num_classes=2).eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    feats = penultimate_features(model, images, batch_size=3)
    with torch.no_grad():
        ref = model.backbone(model.normalize(images.float() / 255)).mean((2, 3))
    assert feats.shape == (4, 1024) and np.allclose(feats, ref.numpy(), atol=1e-5)
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 1, (15, 8)), rng.normal(8, 1, (15, 8))]
    labels = ["covid"] * 15 + ["non_covid"] * 15
    emb = tsne_plot(x, labels, tmp_path / "t.png", seed=0)
    assert emb.shape == (30, 2) and (tmp_path / "t.png").is_file()
    a, b = emb[:15].mean(0), emb[15:].mean(0)
    assert np.linalg.norm(a - b) > 2 * max(emb[:15].std(0).max(), emb[15:].std(0).max())


def test_main_writes_every_cell(tmp_path, monkeypatch):
    params = compose(["experiment=cxr_covid_resnet50"])
    params["dataset"]["frames_dir"] = "frames"
    params["binary"]["tsne"] = False
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "frames").mkdir()
    frames = [f"f{i}.jpg" for i in range(10)]
    finding = ["covid"] * 4 + ["normal"] * 3 + ["other"] * 3
    pd.DataFrame({"frame": frames, "status": "used", "finding": finding}).to_csv(
        tmp_path / "frames" / "manifest.csv", index=False)
    cell = tmp_path / "models" / "resnet50-ce"
    cell.mkdir(parents=True)
    y_true = [0 if y else 1 for y in Y]  # class 0 = covid = positive
    pd.DataFrame({"frame": frames, "source": frames, "patient": frames, "fold": [0, 1] * 5,
                  "y_true": y_true, "y_pred": [0 if s >= 0.5 else 1 for s in S],
                  "prob_covid": S, "prob_non_covid": [1 - s for s in S]}).to_csv(
        cell / "predictions.csv", index=False)
    for fold in (0, 1):  # validation: 2 positives scoring 0.6 and 0.4, 2 negatives at 0.1
        (cell / f"fold_{fold}").mkdir()
        pd.DataFrame({"frame": [f"v{fold}{i}" for i in range(4)], "source": "v",
                      "patient": [f"vp{fold}{i}" for i in range(4)], "fold": fold,
                      "y_true": [0, 0, 1, 1], "y_pred": [0, 1, 1, 1],
                      "prob_covid": [0.6, 0.4, 0.1, 0.1], "prob_non_covid": [0.4, 0.6, 0.9, 0.9]}
                     ).to_csv(cell / f"fold_{fold}" / "val_predictions.csv", index=False)
    main([])
    out = tmp_path / "reports" / "binary"
    held = pd.read_csv(out / "resnet50-ce" / "held_out_thresholds.csv")
    assert held["threshold"].tolist() == [0.4, 0.4]  # both validation positives kept
    assert held["note"].str.contains("needed to resolve").all()
    metrics = json.loads((tmp_path / "reports" / "binary_metrics.json").read_text())
    # test positives score 0.9, 0.28, 0.22, 0.10: only 0.9 reaches 0.4; negatives all below
    assert metrics["resnet50-ce"]["held_out_point"]["sensitivity"] == pytest.approx(1 / 4)
    assert metrics["resnet50-ce"]["held_out_point"]["specificity"] == pytest.approx(1.0)
    sweep = pd.read_csv(out / "resnet50-ce" / "sweep.csv")
    assert sweep["accuracy"].tolist() == pytest.approx([0.5, 0.7, 0.6, 0.6])
    op = json.loads((out / "resnet50-ce" / "operating_point.json").read_text())
    assert op["threshold"] == pytest.approx(0.10) and op["specificity"] == pytest.approx(2 / 6)
    hist = pd.read_csv(out / "resnet50-ce" / "histogram.csv")
    assert set(hist.subgroup) == {"covid", "normal", "other"}
    assert set(pd.read_csv(out / "resnet50-ce" / "sweep_by_fold.csv").fold) == {0, 1}
    assert "± " in (out / "resnet50-ce" / "sweep.md").read_text()
    assert (out / "resnet50-ce" / "roc.png").is_file()
    metrics = json.loads((tmp_path / "reports" / "binary_metrics.json").read_text())
    assert metrics["resnet50-ce"]["sweep"]["0.20"]["accuracy"] == pytest.approx(0.7)


def test_main_tsne_from_a_fold_checkpoint(tmp_path, monkeypatch):
    import cv2

    from pipeline.models.build import build_model
    from pipeline.models.checkpoint import save_checkpoint

    params = compose(["experiment=cxr_covid_resnet50", "grid.models=[mini_covidnet]"])
    params["dataset"]["frames_dir"] = "frames"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "frames").mkdir()
    frames = [f"f{i}.png" for i in range(10)]
    for i, f in enumerate(frames):
        cv2.imwrite(str(tmp_path / "frames" / f), np.full((40, 40, 3), 20 * i, np.uint8))
    cell = tmp_path / "models" / "mini_covidnet-ce"
    save_checkpoint(cell / "fold_0" / "best.pt", build_model({"arch": "mini_covidnet"}, 2),
                    model_cfg={"arch": "mini_covidnet"}, classes=["covid", "non_covid"],
                    image_size=32)
    pd.DataFrame({"frame": frames, "source": frames, "patient": frames, "fold": 0,
                  "y_true": [0 if y else 1 for y in Y], "y_pred": 0, "prob_covid": S,
                  "prob_non_covid": [1 - s for s in S]}).to_csv(cell / "predictions.csv", index=False)
    main([])
    out = tmp_path / "reports" / "binary" / "mini_covidnet-ce"
    assert (out / "tsne.png").stat().st_size > 0
    # no manifest with findings here: the histogram's subgroups are the true classes
    assert set(pd.read_csv(out / "histogram.csv").subgroup) == {"covid", "non_covid"}


def test_main_without_positive_class_writes_an_empty_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(compose([])))  # lung ultrasound, 3 classes
    main([])
    assert json.loads((tmp_path / "reports" / "binary_metrics.json").read_text()) == {}
    assert "positive_class" in (tmp_path / "reports" / "binary" / "README.md").read_text()


# --------------------------------------------------------------------------- held-out point
def _tables(seed: int = 0, n_folds: int = 3, per_fold: int = 80):
    """Test and validation prediction tables of ``n_folds`` folds; class 0 = covid = positive;
    one image per patient; positives score higher on average."""
    rng = np.random.default_rng(seed)
    out = {}
    for split in ("test", "val"):
        rows = []
        for f in range(n_folds):
            y = rng.integers(0, 2, per_fold)  # 0 = covid
            s = np.clip(np.where(y == 0, rng.normal(0.7, 0.2, per_fold),
                                 rng.normal(0.3, 0.2, per_fold)), 0, 1)
            for i in range(per_fold):
                name = f"{split}_f{f}_{i}"
                rows.append({"frame": name, "source": name, "patient": name, "fold": f,
                             "y_true": int(y[i]), "y_pred": int(s[i] < 0.5),
                             "prob_covid": s[i], "prob_non_covid": 1 - s[i]})
        out[split] = pd.DataFrame(rows)
    return out["test"], out["val"]


CFG = {"thresholds": [0.15, 0.2, 0.25, 0.3], "target_sensitivity": 0.9, "z": 1.96, "bins": 10,
       "bootstrap": 200, "ci": 0.95}


def test_held_out_threshold_comes_from_validation_rows_only():
    test, val = _tables()
    held = held_out_thresholds(val, test, 0, "prob_covid", 0.9)
    for r in held.itertuples():
        v = val[val.fold == r.fold]
        expected = operating_point((v.y_true == 0).astype(int), v.prob_covid, 0.9)["threshold"]
        assert r.threshold == expected and r.source == "validation"
        assert r.val_sensitivity >= 0.9
    # changing every test score cannot move it
    shuffled = test.assign(prob_covid=np.random.default_rng(5).random(len(test)))
    assert held_out_thresholds(val, shuffled, 0, "prob_covid", 0.9)["threshold"].tolist() == \
        held["threshold"].tolist()
    # changing the validation scores does
    moved = val.assign(prob_covid=val.prob_covid * 0.5)
    assert (held_out_thresholds(moved, test, 0, "prob_covid", 0.9)["threshold"]
            != held["threshold"]).all()


def test_held_out_fallbacks_are_flagged():
    test, val = _tables()
    small = val[(val.fold != 1) | (val.index % 9 == 0)]  # fold 1 keeps a few validation rows
    held = held_out_thresholds(small, test, 0, "prob_covid", 0.973).set_index("fold")
    assert held.loc[1, "n_val_positive"] < min_positives(0.973) == 38
    assert "needed to resolve" in held.loc[1, "note"]
    v = small[(small.fold == 1) & (small.y_true == 0)]
    assert held.loc[1, "threshold"] == v.prob_covid.min()  # keeps every validation positive
    no_pos = val[(val.fold != 2) | (val.y_true == 1)]
    held = held_out_thresholds(no_pos, test, 0, "prob_covid", 0.9).set_index("fold")
    assert held.loc[2, "source"] == "fallback"
    assert held.loc[2, "threshold"] == pytest.approx(held.loc[[0, 1], "threshold"].mean())
    missing = held_out_thresholds(None, test, 0, "prob_covid", 0.9)
    assert missing["threshold"].isna().all() and (missing["source"] == "missing").all()


def test_evaluate_cell_points_and_patient_intervals(tmp_path):
    test, val = _tables()
    classes = ["covid", "non_covid"]
    y, s = (test.y_true == 0).astype(int).to_numpy(), test.prob_covid.to_numpy()
    without = evaluate_cell(test, classes, "covid", CFG, tmp_path / "a", seed=3)
    with_val = evaluate_cell(test, classes, "covid", CFG, tmp_path / "b", val=val, seed=3)
    # the study's test-fitted point is today's operating_point, with or without validation rows
    fitted = operating_point(y, s, 0.9)
    for res in (without, with_val):
        assert res["operating_point"] == {k: fitted[k] for k in
                                          ("threshold", "sensitivity", "specificity", "accuracy")}
    assert without["held_out_point"] == {"available": False}
    # the held-out point: each fold's validation threshold applied to that fold's test rows
    held = held_out_thresholds(val, test, 0, "prob_covid", 0.9)
    thr = test.fold.map(held.set_index("fold").threshold).to_numpy()
    pred = s >= thr
    assert with_val["held_out_point"]["sensitivity"] == pytest.approx(pred[y == 1].mean())
    assert with_val["held_out_point"]["specificity"] == pytest.approx((~pred[y == 0]).mean())
    op = json.loads((tmp_path / "b" / "operating_point.json").read_text())
    assert op["label"].startswith("fitted on test") and op["held_out"]["available"]
    lo, hi = op["held_out"]["bootstrap"]["sensitivity"]
    assert lo <= op["held_out"]["sensitivity"] <= hi and lo < hi
    points = pd.read_csv(tmp_path / "b" / "operating_points.csv")
    assert points["point"].str.startswith(("fitted on test", "held out")).all()
    sweep = pd.read_csv(tmp_path / "b" / "sweep.csv")
    assert (sweep.sensitivity_low <= sweep.sensitivity).all() and (sweep.sensitivity <= sweep.sensitivity_high).all()
    assert {"sensitivity_ci", "specificity_ci", "accuracy_ci", "f1_low", "precision_high"} <= set(sweep)
    assert (tmp_path / "b" / "roc.png").stat().st_size > 0
    assert len(with_val["auc_ci"]) == 2 and with_val["auc_ci"][0] < with_val["auc"] < with_val["auc_ci"][1]


def test_patient_bootstrap_resamples_patients_not_images():
    """Three identical images per patient give the interval of one image per patient; an
    image-level bootstrap of the same rows would be narrower."""
    test, _ = _tables(n_folds=1, per_fold=60)
    stat = BinaryFigures(0, "prob_covid", {"a": 0.5})
    one = patient_bootstrap(test, stat, ["covid", "non_covid"], n_boot=300, seed=7)
    triple = pd.concat([test] * 3, ignore_index=True).sample(frac=1, random_state=1)
    three = patient_bootstrap(triple, stat, ["covid", "non_covid"], n_boot=300, seed=7)
    for k in ("a.sensitivity", "a.specificity", "a.accuracy", "a.f1", "auc"):
        assert three["low"][k] == pytest.approx(one["low"][k])
        assert three["high"][k] == pytest.approx(one["high"][k])
    by_image = patient_bootstrap(triple.assign(img=range(len(triple))), stat,
                                 ["covid", "non_covid"], n_boot=300, seed=7, group_col="img")
    width = lambda b, k: b["high"][k] - b["low"][k]  # noqa: E731
    assert width(by_image, "a.accuracy") < width(three, "a.accuracy")


def test_binary_figures_match_the_single_threshold_figures():
    test, _ = _tables()
    y, s = (test.y_true == 0).astype(int), test.prob_covid
    got = BinaryFigures(0, "prob_covid", {"x": 0.25})(test)
    ref = confusion_at(y, s, 0.25)
    for f in ("accuracy", "sensitivity", "specificity", "precision", "f1"):
        assert got[f"x.{f}"] == pytest.approx(ref[f])
    from sklearn.metrics import roc_auc_score

    assert got["auc"] == pytest.approx(roc_auc_score(y, s))


def test_report_section_shows_both_points_intervals_and_published(tmp_path):
    from pipeline.stages.report import binary_sections

    test, val = _tables()
    cells = tmp_path / "binary"
    cfg = {**CFG, "target_sensitivity": 0.973}
    evaluate_cell(test, ["covid", "non_covid"], "covid", cfg, cells / "resnet50-ce", val=val, seed=1)
    evaluate_cell(test, ["covid", "non_covid"], "covid", cfg, cells / "other-ce", seed=1)  # no val
    published = {"binary": {"source": "study 001", "rows": {"resnet50-ce": {
        "sweep": {0.15: {"sensitivity": 0.9736, "sensitivity_wald": 0.0053}},
        "operating_point": {"target_sensitivity": 0.973, "specificity": 0.982,
                            "specificity_wald": 0.013}}}}}
    sections, figs = binary_sections(cells, ["resnet50-ce", "other-ce", "absent-ce"], published,
                                     "prov", tmp_path / "tables", tmp_path / "figures")
    page = "\n".join(sections)
    for name in ("binary_sweep", "binary_operating_points", "binary_folds"):
        for ext in ("csv", "tex", "md"):
            assert (tmp_path / "tables" / f"{name}.{ext}").is_file()
    points = pd.read_csv(tmp_path / "tables" / "binary_operating_points.csv").set_index(
        ["row", "operating point"])
    op = json.loads((cells / "resnet50-ce" / "operating_point.json").read_text())
    fitted = points.loc[("resnet50-ce", "fitted on test (optimistic, as in the study)")]
    lo, hi = op["bootstrap"]["specificity"]
    assert fitted["specificity [95% CI]"] == f"{op['specificity']:.3f} [{lo:.3f}, {hi:.3f}]"
    held = points.loc[("resnet50-ce", "held out (threshold chosen on validation, applied to test)")]
    h = op["held_out"]
    assert held["sensitivity [95% CI]"].startswith(f"{h['sensitivity']:.3f} [")
    assert points.loc[("other-ce", "held out (threshold chosen on validation, applied to test)"),
                      "sensitivity [95% CI]"] == "–"
    assert "no validation predictions" in page  # said, not estimated
    assert "resnet50-ce (published)" in page and "0.982 ± 0.013" in page
    assert "± Wald" in page and "bootstrap over patients" in page
    sweep = pd.read_csv(tmp_path / "tables" / "binary_sweep.csv")
    assert len(sweep) == 2 * 4 + 1  # two cells x four thresholds + the published row
    assert set(figs) == {f"binary_{k}_{c}.png" for k in ("roc", "histogram")
                         for c in ("resnet50-ce", "other-ce")}
    assert all((tmp_path / "figures" / f).is_file() for f in figs)


def test_report_section_names_folds_whose_validation_is_too_small(tmp_path):
    from pipeline.stages.report import binary_sections

    test, val = _tables()
    small = val[(val.fold != 1) | (val.index % 9 == 0)]
    cfg = {**CFG, "target_sensitivity": 0.973}
    evaluate_cell(test, ["covid", "non_covid"], "covid", cfg, tmp_path / "b" / "c-ce", val=small)
    sections, _ = binary_sections(tmp_path / "b", ["c-ce"], {}, "prov", tmp_path / "t", tmp_path / "f")
    page = "\n".join(sections)
    assert "c-ce, held out, fold" in page and "needed to resolve 0.973" in page
