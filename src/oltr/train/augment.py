"""Batched image augmentation on uint8 tensors (the in-memory fast path of small datasets).

:class:`BatchAugment` does, for a whole batch at once and on the batch's device, what
``oltr.data.transforms.build_transform("small", train=True)`` does per PIL image after its
deterministic resize + centre crop: ``RandomCrop(size, padding=size // 8)`` (zero padding) and
``RandomHorizontalFlip``, then ``ToTensor`` (÷ 255) and ``Normalize``. The crops and flips are
drawn from a ``torch.Generator`` the caller seeds (per epoch), so an epoch's augmentation is a
function of ``(seed, epoch)`` only, whatever the number of workers. Same distributions as the
PIL pipeline, not the same random stream.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def normalize_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
                    ) -> torch.Tensor:
    """uint8 (B, C, H, W) → float32 ``(x / 255 − mean) / std`` per channel, exactly as
    torchvision's ``ToTensor`` + ``Normalize`` compute it."""
    floats = images.to(torch.float32).div_(255.0)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return floats.sub_(mean_t).div_(std_t)


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None
                ) -> torch.Tensor:
    """Per-sample random crop of ``images`` (B, C, H, W) after zero-padding ``padding`` pixels
    on every side: the output keeps the input size, each sample shifted by its own offsets
    drawn uniformly from ``0 … 2·padding`` (torchvision's ``RandomCrop(size, padding)``)."""
    if padding == 0:
        return images
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(images.device)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(images.device)
    rows = top[:, None] + torch.arange(height, device=images.device)  # (B, H)
    cols = left[:, None] + torch.arange(width, device=images.device)  # (B, W)
    index = torch.arange(batch, device=images.device)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]  # B,H,W,C
    return cropped.permute(0, 3, 1, 2).contiguous()


def random_flip(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Flip each sample left-right with probability ½."""
    flip = torch.rand(images.shape[0], generator=generator).to(images.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


class BatchAugment:
    """The ``small`` preset's training augmentation on a uint8 batch, then normalisation.

    ``train=False`` only normalises (the evaluation transform of already resized images).
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], *,
                 train: bool = True) -> None:
        self.padding = image_size // 8 if train else 0
        self.flip = train
        self.mean, self.std = list(mean), list(std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        if self.padding:
            images = random_crop(images, self.padding, generator)
        if self.flip:
            images = random_flip(images, generator)
        return normalize_uint8(images, self.mean, self.std)
