"""An oracle beyond "no crash": the image holds the numbers of the tree it was written from.

A value the inode fields cannot hold must be refused before writing (the frontend names the
input position, `validate_limits` the path); one that is written anyway comes back different
(an mtime reduced modulo 2^64, say), which this check reports as a crash.
"""

from __future__ import annotations

from cfsc.backends.erofs.reader import Image
from cfsc.base.tree import S_IFCHR, S_IFMT, S_IFREG, Tree
from cfsc.frontends.image import read_tree


class Changed(AssertionError):
    """An entry's numbers differ between the compiled tree and the image read back."""


def _numbers(tree: Tree) -> dict[bytes, tuple]:
    out = {}
    for path, node, parent, _link in tree.walk():
        if parent is tree.root and node.mode & S_IFMT == S_IFCHR and node.rdev == 0:
            continue  # the root's whiteouts: the writer adds 00…ff, the reader drops them all
        size = node.size if node.mode & S_IFMT == S_IFREG else None  # other sizes are the compiler's
        out[path] = (node.mode, node.uid, node.gid, node.mtime, node.mtime_nsec, node.rdev, size)
    return out


def numbers(tree: Tree) -> dict[bytes, tuple]:
    """What `check_image` compares, taken from the frontend's tree before the passes change
    it (whiteouts, for one, are written as files the reader turns back into whiteouts)."""
    return _numbers(tree)


def check_image(want: dict[bytes, tuple], image: bytes) -> None:
    """`want`: `numbers` of the tree `image` was compiled from."""
    got = _numbers(read_tree(Image(image)))
    for path in want.keys() | got.keys():
        if want.get(path) != got.get(path):
            raise Changed(f"{path!r}: compiled {want.get(path)}, the image holds {got.get(path)}")
