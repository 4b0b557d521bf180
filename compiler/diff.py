"""Diff two sources: entries added, removed and changed, attribute by attribute.

Both sides are manifests (`cfsc.manifest`): the image each source is or compiles to, as a
user sees it, so any two sources compare (a directory with the image built from it, a dumpfile
with a CRFS TOC …).  The walk goes breadth-first from the root and descends only into
directories whose fingerprints differ; a level's directories are asked for in one batch, so a
side held by a worker process answers while this one works.

A change lists its attributes as `(field, key, a, b)`: one per differing field (`FIELDS` of
`cfsc.manifest`, minus `--ignore`d ones) and one per differing xattr (`field == "xattr"`,
`key` = the xattr's key, None on the side that lacks it).  `hardlinks` is every path of the
entry's inode when it has several (a split, a merge or a moved link changes it).

`where` (a `cfsc.query.Query`) keeps the changes whose entry matches on either side, looking
at the entry's real attributes (ignored ones too: `--ignore` only hides attributes from the
comparison); exit status and summary count only those.  Two images whose trees are equal may still differ in
bytes: `Report.layout` then says why (`cfsc.explain`) and, unless `layout` is ignored, that
counts as a difference.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .errors import CfscError
from .jsonbytes import put
from .manifest import FIELDS, Ignore, Manifest, Record, open_pair
from .options import Options
from .query import Query
from .tree import S_IFLNK, S_IFMT, S_IFREG

TYPE_BITS = {"reg": 0o100000, "dir": 0o040000, "symlink": 0o120000, "block": 0o060000,
             "char": 0o020000, "fifo": 0o010000, "socket": 0o140000, "whiteout": 0o020000}


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
    layout: list | None = None  # reasons (`cfsc.explain.Reason`) when image bytes differ
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
        self.rdev = 0 if kind == "whiteout" else rdev
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


def _order(change: Change) -> list[bytes]:
    return change.path.split(b"/")


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


def diff(a_source, b_source, options: Options | None = None, fmt: str | None = None,
         ignore: Ignore | None = None, where: Query | None = None, explain: bool = False,
         parallel: bool | None = None) -> Report:
    """Compare two sources; `explain` also compares image bytes when a side is not an image.

    A side is a source, or a tuple of tar layers (bottom first; `cfsc.manifest.layers`)."""
    options = options or Options()
    ignore = ignore or Ignore()
    count_layout = "layout" not in ignore.names
    data = None
    layered = isinstance(a_source, tuple) or isinstance(b_source, tuple)
    if not explain and not layered:
        from .manifest import detect

        if fmt == "dump" or fmt is None and detect(a_source) == detect(b_source) == "dump":
            from . import dump_delta
            from .manifest import load
            from .streams import read_all, source_name

            data = read_all(a_source), read_all(b_source)
            small = dump_delta.reduce(data[0], data[1], options)
            if small is not None:  # only the lines that differ, with their context
                try:
                    a = load(source_name(a_source), options, "dump", ignore, small[0])
                    b = load(source_name(b_source), options, "dump", ignore, small[1])
                except CfscError:
                    pass  # a differing line is bad: the whole files give the error its line number
                else:
                    return compare(a, b, where, False, count_layout)
            fmt = "dump"
    a, b = open_pair(a_source, b_source, options, fmt, ignore, parallel, data)
    try:
        return compare(a, b, where, explain, count_layout)
    finally:
        a.close()
        b.close()


def compare(a, b, where: Query | None = None, explain: bool = False, count_layout: bool = True) -> Report:
    """The report for two open manifests (`Manifest` or `RemoteManifest`)."""
    from .fsverity import digest_bytes

    changes = diff_manifests(a, b, where)
    report = Report(Side(a.name, a.fmt), Side(b.name, b.fmt), a.fields, changes, count_layout=count_layout)
    if explain or (a.fmt == "image" and b.fmt == "image"):
        from . import explain as why
        from .backends.erofs.reader import Image

        b.start("image")
        a.start("image")
        data_a, data_b = a.finish(), b.finish()
        report.a.digest = digest_bytes(data_a)
        report.b.digest = digest_bytes(data_b)
        if data_a != data_b:
            report.layout = why.explain(Image(data_a, a.name), Image(data_b, b.name), tree_changes=len(changes))
    return report


def diff_images(a_image, b_image, where: Query | None = None, ignore: Ignore | None = None) -> Report:
    """Compare two images held in memory (`Image`), e.g. two compilations of one source."""
    from .backends.erofs.reader import Image
    from .frontends.image import read_tree

    ignore = ignore or Ignore()
    sides = []
    for image in (a_image, b_image):
        if not isinstance(image, Image):
            image = Image(image)
        sides.append(Manifest(read_tree(image), False, ignore, image.name, "image", image))
    return compare(sides[0], sides[1], where, count_layout="layout" not in ignore.names)


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
