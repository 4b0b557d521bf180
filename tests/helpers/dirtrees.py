"""Directory trees on disk built from a spec, and the dumpfile describing the same tree.

A test states each entry's content and metadata once (`Entry`); `make` creates it on disk
(we are root: owners, devices, trusted.* xattrs work) and `dumpfile` writes what mkcomposefs
must see in it, so the directory frontend can be checked against the dumpfile frontend.
"""

from __future__ import annotations

import os
import random
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cfsc.base.fsverity import digest_bytes, payload_path
from cfsc.base.limits import INLINE_MAX

KINDS = {"dir": stat.S_IFDIR, "reg": stat.S_IFREG, "symlink": stat.S_IFLNK, "fifo": stat.S_IFIFO,
         "sock": stat.S_IFSOCK, "chr": stat.S_IFCHR, "blk": stat.S_IFBLK}


@dataclass
class Entry:
    path: bytes  # relative to the tree root; b"" is the root
    kind: str = "reg"
    data: bytes = b""  # file content or symlink target
    mode: int = 0o644  # permission bits (with setuid/setgid/sticky)
    uid: int = 0
    gid: int = 0
    mtime: tuple[int, int] = (1_700_000_000, 0)
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    link: bytes | None = None  # another name of this entry's inode (a hard link)

    @property
    def st_mode(self) -> int:
        return KINDS[self.kind] | (0o777 if self.kind == "symlink" else self.mode)  # Linux: always 0777

    def is_device(self) -> bool:
        return self.kind in ("chr", "blk")


def order(entries: list[Entry]) -> list[Entry]:
    """Depth-first, names in byte order: the order a dumpfile lists a tree in."""
    return sorted(entries, key=lambda e: e.path.split(b"/") if e.path else [])


def make(root: Path, entries: list[Entry]) -> None:
    """Create the tree; metadata last, deepest first, so creating children does not touch it."""
    root = Path(root)
    root.mkdir(exist_ok=True)
    by_path = {e.path: e for e in entries}
    for e in sorted(order(entries), key=lambda e: e.link is not None):  # links once targets exist
        p = os.path.join(os.fsencode(root), e.path) if e.path else os.fsencode(root)
        if e.link is not None:
            os.link(os.path.join(os.fsencode(root), e.link), p)
        elif e.kind == "dir":
            if e.path:
                os.mkdir(p)
        elif e.kind == "reg":
            with open(p, "wb") as f:
                f.write(e.data)
        elif e.kind == "symlink":
            os.symlink(e.data, p)
        else:
            os.mknod(p, e.st_mode, os.makedev(*e.rdev))
    for e in reversed(order(entries)):
        if e.link is not None:
            continue
        p = os.path.join(os.fsencode(root), e.path) if e.path else os.fsencode(root)
        follow = e.kind != "symlink"
        for key, value in e.xattrs.items():
            os.setxattr(p, key, value, follow_symlinks=follow)
        os.chown(p, e.uid, e.gid, follow_symlinks=follow)  # before chmod: chown drops setuid
        if follow:
            os.chmod(p, e.mode)
        os.utime(p, ns=(0, e.mtime[0] * 1_000_000_000 + e.mtime[1]), follow_symlinks=follow)
    assert all(e.link is None or e.link in by_path for e in entries)


def escape(b: bytes) -> bytes:
    """Dumpfile escaping: every byte that is not a printable non-space ASCII, plus `\\` and `=`."""
    return b"".join(bytes((c,)) if 0x21 <= c <= 0x7E and c not in b"\\=" else b"\\x%02x" % c for c in b)


def dumpfile(entries: list[Entry], *, hardlinks: bool = False, use_epoch: bool = False,
             skip_devices: bool = False, skip_xattrs: bool = False, user_xattrs: bool = False) -> bytes:
    """The dumpfile of the tree `make` builds, as `mkcomposefs DIR` with these options reads it."""
    by_path = {e.path: e for e in entries}
    names: dict[bytes, list[bytes]] = {}  # original path -> every name of that inode, in order
    for e in order(entries):
        names.setdefault(e.link if e.link is not None else e.path, []).append(e.path)
    lines = []
    for e in order(entries):
        original = by_path[e.link] if e.link is not None else e
        if skip_devices and original.is_device():
            continue
        group = names[e.link if e.link is not None else e.path]
        path = b"/" + escape(e.path) if e.path else b"/"
        if hardlinks and len(group) > 1 and e.path != group[0]:
            lines.append(b"%s 0 @%o 0 0 0 0 0.0 /%s - -" % (path, original.st_mode, escape(group[0])))
            continue
        o = original
        size = len(o.data) if o.kind in ("reg", "symlink") else 0
        payload = content = digest = b"-"
        if o.kind == "symlink":
            payload = escape(o.data)
        elif o.kind == "reg" and o.data:
            d = digest_bytes(o.data)
            payload = payload_path(d)
            digest = d.hex().encode()
            if len(o.data) <= INLINE_MAX:
                content = escape(o.data)
        nlink = len(group) if hardlinks else 1
        rdev = os.makedev(*o.rdev) if o.is_device() else 0
        sec, nsec = (0, 0) if use_epoch else o.mtime
        xattrs = {} if skip_xattrs else o.xattrs
        if user_xattrs:
            xattrs = {k: v for k, v in xattrs.items() if k.startswith(b"user.")}
        fields = [path, b"%d" % size, b"%o" % o.st_mode, b"%d" % nlink, b"%d" % o.uid, b"%d" % o.gid,
                  b"%d" % rdev, b"%d.%d" % (sec, nsec), payload, content, digest]
        fields += [escape(k) + b"=" + escape(v) for k, v in sorted(xattrs.items())]
        lines.append(b" ".join(fields))
    return b"".join(line + b"\n" for line in lines)


def describe(tree) -> list[tuple]:
    """Every entry of a tree with the fields both frontends must agree on (not nlink: the
    dumpfile states it, the directory frontend leaves it to the hard-link pass)."""
    out = []
    for path, node, _parent, is_link in tree.walk():
        out.append((path, is_link, oct(node.mode), node.uid, node.gid, node.rdev, node.mtime, node.mtime_nsec,
                    node.size if not node.is_dir() else None, node.payload, node.content,
                    node.digest.hex() if node.digest else None, node.xattrs))
    return out

def full_spec() -> list[Entry]:
    rnd = random.Random(4)

    def t(i: int) -> tuple[int, int]:
        return (1_700_000_000 + i * 1000, 123_456_789 + i)

    return [
        Entry(b"", "dir", mode=0o755, mtime=t(0), xattrs={b"user.root": b"r", b"security.cfsc": b"root_t"}),
        Entry(b"empty", data=b"", mtime=t(1)),
        Entry(b"one", data=b"1", mtime=t(2)),
        Entry(b"s63", data=b"a" * 63, mtime=t(3)),
        Entry(b"s64", data=b"b" * 64, mtime=t(4)),
        Entry(b"s65", data=b"c" * 65, mtime=t(5)),
        Entry(b"dup65", data=b"c" * 65, mtime=t(6)),  # same content as s65: one store object
        Entry(b"s4096", data=bytes(range(256)) * 16, mtime=t(7)),
        Entry(b"big", data=rnd.randbytes(3 * 1024 * 1024 + 17), mtime=t(8), xattrs={b"trusted.big": b"1"}),
        Entry(b"suid", data=b"#!/bin/sh\n", mode=0o4755, mtime=t(9)),
        Entry(b"sgid", data=b"g" * 100, mode=0o2711, gid=50, mtime=t(10)),
        Entry(b"noperm", data=b"secret", mode=0o000, mtime=t(11)),
        Entry(b"owned", data=b"o" * 200, mode=0o640, uid=1000, gid=2000, mtime=t(12)),
        Entry(b"old", data=b"before 1970", mtime=(-86_400, 999_999_999)),
        Entry(b"xattrs", data=b"x" * 70, mtime=t(13), xattrs={
            b"user.a": b"1", b"user.bin": b"\x00\xff= \n", b"trusted.overlay.foo": b"bar",
            b"security.cfsc": b"label", b"trusted.empty": b""}),
        Entry(b"sticky", "dir", mode=0o1777, mtime=t(14)),
        Entry(b"a", "dir", mode=0o750, uid=7, gid=8, mtime=t(15)),
        Entry(b"a/b", "dir", mode=0o700, mtime=t(16)),
        Entry(b"a/b/c", "dir", mode=0o755, mtime=t(17), xattrs={b"trusted.overlay.opaque": b"y"}),
        Entry(b"a/b/c/deep", data=b"deep", mtime=t(18)),
        Entry(b"rel", "symlink", data=b"s63", mtime=t(19)),
        Entry(b"abs", "symlink", data=b"/etc/passwd", mtime=t(20)),
        Entry(b"dangling", "symlink", data=b"nowhere/x", mtime=t(21)),
        Entry(b"a/up", "symlink", data=b"../big", mtime=t(22), xattrs={b"trusted.sym": b"v"}),
        Entry(b"longlink", "symlink", data=b"t" * 1000, mtime=t(23)),
        Entry(b"binlink", "symlink", data=b"\xff\xfe target", mtime=t(24)),
        Entry(b"fifo", "fifo", mode=0o600, mtime=t(25)),
        Entry(b"sock", "sock", mode=0o755, mtime=t(26)),
        Entry(b"null", "chr", mode=0o666, rdev=(1, 3), mtime=t(27)),
        Entry(b"disk", "blk", mode=0o660, gid=6, rdev=(8, 1), mtime=t(28)),
        Entry(b"bigdev", "chr", mode=0o600, rdev=(511, 70000), mtime=t(29)),
        Entry(b"wh", "chr", mode=0o000, rdev=(0, 0), mtime=t(30)),  # a whiteout
        Entry(b"a/wh", "chr", mode=0o644, rdev=(0, 0), mtime=t(31)),
        Entry(b"L" * 255, data=b"long name", mtime=t(32)),
        Entry(b"caf\xe9", data=b"latin-1 name", mtime=t(33)),
        Entry(b"sp ace\nnl\\", data=b"odd name", mtime=t(34)),
        Entry(b"hl", data=b"h" * 80, mtime=t(35), xattrs={b"user.hl": b"1"}),
        Entry(b"a/hl2", link=b"hl"),
        Entry(b"a/b/0hl3", link=b"hl"),
        Entry(b"sticky/hs", data=b"tiny", mtime=t(36)),
        Entry(b"0hs", link=b"sticky/hs"),  # sorts before its original: it becomes the home
    ]
