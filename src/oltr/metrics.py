"""Evaluation metrics for open long-tailed recognition (pure numpy).

Conventions (docs/method.md), shared by every function here:

- the open label is ``-1``, in ``labels`` and in predictions; a prediction of ``-1`` means
  "rejected as unknown";
- an open score is *higher = more likely open*; :func:`reject` rejects a sample iff
  ``open_score > threshold``, so a sample is *accepted* iff ``open_score <= threshold``;
- shot groups come from per-class train counts: many > 100, few < 20, medium otherwise (the
  paper's strict form, §4); ``strict=False`` gives the original code's ``>= 100`` / ``<= 20``.

Paper metrics: closed/open-set top-1 with many/medium/few means (§4, §D.4), the F-measure
(§D.4, Eq. 10-12) and the open detection error (Tab. 2). Threshold-free additions: AUROC,
FPR at 95 % TPR, AUPR, OSCR and the expected calibration error.
"""
from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

import numpy as np
from scipy.stats import rankdata

from oltr.errors import InputError

SHOT_GROUPS = ("many", "medium", "few")
OPEN_LABEL = -1
#: Decimals of a fraction in a report (report.json); every table rounds from this value.
REPORT_DECIMALS = 6


def percent_text(value: float | None, decimals: int = 1) -> str | None:
    """A fraction as a percentage with ``decimals`` decimals, rounded once, half up, from the
    fraction as report.json stores it (``REPORT_DECIMALS``): so every table (``oltr evaluate``,
    ``oltr report``, plots) shows the same digits for the same figure, whether it reads the
    JSON or the unrounded value (``f"{100 * v:.1f}"`` on the two could differ: 0.8495 prints
    85.0, 0.84949999 prints 84.9). None for a missing or non-finite value."""
    if value is None or not np.isfinite(value):
        return None
    stored = Decimal(repr(round(float(value), REPORT_DECIMALS)))
    return str((100 * stored).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP))


# --------------------------------------------------------------------------- input checks


def _one_dimensional(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise InputError(f"{name} is empty")
    return array


def _integers(name: str, values: Any) -> np.ndarray:
    array = _one_dimensional(name, values)
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _finite_scores(name: str, values: Any) -> np.ndarray:
    array = _one_dimensional(name, values)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"{name} must hold real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise InputError(
            f"{name} must be finite; index {bad[0]} is not", value=float(array[bad[0]])
        )
    return array


def _flags(name: str, values: Any) -> np.ndarray:
    """A boolean mask; integer 0/1 arrays are accepted too."""
    array = _one_dimensional(name, values)
    if array.dtype == np.bool_:
        return array
    if np.issubdtype(array.dtype, np.integer):
        bad = np.flatnonzero((array != 0) & (array != 1))
        if bad.size == 0:
            return array.astype(bool)
        raise InputError(f"{name} must be boolean (or 0/1); index {bad[0]} is not",
                         value=int(array[bad[0]]))
    raise InputError(f"{name} must be boolean, got dtype {array.dtype}")


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name}={length}" for name, length in lengths.items())
        raise InputError(f"inputs must have the same length, got {described}")


def _in_range(name: str, array: np.ndarray, low: int, high: int | None = None) -> None:
    """Every value of ``array`` must lie in ``[low, high)`` (``high=None``: no upper bound)."""
    too_high = np.zeros(len(array), dtype=bool) if high is None else array >= high
    bad = np.flatnonzero((array < low) | too_high)
    if bad.size:
        interval = f">= {low}" if high is None else f"in [{low}, {high - 1}]"
        raise InputError(f"{name} must be {interval}; index {bad[0]} is not",
                         value=int(array[bad[0]]))


def _positive_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise InputError(f"{name} must lie in (0, 1]", value=value)
    return value


def _both_classes(is_open: np.ndarray) -> tuple[int, int]:
    """Return (number known, number open); both must be positive."""
    n_open = int(is_open.sum())
    n_known = len(is_open) - n_open
    if n_open == 0 or n_known == 0:
        raise InputError(
            f"is_open must contain both known and open samples, got {n_known} known "
            f"and {n_open} open"
        )
    return n_known, n_open


# --------------------------------------------------------------------------- shot groups


def shot_groups(
    train_counts: Any,
    many_threshold: int = 100,
    few_threshold: int = 20,
    strict: bool = True,
) -> np.ndarray:
    """Shot group ("many"/"medium"/"few") of each class from its number of train images.

    ``strict=True`` (the paper, §4): many = count > many_threshold, few = count < few_threshold.
    ``strict=False`` (the original code): many = count >= many_threshold,
    few = count <= few_threshold. Everything else is medium.
    """
    counts = _integers("train_counts", train_counts)
    if (counts < 0).any():
        index = int(np.flatnonzero(counts < 0)[0])
        raise InputError(f"train_counts must be >= 0; index {index} is not",
                         value=int(counts[index]))
    if few_threshold > many_threshold:
        raise InputError(f"few_threshold ({few_threshold}) must not exceed many_threshold "
                         f"({many_threshold})")
    if strict:
        many, few = counts > many_threshold, counts < few_threshold
    else:
        many, few = counts >= many_threshold, counts <= few_threshold
    groups = np.full(len(counts), "medium", dtype="<U6")
    groups[many] = "many"
    groups[few] = "few"
    return groups


def _group_report(
    correct: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
) -> dict[str, Any]:
    """Per-group mean of per-class accuracy over known samples; ``None`` for an empty group.

    ``correct`` and ``labels`` cover known samples only (labels >= 0).
    """
    n_classes = len(groups)
    samples_per_class = np.bincount(labels, minlength=n_classes)
    correct_per_class = np.bincount(labels, weights=correct.astype(np.float64),
                                    minlength=n_classes)
    report: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    samples: dict[str, int] = {}
    for group in SHOT_GROUPS:
        in_group = groups == group
        tested = in_group & (samples_per_class > 0)
        per_class = correct_per_class[tested] / samples_per_class[tested]
        report[group] = float(per_class.mean()) if per_class.size else None
        counts[group] = int(in_group.sum())
        samples[group] = int(samples_per_class[in_group].sum())
    counts["samples"] = samples
    report["counts"] = counts
    report["per_class"] = [
        float(c / n) if n else None for c, n in zip(correct_per_class, samples_per_class)
    ]
    return report


# --------------------------------------------------------------------------- accuracies


def closed_set_accuracy(
    predictions: Any,
    labels: Any,
    train_counts: Any,
    *,
    many_threshold: int = 100,
    few_threshold: int = 20,
    strict: bool = True,
) -> dict[str, Any]:
    """Closed-set top-1 accuracy, overall and per shot group (paper §4, Tab. 3).

    All ``labels`` must be known (>= 0). ``overall`` is top-1 over all samples; ``many``,
    ``medium``, ``few`` are the means of per-class accuracies over the group's classes that
    have test samples (``None`` when there is none). A prediction of -1 counts as an error.
    ``counts`` holds the number of classes per group and, under ``samples``, the number of
    test samples per group; ``per_class`` the accuracy of each class (``None`` if untested).
    """
    predictions = _integers("predictions", predictions)
    labels = _integers("labels", labels)
    _same_length(predictions=predictions, labels=labels)
    groups = shot_groups(train_counts, many_threshold, few_threshold, strict)
    _in_range("labels", labels, 0, len(groups))
    _in_range("predictions", predictions, OPEN_LABEL, len(groups))
    correct = predictions == labels
    return {"overall": float(correct.mean()), **_group_report(correct, labels, groups)}


def reject(predictions: Any, open_scores: Any, threshold: float) -> np.ndarray:
    """Copy of ``predictions`` with -1 wherever ``open_score > threshold``."""
    predictions = _integers("predictions", predictions)
    open_scores = _finite_scores("open_scores", open_scores)
    _same_length(predictions=predictions, open_scores=open_scores)
    threshold = float(threshold)
    if not np.isfinite(threshold):
        raise InputError("threshold must be finite", value=threshold)
    return np.where(open_scores > threshold, OPEN_LABEL, predictions)


def open_set_accuracy(
    predictions: Any,
    labels: Any,
    train_counts: Any,
    *,
    many_threshold: int = 100,
    few_threshold: int = 20,
    strict: bool = True,
) -> dict[str, Any]:
    """Open-set accuracy of predictions after rejection (paper §4, Tab. 3 "open-set setting").

    ``labels`` may contain -1 (open). ``many``/``medium``/``few``: mean per-class accuracy over
    the group's known test images, a rejected known image being an error. ``overall``:
    accuracy over all images, an open image being correct iff rejected (prediction -1).
    ``open_rejection_rate``: fraction of open images rejected; ``known_acceptance_rate``:
    fraction of known images not rejected (``None`` when there are no such images).
    ``counts`` as in :func:`closed_set_accuracy`, plus ``samples["open"]``.
    """
    predictions = _integers("predictions", predictions)
    labels = _integers("labels", labels)
    _same_length(predictions=predictions, labels=labels)
    groups = shot_groups(train_counts, many_threshold, few_threshold, strict)
    _in_range("labels", labels, OPEN_LABEL, len(groups))
    _in_range("predictions", predictions, OPEN_LABEL, len(groups))
    correct = predictions == labels
    is_open = labels == OPEN_LABEL
    rejected = predictions == OPEN_LABEL
    report = _group_report(correct[~is_open], labels[~is_open], groups)
    report["counts"]["samples"]["open"] = int(is_open.sum())
    return {
        "overall": float(correct.mean()),
        **report,
        "open_rejection_rate": float(rejected[is_open].mean()) if is_open.any() else None,
        "known_acceptance_rate": (
            float((~rejected[~is_open]).mean()) if (~is_open).any() else None
        ),
    }


def f_measure(predictions: Any, labels: Any) -> dict[str, float | int]:
    """Open-set F-measure (paper §D.4, Eq. 10-12, following Bendale & Boult 2016).

    TP = known images classified correctly; FP = known images classified wrongly, rejected
    ones included (so TP + FP = number of known images and precision is the known accuracy);
    FN = open images accepted (prediction != -1). P = TP/(TP+FP), R = TP/(TP+FN),
    F = 2PR/(P+R); each is 0 where its denominator is 0.
    """
    predictions = _integers("predictions", predictions)
    labels = _integers("labels", labels)
    _same_length(predictions=predictions, labels=labels)
    _in_range("labels", labels, OPEN_LABEL)
    _in_range("predictions", predictions, OPEN_LABEL)
    known = labels != OPEN_LABEL
    tp = int((known & (predictions == labels)).sum())
    fp = int(known.sum()) - tp
    fn = int((~known & (predictions != OPEN_LABEL)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f_measure": f, "precision": precision, "recall": recall, "tp": tp, "fp": fp,
            "fn": fn}


# --------------------------------------------------------------------------- open detection


def _detection_inputs(
    open_scores: Any, is_open: Any
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Checked (scores, is_open, number known, number open)."""
    scores = _finite_scores("open_scores", open_scores)
    flags = _flags("is_open", is_open)
    _same_length(open_scores=scores, is_open=flags)
    return (scores, flags, *_both_classes(flags))


def _accepted_counts(scores: np.ndarray, *indicators: np.ndarray) -> tuple[np.ndarray, ...]:
    """For each distinct score t (ascending): t and, per indicator, #{i: indicator & s_i <= t}.

    This is the curve traced by the acceptance rule ``score <= t`` over every threshold that
    changes the outcome; tied scores move together.
    """
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    cumulative = (np.cumsum(indicator[order])[last_of_value] for indicator in indicators)
    return (sorted_scores[last_of_value], *cumulative)


def auroc(open_scores: Any, is_open: Any) -> float:
    """Area under the ROC curve with open as the positive class (ties count one half).

    Equal to P(score of a random open image > score of a random known one) + 0.5 P(equal),
    computed from average ranks (Mann-Whitney U / (n_open n_known)).
    """
    scores, flags, n_known, n_open = _detection_inputs(open_scores, is_open)
    rank_sum = rankdata(scores)[flags].sum()
    return float((rank_sum - n_open * (n_open + 1) / 2) / (n_open * n_known))


def fpr_at_tpr(open_scores: Any, is_open: Any, tpr: float = 0.95) -> float:
    """FPR at ``tpr`` TPR, known as the positive class (the usual OOD "FPR@95%TPR").

    The threshold t is the smallest score such that at least ``tpr`` of the known images have
    score <= t (are accepted); the result is the fraction of open images with score <= t
    (wrongly accepted). Known images tied at t are all accepted, so the reached TPR may exceed
    ``tpr``. Equals ``mean(open_scores <= calibrate_threshold(known_scores, tpr))``.
    """
    scores, flags, n_known, n_open = _detection_inputs(open_scores, is_open)
    tpr = _positive_fraction("tpr", tpr)
    _, known_accepted, open_accepted = _accepted_counts(scores, ~flags, flags)
    first = int(np.argmax(known_accepted / n_known >= tpr))
    return float(open_accepted[first] / n_open)


def _average_precision(positive_scores: np.ndarray, positives: np.ndarray) -> float:
    """Step-wise average precision sum_n (R_n - R_{n-1}) P_n; higher score = more positive."""
    _, true_positives, false_positives = _accepted_counts(-positive_scores, positives,
                                                          ~positives)
    precision = true_positives / (true_positives + false_positives)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def aupr(
    open_scores: Any,
    is_open: Any,
    positive: Literal["open", "known"] = "open",
) -> float:
    """Area under the precision-recall curve as average precision (no interpolation).

    ``positive="open"`` ("AUPR-Out"): open images are positive, ranked by ``open_scores``.
    ``positive="known"`` ("AUPR-In"): known images are positive, ranked by ``-open_scores``.
    Same value as ``sklearn.metrics.average_precision_score``.
    """
    scores, flags, _, _ = _detection_inputs(open_scores, is_open)
    if positive == "open":
        return _average_precision(scores, flags)
    if positive == "known":
        return _average_precision(-scores, ~flags)
    raise InputError("positive must be 'open' or 'known'", value=positive)


def oscr(open_scores: Any, known_correct: Any, is_open: Any) -> float:
    """Open-set classification rate, the area under the OSCR curve (Dhamija et al., 2018).

    For every threshold t (accept iff score <= t): CCR(t) = #(known, correctly classified,
    accepted) / #known and FPR(t) = #(open, accepted) / #open. The curve runs from (0, 0)
    (nothing accepted) to (1, closed-set accuracy) and is integrated with the trapezoid rule,
    so ties between known and open scores count one half, as in :func:`auroc`. With every
    known image correct it equals the AUROC. ``known_correct`` is ignored for open images.
    """
    scores, flags, n_known, n_open = _detection_inputs(open_scores, is_open)
    correct = _flags("known_correct", known_correct)
    _same_length(open_scores=scores, known_correct=correct)
    _, correct_accepted, open_accepted = _accepted_counts(scores, correct & ~flags, flags)
    ccr = np.r_[0.0, correct_accepted / n_known]
    fpr = np.r_[0.0, open_accepted / n_open]
    return float(np.sum(np.diff(fpr) * (ccr[1:] + ccr[:-1]) / 2))


def detection_error(open_scores: Any, is_open: Any) -> float:
    """Minimum over thresholds of 0.5 (1 - TPR) + 0.5 FPR (paper Tab. 2, as in ODIN).

    With accept iff score <= t: 1 - TPR is the fraction of known images rejected and FPR the
    fraction of open images accepted (the value is the same with either class as positive).
    Thresholds cover every distinct score and "reject all" (error 0.5), so the result is
    at most 0.5.
    """
    scores, flags, n_known, n_open = _detection_inputs(open_scores, is_open)
    _, known_accepted, open_accepted = _accepted_counts(scores, ~flags, flags)
    errors = 0.5 * (1 - known_accepted / n_known) + 0.5 * open_accepted / n_open
    return float(min(0.5, errors.min()))


# --------------------------------------------------------------------------- calibration


def expected_calibration_error(confidences: Any, correct: Any, n_bins: int = 15) -> float:
    """Expected calibration error with ``n_bins`` equal-width bins (Guo et al., 2017).

    ECE = sum_b |B_b|/N |accuracy(B_b) - mean confidence(B_b)|, bins (k/n, (k+1)/n] with a
    confidence of exactly 0 in the first bin.
    """
    confidences = _finite_scores("confidences", confidences)
    correct = _flags("correct", correct)
    _same_length(confidences=confidences, correct=correct)
    outside = np.flatnonzero((confidences < 0) | (confidences > 1))
    if outside.size:
        raise InputError(f"confidences must lie in [0, 1]; index {outside[0]} does not",
                         value=float(confidences[outside[0]]))
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise InputError("n_bins must be a positive integer", value=n_bins)
    inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    bins = np.searchsorted(inner_edges, confidences, side="left")
    confidence_sum = np.bincount(bins, weights=confidences, minlength=n_bins)
    correct_sum = np.bincount(bins, weights=correct.astype(np.float64), minlength=n_bins)
    return float(np.abs(correct_sum - confidence_sum).sum() / len(confidences))


def calibrate_threshold(known_val_scores: Any, accept_rate: float = 0.95) -> float:
    """Open-score threshold that accepts at least ``accept_rate`` of the known val images.

    Returns the smallest value t among the scores with mean(scores <= t) >= accept_rate, so
    :func:`reject` with t keeps that fraction of these images. Ties at t are all accepted,
    so the accepted fraction can exceed ``accept_rate``. Pass known-only validation scores;
    never test data.
    """
    scores = _finite_scores("known_val_scores", known_val_scores)
    accept_rate = _positive_fraction("accept_rate", accept_rate)
    thresholds, accepted = _accepted_counts(scores, np.ones(len(scores), dtype=np.int64))
    return float(thresholds[int(np.argmax(accepted / len(scores) >= accept_rate))])
