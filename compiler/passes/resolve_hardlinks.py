"""Give every inode exactly one home entry, and fill in link counts.

Frontends mark extra names of an inode in the parent's `links`.  This pass repairs what a
frontend (or a library user) left inconsistent, walking in name order so the repair is
deterministic: an inode reached as home twice keeps its first home and the others become
links; an inode reached only through links gets its first link promoted to home.

nlink: directories get 2 + their subdirectories (libcomposefs recomputes this); other inodes
keep a count their frontend was told (a dumpfile's NLINK) or get the number of names.
"""

from __future__ import annotations

from cfsc.base.options import Options
from cfsc.base.tree import S_IFDIR, S_IFMT, Tree


def resolve_hardlinks(tree: Tree, options: Options) -> Tree:
    homes, names, orphans, repaired, uncounted = _walk(tree, in_order=False)
    if repaired or orphans:
        # Repairs must not depend on dict order: redo them walking in name order.
        homes, names, orphans, _, uncounted = _walk(tree, in_order=True)
    while orphans:
        for parent, name, child in orphans:
            if id(child) not in homes:
                homes.add(id(child))
                parent.add_child(name, child)  # clears the link mark
        homes, names, orphans, _, uncounted = _walk(tree, in_order=True)
    for node in uncounted:
        node.nlink = names.get(id(node), 1)
    return tree


def _walk(tree: Tree, in_order: bool):
    repaired = False
    homes = {id(tree.root)}
    names: dict[int, int] = {}  # id(inode) -> names, only for inodes with extra names
    orphans = []  # (dir, name, inode): links to inodes without a home so far
    uncounted = []  # home inodes whose frontend left nlink to us
    stack = [tree.root]
    while stack:
        node = stack.pop()
        children = node.children
        assert children is not None
        subdirs = 0
        for name in sorted(children) if in_order else children:
            child = children[name]
            key = id(child)
            links = node.links
            if links is not None and name in links:
                names[key] = names.get(key, 1) + 1
                if key not in homes:
                    orphans.append((node, name, child))
                continue
            if key in homes:  # reached as home a second time: demote to a link
                repaired = True
                if not in_order:
                    continue
                node.add_child(name, child, link=True)
                names[key] = names.get(key, 1) + 1
                continue
            homes.add(key)
            if child.mode & S_IFMT == S_IFDIR:
                subdirs += 1
                stack.append(child)
            elif child.nlink is None:
                uncounted.append(child)
        node.nlink = 2 + subdirs
    return homes, names, [o for o in orphans if id(o[2]) not in homes], repaired, uncounted

