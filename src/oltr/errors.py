"""Errors with a precise location: every bad input names its file, line and value."""
from __future__ import annotations

import os
import reprlib
import unicodedata
from os import PathLike
from typing import Any

#: How a value is shown in a message: bounded, whatever its size (a YAML alias bomb or a huge
#: list must not be formatted in full), the first items of a container then ``...``.
_VALUE_REPR = reprlib.Repr()
_VALUE_REPR.maxlevel = 3
_VALUE_REPR.maxstring = 160
_VALUE_REPR.maxother = 160
_VALUE_REPR.maxlong = 60
for _name in ("maxlist", "maxtuple", "maxdict", "maxset", "maxfrozenset", "maxdeque", "maxarray"):
    setattr(_VALUE_REPR, _name, 6)
MAX_VALUE_CHARS = 300


def bounded_repr(value: Any) -> str:
    """``repr(value)`` in at most ``MAX_VALUE_CHARS`` characters, whatever the value's size:
    strings keep their start and end, containers their first 6 items and 3 levels
    (``reprlib``), and anything still longer is cut with ``...``."""
    text = _VALUE_REPR.repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS - 3] + "..."


def one_line(text: str) -> str:
    """``text`` with every line break (and the spaces around it) turned into one space."""
    if "\n" not in text and "\r" not in text:
        return text
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def display_path(path: str | bytes | PathLike[str] | PathLike[bytes]) -> str:
    """``path`` as one printable line that any terminal encoding can show: a byte that is not
    valid in the file-system encoding (held as a lone surrogate by ``os.fsdecode``) becomes
    ``\\xNN``, control characters (a newline, a tab, an escape sequence) their ``repr``-style
    escape (``\\n``, ``\\t``, ``\\x1b``); everything else is kept as it is. The one form paths
    take in tables, CSV rows and error messages (a file named ``a\\nb.png`` cannot fake a
    row, an undecodable name cannot end a command with a UnicodeEncodeError)."""
    text = os.fsdecode(path)
    if text.isprintable() and not any("\udc80" <= ch <= "\udcff" for ch in text):
        return text
    out = []
    for ch in text:
        if "\udc80" <= ch <= "\udcff":  # an undecodable byte (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


class OltrError(Exception):
    """Base class of every error oltr raises on purpose."""


class InputError(OltrError, ValueError):
    """Bad user input (file, line, value). The message reads ``path:line: what (value: 'x')``;
    the value is shown with :func:`bounded_repr` and the message is kept on one line."""

    def __init__(
        self,
        message: str,
        *,
        path: str | PathLike[str] | None = None,
        line: int | None = None,
        value: Any = None,
    ) -> None:
        self.message = one_line(message)
        self.path = None if path is None else str(path)
        self.line = line
        self.value = value
        where = ""
        if self.path is not None:
            where = display_path(self.path) + (f":{line}" if line is not None else "") + ": "
        what = f" (value: {bounded_repr(value)})" if value is not None else ""
        super().__init__(f"{where}{one_line(message)}{what}")
