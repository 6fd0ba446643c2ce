"""Open-set detectors: one interface, the direction (higher = more open), known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import weibull_min
from sklearn.neighbors import NearestNeighbors

from oltr.detectors import (
    DETECTORS,
    KNN,
    MSP,
    ODIN,
    Energy,
    MaxLogit,
    NotFittedError,
    OpenMax,
    Reachability,
    create_detector,
    fit_weibull_tail,
    list_detectors,
    odin_perturb,
    openmax_probabilities,
)
from oltr.errors import InputError
from oltr.openset import compute_open_score

torch.set_num_threads(1)


def training_data() -> dict[str, torch.Tensor]:
    """3 classes: features around 5·e_k, logits peaked on the true class, 30 samples each."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(30)
    one_hot = torch.nn.functional.one_hot(labels, 3).double()
    features = 5.0 * one_hot + 0.3 * torch.randn(90, 3, generator=generator, dtype=torch.float64)
    logits = 10.0 * one_hot + torch.randn(90, 3, generator=generator, dtype=torch.float64)
    return {"logits": logits, "features": features, "labels": labels}


# row 0: a peaked logit vector / a feature near class 0; row 1: flat logits / a far feature
TEST_LOGITS = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
TEST_FEATURES = torch.tensor([[5.0, 0.1, 0.0], [-5.0, -5.0, -5.0]], dtype=torch.float64)


def test_registry():
    assert list_detectors() == ["msp", "max_logit", "energy", "odin", "openmax",
                                "reachability", "knn", "mahalanobis", "relative_mahalanobis",
                                "vim", "react", "ash", "scale", "gen"]
    assert list(DETECTORS) == list_detectors()
    from oltr.config import COMPARISON_DETECTORS  # make compare runs every detector
    assert sorted(COMPARISON_DETECTORS) == sorted(list_detectors())
    assert isinstance(create_detector("energy", temperature=2.0), Energy)
    with pytest.raises(ValueError, match="msp, max_logit, energy, odin"):
        create_detector("nope")


# the detectors that need no head; every registered detector's direction, on non-negative
# features and with a head, is pinned in tests/test_detectors_posthoc.py
@pytest.mark.parametrize("name", ["msp", "max_logit", "energy", "odin", "openmax",
                                  "reachability", "knn", "mahalanobis",
                                  "relative_mahalanobis", "gen"])
def test_direction_open_inputs_score_higher(name):
    detector = create_detector(name).fit(**training_data())
    scores = detector.score(logits=TEST_LOGITS, features=TEST_FEATURES)
    assert scores.dtype == np.float64 and scores.shape == (2,)
    assert scores[1] > scores[0]


@pytest.mark.parametrize("name", ["openmax", "reachability", "knn"])
def test_score_before_fit_is_a_clear_error(name):
    with pytest.raises(NotFittedError, match="call fit"):
        create_detector(name).score(logits=TEST_LOGITS, features=TEST_FEATURES)


def test_missing_inputs_are_named():
    with pytest.raises(InputError, match="score needs logits"):
        MSP().score(features=TEST_FEATURES)
    with pytest.raises(InputError, match="fit needs logits and labels"):
        OpenMax().fit(features=TEST_FEATURES)


def test_logit_detectors_reuse_the_open_scores():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert np.allclose(MSP().score(logits=logits), compute_open_score("msp", logits=logits))
    assert np.allclose(MaxLogit().score(logits=logits), -logits.max(dim=1).values.numpy())
    assert np.allclose(Energy().score(logits=logits), -torch.logsumexp(logits, 1).numpy())
    assert np.allclose(Energy(temperature=2.0).score(logits=logits.numpy()),
                       -2.0 * torch.logsumexp(logits / 2.0, 1).numpy())
    # ODIN with T = 1 (and no perturbation) is MSP; T = 1000 is MSP of z / 1000
    assert np.array_equal(ODIN(temperature=1.0).score(logits=logits), MSP().score(logits=logits))
    assert np.allclose(ODIN().score(logits=logits), MSP().score(logits=logits / 1000.0))


# ----------------------------------------------------------------------------------- ODIN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_odin_and_msp_keep_very_confident_rows_apart(dtype):
    # z / T has gaps 20, 40 and (float64) 100: 1 − p_max = e^−g / (1 + e^−g), not 0
    gaps = [20.0, 40.0] + ([100.0] if dtype == torch.float64 else [])
    rel = 1e-6 if dtype == torch.float32 else 1e-14
    expected = [math.exp(-g) / (1 + math.exp(-g)) for g in gaps]
    for detector, scale in ((MSP(), 1.0), (ODIN(temperature=1000.0), 1000.0)):
        logits = torch.tensor([[0.0, g * scale] for g in gaps], dtype=dtype)
        traced = detector.traceable_score(logits=logits)
        assert traced.dtype == dtype
        assert traced.tolist() == pytest.approx(expected, rel=rel, abs=0)
        assert detector.score(logits=logits).tolist() == traced.tolist()


def test_odin_perturb_with_zero_epsilon_returns_the_input():
    images = torch.randn(2, 3)
    assert torch.equal(odin_perturb(torch.nn.Linear(3, 2), images, 1000.0, 0.0), images)


def test_odin_perturb_known_answer_on_a_linear_model():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    images = torch.tensor([[1.0, 0.5]])
    # ŷ = 0; ∇_x(−log S_0) = (p − e_0)/T = (−, +) → x̃ = x − ε·(−1, +1)
    perturbed = ODIN(temperature=1.0, epsilon=0.1).perturb(model, images)
    assert torch.allclose(perturbed, torch.tensor([[1.1, 0.4]]))
    assert model.weight.grad is None
    assert MSP().score(logits=model(perturbed).detach()) < MSP().score(logits=model(images)
                                                                        .detach())


# -------------------------------------------------------------------------------- OpenMax


def test_openmax_recalibration_known_answer():
    logits = np.array([[3.0, 1.0, 0.0]])
    # distances to the means: 1 (class 0), 2 (class 1), 5 (class 2); Weibull κ = 1, λ = 1:
    # CDF(d) = 1 − e^{−d}; α = 2 → rank weights 1 (class 0) and 1/2 (class 1)
    means = np.array([[4.0, 1.0, 0.0], [3.0, 3.0, 0.0], [3.0, 1.0, 5.0]])
    omega = [math.exp(-1.0), 1.0 - 0.5 * (1.0 - math.exp(-2.0)), 1.0]
    revised = [3.0 * omega[0], 1.0 * omega[1], 0.0]
    unknown = 3.0 * (1.0 - omega[0]) + 1.0 * (1.0 - omega[1])
    exps = [math.exp(x) for x in [*revised, unknown]]
    expected = [x / sum(exps) for x in exps]
    probabilities = openmax_probabilities(logits, means, np.ones(3), np.ones(3), alpha=2)
    assert probabilities[0].tolist() == pytest.approx(expected, rel=1e-12)
    # α = 1: only the top class is recalibrated
    top_only = openmax_probabilities(logits, means, np.ones(3), np.ones(3), alpha=1)
    exps = [math.exp(x) for x in [3.0 * omega[0], 1.0, 0.0, 3.0 * (1.0 - omega[0])]]
    assert top_only[0, -1] == pytest.approx(exps[-1] / sum(exps), rel=1e-12)


def test_openmax_fit_uses_correct_samples_and_scipy_weibull():
    data = training_data()
    logits, labels = data["logits"].clone(), data["labels"]
    logits[0] = torch.tensor([0.0, 20.0, 0.0], dtype=torch.float64)  # class 0, misclassified
    detector = OpenMax(tail_size=10, alpha=2).fit(logits=logits, labels=labels)
    correct = logits[1:30].numpy()
    assert np.allclose(detector.mean_activations[0], correct.mean(axis=0))
    distances = np.linalg.norm(correct - correct.mean(axis=0), axis=1)
    shape, _, scale = weibull_min.fit(np.sort(distances)[-10:], floc=0.0)
    assert (detector.shapes[0], detector.scales[0]) == pytest.approx((shape, scale))
    expected = openmax_probabilities(TEST_LOGITS.numpy(), detector.mean_activations,
                                     detector.shapes, detector.scales, alpha=2)[:, -1]
    assert np.array_equal(detector.score(logits=TEST_LOGITS), expected)


def test_openmax_matches_the_scipy_formula_and_ranks_equal_logits_by_class():
    """The torch recalibration (traceable, for ONNX export) against Alg. 2 written with scipy
    (cdist, weibull_min.cdf, a stable argsort), on rows with tied logits."""
    from scipy.spatial.distance import cdist
    from scipy.special import softmax

    generator = np.random.default_rng(0)
    logits = generator.normal(size=(6, 5)) * 3
    logits[0] = [2.0, 2.0, 2.0, 1.0, 0.0]  # a three-way tie at the top
    logits[1] = [0.0, 1.0, 1.0, 1.0, 1.0]
    means = generator.normal(size=(5, 5)) * 3
    shapes, scales = generator.uniform(0.5, 3, 5), generator.uniform(1, 8, 5)
    for alpha in (1, 2, 3, 5):
        cdf = weibull_min.cdf(cdist(logits, means), shapes[None, :], scale=scales[None, :])
        rank_weights = np.zeros(5)
        rank_weights[:alpha] = (alpha - np.arange(alpha)) / alpha
        ranks = np.argsort(np.argsort(-logits, axis=1, kind="stable"), axis=1)
        omega = 1.0 - rank_weights[ranks] * cdf
        revised = logits * omega
        expected = softmax(np.concatenate(
            [revised, (logits - revised).sum(axis=1, keepdims=True)], axis=1), axis=1)
        got = openmax_probabilities(logits, means, shapes, scales, alpha=alpha)
        assert np.allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_weibull_fit_of_degenerate_tails():
    assert fit_weibull_tail(np.array([0.0]), 20) == (1.0, np.finfo(np.float64).tiny)
    assert fit_weibull_tail(np.array([0.5, 0.5]), 20) == (1.0, 0.5)


# --------------------------------------------------------------------- feature detectors


def test_reachability_known_answer_with_fitted_or_given_centroids():
    features = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    queries = torch.tensor([[1.0, 0.0], [4.0, 4.0], [10.0, 3.0]])
    # centroids (1, 0) and (10, 0): distances 0, 5, 3
    fitted = Reachability().fit(features=features, labels=labels)
    assert fitted.score(features=queries).tolist() == pytest.approx([0.0, 5.0, 3.0])
    given = Reachability(centroids=np.array([[1.0, 0.0], [10.0, 0.0]])).fit()
    assert given.score(features=queries).tolist() == pytest.approx([0.0, 5.0, 3.0])


def test_knn_known_answer():
    train = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]], dtype=torch.float64)
    queries = torch.tensor([[5.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    # (5, 0) is on train[0]: k = 1 → 0; k = 2 → the diagonal: √(2 − √2)
    assert KNN(k=1).fit(features=train).score(features=queries).tolist() == pytest.approx(
        [0.0, math.sqrt(2.0)], abs=1e-7)
    assert KNN(k=2).fit(features=train).score(features=queries)[0] == pytest.approx(
        math.sqrt(2.0 - math.sqrt(2.0)))


def test_knn_matches_scikit_learn_on_random_features():
    generator = np.random.default_rng(0)
    train, queries = generator.normal(size=(200, 8)), generator.normal(size=(20, 8))
    unit_train = train / np.linalg.norm(train, axis=1, keepdims=True)
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    distances, _ = NearestNeighbors(n_neighbors=5).fit(unit_train).kneighbors(unit_queries)
    scores = KNN(k=5).fit(features=train).score(features=queries)
    assert np.allclose(scores, distances[:, -1])
    with pytest.raises(InputError, match="at least 5"):
        KNN(k=5).fit(features=train[:3])


def test_a_registered_detector_of_ones_own_is_found_everywhere(tmp_path):
    """register_detector: a Detector subclass of the user's own becomes an open score that
    configs accept and a saved decision rule restores; bad registrations are refused."""
    from typing import ClassVar

    import oltr.detectors as D
    from oltr.config import load_config
    from oltr.decision import DecisionRule
    from oltr.errors import InputError

    @D.register_detector
    class HalfEnergy(D.Detector):
        """Half the energy score (a test detector)."""

        name: ClassVar[str] = "half_energy_test"
        inputs: ClassVar[tuple[str, ...]] = ("logits",)

        def _score(self, logits):
            return 0.5 * D.Energy().score(logits=logits)

    try:
        config = load_config("plain", overrides=["eval.open_score=half_energy_test"])
        assert config["eval"]["open_score"] == "half_energy_test"
        rule = DecisionRule(class_names=["a", "b"], train_counts=torch.tensor([3, 2]),
                            open_score="half_energy_test", detector=HalfEnergy(), threshold=0.0)
        rule.save(tmp_path)
        loaded = DecisionRule.load(tmp_path)
        logits = torch.tensor([[2.0, 0.0], [0.1, 0.0]])
        assert torch.equal(loaded.apply(logits, torch.zeros(2, 3))["prediction"],
                           rule.apply(logits, torch.zeros(2, 3))["prediction"])
        with pytest.raises(InputError, match="already registered"):
            D.register_detector(type("Other", (HalfEnergy,), {}))
        with pytest.raises(InputError, match="subclass of oltr.detectors.Detector"):
            D.register_detector(int)
    finally:
        D.DETECTORS.pop("half_energy_test", None)
