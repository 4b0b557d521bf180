"""`cfsc fsck-store`: are the backing files a set of images needs present and intact?

composefs serves a regular file's data from `BASEDIR/<payload>` and, unless the mount
enforces fs-verity, does not notice when that file was truncated or altered.  This check
finds, for every object the images reference:

* missing — no file at that path;
* corrupt — not a regular file, a size other than the image's, or (when the image records
  one) an fs-verity digest other than the image's (SHA-256 or SHA-512: the recorded digest's
  size tells which to compute);
* invalid — a payload that would leave the store (`..` components, an absolute path, a
  symlink on the way: objects are opened as the FUSE server opens them, `cfsc.store.backing`).

and names every image path that uses each bad object.  It also counts the temp files killed
imports left at the top of the store (`.cfsc-tmp-*`, `cfsc.store.objects`): they break nothing and are
no problem, but they take space until removed.  An object no image records a digest
for can only be checked for its size; the report counts those as `unverified`, so "no
problems" is not read as "every byte checked".  Objects are checked once however many
entries and images share them; digests are computed in a thread pool (hashlib releases the
GIL).  A second walk collects the users of the bad objects only, so a clean store costs one
walk per image.
"""

from __future__ import annotations

import errno
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cfsc.backends.erofs.entries import walk
from cfsc.backends.erofs.reader import Image
from cfsc.base.beneath import ESCAPES
from cfsc.base.errors import LookupFailed
from cfsc.base.fsverity import algorithm_of, hash_fd
from cfsc.base.tree import S_IFMT, S_IFREG
from cfsc.store.backing import Refused, Store, WrongType
from cfsc.store.objects import TEMP_PREFIX
from cfsc.tools.images import object_path


@dataclass
class Problem:
    payload: bytes
    kind: str  # "missing", "corrupt" or "invalid"
    detail: str
    users: list[tuple[str, bytes]] = field(default_factory=list)  # (image, path)


@dataclass
class Report:
    objects: int
    problems: list[Problem]
    unverified: int = 0  # intact-looking objects without a digest to check (size only)
    temp_files: int = 0  # left by killed imports
    temp_bytes: int = 0

    def count(self, kind: str) -> int:
        return sum(1 for p in self.problems if p.kind == kind)


def check_store(images: list[Image], basedir: str, threads: int = 1) -> Report:
    expected: dict[bytes, set[tuple[int, bytes | None]]] = {}
    for image in images:
        for _path, e, first in walk(image):
            if first is None and e.payload is not None and e.mode & S_IFMT == S_IFREG:
                expected.setdefault(e.payload, set()).add((e.size, e.digest))
    store = Store([basedir], verity="none")
    try:
        payloads = sorted(expected)
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            results = list(pool.map(lambda p: _check(store, p, expected[p]), payloads))
    finally:
        store.close()
    problems = [Problem(p, *r) for p, r in zip(payloads, results, strict=True) if r is not None and r is not UNVERIFIED]
    if problems:
        bad = {p.payload: p for p in problems}
        for image in images:
            for path, e, _first in walk(image):
                problem = bad.get(e.payload) if e.payload is not None and e.mode & S_IFMT == S_IFREG else None
                if problem is not None:
                    problem.users.append((image.name, path))
    temps, temp_bytes = leftover_temps(basedir)
    return Report(len(expected), problems, results.count(UNVERIFIED), temps, temp_bytes)


def leftover_temps(basedir: str) -> tuple[int, int]:
    """(count, bytes) of the temp files at the top of a store (imports killed, or running)."""
    count = size = 0
    try:
        with os.scandir(basedir) as entries:
            for entry in entries:
                if entry.name.startswith(TEMP_PREFIX):
                    try:
                        size += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
                    count += 1
    except OSError:
        pass
    return count, size


UNVERIFIED = ("", "")  # `_check`: intact as far as its size tells; no digest to check it against


def _check(store: Store, payload: bytes, wanted: set[tuple[int, bytes | None]]) -> tuple[str, str] | None:
    """None: intact; UNVERIFIED: the right size, but no image records a digest for that size;
    else (kind, detail) of the problem."""
    rel = object_path(payload)
    if not rel or b".." in rel.split(b"/") or b"\0" in rel:
        return "invalid", "the path leaves the store"
    try:
        fd = store.open(rel, None)
    except WrongType as e:
        return "corrupt", f"not a regular file ({e.kind})"
    except Refused as e:
        if e.cause in ESCAPES:
            return "invalid", "the path leaves the store (a symlink on the way)"
        if e.cause == errno.ENOTDIR:
            return "missing", "a parent is not a directory"
        return "corrupt", f"cannot open: {os.strerror(e.cause)}"
    except LookupFailed as e:
        if e.errno == errno.ENOENT:
            return "missing", "no such file"
        return "corrupt", e.what.split(": ", 1)[-1]
    try:
        size = os.fstat(fd).st_size
        sizes = sorted({size for size, _digest in wanted})
        if size not in sizes:
            return "corrupt", f"size {size}, expected {' or '.join(map(str, sizes))}"
        digests = {digest for s, digest in wanted if digest is not None and s == size}
        if not digests:
            return UNVERIFIED
        # One digest per algorithm the images record for it (almost always one).
        algorithms = sorted({algorithm_of(d) for d in digests}, key=lambda a: a.id)  # type: ignore[union-attr]
        try:
            actual = [hash_fd(fd, 0, algorithm=a)[0] for a in algorithms]
        except OSError as e:
            return "corrupt", f"cannot read: {e.strerror}"
    finally:
        os.close(fd)
    if digests.isdisjoint(actual):
        return "corrupt", (f"fs-verity digest {' / '.join(a.hex() for a in actual)}, expected "
                           f"{' or '.join(sorted(d.hex() for d in digests))}")
    return None
