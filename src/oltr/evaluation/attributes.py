"""Attributes of face-identification probes (paper Tab. 4's per-attribute columns): a
tab-separated file of identity → value, read and matched to the probes'
identities (:func:`read_attributes`), for :class:`oltr.evaluation.identification.
IdentificationProtocol`'s figures per attribute value."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from oltr.errors import InputError
from oltr.evaluation.vectors import load_labels

ATTRIBUTE_KEYS = ("identity", "probe_index")


def read_attributes(path: str | os.PathLike[str], probe_labels: Any
                    ) -> tuple[str, list[str | None]]:
    """Attribute value of each probe from a UTF-8 text file; returns ``(name, values)``.

    Format: blank lines and lines starting with ``#`` are skipped; the first other line is the
    header ``identity<TAB>NAME`` (keys are probe identities) or ``probe_index<TAB>NAME`` (keys
    are 0-based probe rows), NAME naming the attribute (e.g. ``gender``); every further line
    is ``KEY<TAB>VALUE`` with an integer key, e.g. ``17<TAB>female``. A probe not listed has
    no value (None). Keys of identities that have no probe are allowed (one file can serve
    several probe sets). Raises :class:`InputError` naming file:line for a missing or bad
    header, a row without exactly two tab-separated fields, a key that is not an integer, an
    empty value, a repeated key, or a probe index outside [0, P).
    """
    path = Path(path)
    labels = load_labels(probe_labels, "probe")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("attribute file not found", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the attribute file ({exc})", path=path) from None
    key_kind: str | None = None
    name = ""
    mapping: dict[int, str] = {}
    first_line: dict[int, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split("\t")
        if key_kind is None:
            if len(fields) != 2 or fields[0].strip() not in ATTRIBUTE_KEYS or not fields[1].strip():
                raise InputError("the header must be 'identity<TAB>NAME' or "
                                 "'probe_index<TAB>NAME'", path=path, line=number, value=line)
            key_kind, name = fields[0].strip(), fields[1].strip()
            continue
        if len(fields) != 2:
            raise InputError(f"expected 2 tab-separated fields (key, value), got {len(fields)}",
                             path=path, line=number, value=line)
        key_text, value = fields[0].strip(), fields[1].strip()
        try:
            key = int(key_text)
        except ValueError:
            raise InputError(f"the {key_kind} is not an integer", path=path, line=number,
                             value=key_text) from None
        if not value:
            raise InputError("empty attribute value", path=path, line=number, value=line)
        if key in mapping:
            raise InputError(f"repeated {key_kind} (first on line {first_line[key]})",
                             path=path, line=number, value=key)
        if key_kind == "probe_index" and not 0 <= key < len(labels):
            raise InputError(f"probe index outside [0, {len(labels)})", path=path, line=number,
                             value=key)
        mapping[key], first_line[key] = value, number
    if key_kind is None:
        raise InputError("the attribute file has no header ('identity<TAB>NAME' or "
                         "'probe_index<TAB>NAME')", path=path)
    if key_kind == "identity":
        return name, [mapping.get(int(label)) for label in labels]
    return name, [mapping.get(index) for index in range(len(labels))]


def attribute_values(attributes: Any, labels: np.ndarray) -> tuple[str, list[str | None]]:
    """``(attribute name, one value or None per probe)`` from an attribute file
    (:func:`read_attributes`), a mapping identity → value, or one value per probe.

    Raises:
        InputError: a bad file, or a per-probe list of another length than ``labels``.
    """
    if isinstance(attributes, (str, os.PathLike)):
        return read_attributes(attributes, labels)
    if isinstance(attributes, Mapping):
        return "attribute", [_value(attributes.get(int(label))) for label in labels]
    values = [_value(value) for value in attributes]
    if len(values) != len(labels):
        raise InputError(f"attributes have {len(values)} entries but there are {len(labels)} "
                         "probes")
    return "attribute", values


def _value(value: Any) -> str | None:
    return None if value is None else str(value)
