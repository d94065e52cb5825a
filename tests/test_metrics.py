"""Known-answer tests of pipeline.evaluation's metrics (figures of merit, folds, bootstrap, aggregation)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.evaluation.aggregation import aggregate_videos, ensemble_probabilities
from pipeline.evaluation.bootstrap import patient_bootstrap
from pipeline.evaluation.bootstrap_figures import Accuracy, FiguresOfMerit
from pipeline.evaluation.classification import (
    classification_metrics,
    metrics_from_table,
    metrics_to_flat,
    prob_columns,
    summarize_folds,
)
from pipeline.evaluation.comparisons import mcnemar_test, paired_bootstrap_difference

CLASSES = ["covid", "pneumonia", "healthy"]
# Rows = true, columns = predicted; the figures below are worked out by hand from these counts.
HAND_CM = [[5, 2, 1],
           [1, 6, 0],
           [2, 1, 4]]


def labels_from_cm(cm):
    pairs = [(t, p) for t, row in enumerate(cm) for p, n in enumerate(row) for _ in range(n)]
    y_true, y_pred = (np.array(v) for v in zip(*pairs))
    return y_true, y_pred


def one_hot_probs(y_pred, n_cls=3, confidence=0.8):
    probs = np.full((len(y_pred), n_cls), (1 - confidence) / (n_cls - 1))
    probs[np.arange(len(y_pred)), y_pred] = confidence
    return probs


def make_table(y_true, y_pred, probs, patients, fold=0, sources=None):
    df = pd.DataFrame({
        "frame": [f"f{i:05d}.png" for i in range(len(y_true))],
        "source": sources if sources is not None else [f"{p}.mp4" for p in patients],
        "patient": patients, "fold": fold, "y_true": y_true, "y_pred": y_pred})
    for k, col in enumerate(prob_columns(CLASSES)):
        df[col] = probs[:, k]
    return df


def random_table(n=600, n_patients=40, seed=0, skill=0.6):
    """Patients with one class each; predictions right with probability ``skill``."""
    rng = np.random.default_rng(seed)
    patient = rng.integers(0, n_patients, n)
    y_true = patient % 3
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y_true] += 2 * skill
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs = np.round(probs, 2)  # creates score ties, which the AUCs must handle like sklearn
    probs /= probs.sum(axis=1, keepdims=True)
    return make_table(y_true, probs.argmax(axis=1), probs, [f"p{p:02d}" for p in patient],
                      fold=patient % 5)


# --------------------------------------------------------------------------- point metrics
def test_hand_computed_confusion_matrix():
    y_true, y_pred = labels_from_cm(HAND_CM)
    m = classification_metrics(y_true, y_pred, one_hot_probs(y_pred), CLASSES)
    assert m["confusion_matrix"] == HAND_CM
    assert m["n"] == 22
    assert m["accuracy"] == pytest.approx(15 / 22)
    # covid: TP 5, FN 3, FP 3, TN 11; pneumonia: TP 6, FN 1, FP 3, TN 12; healthy: TP 4, FN 3, FP 1, TN 14
    expected = {
        "covid": dict(sensitivity=5 / 8, specificity=11 / 14, precision=5 / 8, f1=5 / 8, support=8),
        "pneumonia": dict(sensitivity=6 / 7, specificity=12 / 15, precision=6 / 9, f1=3 / 4, support=7),
        "healthy": dict(sensitivity=4 / 7, specificity=14 / 15, precision=4 / 5, f1=2 / 3, support=7),
    }
    for name, figures in expected.items():
        for fig, value in figures.items():
            assert m["per_class"][name][fig] == pytest.approx(value), (name, fig)
    assert m["macro_f1"] == pytest.approx((5 / 8 + 3 / 4 + 2 / 3) / 3)
    # row sums t = (8, 7, 7), column sums p = (8, 9, 5), n = 22, trace 15
    assert m["mcc"] == pytest.approx((15 * 22 - 162) / math.sqrt((484 - 170) * (484 - 162)))
    assert m["notes"] == []
    json.loads(json.dumps(m))  # JSON-serialisable as promised


def test_perfect_classifier():
    y = np.repeat([0, 1, 2], 20)
    m = classification_metrics(y, y, one_hot_probs(y), CLASSES)
    assert m["accuracy"] == 1.0 and m["mcc"] == pytest.approx(1.0) and m["macro_f1"] == 1.0
    assert m["auc_ovr"] == 1.0
    assert all(pc["auc"] == 1.0 and pc["specificity"] == 1.0 for pc in m["per_class"].values())


def test_chance_classifier_on_large_sample():
    rng = np.random.default_rng(1)
    n = 30_000
    y_true = rng.integers(0, 3, n)
    probs = rng.dirichlet(np.ones(3), n)
    m = classification_metrics(y_true, probs.argmax(axis=1), probs, CLASSES)
    assert m["accuracy"] == pytest.approx(1 / 3, abs=0.02)
    assert m["mcc"] == pytest.approx(0.0, abs=0.02)
    assert m["auc_ovr"] == pytest.approx(0.5, abs=0.02)
    for pc in m["per_class"].values():
        assert pc["auc"] == pytest.approx(0.5, abs=0.03)


def test_macro_auc_matches_sklearn_ovr():
    df = random_table(seed=3)
    m = metrics_from_table(df, CLASSES)
    expected = roc_auc_score(df["y_true"], df[prob_columns(CLASSES)], multi_class="ovr",
                             average="macro")
    assert m["auc_ovr"] == pytest.approx(expected)


def test_absent_class_is_nan_with_reason_not_a_crash():
    y_true = np.array([0, 0, 1, 1, 1])
    y_pred = np.array([0, 1, 1, 1, 0])  # healthy neither present nor predicted
    m = classification_metrics(y_true, y_pred, one_hot_probs(y_pred), CLASSES)
    healthy = m["per_class"]["healthy"]
    assert math.isnan(healthy["sensitivity"]) and math.isnan(healthy["auc"])
    assert math.isnan(healthy["precision"]) and healthy["support"] == 0
    assert healthy["specificity"] == 1.0
    assert math.isnan(m["auc_ovr"])
    assert not math.isnan(m["per_class"]["covid"]["auc"])
    assert any("healthy" in note and "sensitivity" in note for note in m["notes"])
    assert any(note.startswith("auc_ovr") for note in m["notes"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    json.dumps(m)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="y_pred holds class indices \\[3\\]"):
        classification_metrics([0, 1], [0, 3], None, CLASSES)
    with pytest.raises(ValueError, match="y_prob has shape"):
        classification_metrics([0, 1], [0, 1], np.ones((2, 2)) / 2, CLASSES)
    with pytest.raises(KeyError, match="prob_healthy"):
        metrics_from_table(random_table().drop(columns="prob_healthy"), CLASSES)


def test_metrics_to_flat():
    nested = {"accuracy": 0.5, "per_class": {"covid": {"f1": 0.25, "support": 3}},
              "confusion_matrix": [[1, 2], [3, 4]], "notes": ["x"], "mcc": np.float32(0.5),
              "fold": {1: {"accuracy": 1.0}}}
    flat = metrics_to_flat(nested, prefix="test")
    assert flat == {"test.accuracy": 0.5, "test.per_class.covid.f1": 0.25,
                    "test.per_class.covid.support": 3.0, "test.mcc": 0.5,
                    "test.fold.1.accuracy": 1.0}
    assert all(type(v) is float for v in flat.values())
    assert "accuracy" in metrics_to_flat(nested)


# --------------------------------------------------------------------------- folds
def test_summarize_folds_mean_and_sample_std():
    # fold 0: 1 of 2 right, fold 1: 3 of 4 right, fold 2: 4 of 4 right -> 0.5, 0.75, 1.0
    y_true = np.array([0, 1, 0, 1, 2, 2, 0, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 2, 0, 0, 1, 2, 2])
    fold = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    df = make_table(y_true, y_pred, one_hot_probs(y_pred), [f"p{i}" for i in range(10)])
    df["fold"] = fold
    s = summarize_folds(df, CLASSES)
    assert s["n_folds"] == 3 and sorted(s["per_fold"]) == [0, 1, 2]
    assert [s["per_fold"][k]["accuracy"] for k in range(3)] == [0.5, 0.75, 1.0]
    assert s["pooled"]["accuracy"] == pytest.approx(8 / 10)
    assert s["fold_mean"]["accuracy"] == pytest.approx(0.75)
    assert s["fold_std"]["accuracy"] == pytest.approx(0.25)  # ddof=1: sqrt((.0625*2)/2)
    # fold 0 has no healthy frame: its sensitivity is NaN, so the fold mean is NaN too
    assert math.isnan(s["fold_mean"]["per_class"]["healthy"]["sensitivity"])
    assert s["fold_mean"]["per_class"]["covid"]["sensitivity"] == pytest.approx(1.0)
    json.loads(json.dumps(s))


# --------------------------------------------------------------------------- bootstrap
def test_vectorised_figures_equal_sklearn():
    df = random_table(seed=5)
    df.loc[df["y_pred"] == 2, "y_pred"] = 1  # a class never predicted: NaN precision path
    expected = metrics_to_flat(metrics_from_table(df, CLASSES))
    got = FiguresOfMerit(CLASSES)(df)
    assert got.keys() <= expected.keys() and len(got) == 4 + 5 * len(CLASSES)
    for k, v in got.items():
        assert v == pytest.approx(expected[k], nan_ok=True), k


def test_vectorised_bootstrap_equals_resampling_tables():
    df = random_table(n=300, n_patients=12, seed=2)
    fom = FiguresOfMerit(CLASSES)
    fast = patient_bootstrap(df, fom, CLASSES, n_boot=40, seed=7)
    slow = patient_bootstrap(df, lambda d: fom(d), CLASSES, n_boot=40, seed=7)  # no fast path
    for field in ("point", "low", "high", "n_valid"):
        for k in fast[field]:
            assert fast[field][k] == pytest.approx(slow[field][k], nan_ok=True), (field, k)


def test_bootstrap_ci_contains_point_and_is_reproducible():
    df = random_table(seed=4)
    res = patient_bootstrap(df, None, CLASSES, n_boot=300, seed=1)
    assert res["n_groups"] == 40 and res["n_boot"] == 300
    for k, point in res["point"].items():
        assert res["low"][k] <= point <= res["high"][k], k
    assert res == patient_bootstrap(df, None, CLASSES, n_boot=300, seed=1)
    other = patient_bootstrap(df, None, CLASSES, n_boot=300, seed=2)
    assert other["low"]["accuracy"] != res["low"]["accuracy"]
    # the draw depends on the patients, not the row order of the table
    shuffled = df.sample(frac=1, random_state=0)
    assert patient_bootstrap(shuffled, None, CLASSES, n_boot=300, seed=1)["low"] == res["low"]


def accuracy(d: pd.DataFrame) -> float:
    return float((d["y_true"] == d["y_pred"]).mean())


def test_patient_bootstrap_is_much_wider_than_frame_bootstrap():
    # one patient with 1000 correct frames, nine with 10 wrong frames each: frame accuracy ~0.92
    # looks precise, but 9 of the 10 patients are always misclassified
    patients = ["big"] * 1000 + [f"small{i}" for i in range(9) for _ in range(10)]
    y_true = np.zeros(1090, dtype=int)
    y_pred = np.r_[np.zeros(1000, dtype=int), np.ones(90, dtype=int)]
    df = make_table(y_true, y_pred, one_hot_probs(y_pred), patients)
    by_patient = patient_bootstrap(df, accuracy, CLASSES, n_boot=500, seed=0)
    by_frame = patient_bootstrap(df, accuracy, CLASSES, n_boot=500, seed=0, group_col="frame")
    assert by_patient["point"] == by_frame["point"] == pytest.approx(1000 / 1090)
    assert by_frame["n_groups"] == 1090 and by_patient["n_groups"] == 10
    width_patient = by_patient["high"] - by_patient["low"]
    width_frame = by_frame["high"] - by_frame["low"]
    assert width_frame < 0.05
    assert width_patient > 10 * width_frame
    assert by_patient["low"] < 0.5  # P(big patient not drawn) = 0.9**10 = 35%


def test_resampling_draws_whole_patients():
    sizes = {"a": 2, "b": 3, "c": 5, "d": 7}
    patients = [p for p, n in sizes.items() for _ in range(n)]
    y = np.zeros(len(patients), dtype=int)
    df = make_table(y, y, one_hot_probs(y), patients)
    seen = []

    def record(d: pd.DataFrame) -> float:
        seen.append(d.copy())
        return 0.0

    patient_bootstrap(df, record, CLASSES, n_boot=30, seed=3)
    samples = seen[1:]  # the first call is the point estimate on the original table
    assert len(samples) == 30
    for d in samples:
        copies = {}
        for patient, rows in d.groupby("patient"):
            per_frame = rows["frame"].value_counts()
            # every frame of a drawn patient is there, each as often as the patient was drawn
            assert len(per_frame) == sizes[patient] and per_frame.nunique() == 1
            copies[patient] = int(per_frame.iloc[0])
        assert sum(copies.values()) == len(sizes)  # as many patients drawn as exist


def test_bootstrap_leaves_undefined_resamples_out():
    # a single healthy patient: resamples without it cannot define healthy sensitivity
    df = random_table(n=400, n_patients=30, seed=6)
    df.loc[df["y_true"] == 2, "y_true"] = 0
    df.loc[df["patient"] == "p02", "y_true"] = 2
    res = patient_bootstrap(df, None, CLASSES, n_boot=200, seed=0)
    assert 0 < res["n_valid"]["per_class.healthy.sensitivity"] < 200
    assert res["n_valid"]["accuracy"] == 200


# --------------------------------------------------------------------------- paired comparison
def test_paired_identical_runs_have_zero_difference():
    df = random_table(seed=9)
    res = paired_bootstrap_difference(df, df.sample(frac=1, random_state=1), None, CLASSES,
                                      n_boot=200)
    assert res["diff"]["accuracy"] == 0.0
    assert res["low"]["accuracy"] == 0.0 and res["high"]["accuracy"] == 0.0
    assert res["p_value"]["accuracy"] == 1.0


def test_paired_better_run_has_positive_difference():
    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{i}" for i in range(10)], 20)
    y_true = np.tile(np.arange(3), 67)[:200]
    worse = np.isin(patients, ["p0", "p1", "p2", "p3", "p4"])
    pred_b = np.where(worse & (rng.random(200) < 0.8), (y_true + 1) % 3, y_true)
    a = make_table(y_true, y_true, one_hot_probs(y_true), patients)
    b = make_table(y_true, pred_b, one_hot_probs(pred_b), patients)
    res = paired_bootstrap_difference(a, b, accuracy, CLASSES, n_boot=500, seed=0)
    assert res["diff"] == pytest.approx(accuracy(a) - accuracy(b)) and res["diff"] > 0.3
    assert 0 < res["low"] <= res["diff"] <= res["high"]
    assert res["p_value"] < 0.05
    # reversed order: the sign flips
    rev = paired_bootstrap_difference(b, a, accuracy, CLASSES, n_boot=500, seed=0)
    assert rev["diff"] == pytest.approx(-res["diff"]) and rev["high"] < 0


def test_vectorised_accuracy_equals_resampling_tables_exactly():
    a, b = random_table(n=300, n_patients=12, seed=2), random_table(n=300, n_patients=12, seed=3)
    b = b.assign(patient=a["patient"], y_true=a["y_true"])
    assert Accuracy()(a) == accuracy(a)
    fast = paired_bootstrap_difference(a, b, Accuracy(), CLASSES, n_boot=60, seed=5)
    slow = paired_bootstrap_difference(a, b, accuracy, CLASSES, n_boot=60, seed=5)
    assert fast == slow  # the same ratios of integers: equal to the last bit
    assert fast["low"] < fast["high"]


def test_paired_rejects_different_frames():
    df = random_table(seed=10)
    with pytest.raises(ValueError, match="same \\['frame'\\] set"):
        paired_bootstrap_difference(df, df.iloc[1:], accuracy, CLASSES, n_boot=10)
    with pytest.raises(ValueError, match="duplicate rows"):
        paired_bootstrap_difference(df, pd.concat([df, df.iloc[:1]]), accuracy, CLASSES, n_boot=10)
    relabelled = df.assign(y_true=(df["y_true"] + 1) % 3)
    with pytest.raises(ValueError, match="'y_true' differs"):
        paired_bootstrap_difference(df, relabelled, accuracy, CLASSES, n_boot=10)


# --------------------------------------------------------------------------- McNemar
def test_mcnemar_chi_square_branch():
    # 30 pairs only a is right, 10 only b is right, 60 both right
    a = np.r_[np.ones(30), np.zeros(10), np.ones(60)].astype(bool)
    b = np.r_[np.zeros(30), np.ones(10), np.ones(60)].astype(bool)
    res = mcnemar_test(a, b)
    assert (res["b"], res["c"], res["exact"]) == (30, 10, False)
    assert res["statistic"] == pytest.approx((20 - 1) ** 2 / 40)
    # chi-square with 1 dof: P(X > x) = erfc(sqrt(x / 2))
    assert res["p_value"] == pytest.approx(math.erfc(math.sqrt(9.025 / 2)))


def test_mcnemar_exact_branch():
    a = np.r_[np.ones(8), np.zeros(2), np.zeros(5)].astype(bool)
    b = np.r_[np.zeros(8), np.ones(2), np.zeros(5)].astype(bool)
    res = mcnemar_test(a, b)
    assert (res["b"], res["c"], res["exact"], res["statistic"]) == (8, 2, True, 2.0)
    assert res["p_value"] == pytest.approx(2 * (1 + 10 + 45) / 2**10)  # two-sided binomial, n=10
    assert mcnemar_test([True, False], [True, False])["p_value"] == 1.0
    with pytest.raises(ValueError, match="same samples"):
        mcnemar_test([True], [True, False])


# --------------------------------------------------------------------------- aggregation
def video_table():
    rows = [  # source, patient, y_true, probs (y_pred = argmax)
        ("A.mp4", "p1", 0, [0.90, 0.05, 0.05]),  # mean -> covid, vote 2 of 3 -> pneumonia
        ("A.mp4", "p1", 0, [0.30, 0.40, 0.30]),
        ("A.mp4", "p1", 0, [0.35, 0.40, 0.25]),
        ("B.mp4", "p2", 1, [0.10, 0.60, 0.30]),  # vote tie 1 vs 2; mean prob healthy higher
        ("B.mp4", "p2", 1, [0.45, 0.00, 0.55]),
        ("C.mp4", "p3", 0, [0.45, 0.50, 0.05]),  # vote tie 1 vs 2 with equal means -> lower index;
        ("C.mp4", "p3", 0, [0.45, 0.05, 0.50]),  # covid has the top mean but no votes
    ]
    probs = np.array([r[3] for r in rows])
    df = make_table(np.array([r[2] for r in rows]), probs.argmax(axis=1), probs,
                    [r[1] for r in rows], sources=[r[0] for r in rows])
    df["model"] = "mini_covidnet"
    return df


def test_aggregate_videos_mean():
    v = aggregate_videos(video_table(), CLASSES, how="mean")
    assert v["frame"].tolist() == v["source"].tolist() == ["A.mp4", "B.mp4", "C.mp4"]
    assert v["patient"].tolist() == ["p1", "p2", "p3"] and v["model"].eq("mini_covidnet").all()
    assert v["n_frames"].tolist() == [3, 2, 2]
    assert v["y_true"].tolist() == [0, 1, 0]
    np.testing.assert_allclose(v[prob_columns(CLASSES)].to_numpy(),
                               [[1.55 / 3, 0.85 / 3, 0.6 / 3], [0.275, 0.3, 0.425], [0.45, 0.275, 0.275]])
    assert v["y_pred"].tolist() == [0, 2, 0]
    assert metrics_from_table(v, CLASSES)["accuracy"] == pytest.approx(2 / 3)


def test_aggregate_videos_vote_with_ties():
    v = aggregate_videos(video_table(), CLASSES, how="vote")
    assert v["y_pred"].tolist() == [1, 2, 1]
    np.testing.assert_allclose(v[prob_columns(CLASSES)].to_numpy(),
                               [[1 / 3, 2 / 3, 0], [0, 0.5, 0.5], [0, 0.5, 0.5]], atol=1e-5)
    np.testing.assert_allclose(v[prob_columns(CLASSES)].sum(axis=1), 1.0)
    # the tie rule is visible in the fractions, so argmax agrees with y_pred
    assert (v[prob_columns(CLASSES)].to_numpy().argmax(axis=1) == v["y_pred"]).all()


def test_aggregate_videos_rejects_inconsistent_labels():
    df = video_table()
    df.loc[1, "y_true"] = 2
    with pytest.raises(ValueError, match="disagree on column 'y_true'.*A.mp4"):
        aggregate_videos(df, CLASSES)
    with pytest.raises(ValueError, match="how='max'"):
        aggregate_videos(video_table(), CLASSES, how="max")


# --------------------------------------------------------------------------- ensembling
def test_ensemble_mean_and_vote():
    m1 = np.array([[0.6, 0.4, 0.0], [0.2, 0.3, 0.5]])
    m2 = np.array([[0.1, 0.9, 0.0], [0.1, 0.2, 0.7]])
    m3 = np.array([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4]])
    np.testing.assert_allclose(ensemble_probabilities([m1, m2], "mean"),
                               [[0.35, 0.65, 0.0], [0.15, 0.25, 0.6]])
    np.testing.assert_allclose(ensemble_probabilities([m1, m2, m3], "vote"),
                               [[2 / 3, 1 / 3, 0], [0, 0, 1]])
    # sample 0: one vote each for covid and pneumonia; pneumonia's mean 0.65 beats 0.35
    tie = ensemble_probabilities([m1, m2], "vote")
    np.testing.assert_allclose(tie, [[0.5, 0.5, 0], [0, 0, 1]], atol=1e-5)
    assert tie.argmax(axis=1).tolist() == [1, 2]
    np.testing.assert_allclose(tie.sum(axis=1), 1.0)


def test_ensemble_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="prob_list\\[1\\] has shape"):
        ensemble_probabilities([np.ones((2, 3)), np.ones((3, 3))])
    with pytest.raises(ValueError, match="empty"):
        ensemble_probabilities([])
