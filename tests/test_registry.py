"""The component registries (oltr.registry): the registry itself, the contract every registered
component keeps (parametrised over each registry's names, timm's tests/test_models.py shape),
the config's allowed values read from them, the one default source, and components of one's
own registered from outside the package and used by name like the built-in ones.

Every registered detector's contract (direction, shapes, determinism, fit before score, saved
state) is in tests/test_detectors_posthoc.py, parametrised over ``DETECTORS``."""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from oltr.config import (
    BASE_CONFIG,
    CHECKS,
    METHODS,
    list_benchmarks,
    list_methods,
    load_config,
    register_method,
    stage_config,
)
from oltr.data.samplers import SAMPLERS
from oltr.data.sources import SOURCES, parse_source
from oltr.detectors import DETECTORS, Detector, Energy, create_detector, register_detector
from oltr.errors import InputError
from oltr.losses import (
    CENTROID_LOSSES,
    CLASSIFICATION_LOSSES,
    FEATURE_LOSSES,
    LOSSES,
    build_classification_loss,
    loss_from_config,
    register_loss,
)
from oltr.models.heads import HEADS
from oltr.models.network import CLASSIFIERS, NETWORK_DEFAULTS, create_network
from oltr.openset import OPEN_SCORES, compute_open_score
from oltr.pipeline import train_run
from oltr.registry import Registry
from oltr.train.objective import check_stage_losses

BASE = yaml.safe_load(BASE_CONFIG.read_text(encoding="utf-8"))
COUNTS = [9, 5, 2]


# ------------------------------------------------------------------------------ the registry


def test_register_create_names_and_the_error_of_an_unknown_name():
    registry: Registry = Registry("widget")

    @registry.register("square")
    def square(side: float = 2.0) -> float:
        return side * side

    registry.register("cube", lambda side=3.0: side ** 3)
    assert registry.names() == ["square", "cube"] and list(registry) == ["square", "cube"]
    assert "square" in registry and "circle" not in registry and ["x"] not in registry
    assert registry.create("square", side=3.0) == 9.0
    assert registry.create("square", side=None) == 4.0  # None: the builder's default
    assert registry.entry("cube") is registry["cube"]
    with pytest.raises(InputError, match=r"unknown widget \(valid: square, cube\) "
                                         r"\(value: 'circle'\)"):
        registry.create("circle")
    with pytest.raises(InputError, match="unknown widget"):
        registry.entry(["not", "a", "name"])
    assert registry.register("square", square) is square  # the same object again: a no-op
    with pytest.raises(InputError, match="a widget of this name is already registered"):
        registry.register("square", lambda: 0)
    with pytest.raises(InputError, match="a widget needs a name"):
        registry.register(None, object())
    assert registry.pop("cube")() == 27.0 and registry.pop("cube", None) is None
    assert registry.names() == ["square"]


def test_a_registry_takes_its_name_from_the_object_and_its_own_message():
    registry: Registry = Registry("sampler", unknown="train.sampler must be {names_or}")

    @registry.register()
    class Named:
        name = "named"

    assert registry["named"] is Named
    registry.register("other", object())
    with pytest.raises(InputError, match=r"^train\.sampler must be named or other "
                                         r"\(value: 'x'\)$"):
        registry.entry("x")


# ----------------------------------------------------------------- contracts of the built-ins


def _train_cfg() -> dict:
    return dict(BASE["train"])


LOSS_CASES = [(kind, name) for kind, registry in LOSSES.items() for name in registry]


@pytest.mark.parametrize(("kind", "name"), LOSS_CASES, ids=[f"{k}-{n}" for k, n in LOSS_CASES])
def test_every_registered_loss_gives_a_finite_loss_with_gradients(kind, name):
    """Built from the default config's train section as the objective builds it."""
    loss = loss_from_config(kind, name, _train_cfg(), class_counts=COUNTS)
    assert isinstance(loss, nn.Module)
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    features = torch.randn(6, 4, generator=generator, requires_grad=True)
    if kind == "classification":
        value = loss(features[:, :3], labels)
    elif kind == "feature":
        value = loss(features, labels)
    else:
        centroids = torch.randn(3, 4, generator=generator, requires_grad=True)
        value = loss(features, labels, centroids)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()


def test_loss_registries_keep_their_messages():
    assert list(CLASSIFICATION_LOSSES) == ["ce", "focal", "balanced_softmax", "logit_adjusted",
                                           "ldam"]
    assert list(FEATURE_LOSSES) == ["range", "lifted"]
    assert list(CENTROID_LOSSES) == ["nearest", "printed", "original"]
    with pytest.raises(InputError, match=r"unknown feature loss \(valid: range, lifted\)"):
        FEATURE_LOSSES.create("triplet")
    with pytest.raises(InputError, match="unknown loss kind"):
        loss_from_config("metric", "range", _train_cfg())
    with pytest.raises(InputError, match="classification loss 'ldam' needs class_counts"):
        loss_from_config("classification", "ldam", _train_cfg())


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("replicas", [1, 2])
def test_every_registered_sampler_yields_valid_indices(name, replicas):
    labels = np.array([0] * 12 + [1] * 4 + [2] * 2)
    streams = []
    for rank in range(replicas):
        sampler = SAMPLERS.create(name, labels, _train_cfg(), num_samples=20, seed=3,
                                  num_replicas=replicas, rank=rank)
        sampler.set_epoch(1)
        indices = list(sampler)
        positions, stream = sampler.stream()
        assert len(indices) == len(sampler) == -(-20 // replicas)
        assert all(isinstance(i, int) and 0 <= i < len(labels) for i in indices)
        assert stream.tolist() == indices and len(positions) == len(indices)
        streams.append(positions.tolist())
    every = [p for positions in streams for p in positions]
    assert len(set(every)) == len(every)  # the ranks take disjoint positions of one stream


def test_every_open_score_is_a_detector_giving_the_same_score():
    """openset.OPEN_SCORES (stateless functions, below the detectors) names detectors."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    features = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    centroids = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    for name in OPEN_SCORES:
        assert name in DETECTORS
        options = {"centroids": centroids} if name == "reachability" else {}
        detector = create_detector(name, **options)
        assert np.allclose(detector.score(logits=logits, features=features),
                           compute_open_score(name, logits=logits, features=features,
                                              centroids=centroids))


METHOD_CASES = [(benchmark, method) for benchmark in list_benchmarks()
                for method in list_methods(benchmark)]


@pytest.mark.parametrize(("benchmark", "method"), METHOD_CASES,
                         ids=[f"{b}-{m}" for b, m in METHOD_CASES])
def test_every_method_preset_loads_and_validates(benchmark, method):
    config = load_config(method, benchmark=benchmark)  # validate_config runs inside
    assert config["method"] == method and config["stages"]
    for stage in config["stages"]:
        flat = stage_config(config, stage["name"])
        # every model key comes from the config (base.yaml): NETWORK_DEFAULTS supplies none
        assert set(flat["model"]) == set(NETWORK_DEFAULTS) - {"learn_cosine_scale"}


def test_source_kinds_are_the_registry_and_keep_their_messages(tmp_path):
    assert list(SOURCES) == ["fashion-mnist", "folder", "trainval", "splits"]
    with pytest.raises(InputError, match=r"unknown source; expected one of fashion-mnist, "
                                         r"fashion-mnist:ROOT, folder:PATH, trainval:ROOT, "
                                         r"splits:PATH \(value: 'imagenet:/x'\)"):
        parse_source("imagenet:/x")
    with pytest.raises(InputError, match=r"'trainval:' needs a path, as in 'trainval:PATH'"):
        parse_source("trainval:")
    with pytest.raises(InputError, match=r"image_root applies to 'splits:PATH' sources only"):
        parse_source("fashion-mnist", image_root=tmp_path)


def test_heads_build_what_the_network_builds():
    """models.heads.HEADS, which the network builds its classifier from, agrees with it."""
    assert HEADS.names() == list(CLASSIFIERS)
    options = {key: NETWORK_DEFAULTS[key] for key in (
        "cosine_scale", "squash_form", "learn_cosine_scale", "margin_scale", "margin",
        "arcface_easy_margin")} | {"novel_classes": [2]}
    for name in HEADS:
        net = create_network({"backbone": "resnet10_small", "width": 4, "classifier": name,
                              "fslwf_novel_max": 2}, 3, 1, class_counts=COUNTS)
        head = HEADS.create(name, net.feature_dim, 3, options)
        assert type(head) is type(net.classifier)
        assert {k: v.shape for k, v in head.state_dict().items()} == \
            {k: v.shape for k, v in net.classifier.state_dict().items()}
    with pytest.raises(InputError, match="fslwf classifier needs novel"):
        HEADS.create("fslwf", 8, 3, options | {"novel_classes": []})


# ------------------------------------------------------- the config's values, the defaults


def test_the_configs_allowed_names_are_the_registries():
    assert CHECKS["train.loss"][0] == "one of " + ", ".join(CLASSIFICATION_LOSSES)
    assert CHECKS["train.feature_loss"][0] == "one of " + ", ".join(["none", *FEATURE_LOSSES])
    assert CHECKS["train.centroid_loss"][0] == "one of " + ", ".join(["none", *CENTROID_LOSSES])
    assert CHECKS["train.sampler"][0] == "one of instance, class_aware"
    assert CHECKS["model.classifier"][0] == "one of " + ", ".join(CLASSIFIERS)
    assert all(CHECKS["eval.open_score"][1](name) for name in ("auto", *DETECTORS))


def test_network_defaults_are_base_yaml():
    """configs/base.yaml is the one default source: create_network's defaults are its values."""
    assert {k: v for k, v in NETWORK_DEFAULTS.items() if k != "learn_cosine_scale"} == \
        BASE["model"]
    assert NETWORK_DEFAULTS["backbone"] == "resnet10_small"
    assert type(create_network({"width": 4}, 3, 1).backbone) is \
        type(create_network({"width": 4, "backbone": "resnet10_small"}, 3, 1).backbone)


# --------------------------------------------------- components registered from outside


class ToyLoss(nn.Module):
    """Cross-entropy times a factor (a test loss of one's own)."""

    def __init__(self, factor: float = 2.0) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.factor * nn.functional.cross_entropy(logits, labels)


class ToyDetector(Detector):
    """Half the energy score (a test detector of one's own)."""

    name: ClassVar[str] = "toy_detector"
    inputs: ClassVar[tuple[str, ...]] = ("logits",)

    def _score(self, logits):
        return 0.5 * Energy().score(logits=logits)


def test_a_loss_a_detector_and_a_method_of_ones_own_are_used_by_name(tmp_path):
    from oltr.decision import SplitOutputs, fit_decision_rule

    register_loss("classification", "toy_loss", ToyLoss)
    register_detector(ToyDetector)
    register_method("toy_method", {"base": "_base.yaml", "method": "toy_method",
                                   "train": {"epochs": 1, "loss": "toy_loss"},
                                   "eval": {"open_score": "toy_detector"}})
    file_preset = tmp_path / "toy_file.yaml"
    file_preset.write_text("train:\n  loss: toy_loss\n  lr: 0.05\n")
    register_method("toy_file", file_preset)
    try:
        # the config accepts them by name, and lists them among the valid names
        assert "toy_method" in list_methods() and "toy_file" in list_methods("imagenet_lt")
        config = load_config("toy_method")
        assert config["train"]["loss"] == "toy_loss"
        assert config["eval"]["open_score"] == "toy_detector"
        assert config["train"]["epochs"] == 1 and config["data"]["image_size"] == 28  # _base
        assert load_config("toy_method", benchmark="imagenet_lt")["data"]["image_size"] == 224
        assert load_config("toy_file")["train"]["lr"] == 0.05
        with pytest.raises(InputError, match=r"must be one of ce, .*, ldam, toy_loss "
                                             r"\(value: 'nope'\)"):
            load_config("toy_method", overrides=["train.loss=nope"])
        with pytest.raises(InputError, match=r"unknown method 'nope' .*toy_file, toy_method"):
            load_config("nope")
        # create builds them
        loss = build_classification_loss("toy_loss", class_counts=COUNTS, factor=None)
        assert isinstance(loss, ToyLoss) and loss.factor == 2.0
        assert isinstance(CLASSIFICATION_LOSSES.create("toy_loss", factor=3.0), ToyLoss)
        assert isinstance(loss_from_config("classification", "toy_loss", config["train"]),
                          ToyLoss)
        assert isinstance(create_detector("toy_detector"), ToyDetector)
        # the decision code fits the rule with the detector named by the config
        generator = torch.Generator().manual_seed(0)
        labels = torch.arange(3).repeat(4)
        logits = 3.0 * nn.functional.one_hot(labels, 3) + torch.randn(12, 3, generator=generator)
        split = SplitOutputs(logits=logits, features=torch.randn(12, 4, generator=generator),
                             labels=labels)
        rule = fit_decision_rule(stage_config(config, "main")["eval"],
                                 {"val": split, "train": split}, class_names=["a", "b", "c"],
                                 train_counts=COUNTS)
        assert rule.open_score == "toy_detector" and isinstance(rule.detector, ToyDetector)
        assert rule.apply(logits, split.features)["prediction"].shape == (12,)
        # a taken name is refused, for every kind
        with pytest.raises(InputError, match="already registered"):
            register_loss("classification", "focal", ToyLoss)
        with pytest.raises(InputError, match="already registered"):
            register_method("plain", {"train": {"epochs": 1}})
        with pytest.raises(InputError, match="plain folder name"):
            register_method("../escape", {"train": {"epochs": 1}})
        with pytest.raises(InputError, match="method preset not found"):
            register_method("missing_file", tmp_path / "missing.yaml")
    finally:
        CLASSIFICATION_LOSSES.pop("toy_loss", None)
        DETECTORS.pop("toy_detector", None)
        METHODS.pop("toy_method", None)
        METHODS.pop("toy_file", None)
    assert "toy_method" not in list_methods() and "toy_loss" not in CLASSIFICATION_LOSSES


class ToyHead(nn.Module):
    """A scaled linear head without bias, features (B, d) → logits (B, K) (a test head of
    one's own)."""

    def __init__(self, in_dim: int, num_classes: int, scale: float) -> None:
        super().__init__()
        self.project = nn.Linear(in_dim, num_classes, bias=False)
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * self.project(features)


def toy_head(in_dim: int, num_classes: int, options) -> nn.Module:
    """The builder of :class:`ToyHead`, its scale read from the head options."""
    return ToyHead(in_dim, num_classes, options["cosine_scale"])


def test_a_loss_and_a_head_of_ones_own_train_a_run_by_name(fmnist_small, tiny, tmp_path):
    """A loss registered with register_loss (its option read from the config) and a head
    registered in HEADS, both from outside the package, train a tiny run end to end by name
    (train.loss, model.classifier); the settings only some losses take list the losses that
    take them."""
    calls = []

    class CountedToyLoss(ToyLoss):
        def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            calls.append((self.factor, tuple(logits.shape)))
            return super().forward(logits, labels)

    register_loss("classification", "toy_loss", CountedToyLoss, options={"factor": "focal_gamma"})
    HEADS.register("toy_head", toy_head)
    try:
        assert "toy_head" in CHECKS["model.classifier"][0]
        config = load_config("plain", overrides=[
            *tiny, "train.epochs=1", "train.loss=toy_loss", "train.focal_gamma=0.5",
            "model.classifier=toy_head", "model.cosine_scale=2.0"])
        (result,) = train_run(config, fmnist_small, tmp_path / "run", progress=False,
                              verbose=False)
        assert result.epochs_run == 1
        assert calls and all(call == (0.5, (32, 4)) for call in calls)  # batch 32, 4 classes
        weights = load_file(tmp_path / "run" / "main" / "model.safetensors")
        assert [k for k in weights if k.startswith("classifier.")] == ["classifier.project.weight"]
        train = stage_config(config, "main")["train"]
        with pytest.raises(InputError, match=r"train\.label_smoothing applies to train\.loss: "
                                             r"ce only \(value: 'toy_loss'\)"):
            check_stage_losses(train | {"label_smoothing": 0.1})
        with pytest.raises(InputError, match=r"needs train\.loss ce or ldam "
                                             r"\(value: 'toy_loss'\)"):
            check_stage_losses(train | {"drw_epoch": 2})
    finally:
        CLASSIFICATION_LOSSES.pop("toy_loss", None)
        HEADS.pop("toy_head", None)
    assert "toy_head" not in CHECKS["model.classifier"][0]


def test_a_dataset_source_of_ones_own_is_curated_by_name(tmp_path):
    """docs/architecture.md's recipe for a dataset source: one loader returning a
    :class:`~oltr.data.sources.Source`, registered in ``SOURCES``; ``curate("toy_arrays:…")``
    and the benchmark it writes then work as for a built-in kind."""
    from oltr.data import curate, load_benchmark
    from oltr.data.sources import Source, SourceKind

    def load(spec, argument, **_options):
        rng = np.random.default_rng(int(argument))
        images = rng.integers(0, 256, size=(6 * 40, 8, 8), dtype=np.uint8)
        labels = np.repeat(np.arange(6), 40)
        keys = [(f"train/{i:05d}", int(label)) for i, label in enumerate(labels)]
        return Source(name=spec, class_names=[f"c{k}" for k in range(6)], train=keys,
                      arrays={"train": images})

    SOURCES.register("toy_arrays", SourceKind(load, ("toy_arrays:SEED",)))
    try:
        with pytest.raises(InputError, match=r"toy_arrays:SEED"):
            parse_source("nope:1")
        manifest = curate("toy_arrays:3", tmp_path / "bench", known=4, open=1, val_open=1,
                          max_count=20, min_count=2, val_per_class=2, test_per_class=2)
        bench = load_benchmark(tmp_path / "bench")
        assert len(bench.class_names) == 4 == len(manifest["known_classes"])
        assert bench.train_counts.tolist() == manifest["counts"]["train"] == [20, 9, 4, 2]
    finally:
        SOURCES.pop("toy_arrays")


def test_a_transform_preset_of_ones_own_is_accepted_by_name():
    """``data.transform`` reads the preset registry: a preset registered from outside the
    package is accepted by the config (and listed in its error) and built by every path's
    ``build_transform``."""
    from PIL import Image

    from oltr.data import build_transform
    from oltr.data.transforms import PRESETS, Preset

    assert list(PRESETS) == ["small", "imagenet", "none"]
    with pytest.raises(InputError, match=r"'data\.transform' must be one of small, imagenet, "
                                         r"none \(value: 'flip_only'\)"):
        load_config("plain", overrides=["data.transform=flip_only"])
    PRESETS.register(None, Preset("flip_only", resize=1.0, flip=True))
    try:
        assert load_config("plain", overrides=["data.transform=flip_only"])["data"][
            "transform"] == "flip_only"
        transform = build_transform("flip_only", train=True, image_size=8, channels=1,
                                    mean=[0.5], std=[0.5])
        assert transform(Image.new("L", (8, 8))).shape == (1, 8, 8)
    finally:
        PRESETS.pop("flip_only")
