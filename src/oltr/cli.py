"""``oltr`` command line: curate, train, evaluate, predict.

Every command exits with status 2 and a one-line message naming the bad file, line or value when
its input is wrong (``oltr.errors.InputError``); ``--debug`` shows the full traceback instead.
Ctrl-C (SIGINT), SIGTERM and SIGHUP all take the same way out: the command's clean-up runs
(no partial output is left) and it exits with 128 + the signal number and one line saying what
was kept.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oltr import __version__
from oltr.config import (
    COMPARISON_DETECTORS,
    COMPARISON_METHODS,
    CONFIG_DIR,
    DEFAULT_BENCHMARK,
    list_benchmarks,
    list_methods,
    load_config,
    read_yaml,
)
from oltr.detectors import list_detectors
from oltr.errors import InputError, OltrError, one_line
from oltr.io import read_text

EXAMPLES = """\
examples:
  oltr curate fashion-mnist --out data/fmnist-lt --protocol fmnist_lt
  oltr train --method plain --data data/fmnist-lt --out runs/plain --seed 0
  oltr train --method oltr --data data/fmnist-lt --out runs/oltr stage2.train.epochs=4
  oltr evaluate runs/plain --data data/fmnist-lt --open --output runs/plain/report.json
  oltr predict runs/oltr image1.png image2.png
  oltr identify runs/faces --probes facescrub.txt --distractors megaface/ --attributes gender.tsv
"""


# --------------------------------------------------------------------------- curate
def _names_or_count(text: str | None) -> int | list[str] | None:
    """``--known 8`` → 8; ``--known cat,dog`` → ["cat", "dog"]."""
    if text is None:
        return None
    if text.strip().isdigit():
        return int(text)
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise InputError("expected a number of classes or a comma-separated list of names",
                         value=text)
    return names


def protocol_defaults(name: str) -> dict[str, Any]:
    """The curation arguments written down for a benchmark (``configs/<name>/protocol.yaml``)."""
    path = CONFIG_DIR / name / "protocol.yaml"
    if not path.exists():
        available = [b for b in list_benchmarks() if (CONFIG_DIR / b / "protocol.yaml").exists()]
        raise InputError(f"no curation protocol named '{name}' (available: {', '.join(available)})")
    settings = read_yaml(path, "curation protocol").get("curate")
    if not isinstance(settings, dict):
        raise InputError("a curation protocol needs a 'curate:' mapping", path=path)
    return settings


NO_OPEN_CLASSES_NOTICE = (
    "oltr curate: note: neither --known/--open nor --protocol given: every class of the source "
    "is known and none is open, so the benchmark has no open split (pass --known N or --open N "
    "to hold classes out as open)")


#: Settings of the fixed-count profiles that the proportional profile does not use.
FIXED_COUNT_SETTINGS = ("max_count", "min_count", "alpha", "ratio")


def cmd_curate(args: argparse.Namespace) -> int:
    from oltr.data import curate, parse_source

    if args.source.startswith("given:"):
        return _curate_given(args)
    settings: dict[str, Any] = {
        "seed": 0, "profile": "pareto", "alpha": 6.0, "ratio": None, "max_count": 1280,
        "min_count": 5, "known": None, "open": None, "val_per_class": 20,
        "test_per_class": None, "open_per_class": None, "val_open": 0,
        "val_open_per_class": None, "reference_count": None, "class_order": None,
    }
    if args.protocol:
        settings.update(protocol_defaults(args.protocol))
    given = {key: getattr(args, key) for key in settings if getattr(args, key) is not None}
    if "ratio" in given and "min_count" not in given:
        settings["min_count"] = None
    settings.update(given)
    if settings["profile"] == "proportional":
        named = [key for key in FIXED_COUNT_SETTINGS if key in given]
        if named:
            raise InputError(f"--{named[0].replace('_', '-')} does not apply to the "
                             "proportional profile (each class keeps a random share of its "
                             "images; --reference-count sets the share)", value=given[named[0]])
        for key in FIXED_COUNT_SETTINGS:
            settings.pop(key)
    if isinstance(settings["class_order"], str) and settings["class_order"] != "size":
        settings["class_order"] = _class_order_file(settings["class_order"])
    settings["known"] = _names_or_count(settings["known"]) if isinstance(
        settings["known"], str) else settings["known"]
    settings["open"] = _names_or_count(settings["open"]) if isinstance(
        settings["open"], str) else settings["open"]
    settings["val_open"] = _names_or_count(settings["val_open"]) if isinstance(
        settings["val_open"], str) else settings["val_open"]
    source = parse_source(args.source, image_root=args.image_root,
                          allow_outside_root=args.allow_outside_root)
    started = time.perf_counter()
    manifest = curate(source, args.out, force=args.force,
                      skip_bad_images=args.skip_bad_images, **settings)
    if settings["known"] is None and settings["open"] is None and not args.protocol:
        print(NO_OPEN_CLASSES_NOTICE, file=sys.stderr)
    counts = manifest["counts"]
    print(f"wrote {args.out}: {len(manifest['known_classes'])} known classes "
          f"({sum(counts['train'])} train, {sum(counts['val'])} val, {sum(counts['test'])} test), "
          f"{len(manifest['open_classes'])} open classes ({counts['open']} open test images)"
          + (f", {len(manifest['val_open_classes'])} validation open classes "
             f"({counts['val_open']} val_open images)" if manifest.get("val_open_classes") else "")
          + (f"; {len(manifest['dropped_classes'])} classes kept no image and were dropped"
             if manifest.get("dropped_classes") else "")
          + (f"; {len(manifest['skipped_images'])} unreadable images left out (listed in "
             "manifest.json, skipped_images)" if manifest.get("skipped_images") else "")
          + " "
          f"in {time.perf_counter() - started:.1f} s")
    shown = counts["train"] if len(counts["train"]) <= 50 else (
        f"{counts['train'][:10]} … {counts['train'][-10:]}")
    print(f"train images per class (label 0 = head): {shown}")
    return 0


def _class_order_file(path_text: str) -> list[str]:
    """Class names, head first, one per line (blank lines and ``#`` comments skipped)."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise InputError("--class-order must be 'size' or a file of class names (one per line, "
                         "head first)", path=path)
    names = [line.strip() for line in read_text(path, "class order").splitlines()]
    names = [name for name in names if name and not name.startswith("#")]
    if not names:
        raise InputError("the class-order file names no class", path=path)
    return names


#: The settings ``oltr curate given:DIR`` uses; any other one is an error.
GIVEN_SETTINGS = ("seed", "val_per_class")


def _curate_given(args: argparse.Namespace) -> int:
    """``oltr curate given:DIR``: published train/test lists read as they are, val drawn from
    the images they leave unused (SUN-LT; `oltr.data.given`)."""
    from oltr.data.given import curate_given

    settings: dict[str, Any] = {"seed": 0, "val_per_class": 20}
    if args.protocol:
        settings.update(protocol_defaults(args.protocol))
    for key in ("profile", "alpha", "ratio", "max_count", "min_count", "known", "open",
                "test_per_class", "open_per_class", "val_open", "val_open_per_class",
                "reference_count", "class_order", *settings):
        value = getattr(args, key, None)
        if key not in GIVEN_SETTINGS and (value is not None or key in settings):
            raise InputError(f"'{key}' does not apply to given splits (given:DIR reads the "
                             "train and test lists as they are; only --seed and "
                             "--val-per-class apply)", value=settings.get(key, value))
        if value is not None:
            settings[key] = value
    if args.skip_bad_images:
        raise InputError("--skip-bad-images does not apply to given splits (the published "
                         "lists are read as they are); replace or remove the unreadable files")
    directory = args.source.partition(":")[2]
    if not directory:
        raise InputError("'given:' needs a path, as in 'given:DIR'", value=args.source)
    started = time.perf_counter()
    manifest = curate_given(directory, args.image_root, args.out,
                            val_per_class=settings["val_per_class"], seed=settings["seed"],
                            force=args.force)
    counts = manifest["counts"]
    short = sum(1 for n in counts["val"] if n < settings["val_per_class"])
    print(f"wrote {args.out}: {len(manifest['known_classes'])} classes ({sum(counts['train'])} "
          f"train, {sum(counts['val'])} val, {sum(counts['test'])} test) from the given lists "
          f"({manifest['profile']['form']}); val: {manifest['profile']['val']}"
          + (f" ({short} classes had fewer)" if short else "")
          + f" in {time.perf_counter() - started:.1f} s")
    return 0


# --------------------------------------------------------------------------- train
#: Published split-file prefixes and the preset family made for them.
PUBLISHED_LISTS = {"ImageNet_LT_": "imagenet_lt", "Places_LT_": "places_lt"}


def _benchmark_mismatch(data: str, benchmark: str) -> str | None:
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


def cmd_train(args: argparse.Namespace) -> int:
    from oltr.pipeline import train_run

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
    mismatch = _benchmark_mismatch(args.data, args.benchmark) if args.method else None
    if mismatch:
        print(f"oltr train: warning: {mismatch}", file=sys.stderr)
    started = time.perf_counter()
    results = train_run(config, args.data, args.out, resume=args.resume,
                        progress=not args.no_progress, stages=args.stage,
                        tensorboard=args.tensorboard)
    from oltr.runtime import init_runtime, launched_by_torchrun, shutdown_runtime

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
        return _evaluate(args.out, args.data, open_set=True, output=Path(args.out) / "report.json")
    return 0


# --------------------------------------------------------------------------- evaluate
def _evaluate(run: str | Path, data: str | Path, **kwargs: Any) -> int:
    from oltr.evaluate import evaluate_run, format_report

    report = evaluate_run(run, data, **kwargs)
    print(format_report(report))
    if kwargs.get("output"):
        print(f"report written to {kwargs['output']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    output = args.output or Path(args.run) / "report.json"  # checked before evaluating
    return _evaluate(args.run, args.data, open_set=args.open, open_score=args.open_score,
                     threshold=args.threshold, accept_rate=args.accept_rate, device=args.device,
                     logit_adjustment=args.logit_adjustment, select=args.select,
                     tau_normalization=args.tau_normalization, detectors=args.detectors,
                     detector_options=_odin_options(args),
                     open_sets=_named_paths(args.open_sets),
                     output=output, skip_bad_images=args.skip_bad_images or None,
                     strict_shots=None if args.shot_rule is None else args.shot_rule == "paper",
                     image_root=args.image_root)


def _named_paths(items: list[str] | None) -> dict[str, str] | None:
    """``NAME=PATH`` arguments (or a bare PATH, named by its last component) as a dict."""
    if not items:
        return None
    named: dict[str, str] = {}
    for item in items:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        if not path.strip():
            raise InputError("--open-set needs a path (NAME=PATH: a folder of images or a split "
                             "file)", value=item)
        name = name or Path(path).stem or Path(path).name
        if name in named:
            raise InputError(f"open set named twice: {name!r} (use NAME=PATH)", value=item)
        named[name] = path
    return named


def _odin_options(args: argparse.Namespace) -> dict[str, dict[str, float]] | None:
    if args.odin_epsilon is None and args.odin_temperature is None:
        return None
    options = {"temperature": 1000.0 if args.odin_temperature is None else args.odin_temperature}
    if args.odin_epsilon is not None:
        options["epsilon"] = args.odin_epsilon
    return {"odin": options}


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


# --------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from oltr.bench import run_bench

    try:
        seeds = [int(seed) for seed in _comma_list(args.seeds)]
    except ValueError:
        raise InputError("--seeds must be comma-separated integers", value=args.seeds) from None
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else None)
    results = run_bench(
        args.data if len(args.data) > 1 else args.data[0], args.out,
        methods=_comma_list(args.methods),
        detectors=_comma_list(args.detectors), seeds=seeds, epochs=epochs,
        overrides=args.overrides, benchmark=args.benchmark,
        open_sets=_named_paths(args.open_sets), quick=args.quick,
        detector_options=_odin_options(args), progress=not args.no_progress,
    )
    print(read_text(Path(args.out) / "results.md", "bench results"))
    print(f"bench finished in {results['wall_seconds'] / 60:.1f} min; tables in "
          f"{Path(args.out) / 'results.md'}, every figure in {Path(args.out) / 'results.json'}")
    if results["failures"]:
        print(f"oltr bench: {len(results['failures'])} run(s) failed (listed under 'Failed "
              "runs'); the others are in the tables", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- predict
def cmd_predict(args: argparse.Namespace) -> int:
    from oltr.predict import Predictor, expand_inputs

    if args.top_k < 1:
        raise InputError("--top-k must be >= 1", value=args.top_k)
    if args.batch_size < 1:
        raise InputError("--batch-size must be >= 1", value=args.batch_size)
    if args.threshold is not None and args.open_threshold is not None:
        raise InputError("give --threshold (an msp probability) or --open-threshold (in the "
                         "open score's units), not both")
    predictor = Predictor.from_run(args.run, device=args.device, threshold=args.open_threshold)
    if args.threshold is not None:
        predictor.use_msp_probability(args.threshold)
    rows = [row.as_dict() for row in predictor.predict(expand_inputs(args.images),
                                                       batch_size=args.batch_size,
                                                       top_k=args.top_k)]
    failed = [row for row in rows if row["error"] is not None]
    for row in failed:
        print(f"oltr predict: skipped: {row['error']}", file=sys.stderr)
    print_predictions(rows, args.format, sys.stdout)
    return 1 if failed else 0


def print_predictions(rows: list[dict[str, Any]], form: str, stream: Any) -> None:
    """Predictions as an aligned table, JSON lines, or CSV (``top_k`` as ``name:p;…``)."""
    def top(row: dict[str, Any]) -> str:
        return ";".join(f"{item['label_name']}:{item['probability']:.4f}"
                        for item in row["top_k"] or [])

    if form == "jsonl":
        for row in rows:
            stream.write(json.dumps(row) + "\n")
        return
    columns = ("path", "label_name", "label", "confidence", "open_score", "threshold",
               "closed_set_label", "top_k", "error")
    if form == "csv":
        import csv

        writer = csv.writer(stream)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([top(row) if key == "top_k" else "" if row[key] is None else row[key]
                             for key in columns])
        return
    ok = [row for row in rows if row["error"] is None]
    if not ok:
        return
    width = max(len(str(row["path"])) for row in ok)
    stream.write(f"{'image':<{width}}  {'answer':<14}  confidence  open score  top classes\n")
    for row in ok:
        stream.write(f"{row['path']:<{width}}  {row['label_name']:<14}  {row['confidence']:10.3f}"
                     f"  {row['open_score']:10.4g}  {top(row).replace(';', ', ')}\n")


# --------------------------------------------------------------------------- parser
class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append ``(default: X)`` only for a real default (not None, not a flag's False) that the
    help text does not state already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oltr",
        description="Open long-tailed recognition (Liu et al., CVPR 2019): curate a benchmark, "
                    "train, evaluate, predict.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--version", action="version", version=f"oltr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "curate", help="turn a labelled source into an open long-tailed benchmark",
        description="Choose known and open classes (seeded), draw per-class train counts from a "
                    "profile, hold out balanced val/test splits, and write split files "
                    "(`path label`, open label -1) + manifest.json. Same arguments → same bytes. "
                    "Without --known, --open and --protocol every class is known and none is "
                    "open (no open split; a note on stderr says so).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("source", help="fashion-mnist[:ROOT] | folder:PATH (one sub-folder per class) "
                                  "| trainval:ROOT (ROOT/train/<class>/, ROOT/val/<class>/ as "
                                  "the test split: ImageNet, Places365-standard) | "
                                  "splits:PATH (a split file or a folder with *train*.txt) | "
                                  "given:DIR (published train/test lists read as they are, "
                                  "val drawn from unused images: SUN-LT)")
    p.add_argument("--out", required=True,
                   help="output directory: absent or empty; --force replaces only a benchmark "
                        "oltr curated that holds nothing oltr did not write; never the source, "
                        "a folder around it, or the working directory")
    p.add_argument("--protocol", help=f"start from a written-down protocol, e.g. "
                                      f"{DEFAULT_BENCHMARK} (configs/<name>/protocol.yaml)")
    p.add_argument("--seed", type=int)
    p.add_argument("--profile", choices=["pareto", "exp", "proportional"],
                   help="per-class train counts: pareto (ImageNet-LT: --alpha 6, 1280 → 5), "
                        "exp (CIFAR-LT: --ratio 100) or proportional (MS1M-LT: each image of "
                        "a class of n images kept with probability n / --reference-count); "
                        "default pareto")
    p.add_argument("--alpha", type=float, help="Pareto power (default 6)")
    p.add_argument("--ratio", type=float, help="imbalance ratio max/min (exp)")
    p.add_argument("--reference-count", type=int, dest="reference_count",
                   help="proportional: keep probability min(1, n / N) (default: N = the "
                        "largest class's image count)")
    p.add_argument("--max-count", type=int, dest="max_count", help="train images of the head class")
    p.add_argument("--min-count", type=int, dest="min_count", help="train images of the tail class")
    p.add_argument("--class-order", dest="class_order", metavar="size|FILE",
                   help="which class gets which rank: size (most images first, ties by seed; "
                        "always fits when any order does) or a file of class names, head "
                        "first (default: drawn by seed)")
    p.add_argument("--known", help="number of known classes (chosen by seed) or a comma list "
                                   "(default: all but --open; with neither, every class is known "
                                   "and there are no open classes)")
    p.add_argument("--open", help="number of open classes or a comma list (default: the rest)")
    p.add_argument("--val-per-class", type=int, dest="val_per_class", help="default 20")
    p.add_argument("--test-per-class", type=int, dest="test_per_class")
    p.add_argument("--open-per-class", type=int, dest="open_per_class")
    p.add_argument("--val-open", dest="val_open",
                   help="validation open classes: a number (drawn by seed) or a comma list of "
                        "classes, disjoint from the known and the test open classes; their "
                        "images form val_open.txt, on which open-set choices are selected "
                        "(default 0)")
    p.add_argument("--val-open-per-class", type=int, dest="val_open_per_class",
                   help="images per validation open class (default: --val-per-class)")
    p.add_argument("--image-root", help="image root of a splits: or given: source (default: "
                                        "the folder of its split files)")
    p.add_argument("--skip-bad-images", action="store_true", dest="skip_bad_images",
                   help="decode every image of the source first and leave the unreadable ones "
                        "out (listed in manifest.json); default: an unreadable image stops "
                        "curation, naming it")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="let a splits: source list absolute paths, paths with '..' or paths "
                        "that lead out of the image root through a symbolic link, and a "
                        "folder: source follow links out of its folder")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_curate)

    p = sub.add_parser(
        "train", help="train a method (all its stages)",
        description="Train a method preset (configs/<benchmark>/<method>.yaml) or a config file. "
                    "Trailing key=value arguments override config keys, e.g. train.epochs=3 "
                    "(every stage that does not set it itself; a warning names the others) or "
                    "stage2.train.lr=0.05 (one stage). A checkpoint is written every epoch; --resume "
                    "continues a killed run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods for fmnist_lt: " + ", ".join(list_methods(DEFAULT_BENCHMARK)),
    )
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--method", help="a method preset name, e.g. plain or oltr")
    group.add_argument("--config", help="a YAML config file")
    p.add_argument("--benchmark", default=DEFAULT_BENCHMARK,
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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate", help="closed- and open-set evaluation → JSON report",
        description="Evaluate a run's selected weights on the test (and open) split; print a "
                    "table and write the JSON report (schema: docs/report.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run", help="run directory written by `oltr train`")
    p.add_argument("--data", required=True, help="the curated benchmark directory")
    p.add_argument("--open", action="store_true", help="also evaluate the open-set setting")
    p.add_argument("--open-score", dest="open_score",
                   help="an open-set detector (see --detector) or auto (chosen on val_open); "
                        "default: the run's decision rule")
    p.add_argument("--select", choices=["balanced_accuracy", "f_measure", "auroc"],
                   help="the val objective every auto choice maximises (f_measure and auroc "
                        "need a val_open split); default: the run's")
    p.add_argument("--threshold", type=float,
                   help="probability threshold for msp (paper: 0.1); default: the run's rule "
                        "(calibrated on val)")
    p.add_argument("--accept-rate", type=float, dest="accept_rate",
                   help="calibrated threshold accepts this fraction of known val images (0.95)")
    p.add_argument("--logit-adjustment", type=lambda v: v if v == "auto" else float(v),
                   dest="logit_adjustment",
                   help="τ: decide on logits + τ·log(train class frequency) (default: config)")
    p.add_argument("--tau-normalization", type=lambda v: v if v == "auto" else float(v),
                   dest="tau_normalization",
                   help="τ-normalise a linear classifier: w/‖w‖^τ, or auto (best val accuracy) "
                        "(default: config)")
    p.add_argument("--detector", action="append", dest="detectors", metavar="NAME",
                   help="also score with this open-set detector (repeatable): "
                        + ", ".join(list_detectors()))
    p.add_argument("--open-set", action="append", dest="open_sets", metavar="NAME=PATH",
                   help="an external open set (a folder of images or a split file), evaluated "
                        "against the known test images (repeatable; also on a benchmark "
                        "without open classes). A split file's paths are relative to its own "
                        "folder; absolute paths and '..' are allowed there, since you name the "
                        "file yourself")
    p.add_argument("--odin-temperature", type=float, dest="odin_temperature",
                   help="ODIN's temperature T (default 1000)")
    p.add_argument("--odin-epsilon", type=float, dest="odin_epsilon",
                   help="ODIN's input perturbation ε in normalised-image units (default 0: "
                        "temperature scaling only; > 0 costs a backward pass per image)")
    p.add_argument("--shot-rule", dest="shot_rule", choices=["paper", "original"],
                   help="shot groups: paper (many > 100, few < 20 train images) or original "
                        "(the original code's >= 100 / <= 20, behind its published numbers); "
                        "default: the run's eval.strict_shots. The report's shot_rule says "
                        "which was used")
    p.add_argument("--device", default="auto")
    p.add_argument("--output", help="report path (default RUN/report.json)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable images (counted in the report) instead of stopping "
                        "(default: the run's data.skip_bad_images)")
    p.add_argument("--image-root", help="where the split files' image paths are looked up, "
                   "when the images moved since training (default: the run's data.image_root, "
                   "else the benchmark's own)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict", help="classify new images, or answer 'unknown'",
        description="Predict the class of images with a trained run and its decision rule "
                    "(fitted on val when it was trained): an image whose open score exceeds "
                    "the threshold is answered 'unknown'. Folders are searched recursively; "
                    "an unreadable file is reported on stderr and the others go on (exit "
                    "status 1 then).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run", help="run directory")
    p.add_argument("images", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--format", choices=["table", "jsonl", "csv"], default="table",
                   help="output format")
    p.add_argument("--threshold", type=float,
                   help="as in `oltr evaluate`: a probability for the msp open score — 'unknown' "
                        "when the top probability is below it (paper: 0.1); an error for a "
                        "rule with another open score (default: the run's decision rule)")
    p.add_argument("--open-threshold", type=float, dest="open_threshold",
                   help="the threshold in the rule's open-score units: 'unknown' when the open "
                        "score exceeds it (default: the run's decision rule)")
    p.add_argument("--top-k", type=int, default=3, dest="top_k", help="classes listed per image")
    p.add_argument("--batch-size", type=int, default=64, dest="batch_size")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "bench", help="compare methods × open-set detectors × seeds → Markdown + JSON tables",
        description="Train (or reuse) and evaluate every method preset for every seed on one "
                    "curated benchmark; write OUT/results.md (Tab. 3- and Tab. 2-style tables, "
                    "mean ± std over seeds) and OUT/results.json. Identical stages (the plain "
                    "stage 1 of two-stage methods) train once; a killed bench resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, action="append",
                   help="a curated benchmark directory; repeat it for the reporting protocol's "
                        "curations (--seeds then gives one training seed per benchmark)")
    p.add_argument("--out", required=True, help="bench directory (runs, stage cache, results)")
    p.add_argument("--methods", default=",".join(COMPARISON_METHODS),
                   help="comma-separated method presets")
    p.add_argument("--detectors", default=",".join(COMPARISON_DETECTORS),
                   help="comma-separated open-set detectors")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--epochs", type=int,
                   help="total epochs of every method (stages keep their shares); default: "
                        "each preset's own (30 on fmnist_lt), 2 with --quick")
    p.add_argument("--benchmark", default=DEFAULT_BENCHMARK,
                   help=f"preset family ({', '.join(list_benchmarks())})")
    p.add_argument("--open-set", action="append", dest="open_sets", metavar="NAME=PATH",
                   help="an external open set (folder or split file), repeatable")
    p.add_argument("--odin-temperature", type=float, dest="odin_temperature",
                   help="ODIN's temperature T (default 1000)")
    p.add_argument("--odin-epsilon", type=float, dest="odin_epsilon",
                   help="ODIN's input perturbation ε in normalised-image units (default 0: "
                        "temperature scaling only; > 0 costs a backward pass per image)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: width-8 networks, 3 steps per epoch, 2 epochs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides applied to every method")
    p.set_defaults(func=cmd_bench)

    from oltr.analysis import add_analysis_command

    add_analysis_command(sub)
    from oltr.evaluation.page import add_report_command
    from oltr.export import add_export_command
    from oltr.identify import add_identify_command

    add_report_command(sub)
    add_export_command(sub)
    add_identify_command(sub)
    for command in sub.choices.values():  # every command's help: real defaults only
        if issubclass(command.formatter_class, argparse.ArgumentDefaultsHelpFormatter):
            command.formatter_class = DefaultsHelpFormatter
    return parser


# --------------------------------------------------------------------------- signals
class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is so that every clean-up runs (as Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_interrupted(signum: int, _frame: Any) -> None:
    for number in TERMINATING_SIGNALS:  # a second signal must not cut the clean-up short
        signal.signal(number, signal.SIG_IGN)
    raise Interrupted(signum)


def _interrupted_hint(args: argparse.Namespace) -> str:
    """What an interrupted command kept and how to go on, in the command's own terms."""
    if args.command == "train":
        out = Path(args.out)
        if out.is_dir() and any(out.glob("*/checkpoint.pt")):
            return "rerun it with --resume to continue from the last checkpoint"
        return "no epoch had finished, nothing was kept; run the command again"
    if args.command == "curate":
        return "nothing was written; run the command again"
    if args.command in ("evaluate", "identify"):
        return "no report was written; run the command again"
    if args.command == "bench":
        return "finished stages and reports are kept; run the same command to continue"
    return "nothing was written"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after options (``--data D stage1.train.epochs=1``):
    # argparse gives a trailing positional list only the run of values before an option
    takes_overrides = hasattr(args, "overrides")
    unknown = [item for item in extra
               if not (takes_overrides and "=" in item and not item.startswith("-"))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    default_show = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], *rest: Any, **kwargs: Any) -> None:
        if issubclass(category, UserWarning):
            print(f"oltr {args.command}: warning: {one_line(str(message))}", file=sys.stderr)
        else:
            default_show(message, category, *rest, **kwargs)

    warnings.showwarning = show  # one line, as errors are: not Python's file:line + source
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {number: signal.signal(number, _raise_interrupted)
                    for number in TERMINATING_SIGNALS}
    try:
        return args.func(args)
    except OltrError as exc:
        if args.debug:
            raise
        print(f"oltr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine's, not the input's: a full disk, a lost mount
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"oltr {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        number = getattr(exc, "signum", signal.SIGINT)
        try:  # after SIGHUP the terminal may be gone
            print(f"oltr {args.command}: interrupted ({signal.Signals(number).name}); "
                  f"{_interrupted_hint(args)}", file=sys.stderr)
        except OSError:
            pass
        return 128 + number
    finally:
        warnings.showwarning = default_show
        for number, handler in handlers.items():
            signal.signal(number, handler)


if __name__ == "__main__":
    sys.exit(main())
