"""Embedding files read in row blocks: ``.npy`` (memory-mapped) and ``.safetensors`` (sliced).

A :class:`Vectors` is N embeddings of dimension d that are never loaded whole: :meth:`Vectors.blocks`
yields consecutive row blocks as float32 tensors on a device, L2-normalised, checking each block
for non-finite values and zero rows as it goes (so a million-row file is checked in one
streaming pass, and a bad row is reported by file and row).

File formats (``load_vectors``):

* ``.npy``: a 2-D float32 or float16 array (N, d), opened with ``numpy.load(mmap_mode="r")``;
* ``.safetensors``: one 2-D F32, F16 or BF16 tensor (N, d) — the only tensor of the file, or
  the one named ``key`` (default: ``embeddings`` when the file holds several), read by slices.

Labels (``load_labels``): a 1-D integer array (N,) in ``.npy`` or ``.safetensors`` (read whole:
8 MB for a million labels), or any in-memory integer sequence.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from oltr.errors import InputError

VECTOR_SUFFIXES = (".npy", ".safetensors")
_NPY_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_SAFETENSORS_INTEGERS = ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")
DEFAULT_KEY = "embeddings"

PathLike = Union[str, "os.PathLike[str]"]


class Vectors:
    """N embeddings (N, d) read in row blocks; see the module docstring for the file formats.

    Build with :meth:`from_file` or :func:`as_vectors` (which also takes an in-memory numpy
    array or torch tensor of any float dtype). ``name`` is what errors call it (the file path,
    or e.g. ``"gallery"``); ``path`` is the file, or None in memory.
    """

    def __init__(self, data: np.ndarray | torch.Tensor | None, name: str, *,
                 path: Path | None = None, key: str | None = None,
                 shape: tuple[int, int] | None = None) -> None:
        self.name, self.path, self._data, self._key = name, path, data, key
        if data is not None:
            shape = tuple(data.shape)  # type: ignore[assignment]
        if shape is None or len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            raise InputError("embeddings must be a non-empty 2-D array (N, d)", path=path,
                             value=None if path is not None else (name, shape))
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def dim(self) -> int:
        return self.shape[1]

    @classmethod
    def from_file(cls, path: PathLike, *, key: str | None = None) -> Vectors:
        """Open ``path`` (``.npy`` or ``.safetensors``) without reading its rows."""
        path = Path(path)
        if path.suffix not in VECTOR_SUFFIXES:
            raise InputError(f"unknown embeddings file type (valid: {', '.join(VECTOR_SUFFIXES)})",
                             path=path)
        if not path.is_file():
            raise InputError("embeddings file not found", path=path)
        if path.suffix == ".npy":
            array = _open_npy(path)
            if array.ndim != 2:
                raise InputError(f"embeddings must be a 2-D array (N, d), got shape "
                                 f"{tuple(array.shape)}", path=path)
            if array.dtype not in _NPY_DTYPES:
                raise InputError("embeddings must be float32 or float16", path=path,
                                 value=str(array.dtype))
            return cls(array, str(path), path=path)
        name, shape, dtype = _safetensors_entry(path, key)
        if dtype not in _SAFETENSORS_DTYPES:
            raise InputError(f"embeddings tensor '{name}' must be F32, F16 or BF16", path=path,
                             value=dtype)
        if len(shape) != 2:
            raise InputError(f"embeddings tensor '{name}' must be 2-D (N, d), got shape "
                             f"{tuple(shape)}", path=path)
        return cls(None, str(path), path=path, key=name, shape=(shape[0], shape[1]))

    def blocks(
        self, size: int, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, rows)`` for consecutive blocks of at most ``size`` rows: float32,
        L2-normalised, on ``device``. Raises :class:`InputError` naming the file and the
        (0-based) row of the first non-finite value or zero vector."""
        if self._data is None:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as handle:
                tensor = handle.get_slice(self._key)
                for start in range(0, len(self), size):
                    yield start, self._normalised(tensor[start:start + size], start, device)
            return
        for start in range(0, len(self), size):
            rows = self._data[start:start + size]
            if isinstance(rows, np.ndarray):
                rows = torch.from_numpy(np.array(rows))  # a copy: memory-mapped blocks are read-only
            yield start, self._normalised(rows, start, device)

    def _normalised(self, rows: torch.Tensor, start: int, device: torch.device | str
                    ) -> torch.Tensor:
        rows = rows.to(device=device, dtype=torch.float32)
        finite = torch.isfinite(rows).all(dim=1)
        if not bool(finite.all()):
            row = start + int(torch.nonzero(~finite)[0])
            raise self._row_error(f"row {row} (0-based) has a non-finite value (NaN or inf)")
        norms = torch.linalg.vector_norm(rows, dim=1)
        if not bool((norms > 0).all()):
            row = start + int(torch.nonzero(norms <= 0)[0])
            raise self._row_error(f"row {row} (0-based) is a zero vector: its cosine "
                                  "similarity is undefined")
        return F.normalize(rows, dim=1)

    def _row_error(self, message: str) -> InputError:
        if self.path is not None:
            return InputError(message, path=self.path)
        return InputError(f"{self.name}: {message}")


def _open_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"not a readable .npy array ({reason})", path=path) from None


def _safetensors_entry(path: Path, key: str | None) -> tuple[str, list[int], str]:
    """(name, shape, dtype) of the tensor to use in a safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            if key is None:
                if len(keys) == 1:
                    key = keys[0]
                elif DEFAULT_KEY in keys:
                    key = DEFAULT_KEY
                else:
                    raise InputError(f"the file holds {len(keys)} tensors; name the one to use "
                                     f"(none is called '{DEFAULT_KEY}')", path=path,
                                     value=sorted(keys)[:5])
            if key not in keys:
                raise InputError("no such tensor in the file", path=path, value=key)
            entry = handle.get_slice(key)
            return key, list(entry.get_shape()), entry.get_dtype()
    except SafetensorError as exc:
        raise InputError(f"not a readable .safetensors file ({exc})", path=path) from None


def as_vectors(value: Any, name: str, *, key: str | None = None) -> Vectors:
    """A :class:`Vectors` from a path (``.npy`` / ``.safetensors``), a numpy array or a torch
    tensor (N, d) of floats, or a :class:`Vectors` (returned as is). ``name`` labels errors."""
    if isinstance(value, Vectors):
        return value
    if isinstance(value, (str, os.PathLike)):
        return Vectors.from_file(value, key=key)
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise InputError(f"{name} embeddings must be floats", value=str(value.dtype))
        return Vectors(value.detach(), name)
    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise InputError(f"{name} embeddings must be floats", value=str(array.dtype))
    return Vectors(array, name)


def load_labels(value: Any, name: str, *, key: str | None = None) -> np.ndarray:
    """Integer labels (N,) as int64: from a path (``.npy`` / ``.safetensors`` holding one 1-D
    integer array) or an in-memory sequence / array / tensor. Raises :class:`InputError` for
    a missing or unreadable file, a shape other than (N,), or non-integer values."""
    path = None
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise InputError(f"{name} labels file not found", path=path)
        if path.suffix == ".npy":
            try:
                array = np.load(path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise InputError(f"not a readable .npy array ({exc})", path=path) from None
        elif path.suffix == ".safetensors":
            name_, _, dtype = _safetensors_entry(path, key)
            if dtype not in _SAFETENSORS_INTEGERS:
                raise InputError(f"{name} labels must be integers", path=path, value=dtype)
            from safetensors.numpy import load_file

            array = load_file(str(path))[name_]
        else:
            raise InputError(f"unknown labels file type (valid: {', '.join(VECTOR_SUFFIXES)})",
                             path=path)
    elif isinstance(value, torch.Tensor):
        array = value.detach().cpu().numpy()
    else:
        array = np.asarray(value)
    if array.ndim != 1:
        raise InputError(f"{name} labels must be 1-D (N,), got shape {tuple(array.shape)}",
                         path=path)
    if array.dtype.kind not in "iu":
        raise InputError(f"{name} labels must be integers", path=path, value=str(array.dtype))
    return array.astype(np.int64, copy=False)


def check_same_dim(*named: tuple[str, Vectors | None]) -> int:
    """The common dimension d of the given vectors; :class:`InputError` naming two that differ."""
    present = [(name, vectors) for name, vectors in named if vectors is not None]
    first_name, first = present[0]
    for name, vectors in present[1:]:
        if vectors.dim != first.dim:
            raise InputError(f"{name} embeddings have dimension {vectors.dim} but {first_name} "
                             f"embeddings have {first.dim}", path=vectors.path)
    return first.dim


__all__ = ["VECTOR_SUFFIXES", "Vectors", "as_vectors", "check_same_dim", "load_labels"]
