"""Crash-safe files: atomic writes (temporary file, fsync, rename), and the one way oltr reads text.

Every text file oltr reads (split files, class names, configs and protocols, JSON, histories) is
decoded by :func:`read_text`: UTF-8 with an optional byte-order mark, universal newlines, and an
``InputError`` naming the file when it is not UTF-8.

``kill -9`` at any moment leaves the previous or the new file, never a broken one; a killed
writer's temporary file (``.NAME.tmp-oltr-PID``, :func:`temporary_path`) is never read and is
removed by :func:`oltr.ownership.remove_stale_temporaries` once its process is gone (only in
directories oltr owns).
"""
from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from oltr.errors import InputError

#: oltr's temporary file names (group 1: the writer's PID); no other file is ever removed as one.
TEMPORARY_NAME = re.compile(r"\..+\.tmp-oltr-(\d+)")


def _read_umask() -> int:
    """The process's umask (read by setting it and setting it back: once, at import, before
    any thread of oltr's could create a file meanwhile)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def temporary_path(path: Path) -> Path:
    """Where :func:`atomic_write` writes ``path`` first: ``.NAME.tmp-oltr-PID`` beside it."""
    return path.with_name(f".{path.name}.tmp-oltr-{os.getpid()}")


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: readers see old or new.
    The file gets the mode a new file of the process gets (0666 less the umask), whatever mode
    ``write`` gave it (safetensors creates 0600 files)."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
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


#: Largest text file :func:`read_text` reads (split files of millions of lines fit): past it, or
#: on a device that never ends (``--config /dev/zero``), the read stops with an InputError
#: rather than running out of memory.
MAX_TEXT_BYTES = 1 << 30

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


class NotRegularFile(InputError):
    """A path that names a folder, FIFO, device or socket where a file is expected."""

    def __init__(self, what: str, path: str | os.PathLike[str], kind: str) -> None:
        self.what, self.kind = what, kind
        super().__init__(f"{what} is not a regular file ({kind})", path=path)

    def __reduce__(self):  # picklable (DataLoader workers), despite the keyword-only base
        return (type(self), (self.what, self.path, self.kind))


def open_for_reading(path: str | os.PathLike[str], what: str,
                     max_bytes: int | None = None) -> BinaryIO:
    """``path`` opened for binary reading once it is known to be a regular file: what a path
    *is* is checked on the opened descriptor (no race), before a byte is read.

    Opened non-blocking, so that a FIFO (``mkfifo x.png``) does not wait for a writer; a folder,
    FIFO, device or socket is a :class:`NotRegularFile` (``"{what} is not a regular file (a
    FIFO)"``), a file of more than ``max_bytes`` an InputError. ``FileNotFoundError`` and other
    ``OSError`` are the caller's to word."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a file")
            raise NotRegularFile(what, path, kind)
        if max_bytes is not None and info.st_size > max_bytes:
            raise InputError(f"{what} is too large ({info.st_size} bytes; at most {max_bytes})",
                             path=path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | os.PathLike[str], what: str, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (:func:`open_for_reading`; at most ``max_bytes``
    even if it grows while read)."""
    with open_for_reading(path, what, max_bytes) as handle:
        data = handle.read() if max_bytes is None else handle.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise InputError(f"{what} is too large (more than {max_bytes} bytes)", path=path)
    return data


#: The error for an empty path argument: ``Path("")`` is the current directory.
EMPTY_PATH = "an empty path (an unset variable?)"

_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def read_text(path: str | os.PathLike[str], what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The text of ``path`` (``what`` names the kind of file in errors, e.g. "split file").

    Decoded as UTF-8; a leading byte-order mark (U+FEFF, as Windows editors write) is dropped;
    line ends ``\\r\\n`` and ``\\r`` become ``\\n`` (Python's universal newlines). Raises
    InputError naming the file: ``"{what} not found"``, ``"cannot read {what} (reason)"``,
    ``"{what} is not a regular file (a FIFO)"`` (a folder, FIFO or device: checked before it
    is read, :func:`open_for_reading`), ``"{what} is too large (…)"`` (``max_bytes``), or
    ``"{what} is not UTF-8 text (reason at line N, byte B)"``.
    """
    path = Path(path)
    try:
        data = read_bytes(path, what, max_bytes)
    except FileNotFoundError:
        raise InputError(f"{what} not found", path=path) from None
    except OSError as exc:
        raise InputError(f"cannot read {what} ({exc.strerror or exc})", path=path) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if data.startswith(_UTF16_BOMS):
            reason = "it starts with a UTF-16 byte-order mark; save it as UTF-8"
        else:
            line = data.count(b"\n", 0, exc.start) + 1
            reason = f"{exc.reason} at line {line}, byte {exc.start}"
        raise InputError(f"{what} is not UTF-8 text ({reason})", path=path) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path`` (read by :func:`read_text`); any problem is an
    ``InputError`` naming the file (and line)."""
    text = read_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} is not valid JSON ({exc.msg})", path=path,
                         line=exc.lineno) from None
    except RecursionError:
        raise InputError(f"{what} is nested too deeply to be read as JSON", path=path) from None
    if not isinstance(data, dict):
        raise InputError(f"{what} must hold a JSON object", path=path)
    return data


_MERGE = "tag:yaml.org,2002:merge"


class DuplicateKey(yaml.YAMLError):
    """A YAML mapping writes a key twice; ``line`` and ``first`` are 1-based."""

    def __init__(self, key: Any, line: int, first: int) -> None:
        self.key, self.line, self.first = key, line, first
        super().__init__(f"key {key!r} is written twice (first on line {first})")


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose mappings refuse a key written twice (PyYAML keeps the last one
    silently): :class:`DuplicateKey`. Keys are compared as constructed (``1`` and ``"1"``
    differ, ``yes`` and ``true`` do not); keys brought in by a ``<<`` merge may be overridden.
    Every YAML file oltr reads is parsed by it."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            self._refuse_duplicates(node)
        return super().construct_mapping(node, deep=deep)

    def _refuse_duplicates(self, node: yaml.MappingNode) -> None:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE:
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKey(key, line, seen[key])
            except TypeError:  # unhashable: SafeLoader's own error follows
                continue
            seen[key] = line


def read_yaml_file(path: str | os.PathLike[str], what: str) -> Any:
    """The YAML document of ``path`` (read by :func:`read_text`, parsed by
    :class:`UniqueKeyLoader`): for files of the package itself; a user's YAML goes through
    ``oltr.config.load_yaml`` (bounded alias expansion, errors naming file and line)."""
    return yaml.load(read_text(path, what), Loader=UniqueKeyLoader)  # a SafeLoader
