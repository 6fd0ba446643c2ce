"""Crash-safe files: atomic writes (temporary file, fsync, rename) and checked JSON reads.

``kill -9`` at any moment leaves the previous or the new file, never a broken one; a killed
writer's temporary file (``.NAME.tmp-oltr-PID``, :func:`temporary_path`) is never read and is
removed by :func:`oltr.ownership.remove_stale_temporaries` once its process is gone (only in
directories oltr owns).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oltr.errors import InputError

#: oltr's temporary file names (group 1: the writer's PID); no other file is ever removed as one.
TEMPORARY_NAME = re.compile(r"\..+\.tmp-oltr-(\d+)")


def temporary_path(path: Path) -> Path:
    """Where :func:`atomic_write` writes ``path`` first: ``.NAME.tmp-oltr-PID`` beside it."""
    return path.with_name(f".{path.name}.tmp-oltr-{os.getpid()}")


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: readers see old or new."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; any problem is an ``InputError`` naming the file (and line)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{what} not found", path=path) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} is not valid JSON ({exc.msg})", path=path,
                         line=exc.lineno) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {what} ({exc})", path=path) from None
    if not isinstance(data, dict):
        raise InputError(f"{what} must hold a JSON object", path=path)
    return data
