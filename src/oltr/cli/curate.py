"""``oltr curate``: turn a labelled source into an open long-tailed benchmark
(:func:`oltr.data.curate`; ``given:DIR``: :func:`oltr.data.given.curate_given`).

Every setting defaults to :func:`oltr.data.curate`'s own default, except the head and tail
counts of a fixed-count profile, which ``curate`` requires and the command takes from
:data:`oltr.data.curation.DEFAULT_MAX_COUNT` / ``DEFAULT_MIN_COUNT`` (ImageNet-LT's 1280 → 5;
``--ratio`` alone drops the tail count). ``--protocol NAME`` starts from the settings written
down in ``configs/NAME/protocol.yaml``; options given override them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from oltr.cli.common import DefaultsHelpFormatter, default_of
from oltr.config import CONFIG_DIR, DEFAULT_BENCHMARK, list_benchmarks, read_yaml
from oltr.data import parse_source
from oltr.data.curation import DEFAULT_MAX_COUNT, DEFAULT_MIN_COUNT, curate
from oltr.data.given import curate_given
from oltr.errors import InputError
from oltr.io import read_text

NAME = "curate"

#: The curation settings the command passes to :func:`oltr.data.curate` (its options but the
#: source, the output and the switches).
SETTINGS = ("seed", "profile", "alpha", "ratio", "max_count", "min_count", "known", "open",
            "val_per_class", "test_per_class", "open_per_class", "val_open",
            "val_open_per_class", "reference_count", "class_order")

#: Settings of the fixed-count profiles that the proportional profile does not use.
FIXED_COUNT_SETTINGS = ("max_count", "min_count", "alpha", "ratio")

#: The settings ``oltr curate given:DIR`` uses; any other one is an error.
GIVEN_SETTINGS = ("seed", "val_per_class")

NO_OPEN_CLASSES_NOTICE = (
    "oltr curate: note: neither --known/--open nor --protocol given: every class of the source "
    "is known and none is open, so the benchmark has no open split (pass --known N or --open N "
    "to hold classes out as open)")


def curation_defaults() -> dict[str, Any]:
    """What the command curates with where neither an option nor a protocol says otherwise:
    :func:`oltr.data.curate`'s defaults, and :data:`DEFAULT_MAX_COUNT` /
    :data:`DEFAULT_MIN_COUNT` for the counts it has none for."""
    defaults = {key: default_of(curate, key) for key in SETTINGS}
    return defaults | {"max_count": DEFAULT_MAX_COUNT, "min_count": DEFAULT_MIN_COUNT}


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


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``oltr curate`` to the ``oltr`` command's sub-parsers."""
    p = subparsers.add_parser(
        NAME, help="turn a labelled source into an open long-tailed benchmark",
        description="Choose known and open classes (seeded), draw per-class train counts from a "
                    "profile, hold out balanced val/test splits, and write split files "
                    "(`path label`, open label -1) + manifest.json. Same arguments → same bytes. "
                    "Without --known, --open and --protocol every class is known and none is "
                    "open (no open split; a note on stderr says so).",
        formatter_class=DefaultsHelpFormatter,
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
    _add_count_options(p, curation_defaults())
    _add_split_options(p, curation_defaults())
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
    p.set_defaults(func=run)
    return p


def _add_count_options(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """The seed, the profile and its train counts. Their argparse default is None (an option
    given overrides the protocol's setting); the help names :func:`curation_defaults`'."""
    p.add_argument("--seed", type=int, help=f"(default: {defaults['seed']})")
    p.add_argument("--profile", choices=["pareto", "exp", "proportional"],
                   help="per-class train counts: pareto (ImageNet-LT: --alpha 6, 1280 → 5), "
                        "exp (CIFAR-LT: --ratio 100) or proportional (MS1M-LT: each image of "
                        "a class of n images kept with probability n / --reference-count); "
                        f"default {defaults['profile']}")
    p.add_argument("--alpha", type=float, help=f"Pareto power (default {defaults['alpha']:g})")
    p.add_argument("--ratio", type=float, help="imbalance ratio max/min (exp)")
    p.add_argument("--reference-count", type=int, dest="reference_count",
                   help="proportional: keep probability min(1, n / N) (default: N = the "
                        "largest class's image count)")
    p.add_argument("--max-count", type=int, dest="max_count",
                   help=f"train images of the head class (default: {defaults['max_count']})")
    p.add_argument("--min-count", type=int, dest="min_count",
                   help=f"train images of the tail class (default: {defaults['min_count']}; "
                        "none with --ratio)")
    p.add_argument("--class-order", dest="class_order", metavar="size|FILE",
                   help="which class gets which rank: size (most images first, ties by seed; "
                        "always fits when any order does) or a file of class names, head "
                        "first (default: drawn by seed)")


def _add_split_options(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """Known and open classes and the images per class of each split (argparse default None,
    as :func:`_add_count_options`)."""
    p.add_argument("--known", help="number of known classes (chosen by seed) or a comma list "
                                   "(default: all but --open; with neither, every class is known "
                                   "and there are no open classes)")
    p.add_argument("--open", help="number of open classes or a comma list (default: the rest)")
    p.add_argument("--val-per-class", type=int, dest="val_per_class",
                   help=f"default {defaults['val_per_class']}")
    p.add_argument("--test-per-class", type=int, dest="test_per_class")
    p.add_argument("--open-per-class", type=int, dest="open_per_class")
    p.add_argument("--val-open", dest="val_open",
                   help="validation open classes: a number (drawn by seed) or a comma list of "
                        "classes, disjoint from the known and the test open classes; their "
                        "images form val_open.txt, on which open-set choices are selected "
                        f"(default {defaults['val_open']})")
    p.add_argument("--val-open-per-class", type=int, dest="val_open_per_class",
                   help="images per validation open class (default: --val-per-class)")


def run(args: argparse.Namespace) -> int:
    """Curate ``args.source`` into ``args.out``; print what was written."""
    if args.source.startswith("given:"):
        return _curate_given(args)
    settings = _settings(args)
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


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword settings for :func:`oltr.data.curate`: :func:`curation_defaults`, then the
    protocol's, then the options given (``--ratio`` without ``--min-count`` drops the tail
    count); checked against the profile, class lists parsed."""
    settings = curation_defaults()
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
    for key in ("known", "open", "val_open"):
        if isinstance(settings[key], str):
            settings[key] = _names_or_count(settings[key])
    return settings


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


def _curate_given(args: argparse.Namespace) -> int:
    """``oltr curate given:DIR``: published train/test lists read as they are, val drawn from
    the images they leave unused (SUN-LT; `oltr.data.given`). Seed and images per val class
    default as for every other source (:func:`curation_defaults`)."""
    defaults = curation_defaults()
    settings: dict[str, Any] = {key: defaults[key] for key in GIVEN_SETTINGS}
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


def interrupted_hint(args: argparse.Namespace) -> str:
    """What an interrupted curation left: nothing (it writes into a staging folder)."""
    return "nothing was written; run the command again"
