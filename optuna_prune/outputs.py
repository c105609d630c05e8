"""Paths a command writes to: checked before any work starts, written whole or not at all.

A command refuses an ``--out`` it cannot use (a folder where a file is asked for, a file or a
non-empty folder where a folder is asked for, unless ``overwrite``, a place it cannot write to)
with one line naming the path and the fix, before it loads a model. A checkpoint folder is
written under a temporary name beside its destination and renamed into place when complete, so
a failure or Ctrl-C leaves no half-written folder behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class OutputError(ValueError):
    """A path to write to cannot be used; the message names it and the fix."""


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def missing_folders(folder: Path) -> list[Path]:
    """The folders above and including ``folder`` that do not exist yet, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (outermost first, as :func:`missing_folders` lists them) that are empty."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_writable_folder(folder: Path, what: str) -> None:
    """OutputError unless files can be created in ``folder`` (existing, or creatable).

    Tried for real (folders made and a probe file written, then removed), since permission bits
    do not tell, e.g. for root on a read-only or virtual file system. Leaves nothing behind.
    """
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise OutputError(f"cannot write {what}: {base} is a file, not a folder; pass a path in a folder")
    created = missing_folders(folder)
    try:
        for d in created:
            d.mkdir()
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".optuna-prune-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = exc.filename or folder
        raise OutputError(
            f"cannot write {what}: {where}: {_why(exc)}; pass a path in a folder you can write to"
        ) from None
    finally:
        remove_empty_folders(created)


def check_out_file(path: str | Path, flag: str = "--out") -> Path:
    """A file path to write: not a folder, in a folder that can be written. Creates nothing."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise OutputError(f"{flag} {path} is a folder; pass a file name, e.g. {out / 'report.html'}")
    if out.exists() and not os.access(out, os.W_OK):
        raise OutputError(f"{flag} {path} exists and is not writable; pass another file name")
    check_writable_folder(out.parent, f"{flag} {path}")
    return out


def check_out_folder(path: str | Path, overwrite: bool = False, flag: str = "--out") -> Path:
    """A folder to write a checkpoint to: absent or empty, or replaced with ``overwrite``."""
    out = Path(path).expanduser()
    if out.exists() and not overwrite:
        if not out.is_dir():
            raise OutputError(f"{flag} {path} is an existing file; pass a new folder name, or --overwrite to replace it")
        if any(out.iterdir()):
            raise OutputError(
                f"{flag} {path} is a folder that is not empty; pass a new or empty folder, or --overwrite "
                "to replace its contents"
            )
    check_writable_folder(out.parent, f"{flag} {path}")
    return out


@contextlib.contextmanager
def output_folder(path: str | Path, overwrite: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``, on failure it is removed.

    ``path`` is checked first (:func:`check_out_folder`). Folders created above it are removed
    again if the write fails.
    """
    out = check_out_folder(path, overwrite, flag)
    created = missing_folders(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty_folders(created)
        raise
