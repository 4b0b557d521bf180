"""The typed tree every frontend produces and every backend consumes.

One `Inode` class for all file types keeps per-entry state small (`__slots__`, no per-type
subclasses whose layout would forbid a whiteout turning into a regular file in place) and lets
the hot loops test `mode & S_IFMT` instead of `isinstance`.  Names, payloads, symlink targets,
xattr keys and values are `bytes` throughout.

Names live in directories, not on inodes: `Inode.children` maps a name to the inode it names.
A hard link is the same `Inode` object reached under several names.  Exactly one of those names
is the inode's *home* (the entry composefs lays the inode out at, like the non-`@` line of a
dumpfile); the others are listed in the parent's `links` set.  composefs orders inodes
breadth-first by home entry, so which name is home changes the image bytes, not the tree.

xattrs are a tuple of `(key, value)` pairs sorted by key with unique keys.  The canonical,
immutable form lets frontends intern identical sets (most trees repeat a handful of SELinux
labels) so a million inodes share a few hundred tuples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

S_IFMT = 0o170000
S_IFSOCK = 0o140000
S_IFLNK = 0o120000
S_IFREG = 0o100000
S_IFBLK = 0o060000
S_IFDIR = 0o040000
S_IFCHR = 0o020000
S_IFIFO = 0o010000

# The file types and their names (queries, JSON lines, manifests, CRFS TOCs, statistics).
FILE_TYPES = {
    S_IFREG: "reg",
    S_IFDIR: "dir",
    S_IFLNK: "symlink",
    S_IFBLK: "block",
    S_IFCHR: "char",
    S_IFIFO: "fifo",
    S_IFSOCK: "socket",
}
FILE_TYPE_BITS = {name: bits for bits, name in FILE_TYPES.items()}
WHITEOUT = "whiteout"  # the name of a character device 0:0 where names stand for what a user sees

Xattrs = tuple[tuple[bytes, bytes], ...]
NO_XATTRS: Xattrs = ()


class Inode:
    """One file-system object.  Fields mirror `struct stat` plus composefs' extras.

    payload: for a regular file, the backing file's path relative to the store
    (`ab/cdef…`); for a symlink, its target.  content: inline file data (the whole file),
    or None.  digest: the backing file's 32-byte fs-verity digest, or None.
    nlink: None means "count the names" (a pass fills it in); frontends that are told the
    link count (a dumpfile) store it as given.  ino: breadth-first inode number, assigned
    by the ordering pass.
    """

    __slots__ = (
        "children",
        "content",
        "digest",
        "gid",
        "ino",
        "links",
        "mode",
        "mtime",
        "mtime_nsec",
        "nlink",
        "payload",
        "rdev",
        "size",
        "uid",
        "xattrs",
    )

    def __init__(
        self,
        mode: int,
        uid: int = 0,
        gid: int = 0,
        mtime: int = 0,
        mtime_nsec: int = 0,
        size: int = 0,
        rdev: int = 0,
        nlink: int | None = None,
        payload: bytes | None = None,
        content: bytes | None = None,
        digest: bytes | None = None,
        xattrs: Xattrs = NO_XATTRS,
    ) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.rdev = rdev
        self.mtime = mtime
        self.mtime_nsec = mtime_nsec
        self.size = size
        self.nlink = nlink
        self.payload = payload
        self.content = content
        self.digest = digest
        self.xattrs = xattrs
        self.children: dict[bytes, Inode] | None = {} if mode & S_IFMT == S_IFDIR else None
        self.links: set[bytes] | None = None
        self.ino = -1

    @property
    def ftype(self) -> int:
        return self.mode & S_IFMT

    def is_dir(self) -> bool:
        return self.mode & S_IFMT == S_IFDIR

    def get_xattr(self, key: bytes) -> bytes | None:
        for k, v in self.xattrs:
            if k == key:
                return v
        return None

    def set_xattr(self, key: bytes, value: bytes) -> None:
        """Replace or add one xattr, keeping the tuple sorted (not for hot loops)."""
        items = dict(self.xattrs)
        items[key] = value
        self.xattrs = tuple(sorted(items.items()))

    def add_child(self, name: bytes, child: Inode, link: bool = False) -> None:
        """Add an entry; `link=True` marks it as an extra name of an inode homed elsewhere."""
        assert self.children is not None
        self.children[name] = child
        if link:
            if self.links is None:
                self.links = set()
            self.links.add(name)
        elif self.links is not None:
            self.links.discard(name)

    def remove_child(self, name: bytes) -> Inode:
        assert self.children is not None
        child = self.children.pop(name)
        if self.links is not None:
            self.links.discard(name)
            if not self.links:
                self.links = None
        return child

    def is_link(self, name: bytes) -> bool:
        """True if `name` is a secondary hard-link entry (not the inode's home)."""
        return self.links is not None and name in self.links

    def __repr__(self) -> str:
        kind = FILE_TYPES.get(self.mode & S_IFMT, "?")
        return f"<Inode {kind} {self.mode:o} ino={self.ino}>"


class Tree:
    """A root directory plus what the passes derive from it.

    version: the composefs format version the image will carry (set by version selection).
    lowered: True once the overlay pass rewrote the tree into composefs' on-disk conventions
    (whiteouts as xattr-marked regular files, escaped `trusted.overlay.*`, root whiteouts).
    inodes: home inodes in breadth-first order (set by the ordering pass); `inodes[i].ino == i`.
    shared_xattrs: the shared xattr table, in on-disk order (set by the sharing pass).
    locate: optional, from the frontend: maps a tree path to an input position, so errors
    found by passes can name the dumpfile line (or tar member …) the user has to fix.
    checked: True when the frontend enforced every `cfsc.base.limits` rule while reading (with the
    input position at hand), so the validation pass need not walk the tree again; code that
    edits a loaded tree in ways that could break a limit must set it back to False.
    """

    __slots__ = ("checked", "inodes", "locate", "lowered", "root", "shared_xattrs", "source", "version")

    def __init__(self, root: Inode, source: str = "") -> None:
        if not root.is_dir():
            raise ValueError("the root of a tree must be a directory")
        self.root = root
        self.version: int | None = None
        self.lowered = False
        self.inodes: list[Inode] | None = None
        self.shared_xattrs: list[tuple[bytes, bytes]] | None = None
        self.source = source
        # Set by frontends that can point back into their input: path -> "file:line" or None.
        self.locate: Callable[[bytes], str | None] | None = None
        self.checked = False

    def walk(self) -> Iterator[tuple[bytes, Inode, Inode | None, bool]]:
        """Depth-first pre-order over every entry, children in name order.

        Yields `(path, inode, parent, is_link)`; the root comes first as `(b"/", root, None,
        False)`.  Links are yielded but not descended into.  Iterative: trees can be deeper
        than Python's recursion limit.
        """
        yield b"/", self.root, None, False
        assert self.root.children is not None
        stack = [(b"", self.root, iter(sorted(self.root.children)))]
        while stack:
            prefix, node, names = stack[-1]
            children = node.children
            links = node.links
            assert children is not None
            for name in names:
                child = children[name]
                is_link = links is not None and name in links
                path = prefix + b"/" + name
                yield path, child, node, is_link
                if not is_link and child.children is not None:
                    stack.append((path, child, iter(sorted(child.children))))
                    break
            else:
                stack.pop()

    def directories(self) -> Iterator[Inode]:
        """Every home directory, each before its subdirectories (no other order promised)."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            links = node.links
            for name, child in node.children.items():  # type: ignore[union-attr]
                if child.children is not None and (links is None or name not in links):
                    stack.append(child)

    def home_inodes(self) -> Iterator[Inode]:
        """Every inode once (at its home entry), directories before their contents."""
        for node in self.directories():
            yield node
            links = node.links
            for name, child in node.children.items():  # type: ignore[union-attr]
                if child.children is None and (links is None or name not in links):
                    yield child

    def path_of(self, target: Inode, links: bool = False) -> bytes:
        """The path of an inode's home entry, or with `links` its first name of any kind (a
        full walk: for error messages only)."""
        if target is self.root:
            return b"/"
        for path, node, _parent, is_link in self.walk():
            if node is target and (links or not is_link):
                return path
        return b"?"

    def copy(self, reverse: bool = False) -> Tree:
        """A deep copy of the tree (hard links stay shared), without what the passes derived.

        `reverse=True` inserts children in reverse order (tests use it to vary input order).
        """
        clones: dict[int, Inode] = {}

        def clone(node: Inode) -> Inode:
            new = clones.get(id(node))
            if new is None:
                new = clones[id(node)] = Inode(
                    node.mode, node.uid, node.gid, node.mtime, node.mtime_nsec, node.size,
                    node.rdev, node.nlink, node.payload, node.content, node.digest, node.xattrs)
            return new

        root = clone(self.root)
        stack = [(self.root, root)]
        while stack:
            old, new = stack.pop()
            items = list(old.children.items())  # type: ignore[union-attr]
            if reverse:
                items.reverse()
            for name, child in items:
                is_link = old.is_link(name)
                fresh = id(child) not in clones
                copy = clone(child)
                new.add_child(name, copy, link=is_link)
                if fresh and child.children is not None:
                    stack.append((child, copy))
        tree = Tree(root, self.source)
        tree.version = self.version
        tree.lowered = self.lowered
        tree.checked = self.checked
        return tree

    def lookup(self, path: bytes) -> Inode | None:
        node = self.root
        for part in path.split(b"/"):
            if not part:
                continue
            if node.children is None:
                return None
            nxt = node.children.get(part)
            if nxt is None:
                return None
            node = nxt
        return node

