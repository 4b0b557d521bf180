"""Offering fs-verity to a store object (FS_IOC_ENABLE_VERITY), as mkcomposefs does: a
failure is ignored, and a file system that has no fs-verity is not asked again.

Not to an object of more than `HOLES_MAX` bytes of holes: enabling it, the kernel reads and
hashes every hole and writes a Merkle tree a 127th of the file's size, and a 10 KB tar layer
can declare 2^53 bytes of holes.  cfsc's own checks (FUSE, `fsck-store`) verify such an object
by its map (`cfsc.base.holes`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from cfsc.base import beneath
from cfsc.base.holes import hole_bytes
from cfsc.base.fsverity import FsVerityAlgorithm
from cfsc.store.tempfiles import Temp

FS_IOC_ENABLE_VERITY = 0x40806685  # _IOW('f', 133, struct fsverity_enable_arg)
# struct fsverity_enable_arg: version, hash_algorithm, block_size, salt_size, salt_ptr,
# sig_size, reserved1, sig_ptr, reserved2[11]
FSVERITY_ENABLE_ARG = struct.Struct("<IIIIQIIQ88x")
assert FSVERITY_ENABLE_ARG.size == 128
HOLES_MAX = 1 << 30
# "This file system (or kernel) cannot do that at all": fs-verity here, reflinks in `objects`;
# stop asking for this store.
UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EXDEV, errno.EINVAL})


def enable_arg(algorithm: FsVerityAlgorithm) -> bytes:
    """The ioctl's argument: version 1, the algorithm, 4 KiB blocks, no salt, no signature."""
    return FSVERITY_ENABLE_ARG.pack(1, algorithm.id, 4096, 0, 0, 0, 0, 0)


def offer(temp: Temp, ro: int | None, rootfd: int, arg: bytes) -> bool:
    """Enable fs-verity on a finished temp file, by the read-only descriptor `ro` (closed
    here; None without /proc: the file is opened by name, if it is still ours), if its holes
    allow; False when its file system has no fs-verity (stop asking), else True."""
    if ro is None:
        try:
            ro = os.open(temp.name, beneath.O_READ, dir_fd=rootfd)
        except OSError:
            return True
    try:
        st = os.fstat(ro)
        if (st.st_dev, st.st_ino) != (temp.dev, temp.ino) or hole_bytes(st) > HOLES_MAX:
            return True
        fcntl.ioctl(ro, FS_IOC_ENABLE_VERITY, arg)
    except OSError as e:
        if e.errno in UNSUPPORTED:
            return False
    finally:
        os.close(ro)
    return True
