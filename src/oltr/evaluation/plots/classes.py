"""Figures about classes: per-class accuracy against train-set frequency (1, paper §4 shot
groups, cf. Fig. 1) and where tail-class test images and open images end up (6, the tail/open
confusion)."""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oltr.errors import InputError
from oltr.evaluation.plots.common import (
    GROUP_COLORS,
    MAX_BARS,
    MAX_NAMED_CLASSES,
    class_name_list,
    head_to_tail,
    labels_in_range,
    new_figure,
    percent,
    plot_text,
    rule_text,
    same_length,
    save_png,
    shot_groups_of,
    vector,
)

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
    counts = vector("train_counts", train_counts, kind="int")
    k = len(counts)
    closed = vector("closed_accuracy", closed_accuracy, allow_nan=True)
    opened = (None if open_accuracy is None
              else vector("open_accuracy", open_accuracy, allow_nan=True))
    same_length(train_counts=counts, closed_accuracy=closed,
                 **({} if opened is None else {"open_accuracy": opened}))
    for name, values in (("closed_accuracy", closed), ("open_accuracy", opened)):
        if values is not None and ((values < 0) | (values > 1)).any():
            raise InputError(f"{name} must hold fractions in [0, 1]",
                             value=float(values[(values < 0) | (values > 1)][0]))
    names = class_name_list(class_names, k)
    groups = shot_groups_of(counts, many_threshold, few_threshold, strict)
    order = head_to_tail(counts)
    counts, closed, groups = counts[order], closed[order], groups[order]
    opened = None if opened is None else opened[order]
    x = np.arange(k)

    figure = new_figure(min(12.0, 8.5 + 0.1 * min(k, MAX_BARS)),
                         4.6 + (0.8 if k <= MAX_NAMED_CLASSES else 0))
    axis = figure.add_subplot()
    _shot_group_spans(axis, groups, closed, opened)
    _accuracy_bars(axis, closed, opened)
    axis.set_xlim(-0.5, k - 0.5)
    axis.set_ylim(0, 105)
    axis.set_ylabel("test accuracy per class (%)")
    if k <= MAX_NAMED_CLASSES:
        axis.set_xticks(x, [plot_text(names[i], 18) for i in order], rotation=50, ha="right",
                        fontsize="small" if k > 12 else "medium", rotation_mode="anchor")
        axis.set_xlabel("classes, by train images (head → tail)")
    else:
        axis.set_xlabel("class rank by train images (0 = most frequent; head → tail)")
    twin = _train_count_axis(axis, counts)
    handles, labels = axis.get_legend_handles_labels()
    twin_handles, twin_labels = twin.get_legend_handles_labels()
    from matplotlib.lines import Line2D

    extra = [Line2D([], [], color="0.3", linestyle=":", linewidth=2)]
    figure.legend(handles + twin_handles + extra,
                  labels + twin_labels + ["group mean (dotted closed, dashed open)"],
                  loc="outside lower center", ncols=3, fontsize="small", frameon=False)
    figure.suptitle(f"Per-class accuracy vs train-set frequency ({k} class"
                    f"{'es' if k > 1 else ''}; shot groups: "
                    f"{rule_text(many_threshold, few_threshold, strict)})", fontsize="medium")
    return save_png(figure, path)


def _shot_group_spans(axis: Any, groups: np.ndarray, closed: np.ndarray,
                      opened: np.ndarray | None) -> None:
    """Shade each run of one shot group (head → tail), mark the boundaries, draw each group's
    mean closed (dotted) and open (dashed) accuracy and label it above the axes."""
    k = len(groups)
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
            label += f"\nclosed {percent(closed_mean)}"
            axis.hlines(100 * closed_mean, first - 0.5, last + 0.5, colors="tab:blue",
                        linestyles=":", linewidth=2, zorder=4)
        if opened is not None and np.isfinite(opened[members]).any():
            open_mean = float(np.nanmean(opened[members]))
            label += f"\nopen {percent(open_mean)}"
            axis.hlines(100 * open_mean, first - 0.5, last + 0.5, colors="tab:orange",
                        linestyles="--", linewidth=2, zorder=4)
        centre = ((first + last) / 2 + 0.5) / k  # in axes fraction; keep labels above the axes
        where, align = ((first - 0.5, "left") if centre < 0.08 else
                        (last + 0.5, "right") if centre > 0.92 else ((first + last) / 2, "center"))
        axis.text(where, 1.0, label, transform=axis.get_xaxis_transform(), ha=align,
                  va="bottom", fontsize="small", clip_on=False)


def _accuracy_bars(axis: Any, closed: np.ndarray, opened: np.ndarray | None) -> None:
    """Per-class accuracy in %: bars up to :data:`MAX_BARS` classes (a cross where a class
    has no test image), beyond light steps and a moving average."""
    k = len(closed)
    x = np.arange(k)
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


def _train_count_axis(axis: Any, counts: np.ndarray) -> Any:
    """The right axis: train images per class on a log scale, plain numbers as ticks."""
    k = len(counts)
    x = np.arange(k)
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
    return twin


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
    counts = vector("train_counts", train_counts, kind="int")
    k = len(counts)
    names = class_name_list(class_names, k)
    labels = vector("known_labels", known_labels, kind="int", allow_empty=True)
    predictions = vector("known_predictions", known_predictions, kind="int", allow_empty=True)
    same_length(known_labels=labels, known_predictions=predictions)
    labels_in_range("known_labels", labels, k, allow_unknown=False)
    labels_in_range("known_predictions", predictions, k, allow_unknown=True)
    opened = (np.zeros(0, dtype=np.int64) if open_predictions is None
              else vector("open_predictions", open_predictions, kind="int", allow_empty=True))
    labels_in_range("open_predictions", opened, k, allow_unknown=True)
    if max_tail_classes < 1:
        raise InputError("max_tail_classes must be >= 1", value=max_tail_classes)
    order = head_to_tail(counts)
    if tail_classes is not None:
        tail = vector("tail_classes", list(tail_classes), kind="int")
        labels_in_range("tail_classes", tail, k, allow_unknown=False)
        tail_set = {int(c) for c in tail}
        rule = "tail = the given classes"
    else:
        groups = shot_groups_of(counts, many_threshold, few_threshold, strict)
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
    figure = new_figure(max(5.5, 2.5 + 0.5 * columns), max(3.6, 1.9 + 0.36 * rows))
    axis = figure.add_subplot()
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    small = rows * columns > 150
    for r in range(rows):
        for c in range(columns):
            if counts[r, c] or not small:
                axis.text(c, r, str(counts[r, c]), ha="center", va="center",
                          fontsize="x-small" if small else "small",
                          color="white" if shares[r, c] > 0.55 else "black")
    row_labels = [f"{plot_text(name, 22)} (n = {int(total)})"
                  for name, total in zip(table.rows, totals.ravel())]
    axis.set_yticks(np.arange(rows), row_labels, fontsize="small")
    axis.set_xticks(np.arange(columns), [plot_text(name, 22) for name in table.columns],
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
    figure.suptitle(f"Where tail-class and open images end up\n({plot_text(table.tail_rule)})",
                    fontsize="medium")
    return save_png(figure, path)
