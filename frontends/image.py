"""composefs image → tree: an image is a source like any other (`cfsc compile old.cfs -o new.cfs`).

The tree means what the image means to a user (`cfsc.backends.erofs.entries`): payloads,
digests and whiteouts instead of overlay xattrs, the root whiteouts gone.  Beyond that, two
choices make `compile(read(image))` reproduce an image libcomposefs or cfsc wrote, byte for
byte:

* Hard-link homes.  composefs numbers inodes breadth-first over home entries, in name order,
  and stores the number in `i_ino`.  Walking the image the same way with a counter
  `next_ino`, the entry whose inode has `i_ino == next_ino` is the home; every other entry
  reaching an inode is a link.  (Images by other writers may number differently: an inode
  that never matches is homed at its first breadth-first entry.)  Two names of one inode
  can both meet `next_ino` when nothing is numbered between them; that only matters for a
  whiteout, whose home's directory alone carries the writer's `…overlay.whiteouts` marker
  (and, in format 1, `opaque=x`), so a directory without the marker is not its home.
* Sizes that only choose the inode format.  libcomposefs makes a device, fifo or socket
  inode extended when its *input* size exceeds 32 bits, and writes size 0; an extended one
  with nothing else needing it (mtime, ids, nlink) gets size 2^32 back so it stays extended.

nlink is kept as stored (like a dumpfile's NLINK); directory nlink and size are recomputed
by the compiler anyway.  The root's `trusted.overlay.opaque=y` and other writer markers are
dropped; v1 whiteout parents keep `trusted.overlay.opaque=x` and `user.overlay.opaque=x`, as
upstream's reader shows them.
"""

from __future__ import annotations

from collections import deque

from cfsc.backends.erofs.entries import Entries, Entry, walk
from cfsc.backends.erofs.layout import (
    COMPOSEFS_HEADER,
    COMPOSEFS_MAGIC,
    EROFS_SUPER_BLOCK,
    EROFS_SUPER_MAGIC_V1,
    EROFS_SUPER_OFFSET,
)
from cfsc.backends.erofs.overlay import ESCAPED_WHITEOUTS
from cfsc.backends.erofs.reader import Image, RawInode
from cfsc.base.options import Options
from cfsc.base.tree import S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Inode, Tree

MAGIC = COMPOSEFS_HEADER.field("magic").pack(COMPOSEFS_MAGIC)
EROFS_MAGIC = EROFS_SUPER_BLOCK.field("magic").pack(EROFS_SUPER_MAGIC_V1)
U16 = 0xFFFF
U32 = 0xFFFFFFFF


def sniff(head: bytes) -> bool:
    """The composefs magic, or the EROFS superblock's where composefs puts it: an image with a
    damaged header is still an image, and the reader says what is wrong where."""
    return head[:len(MAGIC)] == MAGIC or head[EROFS_SUPER_OFFSET:EROFS_SUPER_OFFSET + len(EROFS_MAGIC)] == EROFS_MAGIC


def load(source, options: Options | None = None) -> Tree:
    return read_tree(Image.open(source))


def read_tree(image: Image, names: frozenset[bytes] | None = None, upstream: bool = False) -> Tree:
    """The tree of an image; `names` keeps only those children of the root (`--filter`).

    `upstream=True` reads it as libcomposefs 1.0.8 does (what `composefs-dump` re-encodes):
    the first name depth-first is each inode's home, and devices keep size 0, so the
    re-encoded image may differ from the original where those choices mattered.
    """
    builder = _Builder(image, faithful=not upstream)
    return builder.build(names) if not upstream else builder.build_depth_first(names)


class _Builder:
    def __init__(self, image: Image, faithful: bool = True) -> None:
        self.image = image
        self.entries = Entries(image)
        self.faithful = faithful
        self.marked: dict[int, bool] = {}  # directory nid -> marks_whiteouts

    def node(self, e: Entry) -> Inode:
        raw = e.raw
        ftype = e.mode & S_IFMT
        xattrs = e.xattrs
        if xattrs:
            xattrs = self.entries.sorted_xattrs(xattrs)
        size = e.size
        payload = content = digest = None
        if ftype == S_IFREG:
            payload, content, digest = e.payload, e.content, e.digest
        elif ftype == S_IFLNK:
            payload = e.payload
        elif (self.faithful and ftype != S_IFDIR and ftype == raw.mode & S_IFMT and raw.extended
              and not _needs_extended(raw, self.image)):
            size = 1 << 32
        return Inode(e.mode, e.uid, e.gid, e.mtime, e.mtime_nsec, size, e.rdev, e.nlink,
                     payload, content, digest, xattrs)

    def marks_whiteouts(self, raw_dir: RawInode) -> bool:
        """Whether the writer marked this directory as holding a whiteout's home (asked once
        per directory: one may hold thousands of whiteouts)."""
        marked = self.marked.get(raw_dir.nid)
        if marked is None:
            marked = self.marked[raw_dir.nid] = raw_dir.xattr_size > 0 and any(
                k == ESCAPED_WHITEOUTS for k, _v in self.image.xattrs(raw_dir))
        return marked

    def build(self, names: frozenset[bytes] | None) -> Tree:
        image = self.image
        entries = self.entries
        raw_root = image.inode(image.root_nid)
        if raw_root.mode & S_IFMT != S_IFDIR:
            raise image.error(raw_root.offset, f"root inode nid {raw_root.nid}: mode {raw_root.mode:o} is not a directory")
        root = self.node(entries.of(raw_root))  # type: ignore[arg-type]
        nodes: dict[int, Inode] = {raw_root.nid: root}
        inos: dict[int, int] = {}  # nid -> i_ino, for inodes reached but not homed yet
        homed = {raw_root.nid}
        hidden: set[int] = set()  # whiteouts the image hides
        next_ino = raw_root.ino + 1
        queue = deque([(raw_root, root)])
        unhomed: deque = deque()  # (dir, name, nid) of links to inodes without a home yet
        dir_nids: dict[int, int] = {id(root): raw_root.nid}
        dir_links = False
        while True:
            while queue:
                raw_dir, parent = queue.popleft()
                children = parent.children
                assert children is not None
                for name, nid, _ftype in image.dirents(raw_dir):
                    if names is not None and parent is root and name not in names:
                        continue
                    node = nodes.get(nid)
                    if node is None:
                        if nid in hidden:
                            continue
                        raw = image.inode(nid)
                        e = entries.of(raw)
                        if e is None:
                            hidden.add(nid)
                            if raw.ino == next_ino:
                                next_ino += 1
                            continue
                        node = nodes[nid] = self.node(e)
                        ino = inos[nid] = raw.ino
                    else:
                        ino = inos.get(nid, -1)
                    if ino == next_ino and nid not in homed and (
                            not _is_whiteout(node) or self.marks_whiteouts(raw_dir)):
                        homed.add(nid)
                        next_ino += 1
                        children[name] = node
                        if node.children is not None:
                            dir_nids[id(node)] = nid
                            queue.append((image.inode(nid), node))
                    else:
                        parent.add_child(name, node, link=True)
                        if nid not in homed:
                            unhomed.append((parent, name, nid))
                        if node.children is not None:
                            dir_links = True
            # Inodes reached only through links (foreign numbering): home the first one.
            while unhomed:
                parent, name, nid = unhomed.popleft()
                if nid not in homed:
                    homed.add(nid)
                    node = nodes[nid]
                    parent.add_child(name, node)
                    next_ino = inos[nid] + 1
                    if node.children is not None:
                        dir_nids[id(node)] = nid
                        queue.append((image.inode(nid), node))
                    break
            if not queue:
                break
        tree = Tree(root, image.name)
        if dir_links:
            _check_acyclic(tree, image, dir_nids)
        return tree


    def build_depth_first(self, names: frozenset[bytes] | None) -> Tree:
        """Homes at first depth-first occurrences (libcomposefs' reader)."""
        nodes: dict[int, Inode] = {}  # nid -> inode, for the targets of links
        # The directories from the root to the last entry, by the length of their paths (a
        # parent is the one as long as the entry's head): holding their paths instead would
        # hold depth² bytes in a deep tree.
        ancestors: list[tuple[int, Inode]] = []
        root = None
        for path, e, first in walk(self.image, names, self.entries):
            if root is None:
                root = nodes[e.nid] = self.node(e)
                ancestors.append((0, root))
                continue
            head, _slash, name = path.rpartition(b"/")
            while ancestors[-1][0] != len(head):
                ancestors.pop()
            parent = ancestors[-1][1]
            if first is not None:
                parent.add_child(name, nodes[e.nid], link=True)
                continue
            node = nodes[e.nid] = self.node(e)
            parent.add_child(name, node)
            if node.children is not None:
                ancestors.append((len(path), node))
        assert root is not None
        return Tree(root, self.image.name)


def _is_whiteout(node: Inode) -> bool:
    return node.mode & S_IFMT == S_IFCHR and node.rdev == 0


def _needs_extended(raw: RawInode, image: Image) -> bool:
    """Whether anything but the size made libcomposefs write this inode extended (§2.2)."""
    return (raw.mtime != image.build_time or raw.mtime_nsec != image.build_time_nsec
            or raw.nlink > U16 or raw.uid > U16 or raw.gid > U16 or raw.size > U32)


def _check_acyclic(tree: Tree, image: Image, dir_nids: dict[int, int]) -> None:
    """Fail if a directory (through hard links) contains itself: the kernel refuses such a
    walk with ELOOP, and no walker of the tree could finish it."""
    state: dict[int, int] = {}  # id(dir) -> 1 on the current path, 2 done
    stack = [(tree.root, iter(tree.root.children.items()))]  # type: ignore[union-attr]
    state[id(tree.root)] = 1
    while stack:
        node, it = stack[-1]
        for name, child in it:
            if child.children is None:
                continue
            mark = state.get(id(child))
            if mark == 1:
                nid = dir_nids[id(node)]
                raise image.error(image.inode_offset(nid),
                                  f"directory nid {nid}: entry {name!r} points back to nid "
                                  f"{dir_nids[id(child)]}, which contains it (a directory cycle)")
            if mark is None:
                state[id(child)] = 1
                stack.append((child, iter(child.children.items())))
                break
        else:
            stack.pop()
            state[id(node)] = 2
