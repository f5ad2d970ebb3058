import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from essa.evaluate import metrics


def scores_of(pred, num_classes, confidence=0.8):
    """(N, C) probability rows with ``confidence`` on each predicted class and the rest spread evenly."""
    pred = np.asarray(pred)
    out = np.full((len(pred), num_classes), (1 - confidence) / (num_classes - 1))
    out[np.arange(len(pred)), pred] = confidence
    return out


def test_quadratic_kappa_by_hand():
    y, pred = [0, 1, 2, 2], [0, 2, 2, 1]
    # Confusion O (rows true, columns pred): [[1,0,0], [0,0,1], [0,1,1]]; weights w_ij = (i - j)^2.
    # Observed disagreement sum(w * O) = w_12 + w_21 = 1 + 1 = 2.
    # Expected E = outer(true counts [1,1,2], pred counts [1,1,2]) / 4 = [[1,1,2], [1,1,2], [2,2,4]] / 4;
    # sum(w * E) = (0 + 1 + 4*2 + 1 + 0 + 1*2 + 4*2 + 1*2 + 0) / 4 = 22 / 4 = 5.5.
    # kappa = 1 - 2 / 5.5 = 7 / 11.
    out = metrics.compute("ordinal", torch.tensor(y), torch.tensor(scores_of(pred, 3)))
    assert out["kappa"] == pytest.approx(7 / 11)
    # Accuracy 2/4; recall per class 1, 0, 1/2 -> balanced 1/2; F1 per class 1, 0, 1/2 -> macro 1/2.
    assert (out["accuracy"], out["balanced_accuracy"], out["macro_f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert metrics.primary_metric("ordinal") == "kappa"


def test_balanced_accuracy_by_hand():
    y, pred = [0, 0, 0, 0, 1, 1, 2], [0, 0, 0, 1, 1, 0, 2]
    out = metrics.compute("multiclass", y, scores_of(pred, 3))
    # recall: class 0 3/4, class 1 1/2, class 2 1/1 -> (0.75 + 0.5 + 1) / 3 = 0.75; plain accuracy 5/7.
    assert out["balanced_accuracy"] == pytest.approx(0.75)
    assert out["accuracy"] == pytest.approx(5 / 7)


def test_macro_ovr_auc_by_hand():
    y = [0, 1, 2, 2]
    scores = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.2, 0.5], [0.1, 0.6, 0.3]])
    # Correctly ordered (positive, negative) pairs per class, ties count 1/2:
    # class 0: positive 0.6 vs 0.2, 0.3, 0.1 -> 3/3; class 1: positive 0.5 vs 0.3, 0.2, 0.6 -> 2/3;
    # class 2: positives 0.5, 0.3 vs 0.1, 0.3 -> (1 + 1 + 1 + 1/2) / 4 = 7/8.  Macro: (1 + 2/3 + 7/8) / 3 = 61/72.
    out = metrics.compute("multiclass", y, scores)
    assert out["auc"] == pytest.approx(61 / 72)
    assert out["auc"] == pytest.approx(roc_auc_score(y, scores, multi_class="ovr"))
    assert out["auc_skipped_labels"] == 0


def test_binary_auc_by_hand_and_single_probability_column():
    y = [0, 0, 1, 1, 0, 1]
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9])
    # Positives 0.35, 0.8, 0.9 against negatives 0.1, 0.4, 0.7: 1 + 3 + 3 = 7 of 9 pairs in order.
    out = metrics.compute("binary", y, p)
    assert out["auc"] == pytest.approx(7 / 9)
    assert metrics.compute("binary", y, np.stack([1 - p, p], 1)) == out
    # Predictions at 0.5: [0, 0, 0, 1, 1, 1] -> 4 of 6 right; 2x2 kappa (quadratic = unweighted) = (4/6 - 1/2) / (1/2).
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["kappa"] == pytest.approx(1 / 3)


def test_multilabel_thresholds_each_label_and_skips_single_class_labels():
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    scores = np.array([[0.9, 0.2, 0.1], [0.6, 0.7, 0.2], [0.4, 0.8, 0.3], [0.1, 0.3, 0.6]])
    with pytest.warns(UserWarning, match=r"label\(s\) \[2\] have one class only"):
        out = metrics.compute("multilabel", y, scores)
    # Predictions at 0.5: [[1,0,0], [1,1,0], [0,1,0], [0,0,1]]: rows 1, 2, 3 each get one label wrong, so 9 of 12
    # label decisions are right and only row 0 is right on every label (subset accuracy 1/4).
    assert out["accuracy"] == pytest.approx(9 / 12)
    assert out["subset_accuracy"] == pytest.approx(1 / 4)
    # Label 0: positives 0.9, 0.4 vs 0.6, 0.1 -> 3/4; label 1: positives 0.7, 0.8 vs 0.2, 0.3 -> 1; label 2 skipped.
    assert out["auc"] == pytest.approx((3 / 4 + 1) / 2)
    assert out["auc_skipped_labels"] == 1
    # F1 per label at 0.5: label 0 P=1/2 R=1/2 -> 1/2; label 1 -> 1; label 2 (no positives, one false alarm) -> 0.
    assert out["macro_f1"] == pytest.approx(0.5)
    assert "kappa" not in out and metrics.primary_metric("multilabel") == "auc"


def test_auc_is_nan_when_no_label_has_both_classes():
    with pytest.warns(UserWarning, match=r"no images of class\(es\) \[0\]"), pytest.warns(match="one class only"):
        out = metrics.compute("binary", [1, 1, 1], [0.2, 0.6, 0.9])
    assert math.isnan(out["auc"]) and out["auc_skipped_labels"] == 1


def test_missing_class_warns_and_averages_present_classes():
    y, pred = [0, 0, 1, 1], [0, 1, 1, 2]  # class 2 declared (3 score columns) but absent from y_true
    with pytest.warns(UserWarning, match=r"no images of class\(es\) \[2\]"), pytest.warns(match=r"\[2\] have one"):
        out = metrics.compute("multiclass", y, scores_of(pred, 3), num_classes=3)
    assert out["balanced_accuracy"] == pytest.approx((1 / 2 + 1 / 2) / 2)  # recall of classes 0 and 1 only
    # F1: class 0 (P 1, R 1/2) 2/3, class 1 (P 1/2, R 1/2) 1/2, class 2 predicted once but never true: 0.
    assert out["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert out["auc_skipped_labels"] == 1


def test_bad_input_is_explained():
    y, s = np.array([0, 1, 2]), scores_of([0, 1, 2], 3)
    with pytest.raises(ValueError, match=r"scores have 3 columns but num_classes=4"):
        metrics.compute("multiclass", y, s, num_classes=4)
    with pytest.raises(ValueError, match=r"y_true has shape \(2,\) but scores have shape \(3, 3\)"):
        metrics.compute("multiclass", y[:2], s)
    with pytest.raises(ValueError, match=r"y_true holds \[3\]: labels must be in 0..2"):
        metrics.compute("multiclass", [0, 1, 3], s)
    with_nan = s.copy()
    with_nan[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN/inf values \(first at row, column \(1, 2\)\)"):
        metrics.compute("multiclass", y, with_nan)
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\].*logits"):
        metrics.compute("multiclass", y, s * 10 - 5)
    with pytest.raises(ValueError, match="multilabel targets must be 0 or 1"):
        metrics.compute("multilabel", np.full((3, 3), 2), s)
    with pytest.raises(ValueError, match="unknown task 'regression'"):
        metrics.compute("regression", y, s)
    with pytest.raises(ValueError, match="metric 'kappa' is not computed for multilabel"):
        metrics.primary_metric("multilabel", "kappa")
    assert metrics.primary_metric("multiclass", "macro_f1") == "macro_f1"


def test_confusion_rows_are_true_classes():
    cm = metrics.confusion(torch.tensor([0, 1, 2, 2]), [0, 2, 2, 1], num_classes=4)
    assert cm.tolist() == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match=r"y_pred holds values in \[0, 5\]; expected 0..3"):
        metrics.confusion([0, 1], [0, 5], num_classes=4)


def noisy_binary(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, 1.2, n))))


def test_bootstrap_contains_estimate_narrows_and_is_deterministic():
    y, p = noisy_binary(100, 0)
    point = metrics.compute("binary", y, p)["auc"]
    low, high = metrics.bootstrap_ci("binary", y, p, "auc", n=300, seed=1)
    assert low < point < high
    assert metrics.bootstrap_ci("binary", y, p, "auc", n=300, seed=1) == (low, high)
    assert metrics.bootstrap_ci("binary", y, p, "auc", n=300, seed=2) != (low, high)
    y_big, p_big = noisy_binary(1600, 0)
    low_big, high_big = metrics.bootstrap_ci("binary", y_big, p_big, "auc", n=300, seed=1)
    # The width shrinks like 1 / sqrt(N): 16x the images should give about a quarter of the width.
    assert (high_big - low_big) < 0.4 * (high - low)


def test_bootstrap_skips_undefined_resamples():
    y, p = [0, 1, 1, 1, 1, 1], [0.1, 0.9, 0.8, 0.7, 0.6, 0.2]
    # One negative: a resample misses it with probability (5/6)^6 = 33 %, and its AUC is then undefined.
    with pytest.warns(UserWarning, match=r"auc: \d+ of 200 bootstrap resamples are undefined"):
        low, high = metrics.bootstrap_ci("binary", y, p, "auc", n=200)
    assert 0 <= low <= high <= 1


def test_compute_with_ci_adds_interval_keys():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    scores = scores_of(np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200)), 4, confidence=0.7)
    out = metrics.compute_with_ci("ordinal", y, scores, n=100)
    assert out["kappa_ci_low"] < out["kappa"] < out["kappa_ci_high"]
    assert not any(key.startswith("auc_ci") for key in out)
    every = metrics.compute_with_ci("ordinal", y, scores, ci_metrics="all", n=100)
    assert {f"{m}_ci_low" for m in metrics.metric_names("ordinal")} <= set(every)
    assert every["kappa_ci_low"] == out["kappa_ci_low"]  # same seed, same resamples
    with pytest.raises(ValueError, match="no bootstrap for \\['subset_accuracy'\\] on ordinal"):
        metrics.compute_with_ci("ordinal", y, scores, ci_metrics=["subset_accuracy"], n=10)


def test_summarise_seeds_and_format():
    rows = [{"auc": 0.80, "kappa": 0.5}, {"auc": 0.82, "kappa": math.nan}, {"auc": 0.84}]
    summary = metrics.summarise_seeds(rows)
    assert summary["auc"]["mean"] == pytest.approx(0.82)
    assert summary["auc"]["std"] == pytest.approx(0.02)  # sample std: sqrt((0.02^2 + 0 + 0.02^2) / 2)
    assert summary["auc"]["n"] == 3
    # a NaN seed is counted and shows as a NaN mean (a broken seed must not vanish); a missing one is not counted
    assert math.isnan(summary["kappa"]["mean"]) and math.isnan(summary["kappa"]["std"]) and summary["kappa"]["n"] == 2
    assert metrics.summarise_seeds([{"auc": 0.8}, {"kappa": 0.5}])["kappa"] == pytest.approx(
        {"mean": 0.5, "std": math.nan, "n": 1}, nan_ok=True)
    assert metrics.format_summary(metrics.Summary(0.8123, 0.0131, 3)) == "0.8123 ± 0.0131 (n=3)"
    assert metrics.format_summary(metrics.Summary(0.8123, 0.0131, 3), digits=3) == "0.812 ± 0.013 (n=3)"
    assert metrics.format_summary(metrics.Summary(0.8123, 0.0131, 3), with_n=False) == "0.8123 ± 0.0131"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one seed has no spread to estimate, and that is not an error
        one = metrics.summarise_seeds([{"auc": 0.9}])["auc"]
        assert one["mean"] == 0.9 and math.isnan(one["std"]) and one["n"] == 1
        assert metrics.format_summary(metrics.Summary(**one)) == "0.9000 (n=1)"  # no std for one seed
    assert metrics.seed_summary([0.9, None]).n == 2 and math.isnan(metrics.seed_summary([0.9, None]).mean)
    assert metrics.seed_summary([]) == pytest.approx((math.nan, math.nan, 0), nan_ok=True)
    assert metrics.format_summary(metrics.seed_summary([])) == "–"
