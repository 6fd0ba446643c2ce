"""Known-answer tests for oltr.metrics (hand-computed cases and scikit-learn cross-checks)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from oltr.errors import InputError
from oltr.metrics import (
    aupr,
    auroc,
    calibrate_threshold,
    closed_set_accuracy,
    detection_error,
    expected_calibration_error,
    f_measure,
    fpr_at_tpr,
    open_set_accuracy,
    oscr,
    reject,
    shot_groups,
)


def random_detection_case(seed: int, n: int = 300, levels: int = 12):
    """Integer-valued scores (many ties), open images shifted upwards."""
    rng = np.random.default_rng(seed)
    is_open = rng.random(n) < 0.3
    is_open[:2] = [True, False]
    scores = rng.integers(0, levels, n) + 3 * is_open
    return scores.astype(np.float64), is_open


# ------------------------------------------------------------------------- shot groups


def test_shot_groups_strict_and_original_boundaries():
    counts = np.array([101, 100, 50, 20, 19, 0])
    assert shot_groups(counts).tolist() == ["many", "medium", "medium", "medium", "few", "few"]
    assert shot_groups(counts, strict=False).tolist() == [
        "many", "many", "medium", "few", "few", "few",
    ]
    assert shot_groups(counts, many_threshold=50, few_threshold=20).tolist() == [
        "many", "many", "medium", "medium", "few", "few",
    ]


def test_shot_groups_rejects_bad_input():
    with pytest.raises(InputError, match="train_counts must be >= 0; index 1"):
        shot_groups([5, -1])
    with pytest.raises(InputError, match="few_threshold"):
        shot_groups([5], many_threshold=10, few_threshold=20)
    with pytest.raises(InputError, match="train_counts must hold integers"):
        shot_groups([5.0, 3.0])


# ------------------------------------------------------------------------- accuracies


def test_closed_set_accuracy_is_mean_of_per_class_accuracy_per_group():
    train_counts = [200, 150, 50, 30, 5]  # many {0, 1}, medium {2, 3}, few {4}
    labels = [0, 0, 1, 1, 1, 1, 2]  # class 3 and 4 have no test images
    predictions = [0, 0, 1, 0, 2, -1, 2]
    result = closed_set_accuracy(predictions, labels, train_counts)
    assert result["overall"] == pytest.approx(4 / 7)
    assert result["many"] == pytest.approx((1.0 + 0.25) / 2)  # not sample-weighted 3/6
    assert result["medium"] == pytest.approx(1.0)  # class 3 without test images is skipped
    assert result["few"] is None
    assert result["counts"] == {
        "many": 2, "medium": 2, "few": 1, "samples": {"many": 6, "medium": 1, "few": 0},
    }
    assert result["per_class"] == [1.0, 0.25, 1.0, None, None]


def test_closed_set_accuracy_requires_known_labels_and_valid_predictions():
    with pytest.raises(InputError, match=r"labels must be in \[0, 2\]; index 1"):
        closed_set_accuracy([0, 0], [0, -1], [200, 50, 5])
    with pytest.raises(InputError, match=r"predictions must be in \[-1, 2\]; index 0"):
        closed_set_accuracy([3, 0], [0, 1], [200, 50, 5])
    with pytest.raises(InputError, match="predictions=3, labels=2"):
        closed_set_accuracy([0, 0, 0], [0, 1], [200, 50, 5])
    with pytest.raises(InputError, match="labels must hold integers"):
        closed_set_accuracy([0, 1], [0.0, 1.0], [200, 50, 5])


def test_reject_marks_scores_strictly_above_threshold():
    rejected = reject([0, 1, 2, 1], [0.1, 0.5, 0.9, 0.5], 0.5)
    assert rejected.tolist() == [0, 1, -1, 1]
    with pytest.raises(InputError, match="threshold must be finite"):
        reject([0], [0.1], float("nan"))


def test_open_set_accuracy_counts_rejected_knowns_as_errors():
    train_counts = [200, 50, 5]
    labels = [0, 0, 1, 1, 2, -1, -1, -1]
    predictions = [0, -1, 1, 0, 2, -1, -1, 1]
    result = open_set_accuracy(predictions, labels, train_counts)
    assert result["many"] == pytest.approx(0.5)
    assert result["medium"] == pytest.approx(0.5)
    assert result["few"] == pytest.approx(1.0)
    assert result["overall"] == pytest.approx(5 / 8)
    assert result["open_rejection_rate"] == pytest.approx(2 / 3)
    assert result["known_acceptance_rate"] == pytest.approx(4 / 5)
    assert result["counts"]["samples"] == {"many": 2, "medium": 2, "few": 1, "open": 3}


def test_open_set_accuracy_without_open_images_matches_closed_set():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 200)
    predictions = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 6, 200))
    train_counts = [500, 120, 60, 25, 10, 3]
    closed = closed_set_accuracy(predictions, labels, train_counts)
    opened = open_set_accuracy(predictions, labels, train_counts)
    for key in ("overall", "many", "medium", "few"):
        assert opened[key] == pytest.approx(closed[key])
    assert opened["open_rejection_rate"] is None
    assert opened["known_acceptance_rate"] == 1.0


def test_f_measure_hand_computed():
    labels = [0, 0, 1, 1, 2, -1, -1, -1]
    predictions = [0, -1, 1, 0, 2, -1, -1, 1]
    result = f_measure(predictions, labels)
    # TP: known correct (3); FP: known wrong incl. the rejected one (2); FN: open accepted (1)
    assert (result["tp"], result["fp"], result["fn"]) == (3, 2, 1)
    assert result["precision"] == pytest.approx(0.6)
    assert result["recall"] == pytest.approx(0.75)
    assert result["f_measure"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)


def test_f_measure_is_zero_when_undefined():
    result = f_measure([-1, -1], [-1, -1])
    assert result == {"f_measure": 0.0, "precision": 0.0, "recall": 0.0, "tp": 0, "fp": 0,
                      "fn": 0}
    with pytest.raises(InputError, match="labels must be >= -1; index 0"):
        f_measure([0], [-2])


# ------------------------------------------------------------------------- AUROC


def test_auroc_hand_computed_with_tie():
    # open 0.8 beats all 3 knowns; open 0.35 beats 0.1, ties 0.35 (1/2), loses to 0.4
    scores = [0.1, 0.4, 0.35, 0.8, 0.35]
    is_open = [False, False, False, True, True]
    assert auroc(scores, is_open) == pytest.approx(4.5 / 6)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn(seed):
    scores, is_open = random_detection_case(seed)
    assert auroc(scores, is_open) == pytest.approx(roc_auc_score(is_open, scores), abs=1e-12)
    assert auroc(-scores, is_open) == pytest.approx(1 - auroc(scores, is_open), abs=1e-12)


def test_auroc_accepts_zero_one_integers_and_rejects_other_flags():
    assert auroc([0.0, 1.0], [0, 1]) == 1.0
    with pytest.raises(InputError, match="is_open must be boolean .* index 1"):
        auroc([0.0, 1.0], [0, 2])
    with pytest.raises(InputError, match="both known and open"):
        auroc([0.0, 1.0], [True, True])
    with pytest.raises(InputError, match="open_scores must be finite; index 1"):
        auroc([0.0, np.nan], [False, True])
    with pytest.raises(InputError, match=r"open_scores must be 1-D, got shape \(1, 2\)"):
        auroc([[0.0, 1.0]], [False, True])


# ------------------------------------------------------------------------- FPR at TPR


def sklearn_fpr_at_tpr(scores, is_open, tpr):
    """Known = positive, ranked by -score; first ROC point whose TPR reaches ``tpr``."""
    fpr, tprs, _ = roc_curve(~is_open, -scores, drop_intermediate=False)
    return fpr[np.argmax(tprs >= tpr)]


def test_fpr_at_tpr_hand_computed():
    known = np.arange(20.0)  # 95 % of 20 knowns = 19 accepted: threshold 18
    open_ = np.array([17.5, 18.0, 18.5, 30.0])
    scores = np.r_[known, open_]
    is_open = np.r_[np.zeros(20, bool), np.ones(4, bool)]
    assert fpr_at_tpr(scores, is_open) == pytest.approx(0.5)
    assert fpr_at_tpr(scores, is_open, tpr=1.0) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tpr", [0.5, 0.8, 0.95, 1.0])
def test_fpr_at_tpr_matches_sklearn_roc_curve(seed, tpr):
    scores, is_open = random_detection_case(seed)
    assert fpr_at_tpr(scores, is_open, tpr) == pytest.approx(
        sklearn_fpr_at_tpr(scores, is_open, tpr), abs=1e-12
    )


def test_fpr_at_tpr_equals_rate_of_open_accepted_at_calibrated_threshold():
    scores, is_open = random_detection_case(7)
    threshold = calibrate_threshold(scores[~is_open], 0.95)
    assert fpr_at_tpr(scores, is_open) == pytest.approx(np.mean(scores[is_open] <= threshold))
    with pytest.raises(InputError, match=r"tpr must lie in \(0, 1\]"):
        fpr_at_tpr(scores, is_open, tpr=0.0)


# ------------------------------------------------------------------------- AUPR


def test_aupr_hand_computed_both_directions():
    scores = [0.9, 0.4, 0.6, 0.2, 0.1]
    is_open = [True, True, False, False, False]
    # open positive, descending: open (P 1, R 1/2), known, open (P 2/3, R 1)
    assert aupr(scores, is_open, positive="open") == pytest.approx(0.5 + 0.5 * 2 / 3)
    # known positive, ascending: known, known (P 1, R 2/3), open, known (P 3/4, R 1)
    assert aupr(scores, is_open, positive="known") == pytest.approx(2 / 3 + 1 / 3 * 3 / 4)


@pytest.mark.parametrize("seed", range(5))
def test_aupr_matches_sklearn_average_precision(seed):
    scores, is_open = random_detection_case(seed)
    assert aupr(scores, is_open, "open") == pytest.approx(
        average_precision_score(is_open, scores), abs=1e-12
    )
    assert aupr(scores, is_open, "known") == pytest.approx(
        average_precision_score(~is_open, -scores), abs=1e-12
    )


def test_aupr_rejects_unknown_positive():
    with pytest.raises(InputError, match="positive must be 'open' or 'known'"):
        aupr([0.0, 1.0], [False, True], positive="in")


# ------------------------------------------------------------------------- OSCR


def test_oscr_hand_computed():
    scores = [0.1, 0.2, 0.3, 0.6, 0.25, 0.7]
    is_open = [False, False, False, False, True, True]
    correct = [True, False, True, True, False, False]
    # curve (FPR, CCR): (0,0) (0,1/4) (1/2,1/4) (1/2,1/2) (1/2,3/4) (1,3/4)
    assert oscr(scores, correct, is_open) == pytest.approx(0.5 * 0.25 + 0.5 * 0.75)


def test_oscr_tie_counts_half():
    assert oscr([0.5, 0.5], [True, False], [False, True]) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(3))
def test_oscr_equals_auroc_when_all_known_correct_and_is_bounded_by_it(seed):
    scores, is_open = random_detection_case(seed)
    all_correct = np.ones(len(scores), bool)
    assert oscr(scores, all_correct, is_open) == pytest.approx(auroc(scores, is_open))
    some_correct = np.random.default_rng(seed).random(len(scores)) < 0.6
    assert oscr(scores, some_correct, is_open) < auroc(scores, is_open)


# ------------------------------------------------------------------------- detection error


def test_detection_error_hand_computed():
    scores = [0.1, 0.2, 0.6, 0.5, 0.9]
    is_open = [False, False, False, True, True]
    # best threshold 0.2: one of three knowns rejected, no open accepted
    assert detection_error(scores, is_open) == pytest.approx(0.5 * 1 / 3)


@pytest.mark.parametrize("seed", range(3))
def test_detection_error_matches_brute_force(seed):
    scores, is_open = random_detection_case(seed)
    candidates = np.r_[-np.inf, np.unique(scores), np.unique(scores) + 0.5]
    brute = min(
        0.5 * np.mean(scores[~is_open] > t) + 0.5 * np.mean(scores[is_open] <= t)
        for t in candidates
    )
    assert detection_error(scores, is_open) == pytest.approx(brute)


# ------------------------------------------------------------------------- calibration


def test_expected_calibration_error_hand_computed():
    confidences = [0.1, 0.2, 0.6, 0.7, 0.9, 1.0]
    correct = [False, True, True, False, True, True]
    # bins of width 1/4: (0, .25] acc .5 conf .15; (.5, .75] acc .5 conf .65; (.75, 1] 1 / .95
    expected = (0.35 + 0.15 + 0.05) * 2 / 6
    assert expected_calibration_error(confidences, correct, n_bins=4) == pytest.approx(expected)


def test_expected_calibration_error_bin_edges_are_right_closed():
    # 0.25 belongs to the first of four bins, with 0.1: acc 1/2, conf 0.175
    assert expected_calibration_error([0.25, 0.1], [False, True], n_bins=4) == pytest.approx(
        0.325
    )
    assert expected_calibration_error([0.0, 0.0], [False, False], n_bins=4) == 0.0
    assert expected_calibration_error([0.75] * 4, [1, 1, 1, 0]) == pytest.approx(0.0)


def test_expected_calibration_error_matches_reference_loop():
    rng = np.random.default_rng(3)
    confidences = rng.random(500)
    correct = rng.random(500) < confidences**2
    edges = np.linspace(0, 1, 16)
    reference = 0.0
    for low, high in itertools.pairwise(edges):
        in_bin = (confidences > low) & (confidences <= high)
        if in_bin.any():
            gap = abs(correct[in_bin].mean() - confidences[in_bin].mean())
            reference += in_bin.mean() * gap
    assert expected_calibration_error(confidences, correct) == pytest.approx(reference)


def test_expected_calibration_error_rejects_bad_input():
    with pytest.raises(InputError, match=r"confidences must lie in \[0, 1\]; index 1"):
        expected_calibration_error([0.5, 1.5], [True, False])
    with pytest.raises(InputError, match="n_bins must be a positive integer"):
        expected_calibration_error([0.5], [True], n_bins=0)


def test_calibrate_threshold_picks_smallest_score_reaching_rate():
    scores = np.random.default_rng(0).permutation(np.arange(1.0, 21.0))
    assert calibrate_threshold(scores, 0.95) == 19.0
    assert calibrate_threshold(scores, 1.0) == 20.0
    assert calibrate_threshold(scores, 0.5) == 10.0
    assert calibrate_threshold(scores, 0.51) == 11.0
    # ties are accepted together: <= 1 covers 20 %, <= 2 covers 80 %
    assert calibrate_threshold([1.0, 2.0, 2.0, 2.0, 3.0], 0.5) == 2.0
    accepted = reject(np.zeros(20, int), scores, calibrate_threshold(scores, 0.95)) != -1
    assert accepted.mean() >= 0.95
    with pytest.raises(InputError, match=r"accept_rate must lie in \(0, 1\]"):
        calibrate_threshold(scores, 1.5)
    with pytest.raises(InputError, match="known_val_scores is empty"):
        calibrate_threshold([], 0.9)


def test_logit_adjustment_adds_tau_times_log_prior():
    """The decision rule's logit adjustment (oltr.decision; its selection on val: tests/
    test_decision.py)."""
    import torch

    from oltr.decision import DecisionRule

    logits = np.array([[1.0, 1.0], [0.0, 2.0]], dtype=np.float32)
    counts = np.array([300, 100])  # prior 0.75 / 0.25
    rule = DecisionRule(["a", "b"], torch.as_tensor(counts), logit_adjustment=0.5)
    adjusted = rule.adjust(torch.from_numpy(logits)).numpy()
    expected = logits + 0.5 * np.log([0.75, 0.25])
    assert np.allclose(adjusted, expected)
    assert adjusted.argmax(1).tolist() == [0, 1]  # a tie goes to the head class
    rule.logit_adjustment = 0.0
    assert np.array_equal(rule.adjust(torch.from_numpy(logits)).numpy(), logits)




def test_percent_text_rounds_once_from_the_stored_fraction() -> None:
    """Every table shows the same digits for a figure whether it read report.json (6
    decimals) or the unrounded value: 0.84949999 is stored as 0.8495 and shows 85.0, as
    0.8495 does (half up; plain ``f"{100 * v:.1f}"`` gives 84.9 for the first, and for
    0.8495 itself depends on the binary value)."""
    from oltr.metrics import percent_text

    assert percent_text(0.84949999) == percent_text(0.8495) == "85.0"
    assert f"{100 * 0.84949999:.1f}" == "84.9"  # what two formatters could disagree on
    assert percent_text(0.8494994) == "84.9"  # stored 0.849499
    assert percent_text(1 / 3) == "33.3" and percent_text(2 / 3) == "66.7"
    assert percent_text(0.0) == "0.0" and percent_text(1.0) == "100.0"
    assert percent_text(0.123456, decimals=2) == "12.35"
    assert percent_text(None) is None and percent_text(float("nan")) is None
