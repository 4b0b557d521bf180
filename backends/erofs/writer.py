"""Write a compiled tree as a composefs image, byte for byte as mkcomposefs 1.0.8 does.

Input: a tree that went through the whole pipeline (ordered, lowered, shared xattrs chosen).
Two loops over the inodes: `_plan` decides each inode's size, tail, padding and nid (format
note §2.5); `write_image` then streams the header, superblock, inodes, shared xattrs and data
blocks.  Shared xattr ids depend on where the inode area ends, and directory entries on the
nids of later inodes, so nothing can be emitted before the plan is complete.  Once it is,
every record's place is known: a forked child can emit the second half (`_emit` from inode
k) straight into the output file while this process emits the first.

Per-inode state between the loops lives in flat lists indexed by inode number; xattr bodies
come from `xattrs.XattrEncoder`, which works each distinct xattr tuple out once.
"""

from __future__ import annotations

import os
import stat
from bisect import bisect_left
from itertools import islice

from cfsc.backends.erofs.layout import (
    COMPOSEFS_FLAGS_HAS_ACL,
    COMPOSEFS_HEADER,
    COMPOSEFS_HEADER_VERSION,
    COMPOSEFS_MAGIC,
    EROFS_BLKSIZ,
    EROFS_BLKSIZ_BITS,
    EROFS_BLOCK_MAP_ENTRY_SIZE,
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
    EROFS_I_DATALAYOUT_BIT,
    EROFS_I_VERSION_BIT,
    EROFS_INODE_CHUNK_BASED,
    EROFS_INODE_COMPACT,
    EROFS_INODE_EXTENDED,
    EROFS_INODE_FLAT_INLINE,
    EROFS_INODE_FLAT_PLAIN,
    EROFS_ISLOTBITS,
    EROFS_SLOTSIZE,
    EROFS_SUPER_BLOCK,
    EROFS_SUPER_MAGIC_V1,
    EROFS_SUPER_OFFSET,
    EROFS_XATTR_ALIGN,
    EROFS_XATTR_IBODY_HEADER,
    INLINE_TAIL_MAX,
)
from cfsc.backends.erofs.xattrs import XattrEncoder
from cfsc.base import forked
from cfsc.base.errors import TreeError
from cfsc.base.forked import Child
from cfsc.base.tree import (
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

TYPE_CHECKING = False  # typing's, without importing typing (start-up); type checkers read it as True
if TYPE_CHECKING:
    from typing import BinaryIO

BLK = EROFS_BLKSIZ
FILE_TYPE = {
    S_IFREG: EROFS_FT_REG_FILE, S_IFDIR: EROFS_FT_DIR, S_IFCHR: EROFS_FT_CHRDEV,
    S_IFBLK: EROFS_FT_BLKDEV, S_IFIFO: EROFS_FT_FIFO, S_IFSOCK: EROFS_FT_SOCK,
    S_IFLNK: EROFS_FT_SYMLINK,
}
U64 = (1 << 64) - 1
_ZEROS = bytes(BLK)
_NULL_CHUNKS_BLOCK = b"\xff" * BLK
_MAX_CHUNK_BITS = EROFS_CHUNK_FORMAT_BLKBITS_MASK + EROFS_BLKSIZ_BITS
_pack_compact = EROFS_INODE_COMPACT.pack
_pack_extended = EROFS_INODE_EXTENDED.pack
_pack_dirent = EROFS_DIRENT.pack
# Sizes the loops below use, bound to locals there (as fast as literals).
_DIRENT = EROFS_DIRENT.size
_COMPACT = EROFS_INODE_COMPACT.size
_EXTENDED = EROFS_INODE_EXTENDED.size
_IBODY = EROFS_XATTR_IBODY_HEADER.size
# From this many inodes on the second half's records are encoded by a forked child; below,
# the fork costs more than half the loop saves.  The child costs more CPU than the half it
# takes off the parent: both processes write to the reference counts of objects all over
# the heap, so each copies about half of its pages (in process, the parent's CPU at 64k
# 0.25 -> 0.20 s, the child's 0.12; at 1M 3.1 -> 2.7 s, the child's 1.5).
SPLIT_MIN_INODES = 20000
_ENTRY_WEIGHT = 4


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
    dirent = _DIRENT
    for i, length in enumerate(map(len, names)):
        size = dirent + length
        if used + size > BLK:
            starts.append(i)
            used = 0
        used += size
    starts.append(len(names))
    return starts


class _Plan:
    """Where everything goes; lists are indexed by inode number."""

    __slots__ = ("nids", "compact", "blocks", "tails", "dirs", "xattrs", "inodes_end",
                 "n_data_blocks", "min_mtime")


def _plan(tree: Tree, encoder: XattrEncoder) -> _Plan:
    inodes = tree.inodes
    assert inodes is not None and tree.shared_xattrs is not None, "run the pipeline before writing"
    plan = _Plan()
    mtimes = [n.mtime for n in inodes]
    min_sec = min(mtimes)
    nsecs = [n.mtime_nsec for n in inodes]
    same_sec = mtimes.count(min_sec) == len(inodes)
    min_nsec = min(nsecs) if same_sec else min(n.mtime_nsec for n in inodes if n.mtime == min_sec)
    plan.min_mtime = (min_sec, min_nsec)
    # Trees whose inodes all fit the compact layout (one time, small ids) skip the per-inode
    # test but for a directory's computed size; the others take it whole.
    all_compact = (same_sec and nsecs.count(min_nsec) == len(inodes)
                   and max(n.nlink for n in inodes) <= 0xFFFF and max(n.uid for n in inodes) <= 0xFFFF
                   and max(n.gid for n in inodes) <= 0xFFFF and max(n.size for n in inodes) <= 0xFFFFFFFF)
    del mtimes, nsecs
    xattr_size = encoder.size
    external_size = encoder.external_size
    own_size: dict[int, int] = {}  # id(xattr tuple) -> its body's size (the encoder keeps the tuple)

    n = len(inodes)
    nids = [0] * n
    compact = [True] * n
    blocks = [0] * n
    tails = [0] * n
    dirs: dict[int, tuple] = {}
    parents: dict[int, Inode] = {id(inodes[0]): inodes[0]}
    pos = EROFS_SUPER_OFFSET + EROFS_SUPER_BLOCK.size
    n_data_blocks = 0
    min_bits, max_bits, map_entry = EROFS_BLKSIZ_BITS, _MAX_CHUNK_BITS, EROFS_BLOCK_MAP_ENTRY_SIZE
    dirent, compact_size, extended_size = _DIRENT, _COMPACT, _EXTENDED
    slot_mask, slot_bits = EROFS_SLOTSIZE - 1, EROFS_ISLOTBITS
    for i, node in enumerate(inodes):
        ftype = node.mode & S_IFMT
        n_blocks = tail = 0
        size = node.size
        if ftype == S_IFREG:
            if size > 0:
                if node.content is None:  # `overlay.is_external`; a chunk index: one 4-byte null address per chunk
                    xs = external_size(node)
                    bits = (size - 1).bit_length()  # chunks: the smallest power of two >= size
                    bits = min_bits if bits < min_bits else max_bits if bits > max_bits else bits
                    tail = (((size - 1) >> bits) + 1) * map_entry
                else:
                    xs = own_size.get(id(node.xattrs))
                    if xs is None:
                        xs = own_size[id(node.xattrs)] = xattr_size(node, False)
                    n_blocks, tail = divmod(size, BLK)
                    if tail > INLINE_TAIL_MAX:
                        n_blocks += 1
                        tail = 0
            else:
                xs = own_size.get(id(node.xattrs))
                if xs is None:
                    xs = own_size[id(node.xattrs)] = xattr_size(node, False)
        else:
            xs = own_size.get(id(node.xattrs))
            if xs is None:
                xs = own_size[id(node.xattrs)] = xattr_size(node, False)
            if ftype == S_IFDIR:
                links = node.links
                for name, child in node.children.items():  # type: ignore[union-attr]
                    if child.children is not None and (links is None or name not in links):
                        parents[id(child)] = node
                names, targets = _dir_entries(node, parents[id(node)])
                tail = dirent * len(names) + sum(map(len, names))
                if tail <= BLK:  # one chunk (what `_dir_chunks` finds, without its walk)
                    starts = [0, len(names)]
                else:
                    starts = _dir_chunks(names)
                    last = starts[-2]
                    tail = dirent * (len(names) - last) + sum(map(len, names[last:]))
                dirs[i] = (names, targets, starts)
                n_blocks = len(starts) - 2
                if tail > INLINE_TAIL_MAX:
                    n_blocks += 1
                    tail = 0
                size = n_blocks * BLK + tail
            elif ftype == S_IFLNK:
                tail = len(node.payload)  # type: ignore[arg-type]
        if all_compact:
            is_compact = size <= 0xFFFFFFFF
        else:
            is_compact = (node.mtime == min_sec and node.mtime_nsec == min_nsec
                          and node.nlink <= 0xFFFF and node.uid <= 0xFFFF and node.gid <= 0xFFFF
                          and size <= 0xFFFFFFFF)
        isz = compact_size if is_compact else extended_size
        pos = (pos + slot_mask) & ~slot_mask
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
                pad = (remainder + slot_mask) & ~slot_mask
                if tail <= BLK - (pos + isz + xs + pad) % BLK:
                    pos += pad
                else:  # the tail cannot be kept in one block: move it out
                    n_blocks += 1
                    tail = 0
                    pos = (pos + BLK - 1) & ~(BLK - 1)
        nids[i] = pos >> slot_bits
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
    plan.dirs = dirs
    plan.inodes_end = (pos + slot_mask) & ~slot_mask
    plan.n_data_blocks = n_data_blocks
    if nids[0] > 0xFFFF:
        raise TreeError(f"the root inode lands at nid {nids[0]}: the superblock holds at most 65535", "/", tree.source)
    return plan


def write_image(tree: Tree, out: BinaryIO, split: bool | None = None) -> None:
    """Write the image of a compiled tree to a binary stream.

    `split`: encode the second half of the inode records in a forked child (`cfsc.base.forked`)
    while this process encodes the first; None takes it for trees of `SPLIT_MIN_INODES`
    inodes or more when a processor is idle, False never.  Either way the bytes
    are the same (the sequential path is the reference, and tests compare both); the child
    writes its part in place with `pwrite`, so it is taken only when `out` is a regular file.
    """
    assert tree.shared_xattrs is not None and tree.inodes is not None, "run the pipeline before writing"
    encoder = XattrEncoder(tree.shared_xattrs)
    plan = _plan(tree, encoder)
    inodes = tree.inodes
    nids = plan.nids
    inodes_end = plan.inodes_end
    data_start = (inodes_end + encoder.shared_size + BLK - 1) & ~(BLK - 1)
    total_blocks = data_start // BLK + plan.n_data_blocks
    encoder.base = (inodes_end % BLK) // EROFS_XATTR_ALIGN
    min_sec, min_nsec = plan.min_mtime

    head = COMPOSEFS_HEADER.pack(
        COMPOSEFS_MAGIC, COMPOSEFS_HEADER_VERSION,
        COMPOSEFS_FLAGS_HAS_ACL if encoder.has_acl else 0, tree.version or 0)
    superblock = EROFS_SUPER_BLOCK.pack(
        EROFS_SUPER_MAGIC_V1, 0, EROFS_FEATURE_COMPAT_MTIME | EROFS_FEATURE_COMPAT_XATTR_FILTER,
        EROFS_BLKSIZ_BITS, 0, nids[0], len(inodes), min_sec & U64, min_nsec, total_blocks,
        0, inodes_end // BLK, b"", b"", 0, 0, 0, 0, 0, 0, 0, 0, 0)
    if split is None:
        split = len(inodes) >= SPLIT_MIN_INODES and forked.worthwhile()
    fd = _pwritable(out) if split else None
    base = out.tell() if fd is not None else 0  # where the image starts in the file
    out.write(b"".join((head, _ZEROS[:EROFS_SUPER_OFFSET - len(head)], superblock)))
    head_end = EROFS_SUPER_OFFSET + len(superblock)
    first_block = data_start // BLK
    shared_area = encoder.shared_area(tree.shared_xattrs)
    assert len(shared_area) == encoder.shared_size
    middle = shared_area + _ZEROS[:data_start - inodes_end - len(shared_area)]
    if fd is None:
        end, data_blocks = _emit(inodes, plan, encoder, 0, len(inodes), head_end, first_block, out.write)
        out.write(_ZEROS[:inodes_end - end] + middle)
        _write_blocks(data_blocks, out.write)
        return
    # The second half's records start at a known nid and its data at a known block: the
    # plan placed everything, so the two halves are independent.
    out.flush()
    k = _split_point(plan, len(inodes))
    k_start = nids[k] << EROFS_ISLOTBITS
    k_block = first_block + sum(plan.blocks[:k])

    def second_half() -> None:
        write = _PWriter(fd, base + k_start)
        end, data_blocks = _emit(inodes, plan, encoder, k, len(inodes), k_start, k_block, write)
        write(_ZEROS[:inodes_end - end])
        write.pos = base + k_block * BLK
        _write_blocks(data_blocks, write)

    with Child(second_half) as child:
        end, data_blocks = _emit(inodes, plan, encoder, 0, k, head_end, first_block, out.write)
        out.write(_ZEROS[:k_start - end])
        out.seek(base + inodes_end)
        out.write(middle)
        _write_blocks(data_blocks, out.write)
        out.flush()
        child.join()
    out.seek(base + total_blocks * BLK)


def _pwritable(out: BinaryIO) -> int | None:
    """The descriptor of `out` when a forked child can write into it in place (a regular file
    not opened for appending, the other process being this one), and a child can run."""
    import fcntl  # (start-up: only a large tree gets here)

    try:
        fd = out.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode) or fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
            return None
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None
    return fd if out.seekable() and forked.usable() else None


def _split_point(plan: _Plan, n: int) -> int:
    """The first inode of the child's half, so that the halves take about the same time: a
    record costs about as much as `_ENTRY_WEIGHT` directory entries."""
    weight = _ENTRY_WEIGHT
    entries = {i: len(d[0]) for i, d in plan.dirs.items()}
    half = (n * weight + sum(entries.values())) // 2
    before = 0  # entries of the directories before the inode looked at
    for i in sorted(entries):
        if i * weight + before >= half:
            break
        before += entries[i]
    return min(max((half - before) // weight, 1), n - 1)


class _PWriter:
    """Sequential writes at an explicit offset of a descriptor shared with another process."""

    __slots__ = ("fd", "pos")

    def __init__(self, fd: int, pos: int) -> None:
        self.fd = fd
        self.pos = pos

    def __call__(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, self.pos)
            self.pos += done
            view = view[done:]


def _write_blocks(data_blocks: list[bytes], write) -> None:
    for k in range(0, len(data_blocks), 1024):
        write(b"".join(data_blocks[k:k + 1024]))


def _emit(inodes: list[Inode], plan: _Plan, encoder: XattrEncoder, lo: int, hi: int,
          offset: int, next_block: int, write) -> tuple[int, list[bytes]]:
    """Encode inodes[lo:hi] through `write`, from `offset` (padding up to inode `lo` first):
    returns the offset after the last record and the data blocks of those inodes, in order."""
    nids = plan.nids
    parts: list[bytes] = []
    pending = 0
    file_type = FILE_TYPE
    data_blocks: list[bytes] = []
    compact = plan.compact
    blocks = plan.blocks
    tails = plan.tails
    dirs = plan.dirs
    xattr_body = encoder.body
    external_body = encoder.external_body
    own_body: dict[int, bytes] = {}  # id(xattr tuple) -> its body (the encoder keeps the tuple)
    append = parts.append
    min_bits, max_bits = EROFS_BLKSIZ_BITS, _MAX_CHUNK_BITS
    dirent, ibody, align, slot_bits = _DIRENT, _IBODY, EROFS_XATTR_ALIGN, EROFS_ISLOTBITS
    compact_size, extended_size = _COMPACT, _EXTENDED
    layout_bit, extended_bit = EROFS_I_DATALAYOUT_BIT, 1 << EROFS_I_VERSION_BIT
    inline, plain = EROFS_INODE_FLAT_INLINE, EROFS_INODE_FLAT_PLAIN
    null_tails: dict[int, bytes] = {}  # chunk index size -> its null addresses (a few sizes)
    expected_end = next_block + sum(blocks[lo:hi])
    first_offset, written = offset, 0
    for i, node in enumerate(islice(inodes, lo, hi), lo):
        mode = node.mode
        ftype = mode & S_IFMT
        n_blocks = blocks[i]
        tail = tails[i]
        layout = inline if tail else plain
        i_u = 0
        tail_bytes = b""
        size = node.size
        external = False
        if ftype == S_IFREG:
            content = node.content
            if size > 0 and content is None:  # `overlay.is_external`, written out (hot loop)
                external = True
                layout = EROFS_INODE_CHUNK_BASED
                if n_blocks:
                    i_u = next_block & 0xFFFF0000  # the chunk format overwrites the low half
                    next_block += n_blocks
                    data_blocks.append(_NULL_CHUNKS_BLOCK)
                bits = (size - 1).bit_length()
                i_u |= (min_bits if bits < min_bits else max_bits if bits > max_bits else bits) - min_bits
                if tail:
                    tail_bytes = null_tails.get(tail)
                    if tail_bytes is None:
                        tail_bytes = null_tails[tail] = _NULL_CHUNKS_BLOCK[:tail]
            elif content is not None:
                if n_blocks:
                    i_u = next_block
                    next_block += n_blocks
                    first = content[:BLK]
                    data_blocks.append(first + _ZEROS[len(first):])
                if tail:
                    tail_bytes = content[-tail:]
        elif ftype == S_IFDIR:
            names, targets, starts = dirs[i]
            chunks = []
            for c in range(len(starts) - 1):
                a, b = starts[c], starts[c + 1]
                nameoff = dirent * (b - a)
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
        if external:
            body = external_body(node)
        else:
            body = own_body.get(id(node.xattrs))
            if body is None:
                body = own_body[id(node.xattrs)] = xattr_body(node, False)
        icount = (len(body) - ibody) // align + 1 if body else 0  # (layout.xattr_ibody_size, inverted)
        start = nids[i] << slot_bits
        if start != offset:  # padding, so the tail stays within one block (format note §2.5)
            append(_ZEROS[:start - offset])
        # (the pieces go into `parts` as they are: one join per 8192 records makes the bytes)
        if compact[i]:
            append(_pack_compact(layout << layout_bit, icount, mode & 0xFFFF, node.nlink, size, i_u,
                                 i, node.uid, node.gid))
            offset = start + compact_size + len(body) + tail
        else:
            append(_pack_extended((layout << layout_bit) | extended_bit, icount, mode & 0xFFFF, size, i_u, i,
                                  node.uid, node.gid, node.mtime & U64, node.mtime_nsec,
                                  node.nlink))
            offset = start + extended_size + len(body) + tail
        if body:
            append(body)
        if tail_bytes:
            append(tail_bytes)
        pending += 1
        if pending == 8192:
            joined = b"".join(parts)
            written += len(joined)
            write(joined)
            parts.clear()
            pending = 0
    joined = b"".join(parts)
    write(joined)
    assert next_block == expected_end, (next_block, expected_end)
    # Offsets come from the plan's sizes, not from the bytes appended: a record shorter than
    # planned (content shorter than its size) would shift every later one; not in silence.
    assert first_offset + written + len(joined) == offset, (lo, hi, first_offset, written + len(joined), offset)
    return offset, data_blocks
