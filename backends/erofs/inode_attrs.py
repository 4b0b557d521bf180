"""An inode's stat fields and inline xattrs in one step, for readers that touch every inode.

`Image.inode` builds a `RawInode` (18 fields, every check); a FUSE server answering the
first walk of a fresh mount needs only the stat fields of each entry, tens of thousands of
times.  `stat_fields` reads them with the same checks and no object; `inline_xattrs` reads
the inline xattr entries of a body in the usual shape (the writer's per-file metacopy and
redirect).  Both return None for anything else — an inode near the end of the image, a
malformed field, an unusual body — and the caller then takes the reference path
(`Image.inode`, `Image.xattrs`), which handles the rare shapes and locates every error.
`lowered_pair` is narrower still: the body the writer gives every file whose data is in the
store (shared ids, then exactly the inline metacopy and redirect), recognised by its bytes.
`tests/test_fuse_fastpaths.py` holds the two paths equal over whole images, hostile ones included.
"""

from __future__ import annotations

import struct

from cfsc.backends.erofs.layout import (
    EROFS_I_ALL,
    EROFS_INODE_COMPACT,
    EROFS_INODE_EXTENDED,
    EROFS_INODE_FLAT_INLINE,
    EROFS_ISLOTBITS,
    EROFS_XATTR_ENTRY,
    EROFS_XATTR_IBODY_HEADER,
    XATTR_PREFIXES,
)
from cfsc.backends.erofs.overlay import METACOPY, REDIRECT
from cfsc.backends.erofs.reader import BLK, LAYOUTS, U64_SIGN, Image
from cfsc.base.limits import VALID_TYPES
from cfsc.base.tree import S_IFMT

_unpack_compact = EROFS_INODE_COMPACT.unpack_from
_unpack_extended = EROFS_INODE_EXTENDED.unpack_from
_unpack_entry = EROFS_XATTR_ENTRY.unpack_from
_N_PREFIXES = len(XATTR_PREFIXES)
# The inline entry headers of the writer's metacopy and redirect (name length 16, the
# `trusted.` prefix index); the value size follows them.
_TRUSTED_INDEX = XATTR_PREFIXES.index(b"trusted.")
_METACOPY_NAME = METACOPY[len(XATTR_PREFIXES[_TRUSTED_INDEX]):]  # (the convention's names, declared in overlay)
_REDIRECT_NAME = REDIRECT[len(XATTR_PREFIXES[_TRUSTED_INDEX]):]
# An entry header and a 16-byte name in one unpack: (name length | prefix index << 8, value
# size, name).
_unpack_named = struct.Struct("<HH16s").unpack_from
_NAMED_TRUSTED = 16 | _TRUSTED_INDEX << 8
assert EROFS_XATTR_ENTRY.struct.format == "<BBH"
assert XATTR_PREFIXES[_TRUSTED_INDEX] + _METACOPY_NAME == METACOPY and len(_METACOPY_NAME) == 16
assert XATTR_PREFIXES[_TRUSTED_INDEX] + _REDIRECT_NAME == REDIRECT and len(_REDIRECT_NAME) == 16
# Spelled out below as literals (a global lookup per inode costs): the inode sizes, the
# slot shift, the xattr body header, its shared count's offset, an entry header.
assert (EROFS_INODE_COMPACT.size, EROFS_INODE_EXTENDED.size, EROFS_ISLOTBITS) == (32, 64, 5)
assert (EROFS_XATTR_IBODY_HEADER.size, EROFS_XATTR_IBODY_HEADER.offset("h_shared_count"),
        EROFS_XATTR_ENTRY.size) == (12, 4, 4)


def stat_fields(image: Image, nid: int) -> tuple | None:
    """`(mode, nlink, uid, gid, size, i_u, mtime, mtime_nsec, xattr_offset, xattr_size)` of
    inode `nid` as `Image.inode` reads them (`i_u` is rdev for devices), or None where that
    reference path must decide."""
    off = image.meta_base + (nid << 5)
    end = image.end
    if off + 64 > end:
        return None
    data = image.data
    if data[off] & 1:  # the format's low bit, read first: one unpack per inode
        i_format, icount, mode, size, u, _ino, uid, gid, mtime, nsec, nlink = _unpack_extended(data, off)
        if mtime & U64_SIGN:
            mtime -= 1 << 64
        isize = 64
    else:
        i_format, icount, mode, nlink, size, u, _ino, uid, gid = _unpack_compact(data, off)
        mtime = image.build_time
        nsec = image.build_time_nsec
        isize = 32
    layout = (i_format >> 1) & 7
    if i_format & ~EROFS_I_ALL or layout not in LAYOUTS or mode & S_IFMT not in VALID_TYPES:
        return None
    xsize = 12 + 4 * (icount - 1) if icount else 0
    tail = off + isize + xsize
    if layout == EROFS_INODE_FLAT_INLINE and size:
        tail_size = (size - 1) % BLK + 1
        if tail + tail_size > end or tail % BLK + tail_size > BLK:
            return None
    elif tail > end:
        return None
    return mode, nlink, uid, gid, size, u, mtime, nsec, off + isize, xsize


def inline_xattrs(image: Image, offset: int, size: int) -> tuple[bytes, list] | None:
    """`(head, [(key, value)])` of the xattr body at `offset`: `head` is the header with the
    shared ids (what `Image.xattr_body` calls a shared-only body), then the inline entries
    with their full keys.  None where `Image.xattrs` must decide (a malformed entry, an
    unknown prefix, a key with NUL)."""
    data = image.data
    end = offset + size
    if size < 12:
        return None
    pos = offset + 12 + 4 * data[offset + 4]
    if pos > end:
        return None
    head = data[offset:pos]
    items = []
    while pos < end:
        if pos + 4 > end:
            return None
        name_len, index, value_len = _unpack_entry(data, pos)
        name_end = pos + 4 + name_len
        value_end = name_end + value_len
        if value_end > end or index >= _N_PREFIXES or not name_len:
            return None
        name = data[pos + 4:name_end]
        if b"\0" in name:
            return None
        items.append((XATTR_PREFIXES[index] + name, data[name_end:value_end]))
        pos = (value_end + 3) & ~3
    return head, items


def lowered_pair(image: Image, offset: int, size: int) -> tuple[bytes, bytes, bytes] | None:
    """`(head, metacopy, redirect)` of an xattr body that is shared ids then exactly an
    inline metacopy and an inline redirect — what `inline_xattrs` returns as
    `(head, [(METACOPY, metacopy), (REDIRECT, redirect)])` — read without the generic loop
    (a store-backed file's usual body).  None for any other body: the caller then takes
    `inline_xattrs`, which decides it."""
    if size < 12:
        return None
    data = image.data
    end = offset + size
    pos = offset + 12 + 4 * data[offset + 4]
    if pos + 20 > end:
        return None
    kind, m_size, name = _unpack_named(data, pos)
    if kind != _NAMED_TRUSTED or name != _METACOPY_NAME:
        return None
    m_end = pos + 20 + m_size
    r = (m_end + 3) & ~3
    if r + 20 > end:
        return None
    kind, r_size, name = _unpack_named(data, r)
    if kind != _NAMED_TRUSTED or name != _REDIRECT_NAME:
        return None
    r_end = r + 20 + r_size
    if r_end > end or (r_end + 3) & ~3 < end:  # a value past the body, or more entries after
        return None
    return data[offset:pos], data[pos + 20:m_end], data[r + 20:r_end]
