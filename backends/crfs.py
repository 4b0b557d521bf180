"""Any tree → a CRFS TOC (`cfsc schema crfs-toc`) that `--from crfs` compiles to the same image.

Output: `{"version":1,"entries":[` then one compact entry per line, then `]}`.  Entries come in
depth-first name order (so parents precede children; the root is `./`), and every extra name
of a hard-linked inode comes at the end as a `hardlink` entry naming its home, so link
targets always exist when read.  What plain CRFS cannot say goes into the composefs
extensions the frontend reads (`cfsc.frontends.crfs.toc`): `x-payload`, `x-content`,
`x-fsverity-digest`, `x-mtime` (times outside RFC 3339's years 0001-9999, or a nanosecond
field of 10^9 or more), `x-nlink` (a stated link count that is not the number of names), type
`socket`, and base64 twins for bytes that are not UTF-8.  Zero fields are left out, as Go's
`omitempty` writers do.
"""

from __future__ import annotations

import base64
from typing import BinaryIO

import orjson
from cfsc.backends.crfs_format import GO_ZERO_TIME, TYPE_NAMES, twin
from cfsc.base import devices, jsonbytes, rfc3339
from cfsc.base.errors import TreeError, UsageError
from cfsc.base.fsverity import algorithm_of
from cfsc.base.options import Options
from cfsc.base.tree import S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Tree

BATCH = 4096


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _xattr_fields(xattrs: tuple) -> dict:
    plain = {}
    raw = {}
    for key, value in xattrs:
        try:
            plain[key.decode("utf-8")] = _b64(value)
        except UnicodeDecodeError:
            raw[_b64(key)] = _b64(value)
    fields = {"xattrs": plain} if plain else {}
    if raw:
        fields[twin("xattrs")] = raw
    return fields


def write(tree: Tree, out: BinaryIO, options: Options | None = None) -> None:
    """The TOC of a tree with one home entry per inode, as the compiler will see it
    (`cfsc.build.write` runs `resolve_hardlinks` first)."""
    if tree.lowered:
        raise UsageError("the tree was already rewritten for the image (overlay xattrs, root whiteouts):"
                         " give the source tree", tree.source)
    extra_names: dict[int, int] = {}  # id(inode) → names besides its home
    for directory in tree.directories():
        if directory.links:
            children = directory.children
            for name in directory.links:
                key = id(children[name])  # type: ignore[index]
                extra_names[key] = extra_names.get(key, 0) + 1
    homes: dict[int, bytes] = {}
    links: list[tuple[bytes, int]] = []
    times: dict[tuple[int, int], str] = {}
    xattr_cache: dict[int, tuple[tuple, dict]] = {}
    dumps = orjson.dumps
    batch: list[bytes] = []
    out.write(b'{"version":1,"entries":[\n')
    first = True

    for path, node, _parent, is_link in tree.walk():
        if is_link:
            links.append((path, id(node)))
            continue
        mode = node.mode
        ftype = mode & S_IFMT
        kind = TYPE_NAMES.get(ftype)
        if kind is None:
            raise TreeError(f"mode {mode:o} has no file type", path, tree.source)
        e: dict = {}
        jsonbytes.put(e, "name", path[1:] or b"./", twin)
        e["type"] = kind
        if mode & 0o7777:
            e["mode"] = mode & 0o7777
        if node.uid:
            e["uid"] = node.uid
        if node.gid:
            e["gid"] = node.gid
        when = (node.mtime, node.mtime_nsec)
        if when != (0, 0):
            text = times.get(when)
            if text is None and when != GO_ZERO_TIME and when[1] < 1_000_000_000 and rfc3339.FIRST <= when[0] <= rfc3339.LAST:
                text = times[when] = rfc3339.format(*when)
            if text is not None:
                e["modtime"] = text
            else:
                e["x-mtime"] = list(when)
        if ftype == S_IFREG:
            if node.size:
                e["size"] = node.size
            if node.payload is not None:
                jsonbytes.put(e, "x-payload", node.payload, twin)
            if node.content is not None:
                e["x-content"] = _b64(node.content)
            if node.digest is not None:
                e["x-fsverity-digest"] = algorithm_of(node.digest).name + ":" + node.digest.hex()
        elif ftype == S_IFLNK:
            jsonbytes.put(e, "linkName", node.payload or b"", twin)
        elif ftype != S_IFDIR:
            if node.size:  # ignored by the image, except that beyond 32 bits it makes the inode extended
                e["size"] = node.size
            if node.rdev and (ftype == S_IFCHR or ftype == S_IFBLK):
                e["devMajor"] = devices.major(node.rdev)
                e["devMinor"] = devices.minor(node.rdev)
        if node.xattrs:
            hit = xattr_cache.get(id(node.xattrs))
            if hit is None:
                hit = xattr_cache[id(node.xattrs)] = (node.xattrs, _xattr_fields(node.xattrs))
            e.update(hit[1])
        if ftype != S_IFDIR:
            names = 1 + extra_names.get(id(node), 0)
            if node.nlink is not None and node.nlink != names:
                e["x-nlink"] = node.nlink
            if names > 1:
                homes[id(node)] = path[1:]
        batch.append(dumps(e))
        if len(batch) >= BATCH:
            out.write((b"" if first else b",\n") + b",\n".join(batch))
            first = False
            batch.clear()

    for path, key in links:
        e = {}
        jsonbytes.put(e, "name", path[1:], twin)
        e["type"] = "hardlink"
        jsonbytes.put(e, "linkName", homes[key], twin)
        batch.append(dumps(e))
    if batch:
        out.write((b"" if first else b",\n") + b",\n".join(batch))
    out.write(b"\n]}\n")
