"""What oltr may replace, resume, clean up or lock: only what it can prove it wrote.

One rule for every command (``curate``, ``train``, ``bench``, ``evaluate``):

- **Markers.** Every directory oltr creates for its output (a curated benchmark, a run, a stage
  of a run, a bench) holds a marker file ``.oltr`` written when oltr creates (or claims an
  empty) directory: JSON ``{"written_by": "oltr", "kind": KIND, "oltr_version": ...}``, KIND
  one of :data:`KINDS`. oltr writes into (``train --resume``, ``--stage``, ``bench``) a
  non-empty directory only when it holds the marker of that kind. A curated benchmark is
  replaced (``curate --force``) only when it holds its marker, its ``manifest.json`` and
  nothing but what the manifest lists, so a file put there later is never deleted.
- **Sources.** An output is never a source, nor an ancestor of a source, and
  (:func:`check_not_source`) for ``folder:`` sources never inside the source either; a
  replaced output is never the working directory or one of its ancestors.
- **Temporaries.** oltr's temporary files are named ``.NAME.tmp-oltr-PID``
  (:func:`oltr.io.temporary_path`); :func:`remove_stale_temporaries` removes those of dead
  writers only, and only inside directories holding a marker. Curation's staging and retired
  directories (``.NAME.partial-PID-HEX`` / ``.NAME.old-PID-HEX`` next to its output) are
  removed by the next curation of the same output (:func:`remove_stale_staging`) only when they
  hold a ``curate`` marker (or nothing at all) and their writer PID is dead.
- **Reports.** An evaluation report replaces only an oltr report (a JSON object with
  ``report_version``), never another file or a directory (:func:`check_report_output`).
- **Locks.** A run or bench directory is locked while oltr writes into it
  (:func:`locked`: ``fcntl.flock`` on ``DIR/.oltr-lock``, released by the OS when the process
  ends, however it ends); a second writer stops with one line naming the PID holding it.

Every refusal is an :class:`~oltr.errors.InputError` naming the directory and what to do.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from oltr import __version__
from oltr.errors import InputError
from oltr.io import TEMPORARY_NAME, atomic_write_bytes

MARKER = ".oltr"
LOCK = ".oltr-lock"
KINDS = ("curate", "run", "stage", "bench", "report")
MANIFEST = "manifest.json"
_MARKER_MAX_BYTES = 4096


# --------------------------------------------------------------------------- markers
def write_marker(directory: Path, kind: str) -> None:
    """Write ``directory/.oltr`` saying oltr (this version) wrote the directory, as ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"unknown directory kind {kind!r}")
    text = json.dumps({"written_by": "oltr", "kind": kind, "oltr_version": __version__},
                      sort_keys=True) + "\n"
    atomic_write_bytes(directory / MARKER, text.encode("utf-8"))


def marker_kind(directory: Path) -> str | None:
    """The kind in ``directory``'s oltr marker, or None when it holds none (or not oltr's)."""
    path = Path(directory) / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read(_MARKER_MAX_BYTES).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(data, dict) and data.get("written_by") == "oltr" and data.get("kind") in KINDS:
        return data["kind"]
    return None


def _is_empty(directory: Path) -> bool:
    with os.scandir(directory) as entries:
        return next(entries, None) is None


# --------------------------------------------------------------------------- sources
def _real(path: str | os.PathLike[str]) -> Path:
    """The absolute path with symlinks resolved (also for paths that do not exist yet)."""
    return Path(os.path.realpath(os.path.expanduser(path)))


def check_not_source(
    out: Path,
    sources: Iterable[str | os.PathLike[str]],
    *,
    what: str,
    inside_forbidden: bool = False,
    working_directory: bool = False,
) -> None:
    """InputError when ``out`` is one of ``sources`` or an ancestor of one (``inside_forbidden``:
    or lies inside one, e.g. a ``folder:`` source whose sub-folders are its classes;
    ``working_directory``: or is the working directory or one of its ancestors)."""
    real = _real(out)
    for source in sources:
        source_real = _real(source)
        if real == source_real:
            raise InputError(f"{what} is the source itself ({source}); oltr never writes over "
                             "its input: choose another --out", path=out)
        if source_real.is_relative_to(real):
            raise InputError(f"{what} contains the source {source}; oltr never writes over its "
                             "input: choose another --out", path=out)
        if inside_forbidden and real.is_relative_to(source_real):
            raise InputError(f"{what} lies inside the source folder {source} (its sub-folders "
                             "are the classes): choose an --out outside it", path=out)
    if working_directory:
        cwd = _real(os.getcwd())
        if cwd.is_relative_to(real):
            raise InputError(f"{what} is the working directory or contains it: choose another "
                             "--out", path=out)


# --------------------------------------------------------------------------- claiming
@dataclass
class Claim:
    """A directory oltr writes into: ``fresh`` when it was absent or empty before (everything in
    it is then this invocation's), ``created`` the topmost directory this claim created."""

    path: Path
    fresh: bool
    created: Path | None


def claim_directory(
    path: str | os.PathLike[str],
    kind: str,
    *,
    what: str,
    reuse: bool,
    not_empty_hint: str = "choose another --out",
    protect: Iterable[str | os.PathLike[str]] = (),
) -> Claim:
    """Make ``path`` a directory oltr may write into as ``kind``: create it (and its marker)
    when absent, claim it when empty; when it holds anything, accept it only with ``reuse``
    and oltr's marker of ``kind``. Never one of ``protect`` (the data read) or an ancestor.

    Raises InputError: ``path`` is a file; not empty and not ``reuse`` (the message ends with
    ``not_empty_hint``); not empty and not written by oltr as ``kind``; cannot be created.
    """
    path = Path(path).expanduser()
    check_not_source(path, protect, what=what)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} exists and is not a directory", path=path)
    if path.is_dir():
        if _is_empty(path):
            _write_claim_marker(path, kind, what)
            return Claim(path, True, None)
        if not reuse:
            raise InputError(f"{what} is not empty; {not_empty_hint}", path=path)
        owner = marker_kind(path)
        if owner != kind:
            found = f"holds an oltr {owner} directory" if owner else (
                f"was not written by oltr (no {MARKER} marker)")
            raise InputError(f"{what} {found}: oltr writes only into a {kind} directory it "
                             "created; choose another --out", path=path)
        return Claim(path, False, None)
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    try:
        path.mkdir(parents=True)
    except FileExistsError:  # created meanwhile by someone else: decide again
        return claim_directory(path, kind, what=what, reuse=reuse,
                               not_empty_hint=not_empty_hint, protect=protect)
    except OSError as exc:
        raise InputError(f"cannot create {what}: {exc.strerror}", path=path) from None
    _write_claim_marker(path, kind, what)
    return Claim(path, True, top)


def _write_claim_marker(path: Path, kind: str, what: str) -> None:
    try:
        write_marker(path, kind)
    except OSError as exc:
        raise InputError(f"cannot write into {what}: {exc.strerror}", path=path) from None


def undo_claim(claim: Claim) -> None:
    """Remove what a fresh claim holds (all of it this invocation's): the directory it created
    and those of its parents it created that are empty again (another process may have put
    something there meanwhile), or the entries of the empty directory it claimed. A claim that
    was not fresh is left as it is."""
    if not claim.fresh:
        return
    if claim.created is not None:
        shutil.rmtree(claim.path, ignore_errors=True)
        parent = claim.path.parent
        while parent == claim.created or claim.created in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
        return
    for entry in claim.path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


# --------------------------------------------------------------------------- curated outputs
def check_replaceable_benchmark(out: Path, *, force: bool) -> None:
    """InputError unless the non-empty directory ``out`` may be replaced by a new curation:
    ``force`` and a benchmark oltr curated (its ``curate`` marker and manifest), holding
    nothing the manifest does not list."""
    if not force:
        raise InputError("output directory exists and is not empty; --force (force=True from "
                         "Python) replaces a benchmark oltr curated", path=out)
    if marker_kind(out) != "curate":
        raise InputError(f"output directory was not written by oltr curate (no {MARKER} "
                         "marker): --force replaces only a benchmark oltr curated; choose "
                         "another --out", path=out)
    extras = _unlisted_entries(out)
    if extras is None:
        raise InputError(f"output directory has no readable {MANIFEST}: not replaced; remove "
                         "it yourself or choose another --out", path=out)
    if extras:
        more = f" (and {len(extras) - 1} more)" if len(extras) > 1 else ""
        raise InputError(f"output directory holds {extras[0]!r}{more}, which oltr curate did "
                         "not write: not replaced; move it out or choose another --out",
                         path=out)


def _unlisted_entries(out: Path) -> list[str] | None:
    """Entries of a curated benchmark that its manifest does not account for (None: no
    readable manifest)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return None
    allowed = {*files, MANIFEST, MARKER, LOCK}
    if manifest.get("image_root") == "images":
        allowed.add("images")
    return sorted(entry.name for entry in out.iterdir() if entry.name not in allowed)


def staging_path(out: Path) -> Path:
    """A fresh hidden sibling of ``out`` to build it in: ``.NAME.partial-PID-HEX``."""
    return out.with_name(f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")


def retired_path(out: Path) -> Path:
    """Where a replaced ``out`` goes before it is deleted: ``.NAME.old-PID-HEX``."""
    return out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")


def remove_owned_tree(directory: Path, kind: str) -> None:
    """Delete ``directory`` if it holds oltr's ``kind`` marker; otherwise leave it."""
    if not directory.is_symlink() and marker_kind(directory) == kind:
        shutil.rmtree(directory)


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the staging / retired directories a killed curation of ``out`` left next to it:
    only oltr's names (``.NAME.partial-PID-HEX``, ``.NAME.old-PID-HEX``) whose PID is dead and
    that hold a ``curate`` marker (or nothing)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:partial|old)-(\d+)-[0-9a-f]{{8}}")
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        pid = int(match[1])
        if pid == os.getpid() or process_alive(pid):
            continue
        if marker_kind(entry) == "curate":
            shutil.rmtree(entry)
        elif _is_empty(entry):
            entry.rmdir()
        else:
            continue
        removed.append(entry)
    return removed


# --------------------------------------------------------------------------- temporaries
def process_alive(pid: int) -> bool:
    """Whether a process with this PID exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete oltr's temporary files (``.NAME.tmp-oltr-PID``) in ``directory`` whose writer is
    dead (a killed run); only in a directory holding an oltr marker."""
    directory = Path(directory)
    if marker_kind(directory) is None:
        return []
    removed = []
    for tmp in directory.iterdir():
        match = TEMPORARY_NAME.fullmatch(tmp.name)
        if match is None or tmp.is_dir() or tmp.is_symlink():
            continue
        pid = int(match[1])
        if pid != os.getpid() and not process_alive(pid):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


# --------------------------------------------------------------------------- reports
def is_oltr_report(path: Path) -> bool:
    """Whether ``path`` is a file holding an oltr report (JSON with ``report_version``): an
    evaluation report (``closed``) or an identification report (``kind``: identification,
    `oltr.evaluation.identify_run`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(data, dict) and "report_version" in data and (
        "closed" in data or data.get("kind") == "identification")


def check_report_output(path: str | os.PathLike[str]) -> None:
    """InputError unless a report can be written to ``path`` without loss: not a directory,
    not an existing file other than an oltr report, in a directory that exists (or can be
    created) and is writable. Call it before the evaluation runs."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError("report path is a directory; give a file name, e.g. "
                         f"{path / 'report.json'}", path=path)
    if (path.exists() or path.is_symlink()) and not is_oltr_report(path):
        raise InputError("report path holds a file that is not an oltr report; it is not "
                         "overwritten: choose another --output", path=path)
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError("cannot write the report: a parent of its path is not a directory",
                         path=parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError("cannot write the report: directory is not writable", path=parent)


# --------------------------------------------------------------------------- locks
def _holder(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return f"pid {text}" if text.isdigit() else "pid unknown"


@contextmanager
def locked(directory: Path, what: str) -> Iterator[None]:
    """Hold ``directory``'s oltr lock (``fcntl.flock`` on ``directory/.oltr-lock``, which
    records the holder's PID) for the ``with`` block; the OS releases it when the process
    ends, however it ends. Raises InputError naming the PID when another process holds it."""
    path = Path(directory) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise InputError(f"cannot lock {what}: {exc.strerror}", path=directory) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{what} is in use by another oltr process ({_holder(fd)}) that "
                             "is still writing into it; wait for it to end, or choose another "
                             "directory", path=directory) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def lock_holder(directory: Path) -> str | None:
    """``"pid N"`` when another process holds ``directory``'s oltr lock, else None."""
    try:
        fd = os.open(Path(directory) / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
