"""Any tree → a tar layer (`cfsc export SOURCE --basedir STORE -o layer.tar`) that compiles back
to the same image bytes.

The tar frontend is the contract: entries come in depth-first name order, the root first as
`./` (so its metadata travels), directories as `NAME/`; the first name of a hard-linked inode
carries it, every later name is a type-1 link to that first name (the tar frontend makes the
first name in that order the inode's home again).  Headers are POSIX ustar; whatever ustar
cannot hold goes into a PAX `x` header before the entry: long or non-ASCII-safe paths and link
targets (over 100 bytes, or a split into the 155-byte prefix that does not fit), uid/gid over
2097151, sizes of 8 GiB and more, mtimes before 1970, past 2^33 or with nanoseconds
(`mtime=SEC.NNNNNNNNN`), and every xattr (`SCHILY.xattr.KEY`, as GNU tar and Go write them).
Nothing depends on the clock, the user or the machine: uname/gname are empty, PAX headers are
named `PaxHeaders/NAME` with fixed metadata, and the archive ends with the two zero blocks and
no record padding.

Devices keep their numbers (an overlay whiteout, a character device 0:0, stays one, and an
opaque directory keeps its `trusted.overlay.opaque` xattr: the layer shows what the image
shows).  File data comes from the inline content or from the store (`--basedir`), checked
against the fs-verity digest the image records.  Sockets cannot be in a tar archive: an error.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from cfsc.base.errors import InputError, TreeError, UsageError, shown_path
from cfsc.base.tree import S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, Inode, Tree

BLOCK = 512
CHUNK = 1 << 20
TYPES = {S_IFREG: b"0", S_IFLNK: b"2", S_IFCHR: b"3", S_IFBLK: b"4", S_IFDIR: b"5", S_IFIFO: b"6"}
ID_MAX = 0o7777777
SIZE_MAX = 0o77777777777
TIME_MAX = 0o77777777777


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n = len(str(n).encode()) + len(body)
    return str(n).encode() + body


def _split(path: bytes) -> tuple[bytes, bytes] | None:
    """ustar (prefix, name) for a path, or None if it needs PAX: the last `/` that leaves at
    most 155 bytes before it and 100 after it (found without a scan of a long path)."""
    if len(path) <= 100:
        return b"", path
    i = path.rfind(b"/", max(len(path) - 101, 1), 156)
    return (path[:i], path[i + 1:]) if i > 0 else None


def _header(name: bytes, typeflag: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
            linkname: bytes = b"", major: int = 0, minor: int = 0, prefix: bytes = b"") -> bytes:
    h = bytearray(BLOCK)
    h[0:len(name)] = name
    h[100:108] = _octal(mode, 8)
    h[108:116] = _octal(uid, 8)
    h[116:124] = _octal(gid, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(mtime, 12)
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[157:157 + len(linkname)] = linkname
    h[257:265] = b"ustar\x0000"
    h[329:337] = _octal(major, 8)
    h[337:345] = _octal(minor, 8)
    h[345:345 + len(prefix)] = prefix
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


class _Writer:
    def __init__(self, out: BinaryIO, store) -> None:
        self.out = out
        self.store = store

    def entry(self, path: bytes, node: Inode, typeflag: bytes, linkname: bytes = b"") -> None:
        pax: list[bytes] = []
        split = _split(path)
        if split is None:
            pax.append(_record(b"path", path))
            prefix, name = b"", path[-100:].lstrip(b"/")[-100:]
        else:
            prefix, name = split
        if len(linkname) > 100:
            pax.append(_record(b"linkpath", linkname))
            linkname = linkname[:100]
        uid, gid = node.uid, node.gid
        if uid > ID_MAX:
            pax.append(_record(b"uid", str(uid).encode()))
            uid = 0
        if gid > ID_MAX:
            pax.append(_record(b"gid", str(gid).encode()))
            gid = 0
        size = node.size if typeflag == b"0" else 0
        if size > SIZE_MAX:
            pax.append(_record(b"size", str(size).encode()))
        mtime, nsec = node.mtime, node.mtime_nsec
        header_mtime = mtime
        if nsec or mtime < 0 or mtime > TIME_MAX:
            sign = b"-" if mtime < 0 and nsec == 0 else b""
            if mtime < 0 and nsec:  # PAX times are decimal: -1.5 is 1.5 s before the epoch
                whole, frac = -(mtime + 1), 1_000_000_000 - nsec
                text = b"-%d.%09d" % (whole, frac)
            else:
                text = sign + (b"%d.%09d" % (abs(mtime), nsec) if nsec else b"%d" % abs(mtime))
            pax.append(_record(b"mtime", text))
            header_mtime = min(max(mtime, 0), TIME_MAX)
        for key, value in node.xattrs:
            pax.append(_record(b"SCHILY.xattr." + key, value))
        if pax:
            data = b"".join(pax)
            pname = (b"PaxHeaders/" + path.rstrip(b"/").rpartition(b"/")[2])[:100]
            self.out.write(_header(pname, b"x", 0o644, 0, 0, len(data), 0))
            self._data(data)
        major = minor = 0
        if typeflag in (b"3", b"4"):
            major, minor = os.major(node.rdev), os.minor(node.rdev)
        self.out.write(_header(name, typeflag, node.mode & 0o7777 if typeflag != b"2" else 0o777, uid, gid,
                               min(size, SIZE_MAX) if size <= SIZE_MAX else 0, header_mtime, linkname, major,
                               minor, prefix))

    def _data(self, data: bytes) -> None:
        self.out.write(data)
        pad = -len(data) % BLOCK
        if pad:
            self.out.write(bytes(pad))

    def file_data(self, path: bytes, node: Inode) -> None:
        if node.size == 0:
            return
        if node.content is not None:
            if len(node.content) != node.size:
                raise TreeError(f"inline content of {len(node.content)} bytes, size {node.size}", path)
            self._data(node.content)
            return
        if node.payload is None:
            raise TreeError("a file with data but no payload or content", path)
        if self.store is None:
            raise UsageError(f"'{shown_path(path)}' keeps its data in the store: give --basedir STORE", "--basedir")
        fd = self.store.open(node.payload, node.digest, where=shown_path(path))
        try:
            left = node.size
            while left:
                chunk = os.read(fd, min(CHUNK, left))
                if not chunk:
                    raise InputError(f"object {shown_path(node.payload)} has fewer bytes than the {node.size} the"
                                     " image records", shown_path(path))
                self.out.write(chunk)
                left -= len(chunk)
            pad = -node.size % BLOCK
            if pad:
                self.out.write(bytes(pad))
        finally:
            os.close(fd)


def write(tree: Tree, out: BinaryIO, basedirs: list[str] | None = None) -> None:
    # start-up: the store reader ~6 ms; only `cfsc export --store` needs it
    from cfsc.store.backing import Store

    store = Store(basedirs, "if-present") if basedirs else None
    try:
        w = _Writer(out, store)
        first: dict[int, bytes] = {}  # id(inode) → its first name, for later hard links
        w.entry(b"./", tree.root, b"5")
        # Only the current directory's path is held (with each level's length): a deep tree's
        # paths would add up to its depth squared.
        prefix = b""
        stack = [(0, iter(sorted(tree.root.children)), tree.root)]  # type: ignore[arg-type]
        while stack:
            _length, names, parent = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                if stack:
                    prefix = prefix[:stack[-1][0]]
                continue
            node = parent.children[name]  # type: ignore[index]
            path = prefix + name
            ftype = node.mode & S_IFMT
            if ftype == S_IFDIR:
                prefix = path + b"/"
                w.entry(prefix, node, b"5")
                stack.append((len(prefix), iter(sorted(node.children)), node))  # type: ignore[arg-type]
                continue
            seen = first.get(id(node))
            if seen is not None:
                w.entry(path, node, b"1", seen)
                continue
            first[id(node)] = path
            typeflag = TYPES.get(ftype)
            if typeflag is None:
                raise TreeError("a socket cannot be put in a tar layer", path)
            w.entry(path, node, typeflag, node.payload or b"" if ftype == S_IFLNK else b"")
            if ftype == S_IFREG:
                w.file_data(path, node)
        out.write(bytes(2 * BLOCK))
    finally:
        if store is not None:
            store.close()
