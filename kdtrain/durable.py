"""Writes that survive a crash of the machine, not only of the process: a file's data is synced
before a rename publishes it, and the directory after (its entries: the files created, renamed or
removed in it). Checkpoints, the teacher cache and indexed corpora publish their files this way."""

from __future__ import annotations

import errno
import os


def fsync_file(path: str | os.PathLike) -> None:
    """Sync a written file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# fsync of a directory is not supported everywhere (some file systems, platforms): skipped there.
_DIR_SYNC_UNSUPPORTED = (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EISDIR, errno.EACCES)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries created, renamed or removed in ``path`` durable. Skipped where a directory
    cannot be opened or synced at all; a failing sync (an I/O error) raises."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        if e.errno in _DIR_SYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _DIR_SYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def write_synced(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` and sync it (publish it with a rename next)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: readers see the old file or the new one, never a
    part (written beside it, synced, renamed over it)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write_synced(tmp, text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
