"""Batched uint8 augmentation (oltr.data.augment) against torchvision's per-image PIL ops."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from oltr.data.augment import (
    BatchAugment,
    normalize_uint8,
    random_crop,
    random_flip,
    sample_seeds,
    sample_uniform,
)


def test_random_crop_equals_pad_then_crop_at_the_given_offsets():
    images = torch.randint(0, 256, (5, 3, 12, 10), dtype=torch.uint8)
    top, left = torch.tensor([0, 4, 2, 1, 3]), torch.tensor([4, 0, 2, 3, 1])
    cropped = random_crop(images, 2, top, left)
    for b in range(5):
        pil = Image.fromarray(images[b].permute(1, 2, 0).numpy())
        expected = TF.crop(TF.pad(pil, 2), int(top[b]), int(left[b]), 12, 10)
        assert np.array_equal(np.array(expected), cropped[b].permute(1, 2, 0).numpy())


def test_flip_and_normalisation_match_torchvision():
    images = torch.randint(0, 256, (4, 1, 6, 6), dtype=torch.uint8)
    flipped = random_flip(images, torch.tensor([True, False, True, False]))
    assert torch.equal(flipped[0], images[0].flip(-1)) and torch.equal(flipped[1], images[1])
    reference = TF.normalize(TF.to_tensor(Image.fromarray(images[0, 0].numpy())), [0.3], [0.2])
    assert torch.equal(normalize_uint8(images[:1], [0.3], [0.2])[0], reference)


def test_draws_depend_on_seed_epoch_and_position_only():
    first = sample_uniform(3, 1, np.arange(10_000), stream=0)
    assert ((0 <= first) & (first < 1)).all() and abs(first.mean() - 0.5) < 0.02
    # the same position gives the same draw, whatever else is drawn with it
    assert np.array_equal(sample_uniform(3, 1, [7, 42], 0), first[[7, 42]])
    assert not np.array_equal(sample_uniform(3, 2, [7, 42], 0), first[[7, 42]])
    assert not np.array_equal(sample_uniform(4, 1, [7, 42], 0), first[[7, 42]])
    assert not np.array_equal(sample_uniform(3, 1, [7, 42], 1), first[[7, 42]])
    seeds = sample_seeds(0, 0, np.arange(1000))
    assert len(set(seeds.tolist())) == 1000 and (seeds >= 0).all()


def test_batch_augment_is_per_position_and_uniform_over_offsets():
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    augment = BatchAugment(28, [0.5], [0.25], seed=7)
    positions = np.arange(100, 108)
    whole = augment(images, positions)
    halves = torch.cat([augment(images[:4], positions[:4]), augment(images[4:], positions[4:])])
    assert torch.equal(whole, halves)  # batching does not change an image's augmentation
    top, left, flip = augment.draws(np.arange(20_000))
    assert set(top.tolist()) == set(range(7)) and set(left.tolist()) == set(range(7))
    assert abs(flip.float().mean().item() - 0.5) < 0.02
    plain = BatchAugment(28, [0.5], [0.25], train=False)(images)
    assert torch.equal(plain, normalize_uint8(images, [0.5], [0.25]))
