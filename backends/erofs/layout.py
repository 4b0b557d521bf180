"""Every on-disk structure of a composefs image, declared once.

Field names are the kernel's (`fs/erofs/erofs_fs.h`) and libcomposefs' (`lcfs-erofs.h`).  The
writer packs positionally in declaration order; the reader and `cfsc info` unpack into the
named tuples.  Reserved fields are pad bytes (`x`), so they are always written as zero and
never surface in readers.  Sizes are asserted against the kernel's.
"""

from __future__ import annotations

import struct
from collections import namedtuple


class Layout:
    """A `struct.Struct` plus the names of its fields (pad bytes excluded)."""

    def __init__(self, name: str, fmt: str, fields: str, size: int) -> None:
        self.name = name
        self.struct = struct.Struct(fmt)
        assert self.struct.size == size, (name, self.struct.size, size)
        self.size = size
        self.pack = self.struct.pack
        self.pack_into = self.struct.pack_into
        self.unpack_from = self.struct.unpack_from
        self.fields = tuple(fields.split())
        self.tuple = namedtuple(name, self.fields)  # type: ignore[misc]

    def read(self, buf, offset: int = 0):
        return self.tuple._make(self.struct.unpack_from(buf, offset))


# struct lcfs_erofs_header_s: the first 32 bytes of the image.
COMPOSEFS_HEADER = Layout(
    "lcfs_erofs_header", "<IIII16x", "magic version flags composefs_version", 32)
COMPOSEFS_MAGIC = 0xD078629A
COMPOSEFS_HEADER_VERSION = 1
COMPOSEFS_FLAGS_HAS_ACL = 0x1

EROFS_SUPER_OFFSET = 1024
EROFS_SUPER_BLOCK = Layout(
    "erofs_super_block",
    "<IIIBBHQQIIII16s16sIHHHBBIQB23x",
    "magic checksum feature_compat blkszbits sb_extslots root_nid inos build_time "
    "build_time_nsec blocks meta_blkaddr xattr_blkaddr uuid volume_name feature_incompat "
    "available_compr_algs extra_devices devt_slotoff dirblkbits xattr_prefix_count "
    "xattr_prefix_start packed_nid xattr_filter_reserved",
    128)
EROFS_SUPER_MAGIC_V1 = 0xE0F5E1E2
EROFS_FEATURE_INCOMPAT_CHUNKED_FILE = 0x4  # other writers set it; libcomposefs does not
EROFS_FEATURE_COMPAT_MTIME = 0x2
EROFS_FEATURE_COMPAT_XATTR_FILTER = 0x4
EROFS_BLKSIZ_BITS = 12
EROFS_BLKSIZ = 1 << EROFS_BLKSIZ_BITS
EROFS_SLOTSIZE = 32
EROFS_ISLOTBITS = 5

EROFS_INODE_COMPACT = Layout(
    "erofs_inode_compact", "<HHHHI4xIIHH4x",
    "i_format i_xattr_icount i_mode i_nlink i_size i_u i_ino i_uid i_gid", 32)
EROFS_INODE_EXTENDED = Layout(
    "erofs_inode_extended", "<HHH2xQIIIIQII16x",
    "i_format i_xattr_icount i_mode i_size i_u i_ino i_uid i_gid i_mtime i_mtime_nsec i_nlink",
    64)
# i_format: bit 0 = extended inode, bits 1-3 = data layout.
EROFS_I_VERSION_BIT = 0
EROFS_I_DATALAYOUT_BIT = 1
EROFS_I_DATALAYOUT_MASK = 0x7
EROFS_I_ALL = 0xF  # i_format bits a reader may see set (version + data layout)
EROFS_INODE_FLAT_PLAIN = 0
EROFS_INODE_FLAT_INLINE = 2
EROFS_INODE_CHUNK_BASED = 4
EROFS_CHUNK_FORMAT_BLKBITS_MASK = 0x1F
EROFS_NULL_ADDR = 0xFFFFFFFF

EROFS_XATTR_IBODY_HEADER = Layout(
    "erofs_xattr_ibody_header", "<IB7x", "h_name_filter h_shared_count", 12)
EROFS_XATTR_ENTRY = Layout(
    "erofs_xattr_entry", "<BBH", "e_name_len e_name_index e_value_size", 4)
EROFS_XATTR_FILTER_SEED = 0x25BBE08F
EROFS_XATTR_FILTER_BITS = 32
EROFS_XATTR_FILTER_DEFAULT = 0xFFFFFFFF
EROFS_XATTR_LONG_PREFIX = 0x80  # libcomposefs' cap on shared references per inode

# Prefix indexes: libcomposefs writes the first match of this list (lustre. is never used
# by the writer, but the reader knows index 5).
XATTR_PREFIXES = (
    b"", b"user.", b"system.posix_acl_access", b"system.posix_acl_default", b"trusted.",
    b"lustre.", b"security.")
WRITER_PREFIXES = ((b"user.", 1), (b"system.posix_acl_access", 2),
                   (b"system.posix_acl_default", 3), (b"trusted.", 4), (b"security.", 6))

EROFS_DIRENT = Layout("erofs_dirent", "<QHBx", "nid nameoff file_type", 12)
EROFS_NAME_LEN = 255
EROFS_FT_UNKNOWN = 0
EROFS_FT_REG_FILE = 1
EROFS_FT_DIR = 2
EROFS_FT_CHRDEV = 3
EROFS_FT_BLKDEV = 4
EROFS_FT_FIFO = 5
EROFS_FT_SOCK = 6
EROFS_FT_SYMLINK = 7

# composefs limits that shape the layout
INLINE_TAIL_MAX = EROFS_BLKSIZ // 2  # tails above half a block become full blocks
MAX_CHUNKS = 1024
