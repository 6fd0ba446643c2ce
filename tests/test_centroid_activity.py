"""The large-margin centroid loss (paper Eq. 7, 9) is *active* on real data.

A loss term that is always zero passes every formula test (tests/test_losses.py holds the
known-answer ones); these tests train OLTR's two stages on real Fashion-MNIST images and check
that the preset's centroid loss contributes a non-zero term, that its hinge is open for a share
of the train images at the start of stage 2, and that its gradient moves the memory's
centroids — also when the memory feature does not back-propagate into them
(``model.detach_memory: true``), where the centroid loss is their only gradient.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oltr.config import load_config, load_saved_config, stage_config
from oltr.data import dataset_for, load_benchmark
from oltr.inference import collect_outputs, eval_loader, load_model
from oltr.losses import build_centroid_loss
from oltr.models import class_means
from oltr.pipeline import train_run


def _train(fmnist_small: Path, out: Path, extra: list[str]) -> Path:
    config = load_config("oltr", overrides=["model.width=8", "train.batch_size=32",
                                            "train.max_steps_per_epoch=4", "eval.batch_size=256",
                                            "stage1.train.epochs=2", "stage2.train.epochs=1",
                                            "train.amp=off", *extra])
    train_run(config, fmnist_small, out, progress=False)
    return out


def _initial_centroids(run: Path, fmnist_small: Path) -> tuple[torch.Tensor, torch.Tensor,
                                                                 torch.Tensor]:
    """Stage 1's direct train features, their labels and class means: what stage 2 starts from
    (``oltr.train.loop.init_centroids``)."""
    net, _ = load_model(run / "stage1")
    cfg = load_saved_config(run / "stage1" / "config.yaml")
    bench = load_benchmark(fmnist_small)
    outputs = collect_outputs(net, eval_loader(dataset_for(bench, "train", cfg["data"],
                                                           train=False), 256, 0),
                              torch.device("cpu"))
    features = torch.from_numpy(outputs["features"]).float()
    labels = torch.from_numpy(outputs["labels"]).long()
    return features, labels, class_means(features, labels, bench.num_classes)


@pytest.fixture(scope="module")
def runs(fmnist_small, tmp_path_factory) -> dict[str, Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("centroid-activity")
        return {"preset": _train(fmnist_small, root / "preset", []),
                "detached": _train(fmnist_small, root / "detached",
                                   ["stage2.model.detach_memory=true"])}
    finally:
        torch.set_num_threads(threads)


def _stage2_history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "stage2" / "history.jsonl").read_text()
            .splitlines()]


@pytest.mark.parametrize("name", ["preset", "detached"])
def test_centroid_term_is_nonzero_in_training(runs, name) -> None:
    for entry in _stage2_history(runs[name]):
        assert entry["train_loss_parts"]["centroid"] > 1e-4, entry["train_loss_parts"]


def test_preset_hinge_is_open_for_a_share_of_real_train_images(runs, fmnist_small) -> None:
    """The preset's form and margin, on the features and centroids stage 2 starts from."""
    cfg = stage_config(load_config("oltr"), "stage2")["train"]
    loss = build_centroid_loss(cfg["centroid_loss"], margin=cfg["centroid_margin"],
                               relative=cfg["centroid_relative_margin"])
    features, labels, centroids = _initial_centroids(runs["preset"], fmnist_small)
    active = (loss.hinge(features, labels, centroids) > 0).float().mean().item()
    assert active > 0.05, f"the centroid hinge is open for only {active:.1%} of train images"


@pytest.mark.parametrize("name", ["preset", "detached"])
def test_centroid_gradient_moves_the_memory(runs, fmnist_small, name) -> None:
    """Stage 2 starts from the class means; one epoch later the centroids have moved. With a
    detached memory feature the only gradient they get is the centroid loss's."""
    _, _, initial = _initial_centroids(runs[name], fmnist_small)
    learned = load_file(str(runs[name] / "stage2" / "model.safetensors"))[
        "meta_embedding.centroids"]
    moved = (learned - initial).norm(dim=1) / initial.norm(dim=1).clamp_min(1e-12)
    # 4 steps at lr_centroids 0.01 move each centroid by 2e-4 … 1e-3 of its norm (measured);
    # recomputing the same class means differs by float rounding only (~1e-7)
    assert (moved > 2e-5).all(), moved
