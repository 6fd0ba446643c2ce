"""``oltr train``: train a method preset or a config file, every stage
(:func:`oltr.pipeline.train_run`); ``--evaluate`` then runs ``oltr evaluate --open`` on it."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from oltr.cli.common import RawDescriptionDefaultsHelpFormatter, default_of
from oltr.cli.evaluate import evaluate_and_print
from oltr.config import list_benchmarks, list_methods, load_config
from oltr.pipeline import train_run
from oltr.run import RunDir
from oltr.runtime import init_runtime, launched_by_torchrun, shutdown_runtime

NAME = "train"

#: Published split-file prefixes and the preset family made for them.
PUBLISHED_LISTS = {"ImageNet_LT_": "imagenet_lt", "Places_LT_": "places_lt"}


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``oltr train`` to the ``oltr`` command's sub-parsers."""
    benchmark = default_of(load_config, "benchmark")
    p = subparsers.add_parser(
        NAME, help="train a method (all its stages)",
        description="Train a method preset (configs/<benchmark>/<method>.yaml) or a config file. "
                    "Trailing key=value arguments override config keys, e.g. train.epochs=3 "
                    "(every stage that does not set it itself; a warning names the others) or "
                    "stage2.train.lr=0.05 (one stage). A checkpoint is written every epoch; "
                    "--resume continues a killed run.",
        formatter_class=RawDescriptionDefaultsHelpFormatter,
        epilog=f"methods for {benchmark}: " + ", ".join(list_methods(benchmark)),
    )
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--method", help="a method preset name, e.g. plain or oltr")
    group.add_argument("--config", help="a YAML config file")
    p.add_argument("--benchmark", default=benchmark,
                   help=f"preset family ({', '.join(list_benchmarks())})")
    p.add_argument("--data", required=True, help="a curated benchmark directory")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--resume", action="store_true",
                   help="continue a run oltr wrote into --out from its last checkpoint (a fresh "
                        "--out starts a new run)")
    p.add_argument("--stage", action="append", metavar="NAME",
                   help="train only this stage (repeatable), e.g. --stage stage2 of a run whose "
                        "stage 1 is done; default: every stage")
    p.add_argument("--evaluate", action="store_true", help="evaluate (open set) when done")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is off anyway when the output is not a terminal)")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="write TensorBoard scalars (losses, learning rate, val accuracies per "
                        "shot group) to DIR; needs the tensorboard package")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable images (counted, reported) instead of stopping; the "
                        "same as data.skip_bad_images=true")
    p.add_argument("--image-root", dest="image_root",
                   help="the folder the split files' image paths are relative to (published "
                        "ImageNet-LT / Places-LT lists: the ImageNet / Places365 folder); the "
                        "same as data.image_root=DIR (saved as an absolute path)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=run)
    return p


def benchmark_mismatch(data: str, benchmark: str) -> str | None:
    """A warning when ``data`` holds a paper benchmark's published lists but the presets come
    from another family (forgetting ``--benchmark`` trains 28-px grey presets on them)."""
    folder = Path(data).expanduser()
    if not folder.is_dir():
        return None
    for prefix, family in PUBLISHED_LISTS.items():
        if family != benchmark and (folder / f"{prefix}train.txt").is_file():
            return (f"{folder} holds {prefix}train.txt, but the presets are --benchmark "
                    f"{benchmark}'s; for the paper's protocol use --benchmark {family}")
    return None


def run(args: argparse.Namespace) -> int:
    """Train the run; print each stage's result (rank 0 only under torchrun)."""
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    if args.skip_bad_images:
        overrides.append("data.skip_bad_images=true")
    if args.image_root is not None:
        overrides.append(f"data.image_root={os.path.abspath(os.path.expanduser(args.image_root))}")
    config = load_config(args.method, config_file=args.config, benchmark=args.benchmark,
                         overrides=overrides)
    mismatch = benchmark_mismatch(args.data, args.benchmark) if args.method else None
    if mismatch:
        print(f"oltr train: warning: {mismatch}", file=sys.stderr)
    started = time.perf_counter()
    results = train_run(config, args.data, args.out, resume=args.resume,
                        progress=not args.no_progress, stages=args.stage,
                        tensorboard=args.tensorboard)

    if launched_by_torchrun():
        shutdown_runtime(init_runtime(config["device"]))
        if int(os.environ.get("RANK", "0")) != 0:
            return 0  # rank 0 reports (and evaluates)
    for result in results:
        if result.best_epoch < 0:  # train.epochs: 0, a stage that only initialises
            print(f"stage {result.stage_dir.name}: 0 epochs (train.epochs: 0): saved as "
                  f"initialised, nothing trained ({result.seconds:.0f} s)")
        else:
            print(f"stage {result.stage_dir.name}: best val accuracy "
                  f"{result.best_val_accuracy:.4f} at epoch {result.best_epoch} "
                  f"({result.seconds:.0f} s)")
        if any(result.skipped_images.values()):
            per_split = ", ".join(f"{k} {v}" for k, v in result.skipped_images.items())
            print(f"stage {result.stage_dir.name}: skipped "
                  f"{sum(result.skipped_images.values())} unreadable images ({per_split})")
    print(f"trained {args.out} in {time.perf_counter() - started:.0f} s")
    if args.evaluate:
        return evaluate_and_print(args.out, args.data, open_set=True,
                                  output=RunDir(args.out).report_path)
    return 0


def interrupted_hint(args: argparse.Namespace) -> str:
    """Whether a checkpoint was kept to ``--resume`` from."""
    if RunDir(args.out).has_checkpoint():
        return "rerun it with --resume to continue from the last checkpoint"
    return "no epoch had finished, nothing was kept; run the command again"
