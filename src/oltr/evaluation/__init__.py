"""Evaluation: every protocol that turns a trained run into figures, and every form they take.

Protocols:

- :mod:`~oltr.evaluation.run_outputs` — one forward pass per split with the run's decision rule
  applied (``collect_run_outputs``): what every protocol below reads;
- :mod:`~oltr.evaluation.closed_open` — the closed- and open-set evaluation → ``report.json``
  (``evaluate_run``; paper Tab. 3), with :mod:`~oltr.evaluation.external_open_sets`
  (Tab. 2's far-away images) and :mod:`~oltr.evaluation.detector_sweep` (every open-set
  detector on the same outputs);
- :mod:`~oltr.evaluation.open_set` — the open-set figures at a threshold
  (``open_set_at_threshold``), used by the report, the Fig. 8 curves and the page;
- :mod:`~oltr.evaluation.analysis` — the further analysis of paper Fig. 8;
- :mod:`~oltr.evaluation.identification` — face identification by pseudo-shot group, as in the
  paper's Tab. 4 (MS1M-LT → MegaFace), and :mod:`~oltr.evaluation.identify_run`, which embeds
  a run's images for it.

Outputs: :mod:`~oltr.evaluation.terminal` (the printed tables),
:mod:`~oltr.evaluation.markdown` (``oltr bench``'s ``results.md``), :mod:`oltr.evaluation.plots`
(the PNG figures) and :mod:`~oltr.evaluation.html` with :mod:`~oltr.evaluation.page` (the
report page of ``oltr report``).

The identification protocol's names are importable from this package itself; every other
name from its module (``from oltr.evaluation.closed_open import evaluate_run``).
"""
from oltr.evaluation.attributes import read_attributes
from oltr.evaluation.identification import (
    DEFAULT_SHOT_GROUPS,
    DEFAULT_THRESHOLD,
    GALLERY_MODES,
    IdentificationProtocol,
    ShotGroup,
    evaluate_identification,
    identification_trials,
    pseudo_shot_counts,
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
