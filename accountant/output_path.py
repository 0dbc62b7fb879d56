"""Checks on output paths, run before any long work starts.

Every command that writes a file or a run directory calls one of these first, so that a path that
cannot be written, or that already holds a result, ends in a one-line error within the first second
rather than in a traceback after minutes of work. Nothing is overwritten unless the user asked for
it (``--overwrite``).  Every file a program writes is then written by :func:`atomic_write` (or
:func:`atomic_write_with`), the one implementation, which ``finetune.run_dir`` re-exports: a
temporary sibling, flushed and fsynced, then ``os.replace``, so a reader sees the old file or the
new one, never half of one.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that cannot or must not be written; the message is one line for the user."""


def _check_writable_dir(directory: Path, what: str) -> None:
    if not directory.exists():
        raise OutputPathError(f"{what}: folder {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise OutputPathError(f"{what}: {str(directory)!r} is not a folder")
    try:  # os.access is not enough (read-only mounts, /proc): really create a file
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputPathError(f"{what}: cannot write in folder {str(directory)!r} ({exc.strerror})") from None


def check_output_file(path, *, overwrite: bool = False, what: str = "output file") -> Path:
    """Validate ``path`` as a file to create: its folder exists and is writable, it is not a
    folder or any other existing non-regular file (a device such as /dev/full is never replaced), and
    it does not exist yet unless ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {str(path)!r} is a folder")
    if path.exists() and not path.is_file():   # a device, pipe or socket: --overwrite would replace it
        raise OutputPathError(f"{what} {str(path)!r} exists and is not a regular file; give a file path")
    if path.exists() and not overwrite:
        raise OutputPathError(f"{what} {str(path)!r} exists; pass --overwrite to replace it")
    _check_writable_dir(path.parent if str(path.parent) else Path("."), f"{what} {str(path)!r}")
    return path


def check_output_dir(path, *, overwrite: bool = False, allow_existing: bool = False,
                     what: str = "output folder") -> Path:
    """Validate ``path`` as a folder to create: its parent exists and is writable, it is not a
    file, and it does not exist yet unless ``overwrite`` (the caller clears it) or
    ``allow_existing`` (e.g. a resume)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {str(path)!r} is a file, not a folder")
    if path.exists() and not (overwrite or allow_existing):
        raise OutputPathError(f"{what} {str(path)!r} exists; pass --overwrite to replace it")
    parent = path.resolve().parent
    _check_writable_dir(parent, f"{what} {str(path)!r}")
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary sibling, fsync, ``os.replace``)."""
    def write(tmp):
        with open(tmp, "wb") as handle:
            handle.write(data)
    atomic_write_with(path, write)


def atomic_write_with(path, writer) -> None:
    """``writer(tmp_path)`` writes the file's content to a temporary sibling of ``path``; it is then
    fsynced and renamed over ``path`` (a crash leaves the old file or the new one)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
