"""Write a compiled tree as a composefs image, byte for byte as mkcomposefs 1.0.8 does.

Input: a tree that went through the whole pipeline (ordered, lowered, shared xattrs chosen).
Three loops over the inodes: `_size` works out what each inode needs (record and xattr
bytes, tail, data blocks, directory entries) wherever it goes, `_place` gives each its
offset and nid (format note §2.5: the padding and tail rules), and `_emit` encodes the
records; `write_image` streams them between the header and superblock and the shared xattrs
and data blocks.  Shared xattr ids depend on where the inode area ends, and directory
entries on the nids of later inodes, so nothing can be emitted before the placement is
complete.

The split path (`_write_split`, large trees, a processor idle): sizing is independent per
inode, and the placement of inodes k..n depends only on the offset where inode k may start.
A child forked before sizing sizes k..n while this process sizes and places 0..k; given
that offset the child places its half, and the two trade nids (the first half's directory
entries name inodes of the second, and the other way round: `..`, hard links).  Then each
encodes its half straight into the output file.  The sequential path is the reference.

Per-inode state between the loops lives in flat lists indexed by inode number; xattr bodies
come from `xattrs.XattrEncoder`, which works each distinct xattr tuple out once.  An external
file whose payload and digest are not shared (nearly all) gets its xattr size and body in the
loops themselves, from per-tuple parts (`external_fixed`, `external_heads`): three method
calls per file less; `fast=False` sends every file through the encoder (the reference).
"""

from __future__ import annotations

import os
import stat
from array import array
from bisect import bisect_left
from itertools import compress, islice
from struct import Struct

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
from cfsc.backends.erofs.xattrs import REDIRECT_AROUND, XattrEncoder, redirect_around
from cfsc.base.fsverity import DIGEST_SIZE
from cfsc.base import forked
from cfsc.base.errors import TreeError
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
# From this many inodes on the second half is sized, placed and encoded by a forked child;
# below, the fork costs more than half the loops save.  The child costs more CPU than the
# half it takes off the parent: both processes write to the reference counts of objects all
# over the heap, so each copies about half of its pages.
SPLIT_MIN_INODES = 20000
_ENTRY_WEIGHT = 4
# Records joined into one write: ~100 KiB, which the allocator reuses join after join; larger
# joins land in fresh pages each time (a first touch costs ~3 µs a page).
JOIN_RECORDS = 1024


def _dir_entries(node: Inode, parent: Inode | None) -> tuple[list[bytes], list[Inode | None]]:
    """Names in bytewise order with `.` and `..` in their sorted places, and their targets
    (`..`'s None when the parent is not known yet: `_adopt`)."""
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

    __slots__ = ("nids", "compact", "heads", "blocks", "tails", "dirs", "xattrs", "inodes_end",
                 "n_data_blocks", "min_mtime", "one_time")


HEAD_END = EROFS_SUPER_OFFSET + EROFS_SUPER_BLOCK.size  # where the first inode may go


def _plan(tree: Tree, encoder: XattrEncoder) -> _Plan:
    """The reference plan: every inode sized (`_size`), then placed (`_place`) in one run."""
    inodes = tree.inodes
    assert inodes is not None and tree.shared_xattrs is not None, "run the pipeline before writing"
    plan = _new_plan(inodes)
    orphans = _size(inodes, plan, encoder, 0, len(inodes), {0: 0})
    assert not orphans  # (every directory's parent comes before it: breadth-first order)
    plan.inodes_end = _place(plan, 0, len(inodes), HEAD_END)
    plan.n_data_blocks = sum(plan.blocks)
    _check_root(plan, tree)
    return plan


def _check_root(plan: _Plan, tree: Tree) -> None:
    """The superblock's root nid has 16 bits."""
    if plan.nids[0] > 0xFFFF:
        raise TreeError(f"the root inode lands at nid {plan.nids[0]}: the superblock holds at most 65535", "/",
                        tree.source)


def _new_plan(inodes: list[Inode]) -> _Plan:
    """An empty plan, with what sizing needs of the whole tree: the oldest time (the
    superblock's: a compact inode has no time of its own) and whether every inode has it."""
    plan = _Plan()
    n = len(inodes)
    mtimes = [node.mtime for node in inodes]
    min_sec = min(mtimes)
    count = mtimes.count(min_sec)
    if count == n:
        nsecs = [node.mtime_nsec for node in inodes]
    else:  # (list.index finds the few of the oldest second at C speed)
        nsecs = []
        at = -1
        for _ in range(count):
            at = mtimes.index(min_sec, at + 1)
            nsecs.append(inodes[at].mtime_nsec)
    min_nsec = min(nsecs)
    plan.min_mtime = (min_sec, min_nsec)
    # Trees of one time (most: a dumpfile of a build) skip that part of the per-inode
    # compactness test; the ids are tested in `_size`, in both processes of a split write.
    plan.one_time = count == n and nsecs.count(min_nsec) == n
    plan.nids = [0] * n
    plan.compact = [True] * n
    plan.heads = [0] * n
    plan.blocks = [0] * n
    plan.tails = [0] * n
    plan.dirs = {}
    return plan


def _size(inodes: list[Inode], plan: _Plan, encoder: XattrEncoder, lo: int, hi: int,
          parents: dict[int, int], fast: bool = True) -> list[int]:
    """Size inodes[lo:hi]: record and xattr bytes (`heads`, the one's complement for a
    symlink, whose record must not cross a block), tail, data blocks, layout and
    directory entries -- all that does not depend on where the inode goes.

    `parents` maps a directory's inode number to its parent's; the directories this range's
    directories hold are added.  Returns the directories whose parent was not in it (their
    `..` target is None, for `_adopt` to fill in).  `fast=False`: every external file
    through `XattrEncoder.external_size`, the reference (tests compare both)."""
    min_sec, min_nsec = plan.min_mtime
    one_time = plan.one_time
    xattr_size = encoder.size
    external_size = encoder.external_size
    external_fixed = encoder.external_fixed
    shared_payloads, shared_digests = encoder.shared_payloads, encoder.shared_digests
    own_size: dict[int, int] = {}  # id(xattr tuple) -> its body's size (the encoder keeps the tuple)
    fixed: dict[int, tuple[int, int]] = {}  # id(xattr tuple) -> `external_fixed` of it
    compact, heads, blocks, tails = plan.compact, plan.heads, plan.blocks, plan.tails
    dirs = plan.dirs
    orphans = []
    min_bits, max_bits, map_entry = EROFS_BLKSIZ_BITS, _MAX_CHUNK_BITS, EROFS_BLOCK_MAP_ENTRY_SIZE
    dirent, compact_size, extended_size = _DIRENT, _COMPACT, _EXTENDED
    for i, node in enumerate(islice(inodes, lo, hi), lo):
        ftype = node.mode & S_IFMT
        n_blocks = tail = 0
        size = node.size
        if ftype == S_IFREG:
            if size > 0:
                if node.content is None:  # `overlay.is_external`; a chunk index: one 4-byte null address per chunk
                    payload = node.payload
                    digest = node.digest
                    if (fast and payload and payload not in shared_payloads
                            and (digest is None or digest not in shared_digests)):
                        # (`external_size`, written out: nearly every file)
                        sizes = fixed.get(id(node.xattrs))
                        if sizes is None:
                            sizes = fixed[id(node.xattrs)] = external_fixed(node.xattrs)
                        xs = (sizes[0] if digest is None else sizes[1] + 24 + len(digest)) + ((24 + len(payload)) & ~3)
                    else:
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
                        parents[child.ino] = i
                parent = parents.get(i)
                if parent is None:
                    orphans.append(i)
                names, targets = _dir_entries(node, None if parent is None else inodes[parent])
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
        if one_time:
            is_compact = node.nlink <= 0xFFFF and node.uid <= 0xFFFF and node.gid <= 0xFFFF and size <= 0xFFFFFFFF
        else:
            is_compact = (node.mtime == min_sec and node.mtime_nsec == min_nsec
                          and node.nlink <= 0xFFFF and node.uid <= 0xFFFF and node.gid <= 0xFFFF
                          and size <= 0xFFFFFFFF)
        head = (compact_size if is_compact else extended_size) + xs
        if not is_compact:
            compact[i] = False
        if ftype == S_IFLNK:
            if head + tail >= BLK:  # a target that fills the block goes to a block of its own
                n_blocks += 1
                tail = 0
            head = ~head
        if n_blocks:
            blocks[i] = n_blocks
        if tail:
            tails[i] = tail
        heads[i] = head
    return orphans


def _adopt(inodes: list[Inode], plan: _Plan, orphans: list[int], parents: dict[int, int]) -> None:
    """Fill in the `..` targets `_size` left out (the parent was sized by the other process)."""
    dirs = plan.dirs
    for i in orphans:
        names, targets, _starts = dirs[i]
        targets[bisect_left(names, b"..")] = inodes[parents[i]]


def _place(plan: _Plan, lo: int, hi: int, pos: int) -> int:
    """Give inodes[lo:hi] their nids from offset `pos` on (format note §2.5: records start
    on a slot; a tail must not cross a block, so padding goes before the record or the tail
    moves out to a block of its own); returns the offset after the last record, slot-aligned."""
    heads, tails, blocks, nids = plan.heads, plan.tails, plan.blocks, plan.nids
    slot_mask, slot_bits, blk_mask = EROFS_SLOTSIZE - 1, EROFS_ISLOTBITS, BLK - 1
    for i in range(lo, hi):
        pos = (pos + slot_mask) & ~slot_mask
        head = heads[i]
        tail = tails[i]
        if head < 0:  # a symlink: the whole record within one block
            head = ~head
            # (a target moved to a block of its own left a record of a block or more)
            if blocks[i] or (pos & blk_mask) + head + tail > BLK:
                pos = (pos + blk_mask) & ~blk_mask
        elif tail:
            remainder = BLK - ((pos + head) & blk_mask)
            if remainder < tail:
                pad = (remainder + slot_mask) & ~slot_mask
                if tail <= BLK - ((pos + head + pad) & blk_mask):
                    pos += pad
                else:  # the tail cannot be kept in one block: move it out
                    blocks[i] += 1
                    tails[i] = tail = 0
                    pos = (pos + blk_mask) & ~blk_mask
        nids[i] = pos >> slot_bits
        pos += head + tail
    return (pos + slot_mask) & ~slot_mask


def write_image(tree: Tree, out: BinaryIO, split: bool | None = None, keep: list | None = None) -> None:
    """Write the image of a compiled tree to a binary stream.

    `split`: share the work with a forked child (`cfsc.base.forked`), each process sizing
    and then encoding half of the inodes; None takes it for trees of `SPLIT_MIN_INODES`
    inodes or more when a processor is idle, False never.  Either way the bytes are the
    same (the sequential path is the reference, and tests compare both); the child writes
    its part in place with `pwrite`, so it is taken only when `out` is a regular file.
    `keep`: a list the plan is appended to, for a process that ends next (`build.compile_image`).
    """
    inodes = tree.inodes
    assert tree.shared_xattrs is not None and inodes is not None, "run the pipeline before writing"
    encoder = XattrEncoder(tree.shared_xattrs)
    if split is None:
        split = len(inodes) >= SPLIT_MIN_INODES and forked.worthwhile()
    fd = _pwritable(out) if split and len(inodes) > 1 else None
    if fd is not None and _write_split(tree, encoder, out, fd, keep=keep):
        return
    plan = _plan(tree, encoder)
    if keep is not None:
        keep.append(plan)
    first_block, total_blocks = _blocks(plan, encoder)
    head, middle = _frame(tree, encoder, plan, first_block, total_blocks)
    out.write(head)
    end, data_blocks = _emit(inodes, plan, encoder, 0, len(inodes), HEAD_END, first_block, out.write)
    out.write(_ZEROS[:plan.inodes_end - end] + middle)
    _write_blocks(data_blocks, out.write)


def _blocks(plan: _Plan, encoder: XattrEncoder) -> tuple[int, int]:
    """The first data block and the image's block count, from a complete plan; sets the
    encoder's `base` (shared xattr ids count from the inode area's last block)."""
    data_start = (plan.inodes_end + encoder.shared_size + BLK - 1) & ~(BLK - 1)
    encoder.base = (plan.inodes_end % BLK) // EROFS_XATTR_ALIGN
    return data_start // BLK, data_start // BLK + plan.n_data_blocks


def _frame(tree: Tree, encoder: XattrEncoder, plan: _Plan, first_block: int, total_blocks: int) -> tuple[bytes, bytes]:
    """The bytes around the inode records: the header and superblock before, the shared
    xattrs and the padding to the first data block after."""
    min_sec, min_nsec = plan.min_mtime
    head = COMPOSEFS_HEADER.pack(
        COMPOSEFS_MAGIC, COMPOSEFS_HEADER_VERSION,
        COMPOSEFS_FLAGS_HAS_ACL if encoder.has_acl else 0, tree.version or 0)
    superblock = EROFS_SUPER_BLOCK.pack(
        EROFS_SUPER_MAGIC_V1, 0, EROFS_FEATURE_COMPAT_MTIME | EROFS_FEATURE_COMPAT_XATTR_FILTER,
        EROFS_BLKSIZ_BITS, 0, plan.nids[0], len(plan.nids), min_sec & U64, min_nsec, total_blocks,
        0, plan.inodes_end // BLK, b"", b"", 0, 0, 0, 0, 0, 0, 0, 0, 0)
    shared_area = encoder.shared_area(tree.shared_xattrs)  # type: ignore[arg-type]
    assert len(shared_area) == encoder.shared_size
    middle = shared_area + _ZEROS[:first_block * BLK - plan.inodes_end - len(shared_area)]
    return b"".join((head, _ZEROS[:EROFS_SUPER_OFFSET - len(head)], superblock)), middle


# The split path's messages: the parent's place for the second half (the offset after the
# first half's records, the first half's data blocks), the child's answer (where the inode
# area ends, the second half's data blocks, whether it met an ACL key, then its nids), and
# last the parent's nids and the (directory, parent) pairs the child's `..` entries need.
# (The child places its half before it converts the first half's nids: that is the only
# part of the exchange the parent waits for.)
_PLACE = Struct("<QQ")
_PLACED = Struct("<QQ?")


def _write_split(tree: Tree, encoder: XattrEncoder, out: BinaryIO, fd: int, k: int | None = None,
                 keep: list | None = None) -> bool:
    """The plan and the records in two processes (module docstring), the child's half from
    inode `k` (by default `_split_point`'s); False when no child can be forked (the caller
    writes sequentially)."""
    inodes = tree.inodes
    assert inodes is not None
    n = len(inodes)
    plan = _new_plan(inodes)
    nids = plan.nids
    if k is None:
        k = _split_point(inodes)
    assert 0 < k < n
    base = out.tell()  # where the image starts in the file
    out.flush()

    def second_half(parent: forked.Line) -> None:
        parents: dict[int, int] = {}
        orphans = _size(inodes, plan, encoder, k, n, parents)
        pos, first_blocks = _PLACE.unpack(parent.receive())
        plan.inodes_end = _place(plan, k, n, pos)
        own_blocks = sum(plan.blocks[k:])
        parent.send(_PLACED.pack(plan.inodes_end, own_blocks, encoder.has_acl) + array("Q", nids[k:]).tobytes())
        plan.n_data_blocks = first_blocks + own_blocks
        first_block, _total_blocks = _blocks(plan, encoder)
        numbers = _u64s(parent.receive())
        nids[:k] = numbers[:k]
        parents.update(zip(numbers[k::2], numbers[k + 1::2], strict=True))
        _adopt(inodes, plan, orphans, parents)
        k_start = nids[k] << EROFS_ISLOTBITS
        k_block = first_block + first_blocks
        write = _PWriter(fd, base + k_start)
        end, data_blocks = _emit(inodes, plan, encoder, k, n, k_start, k_block, write)
        write(_ZEROS[:plan.inodes_end - end])
        write.pos = base + k_block * BLK
        _write_blocks(data_blocks, write)

    try:
        child = forked.Partner(second_half)
    except OSError:  # no child to be had (a process limit, no memory to copy this one)
        return False
    if keep is not None:
        keep.append(plan)
    with child:
        parents = {0: 0}
        orphans = _size(inodes, plan, encoder, 0, k, parents)
        assert not orphans
        pos = _place(plan, 0, k, HEAD_END)
        first_blocks = sum(plan.blocks[:k])
        child.send(_PLACE.pack(pos, first_blocks))
        numbers = array("Q", nids[:k])
        for c, p in parents.items():
            if c >= k:
                numbers.append(c)
                numbers.append(p)
        placed = memoryview(child.receive())
        child.send(numbers.tobytes())
        plan.inodes_end, own_blocks, has_acl = _PLACED.unpack_from(placed)
        nids[k:] = _u64s(placed[_PLACED.size:])
        encoder.has_acl |= has_acl
        plan.n_data_blocks = first_blocks + own_blocks
        _check_root(plan, tree)
        first_block, total_blocks = _blocks(plan, encoder)
        head, middle = _frame(tree, encoder, plan, first_block, total_blocks)
        k_start = nids[k] << EROFS_ISLOTBITS
        out.write(head)
        end, data_blocks = _emit(inodes, plan, encoder, 0, k, HEAD_END, first_block, out.write)
        out.write(_ZEROS[:k_start - end])
        out.seek(base + plan.inodes_end)
        out.write(middle)
        _write_blocks(data_blocks, out.write)
        out.flush()
        child.join()
    out.seek(base + total_blocks * BLK)
    return True


def _u64s(data: bytes | memoryview) -> array:
    # (`array("Q", view)` would take a memoryview's bytes one by one, as numbers)
    numbers = array("Q")
    numbers.frombytes(data)
    return numbers


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


def _split_point(inodes: list[Inode]) -> int:
    """The first inode of the child's half, so that the halves take about the same time: a
    record costs about as much as `_ENTRY_WEIGHT` directory entries."""
    weight = _ENTRY_WEIGHT
    children = [node.children for node in inodes]
    # (C-level: the numbers and entry counts of the directories that have entries; the
    # dots of the others are noise here)
    entries = list(map(len, filter(None, children)))
    half = (len(inodes) * weight + sum(entries)) // 2
    before = 0  # entries of the directories before the inode looked at
    for i, e in zip(compress(range(len(inodes)), children), entries, strict=True):
        if i * weight + before >= half:
            break
        before += e
    return min(max((half - before) // weight, 1), len(inodes) - 1)


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
          offset: int, next_block: int, write, fast: bool = True) -> tuple[int, list[bytes]]:
    """Encode inodes[lo:hi] through `write`, from `offset` (padding up to inode `lo` first):
    returns the offset after the last record and the data blocks of those inodes, in order.
    `fast=False`: every external file's xattrs through `XattrEncoder.external_body`, the
    reference (tests compare both)."""
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
    external_heads = encoder.external_heads
    shared_payloads, shared_digests = encoder.shared_payloads, encoder.shared_digests
    heads: dict[int, tuple[bytes | None, bytes | None]] = {}  # id(xattr tuple) -> `external_heads` of it
    around_of = REDIRECT_AROUND.get
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
            # (`external_body`, written out for a file whose payload and digest are not shared)
            payload = node.payload
            digest = node.digest
            body = None
            if fast and payload and payload not in shared_payloads:
                around = around_of(len(payload)) or redirect_around(len(payload))
                hit = heads.get(id(node.xattrs))
                if hit is None:
                    hit = heads[id(node.xattrs)] = external_heads(node.xattrs)
                if digest is None:
                    if hit[0] is not None:
                        body = b"".join((hit[0], around[0], payload, around[1]))
                elif hit[1] is not None and len(digest) == DIGEST_SIZE and digest not in shared_digests:
                    body = b"".join((hit[1], digest, around[0], payload, around[1]))
            if body is None:
                body = external_body(node)
        else:
            body = own_body.get(id(node.xattrs))
            if body is None:
                body = own_body[id(node.xattrs)] = xattr_body(node, False)
        icount = (len(body) - ibody) // align + 1 if body else 0  # (layout.xattr_ibody_size, inverted)
        start = nids[i] << slot_bits
        if start != offset:  # padding, so the tail stays within one block (format note §2.5)
            append(_ZEROS[:start - offset])
        # (the pieces go into `parts` as they are: one join per JOIN_RECORDS records makes the bytes)
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
        if pending == JOIN_RECORDS:
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
