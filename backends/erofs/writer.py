"""Write a compiled tree as a composefs image, byte for byte as mkcomposefs 1.0.8 does.

Input: a tree that went through the whole pipeline (ordered, lowered, shared xattrs chosen).
Two loops over the inodes: `_plan` decides each inode's size, tail, padding and nid (format
note §2.5); `_emit` streams the header, superblock, inodes, shared xattrs and data blocks.
Shared xattr ids depend on where the inode area ends, and directory entries on the nids of
later inodes, so nothing can be emitted before the plan is complete.

Per-inode state between the loops lives in flat lists indexed by inode number, and the xattr
body of an inode whose xattrs are all shared is built once per distinct xattr set.
"""

from __future__ import annotations

from bisect import bisect_left
from struct import Struct
from typing import BinaryIO

import xxhash
from cfsc.errors import TreeError
from cfsc.tree import (
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFMT,
    S_IFREG,
    S_IFSOCK,
    Inode,
    Tree,
)

from .layout import (
    COMPOSEFS_FLAGS_HAS_ACL,
    COMPOSEFS_HEADER,
    COMPOSEFS_HEADER_VERSION,
    COMPOSEFS_MAGIC,
    EROFS_BLKSIZ,
    EROFS_BLKSIZ_BITS,
    EROFS_CHUNK_FORMAT_BLKBITS_MASK,
    EROFS_DIRENT,
    EROFS_FEATURE_COMPAT_MTIME,
    EROFS_FEATURE_COMPAT_XATTR_FILTER,
    EROFS_FT_BLKDEV,
    EROFS_FT_CHRDEV,
    EROFS_FT_DIR,
    EROFS_FT_FIFO,
    EROFS_FT_REG_FILE,
    EROFS_FT_SOCK,
    EROFS_FT_SYMLINK,
    EROFS_INODE_CHUNK_BASED,
    EROFS_INODE_COMPACT,
    EROFS_INODE_EXTENDED,
    EROFS_INODE_FLAT_INLINE,
    EROFS_INODE_FLAT_PLAIN,
    EROFS_SUPER_BLOCK,
    EROFS_SUPER_MAGIC_V1,
    EROFS_SUPER_OFFSET,
    EROFS_XATTR_ENTRY,
    EROFS_XATTR_FILTER_SEED,
    EROFS_XATTR_IBODY_HEADER,
    EROFS_XATTR_LONG_PREFIX,
    INLINE_TAIL_MAX,
    WRITER_PREFIXES,
)

BLK = EROFS_BLKSIZ
FILE_TYPE = {
    S_IFREG: EROFS_FT_REG_FILE, S_IFDIR: EROFS_FT_DIR, S_IFCHR: EROFS_FT_CHRDEV,
    S_IFBLK: EROFS_FT_BLKDEV, S_IFIFO: EROFS_FT_FIFO, S_IFSOCK: EROFS_FT_SOCK,
    S_IFLNK: EROFS_FT_SYMLINK,
}
ACL_KEYS = (b"system.posix_acl_access", b"system.posix_acl_default")
U64 = (1 << 64) - 1
_ZEROS = bytes(BLK)
_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")  # zeros to the next multiple of 4, by length % 4
_NULL_CHUNKS_BLOCK = b"\xff" * BLK
_pack_compact = EROFS_INODE_COMPACT.pack
_pack_extended = EROFS_INODE_EXTENDED.pack
_pack_dirent = EROFS_DIRENT.pack
_pack_entry = EROFS_XATTR_ENTRY.pack
_pack_ibody = EROFS_XATTR_IBODY_HEADER.pack
_U32S = [Struct(f"<{n}I") for n in range(EROFS_XATTR_LONG_PREFIX + 1)]


def chunk_bits(size: int) -> int:
    """Chunk size for an external file: the smallest power of two ≥ size, within 2^12..2^43."""
    bits = max((size - 1).bit_length(), EROFS_BLKSIZ_BITS)
    return min(bits, EROFS_CHUNK_FORMAT_BLKBITS_MASK + EROFS_BLKSIZ_BITS)


def chunk_count(size: int) -> int:
    bits = chunk_bits(size)
    return (size + (1 << bits) - 1) >> bits


class _Keys:
    """Per xattr key: erofs prefix index, stored name, and name-filter bit (cached)."""

    def __init__(self) -> None:
        self.cache: dict[bytes, tuple[int, bytes, int]] = {}

    def __call__(self, key: bytes) -> tuple[int, bytes, int]:
        hit = self.cache.get(key)
        if hit is None:
            index, name = 0, key
            for prefix, i in WRITER_PREFIXES:
                if key.startswith(prefix):
                    index, name = i, key[len(prefix):]
                    break
            bit = 1 << (xxhash.xxh32_intdigest(name, EROFS_XATTR_FILTER_SEED + index) & 31)
            hit = self.cache[key] = (index, name, bit)
        return hit


def xattr_entry(index: int, name: bytes, value: bytes) -> bytes:
    raw = _pack_entry(len(name), index, len(value)) + name + value
    return raw + _ZEROS[: -len(raw) & 3]


def _dir_entries(node: Inode, parent: Inode) -> tuple[list[bytes], list[Inode]]:
    """Names in bytewise order with `.` and `..` in their sorted places, and their targets."""
    children = node.children
    assert children is not None
    names = list(children)
    targets = list(children.values())
    i = bisect_left(names, b".")
    names.insert(i, b".")
    targets.insert(i, node)
    i = bisect_left(names, b"..")
    names.insert(i, b"..")
    targets.insert(i, parent)
    return names, targets


def _dir_chunks(names: list[bytes]) -> list[int]:
    """Start index of each 4 KiB dirent chunk (libcomposefs' greedy split), plus the end."""
    starts = [0]
    used = 0
    for i, length in enumerate(map(len, names)):
        size = 12 + length
        if used + size > BLK:
            starts.append(i)
            used = 0
        used += size
    starts.append(len(names))
    return starts


class _Plan:
    """Where everything goes; lists are indexed by inode number."""

    __slots__ = ("nids", "compact", "blocks", "tails", "xattrs", "dirs", "inodes_end",
                 "shared_offsets", "shared_size", "n_data_blocks", "min_mtime", "has_acl")


def _plan(tree: Tree) -> _Plan:
    inodes = tree.inodes
    shared = tree.shared_xattrs
    assert inodes is not None and shared is not None, "run the pipeline before writing"
    keys = _Keys()
    plan = _Plan()

    shared_offsets: dict[tuple[bytes, bytes], int] = {}
    offset = 0
    for pair in shared:
        shared_offsets[pair] = offset >> 2
        _index, name, _bit = keys(pair[0])
        offset += (4 + len(name) + len(pair[1]) + 3) & ~3
    plan.shared_offsets = shared_offsets
    plan.shared_size = offset

    min_sec = min(n.mtime for n in inodes)
    min_nsec = min(n.mtime_nsec for n in inodes if n.mtime == min_sec)
    plan.min_mtime = (min_sec, min_nsec)

    # id(xattr tuple) -> (tuple, layout) for tuples whose pairs are all shared: those repeat.
    cache: dict[int, tuple[tuple, tuple]] = {}
    acl = [False]
    get_shared = shared_offsets.get
    key_info = keys.cache
    pack_entry = _pack_entry
    pads = _PADS

    def xattr_layout(xattrs: tuple) -> tuple[int, int, tuple, bytes]:
        """(body size, name filter, shared ids relative to the shared area, inline entries)."""
        hit = cache.get(id(xattrs))
        if hit is not None:
            return hit[1]
        name_filter = 0
        ids = []
        inline = []
        for pair in xattrs:
            key, value = pair
            info = key_info.get(key) or keys(key)
            name_filter |= info[2]
            rel = get_shared(pair)
            if rel is not None and len(ids) < EROFS_XATTR_LONG_PREFIX:
                ids.append(rel)
            else:
                name = info[1]
                vlen = len(value)
                inline += (pack_entry(len(name), info[0], vlen), name, value, pads[(len(name) + vlen) & 3])
            if (info[0] == 2 or info[0] == 3) and key in ACL_KEYS:
                acl[0] = True
        entries = b"".join(inline)
        layout = (12 + 4 * len(ids) + len(entries), ~name_filter & 0xFFFFFFFF, tuple(ids), entries)
        if not inline:
            cache[id(xattrs)] = (xattrs, layout)
        return layout

    n = len(inodes)
    nids = [0] * n
    compact = [True] * n
    blocks = [0] * n
    tails = [0] * n
    xlayouts: list = [None] * n
    dirs: dict[int, tuple] = {}
    parents: dict[int, Inode] = {id(inodes[0]): inodes[0]}
    pos = EROFS_SUPER_OFFSET + EROFS_SUPER_BLOCK.size
    n_data_blocks = 0
    for i, node in enumerate(inodes):
        ftype = node.mode & S_IFMT
        xattrs = node.xattrs
        if xattrs:
            xl = xlayouts[i] = xattr_layout(xattrs)
            xs = xl[0]
        else:
            xs = 0
        n_blocks = tail = 0
        size = node.size
        if ftype == S_IFDIR:
            links = node.links
            for name, child in node.children.items():  # type: ignore[union-attr]
                if child.children is not None and (links is None or name not in links):
                    parents[id(child)] = node
            names, targets = _dir_entries(node, parents[id(node)])
            starts = _dir_chunks(names)
            dirs[i] = (names, targets, starts)
            n_blocks = len(starts) - 2
            last = starts[-2]
            tail = 12 * (len(names) - last) + sum(map(len, names[last:]))
            if tail > INLINE_TAIL_MAX:
                n_blocks += 1
                tail = 0
            size = n_blocks * BLK + tail
        elif ftype == S_IFREG:
            if size > 0:
                if node.content is not None:
                    n_blocks, tail = divmod(size, BLK)
                    if tail > INLINE_TAIL_MAX:
                        n_blocks += 1
                        tail = 0
                else:  # chunk index: one 4-byte null address per chunk (see chunk_bits)
                    bits = (size - 1).bit_length()
                    bits = 12 if bits < 12 else 43 if bits > 43 else bits
                    tail = (((size - 1) >> bits) + 1) << 2
        elif ftype == S_IFLNK:
            tail = len(node.payload)  # type: ignore[arg-type]
        is_compact = (node.mtime == min_sec and node.mtime_nsec == min_nsec
                      and node.nlink <= 0xFFFF and node.uid <= 0xFFFF and node.gid <= 0xFFFF
                      and size <= 0xFFFFFFFF)
        isz = 32 if is_compact else 64
        pos = (pos + 31) & ~31
        if ftype == S_IFLNK:
            total = isz + xs + tail
            if total >= BLK:
                n_blocks += 1
                tail = 0
            if pos // BLK != (pos + total - 1) // BLK:
                pos = (pos + BLK - 1) & ~(BLK - 1)
        elif tail:
            remainder = BLK - (pos + isz + xs) % BLK
            if remainder < tail:
                pad = (remainder + 31) & ~31
                if tail <= BLK - (pos + isz + xs + pad) % BLK:
                    pos += pad
                else:  # the tail cannot be kept in one block: move it out
                    n_blocks += 1
                    tail = 0
                    pos = (pos + BLK - 1) & ~(BLK - 1)
        nids[i] = pos >> 5
        if not is_compact:
            compact[i] = False
        if n_blocks:
            blocks[i] = n_blocks
            n_data_blocks += n_blocks
        if tail:
            tails[i] = tail
        pos += isz + xs + tail
    plan.nids = nids
    plan.compact = compact
    plan.blocks = blocks
    plan.tails = tails
    plan.xattrs = xlayouts
    plan.dirs = dirs
    plan.inodes_end = (pos + 31) & ~31
    plan.n_data_blocks = n_data_blocks
    plan.has_acl = acl[0]
    if nids[0] > 0xFFFF:
        raise TreeError(f"the root inode lands at nid {nids[0]}: the superblock holds at most 65535", "/", tree.source)
    return plan


class _Sink:
    """Batches writes into ~1 MiB chunks; tracks the offset so layout mistakes fail loudly."""

    __slots__ = ("out", "parts", "pending", "offset")

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.parts: list[bytes] = []
        self.pending = 0
        self.offset = 0

    def write(self, data: bytes) -> None:
        self.parts.append(data)
        n = len(data)
        self.pending += n
        self.offset += n
        if self.pending > 1 << 20:
            self.flush()

    def pad_to(self, offset: int) -> None:
        gap = offset - self.offset
        assert gap >= 0, (offset, self.offset)
        while gap:
            n = gap if gap < BLK else BLK
            self.write(_ZEROS[:n])
            gap -= n

    def flush(self) -> None:
        if self.parts:
            self.out.write(b"".join(self.parts))
            self.parts.clear()
            self.pending = 0


def write_image(tree: Tree, out: BinaryIO) -> None:
    """Write the image of a compiled tree to a binary stream."""
    plan = _plan(tree)
    inodes = tree.inodes
    assert inodes is not None and tree.shared_xattrs is not None
    nids = plan.nids
    inodes_end = plan.inodes_end
    data_start = (inodes_end + plan.shared_size + BLK - 1) & ~(BLK - 1)
    total_blocks = data_start // BLK + plan.n_data_blocks
    shared_base = (inodes_end % BLK) >> 2
    min_sec, min_nsec = plan.min_mtime

    sink = _Sink(out)
    sink.write(COMPOSEFS_HEADER.pack(
        COMPOSEFS_MAGIC, COMPOSEFS_HEADER_VERSION,
        COMPOSEFS_FLAGS_HAS_ACL if plan.has_acl else 0, tree.version or 0))
    sink.pad_to(EROFS_SUPER_OFFSET)
    sink.write(EROFS_SUPER_BLOCK.pack(
        EROFS_SUPER_MAGIC_V1, 0, EROFS_FEATURE_COMPAT_MTIME | EROFS_FEATURE_COMPAT_XATTR_FILTER,
        EROFS_BLKSIZ_BITS, 0, nids[0], len(inodes), min_sec & U64, min_nsec, total_blocks,
        0, inodes_end // BLK, b"", b"", 0, 0, 0, 0, 0, 0, 0, 0, 0))

    # Identical layouts (shared tuples) give identical bodies: build each once.
    bodies: dict[int, tuple[tuple, bytes]] = {}
    file_type = FILE_TYPE
    data_blocks: list[bytes] = []
    next_block = data_start // BLK
    compact = plan.compact
    blocks = plan.blocks
    tails = plan.tails
    xlayouts = plan.xattrs
    dirs = plan.dirs
    write = sink.write
    for i, node in enumerate(inodes):
        start = nids[i] << 5
        if start != sink.offset:
            sink.pad_to(start)
        mode = node.mode
        ftype = mode & S_IFMT
        n_blocks = blocks[i]
        tail = tails[i]
        layout = EROFS_INODE_FLAT_INLINE if tail else EROFS_INODE_FLAT_PLAIN
        i_u = 0
        tail_bytes = b""
        size = node.size
        if ftype == S_IFDIR:
            names, targets, starts = dirs[i]
            chunks = []
            for c in range(len(starts) - 1):
                a, b = starts[c], starts[c + 1]
                nameoff = 12 * (b - a)
                recs = []
                for j in range(a, b):
                    t = targets[j]
                    recs.append(_pack_dirent(nids[t.ino], nameoff, file_type[t.mode & S_IFMT]))
                    nameoff += len(names[j])
                recs.extend(names[a:b])
                chunks.append(b"".join(recs))
            if n_blocks:
                i_u = next_block
                next_block += n_blocks
                for c in range(n_blocks):
                    data_blocks.append(chunks[c] + _ZEROS[len(chunks[c]):])
            if tail:
                tail_bytes = chunks[-1]
            size = n_blocks * BLK + tail
        elif ftype == S_IFREG:
            content = node.content
            if size > 0 and content is None:
                layout = EROFS_INODE_CHUNK_BASED
                if n_blocks:
                    i_u = next_block & 0xFFFF0000  # the chunk format overwrites the low half
                    next_block += n_blocks
                    data_blocks.append(_NULL_CHUNKS_BLOCK)
                bits = (size - 1).bit_length()
                i_u |= (12 if bits < 12 else 43 if bits > 43 else bits) - EROFS_BLKSIZ_BITS
                if tail:
                    tail_bytes = b"\xff" * tail
            elif content is not None:
                if n_blocks:
                    i_u = next_block
                    next_block += n_blocks
                    first = content[:BLK]
                    data_blocks.append(first + _ZEROS[len(first):])
                if tail:
                    tail_bytes = content[-tail:]
        elif ftype == S_IFLNK:
            payload = node.payload
            assert payload is not None
            if n_blocks:
                i_u = next_block
                next_block += n_blocks
                data_blocks.append(payload + _ZEROS[len(payload):])
            else:
                tail_bytes = payload
        else:
            size = 0
            if ftype == S_IFCHR or ftype == S_IFBLK:
                i_u = node.rdev & 0xFFFFFFFF
        xl = xlayouts[i]
        if xl is not None:
            xsize, name_filter, ids, entries = xl
            hit = bodies.get(id(xl))
            if hit is not None:
                body = hit[1]
            else:
                n_ids = len(ids)
                body = _pack_ibody(name_filter, n_ids)
                if n_ids:
                    body += _U32S[n_ids].pack(*[shared_base + r for r in ids])
                if entries:
                    body += entries
                else:
                    bodies[id(xl)] = (xl, body)
            icount = (xsize - 12) // 4 + 1
        else:
            body = b""
            icount = 0
        if compact[i]:
            head = _pack_compact(layout << 1, icount, mode & 0xFFFF, node.nlink, size, i_u,
                                 i, node.uid, node.gid)
        else:
            head = _pack_extended((layout << 1) | 1, icount, mode & 0xFFFF, size, i_u, i,
                                  node.uid, node.gid, node.mtime & U64, node.mtime_nsec,
                                  node.nlink)
        write(head + body + tail_bytes if body or tail_bytes else head)
    sink.pad_to(inodes_end)
    keys = _Keys()
    for pair in tree.shared_xattrs:
        index, name, _bit = keys(pair[0])
        write(xattr_entry(index, name, pair[1]))
    sink.pad_to(data_start)
    for block in data_blocks:
        write(block)
    assert sink.offset == total_blocks * BLK, (sink.offset, total_blocks)
    sink.flush()
