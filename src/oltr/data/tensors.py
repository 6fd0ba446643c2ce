"""The in-memory fast path of small datasets: a split decoded once into one uint8 tensor.

For ``data.transform`` ``small`` or ``none`` everything but the random crop and flip is
deterministic, so a split's images are decoded once (with the one image loader,
`oltr.data.images.load_image`), resized and centre-cropped as the PIL pipeline does, and kept
as a ``uint8`` tensor (N, C, H, W) — 6 499 Fashion-MNIST-LT train images take 5 MB. Batches are
then indexed out of it and augmented and normalised for the whole batch at once
(:class:`oltr.data.augment.BatchAugment`): no per-image PIL or Python on the hot path.
Evaluation batches are bit-identical to the PIL pipeline's (``ToTensor`` + ``Normalize`` of the
same pixels); training batches have the same distribution of crops and flips.

``data.loader``: ``tensor`` forces this path, ``files`` the DataLoader over image files,
``auto`` takes this path for ``small`` / ``none`` transforms when the decoded split fits in
``TENSOR_LIMIT_BYTES``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision import transforms as T

from oltr.data.datasets import ImageListDataset
from oltr.data.loader import size_mismatch_message
from oltr.data.transforms import PRESETS
from oltr.errors import InputError

#: ``data.loader: auto`` keeps a split in memory up to this many bytes of decoded pixels.
TENSOR_LIMIT_BYTES = 2 << 30
#: The presets whose augmentation is batchable (`oltr.data.transforms.Preset.batchable`):
#: ``small`` and ``none``.
TENSOR_TRANSFORMS = tuple(name for name, preset in PRESETS.items() if preset.batchable)


def decoded_bytes(num_images: int, channels: int, image_size: int) -> int:
    """Bytes of ``num_images`` decoded ``image_size``² images with ``channels`` channels."""
    return num_images * channels * image_size * image_size


def use_tensor_path(data_cfg: dict, num_images: int) -> bool:
    """Whether ``data.loader`` (and the split's size) selects the in-memory path."""
    loader = data_cfg.get("loader", "auto")
    if loader == "files":
        return False
    eligible = data_cfg["transform"] in TENSOR_TRANSFORMS
    if loader == "tensor":
        if not eligible:
            raise InputError("data.loader: tensor needs data.transform small or none (the "
                             "imagenet preset crops at random scales)", value=data_cfg["transform"])
        return True
    fits = decoded_bytes(num_images, data_cfg["channels"], data_cfg["image_size"]) \
        <= TENSOR_LIMIT_BYTES
    return eligible and fits


@dataclass
class TensorImages:
    """A split's images as ``images`` uint8 (N, C, H, W) and ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> TensorImages:
        return TensorImages(self.images.to(device), self.labels.to(device))

    @classmethod
    def decode(cls, dataset: ImageListDataset, *, transform: str, image_size: int,
               channels: int) -> TensorImages:
        """Decode every image of ``dataset`` (errors name split file and line, as the file
        path's do) and apply the deterministic part of ``transform``: ``small`` resizes the
        shorter side to ``image_size`` and centre-crops; ``none`` keeps the pixels, which must
        then have one size (InputError naming the first image that differs)."""
        if transform not in TENSOR_TRANSFORMS:
            raise InputError("the in-memory path decodes small or none transforms only",
                             value=transform)
        steps = PRESETS[transform].fixed_steps(image_size)
        resize = T.Compose(steps) if steps else None
        arrays: list[np.ndarray] = []
        for index in range(len(dataset)):
            image = dataset.load_image(index)
            if resize is not None:
                image = resize(image)
            array = np.asarray(image, dtype=np.uint8)
            array = array[:, :, None] if array.ndim == 2 else array
            if arrays and array.shape != arrays[0].shape:
                shape = (array.shape[2], array.shape[0], array.shape[1])
                first = (arrays[0].shape[2], arrays[0].shape[0], arrays[0].shape[1])
                raise dataset.error_at(index, size_mismatch_message(
                    dataset.image_path(index), shape, dataset.image_path(0), first))
            arrays.append(array)
        if not arrays:
            raise InputError("the split holds no image", path=dataset.source_file)
        stacked = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        if stacked.shape[1] != channels:
            raise InputError(f"images have {stacked.shape[1]} channels, data.channels is "
                             f"{channels}", path=dataset.source_file)
        return cls(stacked, torch.as_tensor(dataset.labels, dtype=torch.int64))

    def batches(self, indices: Sequence[int] | torch.Tensor, batch_size: int, *,
                drop_last: bool = False):
        """Yield ``(uint8 images, labels)`` for consecutive chunks of ``indices``."""
        order = torch.as_tensor(indices, dtype=torch.int64)
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            chunk = order[start:start + batch_size].to(self.images.device)
            yield self.images.index_select(0, chunk), self.labels.index_select(0, chunk)
