"""``oltr`` command line: curate, train, evaluate, predict, bench, analyze, report, export,
identify — one module per command (:data:`COMMANDS`), each registered the same way: ``NAME``,
``register(subparsers)`` adding its parser (its defaults read from the library function it
calls, and shown by ``--help``), ``run(args)`` returning the exit status, and optionally
``interrupted_hint(args)``, what an interrupted run kept.

Every command exits with status 2 and a one-line message naming the bad file, line or value when
its input is wrong (``oltr.errors.InputError``); the machine's failures (an ``OSError`` of any
errno — a full disk, a read-only file system, a permission — and ``MemoryError``) exit with
status 1 and one line naming the path and the reason. ``--debug`` shows the full traceback
instead.
Ctrl-C (SIGINT), SIGTERM and SIGHUP all take the same way out: the command's clean-up runs
(no partial output is left) and it exits with 128 + the signal number and one line saying what
was kept.
"""
from __future__ import annotations

import argparse
import errno
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from oltr import __version__
from oltr.cli import analyze, bench, curate, evaluate, export, identify, predict, report, train
from oltr.cli.common import refuse_empty_paths
from oltr.errors import OltrError, display_path, one_line

#: The commands, in the order ``oltr --help`` lists them.
COMMANDS: tuple[ModuleType, ...] = (curate, train, evaluate, predict, bench, analyze, report,
                                    export, identify)

EXAMPLES = """\
examples:
  oltr curate fashion-mnist --out data/fmnist-lt --protocol fmnist_lt
  oltr train --method plain --data data/fmnist-lt --out runs/plain --seed 0
  oltr train --method oltr --data data/fmnist-lt --out runs/oltr stage2.train.epochs=4
  oltr evaluate runs/plain --data data/fmnist-lt --open --output runs/plain/report.json
  oltr predict runs/oltr image1.png image2.png
  oltr identify runs/faces --probes facescrub.txt --distractors megaface/ --attributes gender.tsv
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``oltr`` parser: global options and every command of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="oltr",
        description="Open long-tailed recognition (Liu et al., CVPR 2019): curate a benchmark, "
                    "train, evaluate, predict.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--version", action="version", version=f"oltr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


# --------------------------------------------------------------------------- signals
class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is so that every clean-up runs (as Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_interrupted(signum: int, _frame: Any) -> None:
    for number in TERMINATING_SIGNALS:  # a second signal must not cut the clean-up short
        signal.signal(number, signal.SIG_IGN)
    raise Interrupted(signum)


def interrupted_hint(args: argparse.Namespace) -> str:
    """What an interrupted command kept and how to go on, in the command's own terms (its
    module's ``interrupted_hint``)."""
    command = {module.NAME: module for module in COMMANDS}[args.command]
    hint = getattr(command, "interrupted_hint", None)
    return "nothing was written" if hint is None else hint(args)


# --------------------------------------------------------------------------- main
def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; key=value overrides may also come after options (``--data D
    stage1.train.epochs=1``): argparse gives a trailing positional list only the run of values
    before an option."""
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    unknown = [item for item in extra
               if not (takes_overrides and "=" in item and not item.startswith("-"))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def os_error_line(exc: OSError) -> str:
    """An ``OSError`` of any errno as one line: the path it concerns (shown by
    :func:`oltr.errors.display_path`), the system's text and the errno's name, e.g.
    ``runs/x/checkpoint.pt: No space left on device (ENOSPC)``."""
    where = "".join(f"{display_path(name)}: " for name in (exc.filename, exc.filename2)
                    if name is not None and not isinstance(name, int))
    name = errno.errorcode.get(exc.errno) if isinstance(exc.errno, int) else None
    text = exc.strerror or one_line(str(exc)) or type(exc).__name__
    return f"{where}{text}" + (f" ({name})" if name else "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``oltr`` command line; return its exit status."""
    args = _parse(build_parser(), argv)
    default_show = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], *rest: Any, **kwargs: Any) -> None:
        if issubclass(category, UserWarning):
            print(f"oltr {args.command}: warning: {one_line(str(message))}", file=sys.stderr)
        else:
            default_show(message, category, *rest, **kwargs)

    warnings.showwarning = show  # one line, as errors are: not Python's file:line + source
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {number: signal.signal(number, _raise_interrupted)
                    for number in TERMINATING_SIGNALS}
    try:
        refuse_empty_paths(args)
        return args.func(args)
    except OltrError as exc:
        if args.debug:
            raise
        print(f"oltr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine's, not the input's: a full disk, a lost mount
        if args.debug:
            raise
        print(f"oltr {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
        return 1
    except MemoryError:
        if args.debug:
            raise
        print(f"oltr {args.command}: error: out of memory: lower train.batch_size / "
              "eval.batch_size (or --batch-size), data.image_size or data.num_workers, or free "
              "memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        number = getattr(exc, "signum", signal.SIGINT)
        try:  # after SIGHUP the terminal may be gone
            print(f"oltr {args.command}: interrupted ({signal.Signals(number).name}); "
                  f"{interrupted_hint(args)}", file=sys.stderr)
        except OSError:
            pass
        return 128 + number
    finally:
        warnings.showwarning = default_show
        for number, handler in handlers.items():
            signal.signal(number, handler)


__all__ = ["COMMANDS", "build_parser", "main"]
