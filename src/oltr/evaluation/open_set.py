"""Open-set figures of known test images plus open images (paper §4, Tab. 3 "open-set setting").

:func:`open_set_at_threshold` is the one place where open scores and a threshold become
open-set accuracies and an F-measure: the evaluation report (:func:`open_set_figures`, for the
run's rule, each detector and each external open set), the Fig. 8 curves
(:mod:`oltr.evaluation.analysis`) and the report page's summary (:mod:`oltr.evaluation.page`)
all call it. (The page's threshold-sweep figure computes the same F-measure and accuracy at
every observed score at once, vectorised: :func:`oltr.evaluation.plots.scores.threshold_sweep`;
a test holds it to this function at every threshold.)

Conventions as in :mod:`oltr.metrics`: open scores are *higher = more open*; an image is
rejected ("unknown", label −1) iff its score exceeds the threshold; a rejected known image is
an error and an accepted open image is an error.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from oltr import metrics


def open_set_at_threshold(
    known_predictions: np.ndarray, known_labels: np.ndarray, known_scores: np.ndarray,
    open_predictions: np.ndarray, open_scores: np.ndarray, threshold: float,
    train_counts: np.ndarray, group_kw: Mapping[str, Any],
) -> dict[str, Any]:
    """Open-set accuracies and F-measure of known + open images at one score ``threshold``.

    ``*_predictions`` are closed-set predictions (argmax of the decision logits) and
    ``*_scores`` open scores; ``open_*`` may be empty (the known-only case of Fig. 8c's zero
    open classes). Returns ``metrics.open_set_accuracy`` (``overall``, ``many`` / ``medium``
    / ``few`` with ``group_kw``'s shot rule, ``per_class``, ``counts``, the acceptance and
    rejection rates) followed by ``metrics.f_measure`` (``f_measure``, ``precision``,
    ``recall``, ``tp``, ``fp``, ``fn``) of the predictions after rejection.
    """
    predictions = np.concatenate([known_predictions, open_predictions])
    labels = np.concatenate([known_labels, np.full(len(open_predictions), metrics.OPEN_LABEL)])
    scores = np.concatenate([known_scores, open_scores])
    rejected = metrics.reject(predictions, scores, threshold)
    return {**metrics.open_set_accuracy(rejected, labels, train_counts, **group_kw),
            **metrics.f_measure(rejected, labels)}


def open_set_figures(
    known: dict[str, np.ndarray], opened: dict[str, np.ndarray], known_scores: np.ndarray,
    open_scores_: np.ndarray, threshold: float, train_counts: np.ndarray,
    group_kw: dict[str, Any],
) -> dict[str, Any]:
    """Open-set accuracies and F-measure at ``threshold`` (:func:`open_set_at_threshold`) and
    the threshold-free detection figures, for the known test outputs plus one open split's
    (``logits`` and ``labels`` per split; scores: higher = more open)."""
    known_predictions = known["logits"].argmax(axis=1)
    open_predictions = opened["logits"].argmax(axis=1)
    scores = np.concatenate([known_scores, open_scores_])
    labels = np.concatenate([known["labels"], np.full(len(open_scores_), metrics.OPEN_LABEL)])
    is_open = labels == metrics.OPEN_LABEL
    known_correct = (np.concatenate([known_predictions, open_predictions]) == labels) & ~is_open
    return {
        **open_set_at_threshold(known_predictions, known["labels"], known_scores,
                                open_predictions, open_scores_, threshold, train_counts,
                                group_kw),
        "auroc": metrics.auroc(scores, is_open),
        "fpr95": metrics.fpr_at_tpr(scores, is_open, 0.95),
        "aupr_open": metrics.aupr(scores, is_open, positive="open"),
        "aupr_known": metrics.aupr(scores, is_open, positive="known"),
        "oscr": metrics.oscr(scores, known_correct, is_open),
        "detection_error": metrics.detection_error(scores, is_open),
        "threshold": threshold,
        "num_known": int((~is_open).sum()),
        "num_open": int(is_open.sum()),
    }
