"""Load a benchmark directory (curated, or published ImageNet-LT-style split files) and serve images.

A curated directory holds ``train.txt``, ``val.txt``, ``test.txt``, optionally ``open.txt``,
``classes.txt`` and ``manifest.json`` (see `oltr.data.curation`). A plain directory of split files
works too: ``*train*.txt`` (required), ``*val*.txt``, ``*test*.txt``, ``*open*.txt`` and an optional
``classes.txt`` / ``classnames.txt``; its images are relative to ``image_root`` (default: the
directory itself), except that an open split file with a folder of the same name beside it is
the published ImageNet-LT / Places-LT layout (`published_open_folder`): its images are in that
folder. The companion files ``classes.txt``, ``classnames.txt`` and
``open_classes.txt`` are never split files, so a curated directory whose ``manifest.json`` is
gone still reads as a plain one.

Images are read by `oltr.data.images.load_image` and compared by `oltr.data.paths` identity:
two splits naming the same file under two spellings (``c0/x.png``, ``./c0/x.png``, a link)
share an image.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from oltr.data.curation import CLASSES_NAME, MANIFEST_NAME, load_manifest, verify_manifest
from oltr.data.images import ImageError, load_image
from oltr.data.loader import ImageLoader
from oltr.data.paths import check_image_paths
from oltr.data.sources import find_split_file, read_class_names
from oltr.data.splits import OPEN_LABEL, read_split_lines
from oltr.data.transforms import build_transform
from oltr.errors import InputError

SPLITS = ("train", "val", "test", "open", "val_open")
#: splits whose every image is of an unknown class (label -1)
OPEN_SPLITS = ("open", "val_open")
IMAGE_MODES = ("RGB", "L")


class ImageListDataset(Dataset):
    """Images listed as ``(relative path, label)``; items are ``(tensor, label)``.

    ``transform`` maps the PIL image (read by `oltr.data.images.load_image`: as a person sees
    it, in ``mode``) to a tensor; without one the image becomes a float tensor in [0, 1].
    ``cache=True`` keeps decoded images in memory after first use (small datasets; each
    DataLoader worker holds its own cache). An unreadable image raises
    InputError naming the image and the split file and line it came from (``source_file``,
    ``line_numbers``; without them the line is looked up in ``source_file`` when needed).
    """

    def __init__(
        self,
        entries: Sequence[tuple[str, int]],
        image_root: str | os.PathLike[str],
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        source_file: str | os.PathLike[str] | None = None,
        line_numbers: Sequence[int] | None = None,
        mode: str = "RGB",
        cache: bool = False,
    ) -> None:
        if mode not in IMAGE_MODES:
            raise ValueError(f"mode must be one of {', '.join(IMAGE_MODES)}, got {mode!r}")
        if line_numbers is not None and len(line_numbers) != len(entries):
            raise ValueError(
                f"line_numbers has {len(line_numbers)} items for {len(entries)} entries"
            )
        self.entries = list(entries)
        self.image_root = Path(image_root)
        self.transform = transform
        self.source_file = None if source_file is None else Path(source_file)
        self.line_numbers = None if line_numbers is None else list(line_numbers)
        self.mode = mode
        self.cache = cache
        self._images: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def labels(self) -> np.ndarray:
        """Labels of all entries, ``int64``."""
        return np.array([label for _, label in self.entries], dtype=np.int64)

    def load_image(self, index: int) -> Image.Image:
        """The decoded image of entry ``index``, converted to ``mode``."""
        if index in self._images:
            return self._images[index]
        try:
            image = load_image(self.image_path(index), self.mode)
        except ImageError as exc:
            raise exc.located(self.source_file, self._line_of(index)
                              if self.source_file is not None else None) from None
        if self.cache:
            self._images[index] = image
        return image

    def image_path(self, index: int) -> Path:
        """Where the image of entry ``index`` is read from."""
        return self.image_root / self.entries[index][0]

    def error_at(self, index: int, message: str) -> InputError:
        """An InputError about entry ``index``, named by its split file and line."""
        return self._error(index, message)

    def _line_of(self, index: int) -> int:
        """Line of entry ``index`` in ``source_file`` (looked up there if not given)."""
        if self.line_numbers is not None:
            return self.line_numbers[index]
        assert self.source_file is not None
        try:
            entries, lines = read_split_lines(self.source_file, allow_outside_root=True)
        except InputError:
            return index + 1
        wanted = self.entries[index][0]
        return next((line for (path, _), line in zip(entries, lines) if path == wanted), index + 1)

    def _error(self, index: int, message: str) -> InputError:
        if self.source_file is None:
            return InputError(message)
        return InputError(message, path=self.source_file, line=self._line_of(index))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.load_image(index)
        tensor = self.transform(image) if self.transform is not None else TF.to_tensor(image)
        return tensor, self.entries[index][1]


class _ReadabilityProbe(Dataset):
    """Item ``i``: None if image ``i`` of ``dataset`` decodes, else the InputError's message."""

    def __init__(self, dataset: ImageListDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> str | None:
        try:
            self.dataset.load_image(index)
        except InputError as exc:
            return str(exc)
        return None


@dataclass
class Benchmark:
    """A loaded benchmark: class names, split entries, train counts and where images live."""

    data_dir: Path
    manifest: dict[str, Any] | None
    image_root: Path
    class_names: list[str]
    train_counts: np.ndarray
    split_files: dict[str, Path]
    _entries: dict[str, list[tuple[str, int]]] = field(repr=False)
    _line_numbers: dict[str, list[int]] = field(repr=False)
    #: splits whose images lie under another root than ``image_root`` (published open folders)
    split_roots: dict[str, Path] = field(default_factory=dict)

    def split_root(self, name: str) -> Path:
        """Where the paths of split ``name`` are relative to."""
        return self.split_roots.get(name, self.image_root)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def has_split(self, name: str) -> bool:
        return name in self._entries

    def split_file(self, name: str) -> Path:
        """The file split ``name`` was read from."""
        self.split(name)
        return self.split_files[name]

    def split(self, name: str) -> list[tuple[str, int]]:
        """``(path, label)`` entries of split ``name`` (train, val, test, open or val_open)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {name!r}")
        if name not in self._entries:
            raise InputError(f"benchmark has no {name} split", path=self.data_dir)
        return list(self._entries[name])

    def drop_unreadable_images(
        self, splits: Sequence[str], *, num_workers: int = 0
    ) -> dict[str, list[str]]:
        """Decode every image of ``splits`` once and drop the unreadable ones from this benchmark.

        Returns, per split, the messages of the dropped images (each names split file, line
        and image). Train counts are recomputed; a class left without train images, or a split
        left empty, is an InputError. Used by ``data.skip_bad_images`` / ``--skip-bad-images``.
        """
        dropped: dict[str, list[str]] = {}
        for name in splits:
            if name not in self._entries:
                continue
            probe = ImageLoader(_ReadabilityProbe(self.dataset(name)), batch_size=64,
                                num_workers=num_workers, collate_fn=list)
            errors = [message for batch in probe for message in batch]
            dropped[name] = [message for message in errors if message is not None]
            if not dropped[name]:
                continue
            keep = [index for index, message in enumerate(errors) if message is None]
            if not keep:
                raise InputError(f"no image of the {name} split is readable "
                                 f"(first: {dropped[name][0]})", path=self.split_files[name])
            self._entries[name] = [self._entries[name][i] for i in keep]
            self._line_numbers[name] = [self._line_numbers[name][i] for i in keep]
        if dropped.get("train"):
            labels = np.array([label for _, label in self._entries["train"]], dtype=np.int64)
            self.train_counts = np.bincount(labels, minlength=self.num_classes)
            empty = np.flatnonzero(self.train_counts == 0)
            if empty.size:
                raise InputError(
                    f"class {int(empty[0])} ({self.class_names[empty[0]]!r}) has no readable "
                    f"train image left (first unreadable: {dropped['train'][0]})",
                    path=self.split_files["train"],
                )
        return dropped

    def dataset(
        self,
        name: str,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        mode: str = "RGB",
        cache: bool = False,
    ) -> ImageListDataset:
        """An `ImageListDataset` over split ``name`` whose errors point at its file and lines."""
        return ImageListDataset(
            self.split(name),
            self.split_root(name),
            transform,
            source_file=self.split_files[name],
            line_numbers=self._line_numbers[name],
            mode=mode,
            cache=cache,
        )


def report_skipped_images(prefix: str, dropped: dict[str, list[str]]) -> None:
    """Print how many unreadable images were skipped per split, and the first few of them."""
    messages = [message for split_messages in dropped.values() for message in split_messages]
    if not messages:
        return
    counts = ", ".join(f"{split} {len(m)}" for split, m in dropped.items())
    print(f"{prefix} skipping {len(messages)} unreadable images ({counts}):", flush=True)
    for message in messages[:5]:
        print(f"{prefix}   {message}", flush=True)


def dataset_for(
    bench: Benchmark, split: str, data_cfg: dict[str, Any], *, train: bool
) -> ImageListDataset:
    """The dataset of ``split`` with the train (augmenting) or eval transform of ``data_cfg``;
    its errors name the split file and line."""
    transform = build_transform(
        data_cfg["transform"], train=train, image_size=data_cfg["image_size"],
        channels=data_cfg["channels"], mean=data_cfg["mean"], std=data_cfg["std"],
    )
    dataset = bench.dataset(split, transform, mode="L" if data_cfg["channels"] == 1 else "RGB",
                            cache=data_cfg["cache_images"])
    return dataset


def published_open_folder(split_file: Path) -> Path | None:
    """The folder of open images that ImageNet-LT and Places-LT ship beside their open split
    file (``ImageNet_LT_open/`` beside ``ImageNet_LT_open.txt``, the original code's
    ``data/<name>/<name>_open/``), or None. The original loader reads that file's paths
    relative to this folder, joining ``root + line`` when a line starts with ``/``; oltr reads
    them the same way (`oltr.data.splits.read_split_lines`'s ``slash_is_root``)."""
    folder = split_file.with_suffix("")
    return folder if folder != split_file and folder.is_dir() else None


def _split_files(data_dir: Path, manifest: dict[str, Any] | None) -> dict[str, Path]:
    if manifest is not None:
        files = {name: data_dir / f"{name}.txt" for name in SPLITS}
        present = {name: path for name, path in files.items() if path.name in manifest["files"]}
        if "train" not in present:
            raise InputError(f"{MANIFEST_NAME} lists no train.txt", path=data_dir / MANIFEST_NAME)
        return present
    found = {name: find_split_file(data_dir, name, required=name == "train") for name in SPLITS}
    return {name: path for name, path in found.items() if path is not None}


def load_benchmark(
    data_dir: str | os.PathLike[str],
    *,
    verify: bool = True,
    image_root: str | os.PathLike[str] | None = None,
    allow_outside_root: bool = False,
    require_images: bool = False,
) -> Benchmark:
    """Load and validate a benchmark directory.

    ``verify`` re-hashes the files listed in the manifest. ``image_root`` overrides where images
    are looked up (default: the manifest's ``image_root``, relative to ``data_dir`` if relative;
    for a plain directory, ``data_dir``). Raises InputError for a label out of range, a class
    without train images, ``-1`` outside the open split, a known label in the open split, an
    image file listed in two splits or twice in one (by identity: `check_image_paths`), or a
    path that leaves the image root (absolute, with a ``..`` component, or through a symbolic
    link) unless ``allow_outside_root``; with ``require_images``, for a listed image file that
    does not exist (training checks every split this way before it starts, so a test image
    missing is found before hours of training, not at evaluation).
    """
    data_dir = _benchmark_folder(data_dir)
    manifest = load_manifest(data_dir) if (data_dir / MANIFEST_NAME).exists() else None
    if manifest is not None and verify:
        verify_manifest(data_dir)
    split_files = _split_files(data_dir, manifest)
    named = _benchmark_class_names(data_dir, manifest)
    entries, line_numbers, split_roots, num_classes = _read_splits(
        split_files, published=manifest is None,
        num_classes=len(named) if named is not None else None,
        allow_outside_root=allow_outside_root)
    class_names = named if named is not None else [f"class_{i}" for i in range(num_classes)]
    _check_open_labels(entries, line_numbers, split_files)
    train_counts = _train_counts(entries["train"], class_names, split_files["train"])
    root = _image_root(data_dir, manifest, image_root)
    for group_root in {split_roots.get(name, root) for name in entries}:
        names = [name for name in entries if split_roots.get(name, root) == group_root]
        check_image_paths({name: entries[name] for name in names},
                          {name: line_numbers[name] for name in names}, split_files, group_root,
                          allow_outside_root=allow_outside_root, require_existing=require_images)
    return Benchmark(
        data_dir=data_dir,
        manifest=manifest,
        image_root=root,
        class_names=class_names,
        train_counts=train_counts,
        split_files=split_files,
        _entries=entries,
        _line_numbers=line_numbers,
        split_roots=split_roots,
    )


def _benchmark_folder(data_dir: str | os.PathLike[str]) -> Path:
    """``data_dir`` as a path; InputError when it is a file (a split file given for its
    folder) or missing."""
    data_dir = Path(data_dir).expanduser()
    if data_dir.is_file():
        raise InputError("a benchmark is the folder holding the split files, not one of them: "
                         f"give {data_dir.parent}", path=data_dir)
    if not data_dir.is_dir():
        raise InputError("benchmark directory not found", path=data_dir)
    return data_dir


def _benchmark_class_names(data_dir: Path, manifest: dict[str, Any] | None) -> list[str] | None:
    """The class names of ``classes.txt`` (or another class-name file of a plain directory),
    or None without one. InputError when a curated benchmark lacks classes.txt or it differs
    from the manifest's ``known_classes``."""
    named = read_class_names(data_dir)
    if manifest is not None:
        if named is None or named[1].name != CLASSES_NAME:
            raise InputError(f"curated benchmark lacks {CLASSES_NAME}", path=data_dir)
        if named[0] != manifest["known_classes"]:
            raise InputError(
                f"{CLASSES_NAME} does not match the manifest's known_classes", path=named[1]
            )
    return named[0] if named is not None else None


def _read_splits(
    split_files: dict[str, Path], *, published: bool, num_classes: int | None,
    allow_outside_root: bool,
) -> tuple[dict[str, list[tuple[str, int]]], dict[str, list[int]], dict[str, Path], int]:
    """Each split's entries and line numbers, the splits read against a folder of their own
    (a published open folder, `published_open_folder`; ``published``: a directory without a
    manifest), and the number of classes (without class names: from the train labels)."""
    entries: dict[str, list[tuple[str, int]]] = {}
    line_numbers: dict[str, list[int]] = {}
    split_roots: dict[str, Path] = {}
    for name in SPLITS:
        if name not in split_files:
            continue
        folder = (published_open_folder(split_files[name])
                  if published and name in OPEN_SPLITS else None)
        if folder is not None:
            split_roots[name] = folder
        entries[name], line_numbers[name] = _read_split(
            name, split_files[name], folder, published=published, num_classes=num_classes,
            allow_outside_root=allow_outside_root)
        if name == "train" and num_classes is None:
            num_classes = _contiguous_class_count(entries["train"], split_files["train"])
    assert num_classes is not None
    return entries, line_numbers, split_roots, num_classes


def _read_split(name: str, path: Path, folder: Path | None, *, published: bool,
                num_classes: int | None, allow_outside_root: bool,
                ) -> tuple[list[tuple[str, int]], list[int]]:
    """One split file (`read_split_lines`; read against ``folder`` when given). A published
    open list whose '/' paths have no folder beside it to be read against gets an InputError
    that says so."""
    try:
        return read_split_lines(
            path, num_classes=num_classes, allow_open=name in OPEN_SPLITS,
            allow_outside_root=allow_outside_root, slash_is_root=folder is not None,
        )
    except InputError as exc:
        expected = path.with_suffix("")
        if (published and name in OPEN_SPLITS and folder is None
                and "path leaves the image root" in str(exc)
                and str(exc.value).startswith("/")):
            raise InputError(
                f"{name} split: its paths start with '/', as in the published open lists, "
                f"which are read against the folder {expected} beside the list; that folder "
                "does not exist: unpack the open images there (or remove the list to train "
                "without the open split)", path=exc.path, line=exc.line,
                value=exc.value) from None
        raise


def _contiguous_class_count(train: list[tuple[str, int]], path: Path) -> int:
    """The number of classes of train labels without class names: one past the lowest label
    absent; InputError when a higher label is present (labels must be contiguous)."""
    present = {label for _, label in train}
    num_classes = next(label for label in range(len(present) + 1) if label not in present)
    if num_classes <= max(present):
        raise InputError(
            f"labels must be contiguous from 0 (without a classes.txt): label "
            f"{num_classes} has no train image but {max(present)} does",
            path=path,
            value=num_classes,
        )
    return num_classes


def _check_open_labels(entries: dict[str, list[tuple[str, int]]],
                       line_numbers: dict[str, list[int]], split_files: dict[str, Path]) -> None:
    """InputError naming the first line of an open split whose label is not -1."""
    for name in OPEN_SPLITS:
        for (path, label), line in zip(entries.get(name, ()), line_numbers.get(name, ())):
            if label != OPEN_LABEL:
                raise InputError(
                    f"{name} split holds only label -1", path=split_files[name], line=line,
                    value=label,
                )


def _train_counts(train: list[tuple[str, int]], class_names: list[str], path: Path,
                  ) -> np.ndarray:
    """Train images per class; InputError naming the first class without one."""
    train_counts = np.bincount(
        np.array([label for _, label in train], dtype=np.int64), minlength=len(class_names)
    )
    empty = np.flatnonzero(train_counts == 0)
    if empty.size:
        raise InputError(
            f"class {int(empty[0])} ({class_names[empty[0]]!r}) has no train image "
            f"({empty.size} classes without one)",
            path=path,
        )
    return train_counts


def _image_root(data_dir: Path, manifest: dict[str, Any] | None,
                image_root: str | os.PathLike[str] | None) -> Path:
    """Where split paths are looked up: ``image_root``, else the manifest's (relative to
    ``data_dir``), else ``data_dir``; InputError when it is not a folder."""
    if image_root is not None:
        root = Path(image_root).expanduser()
    elif manifest is not None:
        root = data_dir / manifest["image_root"]
    else:
        root = data_dir
    if not root.is_dir():
        raise InputError("image root not found", path=root)
    return root
