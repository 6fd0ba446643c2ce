"""Evaluation protocols beyond closed/open-set classification (``oltr.evaluate``): face
identification by pseudo-shot group, as in the paper's Tab. 4 (MS1M-LT → MegaFace)."""
from oltr.evaluation.identification import (
    DEFAULT_SHOT_GROUPS,
    DEFAULT_THRESHOLD,
    GALLERY_MODES,
    IdentificationProtocol,
    ShotGroup,
    evaluate_identification,
    identification_trials,
    pseudo_shot_counts,
    read_attributes,
    shot_groups,
)
from oltr.evaluation.vectors import Vectors, as_vectors, load_labels

__all__ = [
    "DEFAULT_SHOT_GROUPS",
    "DEFAULT_THRESHOLD",
    "GALLERY_MODES",
    "IdentificationProtocol",
    "ShotGroup",
    "Vectors",
    "as_vectors",
    "evaluate_identification",
    "identification_trials",
    "load_labels",
    "pseudo_shot_counts",
    "read_attributes",
    "shot_groups",
]
