"""CRFS / stargz / eStargz / zstd:chunked TOC JSON → tree: the old `composefs-from-json`, revived.

Input: `{"version": 1, "entries": [...]}`, one entry per tar member (`cfsc schema crfs-toc` is the
contract).  Semantics follow the legacy tool (inputs.md §1.5–1.10): entries are applied in order
to one tree, and several files behave like one concatenated list, so later entries update earlier
ones (metadata replaced, payload/content only when given, xattrs merged) and hard links may point
into earlier files; missing parents are `040755 0:0 mtime 0`; a `name` that reduces to nothing
is the root; `digest` `ALG:HEX` gives the payload `HE/X…` unless `x-payload` says otherwise;
`x-content` is the whole file inline (base64, sets the size); the backing store never supplies an
fs-verity digest unless `--payload-dir` points at it (`_add_digests`: payloads are opened confined
beneath it; one that is not there is skipped, one that is not a regular file or leads outside is
an error).  An update that brings new data (payload, size, inline content, a chunk that grows
the file) drops the fs-verity digest an earlier entry gave, unless it gives one itself.

Deliberate differences from the legacy tool, all errors where it silently made a broken tree:
unknown entry types, `..` components, mode file-type bits that contradict `type`, a hard link to
a directory or to a path that does not exist yet, invalid base64 (the legacy decoder skipped
junk and dropped unpadded tails) and times that are not RFC 3339 (the legacy parser lost
fractions and, with a fraction, the zone offset; here fractions are kept to the nanosecond).
Hard-link targets are cleaned like names (legacy: `./x` failed).  An entry that changes the file
type of an existing path replaces it (a directory only while it is empty).  A later entry other
than `hardlink` for a name a `hardlink` entry made gives that name a new inode of its own, as tar
extraction does, and leaves the target alone (legacy: it updated the link node, which the writer
ignores); an update under the target's own name still shows under every name, as in the legacy
tool.  `digest` of any algorithm loses its `ALG:` prefix (legacy stripped only `sha256:`, so
`sha512:ab…` became the payload `sh/a512:ab…`).  The legacy tool predates format version 1, which
mkcomposefs 1.0.8 picks for a tree with whiteouts: its recorded digest of
conformance/crfs-legacy/special.json is reproduced with `--max-version 0`.

Extensions (documented in the schema): bytes that are not UTF-8 travel in base64 twin keys
`x-name-b64`, `x-linkName-b64`, `x-payload-b64` and `x-xattrs-b64` (`{b64 key: b64 value}`, for
xattr names), following `cfsc.base.jsonbytes`; `x-fsverity-digest`, `x-mtime` (`[sec, nsec]` for
times RFC 3339 cannot hold), `x-nlink` and type `socket` make every tree expressible, so
`cfsc dump --format crfs` (`cfsc.backends.crfs`) round-trips any image.

Errors: every bad entry is reported (up to MAX_ERRORS lines, then a count), as
`FILE: entries[12].mode: expected …`.  A key given twice in one object is an error at its
JSON path (`entries[3].name`, `version`), in any document and however it is read: JSON
readers disagree on which value counts (`jsonslices.duplicate_keys`); an entry with one is
not applied, and `entries` given twice stops the reading.  A problem that stops the reading of
a document (invalid JSON, `entries` twice, an entry of more than ENTRY_MAX bytes of text)
drops what the document's entries reported before it, so a big document, read in slices,
and a small one, parsed first, give the same lines.  Values are checked in code, because jsonschema costs
~0.1 ms per entry (100 s for a million); only a rejected entry goes through jsonschema, for the
message.  tests/test_crfs.py checks that code and schema agree.

Speed: entries are checked a column at a time over batches of BATCH entries (`_Columns.batch`
in `cfsc.frontends.crfs.columns`) and only placing nodes is done entry by entry; anything unusual (extensions, hard links,
chunks, updates of an existing path, bad values) goes through `_Builder.apply`, the one
reference for semantics and messages.  Memory: a parsed 1M-entry TOC is ~2 GB of dicts, so the
file is read block by block and the entries array parsed in slices (`jsonslices`), each slice
dropped once applied; an entry whose text (white space included) runs past ENTRY_MAX is
refused rather than held.  A document the slicer cannot cut is parsed whole.
"""

from __future__ import annotations

import errno
import os
import re
from typing import NoReturn

import orjson
from cfsc import schemas
from cfsc.backends.crfs_format import CHUNK, GO_ZERO_TIME, HARDLINK, TYPES, twin
from cfsc.base import devices, limits, rfc3339, streams
from cfsc.base.errors import InputError, InputErrors, LookupFailed, TreeError, shown_path
from cfsc.base.options import Options
from cfsc.base.streams import read_all, source_name
from cfsc.base.tree import S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Inode, Tree
from cfsc.frontends.crfs.columns import BATCH, _Columns
from cfsc.frontends.crfs.fields import (
    _DIGEST, _FSVERITY, ABSENT, BAD_PLAN, S64, U32, U64, _b64, _Bad, _clean, _int, _integral, _payload, _plan, _text,
)
from cfsc.frontends.crfs.slices import ENTRY_MAX, SLICE_BYTES, EntrySlices, Oversized, Unsure, duplicate_keys

SCHEMA = "crfs-toc"
MAX_ERRORS = 20
CACHE_MAX = 1 << 16
NO_EXTENSIONS = (ABSENT,) * 5
_HEAD = re.compile(rb'\s*\{\s*(?:"version"\s*:\s*1\s*,\s*)?"entries"\s*:\s*\[')
_HEAD_TYPE = re.compile(rb'"type"\s*:\s*"(?:%s)"' % "|".join(TYPES).encode())


def sniff(head: bytes) -> bool:
    """A JSON object whose first key is `entries` (or `version` 1 then `entries`), holding
    objects with a CRFS `type`: not any JSON that happens to have such a key."""
    return _HEAD.match(head) is not None and _HEAD_TYPE.search(head) is not None


def _duplicate(source: str, path: list) -> str:
    return (f"{source}: {schemas.json_path(path)}: duplicate key: a JSON object may give a key once"
            " (readers disagree on which value counts)")


class _Builder(_Columns):
    """Entries → one tree, across any number of TOC files (`batch`, the fast path, is
    `_Columns.batch`; `apply` is the reference)."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.root = Inode(S_IFDIR | 0o755)
        self.dirs: dict[bytes, Inode] = {b"": self.root}  # clean path → directory
        self.last_file: Inode | None = None  # for chunk entries without a name
        self.plans: dict[tuple, tuple] = {}
        self.times: dict = {ABSENT: (0, 0)}  # modtime text → (sec, nsec)
        self.xattr_sets: dict[tuple, tuple] = {}  # raw JSON items → interned pairs
        self.interned: dict[tuple, tuple] = {}
        self.errors: list[str] = []
        self.n_errors = 0
        self.document_start = (0, 0)  # (len(errors), n_errors) when the current document began
        self.sources: list[str] = []

    # -- reporting ----------------------------------------------------------------------

    def report(self, line: str) -> None:
        self.n_errors += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(line)

    def fatal(self, line: str) -> NoReturn:
        """A document that cannot be read on: stop there (later files could only add errors
        that follow from its missing entries), but keep what earlier files reported.  What
        this document's entries reported is dropped: slices read before the problem was seen
        would report them for a big document and not for a small one (which is parsed before
        any entry is applied), and the problem makes them moot.  Its line is shown even past
        MAX_ERRORS: it is the one that stopped the reading."""
        del self.errors[self.document_start[0]:]
        self.n_errors = self.document_start[1] + 1
        raise InputErrors([*self.errors, line], self.n_errors)

    def rejected(self, entry, source: str, index: int) -> None:
        """Explain why `entry` failed the fast path: schema errors first, then the code's."""
        lines = schemas.problems(SCHEMA, entry, source, ["entries", index], "entry")
        if lines:
            for line in lines:
                self.report(line)
            return
        if isinstance(entry, dict):
            entry = {k: _integral(v) for k, v in entry.items()}
        try:
            self.apply(entry)
        except _Bad as e:
            self.report(f"{source}: {schemas.json_path(['entries', index, *e.path])}: {e.what}")

    def feed(self, entries: list, source: str, first: int = 0, dups: list | None = None) -> None:
        """Apply entries in order, in batches small enough to stay in the CPU cache while
        `batch` makes several passes over them.  An entry with a duplicate key (`dups`: JSON
        paths from entries[0]) is reported and not applied: its meaning depends on the reader."""
        if dups:
            bad: dict[int, list] = {}
            for path in dups:
                bad.setdefault(path[0], []).append(path)
            done = 0
            for index in sorted(bad):
                self.feed(entries[done:index], source, first + done)
                for path in bad[index]:
                    self.report(_duplicate(source, ["entries", first + index, *path[1:]]))
                done = index + 1
            entries, first = entries[done:], first + done
        for start in range(0, len(entries), BATCH):
            self.batch(entries[start:start + BATCH], source, first + start)

    def one(self, entry, source: str, index: int) -> None:
        try:
            self.apply(entry)
        except Exception:  # noqa: BLE001 - any surprise gets explained (schema, then code)
            self.rejected(entry, source, index)

    # -- one entry: the reference -----------------------------------------------------

    def apply(self, e) -> None:
        """Check one entry as it is read, then add it to the tree or update what is there."""
        if type(e) is not dict:
            raise _Bad([], "expected an object")
        keys = tuple(e)
        plan = self.plans.get(keys)
        if plan is None or plan is BAD_PLAN:
            plan = self.plans[keys] = _plan(keys)  # raises for unknown extension keys
        twins, has_rare, _keys = plan
        get = e.get

        t = get("type")
        kind = TYPES.get(t) if type(t) is str else None
        if kind is None:
            raise _Bad("type", f"expected one of {', '.join(TYPES)}")
        mode = get("mode", 0)
        if type(mode) is not int or not 0 <= mode <= 0o177777:
            raise _Bad("mode", "expected an integer from 0 to 65535")
        uid = get("uid", ABSENT)
        if uid is not ABSENT and (type(uid) is not int or not 0 <= uid <= U32):
            raise _Bad("uid", f"expected an integer from 0 to {U32}")
        gid = get("gid", ABSENT)
        if gid is not ABSENT and (type(gid) is not int or not 0 <= gid <= U32):
            raise _Bad("gid", f"expected an integer from 0 to {U32}")
        size = get("size", ABSENT)
        if size is not ABSENT and (type(size) is not int or not 0 <= size <= U64):
            raise _Bad("size", f"expected an integer from 0 to {U64}")
        when = get("modtime", ABSENT)
        if when is not ABSENT:
            text = when
            when = self.times.get(text) if type(text) is str else None
            if when is None:
                when = self.time(text)
        dev_major = get("devMajor", 0)
        dev_minor = get("devMinor", 0)
        if type(dev_major) is not int or type(dev_minor) is not int or dev_major or dev_minor:
            _int(dev_major, "devMajor", 0, devices.MAJOR_MAX)
            _int(dev_minor, "devMinor", 0, devices.MINOR_MAX)
        target = get("linkName", ABSENT)
        if target is not ABSENT and type(target) is not str:  # read only by links, typed always
            raise _Bad("linkName", "expected a string")
        xattrs = get("xattrs", ABSENT)
        if xattrs is not ABSENT or twins:
            xattrs = self.xattrs(xattrs, get(twin("xattrs"), ABSENT) if twins else ABSENT)
        payload = get("digest", ABSENT)
        if payload is not ABSENT:
            m = _DIGEST.fullmatch(payload) if type(payload) is str else None
            if m is None:
                raise _Bad("digest", "expected ALGORITHM:HEX (lower-case hex)")
            payload = _payload(payload) if kind == S_IFREG else ABSENT
        rare = self.extensions(e, kind, twins) if has_rare else NO_EXTENSIONS
        if rare[0] is not ABSENT:  # x-payload wins
            payload = rare[0]
        if rare[3] is not ABSENT:  # x-mtime wins
            when = rare[3]
        if twins:
            name = _text(e, "name", twins)
            if kind != S_IFLNK and kind != HARDLINK:
                _text(e, "linkName", twins)  # unread here, but the schema checks its twin
        else:
            name = get("name", ABSENT)
            if name is not ABSENT:
                if type(name) is not str:
                    raise _Bad("name", "expected a string")
                name = name.encode("utf-8", "surrogateescape")
        if kind == CHUNK:
            return self.chunk(e, name)
        if name is ABSENT:
            raise _Bad("name", "missing: required for every entry but chunks")
        if name[:2] == b"./":
            name = name[2:]
        elif name[:1] == b"/":
            name = name.lstrip(b"/")
        if name[-1:] == b"/":
            name = name.rstrip(b"/")
        if name[:1] == b"." or b"/." in name or b"//" in name:
            name = _clean(name, "name")
        if kind == HARDLINK:
            return self.hardlink(e, name, mode, twins)
        if kind == S_IFLNK:
            link_name = _text(e, "linkName", twins)
            if link_name is ABSENT:  # required even when x-payload gives the target, as legacy
                raise _Bad("linkName", "missing: required for type symlink")
            if payload is ABSENT:
                payload = link_name
            problem = limits.check_symlink(payload)
            if problem:
                raise _Bad("linkName", problem)
            size = len(payload)
        elif kind == S_IFDIR:
            payload = size = ABSENT  # the compiler sizes directories
        elif kind != S_IFREG:
            payload = ABSENT  # devices keep `size`: beyond 32 bits it makes the inode extended
        ftype = mode & S_IFMT
        if ftype and ftype != kind:
            raise _Bad("mode", f"file type bits 0{ftype:o} contradict type {t!r} (0{kind:o})")
        rdev = devices.makedev(dev_major, dev_minor) if kind == S_IFCHR or kind == S_IFBLK else 0

        if name:
            _check_path(name)
            head, _slash, base = name.rpartition(b"/")
            parent = self.dirs.get(head)
            if parent is None:
                parent = self.parents(head)
            if len(base) > limits.NAME_MAX or b"\0" in base:
                raise _Bad("name", limits.check_name(base))  # type: ignore[arg-type]
            node = parent.children.get(base)  # type: ignore[union-attr]
        elif kind != S_IFDIR:
            raise _Bad("type", f"the root must be a directory, not {t!r}")
        else:
            node = self.root
            parent = base = None

        if node is not None and node.mode & S_IFMT == kind and not (parent is not None and parent.is_link(base)):
            # An update: the legacy rules.  (A name a hardlink entry made is replaced below
            # instead, as tar extraction would: updating it in place would change the target.)
            node.mode = kind | (mode & 0o7777)
            if uid is not ABSENT:
                node.uid = uid
            if gid is not ABSENT:
                node.gid = gid
            if when is not ABSENT:
                node.mtime, node.mtime_nsec = when
            node.rdev = rdev
            stale = payload is not ABSENT and payload != node.payload
            if payload is not ABSENT:
                node.payload = payload
            if xattrs is not ABSENT:
                node.xattrs = self.merge(node.xattrs, xattrs)
            _x_payload, content, digest, _when, nlink = rare
            if nlink is not ABSENT:
                node.nlink = nlink
            if kind == S_IFREG:
                self.last_file = node
                # New data makes an earlier fs-verity digest stale (and --payload-dir would not
                # measure a file that has one): drop it unless this entry gives one.
                if content is not ABSENT:
                    stale = stale or (content or None) != node.content or len(content) != node.size
                    node.content = content or None
                    node.size = len(content)
                elif size is not ABSENT and size != node.size:
                    if node.content is not None:
                        raise _Bad("size", f"{size} contradicts the {node.size} bytes of inline content an"
                                   " earlier entry gave: give x-content again")
                    node.size = size
                    stale = True
                if digest is not ABSENT:
                    node.digest = digest
                elif stale:
                    node.digest = None
            elif size is not ABSENT:
                node.size = size
            return

        _x_payload, content, digest, _when, nlink = rare
        if content is not ABSENT:
            size = len(content)
            content = content or None
        else:
            content = None
        new = Inode(kind | (mode & 0o7777), 0 if uid is ABSENT else uid, 0 if gid is ABSENT else gid,
                    *((0, 0) if when is ABSENT else when), 0 if size is ABSENT else size, rdev,
                    None if nlink is ABSENT else nlink, None if payload is ABSENT else payload, content,
                    None if digest is ABSENT else digest, () if xattrs is ABSENT else xattrs)
        if kind == S_IFREG:
            self.last_file = new
        elif kind == S_IFDIR:
            self.dirs[name] = new
        if node is None:
            parent.children[base] = new  # type: ignore[union-attr,index]
        else:  # a different file type, or a new file under a hard-link name, replaces what was there
            if parent is None:
                raise _Bad("type", "the root must be a directory")
            self.unlink(node, name)
            parent.add_child(base, new)  # type: ignore[arg-type]

    def extensions(self, e: dict, kind: int, twins: bool) -> tuple:
        """(payload, content, fs-verity digest, (sec, nsec), nlink) from the rarer keys."""
        get = e.get
        payload = _text(e, "x-payload", twins)
        if payload is not ABSENT:
            problem = limits.check_payload(payload)
            if problem:
                raise _Bad("x-payload", problem)
            if kind != S_IFREG and kind != S_IFLNK:
                payload = ABSENT
        content = get("x-content", ABSENT)
        if content is not ABSENT:
            content = _b64(content, "x-content")
            if kind != S_IFREG:
                raise _Bad("x-content", "only regular files have inline content")
            problem = limits.check_content(content)
            if problem:
                raise _Bad("x-content", problem)
        digest = get("x-fsverity-digest", ABSENT)
        if digest is not ABSENT:
            m = _FSVERITY.fullmatch(digest) if type(digest) is str else None
            if m is None:
                raise _Bad("x-fsverity-digest", "expected sha256: and 64 lower-case hex digits (or sha512: and 128)")
            digest = bytes.fromhex(m.group(1) or m.group(2)) if kind == S_IFREG else ABSENT
        when = get("x-mtime", ABSENT)
        if when is not ABSENT:
            if (type(when) is not list or len(when) != 2 or type(when[0]) is not int
                    or type(when[1]) is not int or not -S64 <= when[0] < S64 or not 0 <= when[1] <= U32):
                raise _Bad("x-mtime", "expected [seconds, nanoseconds]: a 64-bit and an unsigned 32-bit integer")
            when = (when[0], when[1])
        nlink = get("x-nlink", ABSENT)
        if nlink is not ABSENT:
            nlink = _int(nlink, "x-nlink", 0, U32)
        for key in ("chunkOffset", "chunkSize"):
            value = get(key, ABSENT)
            if value is not ABSENT:
                _int(value, key, 0, U64)
        return payload, content, digest, when, nlink

    def time(self, text) -> tuple[int, int]:
        if type(text) is not str:
            raise _Bad("modtime", "expected an RFC 3339 time string")
        when = rfc3339.parse(text)
        if when is None:
            raise _Bad("modtime", "expected an RFC 3339 time: YYYY-MM-DDTHH:MM:SS[.fraction] and Z or ±HH:MM")
        if when == GO_ZERO_TIME:
            when = (0, 0)
        if len(self.times) >= CACHE_MAX:
            self.times.clear()
            self.times[ABSENT] = (0, 0)
        self.times[text] = when
        return when

    def xattrs(self, raw, raw_b64) -> tuple:
        """Sorted (key, value) pairs, interned: real trees repeat a few sets many times."""
        if raw is ABSENT:
            items = ()
        elif type(raw) is dict:
            items = tuple(raw.items())
        else:
            raise _Bad("xattrs", "expected an object of name → base64 value")
        if raw_b64 is ABSENT:
            cached = self.xattr_sets.get(items)
            if cached is not None:
                return cached
        pairs = {}
        for key, value in items:
            pairs[key.encode("utf-8", "surrogateescape")] = _b64(value, ["xattrs", key])
        if raw_b64 is not ABSENT:
            if type(raw_b64) is not dict:
                raise _Bad(twin("xattrs"), "expected an object of base64 name → base64 value")
            for key, value in raw_b64.items():
                pairs[_b64(key, [twin("xattrs"), key])] = _b64(value, [twin("xattrs"), key])
        for key, value in pairs.items():
            problem = limits.check_xattr(key, value)
            if problem:
                raise _Bad(["xattrs", key.decode("utf-8", "backslashreplace")], problem)
        result = self.intern(tuple(sorted(pairs.items())))
        if raw_b64 is ABSENT:
            if len(self.xattr_sets) >= CACHE_MAX:
                self.xattr_sets.clear()
            self.xattr_sets[items] = result
        return result

    def intern(self, xattrs: tuple) -> tuple:
        return self.interned.setdefault(xattrs, xattrs)

    def merge(self, old: tuple, new: tuple) -> tuple:
        if not old:
            return new
        pairs = dict(old)
        pairs.update(new)
        return self.intern(tuple(sorted(pairs.items())))

    # -- the tree -----------------------------------------------------------------------

    def parents(self, path: bytes) -> Inode:
        """The directory at `path`, making missing ones (040755 0:0 mtime 0)."""
        # (every prefix is kept in `dirs`: a 1 MB name of 500,000 components took 24 GB; the
        # entry's own name was checked before, so this one is shorter)
        node = self.root
        done = b""
        for part in path.split(b"/"):
            done = done + b"/" + part if done else part
            found = self.dirs.get(done)
            if found is None:
                if part in node.children:  # type: ignore[operator]
                    raise _Bad("name", f"{done.decode('utf-8', 'backslashreplace')!r} is not a directory")
                problem = limits.check_name(part)
                if problem:
                    raise _Bad("name", problem)
                found = Inode(S_IFDIR | 0o755)
                node.children[part] = found  # type: ignore[index]
                self.dirs[done] = found
            node = found
        return node

    def lookup(self, path: bytes) -> Inode | None:
        if not path:
            return self.root
        head, _slash, base = path.rpartition(b"/")
        parent = self.dirs.get(head)
        return parent.children.get(base) if parent is not None else None  # type: ignore[union-attr]

    def unlink(self, node: Inode, name: bytes) -> None:
        """Forget what an entry replaces (a directory only while empty)."""
        if node.children is not None:
            if node.children:
                raise _Bad("type", "the path is a directory with entries: it cannot change its type")
            del self.dirs[name]

    def hardlink(self, e: dict, name: bytes, mode: int, twins: bool) -> None:
        target_name = _text(e, "linkName", twins)
        if target_name is ABSENT:
            raise _Bad("linkName", "missing: required for type hardlink")
        target_name = _clean(target_name, "linkName")
        target = self.lookup(target_name)
        shown = target_name.decode("utf-8", "backslashreplace")
        if target is None:
            raise _Bad("linkName", f"hard link target {shown!r} does not exist: it must be an earlier entry")
        if target.children is not None:
            raise _Bad("linkName", f"hard link target {shown!r} is a directory")
        ftype = mode & S_IFMT
        if ftype and ftype != target.mode & S_IFMT:
            raise _Bad("mode", f"file type bits 0{ftype:o} contradict the target's (0{target.mode & S_IFMT:o})")
        if not name:
            raise _Bad("name", "the root cannot be a hard link")
        _check_path(name)
        head, _slash, base = name.rpartition(b"/")
        parent = self.dirs.get(head) or self.parents(head)
        old = parent.children.get(base)  # type: ignore[union-attr]
        if old is target:
            return
        if old is not None:
            self.unlink(old, name)
        elif len(base) > limits.NAME_MAX or b"\0" in base:
            raise _Bad("name", limits.check_name(base))  # type: ignore[arg-type]
        parent.add_child(base, target, link=True)

    def chunk(self, e: dict, name) -> None:
        """A later piece of a file: it can only make the file longer."""
        if name is ABSENT:
            node = self.last_file
            if node is None:
                raise _Bad("name", "a chunk without a name must follow a regular file entry")
        else:
            node = self.lookup(_clean(name, "name"))
            if node is None or node.mode & S_IFMT != S_IFREG:
                raise _Bad("name", "a chunk must belong to an earlier regular file entry")
        offset = _int(e.get("chunkOffset", 0), "chunkOffset", 0, U64)
        size = _int(e.get("chunkSize", 0), "chunkSize", 0, U64)
        if offset + size > node.size and node.content is None:
            node.size = offset + size
            node.digest = None  # measured over fewer bytes: stale

    # -- whole documents ----------------------------------------------------------------

    def document(self, source, data: bytes | None = None) -> None:
        """Apply one TOC, slice by slice when the cheap cut works (see the module docstring).

        A file is read block by block (and read again in the rare case that the whole
        document must be parsed at once); stdin and `data` are held in memory.
        """
        name = source_name(source)
        self.sources.append(name)
        self.document_start = (len(self.errors), self.n_errors)
        if data is None and (source == "-" or not isinstance(source, (str, bytes, os.PathLike))):
            data = read_all(source)
        blocks = [data] if data is not None else streams.chunks(source, SLICE_BYTES)
        slicer = EntrySlices(blocks)
        try:
            for first, entries, dups in slicer:
                self.feed(entries, name, first, dups)
        except Unsure:
            self.whole(data if data is not None else read_all(source), name, slicer.done)
            return
        except Oversized as e:
            self.fatal(f"{name}: {schemas.json_path(['entries', e.index])}: no end of the entry within"
                       f" {ENTRY_MAX >> 20} MiB of JSON text: refused (an entry, white space included, is"
                       " never that long)")
        finally:
            if data is None:
                blocks.close()  # type: ignore[union-attr]
        self.header(slicer.header, name)

    def whole(self, data: bytes, source: str, skip: int) -> None:
        """Parse the document at once; the first `skip` entries were applied already."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            self.fatal(f"{source}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}")
        if type(doc) is not dict:
            self.fatal(f"{source}: expected a JSON object with \"entries\", got {schemas.shown(doc)}")
        dups = duplicate_keys(data, doc)
        del data
        if ["entries"] in dups:  # which array is meant is anyone's guess: read no further
            self.fatal(_duplicate(source, ["entries"]))
        entries = doc.get("entries")
        if type(entries) is list:  # then each path below "entries" starts with an entry's index
            doc["entries"] = []
            self.feed(entries[skip:], source, skip, [[p[1] - skip, *p[2:]] for p in dups
                                                     if p[0] == "entries" and p[1] >= skip])
        for path in dups:
            if path[0] != "entries" or type(entries) is not list:
                self.report(_duplicate(source, path))
        self.header(doc, source)

    def header(self, doc: dict, source: str) -> None:
        """The top level, entries aside (they were checked one by one)."""
        for line in schemas.problems(SCHEMA, doc, source):
            self.report(line)

    def finish(self) -> Tree:
        if self.n_errors:
            raise InputErrors(self.errors, self.n_errors)
        tree = Tree(self.root, "+".join(self.sources))
        if self.options.payload_dir is not None:
            _add_digests(tree, self.options)
        return tree


def _add_digests(tree: Tree, options: Options) -> None:
    """fs-verity digests for external files whose payload exists under `--payload-dir`.

    A payload with no file there is skipped (the image records no digest, as the legacy tool
    never did).  One that is there but is not a readable regular file, or whose path leaves
    the base directory (`..`, a symlink on the way), is an error naming the file in the tree:
    payloads are opened as the FUSE server opens them (`cfsc.store.backing.Store`), confined.
    """
    # start-up: fs-verity hashing and the store reader ~8-19 ms; only checking payloads needs them
    from cfsc.base.fsverity import algorithm_named, digest_fd
    from cfsc.store.backing import Store

    todo: dict[bytes, dict[int, Inode]] = {}
    for node in tree.directories():  # every name: a replaced home can leave an inode only links reach
        for child in node.children.values():  # type: ignore[union-attr]
            if (child.mode & S_IFMT == S_IFREG and child.size and child.content is None
                    and child.digest is None and child.payload):
                todo.setdefault(child.payload, {})[id(child)] = child
    algorithm = algorithm_named(options.hash)
    store = Store([options.payload_dir], verity="none")  # type: ignore[list-item]
    try:
        for payload, users in todo.items():
            nodes = list(users.values())
            try:
                fd = store.open(payload.lstrip(b"/"), None)  # absolute in the store, as overlayfs' redirect
            except LookupFailed as e:
                if e.errno == errno.ENOENT:
                    continue
                raise TreeError(e.what, tree.path_of(nodes[0], links=True), tree.source) from None
            try:
                size = os.fstat(fd).st_size
                if any(n.size != size for n in nodes):
                    where = f"{options.payload_dir}/{shown_path(payload)}"
                    raise InputError(f"has {size} bytes but the TOC says {nodes[0].size}: wrong --payload-dir?", where)
                try:
                    digest = digest_fd(fd, algorithm)
                except OSError as e:
                    raise TreeError(f"object {shown_path(payload)} in {options.payload_dir}:"
                                    f" cannot read it: {e.strerror}", tree.path_of(nodes[0], links=True), tree.source) from None
            finally:
                os.close(fd)
            for n in nodes:
                n.digest = digest
    finally:
        store.close()




def load(source, options: Options | None = None) -> Tree:
    return load_many([source], options)


def load_many(sources, options: Options | None = None) -> Tree:
    """Several TOCs into one tree, in order (later entries update earlier ones)."""
    builder = _Builder(options or Options())
    for source in sources:
        builder.document(source)
    return builder.finish()


def loads(data: bytes, options: Options | None = None, name: str = "<string>") -> Tree:
    builder = _Builder(options or Options())
    builder.document(name, data)
    return builder.finish()


def _check_path(name: bytes) -> None:
    """An entry's name (its path, without the leading `/`) as an extracted layer can have it."""
    problem = limits.check_archive_path(len(name) + 1)
    if problem:
        raise _Bad("name", problem)
