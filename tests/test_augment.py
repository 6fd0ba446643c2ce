"""Batched uint8 augmentation (oltr.train.augment) against torchvision's per-image PIL ops."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from oltr.train.augment import BatchAugment, normalize_uint8, random_crop, random_flip


def test_random_crop_equals_pad_then_crop_at_the_drawn_offsets():
    images = torch.randint(0, 256, (5, 3, 12, 10), dtype=torch.uint8)
    cropped = random_crop(images, 2, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    top = torch.randint(0, 5, (5,), generator=generator)
    left = torch.randint(0, 5, (5,), generator=generator)
    for b in range(5):
        pil = Image.fromarray(images[b].permute(1, 2, 0).numpy())
        expected = TF.crop(TF.pad(pil, 2), int(top[b]), int(left[b]), 12, 10)
        assert np.array_equal(np.array(expected), cropped[b].permute(1, 2, 0).numpy())


def test_flip_and_normalisation_match_torchvision():
    images = torch.randint(0, 256, (64, 1, 6, 6), dtype=torch.uint8)
    flipped = random_flip(images, torch.Generator().manual_seed(1))
    changed = [not torch.equal(flipped[b], images[b]) for b in range(64)]
    assert all(torch.equal(flipped[b], images[b].flip(-1)) for b in range(64) if changed[b])
    assert 16 < sum(changed) < 48
    reference = TF.normalize(TF.to_tensor(Image.fromarray(images[0, 0].numpy())), [0.3], [0.2])
    assert torch.equal(normalize_uint8(images[:1], [0.3], [0.2])[0], reference)


def test_augmentation_is_a_function_of_the_generator_seed():
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    augment = BatchAugment(28, [0.5], [0.25])
    first = augment(images, torch.Generator().manual_seed(7))
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, augment(images, torch.Generator().manual_seed(8)))
    plain = BatchAugment(28, [0.5], [0.25], train=False)(images)
    assert torch.equal(plain, normalize_uint8(images, [0.5], [0.25]))
