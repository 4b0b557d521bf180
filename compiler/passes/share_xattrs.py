"""Choose the shared xattr table (format note §3.4).

libcomposefs counts each exact (key, value) pair over all inodes (after the overlay rewrite,
so metacopy/redirect count too); pairs on two or more inodes are written once in a shared
area and referenced by id.  The area is sorted in *descending*
order of key, then value length, then value bytes — an artefact of its qsort comparator
that the bytes depend on.
"""

from __future__ import annotations

from collections import Counter
from itertools import chain
from operator import attrgetter

from cfsc.backends.erofs.overlay import metacopy_xattr, redirect_xattr
from cfsc.base.options import Options
from cfsc.base.tree import S_IFMT, S_IFREG, Tree


def share_xattrs(tree: Tree, options: Options) -> Tree:
    inodes = tree.inodes if tree.inodes is not None else list(tree.home_inodes())
    counts = Counter(chain.from_iterable(map(attrgetter("xattrs"), inodes)))
    if tree.lowered:
        # The implied metacopy/redirect pairs (`overlay.implied_xattrs`) repeat only when
        # digests or payloads do: count those values, not millions of materialised pairs.
        # `overlay.is_external`, written out: a call per inode costs 20% of this scan.
        externals = [n for n in inodes if n.mode & S_IFMT == S_IFREG and n.size > 0 and n.content is None]
        # (a Counter, not a set first: a real OS repeats some, so it was built anyway; but a
        # tree without digests, a payload-only dumpfile's, is one count of None, at C speed)
        digests = [n.digest for n in externals]
        unknown = digests.count(None)
        if unknown == len(digests):
            if unknown > 1:
                counts[metacopy_xattr(None)] += unknown
        else:
            for digest, times in Counter(digests).items():
                if times > 1:
                    counts[metacopy_xattr(digest)] += times
        payloads = Counter([n.payload for n in externals])
        payloads.pop(None, None)
        payloads.pop(b"", None)
        for payload, times in payloads.items():
            if times > 1:
                counts[redirect_xattr(payload)] += times
    shared = [pair for pair, count in counts.items() if count > 1]
    shared.sort(key=_order_key, reverse=True)
    tree.shared_xattrs = shared
    return tree


def _order_key(pair: tuple[bytes, bytes]) -> tuple[bytes, int, bytes]:
    key, value = pair
    return key, len(value), value
