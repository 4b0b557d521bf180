"""Leave out the entries `Options.exclude` selects (`cfsc compile --exclude QUERY`, `cfsc.base.query`).

A pass rather than a frontend feature, so it works the same for every source (dumpfile,
directory, tar, CRFS, image …) and runs before anything derives state from the tree: the
version choice sees no excluded whiteout, hard links are re-homed by `resolve_hardlinks`.

* A matching entry goes with everything below it; the root is never tested.
* A name of a hard-linked inode goes alone: the inode stays under its other names (its first
  remaining link becomes its home), and a link count the frontend was told (a dumpfile's
  NLINK) drops by one per removed name, so `stat` agrees with the names that are left.
"""

from __future__ import annotations

from cfsc.base.options import Options
from cfsc.base.tree import Inode, Tree


def exclude_entries(tree: Tree, options: Options) -> Tree:
    if not options.exclude or tree.lowered:  # a lowered tree was filtered before it was lowered
        return tree
    from cfsc.base import query  # (lark is only imported when there is a query)

    matches = query.any_of(options.exclude, "--exclude")
    assert matches is not None
    linked = _link_targets(tree)  # id -> inode, for inodes with more than one name
    removed: dict[int, int] = {}  # id(inode) -> names removed, for linked inodes only
    stack = [(b"", tree.root)]
    while stack:
        prefix, directory = stack.pop()
        children = directory.children
        assert children is not None
        doomed = [name for name, child in children.items() if matches(prefix + b"/" + name, child)]
        for name in doomed:
            is_link = directory.is_link(name)
            child = directory.remove_child(name)
            if linked:
                _count_removed(child, is_link, linked, removed)
        links = directory.links
        for name, child in children.items():
            if child.children is not None and (links is None or name not in links):
                stack.append((prefix + b"/" + name, child))
    for key, count in removed.items():
        node = linked[key]
        if node.nlink is not None and not node.is_dir():
            node.nlink = max(1, node.nlink - count)
    return tree


def _link_targets(tree: Tree) -> dict[int, Inode]:
    targets: dict[int, Inode] = {}
    for directory in tree.directories():
        if directory.links:
            for name in directory.links:
                child = directory.children[name]  # type: ignore[index]
                targets[id(child)] = child
    return targets


def _count_removed(top: Inode, is_link: bool, linked: dict[int, Inode], removed: dict[int, int]) -> None:
    """Count the names of linked inodes that go away with the entry `top` (and below it)."""
    stack = [(top, is_link)]
    while stack:
        node, link = stack.pop()
        if id(node) in linked:
            removed[id(node)] = removed.get(id(node), 0) + 1
        if not link and node.children is not None:
            links = node.links
            stack.extend((child, links is not None and name in links) for name, child in node.children.items())
