"""Give every inode exactly one home entry, and fill in link counts.

Frontends mark extra names of an inode in the parent's `links`.  This pass repairs what a
frontend (or a library user) left inconsistent, walking in name order so the repair is
deterministic: an inode reached as home twice keeps its first home and the others become
links; an inode reached only through links gets its first link promoted to home.

nlink: directories get 2 + their subdirectories (libcomposefs recomputes this); other inodes
keep a count their frontend was told (a dumpfile's NLINK) or get the number of names.

A hard link to a directory (a dumpfile's `@` line naming one, as upstream allows) must not
make the directory contain itself: every walker of the tree and of the image would loop,
and the kernel answers ELOOP.  Such a tree is refused here, for every source.

Speed: nearly every tree needs no repair, and most directories hold no link; `_walk_quick`
takes such a directory's children as a whole (a C-level set update, and for a large one
`map`s instead of a loop per child) and gives up as soon as a repair shows, for `_walk`,
the reference, to do it.  Inodes
are kept in sets by identity (they compare so), not by `id()`: a million new int objects
cost more than the walk.
"""

from __future__ import annotations

from itertools import compress
from operator import attrgetter

from cfsc.base.errors import TreeError
from cfsc.base.options import Options
from cfsc.base.tree import S_IFDIR, S_IFMT, Inode, Tree

_mode = attrgetter("mode")
_nlink = attrgetter("nlink")
COLUMNS_FROM = 32  # children: below this, a loop over them is cheaper than setting up `map`s


def resolve_hardlinks(tree: Tree, options: Options) -> Tree:
    quick = _walk_quick(tree)
    if quick is None:
        return resolve_hardlinks_walk(tree, options)
    names, uncounted = quick
    for node in uncounted:
        node.nlink = names.get(node, 1)
    _check_directory_links(tree, names)
    return tree


def resolve_hardlinks_walk(tree: Tree, options: Options) -> Tree:
    """The reference for `resolve_hardlinks`: every entry looked at one by one."""
    homes, names, orphans, repaired, uncounted = _walk(tree, in_order=False)
    if repaired or orphans:
        # Repairs must not depend on dict order: redo them walking in name order.
        homes, names, orphans, _, uncounted = _walk(tree, in_order=True)
    while orphans:
        for parent, name, child in orphans:
            if child not in homes:
                homes.add(child)
                parent.add_child(name, child)  # clears the link mark
        homes, names, orphans, _, uncounted = _walk(tree, in_order=True)
    for node in uncounted:
        node.nlink = names.get(node, 1)
    _check_directory_links(tree, names)
    return tree


def _check_directory_links(tree: Tree, linked) -> None:
    """Refuse a directory that contains itself through hard links (`linked`: the inodes
    reached under more than one name; only a tree linking a directory is walked again)."""
    if not any(node.mode & S_IFMT == S_IFDIR for node in linked):
        return
    state: dict[Inode, int] = {tree.root: 1}  # 1: on the current path, 2: done
    stack = [(tree.root, iter(tree.root.children.items()))]  # type: ignore[union-attr]
    while stack:
        node, it = stack[-1]
        for name, child in it:
            if child.children is None:
                continue
            mark = state.get(child)
            if mark == 1:  # (named at its parent's home: a path the input has)
                raise TreeError("leads back to a directory that contains it: hard links to directories make a "
                                "directory cycle", tree.path_of(node).rstrip(b"/") + b"/" + name)
            if mark is None:
                state[child] = 1
                stack.append((child, iter(child.children.items())))
                break
        else:
            stack.pop()
            state[node] = 2


def _walk_quick(tree: Tree) -> tuple[dict[Inode, int], list[Inode]] | None:
    """(names of inodes with extra names, inodes whose nlink is to be counted) when the tree
    needs no repair, its directories' nlink set on the way; None as soon as one shows (the
    nlink of the directories walked so far is then set again by `_walk`)."""
    homes = {tree.root}
    names: dict[Inode, int] = {}
    linked = []  # inodes reached through a link: each must have a home by the end
    uncounted: list[Inode] = []
    stack = [tree.root]
    while stack:
        node = stack.pop()
        children = node.children
        assert children is not None
        links = node.links
        if links is None:
            nodes = children.values()
            size = len(homes)
            homes.update(nodes)
            if len(homes) - size != len(children):
                return None  # an inode reached as home a second time
        else:
            nodes = [child for name, child in children.items() if name not in links]
            size = len(homes)
            homes.update(nodes)
            if len(homes) - size != len(nodes):
                return None
            for name, child in children.items():
                if name in links:
                    names[child] = names.get(child, 1) + 1
                    linked.append(child)
        if len(nodes) < COLUMNS_FROM:
            subdirs = 0
            for child in nodes:
                if child.mode & S_IFMT == S_IFDIR:
                    subdirs += 1
                    stack.append(child)
                elif child.nlink is None:
                    uncounted.append(child)
            node.nlink = 2 + subdirs
            continue
        found = list(compress(nodes, map(S_IFDIR.__eq__, map(S_IFMT.__and__, map(_mode, nodes)))))
        stack.extend(found)
        node.nlink = 2 + len(found)
        if None in map(_nlink, nodes):
            uncounted.extend(child for child in nodes if child.nlink is None and child.mode & S_IFMT != S_IFDIR)
    if not homes.issuperset(linked):
        return None  # a link to an inode without a home
    return names, uncounted


def _walk(tree: Tree, in_order: bool):
    """The reference: every entry looked at, in name order with `in_order`; repairs an inode
    reached as home twice (in order only) and lists the links to inodes without a home."""
    repaired = False
    homes = {tree.root}
    names: dict[Inode, int] = {}  # inode -> names, only for inodes with extra names
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
            links = node.links
            if links is not None and name in links:
                names[child] = names.get(child, 1) + 1
                if child not in homes:
                    orphans.append((node, name, child))
                continue
            if child in homes:  # reached as home a second time: demote to a link
                repaired = True
                if not in_order:
                    continue
                node.add_child(name, child, link=True)
                names[child] = names.get(child, 1) + 1
                continue
            homes.add(child)
            if child.mode & S_IFMT == S_IFDIR:
                subdirs += 1
                stack.append(child)
            elif child.nlink is None:
                uncounted.append(child)
        node.nlink = 2 + subdirs
    return homes, names, [o for o in orphans if o[2] not in homes], repaired, uncounted
