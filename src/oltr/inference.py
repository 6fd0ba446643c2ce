"""Inference: rebuild a trained network from its files, and run it once over a split.

``load_model`` rebuilds the network of a stage from ``model.json`` + ``model.safetensors``;
``EvalBatches`` serves a split's images in order, normalised as the model expects (in memory
as one uint8 tensor for small datasets, `oltr.data.tensors`; else a DataLoader over the files
whose bad inputs arrive as one-line errors, `oltr.data.loader`); ``collect_outputs`` runs the
network over them once and keeps what every metric and detector needs (logits, direct
features, γ, …). :func:`forward_split` is the one pass over a split that every caller runs —
validation, the decision rule's fitting, evaluation (and external open sets), OLTR's centroid
initialisation, the feature cache, identification's embeddings: it batches the split (the
evaluation transform, ``eval.batch_size``, a DDP rank's shard), runs it on any device under
``eval.amp`` and ``train.channels_last``, and gathers the ranks' outputs, so a split costs
one forward pass.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from oltr.data import ImageListDataset, build_transform
from oltr.data.augment import DeviceImagenetTransform, normalize_uint8
from oltr.data.jpeg import EncodedImages, decode_images, pack_encoded, unpack_encoded
from oltr.data.loader import ImageLoader
from oltr.data.tensors import TensorImages, use_tensor_path
from oltr.decision import SplitOutputs
from oltr.errors import InputError
from oltr.models import OLTRNetwork, create_network
from oltr.run import MODEL_INFO, StageDir, weights_digest
from oltr.runtime import Runtime, autocast

OUTPUT_KEYS = ("logits", "features", "reachability")


def load_model(stage_dir: str | Path | StageDir, device: torch.device | str = "cpu"
               ) -> tuple[OLTRNetwork, dict]:
    """Rebuild the network of a trained stage from ``model.json`` + ``model.safetensors``, in
    eval mode on ``device``. The returned info is ``model.json`` plus ``weights_sha256``, the
    sha256 of the weights file as read (what derived results — a report's threshold, the
    decision rule — record). InputError naming the file for anything missing or damaged."""
    stage = stage_dir if isinstance(stage_dir, StageDir) else StageDir(stage_dir)
    info_path, weights_path = stage.model_info_path, stage.weights_path
    for path in (info_path, weights_path):
        if not path.exists():
            raise InputError("trained model not found (has the stage finished an epoch?)", path=path)
    info = stage.model_info()
    try:
        net = create_network(info["model"], info["num_classes"], info["in_chans"],
                             class_counts=info.get("train_counts"))
    except (InputError, TypeError, ValueError) as exc:
        raise InputError(f"describes no valid model: {exc}", path=info_path) from None
    try:
        data = weights_path.read_bytes()
        state = load_safetensors(data)
    except Exception as exc:  # safetensors' own errors, OSError, MemoryError of a bad header
        raise InputError(f"cannot read weights: {exc}", path=weights_path) from exc
    info["weights_sha256"] = weights_digest(data)
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise InputError(f"weights do not fit the model in {MODEL_INFO}: "
                         f"{str(exc).strip().splitlines()[-1].strip()}", path=weights_path) from None
    if missing or unexpected:
        raise InputError(
            f"weights do not match the model in {MODEL_INFO}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}",
            path=weights_path,
        )
    return net.to(device).eval(), info


def eval_transform(data_cfg: dict[str, Any]) -> Any:
    """The evaluation transform of ``data_cfg`` (no augmentation)."""
    return build_transform(data_cfg["transform"], train=False, image_size=data_cfg["image_size"],
                           channels=data_cfg["channels"], mean=data_cfg["mean"],
                           std=data_cfg["std"])


def eval_loader(dataset: ImageListDataset, batch_size: int, num_workers: int) -> ImageLoader:
    """The file loader of an evaluation pass (in order); a bad image is the original one-line
    InputError in this process, whatever ``num_workers`` (`oltr.data.loader.ImageLoader`)."""
    return ImageLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def shard(count: int, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s contiguous share of ``range(count)`` (``numpy.array_split``: sizes
    differ by at most one, no padding), so concatenating the ranks' shares in rank order
    gives ``range(count)`` back."""
    return np.array_split(np.arange(count), world_size)[rank]


class EvalBatches:
    """A split's images in order, as float batches normalised as the model expects, with labels.

    ``data.loader`` chooses the path (`oltr.data.tensors.use_tensor_path`): the split decoded
    once into memory (``small``/``none`` transforms), or a DataLoader over the files with the
    evaluation transform — with ``data.decode: device`` its workers read the files' bytes and
    each batch is decoded, resized, centre-cropped and normalised on ``device``
    (`oltr.data.jpeg`, `oltr.data.augment.DeviceImagenetTransform`). ``indices`` restricts the
    pass to those items (a DDP rank's shard).
    """

    def __init__(self, dataset: ImageListDataset, data_cfg: dict[str, Any], *, batch_size: int,
                 num_workers: int = 0, indices: Sequence[int] | np.ndarray | None = None,
                 device: torch.device | None = None) -> None:
        self.batch_size = batch_size
        self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)
        self.mean, self.std = data_cfg["mean"], data_cfg["std"]
        self.tensors: TensorImages | None = None
        self.loader: ImageLoader | None = None
        self.device_decode: DeviceImagenetTransform | None = None
        self.dataset, self.device = dataset, torch.device(device or "cpu")
        if use_tensor_path(data_cfg, len(dataset)):
            tensors = TensorImages.decode(dataset, transform=data_cfg["transform"],
                                          image_size=data_cfg["image_size"],
                                          channels=data_cfg["channels"])
            self.tensors = tensors.to(device) if device is not None else tensors
        elif data_cfg.get("decode", "cpu") == "device":
            self.device_decode = DeviceImagenetTransform(
                data_cfg["image_size"], data_cfg["mean"], data_cfg["std"], train=False)
            self.loader = ImageLoader(Subset(EncodedImages(dataset), self.indices.tolist()),
                                      batch_size=batch_size, shuffle=False,
                                      num_workers=num_workers, collate_fn=pack_encoded)
        else:
            dataset.transform = eval_transform(data_cfg)
            subset = dataset if indices is None else Subset(dataset, self.indices.tolist())
            self.loader = eval_loader(subset, batch_size, num_workers)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.tensors is not None:
            for images, labels in self.tensors.batches(self.indices, self.batch_size):
                yield normalize_uint8(images, self.mean, self.std), labels
        elif self.device_decode is not None:
            assert self.loader is not None
            for batch in self.loader:
                payloads, (labels, indices) = unpack_encoded(batch)
                images = decode_images(payloads, indices, self.dataset, self.device)
                yield self.device_decode(images), torch.as_tensor(labels, dtype=torch.int64)
        else:
            assert self.loader is not None
            yield from self.loader


@runtime_checkable
class Rows(Protocol):
    """Stored inputs of a split (`oltr.features.FeatureStore`): ``len`` rows, served as
    ``(rows, labels)`` batches of the given indices, in order."""

    def __len__(self) -> int: ...

    def batches(self, indices: np.ndarray, batch_size: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def split_batches(dataset: Any, cfg: Mapping[str, Any], device: torch.device, *,
                  runtime: Runtime | None = None) -> EvalBatches:
    """The :class:`EvalBatches` of ``dataset`` for one evaluation pass of a stage config
    ``cfg`` (``data``, ``eval.batch_size``, ``data.num_workers``) on ``device``; with
    ``runtime``, only this rank's contiguous :func:`shard`."""
    data_cfg = cfg["data"]
    indices = None if runtime is None else shard(len(dataset), runtime.rank, runtime.world_size)
    return EvalBatches(dataset, data_cfg, batch_size=cfg["eval"]["batch_size"],
                       num_workers=data_cfg["num_workers"], device=device, indices=indices)


def forward_split(
    net: nn.Module,
    split: Any,
    cfg: Mapping[str, Any],
    *,
    runtime: Runtime | None = None,
    device: torch.device | None = None,
    keys: Sequence[str] = OUTPUT_KEYS,
    description: str | None = None,
    sink: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> dict[str, np.ndarray]:
    """The one forward pass of ``net`` (eval mode, no gradients) over a split.

    ``split``: a dataset of ``(image, label)`` (batched here by :func:`split_batches`: the
    evaluation transform, ``eval.batch_size``; with ``runtime``, this rank's shard), stored
    :class:`Rows` (a feature store's: batched by their own ``batches``, the same shard), or
    batches already built (an :class:`EvalBatches`, any iterable of ``(inputs, labels)``).
    ``cfg``: a stage
    config — ``data``, ``eval.batch_size``, ``eval.amp`` (autocast) and
    ``train.channels_last`` (images in that memory format where ``net`` supports it).
    ``device``: where to run (default ``runtime.device``). Returns, as
    :func:`collect_outputs`, the requested ``keys`` of the network's output (float32, (N, …))
    and the ``labels`` (int64, (N,)) in split order, gathered from every rank under DDP. With
    ``sink``, each batch's arrays are handed to it as they come instead (bounded memory, one
    process) and the result is empty. InputError for an unreadable image (the loader's)."""
    if device is None:
        if runtime is None:
            raise ValueError("forward_split needs a device or a runtime")
        device = runtime.device
    if isinstance(split, Dataset):
        batches: Any = split_batches(split, cfg, device, runtime=runtime)
    elif isinstance(split, Rows):
        indices = np.arange(len(split)) if runtime is None \
            else shard(len(split), runtime.rank, runtime.world_size)
        batches = split.batches(indices, cfg["eval"]["batch_size"])
    else:
        batches = split
    options = {"amp": cfg["eval"]["amp"], "channels_last": cfg["train"]["channels_last"],
               "keys": keys, "description": description}
    if sink is not None:
        for outputs in _batch_outputs(net, batches, device, **options):
            sink({key: value.numpy() for key, value in outputs.items()})
        return {}
    return collect_outputs(net, batches, device, runtime=runtime, **options)


@torch.no_grad()
def _batch_outputs(net: nn.Module, batches: Any, device: torch.device, *, amp: str,
                   channels_last: bool, keys: Sequence[str], description: str | None
                   ) -> Iterator[dict[str, torch.Tensor]]:
    """Each batch's requested fields of ``net``'s output (float32, on the CPU) and labels."""
    net.eval()
    use_channels_last = channels_last and getattr(net, "supports_channels_last", False)
    for images, labels in tqdm(batches, desc=description, leave=False,
                               disable=True if description is None else None):
        images = images.to(device, non_blocking=True)
        if use_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(amp, device):
            out = net(images)
        chunk = {}
        for key in keys:
            value = getattr(out, key, None)
            if value is not None:
                chunk[key] = value.float().cpu()
        chunk["labels"] = torch.as_tensor(labels).cpu()
        yield chunk


@torch.no_grad()
def collect_outputs(
    net: OLTRNetwork,
    batches: Any,
    device: torch.device,
    *,
    amp: str = "off",
    channels_last: bool = True,
    keys: Sequence[str] = OUTPUT_KEYS,
    description: str | None = None,
    runtime: Runtime | None = None,
) -> dict[str, np.ndarray]:
    """Run ``net`` (in eval mode) over ``batches`` of ``(images, labels)``; return the
    requested fields of its :class:`~oltr.models.NetworkOutput` (``keys`` of ``logits``,
    ``features``, ``reachability``, ``meta`` — those it produces) and the ``labels``, as
    float32 / int64 numpy arrays in
    batch order. Under DDP (``runtime``), each rank passes its shard and the arrays are
    gathered from every rank in rank order (so contiguous shards give the split's order)."""
    chunks: dict[str, list[torch.Tensor]] = {}
    for outputs in _batch_outputs(net, batches, device, amp=amp, channels_last=channels_last,
                                  keys=keys, description=description):
        for key, value in outputs.items():
            chunks.setdefault(key, []).append(value)
    merged = {key: torch.cat(parts) for key, parts in chunks.items()}
    if runtime is not None and runtime.distributed:
        merged = {key: runtime.all_gather_cat(value) for key, value in merged.items()}
    return {key: value.numpy() for key, value in merged.items()}


def split_outputs(outputs: dict[str, np.ndarray]) -> SplitOutputs:
    """The decision rule's view of one split's stored outputs."""
    return SplitOutputs(logits=torch.from_numpy(outputs["logits"]),
                        features=torch.from_numpy(outputs["features"]),
                        labels=torch.from_numpy(outputs["labels"]).long())
