"""The one image loader: every image oltr reads (datasets, sources, curation's check, predict)
is decoded here and reaches the model as the image a person sees, or is refused.

Shape of torchvision's ``datasets/folder.py`` ``default_loader`` (open with Pillow, decode,
convert), with every Pillow mode given a defined meaning instead of Pillow's clipping
``convert`` (which turns a 16-bit image into solid white):

- ``L``, ``RGB``: as stored. ``1`` (bilevel): 0 / 255. ``P`` (palette): its colours.
- ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (16-bit PNG / TIFF): 16-bit intensities scaled to
  8 bits by /257, rounded (0 → 0, 32896 → 128, 65535 → 255).
- ``I`` (32-bit integers): read as 16-bit intensities 0..65535 (how Pillow has opened 16-bit
  PNGs), scaled likewise; values outside 0..65535 are refused.
- ``F`` (32-bit floats): intensities in [0, 1] (scikit-image's and torchvision's float range),
  scaled by 255 and rounded; values outside [0, 1], NaN included, are refused.
- ``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``, ``P`` with a transparent colour: **the alpha
  channel is dropped** (the stored colour is kept, premultiplied modes un-premultiplied first),
  as torchvision's ``default_loader`` and ``Image.convert("RGB")`` do. One rule for every
  mode, independent of any background colour a viewer would composite over.
- ``RGBX``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's conversion to RGB.
- anything else: refused.

EXIF orientation tags are not applied (as in torchvision's loader): pixels are used as stored.
Then `load_image` converts to the mode the network wants (``L``: ITU-R 601-2 luma of RGB;
``RGB``: grey replicated). A missing, truncated or corrupt file, a decompression bomb, or a
refused mode is an `ImageError` (an InputError) naming the file (and the mode).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from oltr.errors import InputError
from oltr.io import NotRegularFile, open_for_reading

MODES = ("L", "RGB")
_AS_IS = frozenset({"L", "RGB"})
_TO_L = frozenset({"1", "LA"})
_TO_RGB = frozenset({"RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_VIA = {"La": "LA", "RGBa": "RGBA", "P": "RGBA", "PA": "RGBA"}
_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


class ImageError(InputError):
    """An image that cannot be used: ``problem`` ("image not found" / "cannot read image")
    and ``detail`` (why), about the file ``image_path``. Reads ``path: problem (detail)``;
    `located` re-states it for the split-file line that listed the image."""

    def __init__(self, problem: str, image_path: str | os.PathLike[str],
                 detail: str | None = None) -> None:
        self.problem, self.image_path, self.detail = problem, str(image_path), detail
        super().__init__(problem + ("" if detail is None else f" ({detail})"), path=image_path)

    def __reduce__(self):  # picklable (DataLoader workers), despite the keyword-only base
        return (type(self), (self.problem, self.image_path, self.detail))

    def located(self, source_file: str | os.PathLike[str] | None,
                line: int | None) -> InputError:
        """The same error named by the split file and line that listed the image."""
        if self.detail is None:
            message = f"{self.problem}: {self.image_path}"
        else:
            message = f"{self.problem} {self.image_path} ({self.detail})"
        if source_file is None:
            return InputError(message)
        return InputError(message, path=source_file, line=line)


def open_image(path: str | os.PathLike[str], *, draft: bool = False) -> Image.Image:
    """Open and fully decode the image file ``path`` (its own mode; first frame).

    ``draft``: let a JPEG decode at a reduced scale (every coefficient is still entropy-decoded,
    so truncated or corrupt data is still found; used to check files fast). Raises ImageError.
    """
    try:
        with open_for_reading(path, "image") as handle, Image.open(handle) as opened:
            if draft and opened.format == "JPEG":
                opened.draft(opened.mode, (1, 1))
            opened.load()
            image = opened
    except FileNotFoundError:
        raise ImageError("image not found", path) from None
    except NotRegularFile as exc:  # a FIFO would block Pillow forever
        raise ImageError("cannot read image", path,
                         "it is a folder" if exc.kind == "a folder"
                         else f"not a regular file: {exc.kind}") from None
    except UnidentifiedImageError:  # Pillow would name the open file object, not the path
        raise ImageError("cannot read image", path,
                         f"cannot identify image file {os.fspath(path)!r}") from None
    except (OSError, SyntaxError, ValueError, EOFError,
            Image.DecompressionBombError) as exc:
        raise ImageError("cannot read image", path, str(exc) or type(exc).__name__) from None
    return image


def _scaled(values: np.ndarray, low: float, high: float, scale: float, path: str | os.PathLike[str],
            mode: str, range_text: str) -> Image.Image:
    if values.size and not (np.isfinite(values).all() and values.min() >= low
                            and values.max() <= high):
        finite = values[np.isfinite(values)]
        found = (f"{finite.min():g}..{finite.max():g}" if finite.size else "none finite")
        if finite.size != values.size:
            found += ", with NaN or infinity"
        raise ImageError("cannot read image", path,
                         f"mode {mode!r} holds values {found}; oltr reads this mode as "
                         f"{range_text}")
    return Image.fromarray(np.floor(values.astype(np.float64) / scale + 0.5).astype(np.uint8),
                           mode="L")


def as_seen(image: Image.Image, path: str | os.PathLike[str] = "<image>") -> Image.Image:
    """``image`` in mode ``L`` or ``RGB`` as a person sees it (rules in the module docstring);
    ImageError naming ``path`` and the mode for a mode oltr does not read."""
    mode = image.mode
    if mode in _AS_IS:
        return image
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(image.convert("I") if mode != "I" else image)
        return _scaled(values, 0, 65535, 257.0, path, mode,
                       "16-bit intensities 0..65535 (scaled by 1/257)")
    if mode == "F":
        return _scaled(np.asarray(image), 0.0, 1.0, 1 / 255, path, mode,
                       "intensities in [0, 1] (scaled by 255)")
    if mode == "P" and "transparency" not in image.info:
        return image.convert("RGB")
    if mode in _VIA:
        image = image.convert(_VIA[mode])
        mode = image.mode
    if mode in _TO_L:
        return image.convert("L")
    if mode in _TO_RGB:
        return image.convert("RGB")
    raise ImageError("cannot read image", path,
                     f"image mode {mode!r} is not supported; save it as 8-bit grey or RGB")


def load_image(path: str | os.PathLike[str], mode: str | None = None, *,
               draft: bool = False) -> Image.Image:
    """Decode ``path`` and return it as seen (`as_seen`), converted to ``mode`` (``L`` or
    ``RGB``; None keeps the seen mode). Raises ImageError naming the file."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    image = as_seen(open_image(path, draft=draft), path)
    return image if mode is None or image.mode == mode else image.convert(mode)


def find_bad_images(paths: Sequence[str | os.PathLike[str]], *,
                    workers: int | None = None) -> list[ImageError]:
    """Fully decode every file of ``paths`` (as `load_image` does; JPEGs at reduced scale, every
    coefficient still decoded) in a thread pool; return the ImageError of each file that cannot
    be used, in ``paths`` order (empty when all are fine)."""
    workers = workers or min(8, (os.cpu_count() or 1) + 1)

    def check(path: str | os.PathLike[str]) -> ImageError | None:
        try:
            load_image(path, draft=True)
        except ImageError as exc:
            return exc
        return None

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        return [e for e in pool.map(check, [Path(path) for path in paths]) if e is not None]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def check_images(paths: Sequence[str | os.PathLike[str]], *, workers: int | None = None) -> None:
    """:func:`find_bad_images`, raising the ImageError of the first bad file in ``paths``
    order, its detail naming how many others are bad and the first few of them (so one run
    lists what to fix)."""
    errors = find_bad_images(paths, workers=workers)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        first, others = errors[0], errors[1:]
        shown = ", ".join(e.image_path for e in others[:5])
        more = f", … ({len(others) - 5} more)" if len(others) > 5 else ""
        detail = (f"{first.detail}; " if first.detail else "") + (
            f"{len(others)} more unreadable image{'s' if len(others) > 1 else ''}: "
            f"{shown}{more}")
        raise ImageError(first.problem, first.image_path, detail)
