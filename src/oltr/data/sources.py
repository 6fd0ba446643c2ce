"""Labelled image sources that curation turns into open long-tailed benchmarks (docs/protocol.md).

A source is a list of classes and ``(key, class index)`` pairs for its training images (and its
own test split, if it has one). File-based sources (a folder per class, a split file) have an
``image_root`` and their keys are paths relative to it; array sources (Fashion-MNIST) hold
the pixels in memory, and curation exports the images it uses as PNG files.

Spec strings accepted by `parse_source`:

- ``fashion-mnist`` or ``fashion-mnist:ROOT`` — the four IDX files (see `find_fashion_mnist`);
- ``folder:PATH`` — one sub-folder per class, images found recursively inside each by
  `oltr.data.paths.walk_images` (symbolic links followed inside PATH; a loop, a folder or file
  reached twice, or a link leading out of PATH is an error naming the link);
- ``trainval:ROOT`` — ``ROOT/train/<class>/…`` (train) and, if present, ``ROOT/val/<class>/…``
  (the source's test split), each read as ``folder:``; keys are relative to ROOT, so split files
  read ``train/n01440764/n01440764_10026.JPEG 0`` and ``val/n01440764/ILSVRC2012_val_….JPEG 0``
  as ImageNet-LT's published files do (ImageNet with its val images sorted into class folders,
  Places365-standard's "easy directory structure"); a val class that train lacks is an error;
- ``splits:PATH`` — a split file (train) or a directory with one ``*train*.txt`` and optionally
  one ``*test*.txt``; class names from ``classes.txt`` / ``classnames.txt`` if present. One image
  file named twice (``x`` and ``./x``, a link, a hard link), in train or between train and test,
  is an error naming both lines.

Each kind (the part before ``:``) is registered in :data:`SOURCES` as a :class:`SourceKind`;
a kind of one's own is added with ``SOURCES.register("kind", SourceKind(load, forms=...))``.

Images are decoded by `oltr.data.images` and text files read by `oltr.io.read_text`.
"""
from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from oltr.data.images import load_image
from oltr.data.paths import IMAGE_EXTENSIONS, check_image_paths, walk_images
from oltr.data.splits import read_split_lines
from oltr.errors import InputError
from oltr.io import open_for_reading, read_text
from oltr.registry import Registry

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CACHE_DIR = Path.home() / ".cache" / "oltr"
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_CLASS_NAME_FILES = ("classes.txt", "classnames.txt")
#: Files that sit next to split files but are not splits (``open_classes.txt``: see curation).
NOT_SPLIT_FILES = frozenset({*_CLASS_NAME_FILES, "open_classes.txt"})
_FOLDER_OUTSIDE_HINT = ("pass allow_outside_root=True (oltr curate --allow-outside-root) to "
                        "follow it")


@dataclass
class Source:
    """A labelled image collection: class names, train (and optional test) ``(key, label)``.

    ``image_root`` is set for file-based sources (keys are paths relative to it); ``arrays``
    holds ``{"train": uint8[N, H, W], "test": ...}`` for array sources, whose keys read
    ``train/00012`` (split name / index).
    """

    name: str
    class_names: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]] | None = None
    image_root: Path | None = None
    arrays: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def needs_export(self) -> bool:
        """True for array sources: curation writes their images as PNG files."""
        return self.arrays is not None

    def _array_image(self, key: str) -> np.ndarray:
        assert self.arrays is not None
        split, _, index = key.partition("/")
        if split not in self.arrays or not index.isdigit():
            raise InputError(f"no image {key!r} in source {self.name!r}", value=key)
        images = self.arrays[split]
        position = int(index)
        if position >= len(images):
            raise InputError(f"no image {key!r} in source {self.name!r}", value=key)
        return images[position]

    def image_path(self, key: str) -> Path:
        """Path of a file-based source's image."""
        if self.image_root is None:
            raise InputError(f"source {self.name!r} holds arrays, not files", value=key)
        return self.image_root / key

    def load_image(self, key: str) -> Image.Image:
        """The decoded image for ``key`` (files: as `oltr.data.images.load_image` sees them)."""
        if self.arrays is not None:
            return Image.fromarray(self._array_image(key))
        return load_image(self.image_path(key))

    def export_image(self, key: str, dest_path: str | os.PathLike[str]) -> None:
        """Write the image for ``key`` to ``dest_path``: PNG for arrays, a byte copy for files."""
        dest_path = Path(dest_path)
        dest_path.parent.mkdir(parents=True, exist_ok=True)
        if self.arrays is not None:
            Image.fromarray(self._array_image(key)).save(dest_path, format="PNG")
        else:
            shutil.copyfile(self.image_path(key), dest_path)


# --- Fashion-MNIST -------------------------------------------------------------------------


def _idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _has_idx_files(directory: Path) -> bool:
    return all(_idx_file(directory, stem) is not None for stem in _IDX_FILES.values())


def find_fashion_mnist(root: str | os.PathLike[str] | None = None, download: bool = True) -> Path:
    """Directory holding the four Fashion-MNIST IDX files (gzipped or unpacked).

    Looks in ``root`` and ``root/FashionMNIST/raw`` (torchvision's layout) when ``root`` is
    given; otherwise in Debian's ``/usr/share/datasets/fashion-mnist`` and the cache
    ``~/.cache/oltr/FashionMNIST/raw``. If nothing is found and ``download`` is true, asks
    torchvision to download into ``root`` (or the cache). Raises one InputError saying where it
    looked and how to get the data otherwise.
    """
    base = Path(root).expanduser() if root is not None else None
    if base is not None:
        candidates = [base, base / "FashionMNIST" / "raw"]
    else:
        candidates = [FASHION_MNIST_SYSTEM_DIR, FASHION_MNIST_CACHE_DIR / "FashionMNIST" / "raw"]
    for candidate in candidates:
        if _has_idx_files(candidate):
            return candidate
    download_note = "download not attempted"
    if download:
        target = base if base is not None else FASHION_MNIST_CACHE_DIR
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(target), train=True, download=True)
            FashionMNIST(str(target), train=False, download=True)
        except (ImportError, OSError, RuntimeError, ValueError) as exc:
            download_note = f"torchvision download into {target} failed: {exc}"
        else:
            raw = target / "FashionMNIST" / "raw"
            if _has_idx_files(raw):
                return raw
            download_note = f"torchvision download into {target} left no IDX files in {raw}"
    looked = ", ".join(str(candidate) for candidate in candidates)
    raise InputError(
        f"Fashion-MNIST not found (looked in {looked}; {download_note}). Install it with "
        "'apt-get install dataset-fashion-mnist' or pass 'fashion-mnist:ROOT' with ROOT holding "
        "train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), "
        "t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz)"
    )


def read_idx(path: str | os.PathLike[str], *, expected_magic: int) -> np.ndarray:
    """Read an IDX file (gzipped if it ends in .gz) of unsigned bytes into a uint8 array.

    ``expected_magic`` is 2051 for images (N x rows x cols) or 2049 for labels (N).
    """
    path = Path(path)
    try:
        with open_for_reading(path, "IDX file") as raw:
            if path.suffix == ".gz":
                with gzip.GzipFile(fileobj=raw, mode="rb") as handle:
                    data = handle.read()
            else:
                data = raw.read()
    except FileNotFoundError:
        raise InputError("IDX file not found", path=path) from None
    except (OSError, EOFError) as exc:
        raise InputError(f"cannot read IDX file, truncated or corrupt ({exc})", path=path) from None
    dims = {_IDX_IMAGES_MAGIC: 3, _IDX_LABELS_MAGIC: 1}[expected_magic]
    header_size = 4 + 4 * dims
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic is not None and magic != expected_magic:
        raise InputError(
            f"not an IDX file of the expected kind: magic number {magic}, expected {expected_magic}",
            path=path,
            value=magic,
        )
    if len(data) < header_size:
        raise InputError(
            f"IDX file truncated: {len(data)} bytes, the header alone needs {header_size}",
            path=path,
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected_size = header_size + int(np.prod(shape))
    if len(data) != expected_size:
        state = "truncated" if len(data) < expected_size else "has trailing bytes"
        raise InputError(
            f"IDX file {state}: {len(data)} bytes, header {shape} needs {expected_size}",
            path=path,
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def _load_fashion_mnist(spec: str, root: str, allow_outside_root: bool = False) -> Source:
    """``fashion-mnist[:ROOT]`` (``allow_outside_root`` does not apply)."""
    directory = find_fashion_mnist(root or None)
    arrays: dict[str, np.ndarray] = {}
    splits: dict[str, list[tuple[str, int]]] = {}
    for split in ("train", "test"):
        images_path = _idx_file(directory, _IDX_FILES[f"{split}_images"])
        labels_path = _idx_file(directory, _IDX_FILES[f"{split}_labels"])
        assert images_path is not None and labels_path is not None
        images = read_idx(images_path, expected_magic=_IDX_IMAGES_MAGIC)
        labels = read_idx(labels_path, expected_magic=_IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise InputError(
                f"{len(images)} images but {len(labels)} labels in {labels_path.name}",
                path=images_path,
            )
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise InputError(
                f"label out of range 0..{len(FASHION_MNIST_CLASSES) - 1}",
                path=labels_path,
                value=int(labels.max()),
            )
        arrays[split] = images
        splits[split] = [(f"{split}/{index:05d}", int(label)) for index, label in enumerate(labels)]
    return Source(
        name=spec,
        class_names=list(FASHION_MNIST_CLASSES),
        train=splits["train"],
        test=splits["test"],
        arrays=arrays,
    )


# --- folder per class ----------------------------------------------------------------------


#: Class names that cannot be told apart from a rejection in predict's output (the answer
#: "unknown", label -1): refused at curation (compared without case and surrounding spaces).
RESERVED_CLASS_NAMES = ("unknown", "-1")


def check_class_name(name: str, path: str | os.PathLike[str]) -> None:
    """InputError naming ``path`` (the class's folder, or the list that names it) when
    ``name`` is one of :data:`RESERVED_CLASS_NAMES`."""
    if str(name).strip().lower() in RESERVED_CLASS_NAMES:
        raise InputError(f"class name {name!r} is reserved: predict answers 'unknown' (label -1) "
                         "for a rejected image; rename the class", path=path)


def _load_folder(spec: str, root_text: str, allow_outside_root: bool) -> Source:
    root = Path(root_text).expanduser()
    if not root.exists():
        raise InputError("image folder not found", path=root)
    if not root.is_dir():
        raise InputError("not a directory (folder:PATH wants one sub-folder per class)", path=root)
    images = walk_images(root, allow_outside_root=allow_outside_root,
                         outside_hint=_FOLDER_OUTSIDE_HINT)
    class_dirs = sorted(
        entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")
    )
    if not class_dirs:
        raise InputError("no class folders (folder:PATH wants one sub-folder per class)", path=root)
    for class_dir in class_dirs:
        check_class_name(class_dir.name, class_dir)
    label_of = {class_dir.name: label for label, class_dir in enumerate(class_dirs)}
    train: list[tuple[str, int]] = []
    for image in images:
        relative = image.relative_to(root)
        if len(relative.parts) < 2 or relative.parts[0] not in label_of:
            continue  # a file directly in PATH belongs to no class
        key = relative.as_posix()
        if key != key.strip() or "\n" in key or "\r" in key:
            raise InputError(
                "image path cannot go into a split file (surrounding whitespace or a "
                "line break)",
                path=image,
            )
        train.append((key, label_of[relative.parts[0]]))
    present = {label for _, label in train}
    for label, class_dir in enumerate(class_dirs):
        if label not in present:
            raise InputError(
                f"class folder {class_dir.name!r} holds no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))})",
                path=class_dir,
            )
    return Source(
        name=spec,
        class_names=[class_dir.name for class_dir in class_dirs],
        train=train,
        image_root=root.resolve(),
    )


def _load_train_val(spec: str, root_text: str, allow_outside_root: bool) -> Source:
    """``trainval:ROOT``: ROOT/train/<class>/ is the train pool, ROOT/val/<class>/ (optional)
    the source's test split; keys relative to ROOT (see the module docstring)."""
    root = Path(root_text).expanduser()
    if not root.is_dir():
        raise InputError("image folder not found (trainval:ROOT wants ROOT/train/<class>/ and "
                         "ROOT/val/<class>/)", path=root)
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir():
        raise InputError("no train folder (trainval:ROOT wants ROOT/train/<class>/ and "
                         "ROOT/val/<class>/)", path=train_dir)
    train = _load_folder(f"folder:{train_dir}", str(train_dir), allow_outside_root)
    test = None
    if val_dir.is_dir():
        val = _load_folder(f"folder:{val_dir}", str(val_dir), allow_outside_root)
        label_of = {name: label for label, name in enumerate(train.class_names)}
        unknown = [name for name in val.class_names if name not in label_of]
        if unknown:
            raise InputError(f"val class folder has no train folder ({len(unknown)} such "
                             "classes)", path=val_dir / unknown[0])
        test = [(f"val/{key}", label_of[val.class_names[label]]) for key, label in val.train]
    return Source(
        name=spec,
        class_names=train.class_names,
        train=[(f"train/{key}", label) for key, label in train.train],
        test=test,
        image_root=root.resolve(),
    )


# --- split files ---------------------------------------------------------------------------


def find_split_file(directory: Path, name: str, *, required: bool) -> Path | None:
    """The split file ``name`` (train, val, test, open, val_open) in ``directory``: the one file
    matching ``*{name}*.txt`` other than the companion files ``classes.txt``, ``classnames.txt``
    and ``open_classes.txt`` (`NOT_SPLIT_FILES`), and other than ``*val_open*`` files for the
    other splits. InputError when several match, or none does and
    ``required``."""
    pattern = f"*{name}*.txt"
    # ``*open*`` and ``*val*`` must not also take the validation open split (val_open.txt)
    excluded = () if name == "val_open" else ("val_open",)
    matches = sorted(path for path in directory.glob(pattern)
                     if _not_a_folder(path) and path.name not in NOT_SPLIT_FILES
                     and not any(word in path.name for word in excluded))
    if len(matches) > 1:
        names = ", ".join(path.name for path in matches)
        raise InputError(f"several files match {pattern!r}: {names}", path=directory)
    if not matches:
        if required:
            hint = ""
            if any(entry.is_dir() for entry in directory.iterdir()) and not any(
                    directory.glob("*.txt")):
                hint = (" (a folder of class sub-folders? curate it first: "
                        f"oltr curate folder:{directory} --out DIR)")
            raise InputError(f"no file matches {pattern!r}{hint}", path=directory)
        return None
    return matches[0]


def _not_a_folder(path: Path) -> bool:
    """Whether ``path`` names something to read as a file: a FIFO or device by a split or
    class-name file's name is then refused by name when it is read (`oltr.io.read_text`), not
    silently passed over as ``is_file()`` would."""
    return path.exists() and not path.is_dir()


def read_class_names(directory: Path) -> tuple[list[str], Path] | None:
    """Class names from ``classes.txt`` or ``classnames.txt`` in ``directory`` (index = line;
    read by `oltr.io.read_text`: a byte-order mark is not part of the first name)."""
    for file_name in _CLASS_NAME_FILES:
        path = directory / file_name
        if _not_a_folder(path):
            lines = read_text(path, "class-name file").splitlines()
            names = [line.strip() for line in lines]
            while names and not names[-1]:
                names.pop()
            for line_number, name in enumerate(names, start=1):
                if not name:
                    raise InputError("empty class name", path=path, line=line_number)
                if names.index(name) != line_number - 1:
                    raise InputError(
                        f"class name repeats line {names.index(name) + 1}",
                        path=path,
                        line=line_number,
                        value=name,
                    )
            if not names:
                raise InputError("class-name file is empty", path=path)
            return names, path
    return None


def _load_splits(
    spec: str,
    path_text: str,
    allow_outside_root: bool,
    image_root: str | os.PathLike[str] | None = None,
) -> Source:
    path = Path(path_text).expanduser()
    if not path.exists():
        raise InputError("split file or directory not found", path=path)
    if path.is_dir():
        train_file = find_split_file(path, "train", required=True)
        test_file = find_split_file(path, "test", required=False)
        directory = path
    else:
        train_file, test_file, directory = path, None, path.parent
    assert train_file is not None
    named = read_class_names(directory)
    num_classes = len(named[0]) if named is not None else None
    train, train_lines = read_split_lines(train_file, num_classes=num_classes, allow_open=False,
                                          allow_outside_root=allow_outside_root)
    present = {label for _, label in train}
    if num_classes is None:
        num_classes = max(present) + 1
    if len(present) < num_classes:
        first_missing = next(label for label in range(num_classes) if label not in present)
        raise InputError(
            f"labels must cover 0..{num_classes - 1}; label {first_missing} has no image "
            f"({num_classes - len(present)} labels missing)",
            path=train_file,
            value=first_missing,
        )
    entries, lines, files = {"train": train}, {"train": train_lines}, {"train": train_file}
    test = None
    if test_file is not None:
        test, lines["test"] = read_split_lines(test_file, num_classes=num_classes,
                                               allow_open=False,
                                               allow_outside_root=allow_outside_root)
        entries["test"], files["test"] = test, test_file
    root = Path(image_root).expanduser() if image_root is not None else directory
    if not root.is_dir():
        raise InputError("image root not found", path=root)
    check_image_paths(entries, lines, files, root, allow_outside_root=allow_outside_root)
    class_names = named[0] if named is not None else [f"class_{i}" for i in range(num_classes)]
    return Source(
        name=spec,
        class_names=class_names,
        train=train,
        test=test,
        image_root=root.resolve(),
    )


@dataclass(frozen=True)
class SourceKind:
    """A registered kind of source spec, ``KIND`` or ``KIND:ARGUMENT``.

    Attributes:
        load: ``load(spec, argument, allow_outside_root=…[, image_root=…])`` → :class:`Source`
            (``image_root`` is passed only when given, and only to a kind that takes it).
        forms: how a spec of this kind is written, for messages (``folder:PATH``).
        needs_argument: a spec without ``:ARGUMENT`` is refused.
        takes_image_root: the kind accepts ``image_root``.
    """

    load: Callable[..., Source]
    forms: tuple[str, ...]
    needs_argument: bool = True
    takes_image_root: bool = False

    def __call__(self, spec: str, argument: str, **options: object) -> Source:
        return self.load(spec, argument, **options)


#: Every kind of source :func:`parse_source` reads, by the part of the spec before ``:``.
SOURCES: Registry[SourceKind] = Registry("source")
SOURCES.register("fashion-mnist", SourceKind(_load_fashion_mnist,
                                             ("fashion-mnist", "fashion-mnist:ROOT"),
                                             needs_argument=False))
SOURCES.register("folder", SourceKind(_load_folder, ("folder:PATH",)))
SOURCES.register("trainval", SourceKind(_load_train_val, ("trainval:ROOT",)))
SOURCES.register("splits", SourceKind(_load_splits, ("splits:PATH",), takes_image_root=True))


def parse_source(
    spec: str,
    *,
    image_root: str | os.PathLike[str] | None = None,
    allow_outside_root: bool = False,
) -> Source:
    """Load the source named by ``spec`` (see the module docstring for the accepted forms; a
    kind of :data:`SOURCES`).

    ``image_root`` applies to ``splits:`` sources only (default: the split file's directory).
    ``allow_outside_root``: split-file paths may be absolute, contain ``..`` or lead out of the
    image root through a symbolic link; a ``folder:`` source may follow links out of PATH.

    Raises:
        InputError: an unknown kind (listing the accepted forms), a missing path,
            ``image_root`` for a kind that does not take it, or what the loader refuses.
    """
    kind, _, argument = spec.partition(":")
    if image_root is not None and not (kind in SOURCES and SOURCES[kind].takes_image_root):
        where = " or ".join(f"'{form}'" for entry in SOURCES.values() if entry.takes_image_root
                            for form in entry.forms)
        raise InputError(f"image_root applies to {where} sources only", value=spec)
    if kind not in SOURCES:
        forms = [form for entry in SOURCES.values() for form in entry.forms]
        raise InputError(f"unknown source; expected one of {', '.join(forms)}", value=spec)
    if SOURCES[kind].needs_argument and not argument:
        raise InputError(f"'{kind}:' needs a path, as in '{kind}:PATH'", value=spec)
    return SOURCES.create(kind, spec, argument, allow_outside_root=allow_outside_root,
                          image_root=image_root)
