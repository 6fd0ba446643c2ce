"""The one training loop shared by every method (a method is a config, never a copy of this file).

One *stage* = build data and network from a flat config, optionally start from a previous
stage's weights (OLTR stage 2 loads stage 1, paper §3.3), train with SGD, validate every epoch,
write a checkpoint every epoch atomically, keep the best-on-val weights. A *run* is a sequence of
stages (``configs/<benchmark>/<method>.yaml``); at its end the decision rule of the final stage
is fitted on val and saved beside its weights (`oltr.artifact`). A killed run continues with
``resume=True`` from the last completed epoch: every random draw derives from
``(seed, epoch[, position])``, so with ``deterministic: true`` a resumed run ends with the same
weights as an uninterrupted one.

Distributed: under ``torchrun`` every process runs this loop on its share of each batch
(`oltr.train.loaders`), the network and its objective are wrapped in DDP (optionally with
SyncBatchNorm), validation and centroid initialisation gather every rank's outputs, and only
rank 0 writes files (torchvision's ``references/classification`` is the shape followed: builders
above, one screen of loop below).

A stage with a frozen backbone and ``train.feature_cache: on`` computes the backbone's outputs
once (`oltr.features`) and trains, validates and initialises its memory from them; with
``train.compile`` the training task runs through ``torch.compile`` (docs/speed.md).
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from oltr import metrics
from oltr.config import (
    absolute_paths,
    check_config,
    config_differences,
    load_saved_config,
    save_config,
    stage_config,
    with_defaults,
)
from oltr.data import Benchmark, build_transform, load_benchmark
from oltr.errors import InputError, OltrError
from oltr.features import (
    FeatureStore,
    FeatureTrainLoader,
    build_stage_stores,
    store_outputs,
)
from oltr.inference import EvalBatches, collect_outputs, dataset_for, shard
from oltr.models import (
    FSLwFClassifier,
    OLTRNetwork,
    class_means,
    create_network,
    freeze_backbone,
    load_stage1_into_stage2,
)
from oltr.ownership import claim_directory, locked, remove_stale_temporaries, undo_claim
from oltr.run import (
    CHECKPOINT,
    CONFIG,
    WEIGHTS,
    read_history,
    write_history,
    write_run_info,
)
from oltr.train.checkpoint import load_checkpoint, save_checkpoint, save_model, unwrap_model
from oltr.train.loaders import build_train_loader, make_sampler, rank_batch_size
from oltr.train.objective import Objective, TrainTask, check_stage_losses
from oltr.train.runtime import (
    Runtime,
    autocast,
    epoch_seed,
    init_runtime,
    seed_everything,
    select_device,
)


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


# --------------------------------------------------------------------------- checks before anything
def check_stage(cfg: dict[str, Any], bench: Benchmark) -> None:
    """Fail before any training on what a stage's settings and data do not allow together:
    its device, transforms, network (built on the meta device where it can be: no memory, no
    weights read), losses (e.g. ``train.centroid_loss`` needs ``model.meta_embedding``), steps
    per epoch and pretrained weights file. InputError naming the key and value."""
    train_cfg, data_cfg = cfg["train"], cfg["data"]
    device = select_device(cfg["device"])
    if train_cfg["sync_batchnorm"] and device.type != "cuda":
        raise InputError("train.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm does "
                         "not run on the CPU)", value=str(device))
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
    check_stage_losses(train_cfg, net, cfg["stage"])
    steps_per_epoch(train_cfg, len(bench.split("train")))


def init_weights_path(init_from: Path) -> Path:
    """The weights file a stage starts from: ``init_from`` itself, or a stage folder's
    ``model.safetensors``."""
    return init_from / WEIGHTS if init_from.is_dir() else init_from


def _init_source(cfg: dict[str, Any], previous: Path | None) -> Path | None:
    """What a stage starts from (``train.init_from``): the previous stage's folder, a path,
    or nothing."""
    init = cfg["train"]["init_from"]
    if init == "previous":
        return previous
    if init in (None, "none"):
        return None
    return Path(init).expanduser()


def check_run(config: dict[str, Any], data_dir: str | Path, run_dir: Path,
              stages: Sequence[str] | None = None) -> None:
    """Everything about a run that can be checked before it creates anything: the stages
    named, the benchmark (loaded once per image root), and every stage to train
    (:func:`check_stage`, e.g. stage 2's losses before stage 1 trains) with the weights it
    starts from when they must exist already. InputError naming the problem."""
    stage_names = [stage["name"] for stage in config["stages"]]
    unknown = sorted(set(stages or ()) - set(stage_names))
    if unknown:
        raise InputError(f"no stage named {', '.join(unknown)} in this method "
                         f"(stages: {', '.join(stage_names)})")
    benches: dict[tuple[Any, bool, bool], Benchmark] = {}
    previous: Path | None = None
    trained_here = False  # the previous stage is trained by this invocation
    for name in stage_names:
        cfg = stage_config(config, name)
        if stages is not None and name not in stages:
            previous, trained_here = run_dir / name, False
            continue
        data_cfg = cfg["data"]
        key = (data_cfg["image_root"], data_cfg["allow_outside_root"],
               data_cfg["skip_bad_images"])
        if key not in benches:  # every split's files must exist, unless bad images are skipped
            benches[key] = load_benchmark(data_dir, image_root=data_cfg["image_root"],
                                          allow_outside_root=data_cfg["allow_outside_root"],
                                          require_images=not data_cfg["skip_bad_images"])
        check_stage(cfg, benches[key])
        source = _init_source(cfg, previous)
        model_cfg = cfg["model"]
        if source is None and cfg["train"]["require_pretrained"] and (
                model_cfg["pretrained_path"] is None):
            raise InputError(
                f"stage '{name}' starts from ImageNet-pretrained {model_cfg['backbone']} weights "
                "in this preset (train.require_pretrained: true), but model.pretrained_path is "
                f"not set: give model.pretrained_path=FILE (a local torchvision "
                f"{model_cfg['backbone']} state dict, never downloaded; docs/reproduction.md), "
                "or train.require_pretrained=false to train it from scratch on purpose")
        if source is not None and not (source == previous and trained_here):
            weights = init_weights_path(source)
            if not weights.is_file():
                raise InputError(f"train.init_from of stage '{name}': no weights found (train "
                                 "that stage first, or set train.init_from)", path=weights)
        previous, trained_here = run_dir / name, True


# --------------------------------------------------------------------------- stage 2's start
def load_previous_weights(net: OLTRNetwork, init_from: Path) -> list[str]:
    """Load a previous stage's weights into ``net`` (`oltr.models.load_stage1_into_stage2`);
    returns the state-dict names set. InputError naming the file."""
    weights = init_weights_path(init_from)
    if not weights.is_file():
        raise InputError("train.init_from: no weights found", path=weights)
    try:
        previous = load_file(str(weights))
    except Exception as exc:
        raise InputError(f"train.init_from: cannot read weights: {exc}", path=weights) from exc
    try:
        return load_stage1_into_stage2(net, previous)
    except InputError as exc:
        raise InputError(f"train.init_from: {exc}", path=weights) from None


def init_from_train_features(net: OLTRNetwork, bench: Benchmark, cfg: dict[str, Any],
                             runtime: Runtime, store: FeatureStore | None = None) -> None:
    """Initialise the memory's centroids as class means of direct features over the train
    split, computed with *this* stage's feature model (fp32; under DDP each rank passes its
    shard and the features are gathered, so every rank gets the single-process means), and an
    FSLwF head's novel-class prototypes from the same pass. With a frozen-backbone feature
    cache (``store``) the pass runs from the cached rows (the same evaluation transform and
    precision; the backbone does not run again)."""
    fslwf = net.classifier if isinstance(net.classifier, FSLwFClassifier) else None
    if net.meta_embedding is None and fslwf is None:
        return
    description = "class means" if runtime.is_primary else None
    if store is not None:
        outputs = store_outputs(net, store, cfg, runtime, keys=("features",),
                                description=description)
    else:
        dataset = dataset_for(bench, "train", cfg["data"], train=False)
        batches = EvalBatches(dataset, cfg["data"], batch_size=cfg["eval"]["batch_size"],
                              num_workers=cfg["data"]["num_workers"], device=runtime.device,
                              indices=shard(len(dataset), runtime.rank, runtime.world_size))
        outputs = collect_outputs(net, batches, runtime.device, amp=cfg["eval"]["amp"],
                                  channels_last=cfg["train"]["channels_last"],
                                  keys=("features",), runtime=runtime, description=description)
    features = torch.from_numpy(outputs["features"]).to(runtime.device)
    labels = torch.from_numpy(outputs["labels"]).long().to(runtime.device)
    if fslwf is not None:  # FSLwF's w_avg of each novel class (Gidaris & Komodakis §3.2)
        fslwf.update_prototypes(features, labels)
    if net.meta_embedding is not None:
        net.meta_embedding.init_centroids(class_means(features, labels, net.num_classes))
        if cfg["model"]["reachability_scale"] == "auto":
            calibrate_reachability_scale(net, features)


def init_from_previous(net: OLTRNetwork, init_from: Path, bench: Benchmark, cfg: dict[str, Any],
                       runtime: Runtime) -> list[str]:
    """Load a previous stage's weights (:func:`load_previous_weights`), then initialise the
    memory's centroids and an FSLwF head's prototypes from the train features
    (:func:`init_from_train_features`)."""
    copied = load_previous_weights(net, init_from)
    init_from_train_features(net, bench, cfg, runtime)
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


# --------------------------------------------------------------------------- one epoch
@dataclass
class EpochStats:
    """What one epoch of training measured on this process (sums over its steps)."""

    loss_sum: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    correct: int = 0
    seen: int = 0
    skipped: int = 0


def _nonfinite(stage: str, value: float) -> OltrError:
    return OltrError(f"non-finite training loss ({value}) in stage '{stage}'; the last good "
                     "checkpoint is kept. Lower train.lr, set train.grad_clip, or set "
                     "train.nonfinite=skip to skip such steps.")


def train_one_epoch(
    task: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loader: Any,
    runtime: Runtime,
    *,
    train_cfg: dict[str, Any],
    steps: int,
    stage: str,
    use_channels_last: bool,
    progress: Any = None,
    log: Any = None,
    global_step: int = 0,
) -> EpochStats:
    """One epoch of SGD over ``steps`` batches of ``loader`` (torchvision's
    ``train_one_epoch``): ``task(images, labels)`` → (loss parts, logits). Sums stay on the
    device (no per-step synchronisation) except where a step must be inspected: a non-finite
    loss skips the step (``train.nonfinite: skip``, counted; checked every step) or stops the
    run (``stop``, checked at every log interval and at the epoch's end, before anything is
    saved: the last checkpoint is kept). ``progress``: a tqdm bar to advance;
    ``log(step, scalars)``: per-step scalars (TensorBoard)."""
    stats = EpochStats()
    task.train()
    device = runtime.device
    skip = train_cfg["nonfinite"] == "skip"
    log_every = max(1, train_cfg["log_every"])
    zero = torch.zeros((), device=device, dtype=torch.float64)
    loss_sum, correct, finite = zero.clone(), zero.clone(), torch.ones((), device=device,
                                                                        dtype=torch.bool)
    part_sums: dict[str, torch.Tensor] = {}
    for step, (images, labels) in enumerate(loader):
        if step >= steps:
            break
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if use_channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(train_cfg["amp"], device):
            parts, logits = task(images, labels)
        loss = parts["loss"].detach()
        if skip and not bool(torch.isfinite(loss)):
            stats.skipped += 1  # no optimiser (nor scheduler) step
            continue
        finite &= torch.isfinite(loss)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        if train_cfg["grad_clip"]:
            nn.utils.clip_grad_norm_(task.parameters(), train_cfg["grad_clip"])
        optimizer.step()
        scheduler.step()
        batch = labels.numel()
        loss_sum += loss.double() * batch
        for name, value in parts.items():
            if name != "loss":
                part_sums[name] = part_sums.get(name, zero) + value.detach().double() * batch
        correct += (logits.detach().argmax(1) == labels).sum()
        stats.seen += batch
        if (step + 1) % log_every == 0:
            if not bool(finite):
                raise _nonfinite(stage, float(loss))
            if progress is not None:
                progress.set_postfix(loss=f"{float(loss_sum) / stats.seen:.3f}",
                                     acc=f"{float(correct) / stats.seen:.3f}", refresh=False)
            if log is not None:
                log(global_step + step + 1, {f"step/{k}": float(v.detach())
                                             for k, v in parts.items()}
                    | {"step/lr": optimizer.param_groups[-1]["lr"]})
        if progress is not None:
            progress.update(1)
    if not bool(finite):
        raise _nonfinite(stage, float("nan"))
    if stats.seen == 0 and stats.skipped:
        raise OltrError(f"every step of an epoch had a non-finite loss in stage '{stage}'; "
                        "lower train.lr")
    stats.loss_sum, stats.correct = float(loss_sum), int(correct)
    stats.parts = {name: float(value) for name, value in part_sums.items()}
    return stats


def validate(net: OLTRNetwork, batches: Any, cfg: dict[str, Any], runtime: Runtime,
             train_counts: np.ndarray, *, store: FeatureStore | None = None
             ) -> dict[str, float | None]:
    """Val accuracy of ``net`` (what selects the best epoch) and its many/medium/few-shot
    means; every rank passes its shard and the outputs are gathered, so all ranks agree.
    ``store``: the val split's frozen-backbone cache, read instead of ``batches``."""
    if store is not None:
        outputs = store_outputs(net, store, cfg, runtime, keys=("logits",))
    else:
        outputs = collect_outputs(net, batches, runtime.device, amp=cfg["eval"]["amp"],
                                  channels_last=cfg["train"]["channels_last"],
                                  keys=("logits",), runtime=runtime)
    predictions = outputs["logits"].argmax(1)
    groups = metrics.closed_set_accuracy(
        predictions, outputs["labels"], train_counts, many_threshold=cfg["eval"]["many_threshold"],
        few_threshold=cfg["eval"]["few_threshold"], strict=cfg["eval"]["strict_shots"])
    return {"accuracy": float((predictions == outputs["labels"]).mean()),
            "many": groups["many"], "medium": groups["medium"], "few": groups["few"]}


# --------------------------------------------------------------------------- one stage
@dataclass
class StageResult:
    stage_dir: Path
    best_epoch: int
    best_val_accuracy: float
    epochs_run: int
    seconds: float
    skipped_images: dict[str, int] = field(default_factory=dict)


def report_skipped_images(prefix: str, dropped: dict[str, list[str]]) -> None:
    """Print how many unreadable images were skipped per split, and the first few of them."""
    messages = [message for split_messages in dropped.values() for message in split_messages]
    if not messages:
        return
    counts = ", ".join(f"{split} {len(m)}" for split, m in dropped.items())
    print(f"{prefix} skipping {len(messages)} unreadable images ({counts}):", flush=True)
    for message in messages[:5]:
        print(f"{prefix}   {message}", flush=True)


def _build_network(cfg: dict[str, Any], bench: Benchmark, runtime: Runtime) -> OLTRNetwork:
    net = create_network(cfg["model"], bench.num_classes, cfg["data"]["channels"],
                         class_counts=bench.train_counts.tolist()).to(runtime.device)
    if cfg["train"]["channels_last"] and net.supports_channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def _wrap(task: TrainTask, cfg: dict[str, Any], runtime: Runtime) -> nn.Module:
    """DDP around the task under torchrun (SyncBatchNorm first if ``train.sync_batchnorm``),
    then ``torch.compile`` with ``train.compile`` (the DDP-wrapped module is compiled, as
    PyTorch's DDP notes advise; `oltr.train.checkpoint.unwrap_model` takes both off)."""
    wrapped: nn.Module = task
    if runtime.distributed:
        if cfg["train"]["sync_batchnorm"]:
            wrapped = nn.SyncBatchNorm.convert_sync_batchnorm(wrapped)
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(wrapped, device_ids=device_ids)
    if cfg["train"]["compile"]:
        wrapped = torch.compile(wrapped)
    return wrapped


def train_stage(
    cfg: dict[str, Any],
    data_dir: str | Path,
    stage_dir: str | Path,
    *,
    init_from: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    verbose: bool = True,
    runtime: Runtime | None = None,
    tensorboard: Any = None,
) -> StageResult:
    """Train one stage (flat config, see ``oltr.config.stage_config``) into ``stage_dir``.
    ``tensorboard``: a ``SummaryWriter`` (rank 0) for per-step and per-epoch scalars.
    ``progress``: a tqdm bar per stage; ``verbose``: the stage's lines on standard output
    (start, resume, one per epoch; skipped unreadable images are reported either way)."""
    started = time.perf_counter()
    runtime = runtime or init_runtime(cfg["device"])
    primary = runtime.is_primary
    talk = primary and verbose  # informational lines (files are written by `primary`)
    stage_dir = Path(stage_dir)
    train_cfg, data_cfg = cfg["train"], cfg["data"]
    bench = load_benchmark(data_dir, image_root=data_cfg["image_root"],
                           allow_outside_root=data_cfg["allow_outside_root"])
    check_stage(cfg, bench)
    if primary:
        claim_directory(stage_dir, "stage", what="stage directory", reuse=True,
                        protect=(data_dir,))
        remove_stale_temporaries(stage_dir)
    runtime.barrier()
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg["seed"])

    skipped: dict[str, int] = {}
    if data_cfg["skip_bad_images"]:
        dropped = bench.drop_unreadable_images(("train", "val"),
                                               num_workers=data_cfg["num_workers"])
        skipped = {split: len(messages) for split, messages in dropped.items()}
        if primary:
            report_skipped_images(f"[{cfg['stage']}]", dropped)

    net = _build_network(cfg, bench, runtime)
    checkpoint_path = stage_dir / CHECKPOINT
    state = load_checkpoint(checkpoint_path) if resume and checkpoint_path.exists() else None
    starts_from_previous = state is None and init_from is not None
    if starts_from_previous:
        load_previous_weights(net, init_from)
    if train_cfg["freeze_backbone"]:
        freeze_backbone(net, freeze_bn=True)

    optimizer = torch.optim.SGD(parameter_groups(net, train_cfg), lr=train_cfg["lr"],
                                momentum=train_cfg["momentum"],
                                weight_decay=train_cfg["weight_decay"],
                                nesterov=train_cfg["nesterov"])
    train_size = len(bench.split("train"))  # the split left after skipping
    steps = steps_per_epoch(train_cfg, train_size)
    rank_batch_size(train_cfg["batch_size"], runtime)
    epochs = train_cfg["epochs"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, schedule=train_cfg["schedule"], total_steps=epochs * steps, steps_per_epoch=steps,
        step_size=train_cfg["step_size"], gamma=train_cfg["gamma"],
        warmup_steps=train_cfg["warmup_epochs"] * steps))
    objective = Objective(train_cfg, bench.train_counts, net, runtime.device)

    start_epoch, best_epoch, best_acc = 0, -1, -1.0
    if state is not None:
        if with_defaults(state["config"]) != cfg:
            raise InputError(
                "the checkpoint was written with a different config ("
                f"{config_differences(with_defaults(state['config']), cfg)}); resume with the "
                "same command, or start a new --out", path=checkpoint_path)
        if state.get("class_names", bench.class_names) != bench.class_names:
            raise InputError(
                f"the checkpoint was written for {len(state['class_names'])} classes "
                f"{state['class_names'][:5]} but the data has {bench.num_classes} "
                f"{bench.class_names[:5]}; resume with the same --data", path=checkpoint_path)
        try:
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise InputError(
                "the checkpoint does not fit this model and data (tampered, or other data?): "
                f"{str(exc).strip().splitlines()[-1].strip()}", path=checkpoint_path) from None
        start_epoch, best_epoch, best_acc = state["epoch"], state["best_epoch"], state["best_acc"]
        if talk:
            print(f"[{cfg['stage']}] resuming after epoch {start_epoch} of {epochs}", flush=True)
    # the frozen part's outputs, once per weights (train.feature_cache; the weights are final)
    stores = None
    if train_cfg["feature_cache"] == "on" and start_epoch < epochs:
        stores = build_stage_stores(stage_dir, net, bench, cfg, runtime,
                                    progress=progress and primary)
        net.contiguous_after_split()  # the rows are contiguous: no layout conversion per conv
        if talk:
            print(f"[{cfg['stage']}] feature cache: training on the frozen backbone's "
                  f"{net.frozen_split} outputs of the evaluation transform (no augmentation "
                  f"in this stage), {stores.train.path.name}", flush=True)
    if starts_from_previous:
        init_from_train_features(net, bench, cfg, runtime,
                                 store=stores.train if stores is not None else None)
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
    if primary:
        save_config(cfg, stage_dir / CONFIG)
        if start_epoch == 0 and epochs == 0:
            save_model(stage_dir, net, model_info | {"epoch": 0, "val_accuracy": None})

    task = _wrap(TrainTask(net, objective, from_frozen=stores is not None), cfg, runtime)
    loader: Any = None
    val_batches: Any = None
    if stores is not None:
        loader = FeatureTrainLoader(
            stores.train, make_sampler(stores.train.labels.numpy(), train_cfg, cfg["seed"], runtime),
            rank_batch_size(train_cfg["batch_size"], runtime), runtime.device,
            drop_last=len(stores.train) > train_cfg["batch_size"])
    else:
        loader = build_train_loader(bench, cfg, runtime) if start_epoch < epochs else None
        val_set = dataset_for(bench, "val", data_cfg, train=False)
        val_batches = EvalBatches(val_set, data_cfg, batch_size=cfg["eval"]["batch_size"],
                                  num_workers=data_cfg["num_workers"], device=runtime.device,
                                  indices=shard(len(val_set), runtime.rank, runtime.world_size))
    history = read_history(stage_dir)[:start_epoch]
    use_channels_last = (train_cfg["channels_last"] and net.supports_channels_last
                         and stores is None)
    if talk and start_epoch < epochs:
        print(f"[{cfg['stage']}] training epochs {start_epoch + 1}..{epochs} ({steps} steps "
              f"each, {runtime.world_size} process{'es' if runtime.distributed else ''} on "
              f"{runtime.device.type}) into {stage_dir}", flush=True)
    log = None
    if tensorboard is not None:
        def log(step: int, scalars: dict[str, float]) -> None:
            for name, value in scalars.items():
                tensorboard.add_scalar(f"{cfg['stage']}/{name}", value, step)
    bar = None
    if progress and primary and start_epoch < epochs:
        bar = tqdm(total=(epochs - start_epoch) * steps, desc=f"[{cfg['stage']}]", unit="step",
                   leave=False, dynamic_ncols=True, disable=None)
    with bar if bar is not None else nullcontext():
        for epoch in range(start_epoch, epochs):
            torch.manual_seed(epoch_seed(cfg["seed"], epoch) + runtime.rank)
            epoch_start = time.perf_counter()
            objective.set_epoch(epoch)
            assert loader is not None
            loader.set_epoch(epoch)
            stats = train_one_epoch(task, optimizer, scheduler, loader, runtime,
                                    train_cfg=train_cfg, steps=steps, stage=cfg["stage"],
                                    use_channels_last=use_channels_last, progress=bar, log=log,
                                    global_step=epoch * steps)
            totals = runtime.all_reduce_sum([stats.loss_sum, stats.correct, stats.seen,
                                             stats.skipped, *stats.parts.values()])
            loss_sum, correct, seen, skipped_steps = (float(x) for x in totals[:4])
            parts = dict(zip(stats.parts, (float(x) / max(1.0, seen) for x in totals[4:])))
            train_seconds = time.perf_counter() - epoch_start
            val = validate(net, val_batches, cfg, runtime, bench.train_counts,
                           store=stores.val if stores is not None else None)
            record = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / max(1.0, seen),
                "train_loss_parts": parts,
                "train_accuracy": correct / max(1.0, seen),
                "val_accuracy": val["accuracy"],
                "val_many": val["many"], "val_medium": val["medium"], "val_few": val["few"],
                "lr": optimizer.param_groups[-1]["lr"],
                "images_per_second": seen / train_seconds,
                "seconds": time.perf_counter() - epoch_start,
                "skipped_steps": int(skipped_steps),
            }
            history.append(record)
            improved = val["accuracy"] > best_acc
            if improved:
                best_epoch, best_acc = epoch + 1, float(val["accuracy"])
            if primary:
                if improved:
                    save_model(stage_dir, net, model_info | {"epoch": epoch + 1,
                                                             "val_accuracy": best_acc})
                write_history(stage_dir, history)
                save_checkpoint(checkpoint_path, {
                    "config": cfg, "model": unwrap_model(net).state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1, "best_epoch": best_epoch, "best_acc": best_acc,
                    "class_names": bench.class_names,
                })
                if log is not None:
                    log((epoch + 1) * steps, {
                        f"epoch/{k}": v for k, v in record.items()
                        if isinstance(v, (int, float)) and v is not None and k != "epoch"})
                message = (f"[{cfg['stage']}] epoch {epoch + 1}/{epochs}  loss "
                           f"{record['train_loss']:.4f}  train acc {record['train_accuracy']:.3f}"
                           f"  val acc {val['accuracy']:.3f}{' *' if improved else ''}  "
                           f"{record['images_per_second']:.0f} img/s"
                           f"{f'  ({int(skipped_steps)} non-finite steps skipped)' if skipped_steps else ''}")
                if talk:
                    (bar.write(message) if bar is not None else print(message, flush=True))
            runtime.barrier()
    return StageResult(stage_dir, best_epoch, best_acc, epochs - start_epoch,
                       time.perf_counter() - started, skipped)


# --------------------------------------------------------------------------- a run of stages
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
    verbose: bool = True,
    stages: Sequence[str] | None = None,
    tensorboard: str | Path | None = None,
    fit_decision: bool = True,
) -> list[StageResult]:
    """Train the stages of ``config`` in order (``stages``: only these, e.g. ``["stage2"]`` of a
    run whose stage 1 is done); stage *k* starts from stage *k-1*'s selected weights. When the
    final stage has trained, its decision rule is fitted on val and saved beside its weights
    (`oltr.artifact.fit_decision`; ``fit_decision=False`` leaves that to evaluation).

    Everything checkable is checked first (:func:`check_run`), so bad input creates nothing.
    ``run_dir`` is then created (with oltr's marker, :mod:`oltr.ownership`) or must be empty;
    ``resume`` or ``stages`` continue only a run oltr wrote, with the same config. The run is
    locked while it trains (a second writer stops, naming this PID). When a fresh run fails
    before its first finished epoch, what it created is removed again. Under ``torchrun``
    every process calls this; only rank 0 writes. ``tensorboard``: a log directory for
    TensorBoard scalars (needs the ``tensorboard`` package). ``progress``: tqdm bars;
    ``verbose=False``: no lines on standard output (epochs, the fitted decision rule) —
    ``progress=False, verbose=False`` trains silently, except for skipped unreadable images.
    """
    runtime = init_runtime(config["device"])
    run_dir = Path(run_dir).expanduser()
    check_config(config)  # a config built or edited in Python is checked as a loaded one
    config = absolute_paths(config)  # the saved config must name the files from anywhere
    stage_names = [stage["name"] for stage in config["stages"]]
    check_run(config, data_dir, run_dir, stages)
    writer = _tensorboard_writer(tensorboard) if runtime.is_primary else None
    with ExitStack() as stack:
        claim = None
        if runtime.is_primary:
            claim = claim_directory(
                run_dir, "run", what="run directory", reuse=resume or stages is not None,
                not_empty_hint="pass --resume to continue it or choose another --out",
                protect=(data_dir,))
            stack.enter_context(locked(run_dir, "run directory"))
        if writer is not None:
            stack.callback(writer.close)
        runtime.barrier()
        try:
            results = _train_stages(config, data_dir, run_dir, resume=resume, progress=progress,
                                    verbose=verbose, stages=stages,
                                    check_saved=claim is not None and not claim.fresh,
                                    runtime=runtime, tensorboard=writer)
            final = stage_names[-1]
            if fit_decision and (stages is None or final in stages):
                from oltr.artifact import fit_decision as fit

                fit(run_dir, data_dir, runtime=runtime, verbose=verbose)
            return results
        except BaseException:
            if claim is not None and claim.fresh and not _finished_an_epoch(run_dir, stage_names):
                undo_claim(claim)
            raise


def _tensorboard_writer(log_dir: str | Path | None) -> Any:
    if log_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError("--tensorboard needs the tensorboard package (pip install "
                         "'oltr[tensorboard]')", value=str(log_dir)) from None
    return SummaryWriter(log_dir=str(log_dir))


def _train_stages(
    config: dict[str, Any],
    data_dir: str | Path,
    run_dir: Path,
    *,
    resume: bool,
    progress: bool,
    verbose: bool,
    stages: Sequence[str] | None,
    check_saved: bool,
    runtime: Runtime,
    tensorboard: Any,
) -> list[StageResult]:
    """The body of :func:`train_run`, in a claimed and locked run directory."""
    stage_names = [stage["name"] for stage in config["stages"]]
    if runtime.is_primary:
        remove_stale_temporaries(run_dir)
        saved = run_dir / CONFIG
        if check_saved and saved.exists():
            before = load_saved_config(saved)
            if before != config:
                raise InputError(f"--resume with a config that differs from the saved one: "
                                 f"{config_differences(before, config)}; resume with the same "
                                 "command, or choose another --out", path=saved)
        save_config(config, saved)
        write_run_info(run_dir, config["method"], stage_names, data_dir)
    results, previous = [], None
    for name in stage_names:
        if stages is not None and name not in stages:
            previous = run_dir / name
            continue
        cfg = stage_config(config, name)
        results.append(train_stage(cfg, data_dir, run_dir / name,
                                   init_from=_init_source(cfg, previous), resume=resume,
                                   progress=progress, verbose=verbose, runtime=runtime,
                                   tensorboard=tensorboard))
        previous = run_dir / name
        runtime.barrier()
    return results
