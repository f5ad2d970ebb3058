"""Classification metrics of the reference medical tasks, bootstrap confidence intervals, and multi-seed summaries.

Every metric value comes from scikit-learn; this module validates inputs once, turns scores into predictions and
decides which labels an AUC can be computed on.

Task types and the keys :func:`compute` returns for each:

==============  ===========================================================================================
``multiclass``  accuracy, balanced_accuracy (primary), macro_f1, auc (macro one-vs-rest), kappa, auc_skipped_labels
``ordinal``     the same keys (grades 0..C-1 predicted as a class); kappa is the primary metric
``binary``      the same keys; auc (primary) is the ROC-AUC of the positive-class score (class 1)
``multilabel``  accuracy (per label at threshold 0.5, averaged over labels and images = 1 - Hamming loss),
                subset_accuracy (all labels right), macro_f1 (per label at 0.5), auc (primary, macro over labels),
                auc_skipped_labels
==============  ===========================================================================================

- balanced_accuracy is the macro average of per-class recall; kappa is Cohen's kappa with quadratic weights
  (for binary tasks it equals the unweighted kappa).
- Single-label predictions are the argmax of the scores; multilabel predictions are ``score >= 0.5``.
- A label whose targets in ``y_true`` hold one class only (no positives, or no negatives) has no ROC-AUC; the macro
  AUC skips it and ``auc_skipped_labels`` counts the skipped labels; auc is NaN if none remain.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import sklearn
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    auc,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    hamming_loss,
    roc_curve,
)

from essa.config import ConfigError

TASKS = ("multiclass", "binary", "multilabel", "ordinal")
#: Multilabel scores at or above this count as a positive prediction.
THRESHOLD = 0.5
_PRIMARY = {"ordinal": "kappa", "binary": "auc", "multilabel": "auc", "multiclass": "balanced_accuracy"}
# Probabilities computed in float32 can overshoot [0, 1] by rounding.
_PROBABILITY_TOLERANCE = 1e-5


def to_numpy(x) -> np.ndarray:
    """A numpy array of ``x`` (a numpy array, a torch tensor on any device, or a nested sequence)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


@dataclass(frozen=True)
class _Evaluation:
    """Validated inputs of one evaluation, and the predictions and AUC targets derived from them.

    ``y``: (N,) class indices or (N, L) {0, 1}; ``scores``: (N, C) probabilities; ``pred``: shaped like ``y``;
    ``auc_targets`` / ``auc_scores``: (N, K) binary targets and scores of the K labels whose AUC is defined on the
    full test set; ``auc_skipped``: how many labels were left out.
    """

    y: np.ndarray
    scores: np.ndarray
    pred: np.ndarray
    auc_targets: np.ndarray
    auc_scores: np.ndarray
    auc_skipped: int
    num_classes: int

    def take(self, idx: np.ndarray) -> _Evaluation:
        """The same evaluation on the images ``idx`` (a bootstrap resample), keeping the full set's AUC labels."""
        return replace(
            self,
            y=self.y[idx],
            scores=self.scores[idx],
            pred=self.pred[idx],
            auc_targets=self.auc_targets[idx],
            auc_scores=self.auc_scores[idx],
        )


def _binary_auc(targets: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of (N,) {0, 1} targets, NaN when one class is missing. Equal to ``roc_auc_score``, which computes
    exactly this area under ``roc_curve``, at a third of its cost (it re-checks inputs that are validated once here);
    the bootstrap calls it thousands of times."""
    if targets.min() == targets.max():
        return math.nan
    fpr, tpr, _ = roc_curve(targets, scores, pos_label=1)
    return float(auc(fpr, tpr))


def _macro_auc(ev: _Evaluation) -> float:
    # sklearn's multiclass "ovr" macro AUC is exactly this mean of binary AUCs of one-hot targets; computing it per
    # label lets labels without positives or negatives be skipped instead of failing the whole call.
    if ev.auc_targets.shape[1] == 0:
        return math.nan
    return float(np.mean([_binary_auc(t, s) for t, s in zip(ev.auc_targets.T, ev.auc_scores.T)]))


_SINGLE_LABEL: dict[str, Callable[[_Evaluation], float]] = {
    "accuracy": lambda ev: accuracy_score(ev.y, ev.pred),
    "balanced_accuracy": lambda ev: balanced_accuracy_score(ev.y, ev.pred),
    # zero_division=0: a class never predicted has precision 0/0; it counts as F1 0, not as an error.
    "macro_f1": lambda ev: f1_score(ev.y, ev.pred, average="macro", zero_division=0),
    "auc": _macro_auc,
    # labels= keeps the quadratic weights on grade distances even when a grade is absent from both y and pred.
    "kappa": lambda ev: cohen_kappa_score(ev.y, ev.pred, weights="quadratic", labels=np.arange(ev.num_classes)),
}
_MULTILABEL: dict[str, Callable[[_Evaluation], float]] = {
    "accuracy": lambda ev: 1.0 - hamming_loss(ev.y, ev.pred),
    "subset_accuracy": lambda ev: accuracy_score(ev.y, ev.pred),
    "macro_f1": lambda ev: f1_score(ev.y, ev.pred, average="macro", zero_division=0),
    "auc": _macro_auc,
}


def _metric_functions(task: str) -> dict[str, Callable[[_Evaluation], float]]:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return _MULTILABEL if task == "multilabel" else _SINGLE_LABEL


def metric_names(task: str) -> tuple[str, ...]:
    """The metrics (with confidence intervals possible) of ``task``; :func:`compute` adds ``auc_skipped_labels``."""
    return tuple(_metric_functions(task))


def primary_metric(task: str, override: str | None = None) -> str:
    """The metric that ranks models on ``task``: kappa (ordinal), auc (binary, multilabel), else balanced_accuracy.

    ``override`` replaces it and must be one of :func:`metric_names` of the task.
    """
    names = metric_names(task)
    if override is None:
        return _PRIMARY[task]
    if override not in names:
        raise ConfigError(f"metric {override!r} is not computed for {task} tasks; expected one of {', '.join(names)}")
    return override


def _validated(task: str, y_true, scores, num_classes: int | None) -> _Evaluation:
    """Check the inputs of a public function (raising ValueError) and warn its caller about classes the test split
    lacks."""
    _metric_functions(task)
    y, s = to_numpy(y_true), to_numpy(scores).astype(np.float64)
    if task == "binary" and (s.ndim == 1 or (s.ndim == 2 and s.shape[1] == 1)):
        s = s.reshape(-1)
        s = np.stack([1.0 - s, s], axis=1)  # a single positive-class probability, as from a sigmoid head
    if s.ndim != 2 or s.shape[0] == 0:
        raise ValueError(f"scores must be (N, C) with N > 0 (class probabilities), got shape {s.shape}")
    n, c = s.shape
    if num_classes is not None and c != num_classes:
        raise ValueError(f"scores have {c} columns but num_classes={num_classes}; expected shape ({n}, {num_classes})")
    if task == "binary" and c != 2:
        raise ValueError(f"binary scores must be (N, 2) or the positive-class probability (N,), got shape {s.shape}")
    if not np.isfinite(s).all():
        bad = np.argwhere(~np.isfinite(s))
        raise ValueError(
            f"scores hold {len(bad)} NaN/inf values (first at row, column {tuple(bad[0].tolist())}); all must be finite"
        )
    if s.min() < -_PROBABILITY_TOLERANCE or s.max() > 1 + _PROBABILITY_TOLERANCE:
        raise ValueError(
            f"scores must be probabilities in [0, 1] (softmax or sigmoid outputs), got values in "
            f"[{s.min():.4g}, {s.max():.4g}]: logits?"
        )
    expected_y = (n, c) if task == "multilabel" else (n,)
    if y.shape != expected_y:
        raise ValueError(f"y_true has shape {y.shape} but scores have shape {s.shape}; expected y_true {expected_y}")
    if not np.issubdtype(y.dtype, np.number) and y.dtype != bool:
        raise ValueError(f"y_true must hold integers, got dtype {y.dtype}")
    allowed = (0, 1) if task == "multilabel" else tuple(range(c))
    outside = np.setdiff1d(np.unique(y), allowed)
    if outside.size:
        what = "multilabel targets must be 0 or 1" if task == "multilabel" else f"labels must be in 0..{c - 1}"
        raise ValueError(f"y_true holds {outside[:5].tolist()}: {what} (scores have {c} columns)")
    y = y.astype(np.int64)

    if task == "multilabel":
        pred = (s >= THRESHOLD).astype(np.int64)
        labels, targets, label_scores = list(range(c)), y, s
    else:
        pred = s.argmax(axis=1)
        # Binary AUC ranks the positive class only; the negative-class column is its mirror image.
        labels = [1] if task == "binary" else list(range(c))
        targets, label_scores = (y[:, None] == np.asarray(labels)).astype(np.int64), s[:, labels]
        absent = sorted(set(range(c)) - set(np.unique(y).tolist()))
        if absent:
            warnings.warn(
                f"y_true has no images of class(es) {absent} of 0..{c - 1}: balanced_accuracy averages recall over "
                f"the classes present (scikit-learn drops classes without true images), macro_f1 averages over classes "
                f"present or predicted (a predicted class without true images counts as F1 0)",
                stacklevel=3,
            )
    positives = targets.sum(axis=0)
    defined = (positives > 0) & (positives < n)
    if not defined.all():
        skipped = np.asarray(labels)[~defined].tolist()
        warnings.warn(
            f"label(s) {skipped} have one class only in y_true: no ROC-AUC, skipped in the macro AUC", stacklevel=3
        )
    return _Evaluation(y, s, pred, targets[:, defined], label_scores[:, defined], int((~defined).sum()), c)


def _point_estimates(ev: _Evaluation, task: str) -> dict[str, float]:
    with warnings.catch_warnings():
        # _validated already warned about absent classes; sklearn's own warning would repeat it less clearly.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        out = {name: float(fn(ev)) for name, fn in _metric_functions(task).items()}
    out["auc_skipped_labels"] = float(ev.auc_skipped)
    return out


def compute(task: str, y_true, scores, num_classes: int | None = None) -> dict[str, float]:
    """All metrics of ``task`` (see the module docstring for the keys of each task).

    Args:
        y_true: (N,) class indices in 0..C-1, or (N, C) {0, 1} targets for multilabel; numpy array or tensor.
        scores: (N, C) class probabilities (softmax outputs; sigmoid outputs for multilabel); binary tasks also
            accept the positive-class probability (N,) or (N, 1).
        num_classes: C, checked against the columns of ``scores`` when given.
    Returns:
        metric name -> value; ``auc_skipped_labels`` counts labels left out of the macro AUC.
    Raises:
        ValueError: wrong shapes, labels outside 0..C-1 (or not 0/1 for multilabel), scores not finite
            or not in [0, 1]. Classes missing from ``y_true`` only warn.
    """
    return _point_estimates(_validated(task, y_true, scores, num_classes), task)


def confusion(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(C, C) int counts of images with true class i (row) predicted as class j (column); inputs are (N,) indices."""
    y, p = to_numpy(y_true).reshape(-1), to_numpy(y_pred).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} items but y_pred has {p.size}; expected the same length")
    for name, v in (("y_true", y), ("y_pred", p)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} holds values in [{v.min()}, {v.max()}]; expected 0..{num_classes - 1}")
    return confusion_matrix(y, p, labels=np.arange(num_classes)).astype(np.int64)


def _bootstrap(
    ev: _Evaluation, task: str, names: Sequence[str], n: int, seed: int, level: float
) -> dict[str, tuple[float, float]]:
    """(low, high) percentile intervals of each metric in ``names`` over ``n`` shared resamples of the images."""
    if not 0 < level < 1 or n < 1:
        raise ValueError(f"need 0 < level < 1 and n >= 1 resamples, got level={level}, n={n}")
    fns = _metric_functions(task)
    unknown = [m for m in names if m not in fns]
    if unknown:
        raise ValueError(f"no bootstrap for {unknown} on {task} tasks; expected some of {', '.join(fns)}")
    rng = np.random.default_rng(seed)
    values = np.empty((n, len(names)))
    # Inputs were validated once; skipping sklearn's per-call checks makes each resample several times cheaper.
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True), warnings.catch_warnings():
        # Undefined resamples (e.g. a label with one class for AUC) come back NaN and are dropped below.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        for i in range(n):
            sample = ev.take(rng.integers(0, len(ev.y), size=len(ev.y)))
            values[i] = [fns[m](sample) for m in names]
    tail = 100 * (1 - level) / 2
    out = {}
    for j, name in enumerate(names):
        valid = values[~np.isnan(values[:, j]), j]
        if len(valid) < n:
            warnings.warn(f"{name}: {n - len(valid)} of {n} bootstrap resamples are undefined, skipped", stacklevel=3)
        low, high = np.percentile(valid, [tail, 100 - tail]) if len(valid) else (math.nan, math.nan)
        out[name] = (float(low), float(high))
    return out


def bootstrap_ci(
    task: str,
    y_true,
    scores,
    metric: str,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    num_classes: int | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of one metric over the test images.

    Each of ``n`` resamples draws N images with replacement (``numpy.random.default_rng(seed)``, so the result is
    deterministic) and recomputes ``metric`` with scikit-learn. Resamples where the metric is undefined (a label
    with one class only for AUC, kappa with one class) are skipped with a warning. The macro AUC of a resample
    averages the labels scored on the full test set, so a resample missing one of them is undefined.

    Args: as :func:`compute`; ``metric`` is one of :func:`metric_names` of ``task``.
    Returns:
        (low, high), the (1 - level) / 2 and (1 + level) / 2 percentiles; NaN if no resample is defined.
    """
    ev = _validated(task, y_true, scores, num_classes)
    return _bootstrap(ev, task, [metric], n, seed, level)[metric]


def compute_with_ci(
    task: str,
    y_true,
    scores,
    num_classes: int | None = None,
    *,
    ci_metrics: str | Sequence[str] = "primary",
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """:func:`compute` plus ``{name}_ci_low`` and ``{name}_ci_high`` for the metrics in ``ci_metrics``.

    ``ci_metrics``: ``"primary"`` (the task's primary metric), ``"all"`` (every metric of the task), or a list of
    names. All intervals share the same resamples (see :func:`bootstrap_ci`).
    """
    ev = _validated(task, y_true, scores, num_classes)
    out = _point_estimates(ev, task)
    if isinstance(ci_metrics, str):
        names = {"primary": [primary_metric(task)], "all": list(metric_names(task))}.get(ci_metrics, [ci_metrics])
    else:
        names = list(ci_metrics)
    for name, (low, high) in _bootstrap(ev, task, names, n, seed, level).items():
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high
    return out


class Summary(NamedTuple):
    """Mean, std (ddof=1; NaN below two seeds) and number of seeds of one metric."""

    mean: float
    std: float
    n: int


def seed_summary(values: Iterable[float | None]) -> Summary:
    """The one seed statistic of essa (``essa finetune``'s summary, ``essa evaluate``'s, the study report's): mean,
    sample standard deviation (ddof=1; NaN below two seeds: one seed has no spread to estimate) and count of
    ``values``, one per seed. A NaN (or None, JSON null) value makes the mean NaN: a broken seed should show, not
    vanish from the mean. No values: ``Summary(nan, nan, 0)``."""
    vals = np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    if len(vals) == 0:
        return Summary(math.nan, math.nan, 0)
    std = float(vals.std(ddof=1)) if len(vals) >= 2 else math.nan
    return Summary(float(vals.mean()), std, len(vals))


def summarise_seeds(rows: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """:func:`seed_summary` of each metric over runs with different seeds.

    ``rows``: one metrics dict per seed. A row lacking a metric is not counted for it (its ``n`` says how many seeds
    it rests on); a NaN value is counted, and makes that metric's mean NaN.
    Returns: metric -> {"mean", "std", "n"}.
    """
    if not rows:
        raise ValueError("summarise_seeds needs at least one row of metrics")
    names = list(dict.fromkeys(name for row in rows for name in row))
    return {name: seed_summary(row[name] for row in rows if name in row)._asdict() for name in names}


def format_summary(summary: Summary, digits: int = 4, with_n: bool = True) -> str:
    """``"0.8123 ± 0.0131 (n=3)"``: every printed number carries its spread and seed count; the std only when it is
    defined (two seeds or more: ``"0.8123 (n=1)"``); ``"–"`` without a seed."""
    if summary.n == 0:
        return "–"
    text = f"{summary.mean:.{digits}f}"
    if summary.n >= 2:
        text += f" ± {summary.std:.{digits}f}"
    return f"{text} (n={summary.n})" if with_n else text
