"""Hypothesis strategies: random trees with hostile names, deep nesting, hard links, many
shared and unshared xattrs, inline and external files, devices and whiteouts."""

from __future__ import annotations

from cfsc.base.tree import (
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFREG,
    S_IFSOCK,
    Inode,
    Tree,
)
from hypothesis import strategies as st

names = st.binary(min_size=1, max_size=255).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b".."))
short_names = st.one_of(
    st.sampled_from([b"a", b"b", b"00", b"ff", b"-x", b".hidden", b"\xff\xfe", b"a b", b"x=y", b"\\"]),
    names)
KEY_POOL = [b"user.shared", b"user.a", b"trusted.overlay.opaque", b"trusted.overlay.redirect",
            b"trusted.overlay.overlay.whiteout", b"security.selinux", b"system.posix_acl_access",
            b"user.overlay.whiteout", b"trusted.x", b"other.ns", b"lustre.x"]
# Values of the pool keys stay short: a long user value under a key the writer sets on a
# whiteout or its directory breaks libcomposefs' xattr accounting (a real, tested error).
pool_pairs = st.tuples(st.sampled_from(KEY_POOL), st.one_of(st.sampled_from([b"", b"y", b"shared-value"]), st.binary(max_size=30)))
free_pairs = st.tuples(st.binary(min_size=1, max_size=60).filter(lambda k: b"\0" not in k), st.binary(max_size=120))
xattr_sets = st.lists(st.one_of(pool_pairs, free_pairs), max_size=6).map(
    lambda pairs: tuple(sorted(dict(pairs).items())))
mtimes = st.one_of(st.just((1700000000, 0)), st.tuples(st.integers(-(2**40), 2**40), st.integers(0, 999_999_999)))
owners = st.sampled_from([0, 0, 1000, 65535, 65536, 2**32 - 1])


@st.composite
def trees(draw, max_entries: int = 30) -> Tree:
    t0 = draw(mtimes)
    root = Inode(S_IFDIR | draw(st.sampled_from([0o755, 0o700])), uid=draw(owners),
                 mtime=t0[0], mtime_nsec=t0[1], xattrs=draw(xattr_sets))
    dirs = [root]
    files: list[Inode] = []
    # A chain of nested directories, sometimes deep.
    depth = draw(st.sampled_from([0, 1, 5, 60]))
    parent = root
    for _ in range(depth):
        d = Inode(S_IFDIR | 0o755, mtime=t0[0], mtime_nsec=t0[1])
        parent.add_child(b"d", d)
        dirs.append(d)
        parent = d
    for _ in range(draw(st.integers(0, max_entries))):
        parent = draw(st.sampled_from(dirs))
        name = draw(short_names)
        if name in parent.children:
            continue
        kind = draw(st.sampled_from(["dir", "inline", "external", "empty", "symlink", "dev", "whiteout", "fifo", "link"]))
        mt = draw(mtimes)
        common = dict(uid=draw(owners), gid=draw(owners), mtime=mt[0], mtime_nsec=mt[1], xattrs=draw(xattr_sets))
        if kind == "dir":
            node = Inode(S_IFDIR | 0o755, **common)
            dirs.append(node)
        elif kind == "inline":
            content = draw(st.binary(min_size=1, max_size=5000))
            node = Inode(S_IFREG | 0o644, size=len(content), content=content, **common)
        elif kind == "external":
            size = draw(st.one_of(st.integers(1, 2**20), st.integers(1, 2**53)))
            digest = draw(st.one_of(st.none(), st.binary(min_size=32, max_size=32),  # SHA-256, SHA-512
                                    st.binary(min_size=64, max_size=64)))
            payload = draw(st.one_of(st.none(), st.just(b"ab/" + b"c" * 62), st.binary(min_size=1, max_size=100).filter(lambda p: b"\0" not in p)))
            node = Inode(S_IFREG | 0o755, size=size, payload=payload, digest=digest, **common)
        elif kind == "empty":
            node = Inode(S_IFREG | 0o600, **common)
        elif kind == "symlink":
            target = draw(st.binary(min_size=1, max_size=4095).filter(lambda p: b"\0" not in p))
            node = Inode(S_IFLNK | 0o777, size=len(target), payload=target, **common)
        elif kind == "dev":
            node = Inode(draw(st.sampled_from([S_IFCHR, S_IFBLK])) | 0o640, rdev=draw(st.integers(1, 2**32 - 1)), **common)
        elif kind == "whiteout":
            node = Inode(S_IFCHR | 0o644, rdev=0, **common)
        elif kind == "fifo":
            node = Inode(draw(st.sampled_from([S_IFIFO, S_IFSOCK])) | 0o644, **common)
        else:
            if not files:
                continue
            parent.add_child(name, draw(st.sampled_from(files)), link=True)
            continue
        parent.add_child(name, node)
        if kind != "dir":
            files.append(node)
    return Tree(root, "hypothesis")
