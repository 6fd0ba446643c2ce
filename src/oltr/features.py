"""The feature cache of a frozen backbone: compute the frozen part of a network once per split,
store its outputs memory-mapped in the stage folder, and train the rest on them.

A stage with ``train.freeze_backbone: true`` (cRT, LWS, FSLwF stage 2; OLTR stage 2 on
Places-LT) never changes its backbone, so with ``train.feature_cache: on`` the backbone runs
once over the train and val splits and every epoch reads its outputs instead of the images
(`oltr.models.OLTRNetwork.frozen_features` / ``forward_from_frozen``):

- **split point** — the last frozen module's output: the backbone's feature map (N, C, h, w)
  when modulated attention (trainable) follows it, else its global average pool (N, C)
  (pooling has no parameters, so the pool is part of the frozen side and the cache is
  h·w times smaller). The embedding, meta-embedding and classifier stay trainable.
- **transform** — the *evaluation* transform: the cache holds un-augmented features, so a
  stage trained on it sees **no augmentation** (that is the option's meaning; documented in
  docs/speed.md). With augmentation off on both sides (``data.transform: none``) cached and
  uncached training give the same weights to float tolerance (tests/test_features.py).
- **precision** — the frozen part runs in eval mode under ``eval.amp`` (fp32 by default, as
  centroid initialisation and validation do); rows are stored as float32
  (``train.feature_cache_dtype: float32``, the default: results as without the cache) or
  float16 (half the disk and reads; values rounded to 11 significant bits, overflow past
  65504 refused).
- **key** — the sha256 of everything the rows depend on: the frozen module's weights and
  BatchNorm statistics (the tensors themselves, so any weights file or init path that yields
  them gives the same key), the backbone's name, the split's entries (paths and labels after
  ``data.skip_bad_images``), the split file's bytes and the image root, the evaluation
  transform (its torchvision repr and ``data.decode``), the split point, the precision, the
  memory format and the storage dtype. A cache whose key differs is never read; the pixels
  of the image files themselves are not hashed (a curated benchmark's manifest vouches for
  them).
- **files** — ``STAGE/features-<split>-<key[:16]>.npy`` (a numpy ``.npy`` read with
  ``mmap_mode="r"``: rows are paged in from disk as batches need them) and ``.json`` beside it
  (the full key and shape; written last, so a half-written cache is never found). Written by
  rank 0 only, atomically (temporary file, fsync, rename); other caches of the same split in
  that stage folder are removed then (they are stale). Every rank then opens the same file
  and reads its own sampler's rows.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from oltr.data import Benchmark, dataset_for
from oltr.data.splits import sha256_file
from oltr.errors import InputError
from oltr.inference import eval_transform, forward_split
from oltr.io import atomic_write, atomic_write_text, read_json_object
from oltr.models import NetworkOutput, OLTRNetwork
from oltr.ownership import marker_kind
from oltr.runtime import Runtime, uses_bf16

#: Version of the cache's layout and of what its key covers; a change makes old caches stale.
CACHE_FORMAT = 1
DTYPES = {"float32": np.float32, "float16": np.float16}
_CACHE_NAME = re.compile(r"features-(?P<split>[a-z_]+)-(?P<key>[0-9a-f]{16})\.(npy|json)")
#: A store up to this many bytes is copied into the training device's memory once per stage;
#: a larger one is read from the memory map batch by batch.
IN_MEMORY_BYTES = 2 << 30


def frozen_state_digest(module: nn.Module) -> str:
    """sha256 of a module's state (parameters and buffers: names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(net: OLTRNetwork, bench: Benchmark, split: str, cfg: Mapping[str, Any],
              device: torch.device) -> str:
    """The sha256 (hex) naming the cache of ``split`` for ``net``'s frozen part under the flat
    stage config ``cfg`` (see the module docstring for what it covers)."""
    data_cfg = cfg["data"]
    entries = bench.split(split)
    record = {
        "format": CACHE_FORMAT,
        "split": split,
        "split_point": net.frozen_split,
        "backbone": [cfg["model"]["backbone"], cfg["model"]["width"]],
        "frozen_state": frozen_state_digest(net.frozen_part),
        "entries": hashlib.sha256(json.dumps(entries).encode()).hexdigest(),
        "split_file": sha256_file(bench.split_file(split)),
        "image_root": str(Path(bench.image_root).resolve()),
        "transform": repr(eval_transform(data_cfg)),
        "decode": data_cfg["decode"],
        "mode": "L" if data_cfg["channels"] == 1 else "RGB",
        "bf16": uses_bf16(cfg["eval"]["amp"], device),
        "channels_last": bool(cfg["train"]["channels_last"] and net.supports_channels_last),
        "dtype": cfg["train"]["feature_cache_dtype"],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def cache_paths(stage_dir: Path, split: str, key: str) -> tuple[Path, Path]:
    """The ``.npy`` rows and ``.json`` description of the cache ``key`` of ``split``."""
    stem = f"features-{split}-{key[:16]}"
    return Path(stage_dir) / f"{stem}.npy", Path(stage_dir) / f"{stem}.json"


@dataclass
class FeatureStore:
    """One split's frozen-part outputs: ``rows`` (N, …) memory-mapped float32/float16 in the
    split's order, ``labels`` int64 (N,), the ``split_point`` they were taken at and their
    ``key``. ``len(store)`` = N."""

    path: Path
    rows: np.ndarray
    labels: torch.Tensor
    split_point: str
    key: str

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes)

    def take(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The rows at ``indices`` as a float32 CPU tensor (read from the memory map)."""
        rows = np.asarray(self.rows[np.asarray(indices, dtype=np.int64)])
        return torch.from_numpy(rows).float()

    def batches(self, indices: Sequence[int] | np.ndarray, batch_size: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(rows, labels)`` for consecutive chunks of ``indices`` (float32, int64)."""
        order = np.asarray(indices, dtype=np.int64)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            yield self.take(chunk), self.labels[torch.from_numpy(chunk)]

    # ----------------------------------------------------------------- finding and building
    @classmethod
    def find(cls, stage_dir: Path, split: str, key: str, labels: np.ndarray
             ) -> FeatureStore | None:
        """The complete cache ``key`` of ``split`` in ``stage_dir``, or None (absent, damaged
        or of other rows: it is then built anew)."""
        rows_path, info_path = cache_paths(stage_dir, split, key)
        if not (rows_path.is_file() and info_path.is_file()):
            return None
        try:
            info = read_json_object(info_path, "feature cache description")
            rows = np.load(rows_path, mmap_mode="r")
        except (InputError, OSError, ValueError):
            return None
        if (info.get("key") != key or list(rows.shape) != info.get("shape")
                or str(rows.dtype) != info.get("dtype") or rows.shape[0] != len(labels)):
            return None
        return cls(rows_path, rows, torch.as_tensor(labels, dtype=torch.int64),
                   str(info.get("split_point")), key)

    @classmethod
    def build(cls, stage_dir: Path, net: OLTRNetwork, bench: Benchmark, split: str,
              cfg: Mapping[str, Any], runtime: Runtime, *, progress: bool = True
              ) -> FeatureStore:
        """The cache of ``split`` for ``net``'s frozen part: found in ``stage_dir``, or computed
        by rank 0 (one pass of :meth:`OLTRNetwork.frozen_features` over the split with the
        evaluation transform, eval mode, ``eval.amp``) and written there while the other
        ranks wait; every rank returns the same store. InputError when the disk lacks the
        room, or float16 cannot hold a value."""
        stage_dir = Path(stage_dir)
        dataset = dataset_for(bench, split, cfg["data"], train=False)
        labels = dataset.labels
        key = cache_key(net, bench, split, cfg, runtime.device)
        if runtime.is_primary and cls.find(stage_dir, split, key, labels) is None:
            _write_cache(stage_dir, net, dataset, split, key, cfg, runtime, progress=progress)
        runtime.barrier()
        store = cls.find(stage_dir, split, key, labels)
        if store is None:
            raise InputError("the feature cache rank 0 wrote is not readable on this rank (a "
                             "stage folder not shared between the nodes?)",
                             path=cache_paths(stage_dir, split, key)[0])
        return store


def _write_cache(stage_dir: Path, net: OLTRNetwork, dataset: Any, split: str, key: str,
                 cfg: Mapping[str, Any], runtime: Runtime, *, progress: bool) -> None:
    """Compute the frozen part over ``dataset`` and write the cache files (rank 0)."""
    data_cfg = cfg["data"]
    dtype = DTYPES[cfg["train"]["feature_cache_dtype"]]
    rows_path, info_path = cache_paths(stage_dir, split, key)
    shape: list[int] = []

    def fill(tmp: Path) -> None:
        rows = None
        start = 0

        def write(batch: dict[str, np.ndarray]) -> None:
            nonlocal rows, start
            values = batch["frozen"]
            if rows is None:
                shape[:] = [len(dataset), *values.shape[1:]]
                _check_room(stage_dir, split, shape, dtype)
                rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype,
                                                 shape=tuple(shape))
            with np.errstate(over="ignore"):  # an overflow is reported below, by name
                stored = values.astype(dtype)
            if dtype == np.float16 and not np.isfinite(stored[np.isfinite(values)]).all():
                run, stage = stage_dir.parent, stage_dir.name
                raise InputError(
                    "a frozen feature exceeds float16's range (65504): set "
                    f"{stage}.train.feature_cache_dtype=float32; to keep the stages "
                    f"trained before it, train this one into a new run folder: `oltr train "
                    f"… --out NEW --stage {stage} {stage}.train.init_from=PREVIOUS_STAGE "
                    f"{stage}.train.feature_cache_dtype=float32` (PREVIOUS_STAGE: e.g. "
                    f"{run}/stage1; --resume refuses a changed config)", path=stage_dir)
            rows[start:start + len(stored)] = stored
            start += len(stored)

        forward_split(FrozenPart(net), dataset, cfg, device=runtime.device, keys=("frozen",),
                      description=f"feature cache ({split})" if progress else None, sink=write)
        assert rows is not None and start == len(dataset)
        rows.flush()
        del rows

    was_training = net.training
    net.eval()
    try:
        atomic_write(rows_path, fill)
    finally:
        net.train(was_training)
    _remove_stale_caches(stage_dir, split, keep=rows_path.stem)
    atomic_write_text(info_path, json.dumps({
        "key": key, "split": split, "split_point": net.frozen_split, "shape": shape,
        "dtype": np.dtype(dtype).name, "transform": repr(eval_transform(data_cfg)),
        "note": "frozen-backbone feature cache (oltr.features): un-augmented features of the "
                "evaluation transform",
    }, indent=2) + "\n")


def _check_room(stage_dir: Path, split: str, shape: Sequence[int], dtype: Any) -> None:
    """InputError naming the folder when the disk cannot hold a cache of ``shape``."""
    needed = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    free = shutil.disk_usage(stage_dir).free
    if needed > free:
        raise InputError(f"the feature cache of the {split} split needs {needed / 2**30:.1f} GiB "
                         f"but {free / 2**30:.1f} GiB are free; free some space or set "
                         "train.feature_cache: off", path=stage_dir)


class FrozenOutput(NamedTuple):
    """What :class:`FrozenPart` returns: the frozen part's features, float32, contiguous."""

    frozen: torch.Tensor


class FrozenPart(nn.Module):
    """``net``'s frozen part as a network: ``FrozenPart(net)(images).frozen`` is
    ``net.frozen_features(images)`` (B, …) as contiguous float32, so
    :func:`oltr.inference.forward_split` runs the cache's pass like any other."""

    def __init__(self, net: OLTRNetwork) -> None:
        super().__init__()
        self.net = net

    @property
    def supports_channels_last(self) -> bool:
        """Whether the images may be channels-last (the network's own answer)."""
        return bool(self.net.supports_channels_last)

    def forward(self, images: torch.Tensor) -> FrozenOutput:
        """Images (B, C, H, W) → the frozen part's features."""
        return FrozenOutput(self.net.frozen_features(images).float().contiguous())


def _remove_stale_caches(stage_dir: Path, split: str, keep: str) -> None:
    """Delete the other caches of ``split`` in an oltr stage folder (computed for other
    weights or settings: never read again)."""
    if marker_kind(stage_dir) is None:
        return
    for entry in stage_dir.iterdir():
        match = _CACHE_NAME.fullmatch(entry.name)
        if match and match["split"] == split and entry.stem != keep and entry.is_file() \
                and not entry.is_symlink():
            entry.unlink(missing_ok=True)


class FromFrozen(nn.Module):
    """``net`` run from the split point: ``FromFrozen(net)(rows)`` is
    ``net.forward_from_frozen(rows)``, so :func:`oltr.inference.forward_split` can pass
    cached rows (no channels-last conversion of rows)."""

    supports_channels_last = False

    def __init__(self, net: OLTRNetwork) -> None:
        super().__init__()
        self.net = net

    def forward(self, rows: torch.Tensor) -> NetworkOutput:
        """Cached rows (B, …) → the network's :class:`~oltr.models.NetworkOutput`."""
        return self.net.forward_from_frozen(rows)


def store_outputs(net: OLTRNetwork, store: FeatureStore, cfg: Mapping[str, Any],
                  runtime: Runtime, *, keys: Sequence[str], description: str | None = None
                  ) -> dict[str, np.ndarray]:
    """:func:`oltr.inference.forward_split` of ``net`` over a store's rows instead of the
    split's images (each rank its contiguous shard, gathered in order)."""
    return forward_split(FromFrozen(net), store, cfg, runtime=runtime, keys=keys,
                         description=description)


class FeatureTrainLoader:
    """Training batches of cached rows: the stage's sampler (same epoch streams as the image
    loaders, so the same indices per step), this rank's ``batch_size`` rows per step. A store
    up to :data:`IN_MEMORY_BYTES` is copied to ``device`` once; a larger one is read from its
    memory map per batch."""

    def __init__(self, store: FeatureStore, sampler: Any, batch_size: int,
                 device: torch.device, *, drop_last: bool) -> None:
        self.store, self.sampler, self.batch_size = store, sampler, batch_size
        self.device, self.drop_last = device, drop_last
        self.resident = (torch.from_numpy(np.array(store.rows)).float().to(device)
                         if store.nbytes <= IN_MEMORY_BYTES else None)
        self.labels = store.labels.to(device)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        _, indices = self.sampler.stream()
        stop = len(indices) - (len(indices) % self.batch_size if self.drop_last else 0)
        pin = self.device.type == "cuda"
        for start in range(0, stop, self.batch_size):
            chunk = np.asarray(indices[start:start + self.batch_size], dtype=np.int64)
            index = torch.from_numpy(chunk).to(self.device)
            if self.resident is not None:
                rows = self.resident.index_select(0, index)
            else:
                rows = self.store.take(chunk)
                rows = (rows.pin_memory() if pin else rows).to(self.device, non_blocking=True)
            yield rows, self.labels.index_select(0, index)


@dataclass
class StageStores:
    """The stores a stage trains and validates on."""

    train: FeatureStore
    val: FeatureStore


def build_stage_stores(stage_dir: Path, net: OLTRNetwork, bench: Benchmark,
                       cfg: Mapping[str, Any], runtime: Runtime, *, progress: bool = True
                       ) -> StageStores:
    """Find or build the train and val caches of a stage with ``train.feature_cache: on``."""
    return StageStores(*(FeatureStore.build(stage_dir, net, bench, split, cfg, runtime,
                                            progress=progress) for split in ("train", "val")))


def find_stores(stage_dir: Path, net: OLTRNetwork, bench: Benchmark, cfg: Mapping[str, Any],
                splits: Sequence[str], device: torch.device) -> dict[str, FeatureStore]:
    """The existing caches of ``splits`` that belong to ``net``'s frozen part under ``cfg``
    (nothing is computed; a split without a valid cache is left out)."""
    found = {}
    for split in splits:
        if not bench.has_split(split):
            continue
        labels = np.array([label for _, label in bench.split(split)], dtype=np.int64)
        store = FeatureStore.find(stage_dir, split, cache_key(net, bench, split, cfg, device),
                                  labels)
        if store is not None:
            found[split] = store
    return found
