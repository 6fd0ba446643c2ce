"""The one way images are batched, and the one way a bad input leaves a DataLoader worker.

With ``num_workers > 0``, PyTorch re-raises an exception of a worker process in the main
process as ``type(exc)(traceback_text)``: a one-line InputError would arrive as an 18-line
traceback. `ImageLoader` (a ``torch.utils.data.DataLoader``; every loader oltr builds is one)
therefore never lets an InputError cross the process boundary: its dataset wrapper returns a
picklable `LoadFailure` record instead of raising, the collate function passes the record on
as the batch, and the main process raises the original InputError — the same one-line message,
file, line and value as with ``num_workers=0``.

The collate function also checks that the images of a batch have one size: images of
different sizes (``data.transform: none`` on a folder of mixed sizes) are an InputError naming
the first image whose size differs from the batch's first image (split file and line), and
saying to use a resizing transform, instead of ``torch.stack``'s 46-line traceback.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from oltr.errors import InputError


@dataclass(frozen=True)
class LoadFailure:
    """A picklable record of an InputError raised while loading an item: its full message
    and its ``path``, ``line`` and ``value``."""

    message: str
    path: str | None = None
    line: int | None = None
    value: Any = None

    @classmethod
    def of(cls, error: InputError) -> LoadFailure:
        return cls(str(error), error.path, error.line, error.value)

    def error(self) -> InputError:
        """The InputError again: same message (``str``), path, line and value."""
        error = InputError(self.message)
        error.path, error.line, error.value = self.path, self.line, self.value
        return error


def first_size_mismatch(images: Sequence[torch.Tensor]) -> int | None:
    """Position of the first image whose shape differs from ``images[0]``'s, or None."""
    return next((i for i, image in enumerate(images) if image.shape != images[0].shape), None)


def size_mismatch_message(image: object, shape: Sequence[int], first_image: object,
                          first_shape: Sequence[int]) -> str:
    """Why a batch of ``(C, H, W)`` images cannot be stacked, and what to do about it."""
    def size(s: Sequence[int]) -> str:
        if len(s) != 3:
            return f"{s[-1]}x{s[-2]} pixels"
        return f"{s[-1]}x{s[-2]} pixels, {s[0]} channel{'' if s[0] == 1 else 's'}"

    return (f"image {image} is {size(shape)}, but {first_image}, the first image of its "
            f"batch, is {size(first_shape)}: images of different sizes need a resizing "
            "transform (data.transform: small or imagenet, not none)")


class _Guarded(Dataset):
    """Item ``i`` of ``dataset`` as ``(i, item)``, or a LoadFailure instead of an InputError."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any] | LoadFailure:
        try:
            return index, self.dataset[index]
        except InputError as exc:
            return LoadFailure.of(exc)


class _Collate:
    """Batch ``(index, (image, label))`` items; pass a LoadFailure on as the batch; a batch of
    mixed image sizes becomes a LoadFailure naming the first image that differs. ``collate``
    replaces the default batching of the items (e.g. ``list``)."""

    def __init__(self, dataset: Dataset, collate: Callable[[list[Any]], Any] | None) -> None:
        self.dataset, self.collate = dataset, collate

    def __call__(self, batch: list[tuple[int, Any] | LoadFailure]) -> Any:
        failure = next((item for item in batch if isinstance(item, LoadFailure)), None)
        if failure is not None:
            return failure
        indices = [index for index, _ in batch]  # type: ignore[misc]
        items = [item for _, item in batch]  # type: ignore[misc]
        if self.collate is not None:
            return self.collate(items)
        images = [item[0] for item in items]
        if all(isinstance(image, torch.Tensor) for image in images):
            bad = first_size_mismatch(images)
            if bad is not None:
                return LoadFailure.of(self._size_error(indices[0], indices[bad],
                                                       images[0].shape, images[bad].shape))
        return default_collate(items)

    def _size_error(self, first: int, index: int, first_shape: Sequence[int],
                    shape: Sequence[int]) -> InputError:
        name = getattr(self.dataset, "image_path", None)
        error_at = getattr(self.dataset, "error_at", None)
        message = size_mismatch_message(name(index) if name else f"#{index}", shape,
                                        name(first) if name else f"#{first}", first_shape)
        return error_at(index, message) if error_at else InputError(message)


class ImageLoader(DataLoader):
    """A DataLoader over ``dataset`` whose bad inputs reach the main process as the original
    one-line InputError, whatever ``num_workers`` (see the module docstring). Arguments as
    ``DataLoader``'s; ``collate_fn`` replaces the default batching of ``(image, label)``."""

    def __init__(self, dataset: Dataset, *, collate_fn: Callable[[list[Any]], Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(_Guarded(dataset), collate_fn=_Collate(dataset, collate_fn), **kwargs)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            if isinstance(batch, LoadFailure):
                raise batch.error()
            yield batch
