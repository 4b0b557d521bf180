"""Choose the composefs format version within `--min-version`/`--max-version`.

libcomposefs (`lcfs_write_update_version`): start at the minimum; if the maximum allows 1 and
the tree holds a whiteout (a character device 0:0, hardlink entries not counted), use 1,
because version 1 marks whiteout directories with `opaque=x` for newer overlayfs.
"""

from __future__ import annotations

from itertools import chain
from operator import attrgetter

from cfsc.base.errors import UsageError
from cfsc.base.options import Options
from cfsc.base.tree import S_IFCHR, S_IFMT, Tree

MAX_VERSION = 1


def has_whiteout(tree: Tree) -> bool:
    """Whether a home inode is a whiteout.  Most trees hold no character device at all: the
    modes of every directory's children, gathered in C, say so without the walk."""
    modes = set(map(_mode, chain.from_iterable(map(dict.values, map(_children, tree.directories())))))
    if not any(mode & S_IFMT == S_IFCHR for mode in modes):
        return False
    return has_whiteout_walk(tree)


def has_whiteout_walk(tree: Tree) -> bool:
    """The reference for `has_whiteout`: every home inode looked at."""
    for node in tree.home_inodes():
        if node.mode & S_IFMT == S_IFCHR and node.rdev == 0:
            return True
    return False


_mode = attrgetter("mode")
_children = attrgetter("children")


def select_version(tree: Tree, options: Options) -> Tree:
    if tree.lowered:
        return tree  # whiteouts were rewritten already; the choice was made before
    version, maximum = options.min_version, options.max_version
    maximum = max(maximum, version)
    for value, option in ((version, "--min-version"), (options.max_version, "--max-version")):
        if not 0 <= value <= MAX_VERSION:
            raise UsageError(f"format version {value}: expected 0 or 1", option)
    if version < 1 <= maximum and has_whiteout(tree):
        version = 1
    tree.version = version
    return tree
