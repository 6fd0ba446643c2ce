"""The report you look at (``oltr report``): PNG figures of one trained run and a self-contained
HTML page that shows them with their captions and summary tables.

Every function here is pure: it takes numpy arrays (a run's outputs, gathered by the caller),
writes one file and returns its path; none loads a model or data. The figures:

1. :func:`plot_per_class_accuracy` — per-class closed-set and open-set accuracy against the
   train-set frequency, classes ordered head to tail, many/medium/few boundaries (paper §4,
   shot groups; cf. Fig. 1);
2. :func:`plot_open_score_histograms` — open-score histograms of known test vs open images
   (and external open sets) with the threshold;
3. :func:`plot_threshold_sweep` — open-set F-measure (paper §D.4), open-set overall accuracy,
   known acceptance and open rejection rates against the threshold (:func:`threshold_sweep`),
   the chosen threshold marked (cf. Fig. 8b);
4. :func:`plot_embeddings` — 2-D t-SNE (or UMAP) of direct features vs meta-embeddings of the
   same images (paper Fig. 3);
5. :func:`plot_memory_concepts` — per test image, the memory concepts that contributed most:
   the top-k hallucinator coefficients o (Eq. 1) and the concept selector e (Eq. 4) (Fig. 7);
6. :func:`plot_tail_open_confusion` — where tail-class test images and open images end up
   (:func:`tail_open_confusion`).

:func:`write_report_page` writes ``index.html`` (figures linked by relative paths, inline CSS,
no script, nothing fetched from the network; every text is HTML-escaped);
:func:`render_report` draws every figure the given arrays allow and writes the page.

Conventions as in :mod:`oltr.metrics`: open scores are *higher = more open*; an image is
rejected ("unknown", label −1) iff its score exceeds the threshold. Matplotlib draws on an Agg
canvas through :class:`matplotlib.figure.Figure` (no pyplot, no global state); ``$`` in class
names is escaped so that matplotlib never reads a name as mathtext.
"""
from __future__ import annotations

import html
import io
import math
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from oltr import metrics
from oltr.errors import InputError
from oltr.io import atomic_write_bytes, atomic_write_text
from oltr.ownership import marker_kind

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: File names :func:`render_report` gives the figures (inside its output directory).
FIGURE_FILES = {
    "per_class": "per_class_accuracy.png",
    "histograms": "open_score_histograms.png",
    "threshold": "threshold_sweep.png",
    "embeddings": "embeddings.png",
    "concepts": "memory_concepts.png",
    "confusion": "tail_open_confusion.png",
}
PAGE_FILE = "index.html"
DPI = 110
#: At most this many points go into the 2-D embedding (a seeded random subsample).
MAX_EMBEDDING_POINTS = 2000
#: Above this many classes the per-class plot draws steps instead of bars and no class names.
MAX_BARS = 60
MAX_NAMED_CLASSES = 30
GROUP_COLORS = {"many": "#dbe9f6", "medium": "#fdf0d5", "few": "#f9dcdc"}
GROUP_MARKERS = {"many": "o", "medium": "^", "few": "*"}


# --------------------------------------------------------------------------- input checks


def _vector(name: str, values: Any, *, kind: str = "real", allow_empty: bool = False,
            allow_nan: bool = False) -> np.ndarray:
    """A checked 1-D array: ``kind`` "real" (float64, finite unless ``allow_nan``), "int"
    (int64) or "bool"."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        if not allow_empty:
            raise InputError(f"{name} is empty")
        return array.astype(np.int64 if kind == "int" else bool if kind == "bool" else float)
    if kind == "int":
        if not np.issubdtype(array.dtype, np.integer):
            raise InputError(f"{name} must hold integers, got dtype {array.dtype}")
        return array.astype(np.int64, copy=False)
    if kind == "bool":
        if array.dtype == np.bool_:
            return array
        if np.issubdtype(array.dtype, np.integer) and np.isin(array, (0, 1)).all():
            return array.astype(bool)
        raise InputError(f"{name} must be boolean (or 0/1), got dtype {array.dtype}")
    if array.dtype == object:  # e.g. a metrics report's per_class list with None
        array = np.array([np.nan if v is None else v for v in array], dtype=float)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
            or array.dtype == np.bool_):
        raise InputError(f"{name} must hold real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    bad = np.flatnonzero(np.isinf(array) if allow_nan else ~np.isfinite(array))
    if bad.size:
        raise InputError(f"{name} must be finite; index {bad[0]} is not",
                         value=float(array[bad[0]]))
    return array


def _matrix(name: str, values: Any, rows: int | None = None,
            columns: int | None = None) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 2:
        raise InputError(f"{name} must be 2-D (N, d), got shape {array.shape}")
    if rows is not None and array.shape[0] != rows:
        raise InputError(f"{name} must have {rows} rows, got {array.shape[0]}",
                         value=tuple(array.shape))
    if columns is not None and array.shape[1] != columns:
        raise InputError(f"{name} must have {columns} columns, got {array.shape[1]}",
                         value=tuple(array.shape))
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"{name} must hold real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    if array.size and not np.isfinite(array).all():
        row = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise InputError(f"{name} must be finite; row {row} is not")
    return array


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise InputError(f"class_names must give one name per class ({num_classes}), "
                         f"got {len(names)}")
    return names


def _labels_in_range(name: str, array: np.ndarray, num_classes: int, *,
                     allow_unknown: bool) -> None:
    low = metrics.OPEN_LABEL if allow_unknown else 0
    bad = np.flatnonzero((array < low) | (array >= num_classes))
    if bad.size:
        raise InputError(f"{name} must lie in [{low}, {num_classes - 1}]; index {bad[0]} "
                         "is not", value=int(array[bad[0]]))


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name}={length}" for name, length in lengths.items())
        raise InputError(f"inputs must have the same length, got {described}")


def _threshold(threshold: float | None) -> float | None:
    if threshold is None:
        return None
    value = float(threshold)
    if not math.isfinite(value):
        raise InputError("threshold must be finite", value=threshold)
    return value


# --------------------------------------------------------------------------- drawing helpers


def _text(text: Any, limit: int | None = None) -> str:
    """Data text for matplotlib: shortened to ``limit`` characters, ``$`` escaped (mathtext)."""
    text = str(text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(figure: Figure, path: str | os.PathLike[str]) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _percent(value: float | None) -> str:
    text = metrics.percent_text(value)
    return "–" if text is None else f"{text} %"


def _head_to_tail(train_counts: np.ndarray) -> np.ndarray:
    """Class indices by decreasing train count (ties: by index)."""
    return np.argsort(-train_counts, kind="stable")


def _groups(train_counts: np.ndarray, many_threshold: int, few_threshold: int,
            strict: bool) -> np.ndarray:
    return metrics.shot_groups(train_counts, many_threshold, few_threshold, strict)


def _rule_text(many_threshold: int, few_threshold: int, strict: bool) -> str:
    if strict:
        return f"many > {many_threshold}, few < {few_threshold} train images"
    return f"many ≥ {many_threshold}, few ≤ {few_threshold} train images"


# --------------------------------------------------------------------------- 1. per class


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred mean over ``window`` neighbours, ignoring NaN (NaN where all are NaN)."""
    present = np.isfinite(values)
    kernel = np.ones(window)
    sums = np.convolve(np.where(present, values, 0.0), kernel, mode="same")
    numbers = np.convolve(present.astype(float), kernel, mode="same")
    return np.divide(sums, numbers, out=np.full(len(values), np.nan), where=numbers > 0)


def plot_per_class_accuracy(
    path: str | os.PathLike[str],
    train_counts: Any,
    closed_accuracy: Any,
    open_accuracy: Any | None = None,
    *,
    class_names: Sequence[str] | None = None,
    many_threshold: int = 100,
    few_threshold: int = 20,
    strict: bool = True,
) -> Path:
    """Per-class accuracy against train-set frequency, classes ordered head to tail.

    ``train_counts`` (K,) train images per class; ``closed_accuracy`` (K,) closed-set top-1
    accuracy per class and ``open_accuracy`` (K,) the same with rejection applied (a rejected
    known image is an error) — fractions in [0, 1], NaN or None for a class without test
    images (``metrics.closed_set_accuracy(...)["per_class"]`` as is). Bars (steps above
    :data:`MAX_BARS` classes) on the left axis in %, train images per class on a log-scale
    right axis; shaded many/medium/few spans with their boundaries (``metrics.shot_groups``
    with the given rule) and the group means (dotted: closed, dashed: open — the report's
    ``closed.many`` … figures). Class names label the x axis up to :data:`MAX_NAMED_CLASSES`
    classes. Raises ``InputError`` for mismatched lengths or non-finite counts.
    """
    counts = _vector("train_counts", train_counts, kind="int")
    k = len(counts)
    closed = _vector("closed_accuracy", closed_accuracy, allow_nan=True)
    opened = (None if open_accuracy is None
              else _vector("open_accuracy", open_accuracy, allow_nan=True))
    _same_length(train_counts=counts, closed_accuracy=closed,
                 **({} if opened is None else {"open_accuracy": opened}))
    for name, values in (("closed_accuracy", closed), ("open_accuracy", opened)):
        if values is not None and ((values < 0) | (values > 1)).any():
            raise InputError(f"{name} must hold fractions in [0, 1]",
                             value=float(values[(values < 0) | (values > 1)][0]))
    names = _class_names(class_names, k)
    groups = _groups(counts, many_threshold, few_threshold, strict)
    order = _head_to_tail(counts)
    counts, closed, groups = counts[order], closed[order], groups[order]
    opened = None if opened is None else opened[order]
    x = np.arange(k)

    figure = _new_figure(min(12.0, 8.5 + 0.1 * min(k, MAX_BARS)),
                         4.6 + (0.8 if k <= MAX_NAMED_CLASSES else 0))
    axis = figure.add_subplot()
    spans: list[tuple[str, int, int]] = []  # (group, first, last) runs in head→tail order
    for i, group in enumerate(groups):
        if spans and spans[-1][0] == group:
            spans[-1] = (group, spans[-1][1], i)
        else:
            spans.append((group, i, i))
    for group, first, last in spans:
        axis.axvspan(first - 0.5, last + 0.5, color=GROUP_COLORS[group], zorder=0, linewidth=0)
        if first > 0:
            axis.axvline(first - 0.5, color="0.3", linestyle="--", linewidth=1, zorder=1)
        members = slice(first, last + 1)
        closed_mean = np.nanmean(closed[members]) if np.isfinite(closed[members]).any() else None
        label = f"{group}\n{last - first + 1} class{'es' if last > first else ''}"
        if closed_mean is not None:
            label += f"\nclosed {_percent(closed_mean)}"
            axis.hlines(100 * closed_mean, first - 0.5, last + 0.5, colors="tab:blue",
                        linestyles=":", linewidth=2, zorder=4)
        if opened is not None and np.isfinite(opened[members]).any():
            open_mean = float(np.nanmean(opened[members]))
            label += f"\nopen {_percent(open_mean)}"
            axis.hlines(100 * open_mean, first - 0.5, last + 0.5, colors="tab:orange",
                        linestyles="--", linewidth=2, zorder=4)
        centre = ((first + last) / 2 + 0.5) / k  # in axes fraction; keep labels above the axes
        where, align = ((first - 0.5, "left") if centre < 0.08 else
                        (last + 0.5, "right") if centre > 0.92 else ((first + last) / 2, "center"))
        axis.text(where, 1.0, label, transform=axis.get_xaxis_transform(), ha=align,
                  va="bottom", fontsize="small", clip_on=False)
    if k <= MAX_BARS:
        width = 0.8 if opened is None else 0.4
        shift = 0.0 if opened is None else -0.2
        axis.bar(x + shift, 100 * np.nan_to_num(closed), width=width, color="tab:blue",
                 label="closed-set accuracy", zorder=2)
        if opened is not None:
            axis.bar(x + 0.2, 100 * np.nan_to_num(opened), width=width, color="tab:orange",
                     label="open-set accuracy (rejected = error)", zorder=2)
        untested = ~np.isfinite(closed)
        if untested.any():
            axis.plot(x[untested], np.full(untested.sum(), 2.0), "x", color="tab:red",
                      label="no test image", zorder=5)
    else:  # per-class values are noisy at this scale: light steps and a moving average
        edges = np.arange(k + 1) - 0.5
        window = max(5, k // 25)
        axis.stairs(100 * closed, edges, fill=True, color="tab:blue", alpha=0.35,
                    label="closed-set accuracy", zorder=2)
        axis.plot(x, 100 * _moving_average(closed, window), color="navy", linewidth=2,
                  label=f"closed, moving average of {window} classes", zorder=3)
        if opened is not None:
            axis.stairs(100 * opened, edges, color="tab:orange", linewidth=0.6, alpha=0.6,
                        label="open-set accuracy (rejected = error)", zorder=2)
            axis.plot(x, 100 * _moving_average(opened, window), color="saddlebrown",
                      linewidth=2, label=f"open, moving average of {window} classes",
                      zorder=3)
    axis.set_xlim(-0.5, k - 0.5)
    axis.set_ylim(0, 105)
    axis.set_ylabel("test accuracy per class (%)")
    if k <= MAX_NAMED_CLASSES:
        axis.set_xticks(x, [_text(names[i], 18) for i in order], rotation=50, ha="right",
                        fontsize="small" if k > 12 else "medium", rotation_mode="anchor")
        axis.set_xlabel("classes, by train images (head → tail)")
    else:
        axis.set_xlabel("class rank by train images (0 = most frequent; head → tail)")
    twin = axis.twinx()
    shown_counts = np.where(counts > 0, counts, np.nan).astype(float)
    twin.plot(x, shown_counts, color="black", linewidth=1.5,
              marker="o" if k <= MAX_BARS else None, markersize=3,
              drawstyle="default" if k <= MAX_BARS else "steps-mid", label="train images")
    twin.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 6, not 6×10⁰
    twin.yaxis.set_major_formatter(plain)
    twin.yaxis.set_minor_formatter(FuncFormatter(
        lambda value, _: f"{value:g}" if str(f"{value:g}")[0] in "25" else ""))
    twin.set_ylabel("train images per class (log scale)")
    if np.isfinite(shown_counts).any():
        low, high = np.nanmin(shown_counts), np.nanmax(shown_counts)
        twin.set_ylim(low / 2, high * 2)
    handles, labels = axis.get_legend_handles_labels()
    twin_handles, twin_labels = twin.get_legend_handles_labels()
    from matplotlib.lines import Line2D

    extra = [Line2D([], [], color="0.3", linestyle=":", linewidth=2)]
    figure.legend(handles + twin_handles + extra,
                  labels + twin_labels + ["group mean (dotted closed, dashed open)"],
                  loc="outside lower center", ncols=3, fontsize="small", frameon=False)
    figure.suptitle(f"Per-class accuracy vs train-set frequency ({k} class"
                    f"{'es' if k > 1 else ''}; shot groups: "
                    f"{_rule_text(many_threshold, few_threshold, strict)})", fontsize="medium")
    return _save(figure, path)


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
    known = _vector("known_scores", known_scores)
    sets: list[tuple[str, np.ndarray, bool]] = [("known test", known, False)]
    if open_scores is not None:
        opened = _vector("open_scores", open_scores, allow_empty=True)
        if opened.size:
            sets.append(("open", opened, True))
    for name, scores in (external or {}).items():
        values = _vector(f"scores of open set '{name}'", scores, allow_empty=True)
        if values.size:
            sets.append((str(name), values, True))
    threshold = _threshold(threshold)
    everything = np.concatenate([scores for _, scores, _ in sets])
    if threshold is not None:
        everything = np.append(everything, threshold)
    edges = score_bin_edges(everything, threshold)
    figure = _new_figure(8.0, 4.4)
    axis = figure.add_subplot()
    colors = ["tab:blue", "tab:red", "tab:green", "tab:purple", "tab:brown", "tab:pink",
              "tab:olive", "tab:cyan", "tab:gray"]
    for index, (name, scores, is_open) in enumerate(sets):
        color = colors[index % len(colors)]
        label = f"{_text(name, 40)} (n = {len(scores)}"
        if threshold is not None:
            rejected = float((scores > threshold).mean())
            label += (f", {_percent(rejected)} rejected" if is_open
                      else f", {_percent(1 - rejected)} accepted")
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
    axis.set_xlabel(f"{_text(score_name, 60)} (higher = more open)")
    axis.set_ylabel("fraction of the set's images per bin")
    axis.set_ylim(0, axis.get_ylim()[1] * 1.12)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize="small", loc="upper left")
    title = "Open-score distributions: known test vs open images"
    if threshold is None:
        title += " (closed-set rule: no threshold)"
    figure.suptitle(title, fontsize="medium")
    return _save(figure, path)


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
    known = _vector("known_scores", known_scores)
    correct = _vector("known_correct", known_correct, kind="bool")
    _same_length(known_scores=known, known_correct=correct)
    opened = (np.zeros(0) if open_scores is None
              else _vector("open_scores", open_scores, allow_empty=True))
    if thresholds is None:
        grid = np.unique(np.concatenate([known, opened]))
    else:
        grid = _vector("thresholds", thresholds)
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
    chosen = _threshold(threshold)
    low, high = float(grid[0]), float(grid[-1])
    if chosen is not None:
        low, high = min(low, chosen), max(high, chosen)
    pad = 0.05 * (high - low) if high > low else 0.5
    # the "reject everything" state left of the smallest score, the last state to the right
    x = np.concatenate([[low - pad], grid, [high + pad]])
    known = _vector("known_scores", known_scores)
    n_open = 0 if open_scores is None else len(np.asarray(open_scores))
    reject_all = {"f_measure": 0.0, "overall": n_open / (len(known) + n_open),
                  "known_acceptance_rate": 0.0, "open_rejection_rate": 1.0}

    def curve(key: str) -> np.ndarray:
        values = sweep[key]
        assert values is not None
        return np.concatenate([[reject_all[key]], values, [values[-1]]])

    at = None if chosen is None else threshold_sweep(known_scores, known_correct, open_scores,
                                                     [chosen])
    figure = _new_figure(10.0, 4.8)
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
        axis.set_xlabel(f"threshold on the {_text(score_name, 40)} (reject if score > t)")
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
    return _save(figure, path)


# --------------------------------------------------------------------------- 4. embeddings


def embed_2d(vectors: Any, *, seed: int = 0, method: str = "auto") -> tuple[np.ndarray, str]:
    """2-D embedding of ``vectors`` (N, d) → ((N, 2), name of the method used).

    ``method``: ``"umap"`` (the ``umap-learn`` package, ``UMAP(random_state=seed)``),
    ``"tsne"`` (scikit-learn's ``TSNE``, seeded, PCA-initialised, after ``PCA`` to 50
    dimensions where d > 50; perplexity min(30, (N − 1)/3)), or ``"auto"``: UMAP where
    ``umap`` is installed, else t-SNE. Fewer than 5 points, or a single distinct vector:
    PCA (padded with zeros) — t-SNE needs more. Raises ``InputError`` for an unknown method
    or when scikit-learn is missing.
    """
    x = _matrix("vectors", vectors)
    n, d = x.shape
    if method not in ("auto", "umap", "tsne"):
        raise InputError("embedding method must be auto, umap or tsne", value=method)
    if n == 0:
        raise InputError("nothing to embed: no vector")
    try:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
    except ImportError:  # pragma: no cover - scikit-learn is a dev dependency
        raise InputError("the embedding plot needs scikit-learn (pip install scikit-learn)") \
            from None
    centred = x - x.mean(axis=0)
    if n < 5 or not np.any(np.abs(centred) > 1e-12 * (1 + np.abs(x).max())):
        out = np.zeros((n, 2))
        if n > 1 and d > 0 and np.abs(centred).max() > 0:
            parts = min(2, n, d)
            out[:, :parts] = PCA(n_components=parts, random_state=seed).fit_transform(x)
        return out, "PCA"
    if method in ("auto", "umap"):
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            if method == "umap":
                raise InputError("method 'umap' needs the umap-learn package") from None
        else:
            reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed)
            return np.asarray(reducer.fit_transform(x), dtype=np.float64), "UMAP"
    if d > 50:
        x = PCA(n_components=min(50, n), random_state=seed).fit_transform(x)
    tsne = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca",
                learning_rate="auto", random_state=seed)
    return np.asarray(tsne.fit_transform(x), dtype=np.float64), "t-SNE"


def plot_embeddings(
    path: str | os.PathLike[str],
    features: Any,
    labels: Any,
    meta: Any | None = None,
    *,
    train_counts: Any | None = None,
    class_names: Sequence[str] | None = None,
    max_points: int = MAX_EMBEDDING_POINTS,
    seed: int = 0,
    method: str = "auto",
    many_threshold: int = 100,
    few_threshold: int = 20,
    strict: bool = True,
) -> Path:
    """Paper Fig. 3: 2-D embedding (:func:`embed_2d`) of the direct features v_direct (N, d)
    and, beside it, of the meta-embeddings v_meta (N, d) of the same images (rows aligned with
    ``labels`` (N,)); for a model without meta-embedding (``meta`` None) the direct panel only.

    At most ``max_points`` images, a seeded random subsample, the same in both panels. Colour
    = class (a legend of names up to 10 classes; beyond, a colour bar of the class's train
    frequency rank, 0 = head); marker = shot group from ``train_counts`` (K,) (○ many, △
    medium, ★ few, drawn on top with a black edge), all ○ without counts (K is then the
    number of ``class_names``, else the largest label + 1). Raises
    ``InputError`` for mismatched shapes or labels outside ``0 … K − 1``.
    """
    direct = _matrix("features", features)
    labels = _vector("labels", labels, kind="int")
    _same_length(features=direct, labels=labels)
    panels = [("direct features v_direct", direct)]
    if meta is not None:
        panels.append(("meta-embeddings v_meta", _matrix("meta", meta, rows=len(direct))))
    if train_counts is not None:
        counts = _vector("train_counts", train_counts, kind="int")
        k = len(counts)
        groups = _groups(counts, many_threshold, few_threshold, strict)
        rank = np.empty(k, dtype=np.int64)
        rank[_head_to_tail(counts)] = np.arange(k)
    else:
        k = len(class_names) if class_names is not None else int(labels.max()) + 1
        groups = np.full(k, "many", dtype="<U6")
        rank = np.arange(k)
    _labels_in_range("labels", labels, k, allow_unknown=False)
    names = _class_names(class_names, k)
    if max_points < 1:
        raise InputError("max_points must be >= 1", value=max_points)
    rng = np.random.Generator(np.random.PCG64(seed))
    chosen = (np.sort(rng.choice(len(labels), size=max_points, replace=False))
              if len(labels) > max_points else np.arange(len(labels)))
    labels = labels[chosen]
    present = np.unique(labels)
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    if len(present) <= 10:
        palette = colormaps["tab10"]
        colour_of = {int(c): palette(i) for i, c in enumerate(present)}
        colours = np.array([colour_of[int(c)] for c in labels])
        scalar = None
    else:
        norm = Normalize(0, max(k - 1, 1))
        scalar = (colormaps["viridis"], norm)
        colours = colormaps["viridis"](norm(rank[labels]))
    figure = _new_figure(5.2 * len(panels) + 1.6, 5.0)
    axes = figure.subplots(1, len(panels), squeeze=False).ravel()
    used = ""
    for axis, (title, vectors) in zip(axes, panels):
        points, used = embed_2d(vectors[chosen], seed=seed, method=method)
        for group in ("many", "medium", "few"):
            members = groups[labels] == group
            if not members.any():
                continue
            axis.scatter(points[members, 0], points[members, 1], c=colours[members],
                         marker=GROUP_MARKERS[group], s=40 if group == "few" else 14,
                         linewidths=0.4 if group == "few" else 0,
                         edgecolors="black" if group == "few" else "none",
                         alpha=0.9, zorder=3 if group == "few" else 2)
        axis.set_title(f"{title} ({used})", fontsize="medium")
        axis.set_xticks([])
        axis.set_yticks([])
    handles, texts = [], []
    if scalar is None:
        for c in present:
            handles.append(Line2D([], [], marker="s", linestyle="", color=colour_of[int(c)]))
            texts.append(_text(names[int(c)], 24))
    if train_counts is not None:
        for group in ("many", "medium", "few"):
            if (groups[labels] == group).any():
                handles.append(Line2D([], [], marker=GROUP_MARKERS[group], linestyle="",
                                      color="0.4", markeredgecolor="black" if group == "few"
                                      else "0.4"))
                texts.append(f"{group}-shot classes")
    if handles:
        figure.legend(handles, texts, loc="outside right center", fontsize="small",
                      frameon=False)
    if scalar is not None:
        from matplotlib.cm import ScalarMappable

        bar = figure.colorbar(ScalarMappable(norm=scalar[1], cmap=scalar[0]), ax=list(axes),
                              location="right", shrink=0.8)
        bar.set_label("class rank by train images (0 = head)" if train_counts is not None
                      else "class index")
    figure.suptitle(f"2-D {used} embedding of {len(chosen)} test images"
                    + (f" (random subsample of {len(direct)})" if len(chosen) < len(direct)
                       else "") + ", coloured by class", fontsize="medium")
    return _save(figure, path)


# --------------------------------------------------------------------------- 5. concepts


def plot_memory_concepts(
    path: str | os.PathLike[str],
    thumbnails: Any,
    coefficients: Any,
    selector: Any,
    class_names: Sequence[str],
    *,
    labels: Any | None = None,
    predictions: Any | None = None,
    top_k: int = 3,
) -> Path:
    """Paper Fig. 7: for each of a few test images, the memory concepts that contributed most.

    ``thumbnails`` uint8 (n, H, W) or (n, H, W, 3); ``coefficients`` (n, K) the hallucinator's
    o = softmax(T_hal(v_direct)) (Eq. 1: v_memory = Σ o_i c_i, so o_i is the weight of class
    i's centroid); ``selector`` (n, d) the concept selector e = tanh(T_sel(v_direct)) (Eq. 4,
    the weight of v_memory per dimension). One row per image: the thumbnail (titled with its
    true class and prediction, −1 = "unknown", where given), a bar of its ``top_k`` largest
    o_i with their class names, and e over the d dimensions (in dimension order, so rows
    compare) with mean |e| and the share of dimensions where e > 0.
    """
    images = np.asarray(thumbnails)
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4
                                                              and images.shape[3] == 3)):
        raise InputError("thumbnails must be uint8 (n, H, W) or (n, H, W, 3)",
                         value=(str(images.dtype), tuple(images.shape)))
    n = len(images)
    if n == 0:
        raise InputError("no thumbnail given")
    o = _matrix("coefficients", coefficients, rows=n)
    e = _matrix("selector", selector, rows=n)
    k = o.shape[1]
    names = _class_names(class_names, k)
    if top_k < 1:
        raise InputError("top_k must be >= 1", value=top_k)
    top_k = min(top_k, k)
    truth = None if labels is None else _vector("labels", labels, kind="int")
    guess = None if predictions is None else _vector("predictions", predictions, kind="int")
    for name, values in (("labels", truth), ("predictions", guess)):
        if values is not None:
            _same_length(thumbnails=images, **{name: values})
            _labels_in_range(name, values, k, allow_unknown=name == "predictions")

    def named(c: int) -> str:
        return "unknown" if c == metrics.OPEN_LABEL else _text(names[c], 20)

    tops = np.argsort(-o, axis=1, kind="stable")[:, :top_k]
    largest = float(np.take_along_axis(o, tops, axis=1).max())
    o_limit = min(1.0, largest * 1.25) if largest > 0 else 1.0  # shared: rows compare
    figure = _new_figure(10.0, 0.4 + 1.45 * n)
    grid = figure.add_gridspec(n, 3, width_ratios=[1.0, 3.2, 3.6])
    d = e.shape[1]
    for row in range(n):
        image_axis = figure.add_subplot(grid[row, 0])
        image = images[row]
        image_axis.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255,
                          interpolation="nearest")
        image_axis.set_xticks([])
        image_axis.set_yticks([])
        caption = []
        if truth is not None:
            caption.append(f"true: {named(int(truth[row]))}")
        if guess is not None:
            caption.append(f"pred: {named(int(guess[row]))}")
        if truth is not None and guess is not None:
            ok = truth[row] == guess[row]
            for spine in image_axis.spines.values():
                spine.set_edgecolor("tab:green" if ok else "tab:red")
                spine.set_linewidth(2.5)
        image_axis.set_title("\n".join(caption) or f"image {row}", fontsize="x-small")

        bar_axis = figure.add_subplot(grid[row, 1])
        top = tops[row]
        values = o[row, top]
        positions = np.arange(top_k)[::-1]
        colours = ["tab:green" if truth is not None and c == truth[row] else "tab:purple"
                   for c in top]
        bar_axis.barh(positions, values, color=colours, height=0.7)
        bar_axis.set_yticks(positions, [named(int(c)) for c in top], fontsize="x-small")
        bar_axis.set_xlim(0, o_limit * 1.15)
        for position, value in zip(positions, values):
            bar_axis.text(value + 0.015 * o_limit, position, f"{value:.3g}", va="center",
                          fontsize="x-small")
        bar_axis.tick_params(axis="x", labelsize="x-small")
        if row == 0:
            bar_axis.set_title(f"top-{top_k} memory coefficients o_i (Eq. 1)",
                               fontsize="small")
        if row == n - 1:
            bar_axis.set_xlabel("o_i (softmax over the K centroids)", fontsize="x-small")

        sel_axis = figure.add_subplot(grid[row, 2])
        dims = np.arange(d)
        sel_axis.bar(dims, e[row], width=0.9 if d <= 128 else 1.0, linewidth=0,
                     color=np.where(e[row] > 0, "tab:orange", "tab:gray"))
        sel_axis.axhline(0, color="black", linewidth=0.6)
        sel_axis.set_xlim(-0.5, d - 0.5)
        sel_axis.set_ylim(-1.08, 1.75)  # headroom above e = 1 for the summary
        sel_axis.set_yticks([-1, 0, 1])
        sel_axis.tick_params(labelsize="x-small")
        sel_axis.text(0.99, 0.96, f"mean |e| {np.abs(e[row]).mean():.2f}, "
                                  f"e > 0: {100 * (e[row] > 0).mean():.0f} % of dims",
                      transform=sel_axis.transAxes, ha="right", va="top", fontsize="x-small",
                      bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})
        if row == 0:
            sel_axis.set_title("concept selector e = tanh(T_sel(v)) per dimension (Eq. 4)",
                               fontsize="small")
        if row == n - 1:
            sel_axis.set_xlabel("feature dimension", fontsize="x-small")
        else:
            sel_axis.set_xticklabels([])
    figure.suptitle("Memory concepts infused into the meta-embedding (cf. paper Fig. 7)",
                    fontsize="medium")
    return _save(figure, path)


# --------------------------------------------------------------------------- 6. confusion


@dataclass(frozen=True)
class ConfusionTable:
    """Counts (rows × columns) of where images end up: ``rows`` the true classes (tail
    classes, maybe ``"other tail"``, then ``"open"``), ``columns`` the answers (the tail
    classes, maybe ``"other tail"``, ``"head/medium classes"``, ``"unknown"``);
    ``tail_rule`` says how the tail was chosen."""

    rows: list[str]
    columns: list[str]
    counts: np.ndarray
    tail_rule: str


def tail_open_confusion(
    known_labels: Any,
    known_predictions: Any,
    train_counts: Any,
    class_names: Sequence[str] | None = None,
    open_predictions: Any | None = None,
    *,
    tail_classes: Sequence[int] | None = None,
    max_tail_classes: int = 20,
    many_threshold: int = 100,
    few_threshold: int = 20,
    strict: bool = True,
) -> ConfusionTable:
    """Where the tail classes' test images and the open images end up.

    ``known_labels`` / ``known_predictions`` (N,) of the known test images and
    ``open_predictions`` (M,) of the open images: final answers, −1 = "unknown" (after the
    threshold). Tail: ``tail_classes`` if given, else the few-shot group
    (``metrics.shot_groups``), else (no few-shot class) the rarest third of the classes (at
    least one). Only the ``max_tail_classes`` rarest get their own row and column; the rest
    of the tail is pooled as "other tail". Rows (head → tail, then "open") count images by
    true class; columns by answer: a shown tail class, "other tail", "head/medium classes"
    (every non-tail class, pooled), "unknown". Known images of non-tail classes are left out.
    """
    counts = _vector("train_counts", train_counts, kind="int")
    k = len(counts)
    names = _class_names(class_names, k)
    labels = _vector("known_labels", known_labels, kind="int", allow_empty=True)
    predictions = _vector("known_predictions", known_predictions, kind="int", allow_empty=True)
    _same_length(known_labels=labels, known_predictions=predictions)
    _labels_in_range("known_labels", labels, k, allow_unknown=False)
    _labels_in_range("known_predictions", predictions, k, allow_unknown=True)
    opened = (np.zeros(0, dtype=np.int64) if open_predictions is None
              else _vector("open_predictions", open_predictions, kind="int", allow_empty=True))
    _labels_in_range("open_predictions", opened, k, allow_unknown=True)
    if max_tail_classes < 1:
        raise InputError("max_tail_classes must be >= 1", value=max_tail_classes)
    order = _head_to_tail(counts)
    if tail_classes is not None:
        tail = _vector("tail_classes", list(tail_classes), kind="int")
        _labels_in_range("tail_classes", tail, k, allow_unknown=False)
        tail_set = {int(c) for c in tail}
        rule = "tail = the given classes"
    else:
        groups = _groups(counts, many_threshold, few_threshold, strict)
        tail_set = {int(c) for c in np.flatnonzero(groups == "few")}
        rule = (f"tail = few-shot classes, {'<' if strict else '≤'} {few_threshold} "
                "train images")
        if not tail_set:
            tail_set = {int(c) for c in order[-max(1, math.ceil(k / 3)):]}
            rule = "tail = rarest third of the classes (no few-shot class)"
    tail_ordered = [int(c) for c in order if int(c) in tail_set]  # head → tail
    shown = tail_ordered[-max_tail_classes:]
    pooled = len(shown) < len(tail_ordered)
    if pooled:
        rule += f"; the {len(shown)} rarest shown, {len(tail_ordered) - len(shown)} pooled"
    rows = [names[c] for c in shown] + (["other tail"] if pooled else [])
    columns = list(rows) + (["head/medium classes"] if len(tail_set) < k else []) + ["unknown"]
    column_of = np.full(k + 1, -1, dtype=np.int64)  # index k + (−1) = k: "unknown"
    head_column = len(rows) if len(tail_set) < k else -1
    for c in range(k):
        if c in shown:
            column_of[c] = shown.index(c)
        elif c in tail_set:
            column_of[c] = len(shown)  # "other tail"
        else:
            column_of[c] = head_column
    column_of[k] = len(columns) - 1
    table = np.zeros((len(rows) + (1 if len(opened) else 0), len(columns)), dtype=np.int64)
    row_of = {c: (shown.index(c) if c in shown else len(shown)) for c in tail_set}
    for label, prediction in zip(labels, predictions):
        if int(label) in tail_set:
            table[row_of[int(label)], column_of[int(prediction)]] += 1
    if len(opened):
        np.add.at(table[-1], column_of[opened], 1)
        rows = rows + ["open"]
    return ConfusionTable(rows=rows, columns=columns, counts=table, tail_rule=rule)


def plot_tail_open_confusion(
    path: str | os.PathLike[str],
    known_labels: Any,
    known_predictions: Any,
    train_counts: Any,
    class_names: Sequence[str] | None = None,
    open_predictions: Any | None = None,
    *,
    tail_classes: Sequence[int] | None = None,
    max_tail_classes: int = 20,
    many_threshold: int = 100,
    few_threshold: int = 20,
    strict: bool = True,
) -> Path:
    """The matrix of :func:`tail_open_confusion` (same arguments): counts in the cells,
    colour = share of the row (row-normalised; a row without images stays white); the
    diagonal of the tail classes is the correct answers, the "unknown" column of the
    "open" row the correct rejections."""
    table = tail_open_confusion(
        known_labels, known_predictions, train_counts, class_names, open_predictions,
        tail_classes=tail_classes, max_tail_classes=max_tail_classes,
        many_threshold=many_threshold, few_threshold=few_threshold, strict=strict)
    counts = table.counts
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    rows, columns = len(table.rows), len(table.columns)
    figure = _new_figure(max(5.5, 2.5 + 0.5 * columns), max(3.6, 1.9 + 0.36 * rows))
    axis = figure.add_subplot()
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    small = rows * columns > 150
    for r in range(rows):
        for c in range(columns):
            if counts[r, c] or not small:
                axis.text(c, r, str(counts[r, c]), ha="center", va="center",
                          fontsize="x-small" if small else "small",
                          color="white" if shares[r, c] > 0.55 else "black")
    row_labels = [f"{_text(name, 22)} (n = {int(total)})"
                  for name, total in zip(table.rows, totals.ravel())]
    axis.set_yticks(np.arange(rows), row_labels, fontsize="small")
    axis.set_xticks(np.arange(columns), [_text(name, 22) for name in table.columns],
                    rotation=45, ha="right", rotation_mode="anchor", fontsize="small")
    axis.set_xlabel("answer (predicted class or unknown)")
    axis.set_ylabel("true class")
    axis.set_xticks(np.arange(columns + 1) - 0.5, minor=True)
    axis.set_yticks(np.arange(rows + 1) - 0.5, minor=True)
    axis.grid(which="minor", color="white", linewidth=1)
    axis.tick_params(which="minor", length=0)
    if "open" in table.rows and rows > 1:
        axis.axhline(rows - 1.5, color="black", linewidth=1.2)
    axis.axvline(columns - 1.5, color="black", linewidth=1.2)
    figure.colorbar(image, ax=axis, label="share of the row", shrink=0.9)
    figure.suptitle(f"Where tail-class and open images end up\n({_text(table.tail_rule)})",
                    fontsize="medium")
    return _save(figure, path)


# --------------------------------------------------------------------------- the page


@dataclass(frozen=True)
class ReportFigure:
    """A PNG inside the page's directory and the caption saying what it shows."""

    path: str | os.PathLike[str]
    caption: str


@dataclass(frozen=True)
class ReportTable:
    """A summary table. ``rows``: a mapping (one "key | value" row per item), a list of
    mappings (columns = their keys, in first-seen order) or a list of sequences (with
    ``columns``). Floats print with 4 significant digits, None as "–"."""

    title: str
    rows: Mapping[str, Any] | Sequence[Mapping[str, Any]] | Sequence[Sequence[Any]]
    columns: Sequence[str] | None = None


@dataclass(frozen=True)
class ReportSection:
    """A heading, optional paragraphs of text, tables and figures (in that order)."""

    heading: str
    text: Sequence[str] | str = ()
    tables: Sequence[ReportTable] = ()
    figures: Sequence[ReportFigure] = ()


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.5em; border-bottom: 2px solid #ccc; padding-bottom: .3em; }
h2 { font-size: 1.2em; margin-top: 2em; }
nav ul { columns: 2; font-size: .95em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .92em; }
caption { text-align: left; font-weight: 600; padding-bottom: .3em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f1f3f5; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: .92em; color: #444; max-width: 70em; margin-top: .4em; }
footer { margin-top: 3em; font-size: .85em; color: #666; }
""".strip()


def _cell(value: Any) -> tuple[str, bool]:
    """(escaped text, is numeric) of a table value."""
    if value is None:
        return "–", False
    if isinstance(value, bool):
        return html.escape(str(value)), False
    if isinstance(value, (int, np.integer)):
        return f"{int(value)}", True
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return ("–" if math.isnan(value) else f"{value:.4g}"), True
    return html.escape(str(value)), False


def _table_html(table: ReportTable) -> str:
    rows = table.rows
    if isinstance(rows, Mapping):
        columns: list[str] = list(table.columns or ("", "value"))
        body = [[key, value] for key, value in rows.items()]
    elif rows and all(isinstance(row, Mapping) for row in rows):
        mappings: list[Mapping[str, Any]] = list(rows)  # type: ignore[arg-type]
        columns = list(table.columns or dict.fromkeys(k for row in mappings for k in row))
        body = [[row.get(k) for k in columns] for row in mappings]
    else:
        body = [list(row) for row in rows]  # type: ignore[arg-type]
        columns = list(table.columns or [])
        if columns and any(len(row) != len(columns) for row in body):
            raise InputError(f"table '{table.title}': every row must have {len(columns)} "
                             "cells", value=table.title)
    out = ["<table>", f"<caption>{html.escape(table.title)}</caption>"]
    if columns:
        out.append("<thead><tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
                   + "</tr></thead>")
    out.append("<tbody>")
    for row in body:
        cells = []
        for value in row:
            text, numeric = _cell(value)
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _figure_html(figure: ReportFigure, out_dir: Path, number: int) -> str:
    path = Path(figure.path)
    resolved = path if path.is_absolute() else out_dir / path
    try:
        relative = resolved.resolve().relative_to(out_dir.resolve())
    except ValueError:
        raise InputError("a report figure must lie inside the report directory "
                         f"{out_dir}", path=figure.path) from None
    if not resolved.is_file():
        raise InputError("report figure not found", path=resolved)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(resolved) as image:
            size = f' width="{image.width}" height="{image.height}"'
    except (OSError, UnidentifiedImageError):
        raise InputError("report figure is not a readable image", path=resolved) from None
    source = html.escape(urllib.parse.quote(relative.as_posix()), quote=True)
    caption = html.escape(figure.caption)
    return (f'<figure id="figure-{number}">\n<img src="{source}" alt="{caption}"{size}>\n'
            f"<figcaption><strong>Figure {number}.</strong> {caption}</figcaption>\n</figure>")


def write_report_page(
    out_dir: str | os.PathLike[str],
    title: str,
    sections: Sequence[ReportSection],
    *,
    footer: str | None = None,
) -> Path:
    """Write ``out_dir/index.html``: the ``title``, a table of contents, then each section's
    text, tables and figures (numbered, captioned), and return its path.

    Self-contained: the figures are linked by relative, URL-quoted paths (each must lie
    inside ``out_dir``; ``InputError`` otherwise or when missing), the style is inline, there
    is no script and no network address. Every text (title, headings, captions, table cells,
    class names, paths) is HTML-escaped. An existing ``index.html`` is replaced atomically.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(title)}</title>", f"<style>\n{_STYLE}\n</style>", "</head>",
             "<body>", f"<h1>{html.escape(title)}</h1>"]
    if len(sections) > 1:
        parts.append("<nav><ul>" + "".join(
            f'<li><a href="#section-{i}">{html.escape(s.heading)}</a></li>'
            for i, s in enumerate(sections, 1)) + "</ul></nav>")
    number = 0
    for i, section in enumerate(sections, 1):
        parts.append(f'<section id="section-{i}">')
        parts.append(f"<h2>{html.escape(section.heading)}</h2>")
        paragraphs = [section.text] if isinstance(section.text, str) else section.text
        parts.extend(f"<p>{html.escape(p)}</p>" for p in paragraphs if p)
        parts.extend(_table_html(table) for table in section.tables)
        for figure in section.figures:
            number += 1
            parts.append(_figure_html(figure, out_dir, number))
        parts.append("</section>")
    if footer:
        parts.append(f"<footer>{html.escape(footer)}</footer>")
    parts += ["</body>", "</html>", ""]
    page = out_dir / PAGE_FILE
    atomic_write_text(page, "\n".join(parts))
    return page


# --------------------------------------------------------------------------- all at once


@dataclass
class ReportInputs:
    """Everything :func:`render_report` draws, as arrays (the caller runs the model).

    Known test images (N): ``known_labels``, ``known_closed_predictions`` (argmax of the
    decision logits), ``known_predictions`` (after the threshold, −1 = unknown),
    ``known_scores`` (open scores, higher = more open); ``features`` / ``meta`` (N, d)
    the direct features and meta-embeddings (``meta`` None for a non-OLTR model). Open images
    (M): ``open_predictions``, ``open_scores`` (None: no open split); ``external_scores``:
    external open set name → scores. ``threshold`` None: a closed-set rule. Memory concepts
    (Fig. 7) for a few images: ``thumbnails`` (n, H, W[, 3]) uint8, ``coefficients`` (n, K),
    ``selector`` (n, d), ``concept_labels`` / ``concept_predictions`` (n,). Shot-group rule:
    ``many_threshold``, ``few_threshold``, ``strict`` (as ``metrics.shot_groups``).
    """

    class_names: Sequence[str]
    train_counts: Any
    known_labels: Any
    known_closed_predictions: Any
    known_predictions: Any
    known_scores: Any | None = None
    open_predictions: Any | None = None
    open_scores: Any | None = None
    threshold: float | None = None
    score_name: str = "open score"
    external_scores: Mapping[str, Any] = field(default_factory=dict)
    features: Any | None = None
    meta: Any | None = None
    thumbnails: Any | None = None
    coefficients: Any | None = None
    selector: Any | None = None
    concept_labels: Any | None = None
    concept_predictions: Any | None = None
    many_threshold: int = 100
    few_threshold: int = 20
    strict: bool = True
    embedding_seed: int = 0
    embedding_method: str = "auto"


def render_report(
    out_dir: str | os.PathLike[str],
    inputs: ReportInputs,
    *,
    title: str = "oltr report",
    tables: Sequence[ReportTable] = (),
    text: Sequence[str] = (),
) -> Path:
    """Draw every figure ``inputs`` allow into ``out_dir`` (names: :data:`FIGURE_FILES`) and
    write ``index.html`` (:func:`write_report_page`) with a summary section (``text``,
    ``tables``, e.g. the evaluation report's closed and open figures) and one section per
    figure; return the page's path. Figures without their inputs are left out (the
    histograms and sweep need ``known_scores``; the embedding ``features``; the concepts
    ``thumbnails``, ``coefficients`` and ``selector``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    group_kw = {"many_threshold": inputs.many_threshold, "few_threshold": inputs.few_threshold,
                "strict": inputs.strict}
    names = list(inputs.class_names)
    counts = _vector("train_counts", inputs.train_counts, kind="int")
    labels = _vector("known_labels", inputs.known_labels, kind="int")
    closed = _vector("known_closed_predictions", inputs.known_closed_predictions, kind="int")
    final = _vector("known_predictions", inputs.known_predictions, kind="int")
    _same_length(known_labels=labels, known_closed_predictions=closed, known_predictions=final)
    rule = _rule_text(inputs.many_threshold, inputs.few_threshold, inputs.strict)
    has_open = inputs.open_predictions is not None and len(np.asarray(inputs.open_predictions))
    sections = [ReportSection("Summary", list(text), list(tables))]

    def add(heading: str, path: Path, caption: str) -> None:
        sections.append(ReportSection(heading, figures=[ReportFigure(path.name, caption)]))

    closed_report = metrics.closed_set_accuracy(closed, labels, counts, **group_kw)
    open_per_class = None
    if inputs.threshold is not None:
        open_per_class = metrics.closed_set_accuracy(final, labels, counts,
                                                     **group_kw)["per_class"]
    add("Accuracy per class", plot_per_class_accuracy(
        out_dir / FIGURE_FILES["per_class"], counts, closed_report["per_class"],
        open_per_class, class_names=names, **group_kw),
        "Test accuracy of each known class against its number of train images (black line, "
        "log scale, right axis); classes ordered from the most to the least frequent (head → "
        "tail). Blue: closed-set accuracy; orange: open-set accuracy, where a known image "
        "rejected as unknown counts as an error. Shaded spans and dashed boundaries: the "
        f"many/medium/few shot groups ({rule}); horizontal lines: each group's mean per-class "
        "accuracy (the report's many/medium/few figures).")
    if inputs.known_scores is not None:
        scores = _vector("known_scores", inputs.known_scores)
        _same_length(known_labels=labels, known_scores=scores)
        open_scores = inputs.open_scores if has_open else None
        add("Open-score distributions", plot_open_score_histograms(
            out_dir / FIGURE_FILES["histograms"], scores, open_scores,
            threshold=inputs.threshold, external=inputs.external_scores,
            score_name=inputs.score_name),
            f"Histograms of the open score ({inputs.score_name}; higher = more open) of the "
            "known test images and of the open images" + (" and each external open set"
                                                          if inputs.external_scores else "")
            + ", each normalised to fractions of its own images. "
            + ("The dashed line is the threshold: images to its right are answered "
               "'unknown'; the legend gives the share of each set accepted (known) or "
               "rejected (open)." if inputs.threshold is not None else
               "The decision rule has no threshold (closed set): no image is rejected."))
        add("Threshold sweep", plot_threshold_sweep(
            out_dir / FIGURE_FILES["threshold"], scores, closed == labels, open_scores,
            threshold=inputs.threshold, score_name=inputs.score_name),
            "Open-set figures if the threshold were moved over every observed score (an "
            "image is rejected when its score exceeds the threshold; left end: everything "
            "rejected). Left: F-measure (TP = known and correct, FP = other known, FN = open "
            "accepted) and open-set overall accuracy; right: share of known test images "
            "accepted and of open images rejected. Dashed line: the chosen threshold (fitted "
            "on val, never on test); grey dot: the best F-measure on these test images, for "
            "reference only.")
    if inputs.features is not None:
        both = inputs.meta is not None
        add("Feature embeddings (paper Fig. 3)", plot_embeddings(
            out_dir / FIGURE_FILES["embeddings"], inputs.features, labels, inputs.meta,
            train_counts=counts, class_names=names, seed=inputs.embedding_seed,
            method=inputs.embedding_method, **group_kw),
            ("2-D embedding of the direct features (left) and of the meta-embeddings (right) "
             "of the same known test images" if both else
             "2-D embedding of the direct features of known test images (this model has no "
             "meta-embedding)")
            + f" (at most {MAX_EMBEDDING_POINTS}, a seeded random subsample), by t-SNE after "
            "PCA to 50 dimensions, or UMAP where installed; colour = class, marker = shot "
            "group (★ few-shot, drawn on top). Compact, separated clusters for the tail "
            "classes mean the embedding discriminates them; the axes have no units.")
    if (inputs.thumbnails is not None and inputs.coefficients is not None
            and inputs.selector is not None):
        add("Memory concepts (paper Fig. 7)", plot_memory_concepts(
            out_dir / FIGURE_FILES["concepts"], inputs.thumbnails, inputs.coefficients,
            inputs.selector, names, labels=inputs.concept_labels,
            predictions=inputs.concept_predictions),
            "For a few test images (frame: green = answered correctly, red = wrong): the "
            "classes whose memory centroids weigh most in the memory feature v_memory = Σ o_i "
            "c_i (the hallucinator's coefficients o, Eq. 1; green bar = the true class), and "
            "the concept selector e (Eq. 4), the per-dimension weight of v_memory in the "
            "meta-embedding (orange: e > 0, grey: e ≤ 0).")
    table = tail_open_confusion(labels, final, counts, names,
                                inputs.open_predictions if has_open else None, **group_kw)
    add("Tail classes and open images", plot_tail_open_confusion(
        out_dir / FIGURE_FILES["confusion"], labels, final, counts, names,
        inputs.open_predictions if has_open else None, **group_kw),
        "Final answers (after the threshold) for the test images of the tail classes and for "
        f"the open images ({table.tail_rule}): rows = true class, columns = answer; the "
        "many/medium (non-tail) classes are pooled into one column. Cells give image counts, "
        "colour the share of the row: the tail diagonal is correct, a tail image in "
        "'unknown' was wrongly rejected, an open image anywhere but 'unknown' wrongly "
        "accepted.")
    _remove_figures_not_drawn(out_dir, sections)
    return write_report_page(out_dir, title, sections,
                             footer="Written by oltr report; figures are PNG files next to "
                                    "this page.")


def _remove_figures_not_drawn(out_dir: Path, sections: Sequence[ReportSection]) -> None:
    """In a directory oltr claimed for reports (its ``.oltr`` marker says ``report``), remove
    the figures of an earlier report that this one does not draw (e.g. the embedding of a run
    re-evaluated without features), so the folder never shows a stale PNG beside the page.
    Elsewhere nothing is removed (a figure file there may be the user's)."""
    if marker_kind(out_dir) != "report":
        return
    drawn = {str(figure.path) for section in sections for figure in section.figures}
    for name in FIGURE_FILES.values():
        if name not in drawn and (out_dir / name).is_file():
            (out_dir / name).unlink()
