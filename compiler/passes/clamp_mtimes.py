"""Clamp modification times to `Options.clamp_mtime` (`--clamp-mtime`, from SOURCE_DATE_EPOCH).

reproducible-builds.org's rule, as `tar --clamp-mtime` applies it: a time later than the epoch
becomes the epoch, earlier ones stay, so files a build did not touch keep their dates while
everything the build wrote gets one fixed time.  The CLI reads the environment variable; this
pass only sees the number.
"""

from __future__ import annotations

from cfsc.base.options import Options
from cfsc.base.tree import Tree


def clamp_mtimes(tree: Tree, options: Options) -> Tree:
    epoch = options.clamp_mtime
    if epoch is None:
        return tree
    for node in tree.home_inodes():
        if node.mtime > epoch or (node.mtime == epoch and node.mtime_nsec):
            node.mtime = epoch
            node.mtime_nsec = 0
    return tree
