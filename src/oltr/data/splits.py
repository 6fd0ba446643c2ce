"""Split files, the interchange format of ImageNet-LT / Places-LT (DESIGN.md §4).

One line per image: ``relative/path label``; the open label is ``-1``. The label is the last
whitespace-separated field, so a path that contains spaces still reads back. Blank lines are
tolerated; anything else that is not ``path label`` is an error naming the file and line.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

from oltr.errors import InputError

OPEN_LABEL = -1
_INTEGER = re.compile(r"[+-]?\d+")


def read_split_lines(
    path: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    allow_open: bool = True,
) -> tuple[list[tuple[str, int]], list[int]]:
    """Read a split file; return its ``(path, label)`` entries and their 1-based line numbers.

    Raises InputError (naming file, line and value) for a malformed line, a non-integer label,
    a label below -1 or ``>= num_classes``, ``-1`` when ``allow_open`` is false, a path listed
    twice, an empty file, or a missing / unreadable file.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise InputError("split file not found", path=path) from None
    except UnicodeDecodeError as exc:
        raise InputError(f"split file is not UTF-8 text ({exc.reason})", path=path) from None
    except OSError as exc:
        raise InputError(f"cannot read split file ({exc.strerror})", path=path) from None
    entries: list[tuple[str, int]] = []
    line_numbers: list[int] = []
    first_line_of: dict[str, int] = {}
    for line_number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2:
            raise InputError("expected 'path label'", path=path, line=line_number, value=raw)
        image_path, label_text = fields
        if not _INTEGER.fullmatch(label_text):
            raise InputError(
                "label is not an integer", path=path, line=line_number, value=label_text
            )
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
        if image_path in first_line_of:
            raise InputError(
                f"path listed twice (first on line {first_line_of[image_path]})",
                path=path,
                line=line_number,
                value=image_path,
            )
        first_line_of[image_path] = line_number
        entries.append((image_path, label))
        line_numbers.append(line_number)
    if not entries:
        raise InputError("split file is empty", path=path)
    return entries, line_numbers


def read_split_file(
    path: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    allow_open: bool = True,
) -> list[tuple[str, int]]:
    """Read a split file into ``(path, label)`` entries (validation as in `read_split_lines`)."""
    entries, _ = read_split_lines(path, num_classes=num_classes, allow_open=allow_open)
    return entries


def format_split(entries: Iterable[tuple[str, int]]) -> bytes:
    """Render entries as split-file bytes (``path label\\n`` per entry), validating each one."""
    lines = []
    for index, (image_path, label) in enumerate(entries):
        if (
            not image_path
            or image_path != image_path.strip()
            or "\n" in image_path
            or "\r" in image_path
        ):
            raise InputError(
                f"entry {index}: path cannot be written to a split file "
                "(empty, surrounding whitespace or a line break)",
                value=image_path,
            )
        if isinstance(label, bool) or int(label) != label or label < OPEN_LABEL:
            raise InputError(f"entry {index}: label must be an integer >= -1", value=label)
        lines.append(f"{image_path} {int(label)}\n")
    return "".join(lines).encode("utf-8")


def _default_file_mode() -> int:
    """The mode ``open()`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, rename."""
    path = Path(path)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, _default_file_mode())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_split_file(path: str | os.PathLike[str], entries: Iterable[tuple[str, int]]) -> None:
    """Write ``(path, label)`` entries as a split file, atomically."""
    atomic_write_bytes(path, format_split(entries))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
