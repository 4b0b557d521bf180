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
    """Start index of each 4 KiB dirent chunk (libcomposefs' greedy split)."""
    starts = [0]
    used = 0
    for i, name in enumerate(names):
        size = 12 + len(name)
        if used + size > BLK:
            starts.append(i)
            used = 0
        used += size
    return starts


class _Plan:
    __slots__ = (
        "blocks",
        "compact",
        "has_acl",
        "inodes_end",
        "isizes",
        "min_mtime",
        "n_data_blocks",
        "nids",
        "parents",
        "shared_offsets",
        "shared_size",
        "tails",
        "xsizes",
    )


def _plan(tree: Tree) -> _Plan:
    inodes = tree.inodes
    shared = tree.shared_xattrs
    assert inodes is not None and shared is not None, "run the pipeline before writing"
    keys = _Keys()
    plan = _Plan()

    shared_offsets: dict[tuple[bytes, bytes], int] = {}
    offset = 0
    for pair in shared:
        shared_offsets[pair] = offset
        index, name, _bit = keys(pair[0])
        offset += (4 + len(name) + len(pair[1]) + 3) & ~3
    plan.shared_offsets = shared_offsets
    plan.shared_size = offset

    min_sec = min(n.mtime for n in inodes)
    min_nsec = min(n.mtime_nsec for n in inodes if n.mtime == min_sec)
    plan.min_mtime = (min_sec, min_nsec)

    xsize_cache: dict[int, tuple[tuple, int]] = {}
    has_acl = False

    def xattr_size(xattrs: tuple) -> int:
        nonlocal has_acl
        hit = xsize_cache.get(id(xattrs))
        if hit is not None:
            return hit[1]
        size = 12
        n_shared = 0
        all_shared = True
        for pair in xattrs:
            if n_shared < EROFS_XATTR_LONG_PREFIX and pair in shared_offsets:
                n_shared += 1
                size += 4
            else:
                all_shared = False
                index, name, _bit = keys(pair[0])
                size += (4 + len(name) + len(pair[1]) + 3) & ~3
            if pair[0] in ACL_KEYS:
                has_acl = True
        if all_shared:
            xsize_cache[id(xattrs)] = (xattrs, size)
        return size

    n = len(inodes)
    nids = [0] * n
    compact = [True] * n
    blocks = [0] * n
    tails = [0] * n
    xsizes = [0] * n
    parents: dict[int, Inode] = {id(inodes[0]): inodes[0]}
    pos = EROFS_SUPER_OFFSET + EROFS_SUPER_BLOCK.size
    n_data_blocks = 0
    for i, node in enumerate(inodes):
        mode = node.mode
        ftype = mode & S_IFMT
        xattrs = node.xattrs
        xs = xattr_size(xattrs) if xattrs else 0
        n_blocks = tail = 0
        if ftype == S_IFDIR:
            links = node.links
            for name, child in node.children.items():  # type: ignore[union-attr]
                if child.children is not None and (links is None or name not in links):
                    parents[id(child)] = node
            names, _targets = _dir_entries(node, node)
            starts = _dir_chunks(names)
            n_blocks = len(starts) - 1
            tail = 12 * (len(names) - starts[-1]) + sum(map(len, names[starts[-1]:]))
            if tail > INLINE_TAIL_MAX:
                n_blocks += 1
                tail = 0
            size = n_blocks * BLK + tail
        elif ftype == S_IFREG:
            size = node.size
            if size > 0:
                if node.content is not None:
                    n_blocks, tail = divmod(size, BLK)
                    if tail > INLINE_TAIL_MAX:
                        n_blocks += 1
                        tail = 0
                else:
                    tail = 4 * chunk_count(size)
        elif ftype == S_IFLNK:
            size = node.size
            tail = len(node.payload)  # type: ignore[arg-type]
        else:
            size = node.size
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
        compact[i] = is_compact
        blocks[i] = n_blocks
        tails[i] = tail
        xsizes[i] = xs
        pos += isz + xs + tail
        n_data_blocks += n_blocks
    plan.nids = nids
    plan.compact = compact
    plan.blocks = blocks
    plan.tails = tails
    plan.xsizes = xsizes
    plan.parents = parents
    plan.inodes_end = (pos + 31) & ~31
    plan.n_data_blocks = n_data_blocks
    plan.has_acl = has_acl
    if nids[0] > 0xFFFF:
        raise TreeError(f"the root inode lands at nid {nids[0]}: the superblock holds at most 65535", "/", tree.source)
    return plan


class _Sink:
    """Batches small writes; tracks the offset so layout mistakes fail loudly."""

    __slots__ = ("offset", "out", "parts", "pending")

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
            n = min(gap, BLK)
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
    keys = _Keys()
    nids = plan.nids
    inodes_end = plan.inodes_end
    shared_offsets = plan.shared_offsets
    data_start = (inodes_end + plan.shared_size + BLK - 1) & ~(BLK - 1)
    total_blocks = data_start // BLK + plan.n_data_blocks
    shared_base = inodes_end % BLK
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

    body_cache: dict[int, tuple[tuple, bytes]] = {}

    def xattr_body(xattrs: tuple) -> bytes:
        hit = body_cache.get(id(xattrs))
        if hit is not None:
            return hit[1]
        name_filter = 0
        ids = []
        inline = []
        for pair in xattrs:
            key, value = pair
            index, name, bit = keys(key)
            name_filter |= bit
            offset = shared_offsets.get(pair) if len(ids) < EROFS_XATTR_LONG_PREFIX else None
            if offset is not None:
                ids.append((shared_base + offset) >> 2)
            else:
                inline.append(xattr_entry(index, name, value))
        body = _pack_ibody(~name_filter & 0xFFFFFFFF, len(ids)) + _U32S[len(ids)].pack(*ids)
        if inline:
            body += b"".join(inline)
        else:
            body_cache[id(xattrs)] = (xattrs, body)
        return body

    file_type = FILE_TYPE
    data_blocks: list[bytes] = []
    next_block = data_start // BLK
    compact = plan.compact
    blocks = plan.blocks
    tails = plan.tails
    parents = plan.parents
    write = sink.write
    for i, node in enumerate(inodes):
        sink.pad_to(nids[i] << 5)
        mode = node.mode
        ftype = mode & S_IFMT
        n_blocks = blocks[i]
        tail = tails[i]
        layout = EROFS_INODE_FLAT_INLINE if tail else EROFS_INODE_FLAT_PLAIN
        i_u = 0
        tail_bytes = b""
        if ftype == S_IFDIR:
            names, targets = _dir_entries(node, parents[id(node)])
            starts = _dir_chunks(names)
            starts.append(len(names))
            assert len(starts) - 1 == n_blocks + (1 if tail else 0)
            chunks = []
            for c in range(len(starts) - 1):
                a, b = starts[c], starts[c + 1]
                nameoff = 12 * (b - a)
                recs = []
                for j in range(a, b):
                    t = targets[j]
                    recs.append(_pack_dirent(nids[t.ino], nameoff, file_type[t.mode & S_IFMT]))
                    nameoff += len(names[j])
                chunks.append(b"".join(recs) + b"".join(names[a:b]))
            if n_blocks:
                i_u = next_block
                next_block += n_blocks
                for c in range(n_blocks):
                    data_blocks.append(chunks[c] + _ZEROS[len(chunks[c]):])
            if tail:
                tail_bytes = chunks[-1]
            size = n_blocks * BLK + tail
        elif ftype == S_IFREG:
            size = node.size
            content = node.content
            if size > 0 and content is None:
                layout = EROFS_INODE_CHUNK_BASED
                bits = chunk_bits(size)
                if n_blocks:
                    i_u = next_block & 0xFFFF0000  # the chunk format overwrites the low half
                    next_block += n_blocks
                    data_blocks.append(_NULL_CHUNKS_BLOCK)
                i_u |= bits - EROFS_BLKSIZ_BITS
                if tail:
                    tail_bytes = b"\xff" * tail
            elif content is not None and size > 0:
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
            size = len(payload)
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
        xattrs = node.xattrs
        if xattrs:
            body = xattr_body(xattrs)
            icount = (len(body) - 12) // 4 + 1
        else:
            body = b""
            icount = 0
        if compact[i]:
            write(_pack_compact(layout << 1, icount, mode & 0xFFFF, node.nlink, size, i_u,
                                node.ino, node.uid, node.gid))
        else:
            write(_pack_extended((layout << 1) | 1, icount, mode & 0xFFFF, size, i_u, node.ino,
                                 node.uid, node.gid, node.mtime & U64, node.mtime_nsec,
                                 node.nlink))
        if body:
            write(body)
        if tail_bytes:
            write(tail_bytes)
    sink.pad_to(inodes_end)
    for pair in tree.shared_xattrs:
        index, name, _bit = keys(pair[0])
        write(xattr_entry(index, name, pair[1]))
    sink.pad_to(data_start)
    for block in data_blocks:
        write(block)
    assert sink.offset == total_blocks * BLK, (sink.offset, total_blocks)
    sink.flush()
