"""Errors with a precise location: every bad input names its file, line and value."""
from __future__ import annotations

from os import PathLike
from typing import Any


class OltrError(Exception):
    """Base class of every error oltr raises on purpose."""


class InputError(OltrError, ValueError):
    """Bad user input (file, line, value). The message reads ``path:line: what (value: 'x')``."""

    def __init__(
        self,
        message: str,
        *,
        path: str | PathLike[str] | None = None,
        line: int | None = None,
        value: Any = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.value = value
        where = ""
        if self.path is not None:
            where = self.path + (f":{line}" if line is not None else "") + ": "
        what = f" (value: {value!r})" if value is not None else ""
        super().__init__(f"{where}{message}{what}")
