"""``oltr report RUN --data DIR --out DIR``: a run's evaluation as a page you look at.

Runs the trained model once over the test (and open) split with its decision rule
(`oltr.evaluation.run_outputs.collect_run_outputs`), takes OLTR's meta-embeddings, hallucinator
coefficients and selector weights from its memory for the same images, and hands everything to
the renderer (`oltr.evaluation.html`): per-class accuracy against train frequency, open-score
histograms, the threshold sweep, the direct vs meta-embedding map (paper Fig. 3), the memory
concepts of a few test images (paper Fig. 7) and the tail/open confusion, on one
self-contained HTML page with its PNG figures.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from oltr import metrics
from oltr.data import load_benchmark
from oltr.data.images import load_image
from oltr.errors import InputError
from oltr.evaluation.html import ReportInputs, ReportTable, render_report
from oltr.evaluation.open_set import open_set_at_threshold
from oltr.evaluation.run_outputs import collect_run_outputs
from oltr.ownership import claim_directory

CONCEPT_IMAGES = 6


def _concept_images(test_labels: np.ndarray, predictions: np.ndarray, train_counts: np.ndarray,
                    count: int) -> np.ndarray:
    """Test images for the memory-concept figure: the rarest classes first, one right and one
    wrong where there are (the paper's Fig. 7 shows tail classes)."""
    order = np.argsort(train_counts, kind="stable")
    chosen: list[int] = []
    for label in order:
        members = np.flatnonzero(test_labels == label)
        right = members[predictions[members] == label]
        wrong = members[predictions[members] != label]
        chosen += [int(x) for x in (*right[:1], *wrong[:1])]
        if len(chosen) >= count:
            break
    return np.asarray(chosen[:count], dtype=np.int64)


def build_report(run_dir: str | Path, data_dir: str | Path, out_dir: str | Path, *,
                 device: str = "auto", max_points: int = 2000,
                 image_root: str | Path | None = None) -> Path:
    """Render the report page of ``run_dir`` evaluated on ``data_dir`` into ``out_dir``
    (created by oltr, or an earlier report of oltr's); returns the page's path.
    ``image_root`` replaces the run's ``data.image_root`` (images moved since training)."""
    out_dir = Path(out_dir).expanduser()
    claim_directory(out_dir, "report", what="report directory", reuse=True,
                    protect=(data_dir, run_dir))
    outputs = collect_run_outputs(run_dir, data_dir, ("test", "open"), device=device,
                                  image_root=image_root)
    rule, net = outputs.rule, outputs.net
    assert rule is not None and net is not None
    test, opened = outputs.splits["test"], outputs.splits.get("open")
    counts = outputs.train_counts
    closed_predictions = test["logits"].argmax(axis=1)
    meta = coefficients = selector = thumbnails = concept_labels = concept_predictions = None
    chosen = _concept_images(test["labels"], test["prediction"], counts, CONCEPT_IMAGES)
    if net.has_memory:
        with torch.no_grad():
            parts = net.memory_parts(torch.from_numpy(test["features"]).to(
                next(net.parameters()).device))
        meta = parts["meta"].float().cpu().numpy()
        if parts["coefficients"] is not None:
            coefficients = parts["coefficients"].float().cpu().numpy()[chosen]
            selector = (parts["selector"].float().cpu().numpy()[chosen]
                        if parts["selector"] is not None else np.ones((len(chosen), meta.shape[1])))
            stage_cfg = outputs.stage_cfg
            bench = load_benchmark(data_dir, image_root=image_root if image_root is not None
                                   else stage_cfg["data"]["image_root"],
                                   allow_outside_root=stage_cfg["data"]["allow_outside_root"])
            dataset = bench.dataset("test", mode="L" if stage_cfg["data"]["channels"] == 1
                                    else "RGB")
            thumbnails = np.stack([np.asarray(load_image(dataset.image_path(int(i)),
                                                         dataset.mode).resize((64, 64)))
                                   for i in chosen])
            concept_labels = test["labels"][chosen]
            concept_predictions = test["prediction"][chosen]
    group_kw = outputs.group_kw
    closed = metrics.closed_set_accuracy(closed_predictions, test["labels"], counts, **group_kw)
    summary_rows = [{"setting": "closed", **{k: _pct(closed[k]) for k in
                                             ("many", "medium", "few", "overall")}}]
    inputs = ReportInputs(
        class_names=outputs.info["class_names"], train_counts=counts,
        known_labels=test["labels"], known_closed_predictions=closed_predictions,
        known_predictions=test["prediction"], known_scores=test.get("open_score"),
        open_predictions=None if opened is None else opened["prediction"],
        open_scores=None if opened is None else opened.get("open_score"),
        threshold=rule.threshold, score_name=rule.open_score,
        features=test["features"], meta=meta, thumbnails=thumbnails,
        coefficients=coefficients, selector=selector, concept_labels=concept_labels,
        concept_predictions=concept_predictions, many_threshold=group_kw["many_threshold"],
        few_threshold=group_kw["few_threshold"], strict=group_kw["strict"])
    if opened is not None and rule.threshold is not None:  # a closed-set rule rejects nothing
        opened_figures = open_set_at_threshold(
            closed_predictions, test["labels"], test["open_score"],
            opened["logits"].argmax(axis=1), opened["open_score"], rule.threshold, counts,
            group_kw)
        summary_rows.append({"setting": "open", **{k: _pct(opened_figures[k]) for k in
                                                   ("many", "medium", "few", "overall")},
                             "F-measure": f"{opened_figures['f_measure']:.3f}"})
    text = [(f"Run {run_dir} on {data_dir}; weights of stage {outputs.info['stage']}, epoch "
            f"{outputs.info.get('epoch')} (sha256 {outputs.info['weights_sha256'][:12]}…)."),
            (f"Decision rule ({outputs.rule_source}): open score {rule.open_score}, "
            + ("closed-set (threshold null: no image is answered unknown)"
               if rule.threshold is None else f"threshold {rule.threshold:.4g}")
            + f", logit adjustment τ = {rule.logit_adjustment:g}, "
            f"τ-normalisation {rule.tau_normalization:g}.")]
    return render_report(out_dir, inputs, title=f"oltr report — {Path(run_dir).name}",
                         tables=[ReportTable("Accuracy (%) and F-measure", summary_rows)],
                         text=text)


def _pct(value: float | None) -> str:
    return metrics.percent_text(value) or "n/a"


__all__ = ["InputError", "build_report"]
