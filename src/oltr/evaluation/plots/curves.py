"""Line plots of the Fig. 8 curves (paper §4.3; :mod:`oltr.evaluation.analysis` computes them):
one subplot per figure, one line per method, a ±std band where a curve has one."""
from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oltr.errors import InputError
from oltr.io import atomic_write_bytes


def _plot_values(values: Sequence[float | None], scale: float) -> np.ndarray:
    return np.array([np.nan if v is None else scale * v for v in values], dtype=float)


def plot_curves(
    curves: Mapping[str, Mapping[str, Any]],
    x_key: str,
    panels: Sequence[tuple[str, str, float]],
    path: str | Path,
    *,
    title: str,
    xlabel: str,
    xscale: str = "linear",
    vlines: Sequence[tuple[float, str]] = (),
) -> Path:
    """One subplot per ``(key, y label, scale)`` panel, one line per method of ``curves``
    (name → curve dict), with a ±std band where the curve has ``<key>_std``; write a PNG.
    Missing values (None) leave gaps."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    if not curves:
        raise InputError("nothing to plot: no curve given")
    columns = len(panels) if len(panels) <= 3 else math.ceil(len(panels) / 2)
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.4 * columns, 3.4 * rows + 0.4), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for unused in axes[len(panels):]:
        unused.set_visible(False)
    ticks = sorted({float(x) for curve in curves.values() for x in curve[x_key]})
    for axis, (key, ylabel, scale) in zip(axes, panels):
        for name, curve in curves.items():
            x = np.asarray(curve[x_key], dtype=float)
            y = _plot_values(curve[key], scale)
            line, = axis.plot(x, y, marker="o", markersize=4, label=name)
            if f"{key}_std" in curve:
                std = _plot_values(curve[f"{key}_std"], scale)
                axis.fill_between(x, y - std, y + std, alpha=0.2, color=line.get_color(),
                                  linewidth=0)
        for position, label in vlines:
            axis.axvline(position, color="grey", linestyle="--", linewidth=1, label=label)
        axis.set_xscale(xscale)
        if xscale == "log" or len(ticks) <= 12:  # the measured x values, as plain numbers
            axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
            axis.minorticks_off()
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_longtail(curves: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Fig. 8a: closed accuracy (overall, head and tail classes) and open F-measure vs the
    imbalance ratio (log scale), one line per method."""
    fraction = next(iter(curves.values())).get("tail_fraction", 1 / 3)
    share = "third" if abs(fraction - 1 / 3) < 1e-9 else f"{fraction:.0%}"
    return plot_curves(
        curves, "imbalance_ratio",
        [("closed_overall", "closed-set accuracy, overall (%)", 100),
         ("open_f_measure", "open-set F-measure", 1),
         ("closed_head", f"closed accuracy, head {share} (%)", 100),
         ("closed_tail", f"closed accuracy, tail {share} (%)", 100)],
        path, title="Fig. 8a: influence of the dataset's longtail-ness",
        xlabel="imbalance ratio (max / min train images per class)", xscale="log",
    )


def plot_threshold(curves: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Fig. 8b: open-set overall accuracy and F-measure vs the MSP probability threshold."""
    num_classes = {curve.get("num_classes") for curve in curves.values()} - {None}
    vlines = [(1 / k, "1/K: nothing rejected below") for k in num_classes if len(num_classes) == 1]
    return plot_curves(
        curves, "probability",
        [("overall", "open-set overall accuracy (%)", 100),
         ("f_measure", "open-set F-measure", 1),
         ("known_acceptance_rate", "known test images accepted (%)", 100)],
        path, title="Fig. 8b: influence of the open-set probability threshold",
        xlabel="probability threshold p (reject if max softmax < p)", vlines=vlines,
    )


def plot_open_classes(curves: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Fig. 8c: open-set overall accuracy and F-measure vs the number of open classes, mean
    ± std over class subsets, threshold calibrated on val."""
    return plot_curves(
        curves, "num_open_classes",
        [("overall", "open-set overall accuracy (%)", 100),
         ("f_measure", "open-set F-measure", 1)],
        path, title="Fig. 8c: influence of the number of open classes "
                    "(mean ± std over subsets of open classes)",
        xlabel="number of open classes in the test set",
    )
