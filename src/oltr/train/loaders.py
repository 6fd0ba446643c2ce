"""Training data pipelines, built once per stage; ``set_epoch`` before each epoch.

Both paths draw the epoch's samples from one sampler (`oltr.data.samplers`: instance-balanced
or class-aware, DDP-aware: rank r takes positions r, r + R, … of one global stream), and both
make an image's augmentation a function of ``(seed, epoch, position in the global stream)``
only — so a resumed run, a run with more loader workers and a DDP run see the same
augmentations as one uninterrupted process:

- :class:`TensorTrainLoader` (``data.loader`` tensor/auto, small datasets): the split decoded
  once into a uint8 tensor (on the training device), batches indexed out of it and augmented
  together (`oltr.data.augment.BatchAugment`), no DataLoader, no per-image Python;
- :class:`FileTrainLoader`: a DataLoader over the image files (persistent workers, pinned
  memory on CUDA) whose items are ``(epoch, position, index)``; each item's transform runs
  under a torch RNG seeded from ``(seed, epoch, position)``, and bad images arrive as one-line
  errors (`oltr.data.loader.ImageLoader`). Workers return uint8 images; the
  :class:`DevicePrefetcher` around it copies the next batch to the device on a side CUDA
  stream while the current one computes, and normalises there (timm's ``PrefetchLoader``);
- :class:`DeviceDecodeTrainLoader` (``data.decode: device``, JPEG datasets on a GPU): workers
  only read file bytes; the main process decodes each batch on the device
  (`oltr.data.jpeg.decode_images`) and augments it there
  (`oltr.data.augment.DeviceImagenetTransform`).

``train.batch_size`` is the global batch: with R ranks each rank takes ``batch_size / R``
images of every step, and the union of the ranks' batches is the single-process batch.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from oltr.data import Benchmark, ImageListDataset, build_transform, dataset_for
from oltr.data.augment import (
    BatchAugment,
    DeviceImagenetTransform,
    normalize_uint8,
    sample_seeds,
)
from oltr.data.jpeg import EncodedImages, decode_images, pack_encoded, unpack_encoded
from oltr.data.loader import ImageLoader
from oltr.data.samplers import SAMPLERS, ClassAwareSampler, InstanceSampler
from oltr.data.tensors import TensorImages, use_tensor_path
from oltr.errors import InputError
from oltr.runtime import Runtime


def make_sampler(labels: np.ndarray, train_cfg: dict[str, Any], seed: int, runtime: Runtime
                 ) -> InstanceSampler | ClassAwareSampler:
    """The epoch sampler of ``train.sampler`` (a name of :data:`oltr.data.samplers.SAMPLERS`)
    over ``labels``, this rank's share of it. InputError for an unknown sampler."""
    num_samples = train_cfg["epoch_samples"] or len(labels)
    return SAMPLERS.create(train_cfg["sampler"], labels, train_cfg, num_samples=num_samples,
                           seed=seed, num_replicas=runtime.world_size, rank=runtime.rank)


def rank_batch_size(batch_size: int, runtime: Runtime) -> int:
    """Images per step on this rank: the global ``train.batch_size`` over the ranks."""
    if batch_size % runtime.world_size:
        raise InputError(f"train.batch_size (the global batch) must be divisible by the "
                         f"{runtime.world_size} processes", value=batch_size)
    return batch_size // runtime.world_size


class TensorTrainLoader:
    """Batches of a split held in memory as uint8 (see the module docstring)."""

    def __init__(self, images: TensorImages, sampler: InstanceSampler | ClassAwareSampler,
                 augment: BatchAugment, batch_size: int, *, drop_last: bool) -> None:
        self.images, self.sampler, self.augment = images, sampler, augment
        self.batch_size, self.drop_last = batch_size, drop_last

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.augment.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        positions, indices = self.sampler.stream()
        stop = len(indices) - (len(indices) % self.batch_size if self.drop_last else 0)
        device = self.images.images.device
        for start in range(0, stop, self.batch_size):
            chunk = torch.as_tensor(indices[start:start + self.batch_size], device=device)
            images = self.images.images.index_select(0, chunk)
            yield (self.augment(images, positions[start:start + self.batch_size]),
                   self.images.labels.index_select(0, chunk))


class _TaggedSampler(Sampler):
    """Yields ``(epoch, position, index)`` for each sample of ``sampler``'s stream."""

    def __init__(self, sampler: InstanceSampler | ClassAwareSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        positions, indices = self.sampler.stream()
        epoch = self.sampler.epoch
        return iter(zip([epoch] * len(indices), positions.tolist(), indices.tolist()))


class _SeededItems(Dataset):
    """Item ``(epoch, position, index)`` of ``dataset``, its transform run under a torch RNG
    seeded from ``(seed, epoch, position)`` (the caller's RNG state is kept)."""

    def __init__(self, dataset: ImageListDataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        epoch, position, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(sample_seeds(self.seed, epoch, [position])[0]))
            return self.dataset[index]

    def image_path(self, key: tuple[int, int, int]) -> Any:
        return self.dataset.image_path(key[2])

    def error_at(self, key: tuple[int, int, int], message: str) -> InputError:
        return self.dataset.error_at(key[2], message)


class FileTrainLoader:
    """A DataLoader over the image files, built once per stage (see the module docstring)."""

    def __init__(self, dataset: ImageListDataset, sampler: InstanceSampler | ClassAwareSampler,
                 batch_size: int, *, seed: int, num_workers: int, drop_last: bool,
                 pin_memory: bool) -> None:
        self.sampler = sampler
        self.loader = ImageLoader(
            _SeededItems(dataset, seed), sampler=_TaggedSampler(sampler), batch_size=batch_size,
            num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory,
            persistent_workers=num_workers > 0)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.loader)


class DevicePrefetcher:
    """Batches of ``loader`` on ``device``, the next one copied while the current one computes
    (timm's ``PrefetchLoader``): on CUDA the host→device copy of batch k+1 runs on a side
    stream, the compute stream waits for it only when batch k+1 is taken, and the tensors
    are recorded on the compute stream (so the allocator does not reuse them early). uint8
    images are normalised on the device (``mean``/``std``: ToTensor + Normalize, exactly on
    the CPU and within 1e-6 on CUDA, `oltr.data.augment.normalize_uint8`). On other devices it only moves and normalises.
    ``set_epoch`` and ``sampler`` are the wrapped loader's."""

    def __init__(self, loader: Any, device: torch.device, *,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None
                 ) -> None:
        self.loader, self.device = loader, torch.device(device)
        self.mean, self.std = mean, std

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def _finish(self, images: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        labels = torch.as_tensor(labels).to(self.device, non_blocking=True)
        if images.dtype == torch.uint8 and self.mean is not None:
            images = normalize_uint8(images, self.mean, self.std)  # type: ignore[arg-type]
        return images, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.device.type != "cuda":
            for images, labels in self.loader:
                yield self._finish(images, labels)
            return
        stream = torch.cuda.Stream(self.device)
        current = None
        for images, labels in self.loader:
            with torch.cuda.stream(stream):
                upcoming = self._finish(images, labels)
            if current is not None:
                yield current
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(stream)
            for tensor in upcoming:
                tensor.record_stream(compute)
            current = upcoming
        if current is not None:
            yield current


class _EncodedItems(Dataset):
    """Item ``(epoch, position, index)`` → ``(payload, label, index, position)`` of
    :class:`~oltr.data.jpeg.EncodedImages` (augmentation draws happen on the device)."""

    def __init__(self, encoded: EncodedImages) -> None:
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[Any, ...]:
        return (*self.encoded[key[2]], key[1])

    def image_path(self, key: tuple[int, int, int]) -> Any:
        return self.encoded.image_path(key[2])

    def error_at(self, key: tuple[int, int, int], message: str) -> InputError:
        return self.encoded.error_at(key[2], message)


class DeviceDecodeTrainLoader:
    """``data.decode: device`` (see the module docstring): a DataLoader whose workers read
    file bytes, each batch decoded, augmented (``imagenet`` preset) and normalised on
    ``device``. A sample's augmentation is a function of ``(seed, epoch, position)``."""

    def __init__(self, dataset: ImageListDataset, sampler: InstanceSampler | ClassAwareSampler,
                 batch_size: int, data_cfg: dict[str, Any], *, seed: int, num_workers: int,
                 drop_last: bool, device: torch.device) -> None:
        self.dataset, self.sampler, self.device = dataset, sampler, torch.device(device)
        self.transform = DeviceImagenetTransform(data_cfg["image_size"], data_cfg["mean"],
                                                 data_cfg["std"], train=True, seed=seed)
        self.loader = ImageLoader(
            _EncodedItems(EncodedImages(dataset)), sampler=_TaggedSampler(sampler),
            batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
            pin_memory=self.device.type == "cuda", persistent_workers=num_workers > 0,
            collate_fn=pack_encoded)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.transform.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            payloads, (labels, indices, positions) = unpack_encoded(batch)
            images = decode_images(payloads, indices, self.dataset, self.device)
            yield (self.transform(images, np.asarray(positions, dtype=np.int64)),
                   torch.as_tensor(labels, dtype=torch.int64).to(self.device))


def build_train_loader(bench: Benchmark, cfg: dict[str, Any], runtime: Runtime
                       ) -> TensorTrainLoader | DevicePrefetcher | DeviceDecodeTrainLoader:
    """The training loader of a stage (flat config ``cfg``) on this rank."""
    train_cfg, data_cfg = cfg["train"], cfg["data"]
    dataset = dataset_for(bench, "train", data_cfg, train=True)
    sampler = make_sampler(dataset.labels, train_cfg, cfg["seed"], runtime)
    batch = rank_batch_size(train_cfg["batch_size"], runtime)
    drop_last = len(dataset) > train_cfg["batch_size"]
    if use_tensor_path(data_cfg, len(dataset)):
        images = TensorImages.decode(dataset, transform=data_cfg["transform"],
                                     image_size=data_cfg["image_size"],
                                     channels=data_cfg["channels"]).to(runtime.device)
        augment = BatchAugment(data_cfg["image_size"], data_cfg["mean"], data_cfg["std"],
                               seed=cfg["seed"], preset=data_cfg["transform"])
        return TensorTrainLoader(images, sampler, augment, batch, drop_last=drop_last)
    if data_cfg["decode"] == "device":
        return DeviceDecodeTrainLoader(dataset, sampler, batch, data_cfg, seed=cfg["seed"],
                                       num_workers=data_cfg["num_workers"], drop_last=drop_last,
                                       device=runtime.device)
    dataset.transform = build_transform(
        data_cfg["transform"], train=True, image_size=data_cfg["image_size"],
        channels=data_cfg["channels"], mean=data_cfg["mean"], std=data_cfg["std"],
        output="uint8")
    files = FileTrainLoader(dataset, sampler, batch, seed=cfg["seed"],
                            num_workers=data_cfg["num_workers"], drop_last=drop_last,
                            pin_memory=runtime.device.type == "cuda")
    return DevicePrefetcher(files, runtime.device, mean=data_cfg["mean"], std=data_cfg["std"])
