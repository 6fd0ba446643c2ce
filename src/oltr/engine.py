"""The one training loop shared by every method (a method is a config, never a copy of this file).

One *stage* = build data and network from a flat config, optionally start from a previous stage's
weights (OLTR stage 2 loads stage 1, paper §3.3), train with SGD, validate every epoch, write a
checkpoint every epoch atomically, keep the best-on-val weights. A *run* is a sequence of stages
(``configs/<benchmark>/<method>.yaml``). A killed run continues with ``resume=True`` from the last
completed epoch; each epoch's randomness is derived from ``(seed, epoch)`` so a resumed run sees
the same data order and augmentations as an uninterrupted one.

Crash safety: every file is written to a temporary name, fsynced and renamed, so ``kill -9`` at
any moment leaves the previous or the new file, never a broken one (a killed writer's temporary
file is never read, and is removed when the stage starts again). The checkpoint holds the model
(BatchNorm statistics and the memory's centroids included), optimiser and scheduler states, the
epoch and the best-so-far record. It holds no generator states because none carry over between
epochs: the torch generator is reseeded with ``epoch_seed(seed, epoch)`` at every epoch start, the
sampler (and the loader's workers) are seeded from the same value, and nothing draws from the
numpy or Python generators. With ``deterministic: true`` a resumed run therefore ends with the
same weights as an uninterrupted one. Checkpoints are read with ``weights_only=True`` and
selected weights are safetensors, so loading never runs code from a file.

Run directory::

    RUN/.oltr, RUN/<stage>/.oltr   oltr's markers: oltr resumes only what it wrote
                            (oltr.ownership); RUN/.oltr-lock is held while the run trains
    RUN/run.json            method, stages, the final stage
    RUN/config.yaml         the resolved config (all stages)
    RUN/<stage>/config.yaml the flat config of the stage
    RUN/<stage>/checkpoint.pt   last epoch: model, optimiser, scheduler, history (weights_only-safe)
    RUN/<stage>/model.safetensors + model.json   the best-on-val weights and what rebuilds them
                                (model.json also counts the images skipped by data.skip_bad_images)
    RUN/<stage>/history.jsonl   one line per epoch
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

from oltr.config import (
    CHECKS,
    config_differences,
    load_saved_config,
    save_config,
    stage_config,
    with_defaults,
)
from oltr.data import Benchmark, ImageListDataset, build_transform, load_benchmark
from oltr.data.loader import ImageLoader
from oltr.data.samplers import ClassAwareSampler
from oltr.data.splits import leaves_root
from oltr.errors import InputError, OltrError
from oltr.io import (
    atomic_write,
    atomic_write_text,
    read_json_object,
    read_text,
)
from oltr.losses import (
    build_centroid_loss,
    build_classification_loss,
    build_feature_loss,
    drw_class_weights,
)
from oltr.models import (
    FSLwFClassifier,
    OLTRNetwork,
    class_means,
    create_network,
    freeze_backbone,
    load_stage1_into_stage2,
)
from oltr.ownership import claim_directory, locked, remove_stale_temporaries, undo_claim

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"
MODEL_INFO = "model.json"
HISTORY = "history.jsonl"
RUN_INFO = "run.json"
CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = ("config", "model", "optimizer", "scheduler", "epoch", "best_epoch", "best_acc")
MODEL_INFO_KEYS = {"model": dict, "num_classes": int, "in_chans": int, "data": dict,
                   "class_names": list, "stage": str}
MODEL_DATA_KEYS = ("image_size", "channels", "mean", "std", "transform")


# --------------------------------------------------------------------------- utilities
def select_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` and
    ``mps`` must exist on this machine (InputError naming the device otherwise)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError("unknown device (auto, cpu, mps, cuda or cuda:N)", value=name) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device 'cuda' requested but CUDA is not available", value=name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"no such CUDA device: this machine has "
                             f"{torch.cuda.device_count()}", value=name)
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError("device 'mps' requested but MPS (Apple GPU) is not available",
                             value=name)
    elif device.type != "cpu":
        raise InputError("unsupported device (auto, cpu, mps, cuda or cuda:N)", value=name)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's randomness (data order, augmentation, dropout)."""
    return seed * 100_003 + epoch


def autocast_context(amp: str, device: torch.device):
    """bf16 autocast for ``bf16``, and for ``auto`` where bf16 is native on ``device``
    (:func:`oltr.train.runtime.uses_bf16`); nothing for ``off``."""
    from oltr.train.runtime import autocast

    return autocast(amp, device)


# --------------------------------------------------------------------------- data
def eval_transform(data_cfg: dict[str, Any]) -> Any:
    """The evaluation transform of ``data_cfg`` (no augmentation)."""
    return build_transform(data_cfg["transform"], train=False, image_size=data_cfg["image_size"],
                           channels=data_cfg["channels"], mean=data_cfg["mean"],
                           std=data_cfg["std"])


def dataset_for(
    bench: Benchmark, split: str, data_cfg: dict[str, Any], *, train: bool
) -> ImageListDataset:
    """The dataset of ``split`` with the train (augmenting) or eval transform of ``data_cfg``."""
    transform = build_transform(
        data_cfg["transform"],
        train=train,
        image_size=data_cfg["image_size"],
        channels=data_cfg["channels"],
        mean=data_cfg["mean"],
        std=data_cfg["std"],
    )
    return ImageListDataset(
        bench.split(split),
        bench.image_root,
        transform=transform,
        source_file=bench.split_file(split),
        mode="L" if data_cfg["channels"] == 1 else "RGB",
        cache=data_cfg["cache_images"],
    )


def eval_loader(dataset: ImageListDataset, batch_size: int, num_workers: int) -> DataLoader:
    """The loader of an evaluation pass (in order); a bad image is the original one-line
    InputError in this process, whatever ``num_workers`` (`oltr.data.loader.ImageLoader`)."""
    return ImageLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def train_loader(
    dataset: ImageListDataset, cfg: dict[str, Any], epoch: int
) -> DataLoader:
    """The loader of one epoch: instance-balanced or class-aware sampling, seeded by (seed, epoch);
    bad images arrive as one-line InputErrors (`oltr.data.loader.ImageLoader`)."""
    train_cfg = cfg["train"]
    num_samples = train_cfg["epoch_samples"] or len(dataset)
    seed = epoch_seed(cfg["seed"], epoch)
    generator = torch.Generator().manual_seed(seed)
    if train_cfg["sampler"] == "instance":
        sampler = RandomSampler(dataset, num_samples=num_samples, generator=generator)
    elif train_cfg["sampler"] == "class_aware":
        sampler = ClassAwareSampler(
            dataset.labels,
            samples_per_class=train_cfg["samples_per_class"],
            num_samples=num_samples,
            seed=cfg["seed"],
            balance_power=train_cfg["balance_power"],
        )
        sampler.set_epoch(epoch)
    else:
        raise InputError("train.sampler must be instance or class_aware", value=train_cfg["sampler"])
    return ImageLoader(
        dataset,
        batch_size=train_cfg["batch_size"],
        sampler=sampler,
        num_workers=cfg["data"]["num_workers"],
        generator=generator,
        drop_last=len(dataset) > train_cfg["batch_size"],
        persistent_workers=False,
    )


@torch.no_grad()
def collect_outputs(
    net: OLTRNetwork,
    loader: DataLoader,
    device: torch.device,
    *,
    amp: str = "off",
    channels_last: bool = True,
    description: str | None = None,
) -> dict[str, np.ndarray]:
    """Run ``net`` over ``loader``: logits, direct features, reachability (if any) and labels."""
    net.eval()
    chunks: dict[str, list[torch.Tensor]] = {}
    for images, labels in tqdm(loader, desc=description, leave=False,
                               disable=True if description is None else None):
        images = images.to(device, non_blocking=True)
        if channels_last and net.supports_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(amp, device):
            out = net(images)
        out = {k: v for k, v in out.items() if v is not None}
        for key in ("logits", "features", "reachability"):
            if key in out:
                chunks.setdefault(key, []).append(out[key].float().cpu())
        chunks.setdefault("labels", []).append(labels)
    return {key: torch.cat(parts).numpy() for key, parts in chunks.items()}


# --------------------------------------------------------------------------- optimisation
def parameter_groups(net: nn.Module, train_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """SGD groups: backbone (``lr_backbone``), centroids (``lr_centroids``, no weight decay), head."""
    lr = train_cfg["lr"]
    groups: dict[str, dict[str, Any]] = {
        "backbone": {"params": [], "lr": train_cfg["lr_backbone"] or lr},
        "centroids": {"params": [], "lr": train_cfg["lr_centroids"] or lr, "weight_decay": 0.0},
        "head": {"params": [], "lr": lr},
    }
    for name, param in net.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("backbone."):
            groups["backbone"]["params"].append(param)
        elif name.endswith("centroids"):
            groups["centroids"]["params"].append(param)
        else:
            groups["head"]["params"].append(param)
    return [{"name": key, **group} for key, group in groups.items() if group["params"]]


def lr_factor(step: int, *, schedule: str, total_steps: int, steps_per_epoch: int,
              step_size: int, gamma: float, warmup_steps: int) -> float:
    """Multiplier of the base learning rate after ``step`` optimiser steps."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** (step // (step_size * steps_per_epoch))
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise InputError("train.schedule must be cosine, step or constant", value=schedule)


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training checkpoint without executing code from it (``weights_only=True``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"refusing or unable to read checkpoint: {exc}", path=path) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError("not an oltr training checkpoint (wrong format tag)", path=path)
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise InputError(f"checkpoint lacks keys {missing} (tampered or truncated)", path=path)
    return state


def save_model(stage_dir: Path, net: nn.Module, info: dict[str, Any]) -> None:
    """The selected weights as safetensors (no pickle) + the JSON that rebuilds the network."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write(stage_dir / WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_text(stage_dir / MODEL_INFO, json.dumps(info, indent=2, sort_keys=True) + "\n")


def _read_model_info(path: Path) -> dict[str, Any]:
    """``model.json``, checked: valid JSON with every key `load_model` and `Predictor` use."""
    info = read_json_object(path, "model description")
    for key, kind in MODEL_INFO_KEYS.items():
        if key not in info:
            raise InputError(f"lacks key '{key}' (tampered, or not written by oltr)", path=path)
        if not isinstance(info[key], kind) or isinstance(info[key], bool):
            raise InputError(f"key '{key}' must be a {kind.__name__}", path=path, value=info[key])
    missing = [key for key in MODEL_DATA_KEYS if key not in info["data"]]
    if missing:
        raise InputError(f"key 'data' lacks {missing}", path=path)
    data = info["data"]
    for key in MODEL_DATA_KEYS:  # the config's checks of the same settings
        description, test = CHECKS[f"data.{key}"]
        if not test(data[key]):
            raise InputError(f"key 'data.{key}' must be {description}", path=path,
                             value=data[key])
    for key in ("mean", "std"):
        if len(data[key]) != data["channels"]:
            raise InputError(f"key 'data.{key}' needs one value per channel (data.channels = "
                             f"{data['channels']})", path=path, value=data[key])
    if len(info["class_names"]) != info["num_classes"]:
        raise InputError(f"{len(info['class_names'])} class names for num_classes "
                         f"{info['num_classes']}", path=path)
    return info


def load_model(stage_dir: Path, device: torch.device | str = "cpu") -> tuple[OLTRNetwork, dict]:
    """Rebuild the network of a trained stage from ``model.json`` + ``model.safetensors``.
    The returned info is ``model.json`` plus ``weights_sha256``, the sha256 of the weights file
    as read (what derived results, e.g. a report's threshold, record)."""
    info_path, weights_path = stage_dir / MODEL_INFO, stage_dir / WEIGHTS
    for path in (info_path, weights_path):
        if not path.exists():
            raise InputError("trained model not found (has the stage finished an epoch?)", path=path)
    info = _read_model_info(info_path)
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
    # what evaluation reports record and `predict` compares: these very bytes were loaded
    info["weights_sha256"] = hashlib.sha256(data).hexdigest()
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


# --------------------------------------------------------------------------- one stage
@dataclass
class StageResult:
    stage_dir: Path
    best_epoch: int
    best_val_accuracy: float
    epochs_run: int
    seconds: float
    skipped_images: dict[str, int] = field(default_factory=dict)


def _read_history(stage_dir: Path) -> list[dict[str, Any]]:
    """The epochs recorded in ``history.jsonl`` (InputError naming a damaged line)."""
    path = stage_dir / HISTORY
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(read_text(path, "training history").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"training history line is not valid JSON ({exc.msg}): the "
                             "history is damaged; restore it, or train into a new --out",
                             path=path, line=number) from None
        if not isinstance(record, dict):
            raise InputError("training history line must be a JSON object", path=path,
                             line=number)
        records.append(record)
    return records


def check_stage_losses(train_cfg: dict[str, Any]) -> None:
    """The loss settings that exclude each other (InputError naming them)."""
    name = train_cfg["loss"]
    if train_cfg["label_smoothing"] and name != "ce":
        raise InputError("train.label_smoothing applies to train.loss: ce only", value=name)
    if train_cfg["drw_epoch"] is not None and name not in ("ce", "ldam"):
        raise InputError("deferred re-weighting (train.drw_epoch) needs train.loss ce or ldam",
                         value=name)


def build_stage_losses(
    train_cfg: dict[str, Any], train_counts: Any, device: torch.device
) -> tuple[nn.Module, nn.Module | None]:
    """The classification loss (``train.loss``) and the feature loss (``train.feature_loss``,
    None for none) of a stage; deferred re-weighting sets the former's ``weight`` later."""
    name = train_cfg["loss"]
    options: dict[str, Any] = {
        "ce": {"label_smoothing": train_cfg["label_smoothing"]},
        "focal": {"gamma": train_cfg["focal_gamma"]},
        "balanced_softmax": {},
        "logit_adjusted": {"tau": train_cfg["logit_adjust_tau"]},
        "ldam": {"max_margin": train_cfg["ldam_max_margin"], "scale": train_cfg["ldam_scale"]},
    }[name]
    check_stage_losses(train_cfg)
    classification = build_classification_loss(name, class_counts=np.asarray(train_counts),
                                                **options).to(device)
    feature = None
    if train_cfg["feature_loss"] != "none":
        feature = build_feature_loss(train_cfg["feature_loss"],
                                     margin=train_cfg["feature_loss_margin"]).to(device)
    return classification, feature


def deferred_reweighting(
    train_cfg: dict[str, Any], train_counts: Any, epoch: int
) -> torch.Tensor | None:
    """DRW (Cao et al. 2019, Alg. 1): the class weights of 0-based ``epoch`` — the
    effective-number weights (:func:`~oltr.losses.drw_class_weights`) from the 1-based epoch
    ``train.drw_epoch`` on, None before it (or without DRW)."""
    start = train_cfg["drw_epoch"]
    if start is None or epoch + 1 < start:
        return None
    return drw_class_weights(np.asarray(train_counts), train_cfg["drw_beta"])


def _init_from_previous(
    net: OLTRNetwork, init_from: Path, loader: DataLoader, device: torch.device, cfg: dict
) -> list[str]:
    """Load a previous stage's weights; then initialise the memory's centroids as class means of
    direct features over the train set, computed with *this* stage's feature model (DESIGN §2),
    and an FSLwF head's novel-class prototypes from the same pass."""
    weights = init_weights_path(init_from)
    if not weights.is_file():
        raise InputError("train.init_from: no weights found", path=weights)
    try:
        previous = load_file(str(weights))
    except Exception as exc:
        raise InputError(f"train.init_from: cannot read weights: {exc}", path=weights) from exc
    try:
        copied = load_stage1_into_stage2(net, previous)
    except InputError as exc:
        raise InputError(f"train.init_from: {exc}", path=weights) from None
    fslwf = net.classifier if isinstance(net.classifier, FSLwFClassifier) else None
    if net.meta_embedding is not None or fslwf is not None:
        outputs = collect_outputs(
            net, loader, device, amp=cfg["eval"]["amp"],
            channels_last=cfg["train"]["channels_last"], description="class means",
        )
    if fslwf is not None:  # FSLwF's w_avg of each novel class (Gidaris & Komodakis §3.2)
        fslwf.update_prototypes(torch.from_numpy(outputs["features"]).to(device),
                                torch.from_numpy(outputs["labels"]).to(device))
    if net.meta_embedding is not None:
        means = class_means(
            torch.from_numpy(outputs["features"]),
            torch.from_numpy(outputs["labels"]).long(),
            net.num_classes,
        )
        net.meta_embedding.init_centroids(means.to(device))
        if cfg["model"]["reachability_scale"] == "auto":
            calibrate_reachability_scale(net, torch.from_numpy(outputs["features"]).to(device))
    return copied


@torch.no_grad()
def calibrate_reachability_scale(net: OLTRNetwork, features: torch.Tensor) -> float:
    """Set s in v_meta = (s/γ)·(v_direct + e ⊙ v_memory) (Eq. 2) so that the median ‖v_meta‖
    over the train set is 1, the middle of the squashing function (Eq. 6: ‖v‖²/(1+‖v‖²) = ½).

    With a fixed s (the original's 10) ‖v_meta‖ can sit far into the flat part of the squash,
    where 1/γ no longer changes the logits and reachability cannot lower an open input's
    confidence; this keeps the scaling where it acts.
    """
    memory = net.meta_embedding
    memory.reachability_scale.fill_(1.0)
    norms = torch.cat([memory(chunk)["meta"].norm(dim=1) for chunk in features.split(1024)])
    scale = 1.0 / float(norms.median().clamp_min(1e-12))
    memory.reachability_scale.fill_(scale)
    return scale


def init_weights_path(init_from: Path) -> Path:
    """The weights file a stage starts from: ``init_from`` itself, or a stage folder's
    ``model.safetensors``."""
    return init_from / WEIGHTS if init_from.is_dir() else init_from


def steps_per_epoch(train_cfg: dict[str, Any], train_size: int) -> int:
    """Optimiser steps of one epoch over ``train_size`` images: ``train.epoch_samples`` (or
    the split) // ``train.batch_size`` (at least 1), at most ``train.max_steps_per_epoch``.

    The loader drops an incomplete last batch when the split is larger than a batch, so
    ``epoch_samples`` below ``batch_size`` would train nothing: InputError naming both."""
    samples = train_cfg["epoch_samples"] or train_size
    batch = train_cfg["batch_size"]
    if train_size > batch and samples < batch:
        raise InputError(f"train.epoch_samples ({samples}) is below train.batch_size ({batch}): "
                         "every epoch would drop its only, incomplete batch and train nothing; "
                         "raise train.epoch_samples or lower train.batch_size", value=samples)
    steps = max(1, samples // batch)
    if train_cfg["max_steps_per_epoch"]:
        steps = min(steps, train_cfg["max_steps_per_epoch"])
    return steps


def check_stage(cfg: dict[str, Any], bench: Benchmark) -> None:
    """Fail before any training on what a stage's settings and data do not allow together:
    its device, transforms, network (built on the meta device where it can be: no memory, no
    weights read),
    losses (``train.centroid_loss`` needs ``model.meta_embedding``), steps per epoch and
    pretrained weights file. InputError naming the key and value."""
    train_cfg, data_cfg = cfg["train"], cfg["data"]
    select_device(cfg["device"])
    for train in (True, False):
        build_transform(data_cfg["transform"], train=train, image_size=data_cfg["image_size"],
                        channels=data_cfg["channels"], mean=data_cfg["mean"],
                        std=data_cfg["std"])
    pretrained = cfg["model"]["pretrained_path"]
    if pretrained is not None and not Path(pretrained).expanduser().is_file():
        raise InputError("pretrained weights file not found (model.pretrained_path)",
                         path=pretrained)
    model_cfg = cfg["model"] | {"pretrained_path": None}
    counts = bench.train_counts.tolist()
    try:
        with torch.device("meta"):
            net = create_network(model_cfg, bench.num_classes, data_cfg["channels"],
                                 class_counts=counts)
    except (NotImplementedError, RuntimeError):  # a module that needs real values to build
        net = create_network(model_cfg, bench.num_classes, data_cfg["channels"],
                             class_counts=counts)
    if train_cfg["centroid_loss"] != "none" and net.meta_embedding is None:
        raise InputError(
            f"train.centroid_loss needs model.meta_embedding: true in stage '{cfg['stage']}' "
            "(the centroids live there)", value=train_cfg["centroid_loss"])
    check_stage_losses(train_cfg)
    steps_per_epoch(train_cfg, len(bench.split("train")))


def train_stage(
    cfg: dict[str, Any],
    data_dir: str | Path,
    stage_dir: str | Path,
    *,
    init_from: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> StageResult:
    """Train one stage (flat config, see ``oltr.config.stage_config``) into ``stage_dir``."""
    started = time.perf_counter()
    stage_dir = Path(stage_dir)
    train_cfg, data_cfg = cfg["train"], cfg["data"]
    device = select_device(cfg["device"])
    bench = load_benchmark(data_dir, image_root=data_cfg["image_root"],
                           allow_outside_root=data_cfg["allow_outside_root"])
    check_stage(cfg, bench)
    claim_directory(stage_dir, "stage", what="stage directory", reuse=True,
                    protect=(data_dir,))
    remove_stale_temporaries(stage_dir)
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg["seed"])

    skipped: dict[str, int] = {}
    if data_cfg["skip_bad_images"]:
        dropped = bench.drop_unreadable_images(("train", "val"),
                                               num_workers=data_cfg["num_workers"])
        skipped = {split: len(messages) for split, messages in dropped.items()}
        report_skipped_images(f"[{cfg['stage']}]", dropped)
    train_set = dataset_for(bench, "train", data_cfg, train=True)
    train_eval_set = dataset_for(bench, "train", data_cfg, train=False)
    val_set = dataset_for(bench, "val", data_cfg, train=False)
    workers = data_cfg["num_workers"]

    net = create_network(cfg["model"], bench.num_classes, data_cfg["channels"],
                         class_counts=bench.train_counts.tolist()).to(device)
    if train_cfg["channels_last"] and net.supports_channels_last:
        net = net.to(memory_format=torch.channels_last)
    checkpoint_path = stage_dir / CHECKPOINT
    state = load_checkpoint(checkpoint_path) if resume and checkpoint_path.exists() else None
    if state is None and init_from is not None:
        _init_from_previous(
            net, init_from, eval_loader(train_eval_set, cfg["eval"]["batch_size"], workers),
            device, cfg,
        )
    if train_cfg["freeze_backbone"]:
        freeze_backbone(net, freeze_bn=True)

    optimizer = torch.optim.SGD(
        parameter_groups(net, train_cfg),
        lr=train_cfg["lr"],
        momentum=train_cfg["momentum"],
        weight_decay=train_cfg["weight_decay"],
        nesterov=train_cfg["nesterov"],
    )
    steps = steps_per_epoch(train_cfg, len(train_set))  # the split left after skipping
    epochs = train_cfg["epochs"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step,
            schedule=train_cfg["schedule"],
            total_steps=epochs * steps,
            steps_per_epoch=steps,
            step_size=train_cfg["step_size"],
            gamma=train_cfg["gamma"],
            warmup_steps=train_cfg["warmup_epochs"] * steps,
        ),
    )
    classification_loss, feature_loss = build_stage_losses(train_cfg, bench.train_counts, device)
    centroid_loss = None
    if train_cfg["centroid_loss"] != "none":
        if net.meta_embedding is None:
            raise InputError(
                "train.centroid_loss needs model.meta_embedding: true (the centroids live there)",
                value=train_cfg["centroid_loss"],
            )
        centroid_loss = build_centroid_loss(train_cfg["centroid_loss"],
                                            margin=train_cfg["centroid_margin"],
                                            relative=train_cfg["centroid_relative_margin"])

    start_epoch, best_epoch, best_acc = 0, -1, -1.0
    if state is not None:
        if with_defaults(state["config"]) != cfg:
            raise InputError(
                "the checkpoint was written with a different config ("
                f"{config_differences(with_defaults(state['config']), cfg)}); resume with the "
                "same command, or start a new --out",
                path=checkpoint_path,
            )
        if state.get("class_names", bench.class_names) != bench.class_names:
            raise InputError(
                f"the checkpoint was written for {len(state['class_names'])} classes "
                f"{state['class_names'][:5]} but the data has {bench.num_classes} "
                f"{bench.class_names[:5]}; resume with the same --data",
                path=checkpoint_path,
            )
        try:
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise InputError(
                "the checkpoint does not fit this model and data (tampered, or other data?): "
                f"{str(exc).strip().splitlines()[-1].strip()}",
                path=checkpoint_path,
            ) from None
        start_epoch, best_epoch, best_acc = state["epoch"], state["best_epoch"], state["best_acc"]
        print(f"[{cfg['stage']}] resuming after epoch {start_epoch} of {epochs}", flush=True)
    save_config(cfg, stage_dir / "config.yaml")
    model_info = {
        "model": cfg["model"],
        "num_classes": bench.num_classes,
        "in_chans": data_cfg["channels"],
        "data": {k: data_cfg[k] for k in ("image_size", "channels", "mean", "std", "transform")},
        "class_names": bench.class_names,
        "train_counts": bench.train_counts.tolist(),
        "stage": cfg["stage"],
        "seed": cfg["seed"],
        "skipped_images": skipped,
    }
    if start_epoch == 0 and epochs == 0:
        save_model(stage_dir, net, model_info | {"epoch": 0, "val_accuracy": None})

    val_loader = eval_loader(val_set, cfg["eval"]["batch_size"], workers)
    history = _read_history(stage_dir)[:start_epoch]
    if start_epoch < epochs:
        print(f"[{cfg['stage']}] training epochs {start_epoch + 1}..{epochs} "
              f"({steps} steps each) into {stage_dir}", flush=True)
    for epoch in range(start_epoch, epochs):
        torch.manual_seed(epoch_seed(cfg["seed"], epoch))
        epoch_start = time.perf_counter()
        weights = deferred_reweighting(train_cfg, bench.train_counts, epoch)
        if weights is not None:
            classification_loss.weight = weights.to(device)
        losses = {"classification": classification_loss, "feature": feature_loss,
                  "centroid": centroid_loss}
        loss_sum, correct, seen, skipped_steps = _train_one_epoch(
            net, train_loader(train_set, cfg, epoch), optimizer, scheduler, losses,
            cfg, device, steps,
            description=f"[{cfg['stage']}] epoch {epoch + 1}/{epochs}" if progress else None,
        )
        train_seconds = time.perf_counter() - epoch_start
        val = collect_outputs(net, val_loader, device, amp=cfg["eval"]["amp"],
                              channels_last=train_cfg["channels_last"])
        val_acc = float((val["logits"].argmax(1) == val["labels"]).mean())
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1, seen),
            "train_accuracy": correct / max(1, seen),
            "val_accuracy": val_acc,
            "lr": optimizer.param_groups[-1]["lr"],
            "images_per_second": seen / train_seconds,
            "seconds": time.perf_counter() - epoch_start,
            "skipped_steps": skipped_steps,
        }
        history.append(record)
        improved = val_acc > best_acc
        if improved:
            best_epoch, best_acc = epoch + 1, val_acc
            save_model(stage_dir, net, model_info | {"epoch": epoch + 1, "val_accuracy": val_acc})
        atomic_write_text(stage_dir / HISTORY, "".join(json.dumps(r) + "\n" for r in history))
        save_checkpoint(
            checkpoint_path,
            {
                "format": CHECKPOINT_FORMAT,
                "config": cfg,
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "best_epoch": best_epoch,
                "best_acc": best_acc,
                "class_names": bench.class_names,
            },
        )
        print(
            f"[{cfg['stage']}] epoch {epoch + 1}/{epochs}  loss {record['train_loss']:.4f}  "
            f"train acc {record['train_accuracy']:.3f}  val acc {val_acc:.3f}"
            f"{' *' if improved else ''}  {record['images_per_second']:.0f} img/s"
            f"{f'  ({skipped_steps} non-finite steps skipped)' if skipped_steps else ''}",
            flush=True,
        )
    return StageResult(stage_dir, best_epoch, best_acc, epochs - start_epoch,
                       time.perf_counter() - started, skipped)


def report_skipped_images(prefix: str, dropped: dict[str, list[str]]) -> None:
    """Print how many unreadable images were skipped per split, and the first few of them."""
    messages = [message for split_messages in dropped.values() for message in split_messages]
    if not messages:
        return
    counts = ", ".join(f"{split} {len(m)}" for split, m in dropped.items())
    print(f"{prefix} skipping {len(messages)} unreadable images ({counts}):", flush=True)
    for message in messages[:5]:
        print(f"{prefix}   {message}", flush=True)


def _batches(loader: DataLoader, limit: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for index, batch in enumerate(loader):
        if index >= limit:
            return
        yield batch


def _train_one_epoch(
    net: OLTRNetwork,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    losses: dict[str, nn.Module | None],
    cfg: dict[str, Any],
    device: torch.device,
    steps: int,
    description: str | None,
) -> tuple[float, int, int, int]:
    """One epoch of SGD; returns the loss sum, correct and seen counts, and skipped steps.
    ``losses``: the classification loss on the logits, and optionally a feature loss on v_direct
    and the centroid loss (Eq. 7: L_CE + λ L_LM)."""
    train_cfg = cfg["train"]
    centroid_loss, feature_loss = losses["centroid"], losses["feature"]
    net.train()
    loss_sum, correct, seen, skipped = 0.0, 0, 0, 0
    bar = tqdm(_batches(loader, steps), total=steps, desc=description, leave=False,
               disable=True if description is None else None)
    for step, (images, labels) in enumerate(bar, start=1):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if train_cfg["channels_last"] and net.supports_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(train_cfg["amp"], device):
            out = net(images)
            loss = losses["classification"](out["logits"].float(), labels)
            if feature_loss is not None:
                loss = loss + train_cfg["feature_loss_weight"] * feature_loss(
                    out["features"].float(), labels)
            if centroid_loss is not None:
                feature = out["features"] if train_cfg["centroid_feature"] == "direct" else out["meta"]
                loss = loss + train_cfg["centroid_weight"] * centroid_loss(
                    feature.float(), labels, net.meta_embedding.centroids
                )
        if not torch.isfinite(loss):
            if train_cfg["nonfinite"] == "stop":
                raise OltrError(
                    f"non-finite training loss ({loss.item()}) in stage '{cfg['stage']}'; the "
                    "last good checkpoint is kept. Lower train.lr, set train.grad_clip, or set "
                    "train.nonfinite=skip to skip such steps."
                )
            skipped += 1  # train.nonfinite: skip — no optimiser (nor scheduler) step
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train_cfg["grad_clip"]:
            nn.utils.clip_grad_norm_(net.parameters(), train_cfg["grad_clip"])
        optimizer.step()
        scheduler.step()
        batch = labels.numel()
        loss_sum += loss.item() * batch
        correct += int((out["logits"].argmax(1) == labels).sum())
        seen += batch
        if step % max(1, train_cfg["log_every"]) == 0:
            bar.set_postfix(loss=f"{loss_sum / max(1, seen):.3f}",
                            acc=f"{correct / max(1, seen):.3f}")
    if seen == 0 and skipped:
        raise OltrError(f"every step of an epoch had a non-finite loss in stage "
                        f"'{cfg['stage']}'; lower train.lr")
    return loss_sum, correct, seen, skipped


# --------------------------------------------------------------------------- a run of stages
def final_stage_dir(run_dir: str | Path) -> Path:
    """The directory of a run's last stage (what ``evaluate`` and ``predict`` load)."""
    run_dir = Path(run_dir)
    info_path = run_dir / RUN_INFO
    if info_path.exists():
        final = read_json_object(info_path, "run description").get("final_stage")
        if not isinstance(final, str) or leaves_root(final) or "/" in final:
            raise InputError("final_stage must name a stage folder of the run", path=info_path,
                             value=final)
        return run_dir / final
    if (run_dir / MODEL_INFO).exists():
        return run_dir
    raise InputError(f"not an oltr run directory (no {RUN_INFO} or {MODEL_INFO})", path=run_dir)


def _init_source(cfg: dict[str, Any], previous: Path | None) -> Path | None:
    """What a stage starts from (``train.init_from``): the previous stage's folder, a path,
    or nothing."""
    init = cfg["train"]["init_from"]
    if init == "previous":
        return previous
    if init in (None, "none"):
        return None
    return Path(init).expanduser()


def check_run(
    config: dict[str, Any],
    data_dir: str | Path,
    run_dir: Path,
    stages: Sequence[str] | None = None,
) -> None:
    """Everything about a run that can be checked before it creates anything: the stages
    named, the benchmark (loaded once per image root), and every stage to train
    (:func:`check_stage`, e.g. stage 2's losses before stage 1 trains) with the weights it
    starts from when they must exist already. InputError naming the problem."""
    stage_names = [stage["name"] for stage in config["stages"]]
    unknown = sorted(set(stages or ()) - set(stage_names))
    if unknown:
        raise InputError(f"no stage named {', '.join(unknown)} in this method "
                         f"(stages: {', '.join(stage_names)})")
    benches: dict[tuple[Any, bool], Benchmark] = {}
    previous: Path | None = None
    trained_here = False  # the previous stage is trained by this invocation
    for name in stage_names:
        cfg = stage_config(config, name)
        if stages is not None and name not in stages:
            previous, trained_here = run_dir / name, False
            continue
        data_cfg = cfg["data"]
        key = (data_cfg["image_root"], data_cfg["allow_outside_root"])
        if key not in benches:
            benches[key] = load_benchmark(data_dir, image_root=data_cfg["image_root"],
                                          allow_outside_root=data_cfg["allow_outside_root"])
        check_stage(cfg, benches[key])
        source = _init_source(cfg, previous)
        if source is not None and not (source == previous and trained_here):
            weights = init_weights_path(source)
            if not weights.is_file():
                raise InputError(f"train.init_from of stage '{name}': no weights found (train "
                                 "that stage first, or set train.init_from)", path=weights)
        previous, trained_here = run_dir / name, True


def _finished_an_epoch(run_dir: Path, stage_names: Sequence[str]) -> bool:
    """Whether any stage of the run holds a checkpoint or selected weights."""
    return any((run_dir / name / CHECKPOINT).exists() or (run_dir / name / WEIGHTS).exists()
               for name in stage_names)


def train_run(
    config: dict[str, Any],
    data_dir: str | Path,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stages: Sequence[str] | None = None,
) -> list[StageResult]:
    """Train the stages of ``config`` in order (``stages``: only these, e.g. ``["stage2"]`` of a
    run whose stage 1 is done); stage *k* starts from stage *k-1*'s selected weights.

    Everything checkable is checked first (:func:`check_run`), so bad input creates nothing.
    ``run_dir`` is then created (with oltr's marker, :mod:`oltr.ownership`) or must be empty;
    ``resume`` or ``stages`` continue only a run oltr wrote, with the same config. The run is
    locked while it trains (a second writer stops, naming this PID). When a fresh run fails
    before its first finished epoch, what it created is removed again.
    """
    run_dir = Path(run_dir).expanduser()
    stage_names = [stage["name"] for stage in config["stages"]]
    check_run(config, data_dir, run_dir, stages)
    claim = claim_directory(
        run_dir, "run", what="run directory", reuse=resume or stages is not None,
        not_empty_hint="pass --resume to continue it or choose another --out",
        protect=(data_dir,),
    )
    with locked(run_dir, "run directory"):
        try:
            return _train_stages(config, data_dir, run_dir, resume=resume, progress=progress,
                                 stages=stages, check_saved=not claim.fresh)
        except BaseException:
            if claim.fresh and not _finished_an_epoch(run_dir, stage_names):
                undo_claim(claim)
            raise


def _train_stages(
    config: dict[str, Any],
    data_dir: str | Path,
    run_dir: Path,
    *,
    resume: bool,
    progress: bool,
    stages: Sequence[str] | None,
    check_saved: bool,
) -> list[StageResult]:
    """The body of :func:`train_run`, in a claimed and locked run directory."""
    remove_stale_temporaries(run_dir)
    stage_names = [stage["name"] for stage in config["stages"]]
    saved = run_dir / "config.yaml"
    if check_saved and saved.exists():
        before = load_saved_config(saved)
        if before != config:
            raise InputError(f"--resume with a config that differs from the saved one: "
                             f"{config_differences(before, config)}; resume with the same "
                             "command, or choose another --out", path=saved)
    save_config(config, saved)
    atomic_write_text(
        run_dir / RUN_INFO,
        json.dumps({"method": config["method"], "stages": stage_names,
                    "final_stage": stage_names[-1], "data": str(data_dir)}, indent=2) + "\n",
    )
    results, previous = [], None
    for name in stage_names:
        if stages is not None and name not in stages:
            previous = run_dir / name
            continue
        cfg = stage_config(config, name)
        results.append(
            train_stage(cfg, data_dir, run_dir / name, init_from=_init_source(cfg, previous),
                        resume=resume, progress=progress)
        )
        previous = run_dir / name
    return results
