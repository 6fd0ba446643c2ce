"""Given splits: a benchmark whose train and test lists are published (SUN-LT, paper App. D.1)
turned into a curated benchmark directory, its val split drawn from the images those lists
leave unused.

SUN-LT (paper §4.2, App. D.1): "We used the same training and testing data set as provided by
[58] (MetaModelNet, Wang et al., NeurIPS 2017), where there were 1,132∼1 images per class in the
training set and 40 images per class in the testing set. We randomly selected 5 images from
un-used training data as our validation set." The paper does not describe the files of [58];
this module reads the two forms such lists take:

- **labelled**, the split-file format (`oltr.data.splits`): ``a/abbey/sun_aaa.jpg 0``;
- **path only**, SUN397's own partition files (``Training_01.txt``): ``/a/abbey/sun_aaa.jpg``,
  one image per line, its class the folder it lies in (``a/abbey``, ``b/bakery/shop``); a
  leading ``/`` means the SUN397 root, as in those files. Class names (and label order) come
  from SUN397's ``ClassName.txt`` (``/a/abbey`` per line; beside the lists or in the SUN397
  folder, where ``SUN397.tar.gz`` has it — torchvision's ``SUN397`` reads it there) or a
  ``classes.txt`` beside the lists, else from the sorted folders.

A directory holds the lists: one ``*train*.txt``, one ``*test*.txt`` and optionally one
``*val*.txt`` (then nothing is drawn), matched in any case (SUN397's ``Training_01.txt``). Paths are relative to ``image_root`` (the SUN397 folder).
The val pool of a class is every image in the folders its train and test images lie in that
neither list names (``un-used training data``); ``val_per_class`` of them are drawn (seeded,
without replacement), as many as a class has when it has fewer. Output: `oltr.data.curation`'s
benchmark directory (``train.txt`` and ``test.txt`` are the given lists with their labels,
``val.txt``, ``classes.txt``, ``manifest.json`` with the given files' sha256).
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from oltr.data.curation import FORMAT_VERSION, _count_argument, _pick, write_benchmark
from oltr.data.paths import IMAGE_EXTENSIONS, check_image_paths
from oltr.data.sources import Source, check_class_name, read_class_names
from oltr.data.splits import leaves_root, read_split_lines, sha256_file
from oltr.errors import InputError
from oltr.io import read_text

SUN397_CLASS_FILE = "ClassName.txt"
GIVEN_SOURCE = "given"
_INTEGER = re.compile(r"[+-]?[0-9]+")


def _is_labelled(path: Path) -> bool:
    """Whether a list is in the split-file form (``path label``): its first non-blank line has
    at least two fields and ends in an integer."""
    for raw in read_text(path, "split file").splitlines():
        fields = raw.split()
        if fields:
            return len(fields) >= 2 and _INTEGER.fullmatch(fields[-1]) is not None
    raise InputError("split file is empty", path=path)


def _read_paths(path: Path) -> tuple[list[str], list[int]]:
    """A path-only list: one image per line (a leading '/' is the image root's); blank lines
    skipped. InputError naming file and line for a path that leaves the root or repeats."""
    images: list[str] = []
    lines: list[int] = []
    first: dict[str, int] = {}
    for number, raw in enumerate(read_text(path, "split file").splitlines(), start=1):
        text = raw.strip()
        if not text:
            continue
        image = text.lstrip("/")
        if not image or leaves_root(image) or len(PurePosixPath(image).parts) < 2:
            raise InputError("expected an image path inside a class folder, e.g. "
                             "/a/abbey/sun_aaa.jpg", path=path, line=number, value=raw)
        if image in first:
            raise InputError(f"image listed twice (first on line {first[image]})", path=path,
                             line=number, value=raw)
        first[image] = number
        images.append(image)
        lines.append(number)
    if not images:
        raise InputError("split file is empty", path=path)
    return images, lines


def _class_names(directory: Path, root: Path, folders: list[str]) -> list[str]:
    """Class names of path-only lists: SUN397's ClassName.txt (``/a/abbey``; beside the lists,
    else in the SUN397 folder itself, where SUN397.tar.gz has it), classes.txt, or the sorted
    folders."""
    sun = next((folder / SUN397_CLASS_FILE for folder in (directory, root)
                if (folder / SUN397_CLASS_FILE).is_file()), None)
    if sun is not None:
        names = [line.strip().strip("/") for line in read_text(sun, "class-name file").splitlines()]
        names = [name for name in names if name]
        if len(set(names)) != len(names):
            raise InputError("class-name file lists a class twice", path=sun)
        return names
    named = read_class_names(directory)
    if named is not None:
        return [name.strip("/") for name in named[0]]
    return sorted(set(folders))


def _read_given(path: Path, directory: Path, root: Path, labelled: bool,
                class_names: list[str] | None) -> tuple[list[tuple[str, int]], list[int],
                                                        list[str] | None]:
    if labelled:
        entries, lines = read_split_lines(path, num_classes=None if class_names is None
                                          else len(class_names), allow_open=False)
        return entries, lines, class_names
    images, lines = _read_paths(path)
    folders = [str(PurePosixPath(image).parent) for image in images]
    if class_names is None:
        class_names = _class_names(directory, root, folders)
    index_of = {name: label for label, name in enumerate(class_names)}
    entries = []
    for image, folder, line in zip(images, folders, lines):
        if folder not in index_of:
            raise InputError(f"the image's folder {folder!r} is not a class of the class list",
                             path=path, line=line, value=image)
        entries.append((image, index_of[folder]))
    return entries, lines, class_names


def _find_list(directory: Path, word: str, required: bool) -> Path | None:
    """The one ``*.txt`` in ``directory`` whose name contains ``word`` in any case
    (``SUN-LT_train.txt``, SUN397's ``Training_01.txt``); InputError when several do, or
    none does and ``required``."""
    matches = sorted(path for path in directory.glob("*.txt")
                     if word in path.name.lower() and path.is_file())
    if len(matches) > 1:
        raise InputError(f"several files name the {word} split: "
                         f"{', '.join(path.name for path in matches)} (keep one per folder)",
                         path=directory)
    if not matches and required:
        raise InputError(f"no *{word}*.txt list (any case) in the folder", path=directory)
    return matches[0] if matches else None


def _folder_images(root: Path, folder: str) -> list[str]:
    """Image files directly in ``root/folder`` (sorted), as paths relative to ``root``."""
    directory = root / folder
    if not directory.is_dir():
        raise InputError("class folder of listed images not found under the image root",
                         path=directory)
    return sorted(f"{folder}/{entry.name}" for entry in os.scandir(directory)
                  if entry.is_file() and not entry.name.startswith(".")
                  and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS)


def curate_given(
    directory: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    val_per_class: int = 5,
    seed: int = 0,
    force: bool = False,
    verify_images: bool = True,
) -> dict[str, Any]:
    """Write the benchmark of the given lists in ``directory`` (see the module docstring) to
    ``out_dir``; return its manifest. ``val_per_class``: images drawn per class from its
    unused images (paper: 5 for SUN-LT), fewer when a class has fewer (``counts.val`` in the
    manifest says how many). Raises InputError for a malformed list, a test or train image
    listed twice or in both lists, an image root or class folder that is missing, a folder
    shared by two classes (its unlisted images have no class), or a class without train
    images."""
    directory, root = _given_folders(directory, image_root)
    val_per_class = _count_argument("val_per_class", val_per_class, minimum=1)
    seed = _count_argument("seed", seed, minimum=0)
    files = {name: _find_list(directory, name, required=name != "val")
             for name in ("train", "test", "val")}
    labelled, entries, lines, class_names = _read_given_lists(files, directory, root)
    num_classes = (len(class_names) if class_names is not None
                   else 1 + max(label for _, label in entries["train"]))
    if class_names is None:
        class_names = [f"class_{index}" for index in range(num_classes)]
    for name in class_names:  # the class's folder where it has one, else the lists' folder
        check_class_name(name, root / name if (root / name).is_dir() else directory)
    _check_train_classes(entries["train"], class_names, files["train"])  # type: ignore[arg-type]
    check_image_paths(entries, lines, {k: v for k, v in files.items() if v is not None}, root)

    if "val" not in entries:
        pools = _unused_images(entries, class_names, root)
        entries["val"] = _draw_val(pools, val_per_class, seed)
    if not entries["val"]:
        raise InputError("the given lists leave no unused image to draw the val split from",
                         path=directory)
    source = Source(name=f"{GIVEN_SOURCE}:{directory}", class_names=list(class_names),
                    train=entries["train"], test=entries.get("test"), image_root=root.resolve())
    manifest = _given_manifest(source, files, entries, labelled=labelled, seed=seed,
                               val_per_class=val_per_class)
    splits = {"train": entries["train"], "val": entries["val"], "test": entries.get("test", [])}
    return write_benchmark(source, out_dir, splits, manifest, force=force,
                           verify_images=verify_images)


def _given_folders(directory: str | os.PathLike[str],
                   image_root: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    """The folder of the lists and the image root (default: that folder); InputError when
    either is not a folder."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise InputError("directory of given split files not found", path=directory)
    root = Path(image_root).expanduser() if image_root is not None else directory
    if not root.is_dir():
        raise InputError("image root not found", path=root)
    return directory, root


def _read_given_lists(
    files: dict[str, Path | None], directory: Path, root: Path,
) -> tuple[bool, dict[str, list[tuple[str, int]]], dict[str, list[int]], list[str] | None]:
    """Whether the lists are labelled (the train list's form, which the others must share),
    each list's entries and line numbers, and the class names (None: labelled lists without
    a classes.txt)."""
    labelled = _is_labelled(files["train"])  # type: ignore[arg-type]
    named = read_class_names(directory) if labelled else None
    class_names = None if named is None else named[0]
    entries: dict[str, list[tuple[str, int]]] = {}
    lines: dict[str, list[int]] = {}
    for name, path in files.items():
        if path is None:
            continue
        if _is_labelled(path) != labelled:
            raise InputError("the given lists mix the 'path label' and the path-only form",
                             path=path)
        entries[name], lines[name], class_names = _read_given(path, directory, root, labelled,
                                                              class_names)
    assert class_names is not None or labelled
    return labelled, entries, lines, class_names


def _check_train_classes(train: list[tuple[str, int]], class_names: list[str],
                         path: Path) -> None:
    """InputError naming the first class without a train image."""
    num_classes = len(class_names)
    present = np.bincount([label for _, label in train], minlength=num_classes)
    if (present == 0).any():
        missing = int(np.flatnonzero(present == 0)[0])
        raise InputError(f"class {missing} ({class_names[missing]!r}) has no train image "
                         f"({int((present == 0).sum())} classes without one)",
                         path=path, value=class_names[missing])


def _unused_images(entries: dict[str, list[tuple[str, int]]], class_names: list[str],
                   root: Path) -> list[list[str]]:
    """Per class, the images of the folders its listed images lie in that no list names (the
    paper's "un-used training data"); InputError for a folder holding listed images of two
    classes."""
    listed = {image for split in entries.values() for image, _ in split}
    class_of_folder: dict[str, int] = {}
    for split in entries.values():
        for image, label in split:
            folder = str(PurePosixPath(image).parent)
            if class_of_folder.setdefault(folder, label) != label:
                raise InputError(f"folder {folder!r} holds listed images of two classes "
                                 f"({class_names[class_of_folder[folder]]!r} and "
                                 f"{class_names[label]!r}): its unlisted images have no "
                                 "class to be drawn for val", path=root / folder)
    pools: list[list[str]] = [[] for _ in range(len(class_names))]
    for folder, label in sorted(class_of_folder.items()):
        pools[label] += [image for image in _folder_images(root, folder)
                         if image not in listed]
    return pools


def _draw_val(pools: list[list[str]], val_per_class: int, seed: int) -> list[tuple[str, int]]:
    """Up to ``val_per_class`` images of each class's pool (seeded, without replacement)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    val: list[tuple[str, int]] = []
    for label, pool in enumerate(pools):
        keys, _ = _pick(rng, sorted(pool), min(val_per_class, len(pool)))
        val += [(key, label) for key in keys]
    return val


def _per_class(entries: dict[str, list[tuple[str, int]]], split: str,
               num_classes: int) -> list[int]:
    """Images per class of ``split`` (empty for a split without images)."""
    labels = [label for _, label in entries.get(split, [])]
    return [int(n) for n in np.bincount(labels, minlength=num_classes)] if labels else []


def _given_manifest(source: Source, files: dict[str, Path | None],
                    entries: dict[str, list[tuple[str, int]]], *, labelled: bool, seed: int,
                    val_per_class: int) -> dict[str, Any]:
    """The manifest of given lists (without ``files``, which `write_benchmark` adds): the
    given files' sha256 under ``profile``, the per-class counts of each split."""
    num_classes = len(source.class_names)
    test_counts = _per_class(entries, "test", num_classes)
    return {
        "format_version": FORMAT_VERSION,
        "source": source.name,
        "image_root": str(source.image_root),
        "seed": seed,
        "profile": {
            "name": GIVEN_SOURCE,
            "form": "path label" if labelled else "path (class = folder)",
            "given_files": {path.name: sha256_file(path) for path in files.values()
                            if path is not None},
            "val": "given" if files["val"] is not None else
                   f"drawn: up to {val_per_class} unused images per class",
        },
        "val_per_class": val_per_class,
        "test_per_class": test_counts[0] if test_counts and len(set(test_counts)) == 1 else None,
        "known_classes": list(source.class_names),
        "open_classes": [],
        "counts": {"train": _per_class(entries, "train", num_classes),
                   "val": _per_class(entries, "val", num_classes), "test": test_counts,
                   "open": 0},
    }
