"""Read a composefs image: the EROFS structures, bounds-checked, on demand.

The reader is a parser of untrusted bytes.  Every access is checked against the end of the
file system (`blocks × 4096`, itself checked against the file) before it is made, every
size comes from a field that was checked first, and every problem is an `ImageError` whose
`where` is `NAME@0xOFFSET` (the byte offset of the bad structure) and whose text names the
structure: `img.cfs@0x480: inode nid 36: …`.  Nothing here loops over a count it has not
bounded by the bytes that hold it, so a hostile image cannot make the reader hang or allocate
more than the image's own size — and `Image.open` reads no more than the size the superblock
declares, however much a (compressed) input holds after it.

API (the FUSE server and the inspection verbs build on it; nothing is read until asked):

    image = Image.open("img.cfs")          # or Image(buffer, name) for bytes or an mmap
    image.version, image.flags             # composefs header: format version 0/1, flags
    image.root_nid, image.inode_count      # superblock
    ino = image.inode(nid)                 # RawInode: stat fields as stored, layout, offsets
    image.dirents(ino)                     # [(name, nid, file_type)], sorted, no . and ..
    image.lookup(ino, name)                # nid of one entry (binary search), or None
    image.content(ino)                     # inline file data (FLAT_PLAIN / FLAT_INLINE)
    image.symlink(ino)                     # symlink target
    image.xattrs(ino)                      # [(key, value)] full keys, on-disk order:
                                           # inline entries, then shared ones

What a *user* sees is one layer up, in `cfsc.backends.erofs.entries`: `Entries(image).of(ino)`
gives an `Entry` (stat fields, payload = backing file or symlink target, fs-verity digest,
inline content, user xattrs with the overlay ones undone) or None for a hidden whiteout;
`walk()` is composefs-info's depth-first walk and `resolve()` a path lookup.  A FUSE server
maps GETATTR to an Entry (inode number: `nid`, unique per inode, or `ino` = on-disk `i_ino`),
LOOKUP to `image.lookup` + `Entries.of`, READDIR to `image.dirents` (dropping hidden
whiteouts), READLINK to `Entry.payload`, GETXATTR/LISTXATTR to `Entry.xattrs` (or
`image.xattrs` for the raw keys the kernel's lower layer has), and READ to `Entry.content`
or the store object `Entry.payload` (checked against `Entry.digest`).  Directory listings are
parsed on each call: cache them per nid if they are asked for often.

Rules checked beyond bounds, each because the kernel relies on it too: directory names in
strictly increasing byte order (lookups are binary searches), name offsets increasing and
inside their block, inline tails inside one block, only the data layouts composefs writes.
"""

from __future__ import annotations

import struct
from bisect import bisect_left

from cfsc.backends.erofs.layout import (
    COMPOSEFS_HEADER,
    COMPOSEFS_HEADER_VERSION,
    COMPOSEFS_MAGIC,
    EROFS_BLKSIZ,
    EROFS_BLKSIZ_BITS,
    EROFS_DIRENT,
    EROFS_FEATURE_INCOMPAT_CHUNKED_FILE,
    EROFS_I_ALL,
    EROFS_I_DATALAYOUT_BIT,
    EROFS_I_DATALAYOUT_MASK,
    EROFS_I_VERSION_BIT,
    EROFS_INODE_CHUNK_BASED,
    EROFS_INODE_COMPACT,
    EROFS_INODE_EXTENDED,
    EROFS_INODE_FLAT_INLINE,
    EROFS_INODE_FLAT_PLAIN,
    EROFS_ISLOTBITS,
    EROFS_SUPER_BLOCK,
    EROFS_SUPER_MAGIC_V1,
    EROFS_SUPER_OFFSET,
    EROFS_XATTR_ALIGN,
    EROFS_XATTR_ENTRY,
    EROFS_XATTR_IBODY_HEADER,
    XATTR_PREFIXES,
)
from cfsc.base.errors import ImageError
from cfsc.base.limits import INLINE_CONTENT_MAX, NAME_MAX, PATH_MAX, VALID_TYPES
from cfsc.base.streams import read_declared, source_name
from cfsc.base.tree import S_IFDIR, S_IFLNK, S_IFMT, S_IFREG

BLK = EROFS_BLKSIZ
HEAD_SIZE = EROFS_SUPER_OFFSET + EROFS_SUPER_BLOCK.size  # what `Image.open` reads before it knows the size
SYMLINK_MAX = PATH_MAX - 1
LAYOUTS = (EROFS_INODE_FLAT_PLAIN, EROFS_INODE_FLAT_INLINE, EROFS_INODE_CHUNK_BASED)
U64_SIGN = 1 << 63

_unpack_compact = EROFS_INODE_COMPACT.unpack_from
_unpack_extended = EROFS_INODE_EXTENDED.unpack_from
_unpack_ibody = EROFS_XATTR_IBODY_HEADER.unpack_from
_unpack_entry = EROFS_XATTR_ENTRY.unpack_from
_iter_dirents = EROFS_DIRENT.struct.iter_unpack
_dirent_head = EROFS_DIRENT.unpack_from
_U32S = [struct.Struct(f"<{n}I") for n in range(256)]  # h_shared_count is a u8
_SB = EROFS_SUPER_BLOCK.offset  # where a bad superblock field is
_HEADER = COMPOSEFS_HEADER.offset
_COMPACT = EROFS_INODE_COMPACT.size
_EXTENDED = EROFS_INODE_EXTENDED.size
_DIRENT = EROFS_DIRENT.size
_NAMEOFF = EROFS_DIRENT.offset("nameoff")
_IBODY = EROFS_XATTR_IBODY_HEADER.size  # shared ids follow the header
_SHARED_COUNT = EROFS_XATTR_IBODY_HEADER.offset("h_shared_count")
_ENTRY = EROFS_XATTR_ENTRY.size  # the name follows the entry header, then the value
_ALIGN = EROFS_XATTR_ALIGN
# The per-inode paths (`inode`, `footprint`, `xattr_body`) spell these out as literals: a
# module-global lookup per use costs ~3% of a walk.  The inode sizes, the xattr body header,
# its shared count's offset and its unit, the extended-inode bit:
assert (_COMPACT, _EXTENDED, _IBODY, _SHARED_COUNT, _ALIGN, 1 << EROFS_I_VERSION_BIT) == (32, 64, 12, 4, 4, 1)


class RawInode:
    """One on-disk inode, as stored (no overlay interpretation).

    `mtime` is the superblock build time for compact inodes, as the kernel reports it.
    `tail` is the offset of the inline tail (FLAT_INLINE data) and
    `tail_size` its length; `blkaddr` is `i_u` read as a block address (data layouts) — for
    devices `rdev` holds the same field.
    """

    __slots__ = ("nid", "offset", "extended", "layout", "mode", "nlink", "size", "blkaddr",
                 "ino", "uid", "gid", "mtime", "mtime_nsec", "xattr_count", "xattr_offset",
                 "xattr_size", "tail", "tail_size")

    @property
    def rdev(self) -> int:
        return self.blkaddr

    @property
    def ftype(self) -> int:
        return self.mode & S_IFMT

    def __repr__(self) -> str:
        return f"<RawInode nid={self.nid} ino={self.ino} mode={self.mode:o} size={self.size}>"


class Image:
    """A composefs image held in memory (bytes or an mmap)."""

    def __init__(self, data, name: str = "<image>") -> None:
        self.data = data
        self.name = name
        self._shared: dict[int, tuple[bytes, bytes]] = {}  # shared xattr id -> (key, value)
        self._read_super()

    @classmethod
    def open(cls, source) -> Image:
        """Open a path (`-` = stdin; gzip/zstd/xz-compressed images are decompressed).

        Only the image is read: the header and superblock, then up to the `blocks × 4096`
        bytes the superblock declares.  A file or device may hold more (the kernel mounts
        a file system from a larger device too): the rest is not read, and `data` — what
        `info` describes and `--digest` checks — is the image alone.  A compressed stream
        that goes on after the declared image is refused: trailing data there means the
        stream and the superblock disagree (or a decompression bomb), and nothing past
        the declared size is ever inflated.
        """
        name = source_name(source)
        data, kind, more = read_declared(source, HEAD_SIZE, cls.declared_size)
        image = cls(data, name)
        if more:
            raise image.error(image.end, f"the {kind} stream goes on after the {image.super.blocks} blocks "
                                         f"({image.end} bytes) the superblock declares: trailing data in a "
                                         "compressed image is refused")
        return image

    @staticmethod
    def declared_size(head: bytes) -> int:
        """The bytes an image starting with `head` says it has (just `head` if the head
        cannot say: the constructor then says what is wrong with it)."""
        if len(head) < HEAD_SIZE or int.from_bytes(head[:4], "little") != COMPOSEFS_MAGIC:
            return len(head)
        return max(EROFS_SUPER_BLOCK.read(head, EROFS_SUPER_OFFSET).blocks * BLK, len(head))

    # -- errors -----------------------------------------------------------------------------

    def error(self, offset: int, what: str) -> ImageError:
        return ImageError(what, f"{self.name}@0x{offset:x}")

    def _need(self, offset: int, length: int, what: str) -> None:
        """Fail unless `length` bytes at `offset` lie inside the file system."""
        if offset < 0 or length < 0 or offset + length > self.end:
            raise self.error(offset, f"{what}: {length} bytes at 0x{offset:x} run past the end of the "
                                     f"image (0x{self.end:x})")

    # -- header and superblock -------------------------------------------------------------

    def _read_super(self) -> None:
        data = self.data
        size = len(data)
        magic_end = COMPOSEFS_HEADER.end("magic")
        if size >= magic_end and int.from_bytes(data[:magic_end], "little") != COMPOSEFS_MAGIC:
            raise self.error(0, f"composefs header: magic 0x{int.from_bytes(data[:magic_end], 'little'):08x}, "
                                f"expected 0x{COMPOSEFS_MAGIC:08x} (not a composefs image)")
        if size < EROFS_SUPER_OFFSET + EROFS_SUPER_BLOCK.size:
            raise self.error(size, f"image of {size} bytes is truncated: the composefs header and "
                                   f"superblock need {EROFS_SUPER_OFFSET + EROFS_SUPER_BLOCK.size}")
        header = COMPOSEFS_HEADER.read(data)
        if header.version != COMPOSEFS_HEADER_VERSION:
            raise self.error(_HEADER("version"), f"composefs header: version {header.version}, expected "
                                f"{COMPOSEFS_HEADER_VERSION}")
        if header.composefs_version > 1:
            raise self.error(_HEADER("composefs_version"), f"composefs header: format version {header.composefs_version}, "
                                 "expected 0 or 1")
        self.header = header
        self.version = header.composefs_version
        self.flags = header.flags
        sb = EROFS_SUPER_BLOCK.read(data, EROFS_SUPER_OFFSET)
        self.super = sb
        at = EROFS_SUPER_OFFSET
        if sb.magic != EROFS_SUPER_MAGIC_V1:
            raise self.error(at, f"EROFS superblock: magic 0x{sb.magic:08x}, expected 0x{EROFS_SUPER_MAGIC_V1:08x}")
        if sb.blkszbits != EROFS_BLKSIZ_BITS:
            raise self.error(at + _SB("blkszbits"), f"EROFS superblock: block size 2^{sb.blkszbits}, expected 2^{EROFS_BLKSIZ_BITS}")
        if sb.dirblkbits:
            raise self.error(at + _SB("dirblkbits"), f"EROFS superblock: directory block bits {sb.dirblkbits}, expected 0")
        if sb.feature_incompat & ~EROFS_FEATURE_INCOMPAT_CHUNKED_FILE:
            raise self.error(at + _SB("feature_incompat"), f"EROFS superblock: incompatible features 0x{sb.feature_incompat:x} "
                                      "(compression, devices or long xattr prefixes) are not supported")
        end = sb.blocks * BLK
        if end > size:
            raise self.error(at + _SB("blocks"), f"EROFS superblock: {sb.blocks} blocks ({end} bytes), but the image has "
                                      f"{size} bytes (truncated?)")
        if end < EROFS_SUPER_OFFSET + EROFS_SUPER_BLOCK.size:
            raise self.error(at + _SB("blocks"), f"EROFS superblock: {sb.blocks} blocks is too few to hold the superblock")
        self.end = end
        self._shared_budget = end
        self.meta_base = sb.meta_blkaddr * BLK
        self.xattr_base = sb.xattr_blkaddr * BLK
        if self.meta_base >= end:
            raise self.error(at + _SB("meta_blkaddr"), f"EROFS superblock: meta_blkaddr {sb.meta_blkaddr} is past the last block")
        if self.xattr_base >= end:
            raise self.error(at + _SB("xattr_blkaddr"), f"EROFS superblock: xattr_blkaddr {sb.xattr_blkaddr} is past the last block")
        self.root_nid = sb.root_nid
        self.inode_count = sb.inos
        t = sb.build_time
        self.build_time = t - (1 << 64) if t & U64_SIGN else t
        self.build_time_nsec = sb.build_time_nsec

    # -- inodes --------------------------------------------------------------------------

    def inode_offset(self, nid: int) -> int:
        return self.meta_base + (nid << EROFS_ISLOTBITS)

    def inode(self, nid: int) -> RawInode:
        off = self.meta_base + (nid << EROFS_ISLOTBITS)
        end = self.end
        if off + 32 > end:
            raise self.error(off, f"inode nid {nid}: past the end of the image (0x{end:x})")
        data = self.data
        (i_format, icount, mode, nlink, size, u, i_ino, uid, gid) = _unpack_compact(data, off)
        ino = RawInode()
        ino.nid = nid
        ino.offset = off
        if i_format & 1:
            if off + 64 > end:
                raise self.error(off, f"inode nid {nid}: extended inode runs past the end of the image")
            (_f, icount, mode, size, u, i_ino, uid, gid, mtime, nsec, nlink) = _unpack_extended(data, off)
            ino.extended = True
            isize = 64
            ino.mtime = mtime - (1 << 64) if mtime & U64_SIGN else mtime
            ino.mtime_nsec = nsec
        else:
            ino.extended = False
            isize = 32
            ino.mtime = self.build_time
            ino.mtime_nsec = self.build_time_nsec
        if i_format & ~EROFS_I_ALL:
            raise self.error(off, f"inode nid {nid}: i_format 0x{i_format:x} has unknown bits set")
        layout = (i_format >> EROFS_I_DATALAYOUT_BIT) & EROFS_I_DATALAYOUT_MASK
        if layout not in LAYOUTS:
            raise self.error(off, f"inode nid {nid}: data layout {layout} is not one composefs uses "
                                  "(0 flat plain, 2 flat inline, 4 chunk based)")
        if mode & S_IFMT not in VALID_TYPES:
            raise self.error(off + EROFS_INODE_COMPACT.offset("i_mode"), f"inode nid {nid}: mode {mode:o} has no valid file type")
        ino.layout = layout
        ino.mode = mode
        ino.nlink = nlink
        ino.size = size
        ino.blkaddr = u
        ino.ino = i_ino
        ino.uid = uid
        ino.gid = gid
        ino.xattr_count = icount
        xsize = 12 + 4 * (icount - 1) if icount else 0  # `layout.xattr_ibody_size`
        ino.xattr_offset = off + isize
        ino.xattr_size = xsize
        tail = off + isize + xsize
        ino.tail = tail
        if layout == EROFS_INODE_FLAT_INLINE:
            tail_size = (size - 1) % BLK + 1 if size else 0
        else:
            # A chunk-based file's index (all holes: the data comes from the overlay's lower
            # layer) is not read; libcomposefs may even have moved it out (§2.5).
            tail_size = 0
        ino.tail_size = tail_size
        if tail + tail_size > end:
            raise self.error(off, f"inode nid {nid}: inode, {xsize} bytes of xattrs and a {tail_size}-byte "
                                  f"inline tail run past the end of the image (0x{end:x})")
        if tail_size and tail % BLK + tail_size > BLK:
            raise self.error(tail, f"inode nid {nid}: inline tail of {tail_size} bytes crosses a block boundary")
        return ino

    # -- data ----------------------------------------------------------------------------

    def _blocks_and_tail(self, ino: RawInode) -> tuple[int, int]:
        """(bytes held in whole blocks from `blkaddr`, bytes in the inline tail)."""
        if ino.layout == EROFS_INODE_FLAT_INLINE:
            return ino.size - ino.tail_size, ino.tail_size
        if ino.layout == EROFS_INODE_FLAT_PLAIN:
            return ino.size, 0
        raise self.error(ino.offset, f"inode nid {ino.nid}: a {_type_name(ino.mode)} cannot be chunk based")

    def _data(self, ino: RawInode, what: str) -> bytes:
        in_blocks, in_tail = self._blocks_and_tail(ino)
        parts = b""
        if in_blocks:
            start = ino.blkaddr * BLK
            self._need(start, in_blocks, f"inode nid {ino.nid}: {what} (block {ino.blkaddr})")
            parts = self.data[start:start + in_blocks]
        if in_tail:
            parts += self.data[ino.tail:ino.tail + in_tail]
        return bytes(parts)

    def content(self, ino: RawInode) -> bytes:
        """The data of a regular file stored in the image (libcomposefs inlines ≤ 5000 bytes)."""
        if ino.size > INLINE_CONTENT_MAX:
            raise self.error(ino.offset, f"inode nid {ino.nid}: inline file of {ino.size} bytes exceeds "
                                         f"composefs' limit of {INLINE_CONTENT_MAX}")
        return self._data(ino, "file content")

    def symlink(self, ino: RawInode) -> bytes:
        size = ino.size
        if not 0 < size <= SYMLINK_MAX:
            raise self.error(ino.offset + EROFS_INODE_COMPACT.offset("i_size"), f"inode nid {ino.nid}: symlink target of {size} bytes, "
                                             f"expected 1 to {SYMLINK_MAX}")
        target = self._data(ino, "symlink target")
        if b"\0" in target:
            raise self.error(ino.offset, f"inode nid {ino.nid}: symlink target contains NUL")
        return target

    # -- directories ----------------------------------------------------------------------

    def footprint(self, ino: RawInode) -> int:
        """Bytes an inode's own data occupies: the inode, its xattrs and inline tail, plus
        the blocks of a directory, symlink or inline file (for `ReadBudget`)."""
        size = (64 if ino.extended else 32) + ino.xattr_size + ino.tail_size
        ftype = ino.mode & S_IFMT
        if ino.layout != EROFS_INODE_CHUNK_BASED:
            in_blocks = max(ino.size - ino.tail_size, 0)
            if ftype == S_IFDIR:
                size += in_blocks
            elif ftype == S_IFREG and ino.size <= INLINE_CONTENT_MAX or ftype == S_IFLNK and ino.size <= SYMLINK_MAX:
                size += in_blocks  # (larger ones are refused unread)
        return size

    def dirents(self, ino: RawInode) -> list[tuple[bytes, int, int]]:
        """A directory's entries in on-disk (sorted) order, without `.` and `..`."""
        if ino.mode & S_IFMT != S_IFDIR:
            raise self.error(ino.offset, f"inode nid {ino.nid}: not a directory")
        in_blocks, in_tail = self._blocks_and_tail(ino)
        entries: list[tuple[bytes, int, int]] = []
        if in_blocks:
            start = ino.blkaddr * BLK
            self._need(start, in_blocks, f"directory nid {ino.nid}: blocks from {ino.blkaddr}")
            for block in range(start, start + in_blocks, BLK):
                self._dirent_block(ino, block, min(BLK, start + in_blocks - block), entries)
        if in_tail:
            self._dirent_block(ino, ino.tail, in_tail, entries)
        names = [e[0] for e in entries]
        if not all(map(bytes.__lt__, names, names[1:])):
            for i in range(1, len(names)):
                if names[i - 1] >= names[i]:
                    raise self.error(ino.offset, f"directory nid {ino.nid}: entry {names[i]!r} is not after "
                                                 f"{names[i - 1]!r} (names must be unique and sorted)")
        return [e for e in entries if e[0] != b"." and e[0] != b".."]

    def _dirent_block(self, ino: RawInode, start: int, length: int, out: list) -> None:
        data = self.data
        where = f"directory nid {ino.nid}: dirent block at 0x{start:x}"
        if length < _DIRENT:
            raise self.error(start, f"{where}: {length} bytes cannot hold a dirent")
        nameoff0 = _dirent_head(data, start)[1]
        if nameoff0 < _DIRENT or nameoff0 % _DIRENT or nameoff0 >= length:
            raise self.error(start + _NAMEOFF, f"{where}: first name offset {nameoff0}, expected a multiple of {_DIRENT} "
                                        f"below the block size {length}")
        records = list(_iter_dirents(data[start:start + nameoff0]))
        offsets = [r[1] for r in records]
        last = data.find(b"\0", start + offsets[-1], start + length)
        offsets.append((last if last >= 0 else start + length) - start)
        if not all(map(int.__lt__, offsets, offsets[1:])):
            for i in range(1, len(offsets)):
                if not offsets[i - 1] < offsets[i] <= length:
                    raise self.error(start + _DIRENT * min(i, len(records) - 1) + _NAMEOFF,
                                     f"{where}: name offset {offsets[i]} after {offsets[i - 1]}: offsets "
                                     f"must increase within the block ({length} bytes)")
        if offsets[-1] > length:
            raise self.error(start, f"{where}: names run past the block")
        chunk = data[start:start + offsets[-1]]
        names = [chunk[a:b] for a, b in zip(offsets, offsets[1:], strict=False)]
        if max(map(len, names)) > NAME_MAX:  # (EROFS_NAME_LEN)
            name = next(n for n in names if len(n) > NAME_MAX)
            raise self.error(start, f"{where}: a name of {len(name)} bytes, expected at most {NAME_MAX}")
        joined = b"".join(names)
        if b"/" in joined or b"\0" in joined:
            name = next(n for n in names if b"/" in n or b"\0" in n)
            raise self.error(start, f"{where}: name {name!r} contains '/' or NUL")
        nids = [r[0] for r in records]
        if max(nids) > (self.end - _COMPACT - self.meta_base) >> EROFS_ISLOTBITS:
            # Located at the dirent, not at the impossible inode slot it points to.
            i = next(i for i, nid in enumerate(nids) if self.meta_base + (nid << EROFS_ISLOTBITS) + _COMPACT > self.end)
            raise self.error(start + _DIRENT * i, f"{where}: entry {names[i]!r} refers to nid {nids[i]}, "
                                             f"past the end of the image (0x{self.end:x})")
        out.extend(zip(names, nids, [r[2] for r in records], strict=True))

    def lookup(self, ino: RawInode, name: bytes) -> int | None:
        """The nid `name` refers to in directory `ino`, or None (binary search, like the kernel)."""
        entries = self.dirents(ino)
        i = bisect_left(entries, (name,))
        if i < len(entries) and entries[i][0] == name:
            return entries[i][1]
        return None

    # -- xattrs ---------------------------------------------------------------------------

    def xattrs(self, ino: RawInode) -> list[tuple[bytes, bytes]]:
        """Every xattr of an inode with its full key: inline entries, then shared ones."""
        size = ino.xattr_size
        if not size:
            return []
        start = ino.xattr_offset
        return self._parse_xattrs(ino, bytes(self.data[start:start + size]))

    def xattr_body(self, ino: RawInode) -> tuple[bytes, bool]:
        """(the inode's raw xattr body, whether it only refers to shared entries).

        Shared-only bodies repeat across inodes (a pair on two or more inodes is shared), so
        callers can cache what they derive from one; bodies with inline entries are unique.
        """
        start = ino.xattr_offset
        size = ino.xattr_size
        body = self.data[start:start + size]
        return body, size >= 12 and size == 12 + 4 * body[4]

    def parse_xattr_body(self, ino: RawInode, body: bytes) -> list[tuple[bytes, bytes]]:
        """The xattrs a body (or its leading header and shared ids alone) holds; `ino` only
        locates errors."""
        return self._parse_xattrs(ino, body)

    def _parse_xattrs(self, ino: RawInode, body: bytes) -> list[tuple[bytes, bytes]]:
        start = ino.xattr_offset
        where = f"inode nid {ino.nid}: xattrs"
        size = len(body)
        if size < _IBODY:
            raise self.error(ino.offset + EROFS_INODE_COMPACT.offset("i_xattr_icount"), f"{where}: i_xattr_icount {ino.xattr_count} leaves no room for the header")
        _filter, shared = _unpack_ibody(body)
        pos = _IBODY + _ALIGN * shared
        if pos > size:
            raise self.error(start + _SHARED_COUNT, f"{where}: h_shared_count {shared} needs {pos} bytes, the xattr body "
                                        f"has {size} (i_xattr_icount {ino.xattr_count})")
        items = []
        prefixes = XATTR_PREFIXES
        n_prefixes = len(prefixes)
        while pos < size:
            if pos + _ENTRY > size:
                raise self.error(start + pos, f"{where}: {size - pos} stray bytes after the last entry")
            name_len, index, value_len = _unpack_entry(body, pos)
            name_end = pos + _ENTRY + name_len
            end = name_end + value_len
            if end > size:
                raise self.error(start + pos, f"{where}: entry of {name_len}+{value_len} bytes runs past the "
                                              f"xattr body ({size} bytes)")
            if index < n_prefixes and name_len and b"\0" not in body[pos + _ENTRY:name_end]:
                items.append((prefixes[index] + body[pos + _ENTRY:name_end], body[name_end:end]))
            else:
                items.append(self._key_value(start + pos, where, index, body[pos + _ENTRY:name_end], body[name_end:end]))
            pos = (end + _ALIGN - 1) & -_ALIGN
        if shared:
            get = self._shared.get
            for ref in _U32S[shared].unpack_from(body, _IBODY):
                items.append(get(ref) or self._shared_xattr(ino, ref))
        return items

    def _shared_xattr(self, ino: RawInode, ref: int) -> tuple[bytes, bytes]:
        hit = self._shared.get(ref)
        if hit is not None:
            return hit
        off = self.xattr_base + _ALIGN * ref
        where = f"inode nid {ino.nid}: shared xattr {ref}"
        self._need(off, _ENTRY, where)
        name_len, index, value_len = _unpack_entry(self.data, off)
        self._need(off, _ENTRY + name_len + value_len, where)
        # Entries are parsed once each; overlapping ones (hostile) must not add up to more
        # than the image holds, or thousands of ids into one 64 KiB value would each copy it.
        self._shared_budget -= _ENTRY + name_len + value_len
        if self._shared_budget < 0:
            raise self.error(off, f"{where}: shared xattr entries overlap (they add up to more than the image)")
        data = self.data
        hit = self._shared[ref] = self._key_value(
            off, where, index, bytes(data[off + _ENTRY:off + _ENTRY + name_len]),
            bytes(data[off + _ENTRY + name_len:off + _ENTRY + name_len + value_len]))
        return hit

    def _key_value(self, offset: int, where: str, index: int, name: bytes, value: bytes) -> tuple[bytes, bytes]:
        if index >= len(XATTR_PREFIXES):
            raise self.error(offset + EROFS_XATTR_ENTRY.offset("e_name_index"), f"{where}: name index {index}, expected 0 to {len(XATTR_PREFIXES) - 1} "
                                         "(long prefixes are not used by composefs)")
        key = XATTR_PREFIXES[index] + name
        if not key or b"\0" in key:
            raise self.error(offset, f"{where}: empty key or a key containing NUL")
        return key, value

    def split_xattrs(self, ino: RawInode) -> tuple[list, list[int], list]:
        """(inline pairs, shared ids, the pairs those ids name) of an inode, parsed once."""
        items = self.xattrs(ino)
        if not items:
            return [], [], []
        shared = self.data[ino.xattr_offset + _SHARED_COUNT]
        refs = list(_U32S[shared].unpack_from(self.data, ino.xattr_offset + _IBODY))
        return items[:len(items) - shared], refs, items[len(items) - shared:]

    def shared_xattr_refs(self, ino: RawInode) -> list[int]:
        """The shared xattr ids an inode refers to (for statistics)."""
        if not ino.xattr_size:
            return []
        self.xattrs(ino)  # validates the body
        shared = self.data[ino.xattr_offset + _SHARED_COUNT]
        return list(_U32S[shared].unpack_from(self.data, ino.xattr_offset + _IBODY))

    def shared_entry_size(self, ref: int) -> int:
        """Bytes the shared xattr entry `ref` takes in the shared area (for statistics)."""
        off = self.xattr_base + _ALIGN * ref
        self._need(off, _ENTRY, f"shared xattr {ref}")
        name_len, _index, value_len = _unpack_entry(self.data, off)
        return (_ENTRY + name_len + value_len + _ALIGN - 1) & -_ALIGN


class ReadBudget:
    """Bytes one walk over an image may parse.

    In a well-formed image no two inodes, directories or data blocks overlap, so a walk
    reads each byte at most once.  A hostile image can point thousands of inodes (or
    directories) at one large region; charging every read against the image size keeps a
    walk linear in the image, whatever the image says.
    """

    __slots__ = ("image", "left")

    def __init__(self, image: Image) -> None:
        self.image = image
        self.left = image.end

    def charge(self, nbytes: int, offset: int, what: str) -> None:
        self.left -= nbytes
        if self.left < 0:
            raise self.image.error(offset, f"{what}: overlaps other structures (a walk would read more "
                                           f"than the image's {self.image.end} bytes)")


def merge_sorted(list_a: list, list_b: list) -> list[tuple]:
    """Two directories' entries (name-sorted, `(name, …)`) side by side: `(name, a, b)` with
    None where a side has no such name — how two images are walked in step."""
    if len(list_a) == len(list_b) and all(x[0] == y[0] for x, y in zip(list_a, list_b, strict=True)):
        return [(x[0], x, y) for x, y in zip(list_a, list_b, strict=True)]
    out = []
    i = j = 0
    while i < len(list_a) or j < len(list_b):
        if j >= len(list_b) or i < len(list_a) and list_a[i][0] < list_b[j][0]:
            out.append((list_a[i][0], list_a[i], None))
            i += 1
        elif i >= len(list_a) or list_b[j][0] < list_a[i][0]:
            out.append((list_b[j][0], None, list_b[j]))
            j += 1
        else:
            out.append((list_a[i][0], list_a[i], list_b[j]))
            i += 1
            j += 1
    return out


def _type_name(mode: int) -> str:
    ftype = mode & S_IFMT
    if ftype == S_IFDIR:
        return "directory"
    if ftype == S_IFLNK:
        return "symlink"
    if ftype == S_IFREG:
        return "regular file"
    return "special file"
