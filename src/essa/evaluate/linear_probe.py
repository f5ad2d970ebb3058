"""Linear probing: logistic regression on cached frozen features, its regularisation chosen on a validation split.

Features are standardised (mean 0, variance 1 per dimension, fitted on the training features) so that one grid of
the inverse regularisation strength C suits every backbone. Single-label tasks fit one multinomial (softmax)
``LogisticRegression``; multilabel tasks fit one binary logistic regression per label (one-vs-rest).
C is chosen by the task's primary metric (:func:`essa.evaluate.metrics.primary_metric`) on the validation split;
without one, on a seeded 20 % of the training features held out for it, after which the probe is refitted on all of
them. The grid is walked from strong to weak regularisation, warm-starting each fit from the previous one.

:meth:`LinearProbe.as_linear` folds the standardisation into the coefficients: the (C, D) weight and (C,) bias of
a linear layer on the raw features whose softmax (per-label sigmoid for multilabel) is the probe's probabilities,
which is how ``essa finetune`` starts fine-tuning from a probe (``head.init: lp``, LP-FT).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from essa.evaluate import metrics

#: 10 values log-spaced from 1e-4 to 1e2.
DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 2, 10))
#: lbfgs iterations per fit; weakly regularised fits on separable features would otherwise run for long.
MAX_ITER = 1000
#: Fraction of the training features held out to choose C when no validation split is given.
HELD_OUT = 0.2
#: Logit margin of a class the probe never saw in training (or of a constant multilabel label): e^-20 ~ 2e-9.
ABSENT_LOGIT = 20.0


@dataclass
class LinearProbe:
    """A fitted probe. ``C``: the chosen inverse regularisation; ``selection``: the primary metric on the
    selection split for every C tried (C -> value; empty when one C was given); ``selected_on``: that split."""

    task: str
    num_classes: int
    C: float
    metric: str
    selected_on: str
    scaler: StandardScaler = field(repr=False)
    model: LogisticRegression | OneVsRestClassifier = field(repr=False)
    selection: dict[float, float] = field(default_factory=dict)

    def predict_scores(self, feats) -> np.ndarray:
        """(N, C) class probabilities (softmax rows; per-label sigmoids for multilabel) of (N, D) features."""
        x = _features(feats, "feats", self.scaler.n_features_in_)
        return _probabilities(self.model, self.scaler.transform(x), self.task, self.num_classes)

    def as_linear(self) -> tuple[np.ndarray, np.ndarray]:
        """(C, D) weight and (C,) bias (float64) of a linear layer on the raw (unstandardised) features whose
        logits give :meth:`predict_scores`: softmax of the C logits, or a sigmoid per label for multilabel.

        A binary probe's single decision value z becomes the logits (-z/2, z/2); a class absent from the training
        labels gets weight 0 and a bias :data:`ABSENT_LOGIT` below the others (probability ~0, as in
        :meth:`predict_scores`); a multilabel label constant in the training labels gets weight 0 and bias
        +-:data:`ABSENT_LOGIT`."""
        if self.task == "multilabel":
            rows = [_binary_row(e, self.scaler.n_features_in_) for e in self.model.estimators_]
            weight, bias = np.stack([w for w, _ in rows]), np.array([b for _, b in rows])
        else:
            coef, intercept = self.model.coef_, self.model.intercept_
            classes = self.model.classes_
            if len(classes) == 2 and coef.shape[0] == 1:  # binary: one decision value for classes_[1]
                coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
            weight = np.zeros((self.num_classes, coef.shape[1]))
            bias = np.full(self.num_classes, float(intercept.min()) - ABSENT_LOGIT)
            weight[classes], bias[classes] = coef, intercept
        # standardised x' = (x - mean) / scale: w . x' + b = (w / scale) . x + (b - (w / scale) . mean)
        weight = weight / self.scaler.scale_
        return weight, bias - weight @ self.scaler.mean_


def _binary_row(estimator, dim: int) -> tuple[np.ndarray, float]:
    """Weight and bias (standardised features) of one one-vs-rest label: its logistic regression, or 0 and
    +-ABSENT_LOGIT for a label that is constant in the training labels (sklearn's constant predictor)."""
    if hasattr(estimator, "coef_"):
        return estimator.coef_[0], float(estimator.intercept_[0])
    constant = float(np.ravel(estimator.y_)[0])
    return np.zeros(dim), ABSENT_LOGIT if constant > 0.5 else -ABSENT_LOGIT


def _probabilities(model, x: np.ndarray, task: str, num_classes: int) -> np.ndarray:
    proba = model.predict_proba(x)
    if task == "multilabel":
        return proba
    # A class absent from the training labels has no column in sklearn's output; it gets probability 0.
    out = np.zeros((len(x), num_classes))
    out[:, model.classes_] = proba
    return out


def _features(feats, name: str, dim: int | None = None) -> np.ndarray:
    x = metrics.to_numpy(feats).astype(np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"{name} must be (N, {dim or 'D'}) features with N > 0, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} hold {int((~np.isfinite(x)).sum())} NaN/inf values; features must be finite")
    return x


def _labels(labels, name: str, n: int, task: str) -> np.ndarray:
    y = metrics.to_numpy(labels)
    shape_ok = (y.ndim == 2 and y.shape[0] == n) if task == "multilabel" else y.shape == (n,)
    if not shape_ok:
        what = "(N, L) 0/1 targets" if task == "multilabel" else "(N,) class indices"
        raise ValueError(f"{name} has shape {y.shape} but its features have {n} rows; expected {what} with N={n}")
    if y.size and (y.min() < 0 or np.any(y != np.round(y)) or (task == "multilabel" and y.max() > 1)):
        raise ValueError(f"{name} must hold class indices >= 0 (0/1 for multilabel), got {np.unique(y)[:10].tolist()}")
    return y.astype(np.int64)


def _new_model(task: str, seed: int) -> LogisticRegression | OneVsRestClassifier:
    # lbfgs fits the multinomial (softmax) loss when there are more than two classes; warm_start lets each fit
    # along the C grid start from the previous one's coefficients (OneVsRestClassifier fits fresh clones, so
    # multilabel fits start cold).
    lr = LogisticRegression(max_iter=MAX_ITER, random_state=seed, warm_start=True)
    return OneVsRestClassifier(lr) if task == "multilabel" else lr


def _fit(x: np.ndarray, y: np.ndarray, c: float, task: str, seed: int):
    """Scaler and model fitted on (N, D) raw features ``x`` at inverse regularisation ``c``."""
    scaler = StandardScaler().fit(x)
    model = _new_model(task, seed)
    _set_c(model, c)
    return scaler, model.fit(scaler.transform(x), y)


def _set_c(model: LogisticRegression | OneVsRestClassifier, c: float) -> None:
    model.set_params(**{"estimator__C" if isinstance(model, OneVsRestClassifier) else "C": c})


def _grid(x, y, x_sel, y_sel, cs: Sequence[float], task: str, metric: str, num_classes: int, seed: int):
    """Fit on standardised (x, y) for each C in ascending order and score ``metric`` on (x_sel, y_sel).

    Returns (best C, {C: value}, the model fitted at the best C); ties go to the smaller C (stronger regularisation).
    """
    model, selection, best_c, best_model = _new_model(task, seed), {}, None, None
    for c in sorted(cs):
        _set_c(model, c)
        model.fit(x, y)
        value = metrics.compute(task, y_sel, _probabilities(model, x_sel, task, num_classes), num_classes)[metric]
        selection[c] = value
        if not math.isnan(value) and (best_c is None or value > selection[best_c]):
            best_c, best_model = c, copy.deepcopy(model)
    if best_c is None:
        raise ValueError(f"{metric} is undefined on the selection split for every C: does it hold one class only?")
    return best_c, selection, best_model


# Probe-sized matrices are too small for BLAS threads to pay off: one thread fitted the default grid on 5000 x 384
# features in 0.4 s, two threads on two busy cores took 5.6 s.
@threadpool_limits.wrap(limits=1, user_api="blas")
def fit_linear_probe(
    train_feats,
    train_labels,
    val_feats=None,
    val_labels=None,
    Cs: Sequence[float] = DEFAULT_CS,
    task: str = "multiclass",
    seed: int = 0,
    *,
    metric: str | None = None,
    num_classes: int | None = None,
) -> LinearProbe:
    """Fit a logistic-regression probe on frozen features and choose its C.

    Args:
        train_feats: (N, D) features (numpy array or tensor); train_labels: (N,) class indices, or (N, L) 0/1.
        val_feats, val_labels: (M, D) and (M,) or (M, L): the split that chooses C; None holds out 20 % of train.
        Cs: inverse regularisation strengths to try (default :data:`DEFAULT_CS`); a single value skips selection.
        task: one of :data:`essa.evaluate.metrics.TASKS`; metric: the selection metric (default: the task's primary).
        num_classes: C (default: the largest label + 1; the label columns for multilabel).
    Returns:
        a :class:`LinearProbe` trained on the training features only.
    """
    metric = metrics.primary_metric(task, metric)
    x = _features(train_feats, "train_feats")
    y = _labels(train_labels, "train_labels", len(x), task)
    if (val_feats is None) != (val_labels is None):
        raise ValueError("give both val_feats and val_labels, or neither")
    if val_feats is not None:
        x_val = _features(val_feats, "val_feats", x.shape[1])
        y_val = _labels(val_labels, "val_labels", len(x_val), task)
        if task == "multilabel" and y_val.shape[1] != y.shape[1]:
            raise ValueError(f"val_labels have {y_val.shape[1]} labels but train_labels have {y.shape[1]}")
    else:
        x_val = y_val = None
    if task == "multilabel":
        num_classes = y.shape[1]
    else:
        largest = int(max(y.max(), y_val.max() if y_val is not None else 0))
        num_classes = num_classes or largest + 1
        if largest >= num_classes:
            raise ValueError(f"labels go up to {largest} but num_classes={num_classes}; expected 0..{num_classes - 1}")
    if len(Cs) == 0:
        raise ValueError("Cs is empty; give at least one inverse regularisation strength")

    if len(Cs) == 1:
        c, selection, selected_on = float(Cs[0]), {}, "a single C given"
        scaler, model = _fit(x, y, c, task, seed)
    elif x_val is not None:
        scaler = StandardScaler().fit(x)
        x_std, x_val_std = scaler.transform(x), scaler.transform(x_val)
        c, selection, model = _grid(x_std, y, x_val_std, y_val, Cs, task, metric, num_classes, seed)
        selected_on = "validation split"
    else:
        # Stratify the held-out part when every class can spare an image for it (multilabel cannot be stratified).
        stratifiable = task != "multilabel" and np.unique(y, return_counts=True)[1].min() >= 2
        fit, held = train_test_split(
            np.arange(len(x)), test_size=HELD_OUT, random_state=seed, stratify=y if stratifiable else None
        )
        scaler = StandardScaler().fit(x[fit])
        c, selection, _ = _grid(
            scaler.transform(x[fit]), y[fit], scaler.transform(x[held]), y[held], Cs, task, metric, num_classes, seed
        )
        scaler, model = _fit(x, y, c, task, seed)  # refit on all training features at the chosen C
        selected_on = f"{HELD_OUT:.0%} of the training features held out"
    return LinearProbe(task, num_classes, c, metric, selected_on, scaler, model, selection)
