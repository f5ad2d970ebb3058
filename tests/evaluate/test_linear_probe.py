import numpy as np
import pytest
import torch

from essa.evaluate import metrics
from essa.evaluate.linear_probe import DEFAULT_CS, fit_linear_probe

CENTRES = np.random.default_rng(123).normal(size=(3, 16))


def blobs(n, seed, class_probs=(0.7, 0.2, 0.1), separation=3.0):
    """(n, 16) features around 3 class centres ``separation`` apart from the origin, imbalanced classes."""
    rng = np.random.default_rng(seed)
    y = rng.choice(len(class_probs), size=n, p=class_probs)
    centres = CENTRES * separation / np.linalg.norm(CENTRES, axis=1, keepdims=True)
    return centres[y] + 0.7 * rng.normal(size=(n, 16)), y


def test_probe_beats_chance_and_validation_rejects_too_strong_regularisation():
    (x, y), (x_val, y_val), (x_test, y_test) = blobs(300, 0), blobs(200, 1), blobs(500, 2)
    probe = fit_linear_probe(torch.tensor(x), torch.tensor(y), x_val, y_val, Cs=(1e-6, 1e-4, 1e-2, 1.0))
    # The unpenalised intercept learns the class prior; with C <= 1e-4 the weights are too small to overturn it, every
    # image gets the majority class and balanced accuracy is chance (1/3). The validation split must see that.
    assert probe.selection[1e-6] == pytest.approx(1 / 3)
    assert probe.C == max(probe.selection, key=probe.selection.get) and probe.C >= 1e-2
    assert probe.metric == "balanced_accuracy" and probe.selected_on == "validation split"
    scores = probe.predict_scores(x_test)
    assert scores.shape == (500, 3)
    np.testing.assert_allclose(scores.sum(1), 1.0, atol=1e-9)
    assert metrics.compute("multiclass", y_test, scores)["balanced_accuracy"] > 0.9  # chance: 1/3


def test_ties_go_to_the_strongest_regularisation():
    (x, y), (x_val, y_val) = blobs(200, 0, (1 / 3,) * 3, separation=8.0), blobs(100, 1, (1 / 3,) * 3, separation=8.0)
    probe = fit_linear_probe(x, y, x_val, y_val, Cs=(100.0, 1.0, 1e-2))
    assert list(probe.selection.values()) == [1.0, 1.0, 1.0]  # perfectly separated: every C is right on val
    assert probe.C == 1e-2


def test_without_validation_a_held_out_part_of_train_chooses_c():
    x, y = blobs(300, 0)
    probe = fit_linear_probe(x, y, Cs=(1e-6, 1.0))
    assert probe.C == 1.0 and probe.selected_on.startswith("20% of the training features")
    assert probe.selection[1e-6] == pytest.approx(1 / 3)
    assert fit_linear_probe(x, y, Cs=(0.5,)).selection == {}  # one C: nothing to choose
    assert len(DEFAULT_CS) == 10 and DEFAULT_CS[0] == pytest.approx(1e-4) and DEFAULT_CS[-1] == pytest.approx(1e2)


def test_binary_and_multilabel_probes_rank_by_auc():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8))
    y_multi = np.stack([x[:, 0] > 0, x[:, 1] + 0.3 * rng.normal(size=400) > 0], axis=1).astype(int)
    probe = fit_linear_probe(x[:300], y_multi[:300], x[300:350], y_multi[300:350], Cs=(1e-2, 1.0), task="multilabel")
    scores = probe.predict_scores(x[350:])
    assert scores.shape == (50, 2) and probe.metric == "auc"
    assert metrics.compute("multilabel", y_multi[350:], scores)["auc"] > 0.95
    binary = fit_linear_probe(x[:300], y_multi[:300, 0], x[300:350], y_multi[300:350, 0], Cs=(1.0,), task="binary")
    assert metrics.compute("binary", y_multi[350:, 0], binary.predict_scores(x[350:]))["auc"] > 0.95


def test_class_missing_from_train_gets_a_zero_column():
    x, y = blobs(200, 0, (0.5, 0.5, 0.0))
    probe = fit_linear_probe(x, y, Cs=(1.0,), num_classes=3)
    scores = probe.predict_scores(x[:5])
    assert scores.shape == (5, 3) and (scores[:, 2] == 0).all()


def test_bad_input_is_explained():
    x, y = blobs(50, 0)
    with pytest.raises(ValueError, match=r"val_feats must be \(N, 16\) features with N > 0, got shape \(10, 8\)"):
        fit_linear_probe(x, y, np.zeros((10, 8)), np.zeros(10))
    with pytest.raises(ValueError, match=r"train_labels has shape \(49,\) but its features have 50 rows"):
        fit_linear_probe(x, y[:49])
    with pytest.raises(ValueError, match="both val_feats and val_labels"):
        fit_linear_probe(x, y, x)
    with pytest.raises(ValueError, match=r"labels go up to 2 but num_classes=2"):
        fit_linear_probe(x, y, num_classes=2)
    with_nan = x.copy()
    with_nan[4, 3] = np.nan
    with pytest.raises(ValueError, match="train_feats hold 1 NaN/inf values"):
        fit_linear_probe(with_nan, y)
    probe = fit_linear_probe(x, y, Cs=(1.0,))
    with pytest.raises(ValueError, match=r"feats must be \(N, 16\)"):
        probe.predict_scores(np.zeros((3, 4)))
