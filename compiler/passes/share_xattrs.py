"""Choose the shared xattr table (format note §3.4).

libcomposefs counts each exact (key, value) pair over all inodes; pairs on two or more inodes
are written once in a shared area and referenced by id.  The area is sorted in *descending*
order of key, then value length, then value bytes — an artefact of its qsort comparator
that the bytes depend on.
"""

from __future__ import annotations

from collections import Counter
from itertools import chain

from ..options import Options
from ..tree import Tree


def share_xattrs(tree: Tree, options: Options) -> Tree:
    inodes = tree.inodes if tree.inodes is not None else list(tree.home_inodes())
    counts = Counter(chain.from_iterable(n.xattrs for n in inodes))
    shared = [pair for pair, count in counts.items() if count > 1]
    shared.sort(key=_order_key, reverse=True)
    tree.shared_xattrs = shared
    return tree


def _order_key(pair: tuple[bytes, bytes]) -> tuple[bytes, int, bytes]:
    key, value = pair
    return key, len(value), value
