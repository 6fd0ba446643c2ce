"""Split files, the interchange format of ImageNet-LT / Places-LT (docs/protocol.md).

One line per image: ``relative/path label``; the open label is ``-1``. The label is the last
whitespace-separated field, so a path that contains spaces still reads back. Blank lines are
tolerated; anything else that is not ``path label`` is an error naming the file and line.
Paths are relative to the image root: an absolute path or a ``..`` component (which would
leave it) is refused unless ``allow_outside_root`` is set (config ``data.allow_outside_root``);
where a path leads once symbolic links are resolved, and which paths name the same file, is
`oltr.data.paths`'s business. The file is read by `oltr.io.read_text` (UTF-8, optional
byte-order mark, any line ends).
"""
from __future__ import annotations

import hashlib
import operator
import os
import re
from collections.abc import Iterable
from pathlib import Path

from oltr.data.paths import OUTSIDE_ROOT_HINT, leaves_root
from oltr.errors import InputError
from oltr.io import atomic_write_bytes, open_for_reading, read_text

__all__ = ["OPEN_LABEL", "format_split", "leaves_root", "read_split_file", "read_split_lines",
           "sha256_file", "write_split_file"]

OPEN_LABEL = -1
_INTEGER = re.compile(r"[+-]?[0-9]+")
_MAX_LABEL_DIGITS = 9


def read_split_lines(
    path: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    allow_open: bool = True,
    allow_outside_root: bool = False,
    slash_is_root: bool = False,
) -> tuple[list[tuple[str, int]], list[int]]:
    """Read a split file; return its ``(path, label)`` entries and their 1-based line numbers.

    ``slash_is_root``: a leading ``/`` names the image root, not the file system's (the
    original OLTR loader joins ``root + line`` for such lines; `oltr.data.datasets.published_open_folder`), so it is
    dropped from the returned path.

    Raises InputError (naming file, line and value) for a malformed line, a non-integer label,
    a label below -1 or ``>= num_classes``, ``-1`` when ``allow_open`` is false, a path listed
    twice, a path that leaves the image root (unless ``allow_outside_root``), an empty file,
    or a missing / unreadable file. A UTF-8 byte-order mark is ignored.
    """
    path = Path(path)
    text = read_text(path, "split file")
    entries: list[tuple[str, int]] = []
    line_numbers: list[int] = []
    first_line_of: dict[str, int] = {}
    for line_number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        image_path, label_text = _path_and_label(raw, path, line_number,
                                                 slash_is_root=slash_is_root)
        label = _label(label_text, path, line_number, num_classes=num_classes,
                       allow_open=allow_open)
        _check_image_path(image_path, path, line_number, first_line_of,
                          allow_outside_root=allow_outside_root)
        first_line_of[image_path] = line_number
        entries.append((image_path, label))
        line_numbers.append(line_number)
    if not entries:
        raise InputError("split file is empty", path=path)
    return entries, line_numbers


def _path_and_label(raw: str, path: Path, line_number: int, *,
                    slash_is_root: bool) -> tuple[str, str]:
    """The image path and label text of a non-blank line (the label is the last field; with
    ``slash_is_root`` a leading '/' is dropped from the path). InputError unless both are
    there."""
    fields = raw.strip().rsplit(maxsplit=1)
    if len(fields) != 2:
        raise InputError("expected 'path label'", path=path, line=line_number, value=raw)
    image_path, label_text = fields
    if slash_is_root:
        image_path = image_path.lstrip("/")
        if not image_path:
            raise InputError("expected 'path label'", path=path, line=line_number, value=raw)
    return image_path, label_text


def _label(label_text: str, path: Path, line_number: int, *, num_classes: int | None,
           allow_open: bool) -> int:
    """The label of a line; InputError for a non-integer, one too large, one below -1, -1
    unless ``allow_open``, or one ``>= num_classes``."""
    if not _INTEGER.fullmatch(label_text):
        raise InputError(
            "label is not an integer", path=path, line=line_number, value=label_text
        )
    if len(label_text.lstrip("+-").lstrip("0")) > _MAX_LABEL_DIGITS:
        raise InputError("label is too large", path=path, line=line_number, value=label_text)
    label = int(label_text)
    if label < OPEN_LABEL:
        raise InputError(
            "label below -1 (the open label)", path=path, line=line_number, value=label_text
        )
    if label == OPEN_LABEL and not allow_open:
        raise InputError(
            "open label -1 is not allowed in this split",
            path=path,
            line=line_number,
            value=label_text,
        )
    if num_classes is not None and label >= num_classes:
        raise InputError(
            f"label out of range: there are {num_classes} classes (labels 0..{num_classes - 1})",
            path=path,
            line=line_number,
            value=label_text,
        )
    return label


def _check_image_path(image_path: str, path: Path, line_number: int,
                      first_line_of: dict[str, int], *, allow_outside_root: bool) -> None:
    """InputError for a path that leaves the image root (unless ``allow_outside_root``) or
    one listed on an earlier line (``first_line_of``)."""
    if not allow_outside_root and leaves_root(image_path):
        raise InputError(
            f"path leaves the image root (absolute or with a '..' component); "
            f"{OUTSIDE_ROOT_HINT}",
            path=path,
            line=line_number,
            value=image_path,
        )
    if image_path in first_line_of:
        raise InputError(
            f"path listed twice (first on line {first_line_of[image_path]})",
            path=path,
            line=line_number,
            value=image_path,
        )


def read_split_file(
    path: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    allow_open: bool = True,
    allow_outside_root: bool = False,
) -> list[tuple[str, int]]:
    """Read a split file into ``(path, label)`` entries (validation as in `read_split_lines`)."""
    entries, _ = read_split_lines(
        path, num_classes=num_classes, allow_open=allow_open,
        allow_outside_root=allow_outside_root,
    )
    return entries


def format_split(entries: Iterable[tuple[str, int]]) -> bytes:
    """Render entries as split-file bytes (``path label\\n`` per entry), validating each one.

    A path must read back unchanged: not empty, no surrounding whitespace, no line boundary
    (any that ``str.splitlines`` knows), no leading byte-order mark, encodable as UTF-8.
    """
    lines = []
    for index, (image_path, label) in enumerate(entries):
        if (
            not isinstance(image_path, str)
            or not image_path
            or image_path != image_path.strip()
            or image_path.splitlines() != [image_path]
            or image_path.startswith("\ufeff")
        ):
            raise InputError(
                f"entry {index}: path cannot be written to a split file "
                "(empty, surrounding whitespace, a line break or a byte-order mark)",
                value=image_path,
            )
        try:
            image_path.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(
                f"entry {index}: path is not encodable as UTF-8", value=image_path
            ) from None
        try:
            number = None if isinstance(label, bool) else operator.index(label)
        except TypeError:
            number = None
        if number is None or not OPEN_LABEL <= number < 10**_MAX_LABEL_DIGITS:
            raise InputError(
                f"entry {index}: label must be an integer >= -1 and < 10**{_MAX_LABEL_DIGITS}",
                value=label,
            )
        lines.append(f"{image_path} {number}\n")
    return "".join(lines).encode("utf-8")


def write_split_file(path: str | os.PathLike[str], entries: Iterable[tuple[str, int]]) -> None:
    """Write ``(path, label)`` entries as a split file, atomically."""
    atomic_write_bytes(path, format_split(entries))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open_for_reading(path, "file") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
