"""What every figure of the report page shares: input checks (a bad array is an ``InputError``
naming it, never a matplotlib traceback), the Agg canvas (:class:`matplotlib.figure.Figure`, no
pyplot, no global state), PNG writing, the shot-group colours and the text conventions (``$``
escaped so that matplotlib never reads a class name as mathtext)."""
from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from oltr import metrics
from oltr.errors import InputError
from oltr.io import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 110
#: Above this many classes the per-class plot draws steps instead of bars and no class names.
MAX_BARS = 60
MAX_NAMED_CLASSES = 30
GROUP_COLORS = {"many": "#dbe9f6", "medium": "#fdf0d5", "few": "#f9dcdc"}
GROUP_MARKERS = {"many": "o", "medium": "^", "few": "*"}


# --------------------------------------------------------------------------- input checks


def vector(name: str, values: Any, *, kind: str = "real", allow_empty: bool = False,
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


def matrix(name: str, values: Any, rows: int | None = None,
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


def class_name_list(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise InputError(f"class_names must give one name per class ({num_classes}), "
                         f"got {len(names)}")
    return names


def labels_in_range(name: str, array: np.ndarray, num_classes: int, *,
                     allow_unknown: bool) -> None:
    low = metrics.OPEN_LABEL if allow_unknown else 0
    bad = np.flatnonzero((array < low) | (array >= num_classes))
    if bad.size:
        raise InputError(f"{name} must lie in [{low}, {num_classes - 1}]; index {bad[0]} "
                         "is not", value=int(array[bad[0]]))


def same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name}={length}" for name, length in lengths.items())
        raise InputError(f"inputs must have the same length, got {described}")


def finite_threshold(threshold: float | None) -> float | None:
    if threshold is None:
        return None
    value = float(threshold)
    if not math.isfinite(value):
        raise InputError("threshold must be finite", value=threshold)
    return value


# --------------------------------------------------------------------------- drawing helpers


def plot_text(text: Any, limit: int | None = None) -> str:
    """Data text for matplotlib: shortened to ``limit`` characters, ``$`` escaped (mathtext)."""
    text = str(text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_png(figure: Figure, path: str | os.PathLike[str]) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def percent(value: float | None) -> str:
    text = metrics.percent_text(value)
    return "–" if text is None else f"{text} %"


def head_to_tail(train_counts: np.ndarray) -> np.ndarray:
    """Class indices by decreasing train count (ties: by index)."""
    return np.argsort(-train_counts, kind="stable")


def shot_groups_of(train_counts: np.ndarray, many_threshold: int, few_threshold: int,
            strict: bool) -> np.ndarray:
    return metrics.shot_groups(train_counts, many_threshold, few_threshold, strict)


def rule_text(many_threshold: int, few_threshold: int, strict: bool) -> str:
    if strict:
        return f"many > {many_threshold}, few < {few_threshold} train images"
    return f"many ≥ {many_threshold}, few ≤ {few_threshold} train images"
