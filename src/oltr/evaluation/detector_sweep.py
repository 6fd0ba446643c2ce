"""The detector sweep: the open scores of every open-set detector of :mod:`oltr.detectors` on a
run's stored outputs (one forward pass serves them all; ``oltr evaluate --detector``,
``oltr bench``)."""
from __future__ import annotations

from typing import Any

import numpy as np

from oltr.detectors import create_detector
from oltr.detectors.head import network_head
from oltr.errors import InputError
from oltr.evaluation.run_outputs import RunOutputs, score_logits


def detector_scores(
    names: list[str], outputs: RunOutputs, splits: list[str],
    options: dict[str, dict[str, Any]] | None = None,
    inapplicable: dict[str, str] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Open scores of each detector in ``names`` on each of ``splits``; detectors that learn
    are fitted on the *train* split's outputs (features, logits, labels). Reachability uses
    the model's own memory where it has one, else class means of train features; ReAct, ASH,
    SCALE and ViM read the model's head.

    A detector that does not apply to this model (its fit or score raises
    :class:`~oltr.errors.InputError`, e.g. ASH on features that can be negative) raises, or —
    with a dict ``inapplicable`` — is left out of the result and its reason recorded there."""
    options = options or {}
    head = network_head(outputs.net) if outputs.net is not None else None
    scores: dict[str, dict[str, np.ndarray]] = {}
    for name in names:
        kwargs = dict(options.get(name, {}))
        if name == "reachability" and outputs.centroids is not None:
            kwargs.setdefault("centroids", outputs.centroids)
        detector = create_detector(name, **kwargs)
        try:
            if not detector.is_fitted:
                train = outputs.splits["train"]
                detector.fit(logits=score_logits(train), features=train["features"],
                             labels=train["labels"], head=head)
            scores[name] = {
                split: detector.score(
                    logits=outputs.splits[split].get("odin_logits",
                                                     score_logits(outputs.splits[split]))
                    if name == "odin" else score_logits(outputs.splits[split]),  # ODIN: perturbed
                    features=outputs.splits[split]["features"], head=head)
                for split in splits
            }
        except InputError as exc:
            if inapplicable is None:
                raise
            inapplicable[name] = str(exc)
    return scores
