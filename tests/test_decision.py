"""The decision rule (oltr.decision): grid selection, objectives, fitting on val, saving."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from oltr.decision import (
    LOGIT_ADJUSTMENT_GRID,
    DecisionRule,
    SplitOutputs,
    balanced_accuracy,
    best_f_threshold,
    fit_decision_rule,
    select_on_grid,
)
from oltr.errors import InputError


def test_select_on_grid_takes_the_best_and_breaks_ties_toward_neutral():
    grid = (-1.0, -0.5, 0.0, 0.5, 1.0)
    assert select_on_grid(grid, lambda t: -abs(t - 0.5))[0] == 0.5
    # plateau over [-0.5, 1]: the value nearest 0 wins
    assert select_on_grid(grid, lambda t: 1.0 if t >= -0.5 else 0.0)[0] == 0.0
    # plateau over {-0.5, 0.5}: equidistant, the smaller wins
    assert select_on_grid(grid, lambda t: 1.0 if abs(t) == 0.5 else 0.0)[0] == -0.5
    value, values = select_on_grid(grid, lambda t: float("nan") if t < 1 else 0.3)
    assert value == 1.0 and values[-1] == 0.3
    assert -1.0 in LOGIT_ADJUSTMENT_GRID and 0.0 in LOGIT_ADJUSTMENT_GRID


def test_balanced_accuracy_matches_scikit_learn():
    generator = np.random.default_rng(0)
    logits = generator.normal(size=(200, 5))
    labels = generator.integers(0, 5, 200)
    labels[:30] = 0
    expected = balanced_accuracy_score(labels, logits.argmax(1))
    assert balanced_accuracy(torch.from_numpy(logits), labels) == pytest.approx(expected)


def _outputs(logits, labels, features=None):
    logits = torch.as_tensor(logits, dtype=torch.float32)
    features = torch.as_tensor(features if features is not None else logits.clamp_min(0),
                               dtype=torch.float32)
    return SplitOutputs(logits=logits, features=features, labels=torch.as_tensor(labels))


def test_logit_adjustment_is_selected_for_balanced_val_accuracy():
    """A model biased toward the head class (logit +1 for class 0), trained on 2:1 data:
    a negative τ (log π differs by ln 2) undoes the bias; balanced val accuracy picks it."""
    counts = np.array([200, 100])
    labels = np.array([0] * 50 + [1] * 50)
    generator = np.random.default_rng(1)
    margin = generator.uniform(0.05, 0.6, 100)
    logits = np.zeros((100, 2))
    logits[:, 0] = 1.0  # the bias: every class-1 image is misclassified at τ = 0
    logits[np.arange(100), labels] += np.where(labels == 1, 1.0 - margin, margin)
    rule = fit_decision_rule({"logit_adjustment": "auto"}, {"val": _outputs(logits, labels)},
                             class_names=["a", "b"], train_counts=counts, open_set=False)
    assert rule.logit_adjustment < 0
    decided = rule.apply(torch.as_tensor(logits, dtype=torch.float32),
                         torch.zeros(100, 2))["closed_prediction"].numpy()
    assert (decided == labels).mean() == 1.0
    assert rule.record["logit_adjustment"]["source"].startswith("selected on val")
    # a model that is already balanced keeps τ = 0 (ties go to the neutral value)
    balanced = np.eye(2)[labels] * 3.0
    neutral = fit_decision_rule({"logit_adjustment": "auto"},
                                {"val": _outputs(balanced, labels)}, class_names=["a", "b"],
                                train_counts=counts, open_set=False)
    assert neutral.logit_adjustment == 0.0


def test_threshold_accepts_the_asked_share_of_known_val_images():
    labels = np.repeat(np.arange(4), 25)
    logits = np.eye(4)[labels] * np.linspace(1, 5, 100)[:, None]
    outputs = {"val": _outputs(logits, labels)}
    rule = fit_decision_rule({"open_score": "msp", "accept_rate": 0.9}, outputs,
                             class_names=list("abcd"), train_counts=[10, 10, 10, 10])
    scores = rule.score(outputs["val"].logits, outputs["val"].features)
    assert np.mean(scores <= rule.threshold) >= 0.9
    assert np.mean(scores < rule.threshold) < 0.9
    assert "calibrated on val" in rule.record["threshold"]["source"]


def test_f_measure_threshold_is_the_best_on_val_and_open_selection_needs_val_open():
    labels = np.repeat(np.arange(2), 50)
    known = np.eye(2)[labels] * 4.0
    opened = np.full((20, 2), 0.5)  # flat logits: MSP 0.5, clearly open
    outputs = {"val": _outputs(known, labels), "val_open": _outputs(opened, [-1] * 20)}
    rule = fit_decision_rule({"open_score": "msp", "select": "f_measure"}, outputs,
                             class_names=["a", "b"], train_counts=[10, 10])
    known_scores = rule.score(outputs["val"].logits, outputs["val"].features)
    open_scores = rule.score(outputs["val_open"].logits, outputs["val_open"].features)
    assert known_scores.max() <= rule.threshold < open_scores.min()
    threshold, value = best_f_threshold(outputs["val"].logits, labels, known_scores,
                                        open_scores)
    assert value == pytest.approx(1.0) and threshold == rule.threshold
    with pytest.raises(InputError, match="needs a val_open split"):
        fit_decision_rule({"select": "f_measure"}, {"val": outputs["val"]},
                          class_names=["a", "b"], train_counts=[10, 10])


def test_auto_open_score_is_chosen_on_val_open_and_defaults_without_it():
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[6.0, 0.0, 0.0, 0.0], [0.0, 6.0, 0.0, 0.0]])
    train_labels = torch.arange(2).repeat_interleave(100)
    train_features = centers[train_labels] + torch.randn(200, 4, generator=generator) * 0.3
    weight = torch.eye(2, 4)

    def split(features, labels):
        return SplitOutputs(logits=features @ weight.t(), features=features,
                            labels=torch.as_tensor(labels))

    val_labels = torch.arange(2).repeat_interleave(30)
    val = split(centers[val_labels] + torch.randn(60, 4, generator=generator) * 0.3, val_labels)
    # open images: confident logits (same first two coordinates) but far in feature space
    far = centers[torch.arange(2).repeat(15)] + torch.tensor([0.0, 0.0, 8.0, 8.0])
    val_open = split(far, [-1] * 30)
    outputs = {"train": split(train_features, train_labels), "val": val, "val_open": val_open}
    rule = fit_decision_rule({"open_score": "auto", "open_score_candidates": ["msp", "knn"]},
                             outputs, class_names=["a", "b"], train_counts=[100, 100])
    assert rule.open_score == "knn"
    assert rule.record["open_score"]["candidates"] == ["msp", "knn"]
    default = fit_decision_rule({"open_score": "auto"}, {"train": outputs["train"], "val": val},
                                class_names=["a", "b"], train_counts=[100, 100])
    assert default.open_score == "knn" and "default" in default.record["open_score"]["source"]


def test_auto_candidate_vim_is_the_papers_form():
    """Among auto's candidates ViM needs a linear head (origin −W⁺b): with an opaque head it is
    skipped and recorded; with a linear one it is fitted and scored like the others."""
    from oltr.detectors.head import LinearHead

    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    bias = torch.randn(3, generator=generator, dtype=torch.float64)
    linear = LinearHead(weight, bias)

    def split(n, labels):
        features = torch.randn(n, 6, generator=generator, dtype=torch.float64).abs()
        return SplitOutputs(logits=linear(features), features=features,
                            labels=torch.as_tensor(labels))

    outputs = {"train": split(90, torch.arange(3).repeat(30)),
               "val": split(30, torch.arange(3).repeat(10)), "val_open": split(12, [-1] * 12)}
    settings = {"open_score": "auto", "open_score_candidates": ["msp", "vim"]}
    opaque = fit_decision_rule(settings, outputs, class_names=["a", "b", "c"],
                               train_counts=[30, 30, 30], head=lambda v: linear(v))
    assert "needs a linear head" in opaque.record["open_score_skipped"]["vim"]
    assert np.isnan(opaque.record["open_score"]["objective"][1])
    plain = fit_decision_rule(settings, outputs, class_names=["a", "b", "c"],
                              train_counts=[30, 30, 30], head=linear)
    assert "open_score_skipped" not in plain.record
    assert np.isfinite(plain.record["open_score"]["objective"]).all()


def test_rule_round_trips_through_its_files(tmp_path):
    labels = torch.arange(3).repeat_interleave(20)
    features = torch.nn.functional.one_hot(labels, 3).float() * 3 + 0.1
    outputs = {"train": SplitOutputs(features, features, labels),
               "val": SplitOutputs(features, features, labels)}
    rule = fit_decision_rule({"open_score": "knn", "logit_adjustment": 0.5}, outputs,
                             class_names=["x", "y", "z"], train_counts=[30, 20, 10],
                             record={"weights": {"sha256": "ab", "epoch": 3}})
    rule.save(tmp_path)
    loaded = DecisionRule.load(tmp_path)
    probe = features + 0.05
    for key in ("logits", "open_score", "prediction"):
        assert torch.equal(torch.as_tensor(rule.apply(probe, probe)[key]),
                           torch.as_tensor(loaded.apply(probe, probe)[key]))
    assert loaded.record["weights"] == {"sha256": "ab", "epoch": 3}
    (tmp_path / "decision.json").write_text('{"format": 1, "threshold": "high"}')
    with pytest.raises(InputError, match="decision.json"):
        DecisionRule.load(tmp_path)
