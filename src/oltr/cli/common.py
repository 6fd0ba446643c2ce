"""What several commands share: the help formatter that shows real defaults, reading a default
from the library function a command calls, and the options of more than one command
(``NAME=PATH`` open sets, ODIN's settings, comma lists)."""
from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oltr.detectors.odin import ODIN
from oltr.errors import InputError
from oltr.io import EMPTY_PATH


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append ``(default: X)`` only for a real default (not None, not a flag's False) that the
    help text does not state already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return action.help
        return super()._get_help_string(action)


class RawDescriptionDefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter,
                                          DefaultsHelpFormatter):
    """:class:`DefaultsHelpFormatter` that prints the description and epilog as written."""


def default_of(function: Callable[..., Any], name: str) -> Any:
    """The default of ``function``'s parameter ``name``: a command's default is the one of the
    library function it calls, read from there rather than written twice."""
    return inspect.signature(function).parameters[name].default


#: The ``dest`` of every argument that names a file or folder (checked by
#: :func:`refuse_empty_paths` before a command runs).
PATH_ARGUMENTS = frozenset({
    "run", "images", "runs", "data", "out", "output", "config", "source", "image_root",
    "class_order", "onnx", "probes", "gallery", "distractors", "reference_embeddings",
    "attributes", "embeddings_dir", "tensorboard", "open_sets",
})

_NAMED = frozenset({"open_sets", "runs"})
_OPTION_NAMES = {"open_sets": "--open-set", "images": "PATH"}


def refuse_empty_paths(args: argparse.Namespace) -> None:
    """An empty path argument (``oltr predict RUN "$UNSET"``, ``--open-set NAME=$UNSET``) is
    an ``InputError`` naming the argument: ``Path("")`` is the current directory, so it would
    silently mean "everything here" (predict used to classify every image under it)."""
    for dest in sorted(PATH_ARGUMENTS):
        value = getattr(args, dest, None)
        values = value if isinstance(value, list | tuple) else [value]
        for item in values:
            path = item.rpartition("=")[2] if isinstance(item, str) and dest in _NAMED else item
            if isinstance(path, str) and not path.strip():
                name = _OPTION_NAMES.get(dest) or (
                    dest if dest in ("run", "images", "source") else "--" + dest.replace("_", "-"))
                raise InputError(f"{name}: {EMPTY_PATH}", value=item)


def comma_list(text: str) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]``."""
    return [item.strip() for item in text.split(",") if item.strip()]


def named_paths(items: list[str] | None) -> dict[str, str] | None:
    """``NAME=PATH`` arguments (or a bare PATH, named by its last component) as a dict."""
    if not items:
        return None
    named: dict[str, str] = {}
    for item in items:
        name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        if not path.strip():
            raise InputError("--open-set needs a path (NAME=PATH: a folder of images or a split "
                             "file)", value=item)
        name = name or Path(path).stem or Path(path).name
        if name in named:
            raise InputError(f"open set named twice: {name!r} (use NAME=PATH)", value=item)
        named[name] = path
    return named


def add_odin_options(parser: argparse.ArgumentParser) -> None:
    """``--odin-temperature`` and ``--odin-epsilon`` (read by :func:`odin_options`); their
    defaults are the ODIN detector's."""
    parser.add_argument("--odin-temperature", type=float, dest="odin_temperature",
                        help=f"ODIN's temperature T (default {default_of(ODIN, 'temperature'):g})")
    parser.add_argument("--odin-epsilon", type=float, dest="odin_epsilon",
                        help="ODIN's input perturbation ε in normalised-image units (default "
                             f"{default_of(ODIN, 'epsilon'):g}: temperature scaling only; > 0 "
                             "costs a backward pass per image)")


def odin_options(args: argparse.Namespace) -> dict[str, dict[str, float]] | None:
    """The ODIN detector's options given on the command line (None: none given)."""
    if args.odin_epsilon is None and args.odin_temperature is None:
        return None
    options = {"temperature": (default_of(ODIN, "temperature") if args.odin_temperature is None
                               else args.odin_temperature)}
    if args.odin_epsilon is not None:
        options["epsilon"] = args.odin_epsilon
    return {"odin": options}
