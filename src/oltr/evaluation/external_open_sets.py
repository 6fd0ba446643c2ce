"""External open sets (paper Tab. 2's far-away images): a folder of images or a split file, given
by the user (``oltr evaluate --open-set NAME=PATH``) and evaluated against the known test
images as one more open split."""
from __future__ import annotations

from pathlib import Path

from oltr.data.datasets import published_open_folder
from oltr.data.paths import IMAGE_EXTENSIONS, check_image_paths, walk_images
from oltr.data.splits import read_split_lines
from oltr.errors import InputError


def open_set_entries(spec: str | Path) -> tuple[list[tuple[str, int]], Path, Path | None]:
    """An external open set (paper Tab. 2's far-away images): a folder (every image under it,
    found by `oltr.data.paths.walk_images`) or a split file (``path label`` per line, paths
    relative to the file's folder — or, for ImageNet-LT's and Places-LT's published
    ``*_open.txt`` with its ``*_open/`` folder beside it, to that folder, a leading ``/``
    included (`oltr.data.datasets.published_open_folder`); labels are ignored — every image
    counts as open). Returns entries, image root and the split file.

    The user names this folder or file explicitly, so its images may lie anywhere: a split
    file may list absolute paths and paths with ``..``, and links in a folder may lead out of
    it (``data.allow_outside_root`` is about the benchmark's split files and does not apply).
    A link loop, an image reached twice or listed twice, and an empty path are InputErrors.
    """
    if not str(spec).strip():
        raise InputError("an external open set needs a path (a folder of images or a split "
                         "file)", value=str(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        images = walk_images(path, allow_outside_root=True)
        if not images:
            raise InputError("the open-set folder holds no image "
                             f"({', '.join(sorted(IMAGE_EXTENSIONS))})", path=path)
        return [(str(image.relative_to(path)), -1) for image in images], path, None
    if not path.exists():
        raise InputError("open set not found (give a folder of images or a split file)",
                         path=path)
    folder = published_open_folder(path)  # ImageNet_LT_open.txt → ImageNet_LT_open/
    root = path.parent if folder is None else folder
    entries, lines = read_split_lines(path, allow_open=True, allow_outside_root=True,
                                      slash_is_root=folder is not None)
    check_image_paths({"open": entries}, {"open": lines}, {"open": path}, root,
                      allow_outside_root=True)
    return [(image, -1) for image, _ in entries], root, path
