"""Durable file-system writes: the primitives under the folder store.

A write is durable when a crash (power loss, SIGKILL, kernel panic) after
the call returned cannot undo it: the file's bytes are fsynced before it is
renamed into place, and the folder holding a new name is fsynced after the
rename (POSIX leaves a rename's durability to the folder's fsync). See
docs/reliability.md for the order of writes built on these.

Every function here blocks on the disk: call them from a thread, never from
the reactor thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

__all__ = ["DIR_MODE", "FILE_MODE", "fsync_dir", "fsync_file", "syncfs", "write_durably"]

#: Mode of the queue folder and its subfolders.
DIR_MODE = 0o700
#: Mode of every file in the queue.
FILE_MODE = 0o600

# syncfs(2) through ctypes, looked up once: None (not yet), False (absent).
_libc_syncfs: Callable[[int], int] | bool | None = None


def _find_syncfs() -> Callable[[int], int] | bool:
    global _libc_syncfs
    if _libc_syncfs is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc_syncfs = libc.syncfs
        except (OSError, AttributeError):
            _libc_syncfs = False
    return _libc_syncfs


def syncfs(path: str) -> bool:
    """C{syncfs(2)} the file system holding the folder C{path}: one call
    makes every file written there durable (Linux).

    @param path: a folder on the file system to sync.
    @return: C{True} when synced; C{False} when the platform lacks
        C{syncfs(2)} (the caller then fsyncs file by file).
    @raise OSError: the sync failed (EIO...).
    """
    func = _find_syncfs()
    if not callable(func):
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if func(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)
    return True


def fsync_dir(path: str) -> None:
    """fsync the folder C{path}, making the names created, renamed or
    removed in it durable.

    @raise OSError: it cannot be opened or synced.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    """fsync the file C{path} (its bytes and size).

    @raise OSError: it cannot be opened or synced.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str, data: bytes, sync: bool = True) -> None:
    """Create C{path} (O_EXCL, mode L{FILE_MODE}) holding C{data}, fsynced.

    On any error the partial file is removed, so a failed write leaves
    nothing behind. The name itself is durable only once the caller fsyncs
    the folder (L{fsync_dir}), usually after renaming the file into place.

    @param path: the file to create; it must not exist.
    @param data: its bytes.
    @param sync: fsync before returning; C{False} when the caller syncs a
        whole batch at once (L{syncfs}).
    @raise OSError: C{path} exists, or the write or sync failed (ENOSPC...).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    os.close(fd)
