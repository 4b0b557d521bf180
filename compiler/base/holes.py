"""Files mostly made of holes, read by where their data is (SEEK_DATA / SEEK_HOLE).

Why: a sparse file's size says nothing of its cost.  /var/log/lastlog on a system with large
uids is hundreds of GB of holes around a few KB of data, and a VM disk image is much the same.
Read byte by byte, every zero is read and hashed, and a store copy writes every one of them out
(`copy_file_range` on ext4 fills holes in).  Taken by runs (`fsverity.hash_by_extents`), the
holes cost a few hashes per level (`FsVerityHasher.update_zeros`) and stay holes in the copy.

The map is only a hint of where zeros are: what a hole reads as is zeros by definition, and the
data regions are read and hashed as always, so a file system that reports no holes (or cannot
tell) gives the same digest, read whole.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator


def hole_bytes(st: os.stat_result) -> int:
    """How much of a file is not allocated (its holes, as far as `st_blocks` tells)."""
    return max(0, st.st_size - st.st_blocks * 512)


def mostly_holes(st: os.stat_result) -> bool:
    """Whether less than half of a file is allocated: then reading by its map saves at least
    half the work (below that, the plain read, spread over a pool, is as quick)."""
    return st.st_blocks * 1024 < st.st_size


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each data region of `fd` between `start` and `end`, in order; what
    lies between is a hole.  A file system that cannot tell says the whole range is data."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after `pos`: a hole to the end
                return
            if e.errno != errno.EINVAL:
                raise
            yield pos, end - pos  # (SEEK_DATA not supported here)
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        pos = hole
