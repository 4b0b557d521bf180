"""Rewrite the tree into composefs' on-disk conventions (the overlayfs xattrs).

Follows libcomposefs 1.0.8 `rewrite_tree_for_erofs` (format note §4):

1. every `trusted.overlay.X` the user has becomes `trusted.overlay.overlay.X`, which the kernel
   overlay shows back as `trusted.overlay.X` (`user.overlay.*` is left alone);
2. an external regular file (size > 0, no inline content) carries `trusted.overlay.metacopy`
   (the fs-verity digest, or empty) and `trusted.overlay.redirect` = `/` + payload;
3. a whiteout (character device 0:0) becomes an empty regular file marked with
   `trusted.overlay.overlay.whiteout` and `user.overlay.whiteout`; its directory gets the
   `…whiteouts` markers and, in format 1, `…opaque=x`;
4. the root gets `trusted.overlay.opaque=y`, then 256 char-device whiteouts `00`…`ff` (unless
   a name is taken) that hide the store's fan-out directories from the mount.

Step 2 is *implied*, not stored: the two xattrs are a pure function of the file's payload
and digest (`implied_xattrs`), unique per file, and a million-file tree would otherwise hold
two million extra tuples (~330 bytes a file) only for the writer to take them apart again.
A lowered tree's on-disk xattrs of an inode are `image_xattrs(node)`; the sharing pass and
the EROFS writer are the two consumers, and both go through these functions.

libcomposefs budgets xattrs per inode while it sets them (§3.6) and starts that count from 0
here, so setting a key the user already had can fail ("Numerical result out of range").  Only
inodes this pass sets keys on can fail, and only whiteouts and their directories can collide,
so the budget is tracked just for those (step 2 cannot fail: its keys are never the user's,
whose `trusted.overlay.*` were escaped, and its values are small).
"""

from __future__ import annotations

from cfsc.base import limits
from cfsc.base.errors import TreeError
from cfsc.base.options import Options
from cfsc.base.tree import S_IFCHR, S_IFMT, S_IFREG, Inode, Tree

TRUSTED_OVERLAY = b"trusted.overlay."
ESCAPED = b"trusted.overlay.overlay."
METACOPY = b"trusted.overlay.metacopy"
REDIRECT = b"trusted.overlay.redirect"
OPAQUE = b"trusted.overlay.opaque"
ESCAPED_WHITEOUT = b"trusted.overlay.overlay.whiteout"
ESCAPED_WHITEOUTS = b"trusted.overlay.overlay.whiteouts"
ESCAPED_OPAQUE = b"trusted.overlay.overlay.opaque"
USER_WHITEOUT = b"user.overlay.whiteout"
USER_WHITEOUTS = b"user.overlay.whiteouts"
USER_OPAQUE = b"user.overlay.opaque"
SELINUX = b"security.selinux"
METACOPY_HEADER = bytes((0, 36, 0, 1))  # version 0, length 36, flags 0, SHA-256
METACOPY_EMPTY = (METACOPY, b"")
ROOT_WHITEOUT_MODE = S_IFCHR | 0o644
ROOT_WHITEOUT_NAMES = tuple(f"{i:02x}".encode() for i in range(256))


class _Budget:
    """libcomposefs' per-inode xattr accounting, restarted at 0 as its deep copy does."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.used: dict[int, int] = {}

    def set(self, node: Inode, key: bytes, value: bytes) -> None:
        items = dict(node.xattrs)
        used = self.used.get(id(node), 0)
        old = items.pop(key, None)
        if old is not None:
            used = used - limits.xattr_cost(key, old) if items else 0
        used += limits.xattr_cost(key, value) + (0 if items else limits.XATTR_HEADER_SIZE)
        # The C counter is unsigned: a negative total wraps around and fails the check too.
        if not 0 <= used <= limits.XATTR_ACCOUNTING_MAX:
            raise TreeError(
                f"cannot set {key.decode()}: it replaces the input's value and breaks libcomposefs'"
                " xattr accounting (mkcomposefs fails with 'Numerical result out of range')",
                self.tree.path_of(node), self.tree.source)
        self.used[id(node)] = used
        items[key] = value
        node.xattrs = tuple(sorted(items.items()))


def is_external(node: Inode) -> bool:
    """A regular file whose data lives in the store (it gets metacopy and redirect)."""
    return node.mode & S_IFMT == S_IFREG and node.size > 0 and node.content is None


def implied_xattrs(node: Inode) -> tuple:
    """metacopy and redirect of an external regular file (sorted), else ()."""
    if not is_external(node):
        return ()
    digest = node.digest
    metacopy = (METACOPY, METACOPY_HEADER + digest) if digest is not None else METACOPY_EMPTY
    payload = node.payload
    return (metacopy, (REDIRECT, b"/" + payload)) if payload else (metacopy,)


def image_xattrs(node: Inode) -> tuple:
    """All xattrs an inode of a lowered tree carries on disk, sorted by key."""
    implied = implied_xattrs(node)
    return tuple(sorted(node.xattrs + implied)) if implied else node.xattrs


def _escaped(xattrs: tuple) -> tuple:
    return tuple(sorted(
        (ESCAPED + k[16:] if k.startswith(TRUSTED_OVERLAY) else k, v) for k, v in xattrs))


def add_overlay_xattrs(tree: Tree, options: Options) -> Tree:
    if tree.lowered:
        return tree
    version = tree.version if tree.version is not None else options.min_version
    budget = _Budget(tree)
    # id(original tuple) -> (original, escaped); the original is kept so its id stays unique.
    # Most tuples need no escaping and map to themselves.
    escaped_cache: dict[int, tuple[tuple, tuple]] = {}

    def escaped(xattrs: tuple) -> tuple:
        hit = escaped_cache.get(id(xattrs))
        if hit is None:
            new = _escaped(xattrs) if any(k.startswith(TRUSTED_OVERLAY) for k, _ in xattrs) else xattrs
            escaped_cache[id(xattrs)] = (xattrs, new)
            return new
        return hit[1]

    root = tree.root
    root.xattrs = escaped(root.xattrs)
    for parent in list(tree.directories()):
        children = parent.children
        assert children is not None
        links = parent.links
        whiteouts = []
        for name, node in children.items():
            if links is not None and name in links:
                continue
            xattrs = node.xattrs
            if xattrs:
                new = escaped(xattrs)
                if new is not xattrs:
                    node.xattrs = new
            if node.mode & S_IFMT == S_IFCHR and node.rdev == 0:
                whiteouts.append(name)
        if whiteouts:
            whiteouts.sort()  # the budget depends on the order keys are set in
            for name in whiteouts:
                node = children[name]
                node.mode = S_IFREG | (node.mode & ~S_IFMT)
                node.size = 0
                node.content = None
                budget.set(node, ESCAPED_WHITEOUT, b"")
                budget.set(node, USER_WHITEOUT, b"")
                budget.set(parent, ESCAPED_WHITEOUTS, b"")
                budget.set(parent, USER_WHITEOUTS, b"")
                if version >= 1:
                    budget.set(parent, ESCAPED_OPAQUE, b"x")
                    budget.set(parent, USER_OPAQUE, b"x")

    budget.set(root, OPAQUE, b"y")
    selinux = root.get_xattr(SELINUX)
    whiteout_xattrs = ((SELINUX, selinux),) if selinux is not None else ()
    root_children = root.children
    assert root_children is not None
    for name in ROOT_WHITEOUT_NAMES:
        if name not in root_children:
            root_children[name] = Inode(
                ROOT_WHITEOUT_MODE, uid=root.uid, gid=root.gid, mtime=root.mtime,
                mtime_nsec=root.mtime_nsec, nlink=1, xattrs=whiteout_xattrs)
    tree.version = version
    tree.lowered = True
    return tree
