"""Check the tree against every limit libcomposefs enforces (see `cfsc.limits`).

Frontends check what they can while they still know the input position; this pass makes
the same rules hold for every tree, wherever it came from, and names the offending path.
xattr sets are usually shared tuples, so each distinct set is checked once.
"""

from __future__ import annotations

from .. import limits
from ..errors import TreeError
from ..options import Options
from ..tree import S_IFLNK, S_IFMT, S_IFREG, Tree


def validate_limits(tree: Tree, options: Options) -> Tree:
    checked_xattrs: set[int] = set()
    check_name = limits.check_name
    valid_types = limits.VALID_TYPES
    for node in tree.home_inodes():
        children = node.children
        if children:
            for name in children:
                if not 0 < len(name) <= limits.NAME_MAX or b"/" in name or name in (b".", b".."):
                    problem = check_name(name)
                    if problem:
                        raise TreeError(problem, tree.path_of(node).rstrip(b"/") + b"/" + name, tree.source)
        mode = node.mode
        ftype = mode & S_IFMT
        problem = None
        if ftype not in valid_types:
            problem = limits.check_mode(mode)
        elif ftype == S_IFREG:
            content = node.content
            if content is not None:
                if len(content) > limits.INLINE_CONTENT_MAX or len(content) != node.size:
                    problem = limits.check_content(content) or (
                        f"inline content of {len(content)} bytes: must match size {node.size}")
            elif node.size > limits.MAX_EXTERNAL_SIZE:
                problem = limits.check_external_size(node.size)
            if problem is None and node.payload is not None and len(node.payload) >= limits.PATH_MAX:
                problem = limits.check_payload(node.payload)
        elif ftype == S_IFLNK:
            problem = limits.check_symlink(node.payload)
        if problem is None:
            xattrs = node.xattrs
            if xattrs and id(xattrs) not in checked_xattrs:
                for key, value in xattrs:
                    problem = limits.check_xattr(key, value)
                    if problem:
                        break
                else:
                    problem = limits.check_xattr_budget(xattrs)
                    if problem is None:
                        checked_xattrs.add(id(xattrs))
        if problem:
            raise TreeError(problem, tree.path_of(node), tree.source)
    return tree
