"""Figures about open scores: their histograms for known test vs open images (2) and the open-set
figures against the threshold, swept over every observed score (3, cf. Fig. 8b)."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from oltr.evaluation.plots.common import (
    finite_threshold,
    new_figure,
    percent,
    plot_text,
    same_length,
    save_png,
    vector,
)

# --------------------------------------------------------------------------- 2. histograms


def score_bin_edges(scores: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Equal-width histogram bin edges covering ``scores`` (√n bins, 10 … 60), shifted so that
    ``threshold`` is an edge: with right-closed bins (:func:`_right_closed_bins`) every bin
    lies wholly on one side of the decision (accepted: score ≤ threshold). All scores equal:
    bins of width 0.1 (0.1·|score| when larger) around them."""
    low, high = float(scores.min()), float(scores.max())
    bins = int(np.clip(np.sqrt(len(scores)), 10, 60))
    width = (high - low) / bins if high > low else 0.1 * max(1.0, abs(low))
    anchor = low if threshold is None else threshold
    first = math.floor((low - anchor) / width) - (1 if low == anchor else 0)
    last = math.ceil((high - anchor) / width)
    if high == low:  # a few empty bins either side, for context
        first, last = first - 4, last + 5
    return anchor + width * np.arange(first, max(last, first + 1) + 1)


def _right_closed_bins(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index i of each score with edges[i] < score ≤ edges[i + 1]."""
    return np.clip(np.searchsorted(edges, scores, side="left") - 1, 0, len(edges) - 2)


def plot_open_score_histograms(
    path: str | os.PathLike[str],
    known_scores: Any,
    open_scores: Any | None = None,
    *,
    threshold: float | None = None,
    external: Mapping[str, Any] | None = None,
    score_name: str = "open score",
) -> Path:
    """Histograms of the open score (higher = more open) of the known test images, the open
    images and each external open set (``external``: name → scores), on shared bins.

    Each set is normalised to fractions of its own images (sets differ in size), drawn as a
    filled step histogram. The vertical line is the ``threshold`` (images above it are
    rejected as unknown); the legend gives, per set, its size and the share accepted (known)
    or rejected (open sets) there. ``open_scores`` None or empty: known images only. Raises
    ``InputError`` for non-finite scores or an empty known set.
    """
    known = vector("known_scores", known_scores)
    sets: list[tuple[str, np.ndarray, bool]] = [("known test", known, False)]
    if open_scores is not None:
        opened = vector("open_scores", open_scores, allow_empty=True)
        if opened.size:
            sets.append(("open", opened, True))
    for name, scores in (external or {}).items():
        values = vector(f"scores of open set '{name}'", scores, allow_empty=True)
        if values.size:
            sets.append((str(name), values, True))
    threshold = finite_threshold(threshold)
    everything = np.concatenate([scores for _, scores, _ in sets])
    if threshold is not None:
        everything = np.append(everything, threshold)
    edges = score_bin_edges(everything, threshold)
    figure = new_figure(8.0, 4.4)
    axis = figure.add_subplot()
    colors = ["tab:blue", "tab:red", "tab:green", "tab:purple", "tab:brown", "tab:pink",
              "tab:olive", "tab:cyan", "tab:gray"]
    for index, (name, scores, is_open) in enumerate(sets):
        color = colors[index % len(colors)]
        label = f"{plot_text(name, 40)} (n = {len(scores)}"
        if threshold is not None:
            rejected = float((scores > threshold).mean())
            label += (f", {percent(rejected)} rejected" if is_open
                      else f", {percent(1 - rejected)} accepted")
        fractions = np.bincount(_right_closed_bins(scores, edges),
                                minlength=len(edges) - 1) / len(scores)
        axis.stairs(fractions, edges, fill=True, alpha=0.3, color=color)
        axis.stairs(fractions, edges, linewidth=1.6, color=color, label=label + ")")
    if threshold is not None:
        axis.axvline(threshold, color="black", linestyle="--", linewidth=1.5,
                     label=f"threshold {threshold:.4g}")
        axis.text(threshold, 0.98, "accepted ← | → rejected ",
                  transform=axis.get_xaxis_transform(),
                  ha="center", va="top", fontsize="small",
                  bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})
    axis.set_xlabel(f"{plot_text(score_name, 60)} (higher = more open)")
    axis.set_ylabel("fraction of the set's images per bin")
    axis.set_ylim(0, axis.get_ylim()[1] * 1.12)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize="small", loc="upper left")
    title = "Open-score distributions: known test vs open images"
    if threshold is None:
        title += " (closed-set rule: no threshold)"
    figure.suptitle(title, fontsize="medium")
    return save_png(figure, path)


# --------------------------------------------------------------------------- 3. threshold


def threshold_sweep(
    known_scores: Any,
    known_correct: Any,
    open_scores: Any | None = None,
    thresholds: Any | None = None,
) -> dict[str, np.ndarray | None]:
    """Open-set figures at each threshold t, an image being rejected iff its score > t.

    ``known_scores`` (N,) and ``known_correct`` (N,) bool (closed-set prediction right) of the
    known test images; ``open_scores`` (M,) of the open images (None/empty: none).
    ``thresholds`` default to every distinct observed score (ascending), the points where an
    outcome changes. Returns arrays aligned with ``threshold``: ``f_measure``, ``precision``,
    ``recall`` (paper §D.4, as ``metrics.f_measure``: TP = known accepted and correct, FP =
    the other known images, FN = open images accepted), ``overall`` (open-set accuracy over
    all images, as ``metrics.open_set_accuracy``), ``known_acceptance_rate`` and
    ``open_rejection_rate`` (None without open images). Vectorised: O((N + M) log(N + M)).
    """
    known = vector("known_scores", known_scores)
    correct = vector("known_correct", known_correct, kind="bool")
    same_length(known_scores=known, known_correct=correct)
    opened = (np.zeros(0) if open_scores is None
              else vector("open_scores", open_scores, allow_empty=True))
    if thresholds is None:
        grid = np.unique(np.concatenate([known, opened]))
    else:
        grid = vector("thresholds", thresholds)
    n_known, n_open = len(known), len(opened)
    accepted_known = np.searchsorted(np.sort(known), grid, side="right")
    tp = np.searchsorted(np.sort(known[correct]), grid, side="right")
    fn = np.searchsorted(np.sort(opened), grid, side="right")
    precision = tp / n_known
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        f = np.where(precision + recall > 0,
                     2 * precision * recall / np.where(precision + recall > 0,
                                                      precision + recall, 1), 0.0)
    return {
        "threshold": grid.astype(np.float64),
        "f_measure": f,
        "precision": precision,
        "recall": recall,
        "overall": (tp + (n_open - fn)) / (n_known + n_open),
        "known_acceptance_rate": accepted_known / n_known,
        "open_rejection_rate": (n_open - fn) / n_open if n_open else None,
    }


def plot_threshold_sweep(
    path: str | os.PathLike[str],
    known_scores: Any,
    known_correct: Any,
    open_scores: Any | None = None,
    *,
    threshold: float | None = None,
    score_name: str = "open score",
) -> Path:
    """Open-set F-measure, open-set overall accuracy (left) and known acceptance / open
    rejection rates (right) against the threshold, swept over every observed score
    (:func:`threshold_sweep`; step curves, as each is constant between observed scores; the
    left end rejects everything). The chosen ``threshold`` is a vertical line with its values
    in the legend; a grey marker shows the F-measure's maximum on these test images (an oracle,
    for reference only: thresholds are chosen on val). Without open images the right panel
    shows the known acceptance rate only.
    """
    sweep = threshold_sweep(known_scores, known_correct, open_scores)
    grid = sweep["threshold"]
    chosen = finite_threshold(threshold)
    low, high = float(grid[0]), float(grid[-1])
    if chosen is not None:
        low, high = min(low, chosen), max(high, chosen)
    pad = 0.05 * (high - low) if high > low else 0.5
    # the "reject everything" state left of the smallest score, the last state to the right
    x = np.concatenate([[low - pad], grid, [high + pad]])
    known = vector("known_scores", known_scores)
    n_open = 0 if open_scores is None else len(np.asarray(open_scores))
    reject_all = {"f_measure": 0.0, "overall": n_open / (len(known) + n_open),
                  "known_acceptance_rate": 0.0, "open_rejection_rate": 1.0}

    def curve(key: str) -> np.ndarray:
        values = sweep[key]
        assert values is not None
        return np.concatenate([[reject_all[key]], values, [values[-1]]])

    at = None if chosen is None else threshold_sweep(known_scores, known_correct, open_scores,
                                                     [chosen])
    figure = new_figure(10.0, 4.8)
    left, right = figure.subplots(1, 2, sharex=True)
    panels = [(left, [("f_measure", "open-set F-measure", "tab:green"),
                      ("overall", "open-set overall accuracy", "tab:blue")]),
              (right, [("known_acceptance_rate", "known test images accepted", "tab:blue"),
                       ("open_rejection_rate", "open images rejected", "tab:red")])]
    for axis, lines in panels:
        for key, label, color in lines:
            if sweep[key] is None:
                continue
            if at is not None:
                label += f" (at threshold: {float(at[key][0]):.3f})"  # type: ignore[index]
            axis.plot(x, curve(key), drawstyle="steps-post", color=color, linewidth=1.6,
                      label=label)
        if chosen is not None:
            axis.axvline(chosen, color="black", linestyle="--", linewidth=1.3,
                         label=f"chosen threshold {chosen:.4g}")
        axis.set_ylim(-0.02, 1.08)
        axis.set_xlim(x[0], x[-1])
        axis.set_xlabel(f"threshold on the {plot_text(score_name, 40)} (reject if score > t)")
        axis.grid(True, alpha=0.3)
    f_values = np.asarray(sweep["f_measure"])
    best = int(np.argmax(f_values))
    left.plot(grid[best], f_values[best], "o", color="0.45", markersize=6,
              label=f"max F on test (oracle) {f_values[best]:.3f}")
    left.set_ylabel("F-measure / accuracy (0–1)")
    right.set_ylabel("rate (0–1)")
    for axis in (left, right):  # below the panel: inside, it would hide the curves
        axis.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.16),
                    ncols=2, frameon=False)
    if n_open == 0:
        right.set_title("no open images: known acceptance only", fontsize="small")
    figure.suptitle("Open-set figures against the threshold (swept over the observed scores)",
                    fontsize="medium")
    return save_png(figure, path)
