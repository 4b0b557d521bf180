"""Check the tree against every limit libcomposefs enforces (see `cfsc.base.limits`).

Frontends check what they can while they still know the input position; this pass makes
the same rules hold for every tree, wherever it came from, and names the offending path.
Checks run per directory, column by column over all its names and children at once, and per
distinct xattr tuple (trees share a few tuples across many inodes); only a directory with
something unusual is checked child by child, which also finds the message.
"""

from __future__ import annotations

from operator import attrgetter

from cfsc.base import limits
from cfsc.base.errors import TreeError
from cfsc.base.options import Options
from cfsc.base.tree import NO_XATTRS, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Inode, Tree

EMPTY_ID = id(NO_XATTRS)
COLUMNS_FROM = 32  # children: below this, node by node is cheaper than column set-up


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


_mode = attrgetter("mode")
_xattrs = attrgetter("xattrs")
_payload = attrgetter("payload")
_content = attrgetter("content")
_size = attrgetter("size")
_mtime = attrgetter("mtime")
_mtime_nsec = attrgetter("mtime_nsec")


def _mtimes_ok(nodes: list[Inode]) -> bool:
    """Every mtime fits the inode's fields (the writer would otherwise store another time)."""
    secs = list(map(_mtime, nodes))
    nsecs = list(map(_mtime_nsec, nodes))
    return (limits.MTIME_MIN <= min(secs) and max(secs) <= limits.MTIME_MAX
            and 0 <= min(nsecs) and max(nsecs) <= limits.MTIME_NSEC_MAX)


def _directory_ok(nodes: list[Inode], good_xattrs: dict[int, tuple]) -> bool:
    """True when every child of a directory meets every limit, checked column by column
    (C-level `map`); False sends the directory to the node-by-node check for the message."""
    kinds = {m & S_IFMT for m in set(map(_mode, nodes))}
    if not kinds <= limits.VALID_TYPES or not _mtimes_ok(nodes):
        return False
    tuples = list(map(_xattrs, nodes))
    by_id = dict(zip(map(id, tuples), tuples, strict=True))
    for key in by_id.keys() - good_xattrs.keys() - {EMPTY_ID}:
        if limits.xattrs_problem(by_id[key]):
            return False
        good_xattrs[key] = by_id[key]
    if S_IFREG in kinds or S_IFLNK in kinds:
        payloads = [p for p in map(_payload, nodes) if p is not None]
        if payloads and (max(map(len, payloads)) >= limits.PATH_MAX or b"\0" in b"/".join(payloads)):
            return False
        if max(map(_size, nodes)) > limits.MAX_EXTERNAL_SIZE or any(c is not None for c in map(_content, nodes)):
            return False  # rare: inline content and huge files are checked one by one
        if S_IFLNK in kinds and any(n.mode & S_IFMT == S_IFLNK and not n.payload for n in nodes):
            return False
    return True


def validate_limits(tree: Tree, options: Options) -> Tree:
    if tree.checked:
        return tree  # the frontend enforced every one of these limits while reading
    good_xattrs: dict[int, tuple] = {}  # id -> tuple (kept alive so ids stay unique)

    def check(node: Inode) -> None:
        mode = node.mode & S_IFMT
        problem = None
        if mode != S_IFDIR:
            payload = node.payload
            if (mode != S_IFREG or node.content is not None or node.size > limits.MAX_EXTERNAL_SIZE
                    or (payload is not None and (len(payload) >= limits.PATH_MAX or b"\0" in payload))):
                problem = _inode_problem(node)
        if problem is None:
            problem = limits.check_mtime(node.mtime, node.mtime_nsec)
        xattrs = node.xattrs
        if problem is None and xattrs and id(xattrs) not in good_xattrs:
            problem = limits.xattrs_problem(xattrs)
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
        # Link entries name inodes checked at their home; checking them again is harmless.
        nodes = list(children.values())
        if len(nodes) < COLUMNS_FROM or not _directory_ok(nodes, good_xattrs):
            for node in nodes:
                check(node)
    return tree
