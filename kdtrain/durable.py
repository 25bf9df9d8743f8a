"""Writes that survive a crash of the machine, not only of the process: a file's data is synced
before a rename publishes it, and the directory after (its entries: the files created, renamed or
removed in it). Checkpoints, the teacher cache and indexed corpora publish their files this way.

A writer's scratch files beside their destination are tagged ``PID@HOST`` (``scratch_tag``), so
that the next writer removes what a killed one left (``reap_scratch``): a whole model or corpus."""

from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path


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


def fsync_tree(root: str | os.PathLike) -> None:
    """Sync every file under ``root`` and then every directory (deepest first), so that a rename
    of ``root`` publishes complete contents (a staging directory made by writers that did not
    sync: safetensors, shutil copies)."""
    dirs = []
    for here, _, files in os.walk(root):
        dirs.append(here)
        for name in files:
            path = os.path.join(here, name)
            if os.path.isfile(path) and not os.path.islink(path):
                fsync_file(path)
    for here in reversed(dirs):
        fsync_dir(here)


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


def _host() -> str:
    """This host, and its PID namespace where there is one: containers that share a hostname
    (``docker --network=host``) do not see each other's processes, so a writer in one must not
    take the other's for dead."""
    try:
        return f"{socket.gethostname()}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def scratch_tag() -> str:
    """``PID@HOST`` of this process (HOST: ``_host``), for the names of its scratch files (see
    ``reap_scratch``)."""
    return f"{os.getpid()}@{_host()}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def dead_scratch(parent: str | os.PathLike, stem: str, suffixes: tuple[str, ...] = ("",)) -> list[Path]:
    """The entries of ``parent`` named ``stem + scratch_tag() + suffix`` (``suffix`` one of
    ``suffixes``) whose process, on this host (and PID namespace), no longer runs: a killed writer's
    leftovers. Other hosts' are not listed (on a shared file system their writers may be running),
    nor those of a running process (a pid reused since counts as running: kept, never a live writer's removed)."""
    parent, host, found = Path(parent), _host(), []
    if not parent.is_dir():
        return found
    for p in parent.iterdir():
        if not p.name.startswith(stem):
            continue
        rest = p.name[len(stem):]
        for suffix in suffixes:
            if suffix and not rest.endswith(suffix):
                continue
            pid, at, their_host = rest[:len(rest) - len(suffix)].partition("@")
            if at and their_host == host and pid.isdigit() and not _running(int(pid)):
                found.append(p)
                break
    return found


def reap_scratch(parent: str | os.PathLike, stem: str, suffixes: tuple[str, ...] = ("",)) -> list[Path]:
    """Remove ``dead_scratch(parent, stem, suffixes)``; returns what was removed."""
    found = dead_scratch(parent, stem, suffixes)
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found
