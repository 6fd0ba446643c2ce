"""Everything one training stage is built from, in reading order (torchvision's
``references/classification`` shape: builders here, the loop in `oltr.train.loop`).

:func:`build_stage` turns a flat stage config (``oltr.config.stage_config``) into
:class:`StageParts`: the benchmark (unreadable images skipped if asked), the network (initialised
from a previous stage's weights, OLTR stage 2 loads stage 1, paper §3.3; backbone frozen if asked),
the SGD optimiser over the network's parameter groups and its learning-rate schedule, the
objective (Eq. 7), the state of a resumed stage, the frozen-backbone feature caches, the memory's
centroids and an FSLwF head's prototypes from the train features, the training task wrapped in
DDP / ``torch.compile``, and the train and val loaders. :func:`oltr.train.loop.fit` trains them.

The order of every step is the order of the random draws (network initialisation, loaders and
samplers, the passes over the train split), so a seed gives the same weights as before.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from oltr.data import (
    Benchmark,
    build_transform,
    dataset_for,
    load_benchmark,
    report_skipped_images,
)
from oltr.errors import InputError
from oltr.features import (
    FeatureStore,
    FeatureTrainLoader,
    StageStores,
    build_stage_stores,
    store_outputs,
)
from oltr.inference import EvalBatches, forward_split, split_batches
from oltr.models import OLTRNetwork, create_network, freeze_backbone, load_stage1_into_stage2
from oltr.ownership import claim_directory, remove_stale_temporaries
from oltr.run import StageDir
from oltr.runtime import Runtime, init_runtime, seed_everything, select_device
from oltr.train.checkpoint import BestEpoch, load_checkpoint, restore_checkpoint, save_model
from oltr.train.loaders import build_train_loader, make_sampler, rank_batch_size
from oltr.train.objective import Objective, TrainTask, check_stage_losses


# --------------------------------------------------------------------------- the parts
@dataclass
class StageParts:
    """What :func:`oltr.train.loop.fit` trains, as :func:`build_stage` built it.

    ``task`` is ``TrainTask(net, objective)`` wrapped in DDP / ``torch.compile`` (what a step
    calls); ``net`` and ``objective`` are the plain modules inside it. ``loader`` serves the
    train batches (None when no epoch is left), ``val_batches`` the val split's images (None
    when ``stores`` — the frozen-backbone caches — serve train and val). ``start_epoch``
    epochs are done (a resumed stage), ``best`` is the best epoch so far and ``history`` their
    records. ``steps``: optimiser steps per epoch; ``channels_last``: train batches in that
    memory format; ``started``: ``time.perf_counter()`` when building began.
    """

    cfg: dict[str, Any]
    stage_dir: Path
    runtime: Runtime
    bench: Benchmark
    net: OLTRNetwork
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    objective: Objective
    task: nn.Module
    loader: Any
    val_batches: EvalBatches | None
    stores: StageStores | None
    steps: int
    start_epoch: int
    best: BestEpoch
    history: list[dict[str, Any]]
    model_info: dict[str, Any]
    channels_last: bool
    skipped_images: dict[str, int]
    started: float

    @property
    def checkpoint_path(self) -> Path:
        """The stage's ``checkpoint.pt``."""
        return StageDir(self.stage_dir).checkpoint_path


def build_stage(
    cfg: dict[str, Any],
    data_dir: str | Path,
    stage_dir: str | Path,
    *,
    init_from: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    verbose: bool = True,
    runtime: Runtime | None = None,
) -> StageParts:
    """Build the parts of one stage (flat config ``cfg``) that trains into ``stage_dir``, in
    reading order. ``init_from``: the weights (file or stage folder) it starts from, unless
    ``resume`` finds a checkpoint in ``stage_dir``. ``progress``: a tqdm bar while the feature
    cache is computed; ``verbose``: the stage's lines on standard output (resume, feature
    cache; skipped unreadable images are reported either way). Only the primary rank writes.

    Raises:
        InputError: settings or data the stage cannot train with (:func:`check_stage`), weights
            to start from or a checkpoint that do not fit.
    """
    started = time.perf_counter()
    runtime = runtime or init_runtime(cfg["device"])
    stage_dir = Path(stage_dir)
    stage = StageDir(stage_dir)
    train_cfg = cfg["train"]
    talk = runtime.is_primary and verbose  # informational lines (files: the primary rank)
    bench = open_stage(cfg, data_dir, stage_dir, runtime)
    skipped = skip_unreadable_images(cfg, bench, runtime)
    net = build_network(cfg, bench, runtime)
    state = load_checkpoint(stage.checkpoint_path) \
        if resume and stage.has_checkpoint() else None
    starts_from_previous = state is None and init_from is not None
    if starts_from_previous:
        load_previous_weights(net, init_from)
    if train_cfg["freeze_backbone"]:
        freeze_backbone(net, freeze_bn=True)
    optimizer, scheduler, steps = build_optimizer(net, train_cfg, len(bench.split("train")),
                                                  runtime)
    objective = Objective(train_cfg, bench.train_counts, net, runtime.device)
    start_epoch, best = 0, BestEpoch()
    if state is not None:
        start_epoch, best = restore_checkpoint(
            state, stage.checkpoint_path, cfg=cfg, class_names=bench.class_names, net=net,
            optimizer=optimizer, scheduler=scheduler)
        if talk:
            print(f"[{cfg['stage']}] resuming after epoch {start_epoch} of "
                  f"{train_cfg['epochs']}", flush=True)
    stores = build_stores(stage_dir, net, bench, cfg, runtime, start_epoch=start_epoch,
                          progress=progress, verbose=verbose)
    if starts_from_previous:
        init_from_train_features(net, bench, cfg, runtime,
                                 store=stores.train if stores is not None else None)
    model_info = stage_model_info(cfg, bench, skipped)
    if runtime.is_primary:
        write_stage_start(stage_dir, cfg, net, model_info, start_epoch)
    task = wrap_task(TrainTask(net, objective, from_frozen=stores is not None), cfg, runtime)
    loader, val_batches = build_loaders(bench, cfg, runtime, stores, start_epoch)
    return StageParts(
        cfg=cfg, stage_dir=stage_dir, runtime=runtime, bench=bench, net=net,
        optimizer=optimizer, scheduler=scheduler, objective=objective, task=task, loader=loader,
        val_batches=val_batches, stores=stores, steps=steps, start_epoch=start_epoch, best=best,
        history=stage.history()[:start_epoch], model_info=model_info,
        channels_last=(train_cfg["channels_last"] and net.supports_channels_last
                       and stores is None),
        skipped_images=skipped, started=started)


# --------------------------------------------------------------------------- checks before anything
def check_stage(cfg: dict[str, Any], bench: Benchmark) -> None:
    """Fail before any training on what a stage's settings and data do not allow together:
    its device, transforms, network (built on the meta device where it can be: no memory, no
    weights read), losses (e.g. ``train.centroid_loss`` needs ``model.meta_embedding``), steps
    per epoch and pretrained weights file.

    Raises:
        InputError: naming the key and value.
    """
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


def open_stage(cfg: dict[str, Any], data_dir: str | Path, stage_dir: Path,
               runtime: Runtime) -> Benchmark:
    """Load the benchmark and check the stage (:func:`check_stage`); claim ``stage_dir``
    (primary rank: created with oltr's marker, or one oltr wrote; stale temporaries removed);
    then switch on deterministic algorithms if asked and seed every generator."""
    data_cfg = cfg["data"]
    bench = load_benchmark(data_dir, image_root=data_cfg["image_root"],
                           allow_outside_root=data_cfg["allow_outside_root"])
    check_stage(cfg, bench)
    if runtime.is_primary:
        claim_directory(stage_dir, "stage", what="stage directory", reuse=True,
                        protect=(data_dir,))
        remove_stale_temporaries(stage_dir)
    runtime.barrier()
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg["seed"])
    return bench


def skip_unreadable_images(cfg: dict[str, Any], bench: Benchmark, runtime: Runtime
                           ) -> dict[str, int]:
    """With ``data.skip_bad_images``, drop the train and val images that cannot be read
    (reported by the primary rank); returns how many per split (empty when not asked)."""
    data_cfg = cfg["data"]
    if not data_cfg["skip_bad_images"]:
        return {}
    dropped = bench.drop_unreadable_images(("train", "val"), num_workers=data_cfg["num_workers"])
    if runtime.is_primary:
        report_skipped_images(f"[{cfg['stage']}]", dropped)
    return {split: len(messages) for split, messages in dropped.items()}


# --------------------------------------------------------------------------- the network
def build_network(cfg: dict[str, Any], bench: Benchmark, runtime: Runtime) -> OLTRNetwork:
    """The stage's network (``model`` config) on the runtime's device, channels-last when
    ``train.channels_last`` and the network supports it."""
    net = create_network(cfg["model"], bench.num_classes, cfg["data"]["channels"],
                         class_counts=bench.train_counts.tolist()).to(runtime.device)
    if cfg["train"]["channels_last"] and net.supports_channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def init_weights_path(init_from: Path) -> Path:
    """The weights file a stage starts from: ``init_from`` itself, or a stage folder's
    ``model.safetensors``."""
    return StageDir(init_from).weights_path if init_from.is_dir() else init_from


def load_previous_weights(net: OLTRNetwork, init_from: Path) -> list[str]:
    """Load a previous stage's weights into ``net`` (`oltr.models.load_stage1_into_stage2`,
    paper §3.3); returns the state-dict names set.

    Raises:
        InputError: naming the file, when it is missing, unreadable or does not fit.
    """
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
    split (paper §3.1), computed with *this* stage's feature model (fp32; under DDP each rank
    passes its shard and the features are gathered, so every rank gets the single-process
    means), and an FSLwF head's novel-class prototypes from the same pass
    (:meth:`OLTRNetwork.init_from_features`). With a frozen-backbone feature cache (``store``)
    the pass runs from the cached rows (the same evaluation transform and precision; the
    backbone does not run again). Nothing for a network without either."""
    if not net.needs_train_features:
        return
    description = "class means" if runtime.is_primary else None
    if store is not None:
        outputs = store_outputs(net, store, cfg, runtime, keys=("features",),
                                description=description)
    else:
        outputs = forward_split(net, dataset_for(bench, "train", cfg["data"], train=False), cfg,
                                runtime=runtime, keys=("features",), description=description)
    features = torch.from_numpy(outputs["features"]).to(runtime.device)
    labels = torch.from_numpy(outputs["labels"]).long().to(runtime.device)
    net.init_from_features(features, labels, calibrate_reachability=(
        cfg["model"]["reachability_scale"] == "auto"))


# --------------------------------------------------------------------------- optimisation
def lr_factor(step: int, *, schedule: str, total_steps: int, steps_per_epoch: int,
              step_size: int, gamma: float, warmup_steps: int) -> float:
    """Multiplier of the base learning rate after ``step`` optimiser steps: linear warm-up over
    ``warmup_steps``, then ``constant``, ``step`` (× ``gamma`` every ``step_size`` epochs) or
    ``cosine`` (to 0 at ``total_steps``).

    Raises:
        InputError: an unknown ``schedule``.
    """
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

    Raises:
        InputError: naming both, when ``epoch_samples`` is below ``batch_size`` while the split
            is larger than a batch (the loader drops an incomplete last batch then, so every
            epoch would train nothing).
    """
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


def build_optimizer(net: OLTRNetwork, train_cfg: dict[str, Any], train_size: int,
                    runtime: Runtime) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR,
                                               int]:
    """SGD over the network's parameter groups (:meth:`OLTRNetwork.parameter_groups`), its
    per-step schedule (:func:`lr_factor`) over ``train.epochs`` and the steps per epoch over
    the ``train_size`` images left after skipping.

    Raises:
        InputError: steps that train nothing, a batch the ranks cannot share, an unknown
            schedule (at the first step).
    """
    optimizer = torch.optim.SGD(net.parameter_groups(train_cfg), lr=train_cfg["lr"],
                                momentum=train_cfg["momentum"],
                                weight_decay=train_cfg["weight_decay"],
                                nesterov=train_cfg["nesterov"])
    steps = steps_per_epoch(train_cfg, train_size)
    rank_batch_size(train_cfg["batch_size"], runtime)
    total = train_cfg["epochs"] * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, schedule=train_cfg["schedule"], total_steps=total, steps_per_epoch=steps,
        step_size=train_cfg["step_size"], gamma=train_cfg["gamma"],
        warmup_steps=train_cfg["warmup_epochs"] * steps))
    return optimizer, scheduler, steps


# --------------------------------------------------------------------------- data and files
def build_stores(stage_dir: Path, net: OLTRNetwork, bench: Benchmark, cfg: dict[str, Any],
                 runtime: Runtime, *, start_epoch: int, progress: bool, verbose: bool
                 ) -> StageStores | None:
    """The frozen part's outputs over train and val, computed once per weights
    (``train.feature_cache: on`` and epochs left; the frozen weights are final by now), with
    the trainable modules after the split put in the rows' contiguous format; else None."""
    if cfg["train"]["feature_cache"] != "on" or start_epoch >= cfg["train"]["epochs"]:
        return None
    stores = build_stage_stores(stage_dir, net, bench, cfg, runtime,
                                progress=progress and runtime.is_primary)
    net.contiguous_after_split()  # the rows are contiguous: no layout conversion per conv
    if runtime.is_primary and verbose:
        print(f"[{cfg['stage']}] feature cache: training on the frozen backbone's "
              f"{net.frozen_split} outputs of the evaluation transform (no augmentation "
              f"in this stage), {stores.train.path.name}", flush=True)
    return stores


def stage_model_info(cfg: dict[str, Any], bench: Benchmark, skipped: dict[str, int]
                     ) -> dict[str, Any]:
    """``model.json`` of the stage's selected weights, less the epoch and its val accuracy:
    what rebuilds the network and reads its inputs (`oltr.inference.load_model`)."""
    data_cfg = cfg["data"]
    return {
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


def write_stage_start(stage_dir: Path, cfg: dict[str, Any], net: OLTRNetwork,
                      model_info: dict[str, Any], start_epoch: int) -> None:
    """The stage's ``config.yaml`` (primary rank); a stage of 0 epochs saves its initial
    weights as the selected ones."""
    StageDir(stage_dir).save_config(cfg)
    if start_epoch == 0 and cfg["train"]["epochs"] == 0:
        save_model(stage_dir, net, model_info | {"epoch": 0, "val_accuracy": None})


def wrap_task(task: TrainTask, cfg: dict[str, Any], runtime: Runtime) -> nn.Module:
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


def build_loaders(bench: Benchmark, cfg: dict[str, Any], runtime: Runtime,
                  stores: StageStores | None, start_epoch: int
                  ) -> tuple[Any, EvalBatches | None]:
    """The train loader and the val batches of this rank: from the feature caches
    (``stores``; val is read from its cache, no batches) or the split's images (no train
    loader when no epoch is left)."""
    train_cfg, data_cfg = cfg["train"], cfg["data"]
    if stores is not None:
        sampler = make_sampler(stores.train.labels.numpy(), train_cfg, cfg["seed"], runtime)
        loader = FeatureTrainLoader(stores.train, sampler,
                                    rank_batch_size(train_cfg["batch_size"], runtime),
                                    runtime.device,
                                    drop_last=len(stores.train) > train_cfg["batch_size"])
        return loader, None
    loader = build_train_loader(bench, cfg, runtime) if start_epoch < train_cfg["epochs"] \
        else None
    val_batches = split_batches(dataset_for(bench, "val", data_cfg, train=False), cfg,
                                runtime.device, runtime=runtime)
    return loader, val_batches
