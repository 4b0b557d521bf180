"""The compiler pipeline: frontend → passes → backend.  Read top to bottom, this is the design.

Order follows libcomposefs' `lcfs_write_to` (format note §0): validation and version choice
see the tree as the user gave it; the overlay rewrite lowers it to composefs' conventions;
ordering and xattr sharing then fix everything the image layout depends on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from cfsc.base.errors import TreeError
from cfsc.base.options import Options
from cfsc.base.tree import Tree
from cfsc.passes.add_overlay_xattrs import add_overlay_xattrs
from cfsc.passes.clamp_mtimes import clamp_mtimes
from cfsc.passes.exclude_entries import exclude_entries
from cfsc.passes.order_inodes import order_inodes
from cfsc.passes.resolve_hardlinks import resolve_hardlinks
from cfsc.passes.select_version import select_version
from cfsc.passes.share_xattrs import share_xattrs
from cfsc.passes.validate_limits import validate_limits

PASSES = (
    exclude_entries,     # --exclude: drop what the user's queries select
    clamp_mtimes,        # --clamp-mtime: nothing later than SOURCE_DATE_EPOCH
    resolve_hardlinks,   # one home entry per inode; nlink
    validate_limits,     # every limit libcomposefs enforces
    select_version,      # format 0 or 1 within the allowed range
    add_overlay_xattrs,  # escaping, redirect/metacopy, whiteouts, root opaque + whiteouts
    order_inodes,        # sorted children, breadth-first inode numbers
    share_xattrs,        # the shared xattr table
)


@contextlib.contextmanager
def located(tree: Tree) -> Iterator[None]:
    """A `TreeError` raised inside names the input position of its path, where the frontend
    can tell it (`Tree.locate`: a dumpfile's `file:line`, an OSTree dirtree object)."""
    try:
        yield
    except TreeError as e:
        where = tree.locate(e.raw_path) if tree.locate is not None else None
        if where is None:
            raise
        raise TreeError(e.what, e.raw_path, where) from None


def run_passes(tree: Tree, options: Options | None = None, passes: Sequence = PASSES) -> Tree:
    """Run `passes` (all of them, in order, by default) over the tree; errors are `located`."""
    options = options or Options()
    with located(tree):
        for compiler_pass in passes:
            tree = compiler_pass(tree, options)
    return tree
