"""The fast path of `_Builder.apply` (`cfsc.frontends.crfs.toc`): entries checked a column at a time.

Checking entries one `apply` call at a time is mostly per-entry interpreter overhead; here a
batch of BATCH entries is checked key by key with C-level `map`, `set`, `min` and `max`, and only
placing nodes in the tree is done entry by entry.  Only plain entries (see `batch`) are placed
here; every other one goes through `apply`, the one reference for semantics and messages.
Equivalence with the reference is tested in tests/test_crfs.py, whose `reference_path` sends
every entry through `apply`: the hypothesis tests `test_fast_and_reference_agree_on_malformed_documents`,
`test_code_rejects_what_the_schema_rejects` and `test_any_tree_round_trips` require both paths to
give the same tree or the same error lines.
"""

from __future__ import annotations

import re
from itertools import repeat

from cfsc.backends.crfs_format import TYPES
from cfsc.base import devices
from cfsc.base.limits import NAME_MAX, PATH_MAX, VALID_TYPES
from cfsc.base.tree import S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Inode
from cfsc.frontends.crfs.fields import _DIGEST, ABSENT, RARE, U32, U64, _Bad, _clean, _odd_path, _payload

BATCH = 2048  # entries per column pass (~2 MB of parsed JSON: stays in the CPU cache)
ZEROS = [0] * BATCH
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



class _Columns:
    """The column-wise half of `_Builder` (which inherits it): `batch` and its column readers."""

    # Provided by the builder (cfsc.frontends.crfs.toc._Builder): its state, and `one` (an
    # entry through `apply`, reported if refused), `time` and `xattrs` (cached value parsers).
    dirs: dict[bytes, Inode]
    last_file: Inode | None
    times: dict
    xattr_sets: dict[tuple, tuple]

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
