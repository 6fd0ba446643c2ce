"""The PNG figures of a run's evaluation, each a pure function of numpy arrays that writes one
file (no model, no data loaded here): :mod:`~oltr.evaluation.plots.classes` (per-class accuracy,
tail/open confusion), :mod:`~oltr.evaluation.plots.scores` (open-score histograms, threshold
sweep), :mod:`~oltr.evaluation.plots.embeddings` (feature maps, memory concepts),
:mod:`~oltr.evaluation.plots.curves` (the Fig. 8 curves) and what they share,
:mod:`~oltr.evaluation.plots.common`. :mod:`oltr.evaluation.html` puts them on a page."""
