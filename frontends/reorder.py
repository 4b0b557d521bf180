"""A source's input in another order that means the same tree, for `cfsc check --reproducible`.

Each format's row in `FRONTENDS` names its function here (`Frontend.reorder`), taking
`(source, out, seed)` and writing the reordered input to `out`:

* a dumpfile's lines, in any order that still lists every parent first (`shuffle_dump`);
* a tar archive's members or a CRFS TOC's entries (`shuffle_tar`, `shuffle_toc`): whatever
  touches one path, or a path and its ancestor, keeps its relative order; a hard link
  touches its target too, a whiteout what it hides (`reorder`).
"""

from __future__ import annotations

import binascii
import heapq
import mmap
import random
import shutil
import tempfile
from typing import BinaryIO

import orjson
from cfsc.backends.crfs_format import twin
from cfsc.backends.dumptext import BadEscape, unescape
from cfsc.base.streams import decompressing, open_binary, read_all
from cfsc.frontends.tar.layers import AUFS_META, OPAQUE, WHITEOUT
from cfsc.frontends.tar.stream import (
    BLOCK,
    HARDLINK,
    HEADER,
    PAX_GLOBAL,
    SIZE,
    TYPEFLAG,
    VOLUME_LABEL,
    TarReader,
    number,
)



def _depth(line: bytes) -> int:
    path = line.split(b" ", 1)[0]
    if b"\\" in path:  # an escaped '/' counts
        try:
            path = unescape(path)
        except BadEscape:
            pass  # (the frontend reports it, wherever the line goes)
    return sum(1 for part in path.split(b"/") if part)


def shuffle_dumpfile(data: bytes, seed: int = 0) -> bytes:
    """The dumpfile's records in a random order that still lists every parent before its children."""
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    rng = random.Random(seed)
    keyed = sorted((_depth(line), rng.random(), line) for line in lines)
    return b"".join(line + b"\n" for _d, _r, line in keyed)


def shuffle_dump(source, out: BinaryIO, seed: int) -> None:
    """Write the dumpfile's lines to `out` in another order, parents first (`shuffle_dumpfile`)."""
    out.write(shuffle_dumpfile(read_all(source), seed))


# -- tar archives and CRFS TOCs in another valid order ---------------------------------------

def reorder(units: list[list[tuple[bytes, ...]]], seed: int) -> list[int]:
    """A random order of `units` (each: the paths it touches, as tuples of components) that
    keeps in their order any two touching one path, or a path and one of its ancestors.

    That is all tar and CRFS semantics leave to the order: a later member or entry for a path
    replaces or updates an earlier one; one for a path decides what a path below it can be
    (a file there refuses children, a replaced directory takes its subtree along); a hard
    link names what its target is at that point.  A random topological sort over edges from
    each unit to the later units it conflicts with, found with per-path sets of the units at
    or below the path that no later unit at the path follows yet (so edges stay few).
    """
    n = len(units)
    after: list[list[int]] = [[] for _ in range(n)]
    waiting = [0] * n
    last_at: dict[tuple, int] = {}
    below: dict[tuple, set[int]] = {}
    for j, paths in enumerate(units):
        before: set[int] = set()
        for path in paths:
            before.update(below.get(path, ()))
            for k in range(len(path)):
                i = last_at.get(path[:k])
                if i is not None:
                    before.add(i)
        before.discard(j)
        for i in before:
            after[i].append(j)
        waiting[j] = len(before)
        for path in paths:
            last_at[path] = j
            below[path] = {j}  # later ones here depend on j, and j on everything before it
            for k in range(len(path)):
                below.setdefault(path[:k], set()).add(j)
    rng = random.Random(seed)
    ready = [(rng.random(), j) for j in range(n) if not waiting[j]]
    heapq.heapify(ready)
    order = []
    while ready:
        _key, i = heapq.heappop(ready)
        order.append(i)
        for j in after[i]:
            waiting[j] -= 1
            if not waiting[j]:
                heapq.heappush(ready, (rng.random(), j))
    assert len(order) == n
    return order


def _parts(raw: bytes) -> tuple[bytes, ...]:
    """A member or entry name as the tar and CRFS frontends clean it (`..`: the root, which
    orders it against everything; the frontend refuses it anyway)."""
    parts = tuple(p for p in raw.split(b"/") if p and p != b".")
    return () if b".." in parts else parts


def _tar_paths(m) -> list[tuple[bytes, ...]]:
    path = _parts(m.path)
    paths = [path]
    if m.type == HARDLINK:
        paths.append(_parts(m.linkpath))
    name = path[-1] if path else b""
    if name == OPAQUE:
        paths.append(path[:-1])
    elif name.startswith(WHITEOUT) and not name.startswith(AUFS_META):
        paths.append(path[:-1] + (name[len(WHITEOUT):],))
    return paths


def shuffle_tar(source, out, seed: int) -> None:
    """Write the archive's members, uncompressed, in another order (`reorder`) to `out`.

    Each member moves with the extension headers before it, verbatim.  A member preceded by
    a PAX global header or a volume label stays where it is, and nothing moves across it (a
    global header sets defaults for every later member).  A member ends after its data,
    padded to a block."""
    with tempfile.TemporaryFile(prefix="cfsc-check-") as plain:
        with open_binary(source) as raw:
            shutil.copyfileobj(decompressing(raw), plain)
        if not plain.tell():
            return
        plain.seek(0)
        with mmap.mmap(plain.fileno(), 0, access=mmap.ACCESS_READ) as data:
            runs: list[list] = [[]]  # members between fixed spans: [(start, end, paths)]
            fixed: list[tuple[int, int]] = []  # the span before each run but the first
            end = 0
            with TarReader(plain) as reader:
                for m in reader.members():
                    start, pos = end, end
                    barrier = False
                    while pos < m.offset:  # the extension headers before the member
                        h = HEADER.unpack_from(data, pos)
                        barrier = barrier or h[TYPEFLAG] in (PAX_GLOBAL, VOLUME_LABEL)
                        size = number(h[SIZE])
                        pos += BLOCK + size + -size % BLOCK
                    end = reader.member_end  # not `size`: a sparse member's is the file's
                    if barrier:
                        fixed.append((start, end))
                        runs.append([])
                    else:
                        runs[-1].append((start, end, _tar_paths(m)))
            for i, run in enumerate(runs):
                if i:
                    out.write(data[fixed[i - 1][0]:fixed[i - 1][1]])
                for k in reorder([paths for _s, _e, paths in run], seed + i):
                    out.write(data[run[k][0]:run[k][1]])
            out.write(data[end:])  # the end-of-archive blocks


def _toc_name(entry, key: str) -> bytes | None:
    """A CRFS name or link target's bytes (from its base64 twin, `cfsc.base.jsonbytes`), or None."""
    if type(entry) is not dict:
        return None
    encoded = entry.get(twin(key))
    if type(encoded) is str:
        try:
            return binascii.a2b_base64(encoded + "=" * (-len(encoded) % 4))
        except binascii.Error:
            return b".."  # refused by the frontend: order it against everything
    value = entry.get(key)
    return value.encode("utf-8", "surrogateescape") if type(value) is str else None


def shuffle_toc(source, out, seed: int) -> None:
    """Write the TOC with its entries in another order (`reorder`) to `out`.

    A chunk entry without a name extends the last regular file before it, even one in an
    earlier TOC: it stays glued to that file's entry (with whatever lies between them), and
    the TOC's last regular file entry stays in place, with nothing moving across it."""
    doc = orjson.loads(read_all(source))
    entries = doc.get("entries") if type(doc) is dict else None
    if type(entries) is not list:
        out.write(orjson.dumps(doc))
        return
    units: list[list[int]] = []  # entry indices
    paths: list[list[tuple[bytes, ...]]] = []
    last_file = None  # the unit of the last regular file entry
    for i, e in enumerate(entries):
        kind = e.get("type") if type(e) is dict else None
        name = _toc_name(e, "name")
        if name is None and kind == "chunk" and last_file is not None:
            units[last_file:] = [[k for unit in units[last_file:] for k in unit] + [i]]
            paths[last_file:] = [[p for group in paths[last_file:] for p in group]]
            continue
        touched = [_parts(name) if name is not None else ()]
        if kind == "hardlink":
            target = _toc_name(e, "linkName")
            touched.append(_parts(target) if target is not None else ())
        if kind == "reg":
            last_file = len(units)
        units.append([i])
        paths.append(touched)
    if last_file is not None:
        paths[last_file].append(())  # the root: ordered against everything
    doc["entries"] = [entries[k] for u in reorder(paths, seed) for k in units[u]]
    out.write(orjson.dumps(doc))
