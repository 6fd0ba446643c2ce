"""Open-set detectors with one interface: ``fit`` (where something is learned) then ``score``,
**higher = more likely open** (DESIGN.md §1). One file per detector, the paper and the score
formula in each docstring; they work on stored logits/features (one forward pass for all).

    detector = create_detector("openmax", tail_size=20)
    detector.fit(logits=train_logits, labels=train_labels)   # a no-op where nothing is learned
    open_score = detector.score(logits=test_logits)          # (N,) float64
"""
from __future__ import annotations

from typing import Any

from oltr.detectors.base import Detector, NotFittedError
from oltr.detectors.energy import Energy
from oltr.detectors.knn import KNN
from oltr.detectors.max_logit import MaxLogit
from oltr.detectors.msp import MSP
from oltr.detectors.odin import ODIN, odin_perturb
from oltr.detectors.openmax import OpenMax, fit_weibull_tail, openmax_probabilities
from oltr.detectors.reachability import Reachability
from oltr.errors import InputError

DETECTORS: dict[str, type[Detector]] = {
    detector.name: detector
    for detector in (MSP, MaxLogit, Energy, ODIN, OpenMax, Reachability, KNN)
}


def list_detectors() -> list[str]:
    """The registered detector names, e.g. for a benchmark matrix."""
    return list(DETECTORS)


def create_detector(name: str, **kwargs: Any) -> Detector:
    """The detector registered as ``name``, built with ``kwargs`` (its constructor's)."""
    if name not in DETECTORS:
        raise InputError(f"unknown detector (valid: {', '.join(DETECTORS)})", value=name)
    return DETECTORS[name](**kwargs)


__all__ = [
    "DETECTORS",
    "KNN",
    "MSP",
    "ODIN",
    "Detector",
    "Energy",
    "MaxLogit",
    "NotFittedError",
    "OpenMax",
    "Reachability",
    "create_detector",
    "fit_weibull_tail",
    "list_detectors",
    "odin_perturb",
    "openmax_probabilities",
]
