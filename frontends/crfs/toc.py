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

Speed: entries are checked a column at a time over batches of BATCH entries (`_Builder.batch`)
and only placing nodes is done entry by entry; anything unusual (extensions, hard links,
chunks, updates of an existing path, bad values) goes through `_Builder.apply`, the one
reference for semantics and messages.  Memory: a parsed 1M-entry TOC is ~2 GB of dicts, so the
file is read block by block and the entries array parsed in slices (`jsonslices`), each slice
dropped once applied; an entry whose text (white space included) runs past ENTRY_MAX is
refused rather than held.  A document the slicer cannot cut is parsed whole.
"""

from __future__ import annotations

import binascii
import errno
import os
import re
from itertools import repeat
from typing import NoReturn

import orjson
from cfsc import schemas
from cfsc.backends.crfs_format import CHUNK, GO_ZERO_TIME, HARDLINK, TYPES, twin
from cfsc.base import devices, limits, rfc3339, streams
from cfsc.base.errors import InputError, InputErrors, LookupFailed, TreeError, shown_path
from cfsc.base.limits import NAME_MAX, PATH_MAX, VALID_TYPES
from cfsc.base.options import Options
from cfsc.base.streams import read_all, source_name
from cfsc.base.tree import S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Inode, Tree
from cfsc.frontends.crfs.slices import ENTRY_MAX, SLICE_BYTES, EntrySlices, Oversized, Unsure, duplicate_keys

SCHEMA = "crfs-toc"
MAX_ERRORS = 20
BATCH = 2048  # entries per column pass (~2 MB of parsed JSON: stays in the CPU cache)
ZEROS = [0] * BATCH
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
S64 = 1 << 63
CACHE_MAX = 1 << 16
ABSENT = object()  # "no such key" (JSON null is None, which is an error for every known key)


# Keys read by the code (checked as read); other keys are ignored, except unknown `x-` ones.
READ = frozenset({"type", "name", "linkName", "size", "modtime", "x-mtime", "mode", "uid", "gid",
                  "devMajor", "devMinor", "xattrs", "digest", "chunkOffset", "chunkSize",
                  "x-payload", "x-content", "x-fsverity-digest", "x-nlink"})
TWINS = frozenset({twin("name"), twin("linkName"), twin("x-payload"), twin("xattrs")})
NO_EXTENSIONS = (ABSENT,) * 5
RARE = frozenset({"x-payload", "x-content", "x-fsverity-digest", "x-mtime", "x-nlink", "chunkOffset", "chunkSize"})

_DIGEST = re.compile(r"[a-z0-9]+:([0-9a-f]{2,})")
_FSVERITY = re.compile(r"sha256:([0-9a-f]{64})")
_HEAD = re.compile(rb'\s*\{\s*(?:"version"\s*:\s*1\s*,\s*)?"entries"\s*:\s*\[')
_HEAD_TYPE = re.compile(rb'"type"\s*:\s*"(?:%s)"' % "|".join(TYPES).encode())


def sniff(head: bytes) -> bool:
    """A JSON object whose first key is `entries` (or `version` 1 then `entries`), holding
    objects with a CRFS `type`: not any JSON that happens to have such a key."""
    return _HEAD.match(head) is not None and _HEAD_TYPE.search(head) is not None


class _Bad(Exception):
    """One entry is wrong: `path` (keys below the entry) and what was expected."""

    def __init__(self, path: str | list, what: str) -> None:
        super().__init__(what)
        self.path = [path] if isinstance(path, str) else path
        self.what = what


def _b64(text, path) -> bytes:
    """Strict standard base64, padding optional (the schema's `base64`)."""
    if type(text) is not str:
        raise _Bad(path, "expected a base64 string")
    if len(text) & 3:
        if text.endswith("="):
            raise _Bad(path, "invalid base64: wrong padding")
        text += "=" * (-len(text) & 3)
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as e:
        raise _Bad(path, f"invalid base64: {e}") from None


def _int(value, path, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _Bad(path, f"expected an integer from {lo} to {hi}")
    return value


def _text(entry: dict, key: str, twins: bool):
    """The bytes under `key`, from its base64 twin if there is one (`cfsc.base.jsonbytes` rule)."""
    if twins:
        encoded = entry.get(twin(key), ABSENT)
        if encoded is not ABSENT:
            stand_in = entry.get(key, ABSENT)
            if stand_in is ABSENT:
                raise _Bad(key, f"missing: required with {twin(key)} (a readable stand-in)")
            if type(stand_in) is not str:  # unread, but the schema types it: so does the code
                raise _Bad(key, "expected a string")
            return _b64(encoded, twin(key))
    value = entry.get(key, ABSENT)
    if value is ABSENT:
        return ABSENT
    if type(value) is not str:
        raise _Bad(key, "expected a string")
    return value.encode("utf-8", "surrogateescape")


def _clean(raw: bytes, key: str) -> bytes:
    """A path relative to the root: no empty or `.` components; `..` is an error."""
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise _Bad(key, "'..' is not allowed in a path")
    return b"/".join(parts)


def _odd_path(name: bytes) -> bool:
    """Whether `_clean` would change a name (trailing slashes already stripped)."""
    return (not name or name[0] == 0x2F or b"//" in name or name in (b".", b"..")
            or name.startswith((b"./", b"../")) or name.endswith((b"/.", b"/..")) or b"/./" in name
            or b"/../" in name)


def _plan(keys: tuple) -> tuple[bool, bool, frozenset]:
    """For one key set: (base64 twins present, any rarer key present (extensions, chunk
    fields), the keys)."""
    twins = False
    for key in keys:
        if key in TWINS:
            twins = True
        elif key[:2] == "x-" and key not in READ:
            raise _Bad(key, "unknown composefs extension key")
    return twins, twins or not RARE.isdisjoint(keys), frozenset(keys)


BAD_PLAN = (False, True, frozenset())  # a key set with an unknown extension key
_STR_OR_ABSENT = {str, object}
_PLACEABLE = VALID_TYPES  # entry kinds that place a node (not hard links or chunks)
_INT = {int}
_DIGESTS = re.compile(r"(?:[a-z0-9]+:[0-9a-f]{2,}\n)*")


def _ints(column: list, lo: int, hi: int, slow: bytearray) -> list:
    """Mark values that are not integers in [lo, hi]; the common case is three C-level passes."""
    if column and not (set(map(type, column)) == _INT and lo <= min(column) and max(column) <= hi):
        for i, value in enumerate(column):
            if type(value) is not int or not lo <= value <= hi:
                slow[i] = 1
    return column


def _payloads(column: list, slow: bytearray) -> list:
    """The payload `HE/X…` each `digest` gives (None where there is none), marking digests
    that are not ALGORITHM:HEX.  Checked all at once: sha256 ones (all of them in practice)
    with a byte translation, others with one regex pass."""
    present = [d for d in column if d is not ABSENT]
    if not present:
        return [None] * len(column)
    if set(map(type, present)) == {str}:
        if _sha256_digests(present):
            return [f"{d[7:9]}/{d[9:]}".encode() if d is not ABSENT else None for d in column]
        if _DIGESTS.fullmatch("\n".join(present) + "\n"):
            return [_payload(d) if d is not ABSENT else None for d in column]
    payloads = []
    for i, d in enumerate(column):
        if d is ABSENT:
            payloads.append(None)
        elif type(d) is str and _DIGEST.fullmatch(d):
            payloads.append(_payload(d))
        else:
            payloads.append(None)
            slow[i] = 1
    return payloads


def _payload(digest: str) -> bytes:
    hexpart = digest[digest.index(":") + 1:]
    return f"{hexpart[:2]}/{hexpart[2:]}".encode()


def _sha256_digests(digests: list) -> bool:
    """All are sha256: and 64 lower-case hex digits (what every producer writes)."""
    if set(map(len, digests)) != {71} or not all(map(str.startswith, digests, repeat("sha256:"))):
        return False
    try:
        text = "".join(digests).encode("ascii")
    except UnicodeEncodeError:
        return False
    # Deleting the hex digits leaves only the "sh:" of each "sha256:" prefix.
    return text.translate(None, b"0123456789abcdef") == b"sh:" * len(digests)


def _duplicate(source: str, path: list) -> str:
    return (f"{source}: {schemas.json_path(path)}: duplicate key: a JSON object may give a key once"
            " (readers disagree on which value counts)")


def _integral(value):
    """jsonschema counts 3.0 as an integer; so does the slow path."""
    if type(value) is float and value.is_integer():
        return int(value)
    if type(value) is list:
        return [_integral(v) for v in value]
    return value


class _Builder:
    """Entries → one tree, across any number of TOC files."""

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

    # -- slices: the fast path ------------------------------------------------------------

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

    def batch(self, entries: list, source: str, first: int) -> None:
        """Apply a batch of entries in order.

        Values are checked a column at a time (C-level `map`, `set`, `min`, `max`), and only
        placing nodes in the tree is done entry by entry.  An entry takes this path when it is
        plain: no extension or twin key, every value as the schema wants, a new path whose
        parent exists, not a hard link or chunk.  Everything else goes through `apply`, the
        reference for semantics and messages.
        """
        n = len(entries)
        one = self.one
        if set(map(type, entries)) != {dict}:
            for i, e in enumerate(entries):
                one(e, source, first + i)
            return
        slow, present = self.plain(entries)
        get = dict.get

        def column(key: str, default=ABSENT) -> list:
            if key in present:
                return list(map(get, entries, repeat(key), repeat(default)))
            return [default] * n

        kinds = column("type", None)
        try:
            kinds = list(map(TYPES.get, kinds))
        except TypeError:  # an unhashable "type"
            kinds = [TYPES.get(k) if type(k) is str else None for k in kinds]
        names = self.names(column("name"), slow)
        modes = _ints(column("mode", 0), 0, 0o177777, slow)
        uids = _ints(column("uid", 0), 0, U32, slow)
        gids = _ints(column("gid", 0), 0, U32, slow)
        sizes = _ints(column("size", 0), 0, U64, slow)
        if "devMajor" in present or "devMinor" in present:
            majors = _ints(column("devMajor", 0), 0, devices.MAJOR_MAX, slow)
            minors = _ints(column("devMinor", 0), 0, devices.MINOR_MAX, slow)
        else:
            majors = minors = ZEROS
        whens = self.whens(column("modtime"), slow)
        payloads = _payloads(column("digest"), slow)
        targets = column("linkName")
        if not set(map(type, targets)) <= _STR_OR_ABSENT:
            for i, t in enumerate(targets):
                if t is not ABSENT and type(t) is not str:
                    slow[i] = 1
        xattr_column = column("xattrs")

        if not _PLACEABLE.issuperset(kinds):  # hard links, chunks, unknown types
            for i, kind in enumerate(kinds):
                if kind not in _PLACEABLE:
                    slow[i] = 1
        splits = list(map(bytes.rpartition, names, repeat(b"/")))
        dirs = self.dirs
        xattr_sets = self.xattr_sets
        last = self.last_file
        for i in range(n):
            name = names[i]
            if not slow[i] and name:
                kind = kinds[i]
                head, _slash, base = splits[i]
                parent = dirs.get(head)
                mode = modes[i]
                if (parent is not None and base not in parent.children and len(base) <= NAME_MAX  # type: ignore[operator]
                        and (mode <= 0o7777 or mode & S_IFMT == kind)):
                    xattrs = xattr_column[i]
                    if xattrs is ABSENT:
                        xattrs = ()
                    else:
                        try:
                            found = xattr_sets.get(tuple(xattrs.items()))
                            xattrs = found if found is not None else self.xattrs(xattrs, ABSENT)
                        except Exception:  # noqa: BLE001 - explained by the reference path
                            xattrs = None
                    sec, nsec = whens[i]
                    node = None
                    if xattrs is None:
                        pass
                    elif kind == S_IFREG:
                        node = last = Inode(mode | S_IFREG, uids[i], gids[i], sec, nsec, sizes[i], 0, None,
                                            payloads[i], None, None, xattrs)
                    elif kind == S_IFDIR:
                        node = Inode(mode | S_IFDIR, uids[i], gids[i], sec, nsec, 0, 0, None, None, None,
                                     None, xattrs)
                        dirs[name] = node
                    elif kind == S_IFLNK:
                        target = targets[i]
                        if target is not ABSENT:
                            target = target.encode("utf-8", "surrogateescape")
                            if target and len(target) < PATH_MAX and b"\0" not in target:
                                node = Inode(mode | S_IFLNK, uids[i], gids[i], sec, nsec, len(target), 0, None,
                                             target, None, None, xattrs)
                    else:
                        rdev = devices.makedev(majors[i], minors[i]) if kind == S_IFCHR or kind == S_IFBLK else 0
                        node = Inode(mode | kind, uids[i], gids[i], sec, nsec, sizes[i], rdev, None, None,
                                     None, None, xattrs)
                    if node is not None:
                        parent.children[base] = node  # type: ignore[index]
                        continue
            self.last_file = last
            one(entries[i], source, first + i)
            last = self.last_file
        self.last_file = last

    def one(self, entry, source: str, index: int) -> None:
        try:
            self.apply(entry)
        except Exception:  # noqa: BLE001 - any surprise gets explained (schema, then code)
            self.rejected(entry, source, index)

    def plain(self, entries: list) -> tuple[bytearray, set]:
        """(entries with an extension, twin, chunk field or unknown `x-` key; every key seen).

        One union of all key sets says whether there is any such key at all; only then is each
        one looked up entry by entry (C-level `map`).
        """
        present = set().union(*entries)
        slow = bytearray(len(entries))
        odd = [key for key in present if key in RARE or key[:2] == "x-"]
        if odd:
            found = 0
            for key in odd:
                found |= int.from_bytes(bytes(map(dict.__contains__, entries, repeat(key))))
            slow[:] = found.to_bytes(len(entries))
        return slow, present

    def names(self, column: list, slow: bytearray) -> list:
        """Names as clean paths (b"" for the root, chunks and bad ones: `apply` decides).

        A few searches over all names joined by `/` find whether any needs `_clean` (a
        leading `/`, an empty, `.` or `..` component); eStargz's `usr/` is stripped in bulk,
        and so is the `./` of docker-style names.
        """
        if set(map(type, column)) == {str}:
            names = list(map(str.encode, column))
        else:
            names = [n.encode("utf-8", "surrogateescape") if type(n) is str else b"" for n in column]
        names = list(map(bytes.rstrip, names, repeat(b"/")))
        joined = b"/" + b"/".join(names) + b"/"
        if b"\0" in joined:  # not a name (apply says why)
            for i, name in enumerate(names):
                if b"\0" in name:
                    names[i] = b""
                    slow[i] = 1
            joined = b"/" + b"/".join(names) + b"/"
        if names[0].startswith(b"./"):
            names = [name[2:] if name.startswith(b"./") else name for name in names]
            joined = b"/" + b"/".join(names) + b"/"
        if b"//" in joined or (b"/." in joined and (b"/./" in joined or b"/../" in joined)):
            for i, name in enumerate(names):
                if _odd_path(name):
                    try:
                        names[i] = _clean(name, "name")
                    except _Bad:
                        names[i] = b""
                        slow[i] = 1
        return names

    def whens(self, column: list, slow: bytearray) -> list:
        """(sec, nsec) per entry; (0, 0) when absent."""
        times = self.times
        try:
            whens = list(map(times.get, column))
        except TypeError:  # an unhashable modtime
            whens = [times.get(w) if type(w) is str else None for w in column]
        if None in whens:
            for i, when in enumerate(whens):
                if when is None:
                    try:
                        text = column[i]
                        whens[i] = (times.get(text) if type(text) is str else None) or self.time(text)
                    except _Bad:
                        whens[i] = (0, 0)
                        slow[i] = 1
        return whens

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
                raise _Bad("x-fsverity-digest", "expected sha256: and 64 lower-case hex digits")
            digest = bytes.fromhex(m.group(1)) if kind == S_IFREG else ABSENT
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
    from cfsc.base.fsverity import digest_fd
    from cfsc.store.backing import Store

    todo: dict[bytes, dict[int, Inode]] = {}
    for node in tree.directories():  # every name: a replaced home can leave an inode only links reach
        for child in node.children.values():  # type: ignore[union-attr]
            if (child.mode & S_IFMT == S_IFREG and child.size and child.content is None
                    and child.digest is None and child.payload):
                todo.setdefault(child.payload, {})[id(child)] = child
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
                    digest = digest_fd(fd)
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
