"""Why two images' bytes (and so their digests) differ: their structures compared, aspect by aspect.

A composefs digest covers every byte, and one small cause moves everything after it: an inode
that turns extended shifts every later inode by 32 bytes, a pair leaving the shared xattr table
shifts the data blocks.  So the answer is a list of *causes*, each with the paths it concerns,
followed by the consequences and the first differing byte:

* the composefs header: format version (0 → 1 marks directories holding whiteouts opaque), the
  ACL flag; superblock fields (build time = the earliest mtime, which decides compact inodes;
  anything another writer sets, like a UUID);
* per path (both images walked in step, depth-first): compact vs extended inode and which field
  needed 64 bytes (mtime ≠ build time, uid/gid/nlink > 65535, size ≥ 2³²), data layout (inline
  tail, plain blocks, chunk index), xattrs stored shared vs inline, the overlay markers a reader
  hides (whiteout encoding, `opaque`, redirect and metacopy forms), directory blocks for the
  same names;
* the shared xattr table: pairs only one image shares (with how many inodes use them in each),
  or the same pairs in another order;
* hidden root whiteouts, inode order and inode numbers (hard-link homes, another writer's order),
  inode positions (how many moved, from where), image size.

`tree_changes` (from the tree diff) adds the first cause when the trees themselves differ.
Each structure's fields come from `cfsc.backends.erofs.layout`, read with the reader
(`cfsc.backends.erofs.reader`), walked with `cfsc.backends.erofs.entries.walk`; facts `cfsc info`
also reports come from `cfsc.images.info`.
"""

from __future__ import annotations

import re
from array import array
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field

from .backends.erofs.entries import walk
from .backends.erofs.layout import (
    COMPOSEFS_HEADER, EROFS_INODE_COMPACT, EROFS_INODE_EXTENDED, EROFS_SUPER_BLOCK, EROFS_SUPER_OFFSET, Layout,
)
from .backends.erofs.reader import LAYOUTS, Image, RawInode
from .tree import S_IFDIR, S_IFMT

EXAMPLES = 5
U16 = 0xFFFF
U32 = 0xFFFFFFFF
HIDDEN_KEYS = (b"trusted.overlay.", b"user.overlay.whiteout")
# Superblock fields whose difference is a consequence reported elsewhere (or never set).
DERIVED = {"blocks", "xattr_blkaddr", "inos", "build_time", "build_time_nsec", "root_nid", "checksum"}


@dataclass(slots=True)
class Reason:
    """One cause (or consequence) of differing bytes."""

    aspect: str
    detail: str
    a: object = None
    b: object = None
    count: int = 0  # entries concerned (0: not about entries)
    paths: list[bytes] = field(default_factory=list)  # the first few of them


def field_offsets(layout: Layout) -> dict[str, tuple[int, int]]:
    """(offset, size) of each named field of a struct layout (pad bytes skipped)."""
    offsets = {}
    pos = 0
    names = iter(layout.fields)
    for count, code in re.findall(r"(\d*)([xsBbHhIiQq])", layout.struct.format):
        n = int(count) if count else 1
        if code == "x":
            pos += n
        elif code == "s":
            offsets[next(names)] = (pos, n)
            pos += n
        else:
            size = {"B": 1, "b": 1, "H": 2, "h": 2, "I": 4, "i": 4, "Q": 8, "q": 8}[code]
            for _ in range(n):
                offsets[next(names)] = (pos, size)
                pos += size
    return offsets


class _Facts:
    """What one walk over an image gathers for the comparison."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self.hidden: list[RawInode] = []
        self.table: dict[int, tuple[bytes, bytes]] = {}  # shared id -> pair
        self.users: Counter = Counter()  # pair -> inodes using it (shared or inline)
        self.inodes: list[tuple[int, int, bytes, bool, int]] = []  # (offset, end, path, extended, xattr size)
        self.blocks: dict[int, bytes] = {}  # first data block -> path

    def xattr_split(self, raw: RawInode) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
        """(inline pairs, shared pairs) as stored on disk, counting users and the table."""
        if not raw.xattr_size:
            return [], []
        items = self.image.xattrs(raw)
        refs = self.image.shared_xattr_refs(raw)
        inline = items[:len(items) - len(refs)]
        shared = items[len(items) - len(refs):]
        for ref, pair in zip(refs, shared, strict=True):
            self.table[ref] = pair
        self.users.update(items)
        return inline, shared

    def note(self, raw: RawInode, path: bytes) -> None:
        end = raw.offset + (64 if raw.extended else 32) + raw.xattr_size + raw.tail_size
        self.inodes.append((raw.offset, end, path, raw.extended, raw.xattr_size))
        if raw.blkaddr and raw.mode & S_IFMT == S_IFDIR and raw.size > raw.tail_size:
            self.blocks[raw.blkaddr] = path


def _extended_because(raw: RawInode, image: Image) -> str:
    why = []
    if (raw.mtime, raw.mtime_nsec) != (image.build_time, image.build_time_nsec):
        why.append(f"mtime {raw.mtime}.{raw.mtime_nsec:09d} is not the build time "
                   f"{image.build_time}.{image.build_time_nsec:09d}")
    for name, limit in (("uid", U16), ("gid", U16), ("nlink", U16), ("size", U32)):
        value = getattr(raw, name)
        if value > limit:
            why.append(f"{name} {value} > {limit}")
    return ", ".join(why) or "no field needs it (the writer's choice)"


def _markers(pairs) -> frozenset:
    return frozenset(kv for kv in pairs if kv[0].startswith(HIDDEN_KEYS) or kv[0] == b"user.overlay.whiteouts"
                     or kv[0] == b"user.overlay.opaque")


def _show(pair: tuple[bytes, bytes]) -> str:
    key, value = pair
    text = value[:40].decode("utf-8", "backslashreplace") + ("…" if len(value) > 40 else "")
    return f"{key.decode('utf-8', 'backslashreplace')}={text!r}"


class _Aspect:
    """Collects entries concerned by one per-path aspect."""

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[tuple[bytes, str]] = []

    def add(self, path: bytes, text: str) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append((path, text))

    def reason(self, aspect: str, headline: str) -> Reason | None:
        if not self.count:
            return None
        shown = "; ".join(f"{p.decode('utf-8', 'backslashreplace')}: {t}" for p, t in self.examples)
        more = f" (and {self.count - len(self.examples)} more)" if self.count > len(self.examples) else ""
        return Reason(aspect, f"{headline}: {shown}{more}", count=self.count, paths=[p for p, _t in self.examples])


def explain(a: Image, b: Image, tree_changes: int = 0) -> list[Reason]:
    """Why the bytes of `a` and `b` differ (empty if they do not)."""
    if a.data == b.data:
        return []
    from .fsverity import digest_bytes

    reasons: list[Reason] = []
    if tree_changes:
        entries = "1 entry" if tree_changes == 1 else f"{tree_changes} entries"
        reasons.append(Reason("tree", f"the trees differ ({entries}, listed above): each change "
                                      "also moves what is laid out after it", count=tree_changes))
    reasons += _header(a, b)
    fa, fb = _Facts(a), _Facts(b)
    reasons += _entries(fa, fb)
    reasons += _shared_table(fa, fb)
    if len(a.data) != len(b.data):
        reasons.append(Reason("size", f"image size {len(a.data)} → {len(b.data)} bytes "
                                      f"({a.super.blocks} → {b.super.blocks} blocks)", len(a.data), len(b.data)))
    reasons.append(_first_difference(fa, fb))
    da, db = digest_bytes(a.data).hex(), digest_bytes(b.data).hex()
    reasons.insert(0, Reason("digest", f"fs-verity digest sha256:{da} → sha256:{db}", da, db))
    return reasons


def _header(a: Image, b: Image) -> list[Reason]:
    out = []
    if a.version != b.version:
        out.append(Reason("format_version",
                          f"format version {a.version} → {b.version}: version 1 marks every directory that holds "
                          "a whiteout opaque (trusted.overlay.opaque=x, user.overlay.opaque=x); the header's "
                          "version field differs in any case", a.version, b.version))
    if a.flags != b.flags:
        out.append(Reason("flags", f"header flags 0x{a.flags:x} → 0x{b.flags:x} (bit 0: some inode has a POSIX ACL)",
                          a.flags, b.flags))
    for name in COMPOSEFS_HEADER.fields:
        if name not in ("version", "flags", "composefs_version", "magic") and getattr(a.header, name) != getattr(b.header, name):
            out.append(Reason("header", f"composefs header {name}: {getattr(a.header, name)} → {getattr(b.header, name)}"))
    if (a.build_time, a.build_time_nsec) != (b.build_time, b.build_time_nsec):
        out.append(Reason("build_time",
                          f"build time (the earliest mtime) {a.build_time}.{a.build_time_nsec:09d} → "
                          f"{b.build_time}.{b.build_time_nsec:09d}: inodes with exactly that mtime are compact "
                          "(32 bytes), others extended (64)", a.build_time, b.build_time))
    if a.super.inos != b.super.inos:
        out.append(Reason("inode_count", f"{a.super.inos} → {b.super.inos} inodes (root whiteouts included)",
                          a.super.inos, b.super.inos))
    if a.root_nid != b.root_nid:
        out.append(Reason("root_nid", f"root inode nid {a.root_nid} → {b.root_nid} (the root needed padding before "
                                      "its directory tail)", a.root_nid, b.root_nid))
    for name in EROFS_SUPER_BLOCK.fields:
        if name in DERIVED:
            continue
        va, vb = getattr(a.super, name), getattr(b.super, name)
        if va != vb:
            shown = (va.hex(), vb.hex()) if isinstance(va, bytes) else (va, vb)
            out.append(Reason("superblock", f"superblock {name}: {shown[0]} → {shown[1]} (set by another writer?)",
                              shown[0], shown[1]))
    return out


def _key(path: bytes) -> list[bytes]:
    return path.split(b"/")


def _entries(fa: _Facts, fb: _Facts) -> list[Reason]:
    """Walk both images in step (depth-first, sorted names) and compare what each path's inode stores."""
    a, b = fa.image, fb.image
    formats, layouts, sharing, markers, encodings, dirs = (_Aspect() for _ in range(6))
    nids_a, nids_b = array("q"), array("q")
    inos_differ = _Aspect()
    common_paths: list[bytes] = []
    only = [0, 0]
    walk_a = walk(a, hidden=fa.hidden)
    walk_b = walk(b, hidden=fb.hidden)
    item_a = next(walk_a, None)
    item_b = next(walk_b, None)
    while item_a is not None or item_b is not None:
        ka = _key(item_a[0]) if item_a is not None else None
        kb = _key(item_b[0]) if item_b is not None else None
        if kb is None or (ka is not None and ka < kb):
            if item_a[2] is None:  # type: ignore[index]
                fa.note(item_a[1].raw, item_a[0])  # type: ignore[index]
                fa.xattr_split(item_a[1].raw)  # type: ignore[index]
            only[0] += 1
            item_a = next(walk_a, None)
            continue
        if ka is None or kb < ka:
            if item_b[2] is None:
                fb.note(item_b[1].raw, item_b[0])
                fb.xattr_split(item_b[1].raw)
            only[1] += 1
            item_b = next(walk_b, None)
            continue
        path, ea, first_a = item_a  # type: ignore[misc]
        _path, eb, first_b = item_b  # type: ignore[misc]
        item_a = next(walk_a, None)
        item_b = next(walk_b, None)
        if first_a is not None or first_b is not None:
            continue  # a hard link: its inode was compared at its first path
        ra, rb = ea.raw, eb.raw
        fa.note(ra, path)
        fb.note(rb, path)
        nids_a.append(ra.nid)
        nids_b.append(rb.nid)
        common_paths.append(path)
        if ra.ino != rb.ino:
            inos_differ.add(path, f"{ra.ino} → {rb.ino}")
        if ra.extended != rb.extended:
            if rb.extended:
                formats.add(path, f"compact → extended ({_extended_because(rb, b)})")
            else:
                formats.add(path, f"extended ({_extended_because(ra, a)}) → compact")
        if ra.layout != rb.layout:
            layouts.add(path, f"{LAYOUTS[ra.layout]} → {LAYOUTS[rb.layout]}")
        if ra.mode & S_IFMT != rb.mode & S_IFMT:
            encodings.add(path, f"stored as mode {ra.mode:o} → {rb.mode:o}")
        inline_a, shared_a = fa.xattr_split(ra)
        inline_b, shared_b = fb.xattr_split(rb)
        if set(shared_a) != set(shared_b):
            # Only pairs both inodes carry: a pair on one side only is a tree change.
            moved = [f"{_show(p)} shared → inline" for p in sorted(set(shared_a) & set(inline_b))]
            moved += [f"{_show(p)} inline → shared" for p in sorted(set(inline_a) & set(shared_b))]
            if moved:
                sharing.add(path, ", ".join(moved))
        mark_a, mark_b = _markers(inline_a + shared_a), _markers(inline_b + shared_b)
        if mark_a != mark_b:
            parts = [f"-{_show(p)}" for p in sorted(mark_a - mark_b)] + [f"+{_show(p)}" for p in sorted(mark_b - mark_a)]
            markers.add(path, " ".join(parts))
        if ra.mode & S_IFMT == S_IFDIR == rb.mode & S_IFMT and (ra.size != rb.size or ra.layout != rb.layout):
            if [n for n, _nid, _t in a.dirents(ra)] == [n for n, _nid, _t in b.dirents(rb)]:
                dirs.add(path, f"same names in {ra.size} → {rb.size} bytes of dirents")
    for raw in fa.hidden:
        fa.note(raw, b"(hidden whiteout)")
    for raw in fb.hidden:
        fb.note(raw, b"(hidden whiteout)")
    out = [r for r in (
        formats.reason("inode_format", "inode format (compact 32 / extended 64 bytes)"),
        layouts.reason("data_layout", "data layout"),
        encodings.reason("whiteout_encoding", "file type on disk (whiteouts: a character device, or a file marked "
                                              "with trusted.overlay.overlay.whiteout)"),
        markers.reason("overlay_xattrs", "overlay markers a reader hides (whiteout, opaque, redirect, metacopy forms)"),
        sharing.reason("xattr_sharing", "xattrs stored in the shared table vs inline"),
        dirs.reason("directory_layout", "directory blocks"),
    ) if r is not None]
    if len(fa.hidden) != len(fb.hidden):
        out.append(Reason("root_whiteouts", f"{len(fa.hidden)} → {len(fb.hidden)} hidden whiteouts (composefs adds "
                                            "00…ff to the root to hide the object store's directories)",
                          len(fa.hidden), len(fb.hidden)))
    out += _order(nids_a, nids_b, common_paths, inos_differ)
    return out


def _order(nids_a: array, nids_b: array, paths: list[bytes], inos: _Aspect) -> list[Reason]:
    out = []
    order = sorted(range(len(nids_a)), key=nids_a.__getitem__)
    inversions = 0
    first = None
    last = -1
    for i in order:
        if nids_b[i] < last:
            inversions += 1
            if first is None:
                first = i
        last = max(last, nids_b[i])
    if inversions:
        out.append(Reason("inode_order", f"inode order differs ({inversions} inodes out of order, first "
                                         f"{paths[first].decode('utf-8', 'backslashreplace')}): another writer's "  # type: ignore[index]
                                         "order, or other hard-link homes", count=inversions,
                          paths=[paths[first]]))  # type: ignore[index]
    r = inos.reason("inode_numbers", "inode numbers (i_ino: breadth-first position of the home entry)")
    if r is not None:
        out.append(r)
    moved = [i for i in order if nids_a[i] != nids_b[i]]
    if moved:
        i = moved[0]
        out.append(Reason("inode_positions",
                          f"{len(moved)} inodes moved, the first in layout order "
                          f"{paths[i].decode('utf-8', 'backslashreplace')} (nid {nids_a[i]} → {nids_b[i]}): "
                          "everything after a size change shifts", count=len(moved), paths=[paths[i]]))
    return out


def _shared_table(fa: _Facts, fb: _Facts) -> list[Reason]:
    ta = [fa.table[r] for r in sorted(fa.table)]
    tb = [fb.table[r] for r in sorted(fb.table)]
    if ta == tb:
        if ta and min(fa.table) != min(fb.table):
            start_a = fa.image.xattr_base + 4 * min(fa.table)
            start_b = fb.image.xattr_base + 4 * min(fb.table)
            return [Reason("shared_xattrs", f"the shared xattr table moved from 0x{start_a:x} to 0x{start_b:x} (it "
                                            "starts after the last inode): every shared reference changes",
                           start_a, start_b)]
        return []
    sa, sb = set(ta), set(tb)
    parts = []
    for pair in sorted(sa - sb):
        parts.append(f"{_show(pair)} only in A's (on {fa.users[pair]} inodes in A, {fb.users[pair]} in B)")
    for pair in sorted(sb - sa):
        parts.append(f"{_show(pair)} only in B's (on {fa.users[pair]} inodes in A, {fb.users[pair]} in B)")
    if not parts:
        parts.append("the same pairs in another order")
    shown = "; ".join(parts[:EXAMPLES]) + (f" (and {len(parts) - EXAMPLES} more)" if len(parts) > EXAMPLES else "")
    return [Reason("shared_xattrs", f"shared xattr table ({len(ta)} → {len(tb)} entries; a pair is shared when two or "
                                    f"more inodes carry it): {shown}", len(ta), len(tb), count=len(parts))]


def _first_difference(fa: _Facts, fb: _Facts) -> Reason:
    a, b = fa.image.data, fb.image.data
    n = min(len(a), len(b))
    offset = n
    for start in range(0, n, 4096):
        end = min(start + 4096, n)
        chunk_a, chunk_b = bytes(a[start:end]), bytes(b[start:end])
        if chunk_a != chunk_b:
            offset = start + next(i for i in range(end - start) if chunk_a[i] != chunk_b[i])
            break
    return Reason("first_difference", f"the bytes first differ at offset 0x{offset:x}: {_where(fa, offset)}",
                  offset, offset)


def _where(facts: _Facts, offset: int) -> str:
    image = facts.image
    if offset >= len(image.data):
        return "past the end of the first image"
    if offset < COMPOSEFS_HEADER.size:
        name = _field_at(COMPOSEFS_HEADER, offset)
        return f"composefs header ({name})"
    if EROFS_SUPER_OFFSET <= offset < EROFS_SUPER_OFFSET + EROFS_SUPER_BLOCK.size:
        return f"superblock ({_field_at(EROFS_SUPER_BLOCK, offset - EROFS_SUPER_OFFSET)})"
    if offset < EROFS_SUPER_OFFSET:
        return "padding before the superblock"
    inodes = sorted(facts.inodes)
    i = bisect_right(inodes, (offset, float("inf"))) - 1
    if i >= 0 and inodes[i][0] <= offset < inodes[i][1]:
        start, _end, path, extended, xattr_size = inodes[i]
        layout = EROFS_INODE_EXTENDED if extended else EROFS_INODE_COMPACT
        at = offset - start
        part = (_field_at(layout, at) if at < layout.size
                else "its xattrs" if at < layout.size + xattr_size else "its inline data")
        return f"the inode of {path.decode('utf-8', 'backslashreplace')} (nid {(start - image.meta_base) // 32}), {part}"
    if facts.table:
        area = image.xattr_base + 4 * min(facts.table)
        data_start = -(-(image.xattr_base + 4 * max(facts.table) + 4) // 4096) * 4096
        if area <= offset < data_start:
            return "the shared xattr table"
    block = offset // 4096
    owner = facts.blocks.get(block)
    if owner is not None:
        return f"a directory block of {owner.decode('utf-8', 'backslashreplace')} (block {block})"
    if inodes and offset < inodes[-1][1] + 32:
        return "padding between inodes"
    return f"data block {block}"


def _field_at(layout: Layout, offset: int) -> str:
    for name, (at, size) in field_offsets(layout).items():
        if at <= offset < at + size:
            return name
    return "reserved bytes"
