"""Curation: turn a labelled source into an open long-tailed benchmark (docs/protocol.md).

Known and open classes are drawn with a seeded ``numpy.random.Generator(PCG64(seed))``, each
known class gets a seeded rank in the profile (`oltr.data.profiles.class_counts`), and its
train images are sampled without replacement; a balanced val split is held out of the unused
train images, the test split is balanced, and the open classes' test images form the open
split (label -1). Output (ImageNet-LT format plus a manifest)::

    out_dir/train.txt val.txt test.txt [open.txt open_classes.txt] [val_open.txt]
            classes.txt manifest.json [images/...]

``val_open.txt`` (label -1) holds images of the *validation open classes* (``val_open``): classes
disjoint from both the known and the test open classes, reserved so that open-set choices
(the open score, its threshold, OLTR's open-set settings) can be selected on val without
seeing a test open class. Its images come from the source's train split.

``open_classes.txt`` says which open class each open image comes from (the paper's Fig. 8c
varies the number of open classes): one line per line of ``open.txt``, in the same order, in
the split-file format ``path k`` with ``k`` the index of the class in the manifest's
``open_classes`` list (an index, not the name: class names may contain spaces).

Everything is written to a temporary sibling directory that is renamed to ``out_dir`` at the
end, so a failed run leaves nothing behind; the same arguments give byte-identical files.
What may be replaced follows :mod:`oltr.ownership`: the output carries oltr's ``curate``
marker, ``--force`` replaces only a benchmark oltr curated (and nothing it did not write), and
the output is never the source, an ancestor of it, nor (``folder:``) inside it.
"""
from __future__ import annotations

import json
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from oltr.data.images import ImageError, check_images, find_bad_images
from oltr.data.profiles import PROPORTIONAL, class_counts, keep_probabilities
from oltr.data.sources import Source, parse_source
from oltr.data.splits import OPEN_LABEL, read_split_lines, sha256_file, write_split_file
from oltr.errors import InputError
from oltr.io import atomic_write_bytes, read_json_object
from oltr.ownership import (
    check_not_source,
    check_replaceable_benchmark,
    remove_owned_tree,
    remove_stale_staging,
    retired_path,
    staging_path,
    write_marker,
)
from oltr.pause import pause_point

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CLASSES_NAME = "classes.txt"
EXPORT_DIR = "images"
OPEN_CLASSES_NAME = "open_classes.txt"
DEFAULT_TEST_PER_CLASS = 50  # ImageNet-LT's 50 test images per class
MANIFEST_KEYS = (
    "format_version",
    "source",
    "image_root",
    "seed",
    "profile",
    "known_classes",
    "open_classes",
    "counts",
    "files",
)
#: The JSON type of every manifest key (the optional ones are checked when present).
MANIFEST_TYPES: dict[str, tuple[type, str]] = {
    "format_version": (int, "an integer"),
    "source": (str, "a string"),
    "image_root": (str, "a string (a folder path)"),
    "seed": (int, "an integer"),
    "profile": (dict, "an object"),
    "known_classes": (list, "a list of class names"),
    "open_classes": (list, "a list of class names"),
    "counts": (dict, "an object"),
    "files": (dict, "an object"),
    "val_per_class": (int, "an integer"),
    "test_per_class": (int, "an integer"),
    "open_per_class": (int, "an integer"),
}

ClassSelection = int | Sequence[str] | None


def _count_argument(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool):
        raise InputError(f"{name} must be an integer >= {minimum}", value=value)
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InputError(f"{name} must be an integer >= {minimum}", value=value) from None
    if number < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}", value=value)
    return number


def _named_classes(what: str, names: Sequence[str], index_of: dict[str, int]) -> list[int]:
    if isinstance(names, str):
        raise InputError(f"{what} classes: give a count or a list of class names", value=names)
    indices = []
    for name in names:
        if name not in index_of:
            raise InputError(f"{what} class is not a class of the source", value=name)
        if index_of[name] in indices:
            raise InputError(f"{what} class listed twice", value=name)
        indices.append(index_of[name])
    return indices


def _selection_names(what: str, selection: ClassSelection,
                     index_of: dict[str, int]) -> list[int] | None:
    """The class indices a selection names, or None for a count (or ``None``): drawn later."""
    if selection is None or not isinstance(selection, Sequence):
        return None
    return _named_classes(what, selection, index_of)


def _check_disjoint(class_names: Sequence[str], named: dict[str, list[int] | None]) -> None:
    """InputError naming a class that two of the named selections (known, open, val_open)
    both list."""
    for first, second in (("known", "open"), ("known", "val_open"), ("open", "val_open")):
        if named[first] is not None and named[second] is not None:
            overlap = sorted(set(named[first]) & set(named[second]))  # type: ignore[arg-type]
            if overlap:
                raise InputError(
                    f"a class cannot be both {first} and {second}",
                    value=class_names[overlap[0]],
                )


def _selection_count(what: str, selection: ClassSelection, named: list[int] | None, *,
                     minimum: int) -> int | None:
    """How many classes a count selection draws; None for ``None`` or a list of names."""
    if selection is None or named is not None:
        return None
    return _count_argument(what, selection, minimum=minimum)


def choose_classes(
    class_names: Sequence[str],
    known: ClassSelection,
    open_: ClassSelection,
    rng: np.random.Generator,
    val_open: ClassSelection = 0,
) -> tuple[list[int], list[int], list[int]]:
    """Known, open and validation-open class indices (each sorted), from counts or names.

    A count draws that many classes at random among those not named explicitly; ``None``
    means "all remaining classes" (known and open both ``None``: every class is known, none
    open). ``val_open`` (a count, default 0, or names) is drawn after the known classes and
    before the open ones, so with ``val_open=0`` the draw is the one of earlier versions.
    Raises InputError for an unknown or repeated name, a class in two selections, a count
    that is not an integer (known >= 1, open and val_open >= 0), more classes asked for than
    are left, or no known class left.
    """
    index_of = {name: index for index, name in enumerate(class_names)}
    known_list = _selection_names("known", known, index_of)
    open_list = _selection_names("open", open_, index_of)
    val_open_list = _selection_names("val_open", val_open, index_of)
    _check_disjoint(class_names, {"known": known_list, "open": open_list,
                                  "val_open": val_open_list})
    fixed = set(known_list or ()) | set(open_list or ()) | set(val_open_list or ())
    remaining = [index for index in range(len(class_names)) if index not in fixed]
    order = [int(index) for index in rng.permutation(np.array(remaining, dtype=np.int64))]
    known_count = _selection_count("known", known, known_list, minimum=1)
    open_count = _selection_count("open", open_, open_list, minimum=0)
    val_open_count = _selection_count("val_open", val_open, val_open_list, minimum=0) or 0
    wanted = (known_count or 0) + (open_count or 0) + val_open_count
    if wanted > len(remaining):
        raise InputError(
            f"asked for {wanted} randomly drawn known + open classes, "
            f"but only {len(remaining)} classes are left to draw from",
            value=wanted,
        )
    if known_list is None:
        if known_count is not None:
            known_list = order[:known_count]
            order = order[known_count:]
        elif open_count is not None:
            reserved = open_count + val_open_count
            known_list = order[reserved:]
            order = order[:reserved]
        else:
            known_list, order = order, []
    if val_open_list is None:
        if val_open_count > len(order):
            raise InputError(f"asked for {val_open_count} validation open classes, but only "
                             f"{len(order)} classes are left", value=val_open_count)
        val_open_list = order[:val_open_count]
        order = order[val_open_count:]
    if open_list is None:
        open_list = order[:open_count] if open_count is not None else order
    if not known_list:
        raise InputError("no known classes left", value=known)
    return sorted(known_list), sorted(open_list), sorted(val_open_list)


def _pick(rng: np.random.Generator, keys: list[str], count: int) -> tuple[list[str], list[str]]:
    """``count`` keys drawn without replacement (in source order), and the keys left over."""
    chosen = np.zeros(len(keys), dtype=bool)
    chosen[rng.choice(len(keys), size=count, replace=False)] = True
    return (
        [key for key, flag in zip(keys, chosen) if flag],
        [key for key, flag in zip(keys, chosen) if not flag],
    )


def _by_class(entries: list[tuple[str, int]], num_classes: int) -> list[list[str]]:
    pools: list[list[str]] = [[] for _ in range(num_classes)]
    for key, label in entries:
        pools[label].append(key)
    return pools


def _source_paths(source: Source) -> list[Path]:
    """The paths a source reads: its image root and the path named in its spec."""
    paths = [] if source.image_root is None else [source.image_root]
    kind, _, argument = source.name.partition(":")
    if argument and kind in ("folder", "trainval", "given", "splits", "fashion-mnist"):
        paths.append(Path(argument).expanduser())
    return paths


def _output_ready(out_dir: Path, force: bool, source: Source) -> None:
    """InputError unless ``out_dir`` is absent, empty, or may be replaced (``force`` and a
    benchmark oltr curated, see :mod:`oltr.ownership`); never the source or around it."""
    check_not_source(out_dir, _source_paths(source), what="output directory",
                     inside_forbidden=source.name.startswith(("folder:", "trainval:")),
                     working_directory=True)
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise InputError("output path exists and is not a directory", path=out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        check_replaceable_benchmark(out_dir, force=force)


def _install(staging: Path, out_dir: Path, force: bool, source: Source) -> None:
    """Rename the finished ``staging`` directory to ``out_dir`` (replacing it if ``force``)."""
    _output_ready(out_dir, force, source)
    if not out_dir.exists() or not any(out_dir.iterdir()):
        os.rename(staging, out_dir)  # onto an empty directory too (rename(2))
        return
    retired = retired_path(out_dir)
    os.rename(out_dir, retired)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(retired, out_dir)
        raise
    remove_owned_tree(retired, "curate")


def _json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, sort_keys=True, indent=2) + "\n").encode("utf-8")


#: The head and tail train counts ``oltr curate`` draws with a fixed-count profile when neither
#: they (nor ``--ratio``) nor a protocol are given: ImageNet-LT's (paper §4, Pareto α = 6,
#: 1280 → 5). :func:`curate` itself has no default for them: a fixed-count profile needs
#: ``max_count`` and one of ``min_count`` / ``ratio``, and a call without them is an error.
DEFAULT_MAX_COUNT = 1280
DEFAULT_MIN_COUNT = 5


def curate(
    source: Source | str,
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    known: ClassSelection = None,
    open: ClassSelection = None,
    val_open: ClassSelection = 0,
    profile: str = "pareto",
    max_count: int | None = None,
    min_count: int | None = None,
    alpha: float = 6.0,
    ratio: float | None = None,
    reference_count: int | None = None,
    class_order: str | Sequence[str] | None = None,
    val_per_class: int = 20,
    test_per_class: int | None = None,
    open_per_class: int | None = None,
    val_open_per_class: int | None = None,
    force: bool = False,
    verify_images: bool = True,
    skip_bad_images: bool = False,
) -> dict[str, Any]:
    """Curate an open long-tailed benchmark from ``source`` into ``out_dir``; return the manifest.

    (Over 80 lines for its 20 documented options; the body is about 47 lines of steps.)

    - ``known`` / ``open``: a count drawn at random (seeded) or a list of class names; ``None``
      means all classes not otherwise chosen (see `choose_classes`).
    - Train counts (``profile`` ``pareto`` or ``exp``): ``class_counts(profile, K,
      max_count=..., min_count=..., alpha=..., ratio=...)``; label 0 is the largest class.
      Which known class gets which rank (``class_order``): ``None`` drawn at random;
      ``"size"`` the classes with the most source train images first (ties drawn at random),
      the order that always fits when any does; or a list of class names, head first (every
      known class must be listed; others are ignored), e.g. ImageNet-LT's base classes of
      Hariharan & Girshick first, or Places-365-challenge's class sizes (paper App. D.1).
    - ``profile="proportional"`` (MS1M-LT, paper App. D.1): no fixed counts; every image of a
      known class is kept for train independently with probability ``p_i = min(1, n_i / Z)``,
      ``n_i`` the class's source images and ``Z = reference_count`` (default: the largest
      ``n_i``; `oltr.data.profiles.keep_probabilities`). A class that keeps no image is dropped
      (listed under ``dropped_classes`` in the manifest); the others are labelled by kept count,
      largest first (ties: source order). Val (``val_per_class``) and test (``test_per_class``,
      default 0: the face benchmark's test set is MegaFace, `oltr identify`) are drawn from the
      images not kept, as many as a class has left; the manifest's ``counts`` list them per
      class. ``max_count``, ``min_count``, ``alpha`` and ``ratio`` do not apply.
    - Test: from the source's own test split when it has one (``test_per_class`` defaults to
      the fewest test images of any known class), otherwise ``test_per_class`` images
      (default 50, as ImageNet-LT) are held out of each class before train sampling.
    - Val: ``val_per_class`` images per known class from its images not drawn for train
      (paper: 20).
    - Open: ``open_per_class`` (default ``test_per_class``) test / held-out images of each open
      class, or all of them if it has fewer, labelled -1.
    - Validation open (``val_open``: a count or names, default 0): classes disjoint from the
      known and the open ones whose ``val_open_per_class`` images (default ``val_per_class``,
      so val keeps the test split's open:known ratio when ``open_per_class`` equals
      ``test_per_class``) form ``val_open.txt`` (label -1), drawn from the source's train
      images of those classes.
    - ``verify_images``: fully decode each used file (file sources) with the loader training
      uses (`oltr.data.images.check_images`, a thread pool; JPEGs at reduced scale, every
      coefficient still decoded), so a missing, truncated or corrupt image, or one in a mode
      oltr cannot read, fails curation rather than training; the error names the first bad
      file and how many others there are.
    - ``skip_bad_images``: instead, decode *every* image of a file source first (train and
      test, used or not: a slower pass over the whole source) and leave the unreadable ones
      out before anything is drawn, so the benchmark is drawn from the good images only; the
      manifest lists each skipped image and why under ``skipped_images`` (a fixed set of bad
      files gives the same benchmark every time).

    Raises InputError (and leaves no ``out_dir``) on any shortfall: a class with fewer images
    than it needs is named with the counts it has and needs.
    """
    if isinstance(source, str):
        source = parse_source(source)
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))
    _output_ready(out_dir, force, source)
    remove_stale_staging(out_dir)  # what a killed curation of this output left
    seed = _count_argument("seed", seed, minimum=0)
    val_per_class, test_per_class, open_per_class, val_open_per_class = _per_class_counts(
        profile, val_per_class, test_per_class, open_per_class, val_open_per_class)
    reference_count = _profile_options(profile, class_order, reference_count)
    _check_class_names(source.class_names)

    skipped: list[dict[str, str]] = []
    if skip_bad_images and not source.needs_export:
        source, skipped = _without_bad_images(source)
        verify_images = False  # every image was just decoded
    rng = np.random.Generator(np.random.PCG64(seed))
    known_classes, open_classes, val_open_classes = choose_classes(
        source.class_names, known, open, rng, val_open)
    train_pools, test_pools = _class_pools(source)
    if profile == PROPORTIONAL:
        plan = _proportional_plan(rng, source, known_classes, train_pools, test_pools,
                                  reference_count=reference_count, val_per_class=val_per_class,
                                  test_per_class=test_per_class)
    else:
        plan = _fixed_count_plan(rng, source, known_classes, train_pools, test_pools,
                                 profile=profile, max_count=max_count, min_count=min_count,
                                 alpha=alpha, ratio=ratio, val_per_class=val_per_class,
                                 test_per_class=test_per_class, class_order=class_order)
    if open_per_class is None:
        open_per_class = plan.test_per_class or DEFAULT_TEST_PER_CLASS
    open_entries, open_class_of = _open_split(
        rng, open_classes, train_pools if test_pools is None else test_pools, open_per_class)
    plan.splits["open"] += open_entries
    plan.splits["val_open"] += _val_open_split(rng, source, val_open_classes, train_pools,
                                               val_open_per_class)
    manifest = _curation_manifest(source, seed, plan, open_classes, val_open_classes,
                                  val_per_class=val_per_class, open_per_class=open_per_class,
                                  val_open_per_class=val_open_per_class, skipped=skipped)
    try:
        return write_benchmark(source, out_dir, plan.splits, manifest,
                               open_class_of=open_class_of, force=force,
                               verify_images=verify_images)
    except ImageError as exc:
        hint = "or curate with --skip-bad-images to leave every unreadable image out"
        raise ImageError(exc.problem, exc.image_path,
                         f"{exc.detail}; {hint}" if exc.detail else hint) from None


def _per_class_counts(
    profile: str, val_per_class: int, test_per_class: int | None,
    open_per_class: int | None, val_open_per_class: int | None,
) -> tuple[int, int | None, int | None, int]:
    """The images per class of val, test, open and val_open, checked (InputError unless an
    integer >= 1; test >= 0 for the proportional profile); test and open stay None when not
    given (their defaults depend on the plan), val_open defaults to ``val_per_class``."""
    val_per_class = _count_argument("val_per_class", val_per_class, minimum=1)
    if test_per_class is not None:
        test_per_class = _count_argument("test_per_class", test_per_class,
                                         minimum=0 if profile == PROPORTIONAL else 1)
    if open_per_class is not None:
        open_per_class = _count_argument("open_per_class", open_per_class, minimum=1)
    val_open_per_class = val_per_class if val_open_per_class is None else _count_argument(
        "val_open_per_class", val_open_per_class, minimum=1)
    return val_per_class, test_per_class, open_per_class, val_open_per_class


def _profile_options(profile: str, class_order: str | Sequence[str] | None,
                     reference_count: int | None) -> int | None:
    """``reference_count`` checked; InputError for an option the profile does not take
    (``class_order`` with the proportional profile, ``reference_count`` with any other)."""
    if class_order is not None and profile == PROPORTIONAL:
        raise InputError("class_order does not apply to the proportional profile (its classes "
                         "are ordered by the images they keep)")
    if reference_count is not None:
        if profile != PROPORTIONAL:
            raise InputError("reference_count applies to the proportional profile only",
                             value=reference_count)
        reference_count = _count_argument("reference_count", reference_count, minimum=1)
    return reference_count


def _check_class_names(class_names: Sequence[str]) -> None:
    """InputError for a class name that classes.txt cannot hold, one per line."""
    for name in class_names:
        if not name or name != name.strip() or "\n" in name or "\r" in name:
            raise InputError(
                "class name cannot be written to classes.txt (empty, surrounding whitespace "
                "or a line break)",
                value=name,
            )


def _without_bad_images(source: Source) -> tuple[Source, list[dict[str, str]]]:
    """``source`` without the train/test entries whose file cannot be used
    (`oltr.data.images.find_bad_images` over all of them), and ``{"image": key, "reason":
    why}`` for each one left out, in source order."""
    entries = [*source.train, *(source.test or [])]
    key_of = {str(source.image_path(key)): key for key, _ in entries}
    errors = find_bad_images(list(key_of))
    bad = {key_of[error.image_path]: error for error in errors}
    if not bad:
        return source, []
    kept = replace(source, train=[e for e in source.train if e[0] not in bad],
                   test=None if source.test is None else [e for e in source.test
                                                           if e[0] not in bad])
    return kept, [{"image": key, "reason": str(error)} for key, error in bad.items()]


def _class_pools(source: Source) -> tuple[list[list[str]], list[list[str]] | None]:
    """Each source class's train keys and, when the source has a test split, its test keys
    (source order)."""
    num_source_classes = len(source.class_names)
    train_pools = _by_class(source.train, num_source_classes)
    test_pools = None if source.test is None else _by_class(source.test, num_source_classes)
    return train_pools, test_pools


def _open_split(rng: np.random.Generator, open_classes: list[int], pools: list[list[str]],
                open_per_class: int) -> tuple[list[tuple[str, int]], list[int]]:
    """The open split (label -1): up to ``open_per_class`` images of each open class from its
    pool, and per open image the position of its class in ``open_classes``."""
    entries: list[tuple[str, int]] = []
    open_class_of: list[int] = []
    for position, index in enumerate(open_classes):
        pool = pools[index]
        open_keys, _ = _pick(rng, pool, min(open_per_class, len(pool)))
        entries += [(key, OPEN_LABEL) for key in open_keys]
        open_class_of += [position] * len(open_keys)
    return entries, open_class_of


def _val_open_split(rng: np.random.Generator, source: Source, val_open_classes: list[int],
                    train_pools: list[list[str]], val_open_per_class: int,
                    ) -> list[tuple[str, int]]:
    """The val_open split (label -1): ``val_open_per_class`` train images of each validation
    open class; InputError naming a class that has fewer."""
    entries: list[tuple[str, int]] = []
    for index in val_open_classes:
        pool = train_pools[index]
        if len(pool) < val_open_per_class:
            raise InputError(f"validation open class has {len(pool)} images, needs "
                             f"val_open_per_class={val_open_per_class}",
                             value=source.class_names[index])
        val_open_keys, _ = _pick(rng, pool, val_open_per_class)
        entries += [(key, OPEN_LABEL) for key in val_open_keys]
    return entries


def _curation_manifest(
    source: Source, seed: int, plan: _Plan, open_classes: list[int],
    val_open_classes: list[int], *, val_per_class: int, open_per_class: int,
    val_open_per_class: int, skipped: list[dict[str, str]],
) -> dict[str, Any]:
    """The manifest of a curation (without ``files``, which `write_benchmark` adds)."""
    splits = plan.splits
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "source": source.name,
        "image_root": EXPORT_DIR if source.needs_export else str(source.image_root),
        "seed": seed,
        "profile": plan.profile_record,
        "val_per_class": val_per_class,
        "test_per_class": plan.test_per_class,
        "open_per_class": open_per_class,
        "known_classes": [source.class_names[index] for index in plan.rank_order],
        "open_classes": [source.class_names[index] for index in open_classes],
        "counts": {**plan.counts, "open": len(splits["open"])},
    }
    if plan.dropped_classes:
        manifest["dropped_classes"] = [source.class_names[i] for i in plan.dropped_classes]
    if val_open_classes:
        manifest["val_open_classes"] = [source.class_names[i] for i in val_open_classes]
        manifest["val_open_per_class"] = val_open_per_class
        manifest["counts"]["val_open"] = len(splits["val_open"])
    if skipped:
        manifest["skipped_images"] = skipped
    return manifest


@dataclass
class _Plan:
    """The known classes' part of a curation: label order (source class indices, label 0
    first), their train/val/test entries, the manifest's counts and profile record."""

    rank_order: list[int]
    splits: dict[str, list[tuple[str, int]]]
    counts: dict[str, list[int]]
    test_per_class: int
    profile_record: dict[str, Any]
    dropped_classes: list[int] = field(default_factory=list)


def _empty_splits() -> dict[str, list[tuple[str, int]]]:
    return {"train": [], "val": [], "test": [], "open": [], "val_open": []}


def _fixed_count_plan(
    rng: np.random.Generator, source: Source, known_classes: list[int],
    train_pools: list[list[str]], test_pools: list[list[str]] | None, *, profile: str,
    max_count: int | None, min_count: int | None, alpha: float, ratio: float | None,
    val_per_class: int, test_per_class: int | None,
    class_order: str | Sequence[str] | None = None,
) -> _Plan:
    """Counts from ``class_counts(profile, …)``, ranks by ``class_order`` (default: at random),
    images without replacement (the ImageNet-LT / CIFAR-LT recipe)."""
    counts = _profile_counts(profile, len(known_classes), max_count=max_count,
                             min_count=min_count, alpha=alpha, ratio=ratio)
    rank_order = _rank_order(source, known_classes,
                             [known_classes[i] for i in rng.permutation(len(known_classes))],
                             train_pools, class_order)
    if test_pools is not None:
        test_per_class = _test_split_per_class(source, rank_order, test_pools, test_per_class)
    elif test_per_class is None:
        test_per_class = DEFAULT_TEST_PER_CLASS
    _check_class_sizes(source, rank_order, train_pools, counts, val_per_class=val_per_class,
                       test_per_class=test_per_class, held_out_test=test_pools is None,
                       class_order=class_order)
    splits = _draw_known_images(rng, rank_order, counts, train_pools, test_pools,
                                val_per_class=val_per_class, test_per_class=test_per_class)
    return _Plan(
        rank_order=rank_order,
        splits=splits,
        counts={"train": [int(count) for count in counts],
                "val": [val_per_class] * len(rank_order),
                "test": [test_per_class] * len(rank_order)},
        test_per_class=test_per_class,
        profile_record=_fixed_profile_record(profile, max_count=max_count, min_count=min_count,
                                             alpha=alpha, ratio=ratio, class_order=class_order),
    )


def _profile_counts(profile: str, num_classes: int, *, max_count: int | None,
                    min_count: int | None, alpha: float, ratio: float | None) -> np.ndarray:
    """Train images per rank (head first) of the long-tail profile; InputError for settings
    `class_counts` refuses."""
    try:
        return class_counts(
            profile,
            num_classes,
            max_count=max_count,  # type: ignore[arg-type]
            min_count=min_count,
            alpha=alpha,
            ratio=ratio,
        )
    except (TypeError, ValueError) as exc:
        raise InputError(f"invalid long-tail profile: {exc}") from None


def _rank_order(source: Source, known_classes: list[int], drawn: list[int],
                train_pools: list[list[str]], class_order: str | Sequence[str] | None,
                ) -> list[int]:
    """Known classes (source indices) in label order, head first: ``drawn`` (a seeded random
    order) as it is, sorted by pool size (stable: ties keep the drawn order), or by position
    in a list of names."""
    if class_order is None:
        return drawn
    if isinstance(class_order, str):
        if class_order != "size":
            raise InputError("class_order must be 'size' or a list of class names",
                             value=class_order)
        return sorted(drawn, key=lambda index: -len(train_pools[index]))
    position: dict[str, int] = {}
    for number, name in enumerate(class_order):
        if name in position:
            raise InputError("class order lists a class twice", value=name)
        position[name] = number
    missing = [index for index in known_classes if source.class_names[index] not in position]
    if missing:
        raise InputError(f"class order lacks {len(missing)} known classes",
                         value=source.class_names[missing[0]])
    return sorted(known_classes, key=lambda index: position[source.class_names[index]])


def _test_split_per_class(source: Source, rank_order: list[int], test_pools: list[list[str]],
                          test_per_class: int | None) -> int:
    """Test images per known class drawn from the source's test split: ``test_per_class``,
    by default the fewest any known class has. InputError naming a known class with no test
    image (for the default) or fewer than ``test_per_class``."""
    available = {index: len(test_pools[index]) for index in rank_order}
    fewest = min(rank_order, key=lambda index: (available[index], index))
    if test_per_class is None:
        test_per_class = available[fewest]
        if test_per_class == 0:
            raise InputError(
                "known class has no image in the source's test split",
                value=source.class_names[fewest],
            )
    short = [index for index in rank_order if available[index] < test_per_class]
    if short:
        raise InputError(
            f"known class has {available[short[0]]} test images, needs test_per_class="
            f"{test_per_class} ({len(short)} classes short)",
            value=source.class_names[short[0]],
        )
    return test_per_class


def _check_class_sizes(source: Source, rank_order: list[int], train_pools: list[list[str]],
                       counts: np.ndarray, *, val_per_class: int, test_per_class: int,
                       held_out_test: bool, class_order: str | Sequence[str] | None) -> None:
    """InputError naming the first known class (in label order) whose train pool is smaller
    than its rank's train count plus val (plus test when ``held_out_test``), with how many
    classes are short and whether ``class_order="size"`` would fit."""
    needs = [
        int(count) + val_per_class + (test_per_class if held_out_test else 0)
        for count in counts
    ]
    short_labels = [
        label for label, index in enumerate(rank_order) if len(train_pools[index]) < needs[label]
    ]
    if not short_labels:
        return
    label = short_labels[0]
    index = rank_order[label]
    parts = f"train {counts[label]} + val {val_per_class}"
    if held_out_test:
        parts += f" + test {test_per_class}"
    sizes = sorted((len(train_pools[i]) for i in rank_order), reverse=True)
    by_size_fits = class_order != "size" and all(
        size >= need for size, need in zip(sizes, sorted(needs, reverse=True)))
    remedy = ("--class-order size (the classes with the most images at the head) fits "
              "these counts; or lower" if by_size_fits else "lower")
    raise InputError(
        f"class has {len(train_pools[index])} images, needs {needs[label]} ({parts}) at "
        f"rank {label}; {len(short_labels)} classes short — {remedy} max_count/min_count, "
        "val_per_class or test_per_class, or pick other classes",
        value=source.class_names[index],
    )


def _draw_known_images(
    rng: np.random.Generator, rank_order: list[int], counts: np.ndarray,
    train_pools: list[list[str]], test_pools: list[list[str]] | None, *,
    val_per_class: int, test_per_class: int,
) -> dict[str, list[tuple[str, int]]]:
    """Train, val and test entries of the known classes, label by label: test images (held
    out of the train pool, or from the test split), then the rank's train count, then val
    from the images left unused."""
    splits = _empty_splits()
    for label, index in enumerate(rank_order):
        pool = train_pools[index]
        if test_pools is None:
            test_keys, pool = _pick(rng, pool, test_per_class)
        else:
            test_keys, _ = _pick(rng, test_pools[index], test_per_class)
        train_keys, unused = _pick(rng, pool, int(counts[label]))
        val_keys, _ = _pick(rng, unused, val_per_class)
        splits["train"] += [(key, label) for key in train_keys]
        splits["val"] += [(key, label) for key in val_keys]
        splits["test"] += [(key, label) for key in test_keys]
    return splits


def _fixed_profile_record(profile: str, *, max_count: int | None, min_count: int | None,
                          alpha: float, ratio: float | None,
                          class_order: str | Sequence[str] | None) -> dict[str, Any]:
    """The manifest's ``profile`` of a fixed-count curation."""
    profile_record: dict[str, Any] = {
        "name": profile,
        "max_count": int(max_count),  # type: ignore[arg-type]
        "min_count": None if min_count is None else int(min_count),
        "ratio": None if ratio is None else float(ratio),
    }
    if profile == "pareto":
        profile_record["alpha"] = float(alpha)
    if class_order is not None:
        profile_record["class_order"] = class_order if isinstance(class_order, str) else "given"
    return profile_record


def _proportional_plan(
    rng: np.random.Generator, source: Source, known_classes: list[int],
    train_pools: list[list[str]], test_pools: list[list[str]] | None, *,
    reference_count: int | None, val_per_class: int, test_per_class: int | None,
) -> _Plan:
    """MS1M-LT's sampling (paper App. D.1): each image of class i kept with probability
    ``min(1, n_i / Z)`` (`keep_probabilities`), one uniform draw per image in source order."""
    sizes = np.array([len(train_pools[index]) for index in known_classes], dtype=np.int64)
    probabilities = keep_probabilities(sizes, reference_count=reference_count)
    kept: dict[int, list[str]] = {}
    unused: dict[int, list[str]] = {}
    for index, probability in zip(known_classes, probabilities):
        pool = train_pools[index]
        keep = rng.random(len(pool)) < probability
        kept[index] = [key for key, flag in zip(pool, keep) if flag]
        unused[index] = [key for key, flag in zip(pool, keep) if not flag]
    rank_order = sorted((index for index in known_classes if kept[index]),
                        key=lambda index: (-len(kept[index]), index))
    if not rank_order:
        raise InputError("the proportional profile kept no image of any known class (a "
                         "smaller reference_count keeps more)", value=reference_count)
    from_test_split = test_pools is not None
    if test_per_class is None:
        test_per_class = 0
    splits = _empty_splits()
    counts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for label, index in enumerate(rank_order):
        val_keys, rest = _pick(rng, unused[index], min(val_per_class, len(unused[index])))
        test_pool = test_pools[index] if test_pools is not None else rest
        wanted = len(test_pool) if from_test_split and test_per_class == 0 else test_per_class
        test_keys, _ = _pick(rng, test_pool, min(wanted, len(test_pool)))
        splits["train"] += [(key, label) for key in kept[index]]
        splits["val"] += [(key, label) for key in val_keys]
        splits["test"] += [(key, label) for key in test_keys]
        for name, keys in (("train", kept[index]), ("val", val_keys), ("test", test_keys)):
            counts[name].append(len(keys))
    if not splits["val"]:
        raise InputError("the proportional profile left no unused image for the val split "
                         "(every kept class kept all its images)")
    return _Plan(
        rank_order=rank_order,
        splits=splits,
        counts=counts,
        test_per_class=test_per_class,
        profile_record={"name": PROPORTIONAL,
                        "reference_count": int(reference_count if reference_count is not None
                                               else sizes.max()),
                        "rule": "each image kept with probability min(1, n_i / reference_count)"},
        dropped_classes=[index for index in known_classes if not kept[index]],
    )


def write_benchmark(
    source: Source,
    out_dir: str | os.PathLike[str],
    splits: dict[str, list[tuple[str, int]]],
    manifest: dict[str, Any],
    *,
    open_class_of: Sequence[int] = (),
    force: bool = False,
    verify_images: bool = True,
) -> dict[str, Any]:
    """Write a curated benchmark: the non-empty ``splits`` as split files, ``open_classes.txt``
    (``open_class_of``: per open image, its index in ``manifest["open_classes"]``),
    ``classes.txt`` (``manifest["known_classes"]``) and ``manifest.json`` (``manifest`` plus
    ``files``: the sha256 of each file). Array sources have their images exported first.
    Everything goes into a staging sibling renamed to ``out_dir`` at the end (`_install`);
    returns the manifest written."""
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))
    _output_ready(out_dir, force, source)
    remove_stale_staging(out_dir)
    used_keys = [key for entries in splits.values() for key, _ in entries]
    if verify_images and not source.needs_export:
        check_images([source.image_path(key) for key in used_keys])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(out_dir)
    staging.mkdir()
    try:
        write_marker(staging, "curate")
        if source.needs_export:
            for key in used_keys:
                source.export_image(key, staging / EXPORT_DIR / f"{key}.png")
                pause_point("curate:image")
            splits = {
                name: [(f"{key}.png", label) for key, label in entries]
                for name, entries in splits.items()
            }
        files: dict[str, str] = {}
        for name, entries in splits.items():
            if entries:
                write_split_file(staging / f"{name}.txt", entries)
                files[f"{name}.txt"] = sha256_file(staging / f"{name}.txt")
        if splits.get("open"):
            write_split_file(staging / OPEN_CLASSES_NAME,
                             [(key, position) for (key, _), position
                              in zip(splits["open"], open_class_of)])
            files[OPEN_CLASSES_NAME] = sha256_file(staging / OPEN_CLASSES_NAME)
        atomic_write_bytes(
            staging / CLASSES_NAME,
            "".join(f"{name}\n" for name in manifest["known_classes"]).encode("utf-8"))
        files[CLASSES_NAME] = sha256_file(staging / CLASSES_NAME)
        manifest = {**manifest, "files": files}
        atomic_write_bytes(staging / MANIFEST_NAME, _json_bytes(manifest))
        _install(staging, out_dir, force, source)
    except BaseException:
        remove_owned_tree(staging, "curate")
        if staging.is_dir() and not any(staging.iterdir()):
            staging.rmdir()
        raise
    return manifest


def load_manifest(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``data_dir/manifest.json``: required keys, the JSON type of every key
    (`MANIFEST_TYPES`; class-name lists of strings), the format version. InputError naming
    the file, the key and its value."""
    path = Path(data_dir) / MANIFEST_NAME
    manifest = read_json_object(path, "manifest")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise InputError(f"manifest lacks keys: {', '.join(missing)}", path=path)
    for key, (kind, described) in MANIFEST_TYPES.items():
        value = manifest.get(key)
        if key not in manifest or (key.endswith("_per_class") and value is None):
            continue
        if not isinstance(value, kind) or isinstance(value, bool) or (
                kind is list and not all(isinstance(item, str) for item in value)):
            raise InputError(f"manifest key '{key}' must be {described}", path=path,
                             value=value)
    if manifest["format_version"] != FORMAT_VERSION:
        raise InputError(
            f"unsupported manifest format_version (this oltr reads {FORMAT_VERSION})",
            path=path,
            value=manifest["format_version"],
        )
    files = manifest["files"]
    if not isinstance(files, dict) or not all(
        isinstance(name, str) and name == Path(name).name and not name.startswith(".")
        and isinstance(digest, str)
        for name, digest in files.items()
    ):
        raise InputError("manifest 'files' must map plain file names to sha256 digests", path=path)
    return manifest


def load_open_classes(data_dir: str | os.PathLike[str]) -> tuple[list[str], np.ndarray]:
    """The open class names and, per line of ``open.txt``, the index of its image's class
    (read from ``open_classes.txt``; paper Fig. 8c). InputError when the file is missing (a
    benchmark curated before it existed: re-curate) or does not match ``open.txt``."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    path = data_dir / OPEN_CLASSES_NAME
    if OPEN_CLASSES_NAME not in manifest["files"] or not path.is_file():
        raise InputError(f"{OPEN_CLASSES_NAME} is missing: the benchmark was curated by an "
                         "older oltr; re-curate it with this version (same arguments give the "
                         "same splits)", path=path)
    names = list(manifest["open_classes"])
    entries, lines = read_split_lines(path, allow_open=False, allow_outside_root=True)
    opened, _ = read_split_lines(data_dir / "open.txt", allow_outside_root=True)
    if [image for image, _ in entries] != [image for image, _ in opened]:
        raise InputError(f"{OPEN_CLASSES_NAME} does not list the images of open.txt in the "
                         "same order", path=path)
    for (_, index), line in zip(entries, lines):
        if index >= len(names):
            raise InputError(f"open class index out of range: the manifest lists {len(names)} "
                             "open classes", path=path, line=line, value=index)
    return names, np.array([index for _, index in entries], dtype=np.int64)


def verify_manifest(data_dir: str | os.PathLike[str]) -> None:
    """Re-hash every file listed in the manifest; InputError naming the first that differs."""
    data_dir = Path(data_dir)
    for name, expected in sorted(load_manifest(data_dir)["files"].items()):
        path = data_dir / name
        if not path.is_file():
            raise InputError(f"file listed in {MANIFEST_NAME} is missing", path=path)
        actual = sha256_file(path)
        if actual != expected:
            raise InputError(
                f"sha256 {actual} differs from {MANIFEST_NAME}'s {expected}: the file changed "
                "after curation",
                path=path,
            )
