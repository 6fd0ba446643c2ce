"""Where an image file is, decided once: its identity, whether it stays in the image root, and
the one traversal of a folder of images.

- **Identity.** Two spellings name the same image when they lead to the same file:
  ``c0/img.png``, ``./c0/img.png``, ``c0//img.png``, ``link/img.png`` (a symbolic link to
  ``c0``) and a hard link all do. `ImageLocator.resolve` gives each path its resolved location
  (``os.path.realpath``) and an identity key: ``(st_dev, st_ino)`` of the file when it exists
  (POSIX's notion of "the same file", as ``os.path.samefile``), else its resolved location.
  `check_image_paths` (used by `oltr.data.datasets.load_benchmark`, the ``splits:`` source and
  external open-set lists) and `walk_images` compare images by this key, never by the text of
  a path.
- **Containment.** A split-file path must stay inside the image root twice over: lexically
  (no absolute path, no ``..``: `leaves_root`) and after symbolic links are resolved
  (`ImageLocator.contains`), unless the caller allows outside-root paths
  (``data.allow_outside_root`` / ``oltr curate --allow-outside-root``).
- **Traversal.** `walk_images` is the one walk over a folder of images (the ``folder:`` source,
  external open-set folders): it follows symbolic links, refuses a loop (a link back to a folder
  it is inside), a folder reached twice, a broken link and, unless allowed, a link that leads out
  of the root, each with an InputError naming the link.

Cost: one ``lstat`` per path plus one ``realpath`` per distinct folder (cached), so checking
ImageNet-LT's 186k split entries takes well under a few seconds.
"""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from oltr.errors import InputError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}
)
OUTSIDE_ROOT_HINT = ("set data.allow_outside_root: true (oltr curate: --allow-outside-root) to "
                     "allow it")


def leaves_root(image_path: str) -> bool:
    """True if ``image_path`` is absolute or has a ``..`` component (it can leave the root)."""
    pure = PurePosixPath(image_path)
    return pure.is_absolute() or ".." in pure.parts


def is_inside(real_path: str, real_root: str) -> bool:
    """True if the resolved ``real_path`` is ``real_root`` or lies below it (both realpaths)."""
    if real_path == real_root:
        return True
    prefix = real_root if real_root.endswith(os.sep) else real_root + os.sep
    return real_path.startswith(prefix)


@dataclass(frozen=True)
class ResolvedImage:
    """Where an image path leads: ``real_path`` (symbolic links resolved) and ``identity``
    (``(st_dev, st_ino)`` of an existing file, else ``("missing", real_path)``)."""

    real_path: str
    identity: Hashable

    @property
    def exists(self) -> bool:
        return not _is_missing(self.identity)


def _is_missing(identity: Hashable) -> bool:
    """Whether an identity from `ImageLocator.locate` is that of a file that does not exist."""
    return isinstance(identity, tuple) and identity[:1] == ("missing",)


class ImageLocator:
    """Resolves image paths relative to one image ``root`` (absolute paths are taken as they
    are); caches the resolved location of each folder, so a split file of N images under F
    folders costs N ``lstat`` calls and F ``realpath`` calls. Paths use '/' (POSIX)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        self.real_root = os.path.realpath(self.root)
        self._prefix = self.real_root.rstrip("/") + "/"
        self._folders: dict[str, str] = {}

    def locate(self, image_path: str) -> tuple[str, Hashable]:
        """``(real_path, identity)`` of ``image_path``: the fast form of `resolve`."""
        full = image_path if image_path.startswith("/") else f"{self.root}/{image_path}"
        cut = full.rfind("/")
        name = full[cut + 1:]
        if name in ("", ".", ".."):
            real = os.path.realpath(full)
        else:
            folder = full[:cut] or "/"
            real_folder = self._folders.get(folder)
            if real_folder is None:
                real_folder = self._folders[folder] = os.path.realpath(folder)
            real = (real_folder if real_folder != "/" else "") + "/" + name
        try:
            info = os.lstat(real)
            if stat.S_ISLNK(info.st_mode):
                real = os.path.realpath(real)
                info = os.stat(real)
        except (OSError, ValueError):
            return real, ("missing", real)
        return real, (info.st_dev, info.st_ino)

    def resolve(self, image_path: str) -> ResolvedImage:
        """Resolved location and identity of ``image_path`` (relative to the root)."""
        return ResolvedImage(*self.locate(image_path))

    def contains(self, resolved: ResolvedImage | str) -> bool:
        """True if ``resolved`` (or a real path) lies inside the (resolved) image root."""
        real = resolved if isinstance(resolved, str) else resolved.real_path
        return real.startswith(self._prefix) or real == self.real_root


def image_identity(path: str | os.PathLike[str]) -> Hashable:
    """The identity key of one image file (see the module docstring)."""
    full = os.fspath(path)
    return ImageLocator(os.path.dirname(full) or ".").resolve(os.path.basename(full)).identity


def first_repeat(identities: Iterable[Hashable]) -> tuple[int, int] | None:
    """``(first, second)`` positions of the first identity seen twice, or None."""
    seen: dict[Hashable, int] = {}
    for position, identity in enumerate(identities):
        if identity in seen:
            return seen[identity], position
        seen[identity] = position
    return None


def check_image_paths(
    entries: Mapping[str, Sequence[tuple[str, int]]],
    line_numbers: Mapping[str, Sequence[int]],
    split_files: Mapping[str, str | os.PathLike[str]],
    image_root: str | os.PathLike[str],
    *,
    allow_outside_root: bool = False,
    require_existing: bool = False,
) -> None:
    """Check the image paths of split lists (``entries[name]`` read from ``split_files[name]``,
    ``line_numbers[name]`` its lines) against one ``image_root``: InputError naming the split
    file, line and path for an image whose resolved location leaves ``image_root`` through a
    symbolic link (unless ``allow_outside_root``), and for one image file listed twice — in two
    splits, or twice in one under two spellings, compared by identity (`ImageLocator`) — naming
    the other line and spelling too. ``require_existing``: also for a listed file that does not
    exist (the first such line, with how many of its split are missing and, when none of a
    split is found, the image root to check). Used for benchmarks, the ``splits:`` source and
    external open-set lists."""
    locator = ImageLocator(image_root)
    locate, contains = locator.locate, locator.contains
    first: dict[Hashable, tuple[str, int, str]] = {}
    missing: dict[str, list[tuple[int, str]]] = {}
    for name, split_entries in entries.items():
        for (path, _), line in zip(split_entries, line_numbers[name]):
            real, identity = locate(path)
            if require_existing and _is_missing(identity):
                missing.setdefault(name, []).append((line, real))
            if not allow_outside_root and not contains(real):
                raise InputError(
                    f"path leads outside the image root {locator.real_root} through a symbolic "
                    f"link (to {real}); {OUTSIDE_ROOT_HINT}",
                    path=split_files[name], line=line, value=path,
                )
            if identity in first:
                other_split, other_line, other_path = first[identity]
                spelled = "" if other_path == path else f" as {other_path!r}"
                if other_split == name:
                    message = (f"image listed twice (first on line {other_line}{spelled}: the "
                               "same file)")
                else:
                    message = (f"image also listed in {split_files[other_split]} line "
                               f"{other_line}{spelled}; splits must not share images")
                raise InputError(message, path=split_files[name], line=line, value=path)
            first[identity] = (name, line, path)
    for name, lost in missing.items():
        line, real = lost[0]
        total = len(entries[name])
        if len(lost) == total:
            detail = (f"none of the {total} images of this split is found under the image root "
                      f"{locator.root}: is data.image_root (--image-root) the folder the "
                      "split file's paths are relative to?")
        elif len(lost) > 1:
            detail = f"{len(lost) - 1} more of the {total} images of this split are missing"
        else:
            detail = "the split's other images are found"
        raise InputError(f"image not found: {real} ({detail})", path=split_files[name],
                         line=line)


def walk_images(
    folder: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    allow_outside_root: bool = False,
    outside_hint: str = OUTSIDE_ROOT_HINT,
    extensions: frozenset[str] = IMAGE_EXTENSIONS,
) -> list[Path]:
    """Every image file under ``folder`` (recursively; names starting with '.' are skipped),
    as lexical paths below ``folder``, sorted.

    Symbolic links are followed after checking where they lead. InputError naming the link
    for a link loop (a link to the folder it is in or to one above it), a folder reached
    twice (through a link), a broken link, and, unless ``allow_outside_root``, a link that
    leads outside ``root`` (default: ``folder``) — ``outside_hint`` says how to allow it.
    The same file reached under two names (a link, or a hard link) is an InputError naming
    both. An image is a file whose name ends in one of ``extensions`` (case-insensitive).
    """
    folder = Path(folder)
    real_root = os.path.realpath(root if root is not None else folder)
    real_folder = os.path.realpath(folder)
    visited: dict[str, Path] = {real_folder: folder}
    found: list[tuple[Path, Hashable]] = []
    # (lexical folder, its resolved location, the resolved folders above it and itself)
    stack: list[tuple[Path, str, frozenset[str]]] = [(folder, real_folder,
                                                       frozenset({real_folder}))]
    while stack:
        directory, real_directory, above = stack.pop()
        subfolders = []
        for entry in _folder_entries(directory):
            path = directory / entry.name
            target, is_folder = _entry_target(entry, path, real_directory, real_root,
                                              allow_outside_root=allow_outside_root,
                                              outside_hint=outside_hint)
            if is_folder:
                _check_new_folder(path, target, above, visited)
                visited[target] = path
                subfolders.append((path, target, above | {target}))
            elif Path(entry.name).suffix.lower() in extensions:
                found.append((path, _file_identity(entry, path)))
        stack.extend(reversed(subfolders))
    found.sort(key=lambda item: item[0])
    _check_listed_once(found)
    return [path for path, _ in found]


def _folder_entries(directory: Path) -> list[os.DirEntry[str]]:
    """The entries of ``directory`` by name, without those starting with '.'; InputError when
    it cannot be listed."""
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError as exc:
        raise InputError(f"cannot list folder ({exc.strerror or exc})",
                         path=directory) from None
    return [entry for entry in entries if not entry.name.startswith(".")]


def _entry_target(entry: os.DirEntry[str], path: Path, real_directory: str, real_root: str, *,
                  allow_outside_root: bool, outside_hint: str) -> tuple[str, bool]:
    """Where a folder entry leads (a symbolic link resolved) and whether that is a folder.
    InputError naming the link for a link loop, a broken link, or (unless
    ``allow_outside_root``) a link leading outside ``real_root``."""
    if not entry.is_symlink():
        try:
            is_folder = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_folder = False
        return os.path.join(real_directory, entry.name), is_folder
    try:
        target = os.path.realpath(path, strict=True)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError("symbolic link loop (the link leads back to itself)",
                             path=path) from None
        raise InputError("broken symbolic link (it leads to nothing)", path=path) from None
    if not allow_outside_root and not is_inside(target, real_root):
        raise InputError(f"symbolic link leads outside the image root {real_root} "
                         f"(to {target}); {outside_hint}", path=path)
    return target, os.path.isdir(target)


def _check_new_folder(path: Path, target: str, above: frozenset[str],
                      visited: dict[str, Path]) -> None:
    """InputError when the folder ``path`` leads to (``target``) is one it lies inside (a
    link loop) or one already walked (``visited``: reached through a link)."""
    if target in above:
        raise InputError(f"symbolic link loop: the link leads back to {target}, a "
                         "folder it is inside, so every image below would be "
                         "listed again and again", path=path)
    if target in visited:
        raise InputError(f"folder reached twice (also as {visited[target]}; a "
                         "symbolic link leads there): its images would be listed "
                         "twice", path=path)


def _file_identity(entry: os.DirEntry[str], path: Path) -> Hashable:
    """The identity of the file an entry names (device and inode, a link followed);
    InputError when it cannot be read."""
    try:
        info = entry.stat()  # follows a link: the identity of the file itself
    except OSError as exc:
        raise InputError(f"cannot read image ({exc.strerror or exc})", path=path) from None
    return (info.st_dev, info.st_ino)


def _check_listed_once(found: list[tuple[Path, Hashable]]) -> None:
    """InputError naming the second path of the first file reached under two names."""
    repeat = first_repeat(identity for _, identity in found)
    if repeat is not None:
        first, second = found[repeat[0]][0], found[repeat[1]][0]
        raise InputError(f"the same image file as {first} (reached through a symbolic or hard "
                         "link): an image must be listed once", path=second)
