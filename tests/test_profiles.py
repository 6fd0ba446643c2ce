"""Long-tail count profiles: hand-computed values, endpoints, ImageNet-LT parameters, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

from oltr.data.profiles import class_counts


def test_exp_small_cases_by_hand():
    # n_r = 100 * 100^(-r/2): 100, 10, 1
    assert class_counts("exp", 3, max_count=100, min_count=1).tolist() == [100, 10, 1]
    # n_r = 1000 * 100^(-r/4): 1000, 316.2, 100, 31.6, 10
    assert class_counts("exp", 5, max_count=1000, ratio=100).tolist() == [1000, 316, 100, 32, 10]


def test_pareto_closed_form_k4():
    # R = 1280/5 = 256, x_end = 256^(1/7) = 2.2082, x = 1, 1.4027, 1.8055, 2.2082
    # n = 1280 * x^-7 = 1280, 119.8, 20.5, 5
    counts = class_counts("pareto", 4, max_count=1280, min_count=5, alpha=6)
    assert counts.tolist() == [1280, 120, 20, 5]
    x_end = 256 ** (1 / 7)
    expected = [round(1280 * (1 + r / 3 * (x_end - 1)) ** -7) for r in range(4)]
    assert counts.tolist() == expected


def test_pareto_alpha_changes_the_middle_not_the_ends():
    steep = class_counts("pareto", 5, max_count=500, min_count=10, alpha=6)
    flat = class_counts("pareto", 5, max_count=500, min_count=10, alpha=0.5)
    assert steep[0] == flat[0] == 500 and steep[-1] == flat[-1] == 10
    x_end = 50 ** (1 / 1.5)
    assert flat[2] == round(500 * (1 + 0.5 * (x_end - 1)) ** -1.5)


@pytest.mark.parametrize("profile", ["exp", "pareto"])
@pytest.mark.parametrize(("k", "high", "low"), [(2, 10, 1), (7, 300, 3), (100, 5000, 5), (50, 9, 9)])
def test_monotone_with_exact_endpoints(profile, k, high, low):
    counts = class_counts(profile, k, max_count=high, min_count=low)
    assert counts.dtype == np.int64 and counts.shape == (k,)
    assert counts[0] == high and counts[-1] == low
    assert np.all(np.diff(counts) <= 0)


def test_imagenet_lt_parameters():
    counts = class_counts("pareto", 1000, max_count=1280, min_count=5, alpha=6.0)
    assert counts.shape == (1000,)
    assert counts[0] == 1280 and counts[-1] == 5
    assert np.all(np.diff(counts) <= 0)
    x_end = 256 ** (1 / 7)
    assert counts[1] == round(1280 * (1 + (x_end - 1) / 999) ** -7) == 1269


def test_single_class_and_ratio_rounding():
    assert class_counts("pareto", 1, max_count=7, min_count=2).tolist() == [7]
    # ratio 1000 on max 100 would give 0.1 at the tail: clipped to one image
    assert class_counts("exp", 3, max_count=100, ratio=1000).tolist() == [100, 3, 1]
    assert math.isclose(100 * 1000 ** -0.5, 3.162, rel_tol=1e-3)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("exp", 0), {"max_count": 5, "min_count": 1}, "num_classes must be >= 1, got 0"),
        (("exp", 3), {"max_count": 5, "min_count": 6}, r"max_count \(5\) must be >= min_count \(6\)"),
        (("exp", 3), {"max_count": 5, "min_count": 0}, "min_count must be >= 1, got 0"),
        (("pareto", 3), {"max_count": 5, "min_count": 1, "alpha": 0}, "alpha must be .* got 0"),
        (("pareto", 3), {"max_count": 5, "min_count": 1, "alpha": -2.0}, "alpha .* got -2.0"),
        (("exp", 3), {"max_count": 5, "ratio": 0.5}, "ratio must be .* got 0.5"),
        (("exp", 3), {"max_count": 5}, "give exactly one of min_count and ratio"),
        (("exp", 3), {"max_count": 5, "min_count": 1, "ratio": 5}, "exactly one"),
        (("zipf", 3), {"max_count": 5, "min_count": 1}, "one of exp, pareto, got 'zipf'"),
        (("exp", 3), {"max_count": 0, "min_count": 1}, "max_count must be >= 1, got 0"),
    ],
)
def test_bad_arguments_name_argument_and_value(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        class_counts(*args, **kwargs)


def test_non_integer_counts_are_type_errors():
    with pytest.raises(TypeError, match="num_classes must be an integer"):
        class_counts("exp", 2.5, max_count=5, min_count=1)
    assert class_counts("exp", np.int64(2), max_count=np.int32(4), min_count=2).tolist() == [4, 2]
