"""Check the tree against every limit libcomposefs enforces (see `cfsc.limits`).

Frontends check what they can while they still know the input position; this pass makes
the same rules hold for every tree, wherever it came from, and names the offending path.
Checks run per directory on all names at once and per distinct xattr tuple (trees share a
few tuples across many inodes), so the common case costs little more than the walk.
"""

from __future__ import annotations

from .. import limits
from ..errors import TreeError
from ..options import Options
from ..tree import S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Inode, Tree


def _names_ok(children: dict) -> bool:
    joined = b"/".join(children)
    return (joined.count(b"/") == len(children) - 1 and b"\0" not in joined
            and max(map(len, children)) <= limits.NAME_MAX
            and b"" not in children and b"." not in children and b".." not in children)


def _inode_problem(node: Inode) -> str | None:
    mode = node.mode
    ftype = mode & S_IFMT
    if ftype not in limits.VALID_TYPES:
        return limits.check_mode(mode)
    if ftype == S_IFREG:
        content = node.content
        if content is not None:
            if len(content) != node.size:
                return f"inline content of {len(content)} bytes: must match size {node.size}"
            return limits.check_content(content)
        if node.size > limits.MAX_EXTERNAL_SIZE:
            return limits.check_external_size(node.size)
        if node.payload is not None:
            return limits.check_payload(node.payload)
    elif ftype == S_IFLNK:
        return limits.check_symlink(node.payload)
    return None


def _xattrs_problem(xattrs: tuple) -> str | None:
    for key, value in xattrs:
        problem = limits.check_xattr(key, value)
        if problem:
            return problem
    return limits.check_xattr_budget(xattrs)


def validate_limits(tree: Tree, options: Options) -> Tree:
    good_xattrs: dict[int, tuple] = {}  # id -> tuple (kept alive so ids stay unique)

    def check(node: Inode) -> None:
        mode = node.mode & S_IFMT
        problem = None
        if mode != S_IFDIR and (mode != S_IFREG or node.content is not None or node.size > limits.MAX_EXTERNAL_SIZE
                                or node.payload is not None):
            problem = _inode_problem(node)
        xattrs = node.xattrs
        if problem is None and xattrs and id(xattrs) not in good_xattrs:
            problem = _xattrs_problem(xattrs)
            if problem is None:
                good_xattrs[id(xattrs)] = xattrs
        if problem:
            raise TreeError(problem, tree.path_of(node), tree.source)

    check(tree.root)
    for directory in tree.directories():
        children = directory.children
        if not children:
            continue
        if not _names_ok(children):
            for name in children:
                problem = limits.check_name(name)
                if problem:
                    raise TreeError(problem, tree.path_of(directory).rstrip(b"/") + b"/" + name, tree.source)
        links = directory.links
        for name, node in children.items():
            if links is None or name not in links:
                check(node)
    return tree
