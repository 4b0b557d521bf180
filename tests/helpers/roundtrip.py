"""Trees that survive a trip through upstream's dump format, and that dump of an image."""

from __future__ import annotations

import io

from cfsc.backends.dumpfile import dump_image
from cfsc.backends.erofs.reader import Image
from cfsc.base.tree import Tree

# what upstream's reader drops by design (tests/test_image_reader.py says why)
LOSSY_KEYS = {b"user.overlay.whiteout", b"user.overlay.whiteouts", b"trusted.overlay.whiteout",
              b"trusted.overlay.whiteouts"}


def dump_of(image: bytes) -> bytes:
    out = io.BytesIO()
    dump_image(Image(image, "test.cfs"), out)
    return out.getvalue()


def lossless(tree: Tree) -> Tree:
    """Drop the xattrs upstream's reader drops by design (see the test above)."""
    for node in tree.home_inodes():
        if any(k in LOSSY_KEYS for k, _v in node.xattrs):
            node.xattrs = tuple(kv for kv in node.xattrs if kv[0] not in LOSSY_KEYS)
    return tree


def home_first_in_dfs(tree: Tree) -> Tree:
    """Make each hard-linked inode's home its first name in a sorted depth-first walk.

    `composefs-info dump` marks the first depth-first occurrence as the primary line, and a
    dumpfile's primary line is the home; the compiler lays inodes out breadth-first by home,
    so only trees whose homes are first depth-first survive a trip through the dump.
    """
    names = [(parent, path.rpartition(b"/")[2], node) for path, node, parent, _link in tree.walk()
             if parent is not None and node.children is None]
    seen: set[int] = set()
    for parent, name, node in names:
        parent.add_child(name, node, link=id(node) in seen)
        seen.add(id(node))
    return tree
