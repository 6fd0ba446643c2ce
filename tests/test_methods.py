"""The competing methods wired into the shared engine: stage losses, deferred re-weighting,
τ-normalisation, post-hoc logit adjustment, the LWS / FSLwF heads, end-to-end two-stage runs,
and the evaluation's extra detectors and external open sets — with known answers."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from oltr.config import load_config, stage_config
from oltr.data import dataset_for, load_benchmark
from oltr.decision import TAU_NORMALIZATION_GRID as TAU_NORM_GRID
from oltr.decision import DecisionRule, SplitOutputs, fit_decision_rule
from oltr.errors import InputError
from oltr.evaluation.closed_open import evaluate_run
from oltr.evaluation.run_outputs import collect_run_outputs
from oltr.evaluation.terminal import format_report
from oltr.inference import collect_outputs, eval_loader, load_model
from oltr.losses import LiftedStructureLoss, RangeLoss
from oltr.models import (
    CosineClassifier,
    FSLwFClassifier,
    LearnableWeightScaling,
    create_network,
    freeze_backbone,
    load_stage1_into_stage2,
    squash,
)
from oltr.pipeline import train_run
from oltr.train.objective import Objective

torch.set_num_threads(1)
CPU = torch.device("cpu")

# Smallest runs that still exercise every stage: width-4 ResNet, one SGD step per epoch.
SMALL = ["model.width=4", "train.batch_size=32", "train.max_steps_per_epoch=1",
         "eval.batch_size=256", "train.log_every=1"]


def train_cfg(**changes) -> dict:
    """The default ``train`` section of a stage with ``changes``."""
    cfg = copy.deepcopy(stage_config(load_config("plain"), "main")["train"])
    cfg.update(changes)
    return cfg


def batch(num_classes: int = 3, size: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(size, num_classes, generator=generator, dtype=torch.float64).float()
    labels = torch.arange(size) % num_classes  # every class present
    return logits, labels


def np_cross_entropy(logits: np.ndarray, labels: np.ndarray,
                     weight: np.ndarray | None = None) -> float:
    """Mean (or class-weighted mean, as torch defines it) of −log softmax, in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    per_sample = -log_p[np.arange(len(labels)), labels]
    if weight is None:
        return float(per_sample.mean())
    w = weight[labels]
    return float((w * per_sample).sum() / w.sum())


COUNTS = np.array([100, 10, 1])


def build_stage_losses(cfg: dict, counts, device) -> tuple:
    """The classification and feature losses the objective of a stage builds."""
    net = create_network({"backbone": "resnet10_small", "width": 4}, len(counts), 1)
    objective = Objective(cfg, counts, net, device)
    return objective.classification, objective.feature


def deferred_reweighting(cfg: dict, counts, epoch: int) -> torch.Tensor | None:
    """The class weights the objective's loss has in 0-based ``epoch`` (None: unweighted)."""
    net = create_network({"backbone": "resnet10_small", "width": 4}, len(counts), 1)
    objective = Objective(cfg, np.asarray(counts), net, CPU)
    objective.set_epoch(epoch)
    return getattr(objective.classification, "weight", None)


def _linear(weight: np.ndarray, bias: np.ndarray | None) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        if bias is not None:
            layer.bias.copy_(torch.from_numpy(bias))
    return layer


def tau_normalized_logits(features, weight, bias, tau) -> np.ndarray:
    """The decision rule's τ-normalised logits of a linear classifier (weight, bias)."""
    rule = DecisionRule(["c"] * weight.shape[0], torch.ones(weight.shape[0]),
                        tau_normalization=tau)
    features = torch.from_numpy(np.asarray(features, dtype=np.float32))
    layer = _linear(weight, bias)
    with torch.no_grad():
        return rule.closed_logits(layer(features), features, layer).numpy()


def select_tau_normalization(features, labels, weight, bias) -> float:
    """τ of τ-normalisation as the decision rule selects it on val."""
    features = torch.from_numpy(np.asarray(features, dtype=np.float32))
    val = SplitOutputs(features @ torch.from_numpy(weight).t(), features,
                       torch.as_tensor(labels))
    rule = fit_decision_rule({"tau_normalization": "auto"}, {"val": val},
                             class_names=["c"] * weight.shape[0],
                             train_counts=[1] * weight.shape[0],
                             classifier=_linear(weight, bias), open_set=False)
    return rule.tau_normalization


def adjust_logits(logits: np.ndarray, counts, tau: float) -> np.ndarray:
    """The decision rule's logit adjustment."""
    rule = DecisionRule(["c"] * len(counts), torch.as_tensor(counts), logit_adjustment=tau)
    adjusted = rule.adjust(torch.from_numpy(logits))
    return logits if tau == 0 else adjusted.numpy()


# ------------------------------------------------------------------ 1. build_stage_losses
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ce_loss_is_torch_cross_entropy(smoothing):
    loss, feature = build_stage_losses(train_cfg(loss="ce", label_smoothing=smoothing),
                                       COUNTS, CPU)
    logits, labels = batch()
    assert feature is None
    expected = F.cross_entropy(logits, labels, label_smoothing=smoothing)
    assert float(loss(logits, labels)) == pytest.approx(float(expected), rel=1e-6)
    if smoothing == 0.0:
        assert float(loss(logits, labels)) == pytest.approx(
            np_cross_entropy(logits.numpy(), labels.numpy()), rel=1e-6)


def test_focal_loss_gamma_zero_is_ce_and_gamma_two_known_value():
    logits, labels = batch()
    loss, _ = build_stage_losses(train_cfg(loss="focal", focal_gamma=0.0), COUNTS, CPU)
    assert float(loss(logits, labels)) == pytest.approx(
        np_cross_entropy(logits.numpy(), labels.numpy()), rel=1e-6)
    # γ = 2 on equal logits of 2 classes: p = 1/2, (1 − 1/2)² · log 2
    loss, _ = build_stage_losses(train_cfg(loss="focal", focal_gamma=2.0), [5, 5], CPU)
    value = loss(torch.zeros(1, 2), torch.tensor([0]))
    assert float(value) == pytest.approx(0.25 * math.log(2), rel=1e-6)


def test_balanced_softmax_is_ce_of_logits_plus_log_counts():
    logits, labels = batch()
    loss, _ = build_stage_losses(train_cfg(loss="balanced_softmax"), COUNTS, CPU)
    expected = np_cross_entropy(logits.numpy() + np.log(COUNTS), labels.numpy())
    assert float(loss(logits, labels)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_logit_adjusted_loss_is_ce_of_logits_plus_tau_log_prior(tau):
    logits, labels = batch()
    loss, _ = build_stage_losses(train_cfg(loss="logit_adjusted", logit_adjust_tau=tau),
                                 COUNTS, CPU)
    prior = COUNTS / COUNTS.sum()
    expected = np_cross_entropy(logits.numpy() + tau * np.log(prior), labels.numpy())
    assert float(loss(logits, labels)) == pytest.approx(expected, rel=1e-5)


def test_ldam_loss_is_scaled_ce_with_the_true_class_margin_and_drw_weights():
    logits, labels = batch()
    cfg = train_cfg(loss="ldam", ldam_max_margin=0.5, ldam_scale=30.0)
    loss, _ = build_stage_losses(cfg, COUNTS, CPU)
    # Δ_c = C · n_c^(−1/4) with max Δ = 0.5: [0.5/100^¼, 0.5/10^¼, 0.5]
    margins = 0.5 * COUNTS ** -0.25
    assert np.allclose(margins, [0.15811388, 0.28117066, 0.5])
    shifted = logits.numpy().astype(np.float64).copy()
    shifted[np.arange(len(labels)), labels.numpy()] -= margins[labels.numpy()]
    expected = np_cross_entropy(30.0 * shifted, labels.numpy())
    assert float(loss(logits, labels)) == pytest.approx(expected, rel=1e-5)
    # the engine's DRW assigns a class weight later: a weighted mean over the batch
    weight = np.array([0.2, 0.8, 2.0])
    loss.weight = torch.tensor(weight, dtype=torch.float32)
    expected = np_cross_entropy(30.0 * shifted, labels.numpy(), weight)
    assert float(loss(logits, labels)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("name", "kind"), [("range", RangeLoss), ("lifted", LiftedStructureLoss),
                                            ("none", type(None))])
def test_feature_loss_is_built_with_its_margin(name, kind):
    _, feature = build_stage_losses(train_cfg(feature_loss=name, feature_loss_margin=3.5),
                                    COUNTS, CPU)
    assert isinstance(feature, kind)
    if feature is not None:
        assert feature.margin == 3.5


@pytest.mark.parametrize("changes", [
    {"loss": "focal", "label_smoothing": 0.1},
    {"loss": "ldam", "label_smoothing": 0.1},
    {"loss": "focal", "drw_epoch": 2},
    {"loss": "balanced_softmax", "drw_epoch": 2},
])
def test_stage_loss_combinations_that_do_not_exist_are_refused(changes):
    with pytest.raises(InputError):
        build_stage_losses(train_cfg(**changes), COUNTS, CPU)


def test_drw_with_ce_and_ldam_is_accepted():
    for name in ("ce", "ldam"):
        loss, _ = build_stage_losses(train_cfg(loss=name, drw_epoch=2), COUNTS, CPU)
        assert loss is not None


# ------------------------------------------------------------------ 2. deferred re-weighting
def test_deferred_reweighting_starts_at_the_one_based_epoch_with_effective_number_weights():
    cfg = train_cfg(drw_epoch=3, drw_beta=0.5)
    counts = [4, 2, 1]
    # (1 − β)/(1 − β^n) at β = ½: 8/15, 2/3, 1 (sum 33/15) → × 3 / (33/15) = 8/11, 10/11, 15/11
    expected = torch.tensor([8 / 11, 10 / 11, 15 / 11])
    assert deferred_reweighting(cfg, counts, 0) is None  # epoch 1
    assert deferred_reweighting(cfg, counts, 1) is None  # epoch 2
    for epoch in (2, 3, 10):  # epochs 3, 4, 11
        weights = deferred_reweighting(cfg, counts, epoch)
        assert torch.allclose(weights, expected, atol=1e-6)
        assert float(weights.sum()) == pytest.approx(3.0)
    for epoch in range(4):
        assert deferred_reweighting(train_cfg(drw_epoch=None), counts, epoch) is None


# ------------------------------------------------------------------ 3. τ-normalisation
def test_tau_normalized_logits_at_zero_and_one():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(5, 3)).astype(np.float32)
    weight = rng.normal(size=(4, 3)).astype(np.float32) * np.array([[5.0], [1.0], [0.2], [2.0]],
                                                                   dtype=np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    assert np.allclose(tau_normalized_logits(features, weight, bias, 0.0),
                       features @ weight.T + bias, atol=1e-5)
    assert np.allclose(tau_normalized_logits(features, weight, None, 0.0), features @ weight.T,
                       atol=1e-5)
    unit = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    assert np.allclose(tau_normalized_logits(features, weight, bias, 1.0),
                       features @ unit.T + bias, atol=1e-5)
    half = weight / np.sqrt(np.linalg.norm(weight, axis=1, keepdims=True))
    assert np.allclose(tau_normalized_logits(features, weight, bias, 0.5),
                       features @ half.T + bias, atol=1e-5)


def test_select_tau_normalization_finds_the_smallest_tau_that_frees_the_tail():
    """Head row (10, 0), norm 10; tail row (0, 1), norm 1. A tail sample (0.3, 1) scores
    0.3 · 10^(1−τ) for the head and 1 for the tail: right only from 10^(1−τ) < 10/3, i.e.
    τ > 0.477; head samples (1, 0.02) stay right up to τ = 2.7 (10^(1−τ) > 0.02). On the grid 0, 0.1, …, 2 the
    accuracy is ½ up to τ = 0.4 and 1 from τ = 0.5 on: the smallest best τ is 0.5."""
    weight = np.array([[10.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    features = np.array([[1.0, 0.02], [1.0, 0.02], [0.3, 1.0], [0.3, 1.0]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    accuracy = [float((tau_normalized_logits(features, weight, None, t).argmax(1) == labels)
                      .mean()) for t in TAU_NORM_GRID]
    assert accuracy[:5] == [0.5] * 5 and accuracy[5:] == [1.0] * (len(TAU_NORM_GRID) - 5)
    assert select_tau_normalization(features, labels, weight, None) == 0.5
    # every τ equally good → the smallest (0)
    assert select_tau_normalization(features[:2], labels[:2], weight, None) == 0.0
    # a bias the normalisation leaves alone can undo it: +0.2 on the head row makes the tail
    # right only from 0.3 · 10^(1−τ) + 0.2 < 1, i.e. τ > 1 − log10(8/3) = 0.574 → 0.6
    bias = np.array([0.2, 0.0], dtype=np.float32)
    assert select_tau_normalization(features, labels, weight, bias) == 0.6


# ------------------------------------------------------------------ 4. post-hoc adjustment
def test_adjust_logits_minus_one_subtracts_the_log_prior():
    logits = np.array([[2.0, 1.0, 0.0], [0.5, 0.5, 0.5]], dtype=np.float32)
    counts = np.array([6, 3, 1])
    prior = counts / counts.sum()
    adjusted = adjust_logits(logits, counts, -1.0)
    assert np.allclose(adjusted, logits - np.log(prior), atol=1e-6)
    assert adjusted.dtype == np.float32
    # the equal-logits row now goes to the rarest class
    assert adjusted[1].argmax() == 2
    assert adjust_logits(logits, counts, 0.0) is logits
    assert np.allclose(adjust_logits(logits, counts, 0.5), logits + 0.5 * np.log(prior),
                       atol=1e-6)


# ------------------------------------------------------------------ 5. networks
NET = {"backbone": "resnet10_small", "width": 4}
NET_COUNTS = [200, 58, 17, 5]


def _stage1_net(seed: int = 0):
    torch.manual_seed(seed)
    net = create_network(NET, 4, 1)
    # non-trivial BatchNorm statistics, so that copying them is seen
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 1, 28, 28))
    return net.eval()


def test_lws_from_stage1_reproduces_stage1_logits_and_learns_only_scales():
    stage1 = _stage1_net()
    torch.manual_seed(1)
    lws = create_network(NET | {"classifier": "lws"}, 4, 1)
    copied = load_stage1_into_stage2(lws, stage1.state_dict())
    assert {"classifier.classifier.weight", "classifier.classifier.bias"} <= set(copied)
    assert isinstance(lws.classifier, LearnableWeightScaling)
    assert torch.equal(lws.classifier.scales.detach(), torch.ones(4))
    freeze_backbone(lws)
    lws.eval()
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(lws(x).logits, stage1(x).logits, atol=1e-6)
    trainable = [name for name, p in lws.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.scales"]
    # scales act per class on the stage-1 logits
    with torch.no_grad():
        lws.classifier.scales.copy_(torch.tensor([2.0, 1.0, 0.5, 0.0]))
        assert torch.allclose(lws(x).logits,
                              stage1(x).logits * torch.tensor([2.0, 1.0, 0.5, 0.0]),
                              atol=1e-6)


def test_fslwf_novel_classes_come_from_the_counts_and_rows_from_stage1():
    stage1 = _stage1_net()
    net = create_network(NET | {"classifier": "fslwf", "fslwf_novel_max": 20}, 4, 1,
                         class_counts=NET_COUNTS)
    assert isinstance(net.classifier, FSLwFClassifier)
    assert net.classifier.tail_classes.tolist() == [2, 3]  # 17 and 5 <= 20
    assert net.classifier.base_classes.tolist() == [0, 1]
    net58 = create_network(NET | {"classifier": "fslwf", "fslwf_novel_max": 58}, 4, 1,
                           class_counts=NET_COUNTS)
    assert net58.classifier.tail_classes.tolist() == [1, 2, 3]  # "at most": 58 is novel
    copied = load_stage1_into_stage2(net, stage1.state_dict())
    assert "classifier.weight" in copied
    assert torch.equal(net.classifier.weight.detach(), stage1.classifier.weight.detach())
    assert not bool(net.classifier.has_prototypes)


@pytest.mark.parametrize(("novel_max", "counts"), [
    (4, NET_COUNTS),      # no class with <= 4 images
    (1000, NET_COUNTS),   # every class novel: no base class left
    (20, None),           # the counts are needed
    (20, [200, 5]),       # one count per class
])
def test_fslwf_without_a_proper_novel_set_or_counts_is_refused(novel_max, counts):
    with pytest.raises(InputError) as error:
        create_network(NET | {"classifier": "fslwf", "fslwf_novel_max": novel_max}, 4, 1,
                       class_counts=counts)
    if counts is NET_COUNTS:  # the message names the key to change
        assert "model.fslwf_novel_max" in str(error.value)


def test_unit_squash_gives_unit_rows_and_a_plain_cosine_classifier():
    v = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor(
        [[0.01], [0.5], [1.0], [3.0], [50.0], [1e3]])
    assert torch.allclose(torch.linalg.vector_norm(squash(v, "unit"), dim=1), torch.ones(6),
                          atol=1e-6)
    torch.manual_seed(0)
    head = CosineClassifier(5, 3, scale=30.0, squash_form="unit")
    expected = 30.0 * F.cosine_similarity(v.unsqueeze(1), head.weight.unsqueeze(0), dim=2)
    assert torch.allclose(head(v), expected, atol=1e-4)
    net = create_network(NET | {"classifier": "cosine", "squash_form": "unit"}, 4, 1)
    assert net.classifier.squash_form == "unit"


# ------------------------------------------------------------------ 6. engine end to end
def _presets(method: str, extra: list[str] = ()) -> dict:
    return load_config(method, overrides=[*SMALL, "train.amp=off", "stage1.train.epochs=1",
                                          "stage2.train.epochs=1", *extra])


def test_lws_run_keeps_the_stage1_classifier_frozen(fmnist_small, tmp_path, one_thread):
    run = tmp_path / "lws"
    results = train_run(_presets("lws"), fmnist_small, run, progress=False)
    assert [r.stage_dir.name for r in results] == ["stage1", "stage2"]
    stage1 = load_file(str(run / "stage1" / "model.safetensors"))
    stage2 = load_file(str(run / "stage2" / "model.safetensors"))
    assert torch.equal(stage2["classifier.classifier.weight"], stage1["classifier.weight"])
    assert torch.equal(stage2["classifier.classifier.bias"], stage1["classifier.bias"])
    # backbone and its BatchNorm statistics frozen too
    for key, value in stage1.items():
        if key.startswith("backbone."):
            assert torch.equal(stage2[key], value), key
    assert stage2["classifier.scales"].shape == (4,)
    assert not torch.equal(stage2["classifier.scales"], torch.ones(4))  # one step learned them
    # the scaled network is what is evaluated
    net, _ = load_model(run / "stage2")
    assert isinstance(net.classifier, LearnableWeightScaling)


def test_fslwf_run_builds_novel_prototypes_from_stage1_features(fmnist_small, tmp_path,
                                                               one_thread):
    run = tmp_path / "fslwf"
    config = _presets("fslwf")
    train_run(config, fmnist_small, run, progress=False)
    net, info = load_model(run / "stage2")
    head = net.classifier
    assert isinstance(head, FSLwFClassifier) and bool(head.has_prototypes)
    counts = info["train_counts"]
    novel = [k for k, n in enumerate(counts) if n <= 100]
    assert head.tail_classes.tolist() == novel and novel  # fmnist_small: 58, 17, 5
    # our own pass over the train images with the stage-1 model
    stage1, _ = load_model(run / "stage1")
    cfg = stage_config(config, "stage1")
    bench = load_benchmark(fmnist_small)
    outputs = collect_outputs(
        stage1, eval_loader(dataset_for(bench, "train", cfg["data"], train=False), 256, 0), CPU,
        amp="off")
    features = outputs["features"] / np.linalg.norm(outputs["features"], axis=1, keepdims=True)
    expected = np.stack([features[outputs["labels"] == k].mean(axis=0) for k in novel])
    assert np.allclose(head.tail_prototypes.numpy(), expected, atol=1e-5)
    # the prototypes stay valid because the stage-2 backbone is stage 1's, frozen
    stage2_weights = load_file(str(run / "stage2" / "model.safetensors"))
    stage1_weights = load_file(str(run / "stage1" / "model.safetensors"))
    for key, value in stage1_weights.items():
        if key.startswith("backbone."):
            assert torch.equal(stage2_weights[key], value), key


def _finite_history(stage_dir) -> list[dict]:
    history = [json.loads(line) for line in (stage_dir / "history.jsonl").read_text().splitlines()]
    assert history and all(math.isfinite(h["train_loss"]) for h in history)
    return history


def test_ldam_drw_run_switches_weights_on_at_drw_epoch(fmnist_small, tmp_path, one_thread):
    from oltr.train import build_stage, fit

    config = load_config("ldam_drw", overrides=[*SMALL, "train.epochs=2", "train.drw_epoch=2"])
    assert config["train"]["loss"] == "ldam"
    parts = build_stage(stage_config(config, "main"), fmnist_small, tmp_path / "ldam" / "main",
                        progress=False)
    objective, seen = parts.objective, []
    built = [objective.classification]
    set_epoch = objective.set_epoch

    def spy(epoch):  # the objective's weights as each epoch starts
        set_epoch(epoch)
        weight = getattr(objective.classification, "weight", None)
        seen.append(None if weight is None else weight.clone())

    objective.set_epoch = spy
    result = fit(parts, progress=False)
    assert len(_finite_history(result.stage_dir)) == 2
    counts = load_benchmark(fmnist_small).train_counts
    assert seen[0] is None
    beta = 0.9999
    raw = (1 - beta) / (1 - beta ** np.asarray(counts, dtype=np.float64))
    assert np.allclose(seen[1].numpy(), raw * len(counts) / raw.sum(), rtol=1e-5)
    # ... and the LDAM loss trained with them in epoch 2
    (loss,) = built
    assert type(loss).__name__ == "LDAMLoss" and loss.scale == 1.0
    assert torch.equal(loss.weight, seen[1])


def test_range_loss_run_trains(fmnist_small, tmp_path, one_thread):
    config = load_config("plain", overrides=[*SMALL, "train.epochs=1", "train.feature_loss=range",
                                             "train.feature_loss_weight=0.01"])
    (result,) = train_run(config, fmnist_small, tmp_path / "range", progress=False)
    _finite_history(result.stage_dir)


# ------------------------------------------------------------------ 7. evaluate_run extras
@pytest.fixture(scope="module")
def plain_run(fmnist_small, tmp_path_factory):
    run = tmp_path_factory.mktemp("plain") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = load_config("plain", overrides=[*SMALL, "train.epochs=1", "train.amp=off",
                                                 "eval.open_score=msp"])
        train_run(config, fmnist_small, run, progress=False)
    finally:
        torch.set_num_threads(threads)
    return run


FIGURES = ("auroc", "fpr95", "detection_error", "threshold", "f_measure")


def test_msp_detector_equals_the_runs_own_open_score(plain_run, fmnist_small):
    report = evaluate_run(plain_run, fmnist_small, open_set=True,
                          detectors=["msp", "energy", "knn"])
    assert report["open"]["open_score"] == "msp"
    assert sorted(report["detectors"]) == ["energy", "knn", "msp"]
    for key in FIGURES:
        assert report["detectors"]["msp"][key] == report["open"][key], key
    for name in ("energy", "knn"):
        entry = report["detectors"][name]
        assert entry["num_open"] == report["open"]["num_open"] == 30
        assert entry["num_known"] == 120
        assert 0.0 <= entry["auroc"] <= 1.0


def test_external_open_set_copy_gives_the_same_figures(plain_run, fmnist_small):
    images = fmnist_small / "images"
    split = images / "copy-of-open.txt"
    split.write_text((fmnist_small / "open.txt").read_text())
    try:
        report = evaluate_run(plain_run, fmnist_small, open_set=True, detectors=["msp", "energy"],
                              open_sets={"copy": split})
    finally:
        split.unlink()
    copied = report["open_sets"]["copy"]
    for key, value in copied.items():
        assert report["open"][key] == value, key
    for name in ("msp", "energy"):
        entry = report["detectors"][name]
        for key, value in entry["open:copy"].items():
            assert entry[key] == value, (name, key)


def test_a_folder_of_images_is_an_open_set(plain_run, fmnist_small, tmp_path):
    folder = tmp_path / "noise"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for path in (folder / "a.png", folder / "b.png", folder / "sub" / "c.png"):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(path)
    (folder / "notes.txt").write_text("not an image")
    report = evaluate_run(plain_run, fmnist_small, open_set=True, open_sets={"noise": folder})
    assert report["open_sets"]["noise"]["num_open"] == 3
    assert report["open_sets"]["noise"]["num_known"] == 120
    assert report["open_sets"]["noise"]["threshold"] == report["open"]["threshold"]


def test_external_open_set_on_a_benchmark_without_open_classes(plain_run, fmnist_small,
                                                              tmp_path):
    """Curated without open classes (no open.txt): --open-set is evaluated against the known
    test images, with the threshold calibrated on val as always."""
    closed = tmp_path / "closed"  # the fixture as if curated with no open class
    closed.mkdir()
    manifest = json.loads((fmnist_small / "manifest.json").read_text())
    for name in ("open.txt", "open_classes.txt"):
        del manifest["files"][name]
    manifest |= {"open_classes": [], "image_root": str(fmnist_small / "images")}
    manifest["counts"]["open"] = 0
    (closed / "manifest.json").write_text(json.dumps(manifest))
    for name in ("train.txt", "val.txt", "test.txt", "classes.txt"):
        (closed / name).write_bytes((fmnist_small / name).read_bytes())
    copy = fmnist_small / "images" / "open-copy.txt"
    copy.write_text((fmnist_small / "open.txt").read_text())
    try:
        with_open = evaluate_run(plain_run, fmnist_small, open_set=True, detectors=["energy"],
                                 open_sets={"copy": copy})
    finally:
        copy.unlink()
    listed = tmp_path / "open-list.txt"  # absolute paths: allowed in a list the user names
    listed.write_text("".join(f"{fmnist_small / 'images' / line.split()[0]} -1\n"
                              for line in (fmnist_small / "open.txt").read_text().splitlines()))
    report = evaluate_run(plain_run, closed, open_set=True, detectors=["energy"],
                          open_sets={"copy": listed})
    assert "open" not in report
    figures = report["open_sets"]["copy"]
    assert figures["num_open"] == 30 and figures["num_known"] == 120
    for key, value in with_open["open_sets"]["copy"].items():
        assert figures[key] == value, key
    assert report["detectors"]["energy"] == {
        "open:copy": with_open["detectors"]["energy"]["open:copy"]}
    assert "open set 'copy': F-measure" in format_report(report)
    with pytest.raises(InputError, match="benchmark has no open split .*--open-set NAME=DIR"):
        evaluate_run(plain_run, closed, open_set=True)


def test_an_open_set_list_naming_one_image_twice_is_refused(plain_run, fmnist_small, tmp_path):
    image = next((fmnist_small / "images").rglob("*.png"))
    split = tmp_path / "twice.txt"
    split.write_text(f"{image} -1\n{image.parent}/./{image.name} -1\n")
    with pytest.raises(InputError, match=r"twice\.txt:2: image listed twice \(first on line 1"):
        evaluate_run(plain_run, fmnist_small, open_set=True, open_sets={"x": split})
    with pytest.raises(InputError, match=r"an external open set needs a path"):
        evaluate_run(plain_run, fmnist_small, open_set=True, open_sets={"x": ""})


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_missing_or_empty_open_set_is_refused(plain_run, fmnist_small, tmp_path, kind):
    path = tmp_path / kind
    if kind == "empty":
        path.mkdir()
    with pytest.raises(InputError):
        evaluate_run(plain_run, fmnist_small, open_set=True, open_sets={"x": path})


def test_unknown_detector_is_refused(plain_run, fmnist_small):
    with pytest.raises(InputError, match="unknown detector"):
        evaluate_run(plain_run, fmnist_small, open_set=True, detectors=["msp", "nope"])


def test_auto_tau_normalization_is_selected_on_val(plain_run, fmnist_small):
    report = evaluate_run(plain_run, fmnist_small, open_set=True, tau_normalization="auto")
    assert report["tau_normalization_source"].startswith("selected on val")
    assert report["tau_normalization"] in TAU_NORM_GRID
    # the same τ from our own pass over val
    net, _ = load_model(plain_run / "main")
    cfg = stage_config(load_config("plain", overrides=SMALL), "main")
    bench = load_benchmark(fmnist_small)
    val = collect_outputs(net, eval_loader(dataset_for(bench, "val", cfg["data"], train=False),
                                           256, 0), CPU, amp="off")
    weight = net.classifier.weight.detach().numpy()
    bias = net.classifier.bias.detach().numpy()
    assert report["tau_normalization"] == select_tau_normalization(
        val["features"], val["labels"], weight, bias)
    # and its decision logits are the τ-normalised ones
    outputs = collect_run_outputs(plain_run, fmnist_small, ("val",),
                                  overrides={"tau_normalization": report["tau_normalization"]})
    assert np.allclose(outputs.splits["val"]["logits"],
                       tau_normalized_logits(val["features"], weight, bias,
                                             report["tau_normalization"]), atol=1e-4)
    given = evaluate_run(plain_run, fmnist_small, open_set=False, tau_normalization=0.0)
    assert given["tau_normalization"] == 0.0 and given["tau_normalization_source"] == "given"


def test_negative_logit_adjustment_is_accepted(plain_run, fmnist_small):
    minus = collect_run_outputs(plain_run, fmnist_small, ("val",), overrides={"logit_adjustment": -1.0})
    plain = collect_run_outputs(plain_run, fmnist_small, ("val",), overrides={"logit_adjustment": 0.0})
    prior = plain.train_counts / plain.train_counts.sum()
    assert np.allclose(minus.splits["val"]["logits"],
                       plain.splits["val"]["logits"] - np.log(prior), atol=1e-4)
    assert minus.logit_adjustment == -1.0
    with pytest.raises(InputError):
        collect_run_outputs(plain_run, fmnist_small, ("val",), overrides={"tau_normalization": -0.5})


def test_open_scores_use_the_models_logits_unless_told_otherwise(plain_run, fmnist_small):
    """eval.open_score_logits: the logit adjustment moves the closed-set decision only (model),
    or the open score too (decision)."""
    from oltr.evaluation.run_outputs import score_logits

    base = evaluate_run(plain_run, fmnist_small, open_set=True, logit_adjustment=0.0)
    moved = evaluate_run(plain_run, fmnist_small, open_set=True, logit_adjustment=-1.0)
    assert moved["open_score_logits"] == "model"
    for key in ("auroc", "fpr95", "detection_error", "threshold"):
        assert moved["open"][key] == base["open"][key]
    assert moved["closed"] != base["closed"]  # the decision did move
    outputs = collect_run_outputs(plain_run, fmnist_small, ("val",), overrides={"logit_adjustment": -1.0})
    val = outputs.splits["val"]
    prior = outputs.train_counts / outputs.train_counts.sum()
    assert np.allclose(score_logits(val), val["logits"] + np.log(prior), atol=1e-4)
    # decision: the open score sees the adjusted logits
    config_path = plain_run / "config.yaml"
    saved = config_path.read_text()
    try:
        config_path.write_text(saved.replace("open_score_logits: model",
                                             "open_score_logits: decision"))
        decided = collect_run_outputs(plain_run, fmnist_small, ("val",), overrides={"logit_adjustment": -1.0})
        assert np.array_equal(score_logits(decided.splits["val"]),
                              decided.splits["val"]["logits"])
    finally:
        config_path.write_text(saved)
