"""Why two images' bytes (and so their digests) differ: their structures compared, aspect by aspect.

A composefs digest covers every byte, and one small cause moves everything after it: an inode
that turns extended shifts every later inode by 32 bytes, a pair leaving the shared xattr table
shifts the data blocks.  So the answer is a list of *causes*, each with the paths it concerns,
followed by the consequences and the first differing byte:

* the composefs header: format version (0 → 1 marks directories holding whiteouts opaque), the
  ACL flag; superblock fields (build time = the earliest mtime, which decides compact inodes;
  anything another writer sets, like a UUID);
* per path (both images walked in step, directory by directory; an inode is parsed only when
  its bytes differ): compact vs extended inode and which field
  needed 64 bytes (mtime ≠ build time, uid/gid/nlink > 65535, size ≥ 2³²), data layout (inline
  tail, plain blocks, chunk index), xattrs stored shared vs inline, the overlay markers a reader
  hides (whiteout encoding, `opaque`, redirect and metacopy forms), directory blocks for the
  same names;
* the shared xattr table: pairs only one image shares (with how many inodes use them in each),
  or the same pairs in another order;
* hidden root whiteouts, inode order and inode numbers (hard-link homes, another writer's order),
  inode positions (how many moved, from where), image size.

`tree_changes` (from the tree diff) adds the first cause when the trees themselves differ.
Each structure's fields come from `cfsc.backends.erofs.layout` and are read with the reader
(`cfsc.backends.erofs.reader`).
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field

from cfsc.backends.erofs.layout import (
    COMPOSEFS_HEADER,
    EROFS_BLKSIZ,
    EROFS_FT_CHRDEV,
    EROFS_FT_DIR,
    EROFS_I_VERSION_BIT,
    EROFS_INODE_CHUNK_BASED,
    EROFS_INODE_COMPACT,
    EROFS_INODE_EXTENDED,
    EROFS_INODE_HEAD,
    EROFS_ISLOTBITS,
    EROFS_SLOTSIZE,
    EROFS_SUPER_BLOCK,
    EROFS_SUPER_OFFSET,
    EROFS_XATTR_ALIGN,
    EROFS_XATTR_IBODY_HEADER,
    Layout,
)
from cfsc.backends.erofs.overlay import ESCAPED_WHITEOUT, METACOPY, REDIRECT, TRUSTED_OVERLAY, USER_MARKERS
from cfsc.backends.erofs.reader import LAYOUTS, Image, RawInode, merge_sorted
from cfsc.base.fsverity import digest_bytes
from cfsc.base.tree import S_IFCHR, S_IFDIR, S_IFMT, S_IFREG

EXAMPLES = 5
U16 = 0xFFFF
U32 = 0xFFFFFFFF
# Single fields of either inode layout (`layout.INODE_SHARED_FIELDS`), read from raw bytes.
_HEAD = EROFS_INODE_HEAD.unpack_from
_INO = EROFS_INODE_COMPACT.field("i_ino")
_COMPACT, _EXTENDED = EROFS_INODE_COMPACT.size, EROFS_INODE_EXTENDED.size
_EXTENDED_BIT = 1 << EROFS_I_VERSION_BIT
I_U = EROFS_INODE_COMPACT.offset("i_u")
I_INO, I_INO_END = EROFS_INODE_COMPACT.offset("i_ino"), EROFS_INODE_COMPACT.end("i_ino")
SHARED_COUNT = EROFS_XATTR_IBODY_HEADER.offset("h_shared_count")
IBODY_HEADER = EROFS_XATTR_IBODY_HEADER.size  # the shared ids follow it
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


class _Side:
    """One image as the comparison walks it.

    An inode is first compared by its bytes (leaving out `i_u` and `i_ino`, which move when
    anything before them does) and its xattr body (with the shared ids mapped to the pairs
    they name): only inodes that differ are parsed.  Shared-id runs are resolved once each.
    """

    def __init__(self, image: Image, first_difference: int) -> None:
        self.image = image
        self.data = image.data
        self.ids: dict[bytes, tuple] = {}  # packed shared ids of a body -> the pairs they name
        self.id_users: Counter = Counter()  # packed shared ids -> inodes using them
        self.table: dict[int, tuple[bytes, bytes]] = {}  # shared id -> pair
        self.hidden = 0
        self.seen = bytearray(len(image.data) // EROFS_SLOTSIZE + 1)  # nids walked
        self.first_difference = first_difference
        self.near: tuple[int, int, bytes] = (-1, -1, b"")  # (offset, nid, path): last inode starting at or before it
        self.blocks: dict[int, tuple[int, bytes]] = {}  # first data block -> (blocks, path) of directories

    def head(self, nid: int) -> tuple[int, int, int]:
        return inode_head(self.image, nid)

    def note(self, nid: int, off: int, path: bytes) -> None:
        if self.near[0] < off <= self.first_difference:
            self.near = (off, nid, path)

    def shared(self, nid: int, off: int, isize: int, xsize: int) -> tuple[int, tuple]:
        """(number of shared ids, the pairs they name), counting the inode as a user."""
        if not xsize:
            return 0, ()
        start = off + isize
        n = self.data[start + SHARED_COUNT]
        ids = bytes(self.data[start + IBODY_HEADER:start + IBODY_HEADER + EROFS_XATTR_ALIGN * n])
        pairs = self.ids.get(ids)
        if pairs is None:
            _inline, refs, shared = self.image.split_xattrs(self.image.inode(nid))
            pairs = self.ids[ids] = tuple(shared)
            self.table.update(zip(refs, pairs, strict=True))
        self.id_users[ids] += 1
        return n, pairs

    def inline(self, nid: int) -> list[tuple[bytes, bytes]]:
        return self.image.split_xattrs(self.image.inode(nid))[0]

    def alone(self, path: bytes, nid: int) -> None:
        """Walk what only this image has (for users, hidden whiteouts, the first difference)."""
        stack = [(path, nid)]
        while stack:
            path, nid = stack.pop()
            if self.seen[nid]:
                continue
            self.seen[nid] = 1
            raw = self.image.inode(nid)
            if raw.mode & S_IFMT == S_IFCHR and raw.blkaddr == 0:
                self.hidden += 1
            off, isize, xsize = self.head(nid)
            self.note(nid, off, path)
            self.shared(nid, off, isize, xsize)
            if raw.mode & S_IFMT == S_IFDIR:
                self.directory(raw, path)
                prefix = path if path != b"/" else b""
                stack.extend((prefix + b"/" + name, child) for name, child, _t in self.image.dirents(raw))

    def directory(self, raw: RawInode, path: bytes) -> None:
        blocks = (raw.size - raw.tail_size) // EROFS_BLKSIZ
        if blocks and raw.layout != EROFS_INODE_CHUNK_BASED:
            self.blocks[raw.blkaddr] = (blocks, path)

    def path_of(self, target: int) -> bytes:
        """The first path (depth-first) of the inode `target` (a second walk, for one example)."""
        stack = [(b"/", self.image.root_nid)]
        while stack:
            path, nid = stack.pop()
            if nid == target:
                return path
            raw = self.image.inode(nid)
            if raw.mode & S_IFMT == S_IFDIR:
                prefix = path if path != b"/" else b""
                stack.extend((prefix + b"/" + name, child) for name, child, _t in reversed(self.image.dirents(raw)))
        return b"?"


def inode_head(image: Image, nid: int) -> tuple[int, int, int]:
    """(offset, inode size, xattr body size) of an inode, from its first four bytes (an inode
    near the end of the image is read by the reader, which raises if it is out of bounds)."""
    off = image.meta_base + (nid << EROFS_ISLOTBITS)
    if off + _EXTENDED > len(image.data):
        raw = image.inode(nid)
        return off, _EXTENDED if raw.extended else _COMPACT, raw.xattr_size
    fmt, icount, _mode = _HEAD(image.data, off)
    # (`xattr_ibody_size`, written out: this runs for every inode of both images)
    return off, _EXTENDED if fmt & _EXTENDED_BIT else _COMPACT, IBODY_HEADER + EROFS_XATTR_ALIGN * (icount - 1) if icount else 0


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
    """The overlay markers among stored pairs (not redirect and metacopy: payload and digest,
    which the tree diff compares)."""
    return frozenset(kv for kv in pairs if (kv[0].startswith(TRUSTED_OVERLAY) or kv[0] in USER_MARKERS)
                     and kv[0] not in (REDIRECT, METACOPY))


def _whiteout_form(image: Image, raw: RawInode) -> str | None:
    """How an inode stores a whiteout, if it is one: a character device 0:0, or a regular file
    marked with the escaped overlay whiteout xattr (what the composefs writer makes)."""
    ftype = raw.mode & S_IFMT
    if ftype == S_IFCHR and raw.blkaddr == 0:
        return "character device 0:0"
    if ftype == S_IFREG and raw.xattr_size and any(k == ESCAPED_WHITEOUT for k, _v in image.xattrs(raw)):
        return "regular file marked trusted.overlay.overlay.whiteout"
    return None


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


def tree_reason(changes: int) -> Reason:
    """The first cause when the trees differ (it follows the digest in `explain`'s list)."""
    entries = "1 entry" if changes == 1 else f"{changes} entries"
    return Reason("tree", f"the trees differ ({entries}, listed above): each change also moves what is "
                          "laid out after it", count=changes)


def explain(a: Image, b: Image, tree_changes: int = 0, digests: tuple[bytes, bytes] | None = None) -> list[Reason]:
    """Why the bytes of `a` and `b` differ (empty if they do not); `digests`: theirs, if known."""
    if a.data == b.data:
        return []
    reasons: list[Reason] = []
    if tree_changes:
        reasons.append(tree_reason(tree_changes))
    reasons += _header(a, b)
    offset = _first_difference(a.data, b.data)
    fa, fb = _Side(a, offset), _Side(b, offset)
    reasons += _entries(fa, fb)
    reasons += _shared_table(fa, fb)
    if len(a.data) != len(b.data):
        reasons.append(Reason("size", f"image size {len(a.data)} → {len(b.data)} bytes "
                                      f"({a.super.blocks} → {b.super.blocks} blocks)", len(a.data), len(b.data)))
    reasons.append(Reason("first_difference", f"the bytes first differ at offset 0x{offset:x}: {_where(fa, offset)}",
                          offset, offset))
    da, db = (d.hex() for d in digests or (digest_bytes(a.data), digest_bytes(b.data)))
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


def _entries(fa: _Side, fb: _Side) -> list[Reason]:
    """Walk both images in step, directory by directory (names merged in their sorted order),
    and compare what each path's inode stores."""
    a, b = fa.image, fb.image
    formats, layouts, sharing, markers, encodings, dirs, inos = (_Aspect() for _ in range(7))
    nids_a, nids_b = array("q"), array("q")
    moved = [0, None]  # count, (nid in A, nid in B, path) of the first in layout order
    da, db = a.data, b.data

    near = fa.first_difference
    seen_a, seen_b = fa.seen, fb.seen
    ino, ino_end, i_u, ibody, align = I_INO, I_INO_END, I_U, IBODY_HEADER, EROFS_XATTR_ALIGN

    def compare(path: bytes, nid_a: int, nid_b: int) -> None:
        seen_a[nid_a] = seen_b[nid_b] = 1
        off_a, isize_a, xsize_a = fa.head(nid_a)
        off_b, isize_b, xsize_b = fb.head(nid_b)
        if off_a <= near:
            fa.note(nid_a, off_a, path)
        nids_a.append(nid_a)
        nids_b.append(nid_b)
        if nid_a != nid_b:
            moved[0] += 1
            if moved[1] is None or nid_a < moved[1][0]:
                moved[1] = (nid_a, nid_b, path)
        if da[off_a + ino:off_a + ino_end] != db[off_b + ino:off_b + ino_end]:
            inos.add(path, f"{_INO.unpack_from(da, off_a)[0]} → {_INO.unpack_from(db, off_b)[0]}")
        if not (isize_a == isize_b and da[off_a:off_a + i_u] == db[off_b:off_b + i_u]
                and da[off_a + ino_end:off_a + isize_a] == db[off_b + ino_end:off_b + isize_b]):
            ra, rb = a.inode(nid_a), b.inode(nid_b)
            if ra.extended != rb.extended:
                if rb.extended:
                    formats.add(path, f"compact → extended ({_extended_because(rb, b)})")
                else:
                    formats.add(path, f"extended ({_extended_because(ra, a)}) → compact")
            if ra.layout != rb.layout:
                layouts.add(path, f"{LAYOUTS[ra.layout]} → {LAYOUTS[rb.layout]}")
            if ra.mode & S_IFMT != rb.mode & S_IFMT:
                # Only a whiteout has two encodings; any other type change is a tree change
                # (the tree diff lists it).
                kind_a, kind_b = _whiteout_form(a, ra), _whiteout_form(b, rb)
                if kind_a and kind_b:
                    encodings.add(path, f"{kind_a} (mode {ra.mode:o}) → {kind_b} (mode {rb.mode:o})")
        n_a, shared_a = fa.shared(nid_a, off_a, isize_a, xsize_a)
        n_b, shared_b = fb.shared(nid_b, off_b, isize_b, xsize_b)
        if shared_a == shared_b and (da[off_a + isize_a + ibody + align * n_a:off_a + isize_a + xsize_a]
                                     == db[off_b + isize_b + ibody + align * n_b:off_b + isize_b + xsize_b]):
            return  # the same pairs, stored the same way
        inline_a = fa.inline(nid_a) if xsize_a else []
        inline_b = fb.inline(nid_b) if xsize_b else []
        if set(shared_a) != set(shared_b):
            # Only pairs both inodes carry: a pair on one side only is a tree change.
            change = [f"{_show(p)} shared → inline" for p in sorted(set(shared_a) & set(inline_b))]
            change += [f"{_show(p)} inline → shared" for p in sorted(set(inline_a) & set(shared_b))]
            if change:
                sharing.add(path, ", ".join(change))
        mark_a, mark_b = _markers(inline_a + list(shared_a)), _markers(inline_b + list(shared_b))
        if mark_a != mark_b:
            parts = [f"-{_show(p)}" for p in sorted(mark_a - mark_b)] + [f"+{_show(p)}" for p in sorted(mark_b - mark_a)]
            markers.add(path, " ".join(parts))

    root_a, root_b = a.inode(a.root_nid), b.inode(b.root_nid)
    compare(b"/", a.root_nid, b.root_nid)
    stack = [(b"/", root_a, root_b)]
    while stack:
        path, dir_a, dir_b = stack.pop()
        fa.directory(dir_a, path)
        fb.directory(dir_b, path)
        prefix = path if path != b"/" else b""
        list_a, list_b = a.dirents(dir_a), b.dirents(dir_b)
        if (dir_a.size != dir_b.size or dir_a.layout != dir_b.layout) and (
                [n for n, _nid, _t in list_a] == [n for n, _nid, _t in list_b]):
            dirs.add(path, f"same names in {dir_a.size} → {dir_b.size} bytes of dirents")
        for name, ea, eb in merge_sorted(list_a, list_b):
            if eb is None:
                fa.alone(prefix + b"/" + name, ea[1])
                continue
            if ea is None:
                fb.alone(prefix + b"/" + name, eb[1])
                continue
            _name, nid_a, type_a = ea
            _name, nid_b, type_b = eb
            if fa.seen[nid_a] or fb.seen[nid_b]:
                continue  # a hard link: its inode was compared at its first path
            child = prefix + b"/" + name
            if type_a == type_b == EROFS_FT_CHRDEV:
                raw_a, raw_b = a.inode(nid_a), b.inode(nid_b)
                if raw_a.blkaddr == 0 and raw_b.blkaddr == 0:  # whiteouts the reader hides
                    fa.seen[nid_a] = fb.seen[nid_b] = 1
                    fa.hidden += 1
                    fb.hidden += 1
                    continue
            compare(child, nid_a, nid_b)
            if type_a == type_b == EROFS_FT_DIR:
                stack.append((child, a.inode(nid_a), b.inode(nid_b)))
    out = [r for r in (
        formats.reason("inode_format", "inode format (compact 32 / extended 64 bytes)"),
        layouts.reason("data_layout", "data layout"),
        encodings.reason("whiteout_encoding", "whiteouts stored another way (a character device 0:0, or a "
                                              "regular file marked with trusted.overlay.overlay.whiteout)"),
        markers.reason("overlay_xattrs", "overlay markers a reader hides (whiteout, whiteouts, opaque)"),
        sharing.reason("xattr_sharing", "xattrs stored in the shared table vs inline"),
        dirs.reason("directory_layout", "directory blocks"),
    ) if r is not None]
    if fa.hidden != fb.hidden:
        out.append(Reason("root_whiteouts", f"{fa.hidden} → {fb.hidden} hidden whiteouts (composefs adds 00…ff to "
                                            "the root to hide the object store's directories)", fa.hidden, fb.hidden))
    out += _order(fa, nids_a, nids_b, inos)
    if moved[1] is not None:
        nid_a, nid_b, path = moved[1]
        out.append(Reason("inode_positions",
                          f"{moved[0]} inodes moved, the first in layout order "
                          f"{path.decode('utf-8', 'backslashreplace')} (nid {nid_a} → {nid_b}): "
                          "everything after a size change shifts", count=moved[0], paths=[path]))
    return out


def _order(fa: _Side, nids_a: array, nids_b: array, inos: _Aspect) -> list[Reason]:
    out = []
    inversions = 0
    first = None
    last = -1
    for i in sorted(range(len(nids_a)), key=nids_a.__getitem__):
        if nids_b[i] < last:
            inversions += 1
            if first is None:
                first = nids_a[i]
        last = max(last, nids_b[i])
    if first is not None:
        path = fa.path_of(first)
        out.append(Reason("inode_order", f"inode order differs ({inversions} inodes out of order, first "
                                         f"{path.decode('utf-8', 'backslashreplace')}): another writer's "
                                         "order, or other hard-link homes", count=inversions, paths=[path]))
    r = inos.reason("inode_numbers", "inode numbers (i_ino: breadth-first position of the home entry)")
    if r is not None:
        out.append(r)
    return out


def _shared_table(fa: _Side, fb: _Side) -> list[Reason]:
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
    only = sorted(sa - sb)[:EXAMPLES] + sorted(sb - sa)[:EXAMPLES]
    users_a, users_b = _users(fa, only), _users(fb, only)
    parts = []
    for pair in sorted(sa - sb):
        parts.append(f"{_show(pair)} only in A's (on {users_a.get(pair, '?')} inodes in A, {users_b.get(pair, '?')} in B)")
    for pair in sorted(sb - sa):
        parts.append(f"{_show(pair)} only in B's (on {users_a.get(pair, '?')} inodes in A, {users_b.get(pair, '?')} in B)")
    if not parts:
        parts.append("the same pairs in another order")
    shown = "; ".join(parts[:EXAMPLES]) + (f" (and {len(parts) - EXAMPLES} more)" if len(parts) > EXAMPLES else "")
    return [Reason("shared_xattrs", f"shared xattr table ({len(ta)} → {len(tb)} entries; a pair is shared when two or "
                                    f"more inodes carry it): {shown}", len(ta), len(tb), count=len(parts))]


def _users(side: _Side, pairs: list) -> dict:
    """How many inodes of the image carry each pair (shared or inline).

    Shared uses are counted during the walk; inline ones by a second pass over the inodes
    whose xattr body holds the pair's encoded entry (parsed to be sure)."""
    from cfsc.backends.erofs.xattrs import entry, key_info  # start-up: only here; `cfsc diff` ~0.8 ms less

    users = {pair: sum(n for ids, n in side.id_users.items() if pair in side.ids[ids]) for pair in pairs}
    wanted = {entry(*key_info(k)[:2], v): (k, v) for k, v in pairs}
    if not wanted:
        return users
    data = side.data
    seen = side.seen
    nid = seen.find(1)
    while nid >= 0:
        off, isize, xsize = side.head(nid)
        if xsize:
            body = bytes(data[off + isize:off + isize + xsize])
            for encoded, pair in wanted.items():
                if encoded in body and pair in side.inline(nid):
                    users[pair] += 1
        nid = seen.find(1, nid + 1)
    return users


def _first_difference(a, b) -> int:
    n = min(len(a), len(b))
    for start in range(0, n, 1 << 16):
        end = min(start + (1 << 16), n)
        chunk_a, chunk_b = bytes(a[start:end]), bytes(b[start:end])
        if chunk_a != chunk_b:
            return start + next(i for i in range(end - start) if chunk_a[i] != chunk_b[i])
    return n


def _where(side: _Side, offset: int) -> str:
    image = side.image
    if offset >= len(image.data):
        return "past the end of the first image"
    if offset < COMPOSEFS_HEADER.size:
        return f"composefs header ({_field_at(COMPOSEFS_HEADER, offset)})"
    if EROFS_SUPER_OFFSET <= offset < EROFS_SUPER_OFFSET + EROFS_SUPER_BLOCK.size:
        return f"superblock ({_field_at(EROFS_SUPER_BLOCK, offset - EROFS_SUPER_OFFSET)})"
    if offset < EROFS_SUPER_OFFSET:
        return "padding before the superblock"
    start, nid, path = side.near
    if nid >= 0:
        raw = image.inode(nid)
        layout = EROFS_INODE_EXTENDED if raw.extended else EROFS_INODE_COMPACT
        at = offset - start
        if at < layout.size + raw.xattr_size + raw.tail_size:
            part = (_field_at(layout, at) if at < layout.size
                    else "its xattrs" if at < layout.size + raw.xattr_size else "its inline data")
            return f"the inode of {path.decode('utf-8', 'backslashreplace')} (nid {nid}), {part}"
    if side.table:
        area = image.xattr_base + EROFS_XATTR_ALIGN * min(side.table)
        data_start = -(-(image.xattr_base + EROFS_XATTR_ALIGN * (max(side.table) + 1)) // EROFS_BLKSIZ) * EROFS_BLKSIZ
        if area <= offset < data_start:
            return "the shared xattr table"
    block = offset // EROFS_BLKSIZ
    for first, (count, owner) in side.blocks.items():
        if first <= block < first + count:
            return f"a directory block of {owner.decode('utf-8', 'backslashreplace')} (block {block})"
    if nid >= 0 and block == start // EROFS_BLKSIZ:
        return "padding between inodes"
    return f"data block {block}"


def _field_at(layout: Layout, offset: int) -> str:
    for name, (at, size) in layout.offsets.items():
        if at <= offset < at + size:
            return name
    return "reserved bytes"
