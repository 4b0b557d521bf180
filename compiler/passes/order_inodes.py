"""Put the tree in composefs' canonical order and number the inodes.

libcomposefs `lcfs_compute_tree`: children sorted bytewise by name; inodes numbered
breadth-first from the root (0), each at its home entry (hardlink entries are skipped).  The
image lays inodes out in this order, and `i_ino` is the number, so it is also the inode
number a mount shows.
"""

from __future__ import annotations

from cfsc.base.options import Options
from cfsc.base.tree import Tree


def order_inodes(tree: Tree, options: Options) -> Tree:
    root = tree.root
    inodes = [root]
    append = inodes.append
    extend = inodes.extend
    for index, node in enumerate(inodes):  # (the loop goes on over what the directories add)
        node.ino = index
        children = node.children
        if children:
            if len(children) > 1:
                names = sorted(children)  # (bytewise; most inputs come sorted already)
                if names != list(children):
                    children = node.children = {name: children[name] for name in names}
            links = node.links
            if links is None:
                extend(children.values())
            else:
                for name, child in children.items():
                    if name not in links:
                        append(child)
    tree.inodes = inodes
    return tree
