"""Rewrite the tree into composefs' on-disk conventions (the overlayfs xattrs).

Follows libcomposefs 1.0.8 `rewrite_tree_for_erofs` (format note §4); the keys, values and
encodings are declared in `cfsc.backends.erofs.overlay`, this pass only applies them:

1. every `trusted.overlay.X` the user has becomes `trusted.overlay.overlay.X`, which the kernel
   overlay shows back as `trusted.overlay.X` (`user.overlay.*` is left alone);
2. an external regular file (size > 0, no inline content) carries `trusted.overlay.metacopy`
   (the fs-verity digest, or empty) and `trusted.overlay.redirect` = `/` + payload;
3. a whiteout (character device 0:0) becomes an empty regular file marked with
   `trusted.overlay.overlay.whiteout` and `user.overlay.whiteout`; its directory gets the
   `…whiteouts` markers and, in format 1, `…opaque=x`;
4. the root gets `trusted.overlay.opaque=y`, then 256 char-device whiteouts `00`…`ff` (unless
   a name is taken) that hide the store's fan-out directories from the mount.

Step 2 is *implied*, not stored (`overlay.implied_xattrs`): a lowered tree's on-disk xattrs of
an inode are `overlay.image_xattrs(node)`; the sharing pass and the EROFS writer are the two
consumers, and both go through these functions.

libcomposefs budgets xattrs per inode while it sets them (§3.6) and starts that count from 0
here, so setting a key the user already had can fail ("Numerical result out of range").  Only
inodes this pass sets keys on can fail, and only whiteouts and their directories can collide,
so the budget is tracked just for those (step 2 cannot fail: its keys are never the user's,
whose `trusted.overlay.*` were escaped, and its values are small).
"""

from __future__ import annotations

from cfsc.backends.erofs.overlay import (
    ESCAPED_OPAQUE,
    ESCAPED_WHITEOUT,
    ESCAPED_WHITEOUTS,
    OPAQUE,
    OPAQUE_DIR,
    OPAQUE_WHITEOUTS,
    ROOT_WHITEOUT_MODE,
    ROOT_WHITEOUT_NAMES,
    TRUSTED_OVERLAY,
    USER_OPAQUE,
    USER_WHITEOUT,
    USER_WHITEOUTS,
    escaped_xattrs,
)
from cfsc.base import limits
from cfsc.base.errors import TreeError
from cfsc.base.options import Options
from cfsc.base.tree import S_IFCHR, S_IFMT, S_IFREG, Inode, Tree

SELINUX = b"security.selinux"  # the root whiteouts carry the root's label


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
            new = escaped_xattrs(xattrs) if any(k.startswith(TRUSTED_OVERLAY) for k, _ in xattrs) else xattrs
            escaped_cache[id(xattrs)] = (xattrs, new)
            return new
        return hit[1]

    root = tree.root
    root.xattrs = escaped(root.xattrs)
    # The walk of `Tree.directories`, fused with the pass's own loop over each directory's
    # entries: one pass over the entries, not two (64k: 16 -> 10 ms).
    stack = [root]
    while stack:
        parent = stack.pop()
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
            if node.children is not None:
                stack.append(node)
            elif node.mode & S_IFMT == S_IFCHR and node.rdev == 0:
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
                    budget.set(parent, ESCAPED_OPAQUE, OPAQUE_WHITEOUTS)
                    budget.set(parent, USER_OPAQUE, OPAQUE_WHITEOUTS)

    budget.set(root, OPAQUE, OPAQUE_DIR)
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
