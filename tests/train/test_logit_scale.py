"""The probe head's calibration (``head.calibrate``): the logit scale that minimises the fine-tuning loss."""

import math

import pytest
import torch

from essa.finetuning import LOGIT_SCALES, fit_logit_scale
from essa.train.classify import classification_loss


def _sampled(scale: float, n: int = 20000, classes: int = 4, multilabel: bool = False, seed: int = 0):
    """Logits and labels drawn from the model ``scale * logits``: the loss is lowest at that scale (in expectation)."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, classes, generator=g)
    if multilabel:
        labels = (torch.rand(n, classes, generator=g) < torch.sigmoid(scale * logits)).long()
    else:
        labels = torch.multinomial(torch.softmax(scale * logits, 1), 1, generator=g)[:, 0]
    return logits, labels


@pytest.mark.parametrize("true_scale", [0.2, 0.5, 2.0])
def test_the_scale_that_generated_the_labels_is_found(true_scale):
    logits, labels = _sampled(true_scale)
    scale, before, after = fit_logit_scale("multiclass", logits, labels)
    assert scale == pytest.approx(true_scale, rel=0.06)
    assert after <= before
    assert after == pytest.approx(float(classification_loss("multiclass", scale * logits, labels)), rel=1e-6)
    # a minimum: 5 % either way costs loss
    for other in (0.95 * scale, 1.05 * scale):
        assert float(classification_loss("multiclass", other * logits, labels)) >= after


def test_an_overconfident_binary_head_is_cooled_under_the_training_losss_class_weights():
    logits, labels = _sampled(0.3, classes=2)
    weights = torch.tensor([0.7, 1.8])
    scale, before, after = fit_logit_scale("binary", logits, labels, weights)
    assert scale < 0.5 and after < before
    grid = [math.exp(x / 50) for x in range(-150, 51)]
    best = min(grid, key=lambda s: float(classification_loss("binary", s * logits, labels, weights)))
    assert scale == pytest.approx(best, rel=0.03)


def test_multilabel_uses_the_binary_cross_entropy_with_pos_weight():
    logits, labels = _sampled(0.5, classes=3, multilabel=True)
    scale, _, after = fit_logit_scale("multilabel", logits, labels, torch.tensor([1.0, 2.0, 0.5]))
    assert after == pytest.approx(float(classification_loss("multilabel", scale * logits, labels,
                                                            torch.tensor([1.0, 2.0, 0.5]))), rel=1e-6)
    unweighted, _, _ = fit_logit_scale("multilabel", logits, labels)
    assert unweighted == pytest.approx(0.5, rel=0.06)


def test_the_scale_stays_inside_its_range():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # perfectly separable: the loss keeps falling as the scale grows, so the search stops at the top of its range
    scale, _, _ = fit_logit_scale("binary", logits, torch.tensor([1, 0]))
    assert scale == pytest.approx(LOGIT_SCALES[1], rel=1e-3)
    # always wrong: the best is the flattest
    scale, _, _ = fit_logit_scale("binary", logits, torch.tensor([0, 1]))
    assert scale == pytest.approx(LOGIT_SCALES[0], rel=1e-2)
