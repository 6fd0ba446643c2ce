"""Errors with a precise location: every bad input names its file, line and value."""
from __future__ import annotations

import reprlib
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
            where = self.path + (f":{line}" if line is not None else "") + ": "
        what = f" (value: {bounded_repr(value)})" if value is not None else ""
        super().__init__(f"{where}{one_line(message)}{what}")
