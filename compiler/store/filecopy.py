"""Whole-file primitives the store's writer needs, each with the fallbacks real file systems
force on it: copy a file by `copy_file_range`, write a buffer out completely, rename without
replacing."""

from __future__ import annotations

import errno
import os

from cfsc.base import fsverity, syscalls
from cfsc.base.errors import OutputError


def rename_noreplace(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
    """renameat2(RENAME_NOREPLACE): FileExistsError rather than replace a name.  A file system
    without the flag (EINVAL) gets a plain rename: the name, if there, holds the same content."""
    try:
        syscalls.renameat2(src_dir, src, dst_dir, dst, syscalls.RENAME_NOREPLACE)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        os.rename(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir)


def write_all(fd: int, data, where: str) -> None:
    """`fsverity.write_all`, its failure named as the store's."""
    try:
        fsverity.write_all(fd, data)
    except OSError as e:
        raise OutputError(f"cannot write a store object: {e.strerror}", where) from None


def seek(fd: int, offset: int, where: str) -> None:
    """Move the write position past a hole (the file stays sparse there)."""
    try:
        os.lseek(fd, offset, os.SEEK_SET)
    except OSError as e:
        raise _beyond(e, offset, where) from None


def truncate(fd: int, size: int, where: str) -> None:
    """End a file with a hole: its size set, nothing written."""
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        raise _beyond(e, size, where) from None


def _beyond(e: OSError, size: int, where: str) -> OutputError:
    if e.errno in (errno.EINVAL, errno.EFBIG):  # past the file system's largest file
        return OutputError(f"cannot write a store object: its file system holds no file reaching byte {size}"
                           f" ({e.strerror})", where)
    return OutputError(f"cannot write a store object: {e.strerror}", where)


def copy_range(src: int, out: int) -> bool | None:
    """copy_file_range the whole of `src`.  False: not for this file (copy it another way);
    None: not on this file system or kernel at all."""
    offset = 0
    while True:
        try:
            n = os.copy_file_range(src, out, 1 << 30, offset, offset)
        except OSError as e:
            if offset:
                raise
            if e.errno in (errno.ENOSYS, errno.EXDEV):
                return None
            if e.errno in (errno.EOPNOTSUPP, errno.EPERM, errno.EINVAL, errno.EBADF):
                return False
            raise
        if n == 0:
            # Some file systems (procfs, some overlays) report 0 instead of an error.
            return offset > 0 or os.fstat(src).st_size == 0
        offset += n


def copy_plain(src: int, out: int, algorithm: fsverity.FsVerityAlgorithm) -> tuple[bytes, int]:
    """Read and write: the copy of last resort, hashed on the way; its (digest, size)."""
    os.ftruncate(out, 0)
    os.lseek(out, 0, os.SEEK_SET)
    return fsverity.hash_fd(src, 0, out, algorithm)
