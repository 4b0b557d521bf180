"""Every on-disk structure of a composefs image, declared once.

Field names are the kernel's (`fs/erofs/erofs_fs.h`) and libcomposefs' (`lcfs-erofs.h`).  The
writer packs positionally in declaration order; the reader and `cfsc info` unpack into the
named tuples.  Reserved fields are pad bytes (`x`), so they are always written as zero and
never surface in readers.  Sizes are asserted against the kernel's.
"""

from __future__ import annotations

import struct
from collections import namedtuple
from functools import cached_property


class Layout:
    """A `struct.Struct` plus the names of its fields (pad bytes excluded).

    `offsets` maps each field to its `(offset, size)` inside the structure, derived from the
    format, so code that looks at single fields of raw bytes (comparing two images inode by
    inode, locating an error) names them instead of counting bytes."""

    def __init__(self, name: str, fmt: str, fields: str, size: int) -> None:
        self.name = name
        self.struct = struct.Struct(fmt)
        assert self.struct.size == size, (name, self.struct.size, size)
        self.size = size
        self.pack = self.struct.pack
        self.pack_into = self.struct.pack_into
        self.unpack_from = self.struct.unpack_from
        self.fields = tuple(fields.split())
        self.offsets = _field_offsets(fmt, self.fields)

    @cached_property
    def tuple(self) -> type:
        # Made on first use: a namedtuple class is ~60 µs, for every layout at every start,
        # and the writer never makes one.
        return namedtuple(self.name, self.fields)  # type: ignore[misc]

    def read(self, buf, offset: int = 0):
        return self.tuple._make(self.struct.unpack_from(buf, offset))

    def offset(self, field: str) -> int:
        return self.offsets[field][0]

    def end(self, field: str) -> int:
        """The offset just past a field."""
        at, size = self.offsets[field]
        return at + size

    def field(self, field: str) -> struct.Struct:
        """A struct reading just this field at the structure's start: `.unpack_from(buf, start)`
        (the field's offset is built in as pad bytes)."""
        at, size = self.offsets[field]
        return struct.Struct(f"<{at}x{_CODES[size]}" if size in _CODES else f"<{at}x{size}s")


_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
_SIZES = {"B": 1, "b": 1, "H": 2, "h": 2, "I": 4, "i": 4, "Q": 8, "q": 8}


def _items(fmt: str):
    """(count, code) of each item of a struct format (the byte-order mark skipped); by hand,
    as `re` is ~3 ms of start-up on paths that use no other pattern."""
    digits = ""
    for ch in fmt:
        if ch.isdigit():
            digits += ch
        elif ch in "xsBbHhIiQq":
            yield int(digits) if digits else 1, ch
            digits = ""


def _field_offsets(fmt: str, fields: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(offset, size) of each named field of a little-endian, unaligned struct format."""
    offsets = {}
    pos = 0
    names = iter(fields)
    for n, code in _items(fmt):
        if code == "x":
            pos += n
        elif code == "s":
            offsets[next(names)] = (pos, n)
            pos += n
        else:
            for _ in range(n):
                offsets[next(names)] = (pos, _SIZES[code])
                pos += _SIZES[code]
    assert next(names, None) is None, (fmt, fields)
    return offsets


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
# Where the two inode layouts agree: a reader looks at these before it knows which it has.
# Before i_u the compact inode has i_nlink and a 4-byte i_size where the extended one has
# padding and an 8-byte i_size, so the bytes before i_u compare alike only in one layout.
INODE_SHARED_FIELDS = ("i_format", "i_xattr_icount", "i_mode", "i_u", "i_ino")
for _name in INODE_SHARED_FIELDS:
    assert EROFS_INODE_COMPACT.offsets[_name] == EROFS_INODE_EXTENDED.offsets[_name], _name
# The start of either inode: what tells the layouts apart, read in one go.
EROFS_INODE_HEAD = Layout("erofs_inode_head", "<HHH", "i_format i_xattr_icount i_mode", 6)
assert all(EROFS_INODE_HEAD.offsets[f] == EROFS_INODE_COMPACT.offsets[f] for f in EROFS_INODE_HEAD.fields)
# i_format: bit 0 = extended inode, bits 1-3 = data layout.
EROFS_I_VERSION_BIT = 0
EROFS_I_DATALAYOUT_BIT = 1
EROFS_I_DATALAYOUT_MASK = 0x7
EROFS_I_ALL = 0xF  # i_format bits a reader may see set (version + data layout)
EROFS_INODE_FLAT_PLAIN = 0
EROFS_INODE_FLAT_INLINE = 2
EROFS_INODE_CHUNK_BASED = 4
EROFS_CHUNK_FORMAT_BLKBITS_MASK = 0x1F
EROFS_BLOCK_MAP_ENTRY_SIZE = 4  # a chunk-based inode without chunk indexes: one __le32 per chunk
EROFS_NULL_ADDR = 0xFFFFFFFF

EROFS_XATTR_IBODY_HEADER = Layout(
    "erofs_xattr_ibody_header", "<IB7x", "h_name_filter h_shared_count", 12)
EROFS_XATTR_ENTRY = Layout(
    "erofs_xattr_entry", "<BBH", "e_name_len e_name_index e_value_size", 4)
EROFS_XATTR_ALIGN = 4  # entries are 4-byte aligned; shared ids and i_xattr_icount count 4-byte units
EROFS_XATTR_FILTER_SEED = 0x25BBE08F
EROFS_XATTR_FILTER_BITS = 32
EROFS_XATTR_FILTER_DEFAULT = 0xFFFFFFFF
EROFS_XATTR_LONG_PREFIX = 0x80  # libcomposefs' cap on shared references per inode


def xattr_ibody_size(icount: int) -> int:
    """Bytes of an inode's xattr body from its i_xattr_icount (the header counts as one unit)."""
    return EROFS_XATTR_IBODY_HEADER.size + EROFS_XATTR_ALIGN * (icount - 1) if icount else 0


# The POSIX ACL keys: an image holding either sets COMPOSEFS_FLAGS_HAS_ACL (without it,
# mount.composefs mounts EROFS with `noacl`).
ACL_KEYS = (b"system.posix_acl_access", b"system.posix_acl_default")
# Prefix indexes: libcomposefs writes the first match of this list (lustre. is never used
# by the writer, but the reader knows index 5).
XATTR_PREFIXES = (b"", b"user.", *ACL_KEYS, b"trusted.", b"lustre.", b"security.")
WRITER_PREFIXES = tuple((XATTR_PREFIXES[i], i) for i in (1, 2, 3, 4, 6))

EROFS_DIRENT = Layout("erofs_dirent", "<QHBx", "nid nameoff file_type", 12)
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
