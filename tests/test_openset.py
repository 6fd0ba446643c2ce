"""Open scores: the direction (higher = more open), known answers, and the registry."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from oltr.errors import InputError
from oltr.metrics import auroc, reject
from oltr.openset import (
    OPEN_SCORES,
    compute_open_score,
    energy_score,
    max_logit_score,
    msp_score,
    probability_threshold_to_msp_score,
    reachability_score,
)

LOGIT_SCORES = [name for name, entry in OPEN_SCORES.items() if entry.inputs == ("logits",)]
PEAKED_THEN_FLAT = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
CENTROIDS = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
NEAR_THEN_FAR = torch.tensor([[0.1, 0.0], [5.0, 5.0]])


def test_registry_names():
    assert set(OPEN_SCORES) == {"msp", "max_logit", "energy", "reachability"}
    assert set(LOGIT_SCORES) == {"msp", "max_logit", "energy"}


# ------------------------------------------------------------------------- direction


@pytest.mark.parametrize("name", LOGIT_SCORES)
def test_confident_input_scores_lower_than_flat_input(name):
    peaked, flat = compute_open_score(name, logits=PEAKED_THEN_FLAT)
    assert peaked < flat


def test_point_near_a_centroid_scores_lower_than_a_far_one():
    near, far = compute_open_score("reachability", features=NEAR_THEN_FAR, centroids=CENTROIDS)
    assert near < far


@pytest.mark.parametrize("name", list(OPEN_SCORES))
def test_perfectly_separating_score_has_auroc_one(name):
    generator = torch.Generator().manual_seed(0)
    n = 50
    known_logits = torch.randn(n, 5, generator=generator) + 12 * torch.eye(5)[torch.arange(n) % 5]
    open_logits = 0.1 * torch.randn(n, 5, generator=generator)
    centroids = 10 * torch.eye(5)
    known_features = centroids[torch.arange(n) % 5] + 0.1 * torch.randn(n, 5, generator=generator)
    open_features = 5 * torch.ones(n, 5) + 0.1 * torch.randn(n, 5, generator=generator)
    scores = compute_open_score(
        name,
        logits=torch.cat([known_logits, open_logits]),
        features=torch.cat([known_features, open_features]),
        centroids=centroids,
    )
    is_open = np.r_[np.zeros(n, bool), np.ones(n, bool)]
    assert auroc(scores, is_open) == 1.0


# ------------------------------------------------------------------------- known answers


def test_msp_known_answers():
    # softmax(log 1, log 2, log 1) = (1/4, 1/2, 1/4); softmax(0, 0) = (1/2, 1/2)
    logits = torch.tensor([[0.0, math.log(2.0), 0.0]], dtype=torch.float64)
    assert msp_score(logits).tolist() == pytest.approx([0.5])
    assert msp_score(np.zeros((1, 2))).tolist() == pytest.approx([0.5])
    # temperature 2: logits (2 log 3, 0) / 2 -> softmax (3/4, 1/4)
    tempered = np.array([[2 * math.log(3.0), 0.0]])
    assert msp_score(tempered, temperature=2.0).tolist() == pytest.approx([0.25])


def _msp_closed_form(row: list[float], temperature: float = 1.0) -> float:
    """1 − max softmax in float64 from exact inputs: s / (1 + s), s the non-top terms."""
    scaled = [value / temperature for value in row]
    top = max(range(len(scaled)), key=scaled.__getitem__)
    s = sum(math.exp(value - scaled[top]) for j, value in enumerate(scaled) if j != top)
    return s / (1 + s)


# float32: a few ulps (exp, a sum, a division); float64: the same in its own ulps
MSP_REL = {torch.float32: 1e-6, torch.float64: 1e-14}


def test_msp_keeps_confident_inputs_apart_where_the_probability_rounds_to_one():
    logits = torch.tensor([[40.0, 0.0], [50.0, 0.0]], dtype=torch.float64)
    assert torch.softmax(logits, dim=1).max(dim=1).values.tolist() == [1.0, 1.0]
    score = msp_score(logits)
    assert score.tolist() == pytest.approx([math.exp(-40) / (1 + math.exp(-40)),
                                            math.exp(-50) / (1 + math.exp(-50))], rel=1e-14, abs=0)


@pytest.mark.parametrize(("dtype", "gaps"), [(torch.float32, [0, 1, 20, 40, 80]),
                                             (torch.float64, [0, 1, 20, 40, 100, 700])])
def test_msp_known_answers_at_large_logit_gaps(dtype, gaps):
    # rows (g, 0, 0) and (−3, g − 3, −3): s = 2 e^−g, so 1 − p_max = 2 e^−g / (1 + 2 e^−g);
    # the old −expm1(max log_softmax) gave exactly 0 from g ≈ 16.6 (float32), ≈ 36.7 (float64)
    rows = [[g, 0.0, 0.0] for g in gaps] + [[-3.0, g - 3.0, -3.0] for g in gaps]
    score = msp_score(torch.tensor(rows, dtype=dtype))
    assert score.dtype == dtype
    expected = [_msp_closed_form(row) for row in rows]
    assert score.tolist() == pytest.approx(expected, rel=MSP_REL[dtype], abs=0)
    assert all(value > 0 for value in score.tolist())
    assert msp_score(torch.tensor([[100.0, 0.0]], dtype=torch.float64)).item() == pytest.approx(
        3.720075976020836e-44, rel=1e-14, abs=0)


@pytest.mark.parametrize(("dtype", "gaps"), [(torch.float32, [20.0, 20.5, 40.0, 41.0, 80.0]),
                                             (torch.float64, [40.0, 40.5, 100.0, 101.0, 700.0])])
def test_msp_keeps_the_order_of_very_confident_rows(dtype, gaps):
    score = msp_score(torch.tensor([[g, 0.0] for g in gaps], dtype=dtype)).tolist()
    assert all(a > b for a, b in itertools.pairwise(score))  # larger gap: more known


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_msp_counts_the_other_tied_top_logits(dtype):
    # two tied tops: p_max = 1 / (2 + e^−30), 1 − p_max = (1 + e^−30) / (2 + e^−30)
    rows = [[30.0, 30.0, 0.0], [0.0, 30.0, 30.0], [7.0, 7.0, 7.0], [-50.0, 0.0, -50.0]]
    score = msp_score(torch.tensor(rows, dtype=dtype))
    expected = [_msp_closed_form(row) for row in rows]
    assert score.tolist() == pytest.approx(expected, rel=MSP_REL[dtype], abs=0)
    assert score[2].item() == pytest.approx(2 / 3, rel=MSP_REL[dtype], abs=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_msp_temperature_known_answers(dtype):
    # T = 1000 (ODIN's): z / T has gaps 20 and 40
    rows = [[20000.0, 0.0, 0.0], [0.0, -40000.0, 0.0], [40000.0, 0.0, 0.0]]
    score = msp_score(torch.tensor(rows, dtype=dtype), temperature=1000.0)
    expected = [_msp_closed_form(row, 1000.0) for row in rows]
    assert score.tolist() == pytest.approx(expected, rel=MSP_REL[dtype], abs=0)
    assert score[0] > score[2] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_msp_matches_the_closed_form_on_random_logits(dtype):
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(64, 10, generator=generator, dtype=torch.float64)
              * torch.linspace(0.1, 30.0, 64, dtype=torch.float64)[:, None]).to(dtype)
    expected = [_msp_closed_form(row) for row in logits.double().tolist()]
    assert msp_score(logits).tolist() == pytest.approx(expected, rel=10 * MSP_REL[dtype], abs=0)


def test_max_logit_known_answer():
    assert max_logit_score(np.array([[1.0, 3.0, -2.0]])).tolist() == [-3.0]


def test_energy_known_answers():
    # logsumexp(0, log 3) = log 4
    assert energy_score(np.array([[0.0, math.log(3.0)]])).tolist() == pytest.approx(
        [-math.log(4.0)]
    )
    # T = 2: -2 logsumexp(0, log 3) = -2 log 4
    assert energy_score(np.array([[0.0, 2 * math.log(3.0)]]), temperature=2.0).tolist() == (
        pytest.approx([-2 * math.log(4.0)])
    )


def test_energy_at_temperature_one_is_negative_logsumexp():
    logits = torch.randn(20, 7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(energy_score(logits), -torch.logsumexp(logits, dim=1))


def test_reachability_known_answer_and_brute_force():
    # distances from (3, 4) to (0, 0) and (3, 0): 5 and 4
    features = np.array([[3.0, 4.0]])
    assert reachability_score(features, np.array([[0.0, 0.0], [3.0, 0.0]])).tolist() == [4.0]
    rng = np.random.default_rng(0)
    features, centroids = rng.normal(size=(30, 8)), rng.normal(size=(6, 8))
    brute = np.linalg.norm(features[:, None, :] - centroids[None], axis=2).min(axis=1)
    np.testing.assert_allclose(reachability_score(features, centroids), brute, rtol=1e-10)


def test_probability_threshold_matches_max_softmax_rule():
    assert probability_threshold_to_msp_score(0.1) == pytest.approx(0.9)
    logits = torch.randn(200, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    max_probability = torch.softmax(logits, dim=1).max(dim=1).values.numpy()
    predictions = logits.argmax(dim=1).numpy()
    threshold = probability_threshold_to_msp_score(0.15)
    rejected = reject(predictions, msp_score(logits).numpy(), threshold) == -1
    assert 0 < rejected.sum() < len(rejected)
    np.testing.assert_array_equal(rejected, max_probability < 0.15)
    with pytest.raises(InputError, match=r"probability must lie in \[0, 1\]"):
        probability_threshold_to_msp_score(1.5)


# ------------------------------------------------------------------------- input kinds


def test_output_kind_follows_input_kind():
    logits = np.array([[1.0, 2.0]])
    assert isinstance(msp_score(logits), np.ndarray)
    assert isinstance(msp_score(torch.from_numpy(logits)), torch.Tensor)
    half = energy_score(torch.tensor([[1.0, 2.0]], dtype=torch.float16))
    assert half.dtype == torch.float32
    integers = max_logit_score(np.array([[1, 5]]))
    assert integers.dtype == np.float64 and integers.tolist() == [-5.0]
    score = compute_open_score("energy", logits=torch.tensor([[1.0, 2.0]]))
    assert isinstance(score, np.ndarray) and score.dtype == np.float64


def test_compute_open_score_passes_temperature():
    logits = np.array([[2 * math.log(3.0), 0.0]])
    assert compute_open_score("msp", logits=logits, temperature=2.0).tolist() == pytest.approx(
        [0.25]
    )


# ------------------------------------------------------------------------- errors


def test_compute_open_score_errors_name_the_problem():
    with pytest.raises(InputError, match="valid names: msp, max_logit, energy, reachability"):
        compute_open_score("odin", logits=np.zeros((1, 2)))
    with pytest.raises(InputError, match="'msp' needs logits"):
        compute_open_score("msp", features=np.zeros((1, 2)))
    with pytest.raises(InputError, match="'reachability' needs centroids"):
        compute_open_score("reachability", features=np.zeros((1, 2)))
    with pytest.raises(InputError, match="'max_logit' takes no temperature"):
        compute_open_score("max_logit", logits=np.zeros((1, 2)), temperature=2.0)


def test_bad_arrays_are_rejected():
    with pytest.raises(InputError, match=r"logits must be 2-D, got shape \(3,\)"):
        msp_score(np.zeros(3))
    with pytest.raises(InputError, match=r"logits must be finite; entry \[1, 0\]"):
        energy_score(np.array([[0.0, 1.0], [np.inf, 0.0]]))
    with pytest.raises(InputError, match="features have dimension 3 but centroids have 2"):
        reachability_score(np.zeros((1, 3)), np.zeros((4, 2)))
    with pytest.raises(InputError, match="temperature must be a finite number > 0"):
        energy_score(np.zeros((1, 2)), temperature=0.0)
    with pytest.raises(InputError, match="centroids is empty"):
        reachability_score(np.zeros((1, 3)), np.zeros((0, 3)))
