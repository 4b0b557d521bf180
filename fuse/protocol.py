"""The Linux FUSE kernel protocol (7.x), declared once.

Every message a read-only server exchanges with `/dev/fuse`, with the field names of the
kernel's `include/uapi/linux/fuse.h`, each size asserted against the kernel's.  Replies are
packed positionally in declaration order; requests are unpacked from the read buffer.  All
structures are native-endian (the kernel and the server run on the same machine); padding
and unused fields are pad bytes, written as zero.

Framing: one `read()` of the device returns one request, `fuse_in_header` + an opcode's
body; a reply is one `write()` (or `writev`) of `fuse_out_header` + payload, `error` being
0 or a negative errno.
"""

from __future__ import annotations

from enum import IntEnum

from cfsc.backends.erofs.layout import Layout

KERNEL_VERSION = 7
# The newest minor this server speaks (7.45: Linux 6.16).  Nothing it uses changed shape
# after 7.23; passthrough needs 7.40.  Older kernels than 7.23 (Linux 3.15) are refused.
KERNEL_MINOR_VERSION = 45
OLDEST_MINOR_VERSION = 23
ROOT_ID = 1
MIN_READ_BUFFER = 8192

# -- headers ---------------------------------------------------------------------------------

IN_HEADER = Layout("fuse_in_header", "=IIQQIIIH2x",
                   "len opcode unique nodeid uid gid pid total_extlen", 40)
OUT_HEADER = Layout("fuse_out_header", "=IiQ", "len error unique", 16)

# -- attributes and entries ------------------------------------------------------------------

ATTR = Layout("fuse_attr", "=QQQqqqIIIIIIIIII",
              "ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid "
              "rdev blksize flags", 88)
# fuse_entry_out: the attribute part is packed with the same format as ATTR, inline.
ENTRY_OUT = Layout("fuse_entry_out", "=QQQQII" + ATTR.struct.format[1:],
                   "nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec "
                   + " ".join(ATTR.fields), 128)
ATTR_OUT = Layout("fuse_attr_out", "=QI4x", "attr_valid attr_valid_nsec", 16)  # + fuse_attr
GETATTR_IN = Layout("fuse_getattr_in", "=I4xQ", "getattr_flags fh", 16)
FORGET_IN = Layout("fuse_forget_in", "=Q", "nlookup", 8)
BATCH_FORGET_IN = Layout("fuse_batch_forget_in", "=I4x", "count", 8)  # + fuse_forget_one[count]

# -- INIT ------------------------------------------------------------------------------------

INIT_IN = Layout("fuse_init_in", "=IIII", "major minor max_readahead flags", 16)
INIT_IN_FLAGS2 = Layout("fuse_init_in_ext", "=I44x", "flags2", 48)  # present from 7.36
INIT_OUT = Layout("fuse_init_out", "=IIIIHHIIHHII24x",
                  "major minor max_readahead flags max_background congestion_threshold max_write "
                  "time_gran max_pages map_alignment flags2 max_stack_depth", 64)

# fuse_init_in/out flags (bits 32..63 travel in flags2).
FUSE_ASYNC_READ = 1 << 0
FUSE_BIG_WRITES = 1 << 5
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_NO_OPEN_SUPPORT = 1 << 17
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_POSIX_ACL = 1 << 20
FUSE_ABORT_ERROR = 1 << 21
FUSE_MAX_PAGES = 1 << 22
FUSE_CACHE_SYMLINKS = 1 << 23
FUSE_NO_OPENDIR_SUPPORT = 1 << 24
FUSE_EXPLICIT_INVAL_DATA = 1 << 25
FUSE_INIT_EXT = 1 << 30
FUSE_PASSTHROUGH = 1 << 37

# -- files and directories -------------------------------------------------------------------

OPEN_IN = Layout("fuse_open_in", "=II", "flags open_flags", 8)
OPEN_OUT = Layout("fuse_open_out", "=QIi", "fh open_flags backing_id", 16)
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
FOPEN_PASSTHROUGH = 1 << 7
READ_IN = Layout("fuse_read_in", "=QQII8xI4x", "fh offset size read_flags flags", 40)
RELEASE_IN = Layout("fuse_release_in", "=QII8x", "fh flags release_flags", 24)
INTERRUPT_IN = Layout("fuse_interrupt_in", "=Q", "unique", 8)
DIRENT = Layout("fuse_dirent", "=QQII", "ino off namelen type", 24)  # + name, padded to 8
STATFS_OUT = Layout("fuse_kstatfs", "=QQQQQIII28x",
                    "blocks bfree bavail files ffree bsize namelen frsize", 80)
GETXATTR_IN = Layout("fuse_getxattr_in", "=I4x", "size", 8)  # + name NUL
GETXATTR_OUT = Layout("fuse_getxattr_out", "=I4x", "size", 8)

# -- passthrough (7.40) ----------------------------------------------------------------------

BACKING_MAP = Layout("fuse_backing_map", "=iIQ", "fd flags padding", 16)
FUSE_DEV_IOC_MAGIC = 229


def _iow(magic: int, number: int, size: int) -> int:
    """`_IOW(magic, number, size)` of asm-generic/ioctl.h."""
    return (1 << 30) | (size << 16) | (magic << 8) | number


FUSE_DEV_IOC_BACKING_OPEN = _iow(FUSE_DEV_IOC_MAGIC, 1, BACKING_MAP.size)
FUSE_DEV_IOC_BACKING_CLOSE = _iow(FUSE_DEV_IOC_MAGIC, 2, 4)
assert FUSE_DEV_IOC_BACKING_OPEN == 0x4010E501 and FUSE_DEV_IOC_BACKING_CLOSE == 0x4004E502

# -- opcodes ---------------------------------------------------------------------------------


class Opcode(IntEnum):
    """`enum fuse_opcode` (names without the `FUSE_` prefix)."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53


# Requests that would change the file system: answered EROFS.
MODIFYING = frozenset((
    Opcode.SETATTR, Opcode.SYMLINK, Opcode.MKNOD, Opcode.MKDIR, Opcode.UNLINK, Opcode.RMDIR,
    Opcode.RENAME, Opcode.LINK, Opcode.WRITE, Opcode.SETXATTR, Opcode.REMOVEXATTR, Opcode.CREATE,
    Opcode.FALLOCATE, Opcode.RENAME2, Opcode.COPY_FILE_RANGE, Opcode.TMPFILE,
    Opcode.COPY_FILE_RANGE_64))
