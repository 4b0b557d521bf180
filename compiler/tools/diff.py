"""Diff two sources: entries added, removed and changed, attribute by attribute.

Both sides are manifests (`cfsc.tools.manifest`): the image each source is or compiles to, as a
user sees it, so any two sources compare (a directory with the image built from it, a dumpfile
with a CRFS TOC …).  The walk goes breadth-first from the root and descends only into
directories whose fingerprints differ; a level's directories are asked for in one batch, so a
side held by a worker process answers while this one works.

A change lists its attributes as `(field, key, a, b)`: one per differing field (`FIELDS` of
`cfsc.tools.manifest`, minus `--ignore`d ones) and one per differing xattr (`field == "xattr"`,
`key` = the xattr's key, None on the side that lacks it).  `hardlinks` is every path of the
entry's inode when it has several (a split, a merge or a moved link changes it).

Two images need no manifests: equal bytes are equal trees, and otherwise both are walked in
step (`diff_in_step`), parsing only the inodes whose bytes differ, into the records a manifest
would hold (a property test holds the two paths to the same changes).  Two dumpfiles are cut
down to the lines they do not share first (`Frontend.delta`: `cfsc.frontends.dumpfile_delta`).

`where` (a `cfsc.base.query.Query`) keeps the changes whose entry matches on either side, looking
at the entry's real attributes (ignored ones too: `--ignore` only hides attributes from the
comparison); exit status and summary count only those.  Two images whose trees are equal may
still differ in bytes: `Report.layout` then says why (`cfsc.tools.explain`, run beside the tree
comparison in a worker process when the images are big) and, unless `layout` is ignored,
that counts as a difference; ignored, the reasons are not worked out (`--explain` still asks).
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from collections import Counter
from dataclasses import dataclass, field

from cfsc import frontends
from cfsc.backends.erofs.layout import (
    EROFS_BLKSIZ,
    EROFS_I_DATALAYOUT_BIT,
    EROFS_I_DATALAYOUT_MASK,
    EROFS_INODE_COMPACT,
    EROFS_INODE_EXTENDED,
    EROFS_INODE_FLAT_INLINE,
    EROFS_INODE_FLAT_PLAIN,
    EROFS_SLOTSIZE,
    EROFS_XATTR_ALIGN,
)
from cfsc.backends.erofs.reader import Image, merge_sorted
from cfsc.base.errors import CfscError
from cfsc.base.fsverity import digest_bytes
from cfsc.base.jsonbytes import put
from cfsc.base.limits import INLINE_CONTENT_MAX, PATH_MAX, VALID_TYPES
from cfsc.base.options import Options, reshapes
from cfsc.base.query import Query
from cfsc.base.streams import read_all, source_name
from cfsc.base.tree import FILE_TYPE_BITS, S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, WHITEOUT
from cfsc.frontends.image import read_tree
from cfsc.tools.explain import I_INO_END, I_U, IBODY_HEADER, SHARED_COUNT, inode_head, tree_reason
from cfsc.tools.explain import explain as explain_bytes
from cfsc.tools.manifest import FIELDS, Ignore, ImageRecords, Manifest, Record, RemoteError, detect, load, open_pair

TYPE_BITS = {**FILE_TYPE_BITS, WHITEOUT: S_IFCHR}  # a record's type name -> mode bits
# Single inode fields read from raw bytes (`inode_head` tells the layout by its size).
_FORMAT = EROFS_INODE_COMPACT.field("i_format")
_MODE = EROFS_INODE_COMPACT.field("i_mode")  # (same place in both layouts)
_I_U = EROFS_INODE_COMPACT.field("i_u")
I_U_END = EROFS_INODE_COMPACT.end("i_u")
_NLINK = {layout.size: layout.field("i_nlink") for layout in (EROFS_INODE_COMPACT, EROFS_INODE_EXTENDED)}
_SIZE = {layout.size: layout.field("i_size") for layout in (EROFS_INODE_COMPACT, EROFS_INODE_EXTENDED)}
_COMPACT = EROFS_INODE_COMPACT.size


@dataclass(slots=True)
class Change:
    path: bytes
    kind: str  # "added", "removed" or "changed"
    a: Record | None
    b: Record | None
    attributes: list[tuple[str, bytes | None, object, object]] = field(default_factory=list)


@dataclass(slots=True)
class Side:
    name: str
    format: str
    digest: bytes | None = None  # fs-verity digest, when the side is an image


@dataclass
class Report:
    a: Side
    b: Side
    fields: tuple[str, ...]
    changes: list[Change]
    layout: list | None = None  # reasons (`cfsc.tools.explain.Reason`) when image bytes differ
    count_layout: bool = True

    @property
    def identical(self) -> bool:
        if self.changes:
            return False
        return not (self.count_layout and self.a.digest is not None and self.b.digest is not None
                    and self.a.digest != self.b.digest)

    def summary(self) -> dict:
        kinds = Counter(c.kind for c in self.changes)
        attributes: Counter = Counter()
        for c in self.changes:
            attributes.update({name for name, _key, _a, _b in c.attributes})
        return {"added": kinds["added"], "removed": kinds["removed"], "changed": kinds["changed"],
                "attributes": dict(sorted(attributes.items()))}


class RecordEntry:
    """A whole record (every field of `FIELDS`) seen through the attribute names a query uses
    (those of `Inode`)."""

    __slots__ = ("mode", "uid", "gid", "size", "mtime", "mtime_nsec", "nlink", "rdev", "payload",
                 "content", "digest", "xattrs")

    def __init__(self, rec: Record) -> None:
        (kind, mode, self.uid, self.gid, rdev, self.mtime, self.mtime_nsec, self.size, self.nlink,
         target, payload, self.digest, self.content, xattrs, _links) = rec
        self.mode = TYPE_BITS.get(kind, 0) | mode
        self.rdev = 0 if kind == WHITEOUT else rdev
        ftype = self.mode & S_IFMT
        self.payload = target if ftype == S_IFLNK else payload if ftype == S_IFREG else None
        self.xattrs = xattrs or ()


def attribute_changes(fields: tuple[str, ...], a: Record, b: Record) -> list[tuple[str, bytes | None, object, object]]:
    out: list[tuple[str, bytes | None, object, object]] = []
    for name, va, vb in zip(fields, a, b, strict=True):
        if va == vb:
            continue
        if name == "xattrs":
            da, db = dict(va), dict(vb)
            for key in sorted(da.keys() | db.keys()):
                xa, xb = da.get(key), db.get(key)
                if xa != xb:
                    out.append(("xattr", key, xa, xb))
        else:
            out.append((name, None, va, vb))
    return out


def _join(parent: bytes, name: bytes) -> bytes:
    return (parent if parent != b"/" else b"") + b"/" + name


def _order(change: Change) -> bytes:
    """Depth-first path order: component by component, which is byte order with the `/`s as
    the lowest byte (names hold no NUL).  One bytes object a change, not a list of its parts:
    split, a 10k-deep one-sided subtree's keys took 400 MB."""
    return change.path.replace(b"/", b"\0")


def diff_manifests(a, b, where: Query | None = None) -> list[Change]:
    """Every difference between two manifests (local or remote), in depth-first path order.

    Records come whole; what is compared and reported is their projection (`--ignore`)."""
    fields = a.fields
    project = a.project or (lambda rec: rec)
    whole = a.project is None
    changes: list[Change] = []

    def keep(path: bytes, ra: Record | None, rb: Record | None) -> bool:
        if where is None:
            return True
        return ((ra is not None and where(path, RecordEntry(ra)))
                or (rb is not None and where(path, RecordEntry(rb))))

    def changed(path: bytes, ra: Record, rb: Record) -> None:
        if whole:
            pa, pb = ra, rb
        else:
            pa, pb = project(ra), project(rb)
            if pa == pb:
                return
        if keep(path, ra, rb):
            changes.append(Change(path, "changed", pa, pb, attribute_changes(fields, pa, pb)))

    def added(path: bytes, rec: Record) -> None:
        if keep(path, None, rec):
            changes.append(Change(path, "added", None, project(rec)))

    def removed(path: bytes, rec: Record) -> None:
        if keep(path, rec, None):
            changes.append(Change(path, "removed", project(rec), None))

    ra, fa = a.root()
    rb, fb = b.root()
    if ra != rb:
        changed(b"/", ra, rb)
    pending = [b"/"] if fa != fb else []
    while pending:
        b.start("listings", pending)
        a.start("listings", pending)
        lists_a, lists_b = a.finish(), b.finish()
        deeper: list[bytes] = []
        only_a: list[bytes] = []  # directories whose whole subtree is removed
        only_b: list[bytes] = []  # … added
        for parent, items_a, items_b in zip(pending, lists_a, lists_b, strict=True):
            by_name_b = {name: (rec, fp) for name, rec, fp in items_b}
            for name, rec_a, fp_a in items_a:
                path = _join(parent, name)
                hit = by_name_b.pop(name, None)
                if hit is None:
                    removed(path, rec_a)
                    if fp_a is not None:
                        only_a.append(path)
                    continue
                rec_b, fp_b = hit
                if rec_a != rec_b:
                    changed(path, rec_a, rec_b)
                if fp_a is not None and fp_b is not None:
                    if fp_a != fp_b:
                        deeper.append(path)
                elif fp_a is not None:
                    only_a.append(path)
                elif fp_b is not None:
                    only_b.append(path)
            for name, (rec_b, fp_b) in by_name_b.items():
                path = _join(parent, name)
                added(path, rec_b)
                if fp_b is not None:
                    only_b.append(path)
        if only_a or only_b:
            b.start("below", only_b)
            a.start("below", only_a)
            below_a, below_b = a.finish(), b.finish()
            for entries in below_a:
                for path, rec in entries:
                    removed(path, rec)
            for entries in below_b:
                for path, rec in entries:
                    added(path, rec)
        pending = deeper
    changes.sort(key=_order)
    return changes


# -- two images walked in step ------------------------------------------------------------------

class _Unsuited(Exception):
    """The images need the general path: a directory reached twice, a root that is not a
    directory, or more bytes to compare than the images hold (a hostile image)."""


class _Walk:
    """One image as `diff_in_step` walks it: inodes read from their bytes, shared xattr runs
    resolved once each, and every path of each non-directory inode that has several names
    (for `hardlinks`)."""

    def __init__(self, image) -> None:
        self.image = image
        self.data = image.data
        self.size = len(image.data)
        self.pairs: dict[bytes, tuple] = {}  # packed shared ids -> the pairs they name
        self.seen = bytearray(len(image.data) // EROFS_SLOTSIZE + 1)  # nids reached
        self.paths: dict[int, list[bytes]] = {}  # nid -> its paths, for inodes with nlink > 1
        self.records = ImageRecords(image)

    def kind(self, nid: int, head: tuple[int, int, int]) -> int | None:
        """The inode's file type, None for a whiteout the image hides.  An invalid one is for
        the reader to report (`_Unsuited`)."""
        data = self.data
        off = head[0]
        ftype = _MODE.unpack_from(data, off)[0] & S_IFMT
        if ftype not in VALID_TYPES:
            raise _Unsuited
        if ftype == S_IFCHR and not _I_U.unpack_from(data, off)[0]:
            return None
        return ftype

    def reached(self, path: bytes, nid: int, head: tuple[int, int, int], directory: bool) -> None:
        """Note an entry; a directory or an inode of nlink 1 reached twice is `_Unsuited`
        (another writer's image: the general path homes its links)."""
        if self.seen[nid]:
            names = self.paths.get(nid)
            if names is None or directory:
                raise _Unsuited
            names.append(path)
            return
        self.seen[nid] = 1
        if not directory:
            off, isize, _x = head
            if _NLINK[isize].unpack_from(self.data, off)[0] > 1:
                self.paths[nid] = [path]

    def shared(self, nid: int, ids: bytes) -> tuple:
        pairs = self.pairs.get(ids)
        if pairs is None:
            pairs = self.pairs[ids] = tuple(self.image.split_xattrs(self.image.inode(nid))[2])
        return pairs

    def links(self) -> dict[bytes, tuple]:
        """path -> every path of its inode (sorted), for inodes with several."""
        out: dict[bytes, tuple] = {}
        for paths in self.paths.values():
            if len(paths) > 1:
                group = tuple(sorted(paths))
                out.update(dict.fromkeys(group, group))
        return out

    def below(self, top: bytes, nid: int, out: list) -> None:
        """`(path, nid)` of everything below a directory only this image has, depth-first."""
        image = self.image
        stack = [(top, iter(image.dirents(image.inode(nid))))]
        while stack:
            prefix, it = stack[-1]
            for name, child, _t in it:
                head = inode_head(image, child)
                ftype = self.kind(child, head)
                if ftype is None:
                    continue
                path = prefix + b"/" + name
                self.reached(path, child, head, ftype == S_IFDIR)
                out.append((path, child))
                if ftype == S_IFDIR:
                    stack.append((path, iter(image.dirents(image.inode(child)))))
                    break
            else:
                stack.pop()


def _same_inode(wa: _Walk, na: int, ha: tuple, wb: _Walk, nb: int, hb: tuple, same_time: bool) -> int:
    """Whether two inodes read back alike (hard links aside), judged from their bytes (`head`:
    offset, inode and xattr sizes): the inode but `i_ino` (and `i_u` where it is an address),
    the xattrs (shared ones as the pairs they name) and a file's or symlink's data.  Returns
    the bytes compared, 0 if they differ or may (the caller parses them).  Bytes both images
    share are compared, not checked: a defect in them is for `cfsc info` or `compile` to report."""
    off_a, isize, xsize = ha
    off_b, isize_b, _xsize_b = hb
    da, db = wa.data, wb.data
    if (isize != isize_b or da[off_a:off_a + I_U] != db[off_b:off_b + I_U]
            or da[off_a + I_INO_END:off_a + isize] != db[off_b + I_INO_END:off_b + isize]):
        return 0
    if isize == _COMPACT and not same_time:
        return 0  # a compact inode's mtime is the image's build time
    end_a, end_b = off_a + isize + xsize, off_b + isize + xsize
    if end_a > wa.size or end_b > wb.size:
        return 0
    if xsize:
        n = da[off_a + isize + SHARED_COUNT]
        if db[off_b + isize + SHARED_COUNT] != n:  # the split between ids and entries
            return 0
        ids = isize + IBODY_HEADER
        start = ids + EROFS_XATTR_ALIGN * n
        if start > isize + xsize or da[off_a + start:end_a] != db[off_b + start:end_b]:
            return 0
        if n and wa.shared(na, bytes(da[off_a + ids:off_a + start])) != wb.shared(
                nb, bytes(db[off_b + ids:off_b + start])):
            return 0
    ftype = _MODE.unpack_from(da, off_a)[0] & S_IFMT
    if ftype != S_IFREG and ftype != S_IFLNK:
        if (ftype == S_IFCHR or ftype == S_IFBLK) and da[off_a + I_U:off_a + I_U_END] != db[off_b + I_U:off_b + I_U_END]:
            return 0  # i_u is the device number
        return isize + xsize
    size = _SIZE[isize].unpack_from(da, off_a)[0]
    layout = _FORMAT.unpack_from(da, off_a)[0] >> EROFS_I_DATALAYOUT_BIT & EROFS_I_DATALAYOUT_MASK
    if not size or ftype == S_IFREG and layout not in (EROFS_INODE_FLAT_PLAIN, EROFS_INODE_FLAT_INLINE):
        return isize + xsize  # no data in the image (a chunk index: the backing file holds it)
    if size > (PATH_MAX if ftype == S_IFLNK else INLINE_CONTENT_MAX) or layout not in (
            EROFS_INODE_FLAT_PLAIN, EROFS_INODE_FLAT_INLINE):
        return 0  # (the reader decides what is wrong)
    tail = (size - 1) % EROFS_BLKSIZ + 1 if layout == EROFS_INODE_FLAT_INLINE else 0
    if da[end_a:end_a + tail] != db[end_b:end_b + tail]:
        return 0
    blocks = size - tail
    if blocks:
        at_a = _I_U.unpack_from(da, off_a)[0] * EROFS_BLKSIZ
        at_b = _I_U.unpack_from(db, off_b)[0] * EROFS_BLKSIZ
        if at_a + blocks > wa.size or at_b + blocks > wb.size or da[at_a:at_a + blocks] != db[at_b:at_b + blocks]:
            return 0
    return isize + xsize + size


def diff_in_step(a_image, b_image, fields: tuple[str, ...], project, where: Query | None = None) -> list[Change]:
    """`diff_manifests` for two images, without reading either as a tree: both are walked in
    step, directory by directory, and only inodes whose bytes differ are parsed into records
    (`_same_inode`).  Raises `_Unsuited` when the general path is needed."""
    wa, wb = _Walk(a_image), _Walk(b_image)
    same_time = (a_image.build_time, a_image.build_time_nsec) == (b_image.build_time, b_image.build_time_nsec)
    budget = wa.size + wb.size  # bytes compared, at most: else something points many times at much
    differ: dict[bytes, tuple[int, int]] = {}  # path -> the nids of an entry both have, if they may differ
    linked: dict[bytes, tuple[int, int]] = {}  # … of hard-linked non-directories that compare alike
    only_a: list[tuple[bytes, int]] = []
    only_b: list[tuple[bytes, int]] = []
    root_a, root_b = a_image.inode(a_image.root_nid), b_image.inode(b_image.root_nid)
    if root_a.mode & S_IFMT != S_IFDIR or root_b.mode & S_IFMT != S_IFDIR:
        raise _Unsuited
    head_a, head_b = inode_head(a_image, root_a.nid), inode_head(b_image, root_b.nid)
    wa.reached(b"/", root_a.nid, head_a, True)
    wb.reached(b"/", root_b.nid, head_b, True)
    if not _same_inode(wa, root_a.nid, head_a, wb, root_b.nid, head_b, same_time):
        differ[b"/"] = (root_a.nid, root_b.nid)
    stack = [(b"", root_a, root_b)]
    while stack:
        prefix, dir_a, dir_b = stack.pop()
        for name, ea, eb in merge_sorted(a_image.dirents(dir_a), b_image.dirents(dir_b)):
            nid_a = ea[1] if ea is not None else None
            nid_b = eb[1] if eb is not None else None
            head_a = inode_head(a_image, nid_a) if nid_a is not None else None
            head_b = inode_head(b_image, nid_b) if nid_b is not None else None
            type_a = wa.kind(nid_a, head_a) if head_a is not None else None
            type_b = wb.kind(nid_b, head_b) if head_b is not None else None
            if type_a is None and type_b is None:
                continue  # (whiteouts both images hide)
            path = prefix + b"/" + name
            if type_a is not None:
                wa.reached(path, nid_a, head_a, type_a == S_IFDIR)
            if type_b is not None:
                wb.reached(path, nid_b, head_b, type_b == S_IFDIR)
            if type_a is None or type_b is None:
                walk, nid, out = (wa, nid_a, only_a) if type_a is not None else (wb, nid_b, only_b)
                out.append((path, nid))
                if (type_a or type_b) == S_IFDIR:
                    walk.below(path, nid, out)
                continue
            compared = _same_inode(wa, nid_a, head_a, wb, nid_b, head_b, same_time)
            budget -= compared
            if budget < 0:
                raise _Unsuited
            if not compared:
                differ[path] = (nid_a, nid_b)
            elif type_a != S_IFDIR and (nid_a in wa.paths or nid_b in wb.paths):
                linked[path] = (nid_a, nid_b)
            if type_a == S_IFDIR and type_b == S_IFDIR:
                stack.append((path, a_image.inode(nid_a), b_image.inode(nid_b)))
            elif type_a == S_IFDIR:
                wa.below(path, nid_a, only_a)
            elif type_b == S_IFDIR:
                wb.below(path, nid_b, only_b)
    links_a, links_b = wa.links(), wb.links()
    for path, nids in linked.items():  # alike, but for their hard links?
        if links_a.get(path) != links_b.get(path):
            differ[path] = nids
    # The records, and the changes `diff_manifests` would report.
    shown = project or (lambda rec: rec)
    changes: list[Change] = []

    def keep(path: bytes, ra: Record | None, rb: Record | None) -> bool:
        return where is None or (ra is not None and where(path, RecordEntry(ra))) or (
            rb is not None and where(path, RecordEntry(rb)))

    for path, (na, nb) in differ.items():
        ra = wa.records.record(na, links_a.get(path))
        rb = wb.records.record(nb, links_b.get(path))
        pa, pb = shown(ra), shown(rb)
        if pa != pb and keep(path, ra, rb):
            changes.append(Change(path, "changed", pa, pb, attribute_changes(fields, pa, pb)))
    for path, nid in only_a:
        rec = wa.records.record(nid, links_a.get(path))
        if keep(path, rec, None):
            changes.append(Change(path, "removed", shown(rec), None))
    for path, nid in only_b:
        rec = wb.records.record(nid, links_b.get(path))
        if keep(path, None, rec):
            changes.append(Change(path, "added", None, shown(rec)))
    changes.sort(key=_order)
    return changes


def diff(a_source, b_source, options: Options | None = None, fmt: str | None = None,
         ignore: Ignore | None = None, where: Query | None = None, explain: bool = False,
         parallel: bool | None = None) -> Report:
    """Compare two sources; `explain` also compares image bytes when a side is not an image.

    A side is a source, or a tuple of tar layers (bottom first; `cfsc.tools.manifest.layers`).
    Two images are compared in step (`diff_images`), two dumpfiles by the lines they do not
    share (`Frontend.delta`) when they can be; anything else as two manifests."""
    options = options or Options()
    ignore = ignore or Ignore()
    count_layout = "layout" not in ignore.names
    data = None
    if not isinstance(a_source, tuple) and not isinstance(b_source, tuple):
        kinds = (fmt, fmt) if fmt is not None else (detect(a_source), detect(b_source))
        fa, fb = frontends.get(kinds[0]), frontends.get(kinds[1])
        if fa.image and fb.image and not reshapes(options, "image"):
            return diff_images(Image.open(a_source), Image.open(b_source), where, ignore, explain)
        if fa is fb and fa.delta is not None and not explain:
            data = read_all(a_source), read_all(b_source)
            small = frontends.function(fa.delta)(data[0], data[1], options)
            if small is not None:  # only the parts that differ, with their context
                try:
                    a = load(source_name(a_source), options, fa.name, ignore, small[0])
                    b = load(source_name(b_source), options, fa.name, ignore, small[1])
                except CfscError:
                    pass  # a differing line is bad: the whole files give the error its line number
                else:
                    return compare(a, b, where, False, count_layout)
            fmt = fa.name
    a, b = open_pair(a_source, b_source, options, fmt, ignore, parallel, data)
    try:
        return compare(a, b, where, explain, count_layout)
    finally:
        a.close()
        b.close()


def compare(a, b, where: Query | None = None, explain: bool = False, count_layout: bool = True) -> Report:
    """The report for two open manifests (`Manifest` or `RemoteManifest`)."""
    changes = diff_manifests(a, b, where)
    report = Report(Side(a.name, a.fmt), Side(b.name, b.fmt), a.fields, changes, count_layout=count_layout)
    if explain or (frontends.get(a.fmt).image and frontends.get(b.fmt).image):
        b.start("image")
        a.start("image")
        data_a, data_b = a.finish(), b.finish()
        _layout(report, Image(data_a, a.name), Image(data_b, b.name), explain or count_layout)
    return report


def _layout(report: Report, a_image, b_image, why: bool) -> None:
    """Both images' digests and, if asked (`why`: the layout counts, or --explain), why their
    bytes differ."""
    report.a.digest = digest_bytes(a_image.data)
    report.b.digest = digest_bytes(b_image.data)
    if why and report.a.digest != report.b.digest:
        report.layout = explain_bytes(a_image, b_image, tree_changes=len(report.changes),
                                        digests=(report.a.digest, report.b.digest))


def diff_images(a_image, b_image, where: Query | None = None, ignore: Ignore | None = None,
                explain: bool = False) -> Report:
    """Compare two images (`Image`s, or their bytes), e.g. two compilations of one source.

    Equal bytes are equal trees; otherwise both are walked in step (`diff_in_step`), or, for
    images that need it, read as trees and compared as manifests."""
    ignore = ignore or Ignore()
    a_image, b_image = (x if isinstance(x, Image) else Image(x) for x in (a_image, b_image))
    count_layout = "layout" not in ignore.names
    digests = digest_bytes(a_image.data), digest_bytes(b_image.data)
    if digests[0] == digests[1]:
        changes: list[Change] = []
        reasons = None
    else:
        reasons = _aside(explain_bytes, a_image, b_image, 0, digests) if count_layout or explain else None
        try:
            try:
                changes = diff_in_step(a_image, b_image, ignore.fields, ignore.projection(), where)
            except _Unsuited:
                sides = [Manifest(read_tree(x), False, ignore, x.name, "image", x) for x in (a_image, b_image)]
                changes = diff_manifests(sides[0], sides[1], where)
        except BaseException:  # the fallback too: the worker must not outlive a failure
            if reasons is not None:
                reasons(cancel=True)
            raise
    report = Report(Side(a_image.name, "image", digests[0]), Side(b_image.name, "image", digests[1]), ignore.fields,
                    changes, count_layout=count_layout)
    if reasons is not None:
        report.layout = reasons()
        if changes:
            report.layout.insert(1, tree_reason(len(changes)))  # (after the digests)
    return report


ASIDE_MIN = 4 << 20  # image bytes below which a worker process costs more than it saves


def _aside(function, a_image, b_image, *args):
    """Run `function(a_image, b_image, *args)` in a forked worker when two CPUs are there and
    the images are big enough, else here; returns `result(cancel=False)`, which waits for it."""
    if len(a_image.data) + len(b_image.data) < ASIDE_MIN or len(os.sched_getaffinity(0)) < 2:
        value = function(a_image, b_image, *args)
        return lambda cancel=False: value
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def work() -> None:
        try:
            send.send(("ok", function(a_image, b_image, *args)))
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
            code = e.exit_code if isinstance(e, CfscError) else 1
            send.send(("error", str(e) if isinstance(e, CfscError) else f"{type(e).__name__}: {e}", code,
                       traceback.format_exc()))

    proc = ctx.Process(target=work, daemon=True)
    proc.start()
    send.close()

    def result(cancel: bool = False):
        try:
            if cancel:
                proc.kill()
                return None
            try:
                reply = receive.recv()
            except EOFError:
                raise CfscError(f"the worker process died (exit status {proc.exitcode})") from None
            if reply[0] == "error":
                raise RemoteError(*reply[1:])
            return reply[1]
        finally:
            receive.close()
            proc.join()

    return result


# -- JSON (schema: `cfsc schema diff-report`) ------------------------------------------------

def _json_value(obj: dict, key: str, field_name: str, value) -> None:
    """Put one attribute value: bytes by the jsonbytes convention, digests in hex, paths as objects."""
    if value is None:
        obj[key] = None
    elif field_name == "digest":
        obj[key] = value.hex()
    elif field_name == "hardlinks":
        obj[key] = [_path_object(p) for p in value]
    elif field_name == "xattrs":
        items = []
        for k, v in value:
            item: dict = {}
            put(item, "key", k)
            put(item, "value", v)
            items.append(item)
        obj[key] = items
    elif isinstance(value, bytes):
        put(obj, key, value)
    else:
        obj[key] = value


def _path_object(path: bytes) -> dict:
    obj: dict = {}
    put(obj, "path", path)
    return obj


def entry_json(fields: tuple[str, ...], rec: Record) -> dict:
    obj: dict = {}
    for name, value in zip(fields, rec, strict=True):
        if value is not None and value != ():
            _json_value(obj, name, name, value)
    return obj


def change_json(fields: tuple[str, ...], change: Change) -> dict:
    obj = _path_object(change.path)
    obj["change"] = change.kind
    if change.a is not None:
        obj["a"] = entry_json(fields, change.a)
    if change.b is not None:
        obj["b"] = entry_json(fields, change.b)
    if change.kind == "changed":
        attributes = []
        for name, key, va, vb in change.attributes:
            item: dict = {"attribute": name}
            if key is not None:
                put(item, "key", key)
            _json_value(item, "a", name, va)
            _json_value(item, "b", name, vb)
            attributes.append(item)
        obj["attributes"] = attributes
    return obj


def reason_json(reason) -> dict:
    obj: dict = {"aspect": reason.aspect, "detail": reason.detail}
    if reason.a is not None or reason.b is not None:
        obj["a"], obj["b"] = reason.a, reason.b
    if reason.count:
        obj["count"] = reason.count
    if reason.paths:
        obj["paths"] = [_path_object(p) for p in reason.paths]
    return obj


def report_json(report: Report, changes: bool = True) -> dict:
    """The report as JSON data; `changes=False` leaves out the list (`--stat`)."""
    sides = {}
    for key, side in (("a", report.a), ("b", report.b)):
        sides[key] = {"source": side.name, "format": side.format}
        if side.digest is not None:
            sides[key]["digest"] = side.digest.hex()
    obj: dict = {**sides, "identical": report.identical,
                 "ignored": sorted(set(FIELDS) - set(report.fields)), "summary": report.summary()}
    if changes:
        obj["changes"] = [change_json(report.fields, c) for c in report.changes]
    if report.layout is not None:
        obj["layout"] = [reason_json(r) for r in report.layout]
    return obj


__all__ = ["FIELDS", "Change", "Report", "Side", "attribute_changes", "compare", "diff", "diff_images",
           "diff_manifests", "report_json"]
