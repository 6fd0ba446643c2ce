"""Open scores: the direction (higher = more open), known answers, and the registry."""
from __future__ import annotations

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


def test_msp_keeps_confident_inputs_apart_where_the_probability_rounds_to_one():
    logits = torch.tensor([[40.0, 0.0], [50.0, 0.0]], dtype=torch.float64)
    assert torch.softmax(logits, dim=1).max(dim=1).values.tolist() == [1.0, 1.0]
    score = msp_score(logits)
    assert score.tolist() == pytest.approx([math.exp(-40), math.exp(-50)], rel=1e-9)


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
