"""Post-hoc detectors of today's leaderboards (OpenOOD v1.5): Mahalanobis, relative
Mahalanobis, ViM, ReAct, ASH, SCALE, GEN — known answers and cross-checks against
numpy/scipy/scikit-learn — plus the contract every registered detector keeps (direction,
shapes, determinism, a clear error before fit, a state that survives a safetensors file)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.special import expit, logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance, LedoitWolf

from oltr.detectors import (
    ASH,
    DETECTORS,
    GEN,
    SCALE,
    LinearHead,
    Mahalanobis,
    NetworkHead,
    NotFittedError,
    Reachability,
    ReAct,
    RelativeMahalanobis,
    ViM,
    ash,
    create_detector,
    generalized_entropy,
    network_head,
    restore_detector,
    scale_activations,
)
from oltr.detectors.ash import kept_count
from oltr.detectors.covariance import ledoit_wolf_covariance
from oltr.detectors.react import activation_percentile
from oltr.errors import InputError
from oltr.models import create_network

torch.set_num_threads(1)

NUM_CLASSES, DIM = 3, 8
# a linear head that reads class k off feature k: logits ≈ 10 on the true class
HEAD = LinearHead(2.0 * torch.eye(NUM_CLASSES, DIM, dtype=torch.float64),
                  torch.zeros(NUM_CLASSES, dtype=torch.float64))


def training_data() -> dict:
    """3 classes of non-negative (post-ReLU) 8-d features around 5·e_k, 30 samples each,
    their logits through HEAD, and HEAD itself."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(30)
    noise = torch.randn(90, DIM, generator=generator, dtype=torch.float64).abs()
    features = 5.0 * F.one_hot(labels, DIM).double() + 0.5 * noise
    return {"logits": HEAD(features), "features": features, "labels": labels, "head": HEAD}


def inputs(features: torch.Tensor) -> dict:
    return {"logits": HEAD(features), "features": features, "head": HEAD}


# row 0: a feature of class 0; row 1: activations where no known class has any (flat logits)
KNOWN = torch.full((DIM,), 0.25, dtype=torch.float64) + 5.0 * torch.eye(DIM, dtype=torch.float64)[0]
OPEN = torch.tensor([0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0, 5.0], dtype=torch.float64)
TEST = torch.stack([KNOWN, OPEN])

# registry-wide: every detector with its defaults, and the options that change its state
OPTION_CASES = [(name, {}) for name in DETECTORS] + [
    ("energy", {"temperature": 2.0}),
    ("odin", {"temperature": 10.0, "epsilon": 0.0}),
    ("openmax", {"tail_size": 5, "alpha": 2, "distance": "eucos"}),
    ("knn", {"k": 3}),
    ("mahalanobis", {"covariance": "ledoit_wolf"}),
    ("relative_mahalanobis", {"covariance": "ledoit_wolf"}),
    ("vim", {"principal_dim": 2, "origin": "mean"}),
    ("react", {"percentile": 50.0}),
    ("ash", {"percentile": 65.0, "variant": "b"}),
    ("ash", {"percentile": 50.0, "variant": "p"}),
    ("scale", {"percentile": 60.0}),
    ("gen", {"gamma": 0.5, "top_m": 2}),
]


def _case_id(case: tuple[str, dict]) -> str:
    name, options = case
    return name + "".join(f"-{key}={value}" for key, value in options.items())


# ------------------------------------------------------------------ the registry contract


@pytest.mark.parametrize("name", list(DETECTORS))
def test_direction_open_inputs_score_higher(name):
    scores = create_detector(name).fit(**training_data()).score(**inputs(TEST))
    assert scores.dtype == np.float64 and scores.shape == (2,)
    assert scores[1] > scores[0]


@pytest.mark.parametrize("name", list(DETECTORS))
def test_shapes_dtype_and_array_kinds(name):
    detector = create_detector(name).fit(**training_data())
    queries = training_data()["features"][::9] + 0.1  # 10 rows
    scores = detector.score(**inputs(queries))
    assert scores.dtype == np.float64 and scores.shape == (10,) and np.isfinite(scores).all()
    one = detector.score(**inputs(queries[:1]))
    assert one.shape == (1,) and one[0] == pytest.approx(scores[0], rel=1e-12, abs=1e-12)
    as_numpy = {key: value.numpy() if isinstance(value, torch.Tensor) else value
                for key, value in inputs(queries).items()}
    assert np.allclose(detector.score(**as_numpy), scores, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(DETECTORS))
def test_deterministic(name):
    first = create_detector(name).fit(**training_data())
    second = create_detector(name).fit(**training_data())
    assert np.array_equal(first.score(**inputs(TEST)), first.score(**inputs(TEST)))
    assert np.array_equal(first.score(**inputs(TEST)), second.score(**inputs(TEST)))


@pytest.mark.parametrize("name", list(DETECTORS))
def test_score_or_save_before_fit(name):
    detector = create_detector(name)
    if not detector.fit_inputs:  # nothing to learn: scores at once, saves an empty state
        assert detector.is_fitted and detector.state_dict() == {}
        assert detector.score(**inputs(TEST)).shape == (2,)
        return
    with pytest.raises(NotFittedError, match=rf"detector '{name}' learns from training data: "
                                             r"call fit\(.*\) before you score"):
        detector.score(**inputs(TEST))
    with pytest.raises(NotFittedError, match="before you save"):
        detector.state_dict()


@pytest.mark.parametrize("case", OPTION_CASES, ids=_case_id)
def test_state_round_trip_through_safetensors(case, tmp_path):
    name, options = case
    detector = create_detector(name, **options).fit(**training_data())
    expected = detector.score(**inputs(TEST))
    state = detector.state_dict()
    assert set(state) == set(detector.state_names)
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in state.values())
    config = json.loads(json.dumps(detector.config()))
    assert config == {**create_detector(name).config(), **options}
    save_file(state, tmp_path / "detector.safetensors")
    for value in state.values():  # the saved state is a copy: the detector does not change
        value.fill_(7.0)
    restored = restore_detector(name, config, load_file(tmp_path / "detector.safetensors"))
    assert restored.is_fitted
    assert np.array_equal(restored.score(**inputs(TEST)), expected)
    assert np.array_equal(detector.score(**inputs(TEST)), expected)


def test_reachability_with_given_centroids_round_trips(tmp_path):
    centroids = np.array([[5.0, 0, 0, 0, 0, 0, 0, 0], [0, 5.0, 0, 0, 0, 0, 0, 0]])
    given = Reachability(centroids=centroids)
    assert given.config() == {"normalize": False, "prototypes": 1}  # the published form
    save_file(given.state_dict(), tmp_path / "r.safetensors")
    restored = restore_detector("reachability", {}, load_file(tmp_path / "r.safetensors"))
    assert np.array_equal(restored.score(features=TEST), given.score(features=TEST))
    assert restored.score(features=TEST)[0] == pytest.approx(math.sqrt(8 * 0.0625))


def test_bad_states_and_configs_are_clear_errors():
    state = Mahalanobis().fit(**training_data()).state_dict()
    with pytest.raises(InputError, match=r"exactly \['class_means', 'precision'\]; missing "
                                         r"\['precision'\], unexpected \['extra'\]"):
        Mahalanobis().load_state_dict({"class_means": state["class_means"],
                                       "extra": torch.zeros(1)})
    with pytest.raises(InputError, match=r"state 'precision' must be a floating tensor of "
                                         r"shape \(8, 8\)"):
        Mahalanobis().load_state_dict({**state, "precision": torch.zeros(3, 3)})
    with pytest.raises(InputError, match="state 'precision' must be a tensor"):
        Mahalanobis().load_state_dict({**state, "precision": [[1.0]]})
    with pytest.raises(InputError, match="must hold exactly"):
        ViM().load_state_dict(state)
    with pytest.raises(InputError, match="bad options"):
        restore_detector("knn", {"neighbours": 3}, {})
    with pytest.raises(InputError, match="unknown detector"):
        restore_detector("nope", {}, {})


def test_a_missing_head_is_named():
    react = ReAct().fit(features=training_data()["features"])
    with pytest.raises(InputError, match=r"detector 'react': score needs head \(a callable "
                                         r"features \(N, d\) → logits \(N, K\)"):
        react.score(features=TEST)
    with pytest.raises(InputError, match="head must be a callable"):
        ASH().score(features=TEST, head="fc")
    with pytest.raises(InputError, match=r"head must return logits \(2, K\)"):
        ASH().score(features=TEST, head=lambda v: {"logits": HEAD(v)})
    with pytest.raises(InputError, match="head logits must be finite"):
        ASH().score(features=TEST, head=lambda v: HEAD(v) / 0.0)


# ----------------------------------------------------------------------------- Mahalanobis

# two classes of 4 points: class 0 around (0, 0), class 1 the same shifted by (10, 0);
# shared covariance diag(0.5, 2), precision diag(2, 0.5)
GAUSS_FEATURES = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -2.0], [0.0, 2.0],
                               [9.0, 0.0], [11.0, 0.0], [10.0, -2.0], [10.0, 2.0]])
GAUSS_LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
GAUSS_QUERIES = torch.tensor([[0.0, 2.0], [5.0, 0.0]])


def test_mahalanobis_known_answer():
    detector = Mahalanobis().fit(features=GAUSS_FEATURES, labels=GAUSS_LABELS)
    assert torch.allclose(detector.precision, torch.diag(torch.tensor([2.0, 0.5])).double())
    # (0, 2): 4 · 0.5 = 2 to class 0; (5, 0): 25 · 2 = 50 to either class
    assert detector.score(features=GAUSS_QUERIES).tolist() == pytest.approx([2.0, 50.0])


def test_relative_mahalanobis_known_answer():
    detector = RelativeMahalanobis().fit(features=GAUSS_FEATURES, labels=GAUSS_LABELS)
    # background: mean (5, 0), covariance diag(204/8, 16/8) = diag(25.5, 2)
    assert detector.background_mean.tolist() == pytest.approx([5.0, 0.0])
    # (0, 2): 2 − (25/25.5 + 4/2); (5, 0): 50 − 0
    assert detector.score(features=GAUSS_QUERIES).tolist() == pytest.approx(
        [2.0 - (25.0 / 25.5 + 2.0), 50.0])


def _random_gaussian_data(seed: int = 0):
    generator = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), [25, 20, 15])
    mixing = generator.normal(size=(5, 5))
    features = generator.normal(size=(60, 5)) @ mixing + 3.0 * labels[:, None]
    features = np.concatenate([features, np.zeros((60, 1))], axis=1)  # a dead unit
    queries = generator.normal(size=(7, 6)) * 4.0
    return features, labels, queries


@pytest.mark.parametrize(("covariance", "estimator"), [("empirical", EmpiricalCovariance),
                                                       ("ledoit_wolf", LedoitWolf)])
def test_mahalanobis_matches_scikit_learn(covariance, estimator):
    features, labels, queries = _random_gaussian_data()
    means = np.stack([features[labels == k].mean(axis=0) for k in range(3)])
    fitted = estimator(assume_centered=True).fit(features - means[labels])
    expected = np.min([fitted.mahalanobis(queries - mean) for mean in means], axis=0)
    detector = Mahalanobis(covariance=covariance).fit(features=features, labels=labels)
    assert np.allclose(detector.precision.numpy(), fitted.precision_, rtol=1e-9, atol=1e-9)
    assert np.allclose(detector.score(features=queries), expected, rtol=1e-9)

    background = estimator().fit(features)  # centred at the mean of all features
    relative = RelativeMahalanobis(covariance=covariance).fit(features=features, labels=labels)
    assert np.allclose(relative.score(features=queries),
                       expected - background.mahalanobis(queries), rtol=1e-9, atol=1e-9)


def test_ledoit_wolf_shrinkage_matches_scikit_learn():
    features, _, _ = _random_gaussian_data(1)
    centred = features - features.mean(axis=0)
    covariance, shrinkage = ledoit_wolf_covariance(torch.from_numpy(centred))
    reference = LedoitWolf(assume_centered=True).fit(centred)
    assert shrinkage == pytest.approx(reference.shrinkage_, rel=1e-10)
    assert np.allclose(covariance.numpy(), reference.covariance_, rtol=1e-10)


def test_mahalanobis_refuses_empty_classes_and_other_dimensions():
    with pytest.raises(InputError, match="class 1 has none"):
        Mahalanobis().fit(features=GAUSS_FEATURES[:3], labels=torch.tensor([0, 2, 2]))
    detector = Mahalanobis().fit(features=GAUSS_FEATURES, labels=GAUSS_LABELS)
    with pytest.raises(InputError, match="dimension 3 but Mahalanobis was fitted on 2"):
        detector.score(features=torch.zeros(1, 3))
    with pytest.raises(InputError, match="unknown covariance estimator"):
        Mahalanobis(covariance="graphical_lasso")


# ------------------------------------------------------------------------------------- ViM


def test_vim_known_answer():
    # W = [[1, 0], [−1, 0]], b = [−1, 1]: u = −W⁺b = (1, 0), logits ±(x₁ − 1)
    head = LinearHead(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([-1.0, 1.0]))
    train = torch.tensor([[3.0, 1.0], [-1.0, -1.0], [3.0, -1.0], [-1.0, 1.0]])
    detector = ViM(principal_dim=1).fit(features=train, head=head)
    # x − u = (±2, ±1): principal axis x₁, residual |x₂| = 1, max logit 2 → α = 2
    assert detector.u.tolist() == pytest.approx([1.0, 0.0])
    assert float(detector.alpha) == pytest.approx(2.0)
    scores = detector.score(features=torch.tensor([[1.0, 3.0], [4.0, 0.0]]), head=head)
    # (1, 3): logits (0, 0), virtual logit 2·3; (4, 0): logits (3, −3), virtual logit 0
    assert scores.tolist() == pytest.approx([6.0 - math.log(2.0), -logsumexp([3.0, -3.0])])


def _vim_reference(features, queries, weight, bias, principal_dim, u=None):
    """OpenOOD v1.5's vim_postprocessor, with numpy and scikit-learn."""
    if u is None:
        u = -np.linalg.pinv(weight) @ bias
    covariance = EmpiricalCovariance(assume_centered=True).fit(features - u).covariance_
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    residual_space = eigenvectors[:, np.argsort(-eigenvalues)[principal_dim:]]
    alpha = (features @ weight.T + bias).max(axis=1).mean() / np.linalg.norm(
        (features - u) @ residual_space, axis=1).mean()
    virtual = alpha * np.linalg.norm((queries - u) @ residual_space, axis=1)
    logits = queries @ weight.T + bias
    return virtual - logsumexp(logits, axis=1), logits, virtual


def test_vim_matches_the_reference_computation():
    generator = np.random.default_rng(0)
    weight, bias = generator.normal(size=(4, 10)), generator.normal(size=4)
    features = np.maximum(generator.normal(size=(200, 10)) + 0.5, 0.0)
    queries = np.maximum(generator.normal(size=(9, 10)) * 2.0, 0.0)
    expected, logits, virtual = _vim_reference(features, queries, weight, bias, 5)
    head = LinearHead(weight, bias)
    scores = ViM(principal_dim=5).fit(features=features, head=head).score(features=queries,
                                                                          head=head)
    assert np.allclose(scores, expected, rtol=1e-9, atol=1e-9)
    # the score is the logit of the virtual class' softmax probability (the paper's score)
    probability = softmax(np.concatenate([logits, virtual[:, None]], axis=1), axis=1)[:, -1]
    assert np.allclose(expit(scores), probability, rtol=1e-9)
    # an nn.Linear is a linear head as well; d // 2 is the default principal dimension
    linear = torch.nn.Linear(10, 4).double()
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight))
        linear.bias.copy_(torch.from_numpy(bias))
    default = ViM().fit(features=features, head=linear)
    assert default.residual_basis.shape == (10, 5)
    assert np.allclose(default.score(features=queries, head=linear), expected, rtol=1e-9)


def test_vim_non_linear_heads_take_the_mean_origin():
    generator = np.random.default_rng(1)
    weight, bias = generator.normal(size=(4, 10)), generator.normal(size=4)
    features = np.maximum(generator.normal(size=(200, 10)) + 0.5, 0.0)
    queries = np.maximum(generator.normal(size=(9, 10)) * 2.0, 0.0)
    head = LinearHead(weight, bias)
    opaque = lambda v: head(v)  # a head whose W and b ViM cannot see
    with pytest.raises(InputError, match=r"ViM's origin u = −W⁺b needs a linear head .*"
                                         r"use ViM\(origin='mean'\)"):
        ViM(origin="head").fit(features=features, head=opaque)
    expected, _, _ = _vim_reference(features, queries, weight, bias, 3, u=features.mean(axis=0))
    detector = ViM(principal_dim=3, origin="mean").fit(features=features, head=opaque)
    assert np.allclose(detector.score(features=queries, head=opaque), expected, rtol=1e-9)
    automatic = ViM(principal_dim=3).fit(features=features, head=opaque)  # origin="auto"
    assert automatic.origin_used == "mean"
    assert np.allclose(automatic.score(features=queries, head=opaque), expected, rtol=1e-9)
    assert ViM(principal_dim=3).fit(features=features, head=head).origin_used == "head"
    with pytest.raises(InputError, match="principal_dim must be below the feature dimension"):
        ViM(principal_dim=10).fit(features=features, head=head)
    with pytest.raises(InputError, match="unknown ViM origin"):
        ViM(origin="zero")


# ----------------------------------------------------------------------- ReAct, ASH, SCALE


@pytest.mark.parametrize("percentile", [0.0, 12.5, 50.0, 90.0, 99.0, 100.0])
def test_activation_percentile_matches_numpy(percentile):
    values = torch.from_numpy(np.random.default_rng(0).gamma(2.0, size=(37, 11)))
    assert float(activation_percentile(values, percentile)) == pytest.approx(
        np.percentile(values.numpy(), percentile), rel=1e-12)


def test_react_known_answer():
    train = torch.arange(8.0).reshape(2, 4)  # entries 0..7: the 50th percentile is 3.5
    head = LinearHead(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]),
                      torch.tensor([0.0, 1.0]))
    detector = ReAct(percentile=50).fit(features=train)
    assert float(detector.threshold) == 3.5
    # (10, 0, 0, 2) → clipped (3.5, 0, 0, 2) → logits (3.5, 3)
    assert detector.score(features=torch.tensor([[10.0, 0.0, 0.0, 2.0]]), head=head)[0] == \
        pytest.approx(-logsumexp([3.5, 3.0]))
    with pytest.raises(InputError, match=r"percentile must lie in \[0, 100\]"):
        ReAct(percentile=101)


def test_ash_variants_known_answer():
    v = torch.tensor([[4.0, 0.0, 1.0, 3.0]])  # s1 = 8; p = 50 keeps 4 and 3 (s2 = 7)
    scale = math.exp(8.0 / 7.0)
    assert ash(v, 50, "s")[0].tolist() == pytest.approx([4.0 * scale, 0.0, 0.0, 3.0 * scale])
    assert ash(v, 50, "b").tolist() == [[4.0, 0.0, 0.0, 4.0]]  # s1 / k = 8 / 2
    assert ash(v, 50, "p").tolist() == [[4.0, 0.0, 0.0, 3.0]]
    assert scale_activations(v, 50)[0].tolist() == pytest.approx([4.0 * scale, 0.0, scale,
                                                                  3.0 * scale])
    assert ash(torch.zeros(1, 4), 50, "s").tolist() == [[0.0] * 4]  # no 0/0
    identity = LinearHead(torch.eye(4), torch.zeros(4))
    assert ASH(percentile=50).score(features=v, head=identity)[0] == pytest.approx(
        -logsumexp([4.0 * scale, 0.0, 0.0, 3.0 * scale]))
    assert SCALE(percentile=50).score(features=v, head=identity)[0] == pytest.approx(
        -logsumexp([4.0 * scale, 0.0, scale, 3.0 * scale]))


@pytest.mark.parametrize(("dim", "percentile"), [(512, 90), (512, 65), (10, 65), (10, 85),
                                                 (2048, 85), (7, 50)])
def test_ash_keeps_as_many_activations_as_the_reference(dim, percentile):
    # the ASH authors' and OpenOOD's rule: k = n − int(np.round(n · p / 100))
    assert kept_count(dim, percentile) == dim - int(np.round(dim * percentile / 100.0))


def test_ash_and_scale_keep_at_least_one_and_refuse_negative_activations():
    assert kept_count(3, 90) == 1  # round(2.7) = 3 would keep none
    with pytest.raises(InputError, match=r"ASH needs non-negative activations .* entry \[1, 0\]"):
        ASH().score(features=torch.tensor([[1.0, 2.0], [-1.0, 0.0]]), head=HEAD)
    with pytest.raises(InputError, match="SCALE needs non-negative activations"):
        SCALE().score(features=-TEST, head=HEAD)
    with pytest.raises(InputError, match="unknown ASH variant"):
        ASH(variant="rand")
    with pytest.raises(InputError, match=r"percentile must lie in \[0, 100\)"):
        SCALE(percentile=100)


def test_float32_features_reach_a_float32_head_unchanged():
    linear = torch.nn.Linear(DIM, NUM_CLASSES)  # float32, called as a plain callable
    features = training_data()["features"].float()
    for detector in (ReAct().fit(features=features), ASH(), SCALE()):
        scores = detector.score(features=features, head=lambda v: linear(v))
        assert scores.dtype == np.float64 and np.isfinite(scores).all()


# ------------------------------------------------------------------------------------- GEN


def test_gen_known_answers():
    # flat logits over K = 4: p = 1/4 each → G = 4 (1/4 · 3/4)^0.1
    assert GEN().score(logits=torch.zeros(1, 4))[0] == pytest.approx(4.0 * (3.0 / 16.0) ** 0.1)
    # K = 2: 1 − p₁ = p₂, so G = 2 (p₁ p₂)^γ; at a gap of 40, p₁ rounds to 1 in float64 but
    # G keeps both halves: log(p₁ p₂) = −40 − 2 log(1 + e^−40)
    expected = 2.0 * math.exp(0.1 * (-40.0 - 2.0 * math.log1p(math.exp(-40.0))))
    assert GEN().score(logits=torch.tensor([[40.0, 0.0]]))[0] == pytest.approx(expected,
                                                                                 rel=1e-12)


def test_gen_ties_and_a_single_class():
    # a tie at the top: p = (1/2, 1/2) → G = 2 (1/4)^γ; one class: p = 1 → G = 0
    assert GEN().score(logits=torch.tensor([[3.0, 3.0]]))[0] == pytest.approx(2.0 * 0.25 ** 0.1)
    assert GEN().score(logits=torch.tensor([[3.0]]))[0] == 0.0


def test_gen_matches_the_reference_formula_on_the_top_m():
    logits = np.random.default_rng(0).normal(size=(6, 7)) * 2.0
    probabilities = np.sort(softmax(logits, axis=1), axis=1)[:, -3:]  # OpenOOD's top M
    expected = np.sum(probabilities ** 0.3 * (1.0 - probabilities) ** 0.3, axis=1)
    assert np.allclose(GEN(gamma=0.3, top_m=3).score(logits=logits), expected, rtol=1e-12)
    assert np.allclose(generalized_entropy(torch.from_numpy(logits), 0.1, 100).numpy(),
                       GEN(gamma=0.1, top_m=7).score(logits=logits), rtol=1e-15)
    with pytest.raises(InputError, match="GEN gamma must be a finite number > 0"):
        GEN(gamma=0)
    with pytest.raises(InputError, match="GEN top_m must be an integer >= 1"):
        GEN(top_m=0)


# -------------------------------------------------------------------- heads of the network

SMALL = {"backbone": "resnet10_small", "width": 8}  # 64-d features
STAGE2 = {**SMALL, "classifier": "cosine", "attention": True, "meta_embedding": True}


def _direct_features(net, n: int = 12, seed: int = 0) -> torch.Tensor:
    images = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return net.pool(net.forward_features(images))


def test_network_head_of_a_plain_and_an_oltr_network():
    torch.manual_seed(0)
    plain = create_network(SMALL, num_classes=4, in_chans=1).eval()
    head = network_head(plain)
    assert isinstance(head, LinearHead) and torch.equal(head.weight, plain.classifier.weight)
    v = _direct_features(plain)
    assert torch.allclose(head(v), plain.forward_head(v).logits, atol=1e-6)

    oltr = create_network(STAGE2, num_classes=4, in_chans=1).eval()
    head = network_head(oltr)
    assert isinstance(head, NetworkHead)
    v = _direct_features(oltr)
    assert torch.equal(head(v.double()), oltr.forward_head(v).logits)  # cast to the net's
    with pytest.raises(InputError, match="eval mode"):
        network_head(oltr.train())
    with pytest.raises(InputError, match="needs an nn.Linear"):
        LinearHead.from_module(oltr.classifier)


def test_feature_shaping_detectors_run_through_an_oltr_head():
    torch.manual_seed(0)
    net = create_network(STAGE2, num_classes=4, in_chans=1).eval()
    head = network_head(net)
    train, test = _direct_features(net, 40, 0), _direct_features(net, 6, 1)
    react = ReAct().fit(features=train)
    expected = -torch.logsumexp(
        net.forward_head(test.clamp(max=float(react.threshold))).logits.double(), dim=1)
    assert np.allclose(react.score(features=test, head=head), expected.detach().numpy(),
                       rtol=1e-6)
    for detector in (ASH(), SCALE(), ViM(origin="mean").fit(features=train, head=head)):
        assert np.isfinite(detector.score(features=test, head=head)).all()
    with pytest.raises(InputError, match="needs a linear head"):
        ViM(origin="head").fit(features=train, head=head)
    assert ViM().fit(features=train, head=head).origin_used == "mean"  # auto: the mean origin


def test_reachability_on_unit_vectors_and_with_several_prototypes_per_class():
    """normalize: ‖v/‖v‖ − c/‖c‖‖ (hand-computed); prototypes: k-means centres per class, so a
    class made of two clusters has a memory entry at each."""
    centroids = np.array([[3.0, 0.0], [0.0, 2.0]])
    plain = Reachability(centroids=centroids)
    unit = Reachability(centroids=centroids, normalize=True)
    features = np.array([[10.0, 0.0], [1.0, 1.0]])
    assert plain.score(features=features).tolist() == pytest.approx([7.0, math.sqrt(2.0)])
    # (1, 0) vs (1, 0): 0; (1, 1)/√2 vs (1, 0) or (0, 1): √(2 − √2)
    assert unit.score(features=features).tolist() == pytest.approx(
        [0.0, math.sqrt(2 - math.sqrt(2))])
    labels = np.array([0] * 4 + [1] * 2)
    train = np.array([[0.0, 0.0], [0.2, 0.0], [10.0, 0.0], [10.2, 0.0], [5.0, 5.0], [5.0, 5.2]])
    two = Reachability(prototypes=2).fit(features=train, labels=labels)
    assert sorted(map(tuple, two.state_dict()["centroids"].round(decimals=3).tolist())) == [
        (0.1, 0.0), (5.0, 5.0), (5.0, 5.2), (10.1, 0.0)]
    assert two.score(features=np.array([[0.1, 0.0]]))[0] == pytest.approx(0.0, abs=1e-6)
    one = Reachability().fit(features=train, labels=labels)  # the class mean (5.1, 0) instead
    assert one.score(features=np.array([[0.1, 0.0]]))[0] == pytest.approx(5.0, abs=1e-6)
    with pytest.raises(InputError, match="takes no given centroids"):
        Reachability(centroids=centroids, prototypes=2)


def test_knn_without_normalisation_is_the_kth_nearest_euclidean_distance():
    from oltr.detectors import KNN

    train = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 10.0]])
    knn = KNN(k=2, normalize=False).fit(features=train)
    # from (0, 4): distances 4, 5, 6 → the 2nd nearest is 5
    assert knn.score(features=np.array([[0.0, 4.0]]))[0] == pytest.approx(5.0)
    assert knn.config() == {"k": 2, "normalize": False}
