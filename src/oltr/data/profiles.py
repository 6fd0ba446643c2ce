"""Per-class training-set sizes of a long-tailed benchmark (docs/protocol.md).

Counts are returned in descending order: rank 0 is the head class, rank K-1 the tail.
"""
from __future__ import annotations

import math
import numbers
import operator

import numpy as np

PROFILES = ("exp", "pareto")


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def _is_finite_real(value: object) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def class_counts(
    profile: str,
    num_classes: int,
    *,
    max_count: int,
    min_count: int | None = None,
    alpha: float = 6.0,
    ratio: float | None = None,
) -> np.ndarray:
    """Train images per class rank, descending, as ``int64``; give ``min_count`` or ``ratio``.

    With ``K = num_classes``, ``R = max_count / min_count`` (or ``R = ratio``) and rank ``r``:

    - ``"exp"`` (CIFAR-LT): ``n_r = max_count * R ** (-r / (K - 1))``.
    - ``"pareto"`` (ImageNet-LT, paper §4: alpha = 6, 1280 -> 5): counts follow the Pareto(alpha)
      density ``x ** -(alpha + 1)`` on the evenly spaced grid ``x_r = 1 + r / (K - 1) * (x_end - 1)``
      with ``x_end = R ** (1 / (alpha + 1))``, i.e. ``n_r = max_count * x_r ** -(alpha + 1)``,
      so ``n_0 = max_count`` and ``n_{K-1} = max_count / R`` exactly. This is a deterministic
      reading of "Pareto with power alpha", not the published ImageNet-LT counts: for K = 1000
      it gives 175 515 images (363 classes > 100, 323 < 20) against ImageNet-LT's 115.8k.

    Values are rounded with ``np.rint`` and clipped to ``[max(1, rint(max_count / R)),
    max_count]``; ``K = 1`` gives ``[max_count]``.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    num_classes = _as_int("num_classes", num_classes)
    max_count = _as_int("max_count", max_count)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    if not (_is_finite_real(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if (min_count is None) == (ratio is None):
        raise ValueError(
            f"give exactly one of min_count and ratio, got min_count={min_count!r}, ratio={ratio!r}"
        )
    if min_count is not None:
        min_count = _as_int("min_count", min_count)
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if max_count < min_count:
            raise ValueError(f"max_count ({max_count}) must be >= min_count ({min_count})")
        imbalance = max_count / min_count
    else:
        if not (_is_finite_real(ratio) and ratio >= 1):
            raise ValueError(f"ratio must be a finite number >= 1, got {ratio!r}")
        imbalance = float(ratio)
    if num_classes == 1:
        return np.array([max_count], dtype=np.int64)
    position = np.arange(num_classes, dtype=np.float64) / (num_classes - 1)
    if profile == "exp":
        values = max_count * imbalance ** (-position)
    else:
        x_end = imbalance ** (1.0 / (float(alpha) + 1.0))
        grid = 1.0 + position * (x_end - 1.0)
        values = max_count * grid ** (-(float(alpha) + 1.0))
    lowest = max(1.0, float(np.rint(max_count / imbalance)))
    return np.clip(np.rint(values), lowest, max_count).astype(np.int64)


#: Profiles that sample each class's images at random instead of drawing fixed counts.
PROPORTIONAL = "proportional"


def keep_probabilities(counts: object, *, reference_count: int | None = None) -> np.ndarray:
    """Per-class probability of keeping each image, proportional to the class's image count:
    MS1M-LT (paper §4 and App. D.1: "we sampled images for each identity with a probability
    proportional to the image numbers of each identity").

    With ``n_i = counts[i]`` and ``Z = reference_count`` (default: the largest ``n_i``),
    ``p_i = min(1, n_i / Z)``, float64. Every image of class i is then kept independently with
    probability ``p_i`` (see `oltr.data.curation.curate`), so class i keeps ``n_i · p_i =
    n_i² / Z`` images in expectation: the head keeps all of its images and the imbalance is
    squared; a small class may keep none (the paper: 85K identities → 74.5K). The paper does
    not state Z; ``Z = max n_i`` is the one choice that needs no further number and keeps every
    ``p_i <= 1``. Raises ValueError for a negative, non-integer or empty ``counts`` or a
    ``reference_count`` < 1.
    """
    values = np.asarray(counts)
    if values.ndim != 1 or values.size == 0 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"counts must be a non-empty 1-D array of integers, got {counts!r}")
    if (values < 0).any():
        raise ValueError(f"counts must be >= 0, got {int(values.min())}")
    if reference_count is None:
        reference = int(values.max())
    else:
        reference = _as_int("reference_count", reference_count)
        if reference < 1:
            raise ValueError(f"reference_count must be >= 1, got {reference}")
    if reference == 0:  # every class is empty
        return np.zeros(values.shape, dtype=np.float64)
    return np.minimum(1.0, values.astype(np.float64) / reference)
