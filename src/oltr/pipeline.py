"""A training run end to end: every stage of a method in order, then the decision rule.

A *run* is a sequence of stages (``configs/<benchmark>/<method>.yaml``), each built by
`oltr.train.build_stage` and trained by `oltr.train.fit`; stage *k* starts from stage *k-1*'s
selected weights (OLTR stage 2 loads stage 1, paper §3.3). At the run's end the decision rule of
the final stage is fitted on val and saved beside its weights (`oltr.artifact.fit_decision`).
:func:`check_run` checks everything checkable before the run creates anything; :func:`train_run`
claims and locks the run directory, trains the stages and fits the rule.

It is the layer above `oltr.artifact` (the decision rule fitted from a trained stage) and
`oltr.train` (one stage), so that neither imports upwards (the layers contract in
pyproject.toml).
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from oltr import artifact
from oltr.config import (
    absolute_paths,
    check_config,
    config_differences,
    stage_config,
)
from oltr.data import Benchmark, load_benchmark
from oltr.errors import InputError
from oltr.ownership import claim_directory, locked, remove_stale_temporaries, undo_claim
from oltr.run import RunDir
from oltr.runtime import Runtime, init_runtime
from oltr.train import StageResult, build_stage, check_stage, fit, init_weights_path

__all__ = ["check_run", "train_run"]


# --------------------------------------------------------------------------- checks before anything
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
    (`oltr.train.check_stage`, e.g. stage 2's losses before stage 1 trains) with the weights it
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


# --------------------------------------------------------------------------- a run of stages
def _finished_an_epoch(run_dir: Path, stage_names: Sequence[str]) -> bool:
    """Whether any stage of the run holds a checkpoint or selected weights."""
    run = RunDir(run_dir)
    return any(run.stage(name).has_checkpoint() or run.stage(name).has_weights()
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
                artifact.fit_decision(run_dir, data_dir, runtime=runtime, verbose=verbose)
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
        run = RunDir(run_dir)
        if check_saved and run.config_path.exists():
            before = run.config()
            if before != config:
                raise InputError(f"--resume with a config that differs from the saved one: "
                                 f"{config_differences(before, config)}; resume with the same "
                                 "command, or choose another --out", path=run.config_path)
        run.save_config(config)
        run.write_info(config["method"], stage_names, data_dir)
    results, previous = [], None
    for name in stage_names:
        if stages is not None and name not in stages:
            previous = run_dir / name
            continue
        cfg = stage_config(config, name)
        results.append(fit(build_stage(cfg, data_dir, run_dir / name,
                                       init_from=_init_source(cfg, previous), resume=resume,
                                       progress=progress, verbose=verbose, runtime=runtime),
                           progress=progress, verbose=verbose, tensorboard=tensorboard))
        previous = run_dir / name
        runtime.barrier()
    return results
