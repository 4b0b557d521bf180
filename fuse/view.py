"""What the kernel composefs mount shows of an image, inode by inode.

The reference is what `mount.composefs` sets up — EROFS with overlayfs on top, the store as a
data-only lower layer — so a FUSE mount and a kernel mount of one image look the same to
every program.  This module is an adapter over the image reader (`Image`, `Entries`); it
knows overlayfs' rules, not the EROFS format.  Each rule below was checked against a real
kernel mount (Linux 6.18; `tests/test_fuse.py` compares whole walks):

* Stat fields are the stored ones: `st_ino` is the inode's nid (EROFS reports the nid, and
  overlayfs passes it through), atime = ctime = mtime, `st_blocks` is the size rounded up to
  4 KiB (in 512-byte units), `st_blksize` 4096.  (For a metacopy file overlayfs reports that
  only until it has looked the data up; from then on the data file's blocks, which differ
  for a sparse object.  The view keeps no per-object state for that.)
* A character device 0:0 is an overlayfs whiteout: never listed, never found (the 256
  `00`…`ff` entries composefs puts in the root to hide the store's fan-out directories).
  As overlayfs' readdir does, only entries whose directory record says "character device"
  are looked at for that, so listing a directory reads no other inode.
* A regular file carrying `trusted.overlay.metacopy` takes its data from the store path in
  `trusted.overlay.redirect` (the entry's payload, checked against its digest).  Without a
  redirect the kernel fails the lookup itself with EIO; so does this view.  The payload and
  digest are decoded by the image reader (`entries.interpret_xattrs`), never here.
* xattrs keep the on-disk order.  `trusted.overlay.overlay.X` shows as `trusted.overlay.X`
  (overlayfs' escaping); every other `trusted.overlay.*` key is overlayfs' own (redirect,
  metacopy, the root's opaque) and hidden.  Keys outside `user.`, `trusted.` and `security.`
  — and the POSIX ACL keys, unless the image says it has ACLs (`mount.composefs` mounts EROFS
  with `noacl` otherwise) — have no EROFS handler, so they are neither listed nor readable.
  `trusted.*` is listed only to callers with CAP_SYS_ADMIN; that is decided per request.
* A whiteout stored by composefs (an empty regular file marked with the escaped whiteout
  xattr) is an empty regular file showing `trusted.overlay.whiteout`: overlayfs only honours
  unescaped markers.

Nodes and directory listings are computed on first use and kept in bounded caches (oldest
first out): the kernel keeps its own cache of what is in use, and anything dropped here is
recomputed from the image on demand.  Inline file data and symlink targets are read only
when asked for, so `find` and `stat` parse no more than inodes and xattrs.
"""

from __future__ import annotations

import errno
import threading
from bisect import bisect_left
from itertools import islice

from cfsc.backends.erofs.entries import Entries, interpret_xattrs
from cfsc.backends.erofs.inode_attrs import inline_xattrs, lowered_pair, stat_fields
from cfsc.backends.erofs.layout import ACL_KEYS, COMPOSEFS_FLAGS_HAS_ACL, EROFS_BLKSIZ, EROFS_FT_CHRDEV
from cfsc.backends.erofs.overlay import (
    ESCAPED,
    METACOPY,
    REDIRECT,
    TRUSTED_OVERLAY,
    metacopy_digest,
    redirect_payload,
    unescape_key,
)
from cfsc.backends.erofs.reader import Image
from cfsc.base.tree import S_IFBLK, S_IFCHR, S_IFDIR, S_IFMT, S_IFREG

BLOCK_SIZE = EROFS_BLKSIZ  # st_blksize, as EROFS reports it
LISTED_PREFIXES = (b"user.", b"trusted.", b"security.")
BARE_PREFIXES = frozenset(LISTED_PREFIXES + (TRUSTED_OVERLAY,))
TRUSTED = b"trusted."
NODE_CACHE = 1 << 17  # nodes kept (about 400 bytes each with the server's encoding)
LISTING_CACHE = 1 << 18  # directory entries kept, over all cached listings
# A directory of more entries is served page by page as asked (`Server._page`), its listing
# asked for by every page: a use moves it to the end of the cache, the last evicted.
STREAM_ENTRIES = 1 << 14
_MISSING = object()
PATH_DEPTH_MAX = 4096  # a (hostile) parent chain longer than this is cut in log messages


# Why a store-backed file cannot be served (its READ and OPEN fail with this, logged).
NO_REDIRECT = "metacopy file without a redirect (no store path)"


class Node:
    """One visible inode.

    content: the data of a regular file held in the image, once read (`ImageView.content`).
    external: the data comes from the store at `payload`, verified against `digest` (32 or
    64 bytes, SHA-256 or SHA-512; or None).  target: a symlink's target, once read
    (`ImageView.target`).  broken: why the kernel fails to look this inode up, or None.
    parent, name: where the inode was first reached (for log messages).  wire: a slot for
    the server's encoding of the attributes.
    """

    __slots__ = ("nid", "mode", "nlink", "uid", "gid", "size", "rdev", "mtime", "mtime_nsec",
                 "xattrs", "trusted", "target", "content", "external", "payload", "digest",
                 "broken", "parent", "name", "wire")

    def __repr__(self) -> str:
        return f"<Node nid={self.nid} mode={self.mode:o} size={self.size}>"


class Listing:
    """A directory's visible entries, in on-disk (byte) order."""

    __slots__ = ("names", "nids")

    def __init__(self, names: list[bytes], nids: list[int]) -> None:
        self.names = names
        self.nids = nids

    def __len__(self) -> int:
        return len(self.names)


class ImageView:
    """The kernel mount's view of one image."""

    def __init__(self, image: Image, acl: bool | None = None) -> None:
        """`acl`: serve the image's POSIX ACLs (default: if its header says it has some)."""
        self.image = image
        self.entries = Entries(image)
        self.root_nid = image.root_nid
        self.acl = bool(image.flags & COMPOSEFS_FLAGS_HAS_ACL) if acl is None else acl
        self._nodes: dict[int, Node | None] = {}
        self._listings: dict[int, Listing] = {}
        self._listed = 0  # entries in _listings
        self._xattr_cache: dict[bytes, tuple] = {}  # shared-only xattr body -> `_interpret`
        self._lock = threading.Lock()

    # -- nodes ----------------------------------------------------------------------------

    def node(self, nid: int) -> Node | None:
        """The node of `nid`, or None for a whiteout (invisible).  Raises `ImageError` (an
        OSError, EIO) with the location when the image is corrupt there."""
        node = self._nodes.get(nid, _MISSING)
        if node is not _MISSING:
            return node
        node = self._make(nid)
        self._nodes[nid] = node
        if len(self._nodes) > NODE_CACHE:
            self._evict(self._nodes, len(self._nodes) // 4)
        return node

    def _make(self, nid: int) -> Node | None:
        """`_make_reference` for an inode in the usual shape, read without a `RawInode` and
        without the generic xattr parse (a fresh mount's first walk makes one node per
        entry); anything else goes the reference way."""
        f = stat_fields(self.image, nid)
        if f is None:
            return self._make_reference(nid)
        mode, nlink, uid, gid, size, u, mtime, nsec, xoffset, xsize = f
        ftype = mode & S_IFMT
        if ftype == S_IFCHR and u == 0:
            return None  # an overlayfs whiteout
        n = Node()
        n.nid = nid
        n.mode = mode
        n.nlink = nlink
        n.uid = uid
        n.gid = gid
        n.size = size
        n.rdev = u if ftype == S_IFCHR or ftype == S_IFBLK else 0
        n.mtime = mtime
        n.mtime_nsec = nsec
        n.target = n.parent = n.name = n.wire = None
        if xsize:
            x = self._xattrs_quick(nid, xoffset, xsize, ftype == S_IFREG)
            if x is None:
                return self._make_reference(nid)
            n.xattrs, n.trusted, store = x
        else:
            n.xattrs, n.trusted, store = (), False, None
        external = n.external = store is not None and ftype == S_IFREG
        n.payload = n.digest = n.broken = None
        if external:
            n.payload, n.digest = store
            if not n.payload:
                n.broken = NO_REDIRECT
        n.content = b"" if ftype == S_IFREG and not external and not size else None
        return n

    def _xattrs_quick(self, nid: int, offset: int, size: int, regular: bool) -> tuple | None:
        """`_xattrs` of the usual bodies: shared ids only, or those plus the writer's inline
        metacopy and redirect (hidden; they only name the store object) — then the visible
        pairs are the shared ones, interpreted once per distinct set.  None: any other body.
        A regular file's body is first tried as exactly that pair (`lowered_pair`: most files
        of an image, recognised by their bytes without the generic entry loop)."""
        pair = lowered_pair(self.image, offset, size) if regular else None
        if pair is not None:
            head, metacopy, redirect = pair
            items = None
        else:
            got = inline_xattrs(self.image, offset, size)
            if got is None:
                return None
            head, items = got
        shared = self._xattr_cache.get(head)
        if shared is None:
            shared = self._shared_xattrs(nid, head)
        if pair is not None:
            if shared[3]:
                return None  # the shared part names a store object too: the reference combines them
            return shared[0], shared[1], (redirect_payload(redirect), metacopy_digest(metacopy))
        if not items:
            return shared[:3]
        if shared[3]:
            return None  # the shared part names a store object too: the reference combines them
        metacopy = redirect = None
        for key, value in items:
            if key == METACOPY and metacopy is None:
                metacopy = value
            elif key == REDIRECT and redirect is None:
                redirect = value
            else:
                return None
        if metacopy is None:
            store = None
        else:  # as `interpret_xattrs` reads the pair
            store = (redirect_payload(redirect) if redirect is not None else None, metacopy_digest(metacopy))
        return shared[0], shared[1], store

    def _shared_xattrs(self, nid: int, head: bytes) -> tuple:
        """`_xattrs` of a shared-only body, plus whether it holds a metacopy or redirect."""
        raw = self.image.inode(nid)  # (locates errors; once per distinct set of shared ids)
        pairs, trusted, store, lowered = self._interpret(self.image.parse_xattr_body(raw, head))
        result = (pairs, trusted, store, lowered)
        if len(self._xattr_cache) >= NODE_CACHE:
            self._xattr_cache = {}
        self._xattr_cache[head] = result
        return result

    def _make_reference(self, nid: int) -> Node | None:
        raw = self.image.inode(nid)
        mode = raw.mode
        ftype = mode & S_IFMT
        if ftype == S_IFCHR and raw.rdev == 0:
            return None  # an overlayfs whiteout
        n = Node()
        n.nid = nid
        n.mode = mode
        n.nlink = raw.nlink
        n.uid = raw.uid
        n.gid = raw.gid
        n.size = raw.size
        n.rdev = raw.rdev if ftype == S_IFCHR or ftype == S_IFBLK else 0
        n.mtime = raw.mtime
        n.mtime_nsec = raw.mtime_nsec
        if raw.xattr_size:
            n.xattrs, n.trusted, store = self._xattrs(raw)
        else:
            n.xattrs, n.trusted, store = (), False, None
        # Data from the store: what overlayfs does for a metacopy file (on regular files only).
        n.external = store is not None and ftype == S_IFREG
        n.payload = n.digest = n.broken = None
        if n.external:
            n.payload, n.digest = store
            if not n.payload:
                n.broken = NO_REDIRECT
        n.content = b"" if ftype == S_IFREG and not n.external and not n.size else None
        n.target = None
        n.parent = None
        n.name = None
        n.wire = None
        return n

    def _xattrs(self, raw) -> tuple[tuple, bool, tuple | None]:
        """(visible pairs, whether any is trusted.*, the store reference or None).

        The store reference is `(payload, digest)` of an inode carrying a metacopy xattr,
        decoded by the image reader (`interpret_xattrs`), so the FUSE mount and `cfsc dump`
        read a redirect and a digest alike; which keys overlayfs hides or un-escapes is
        decided here.  (As the kernel overlay does, a regular file that also carries the
        escaped whiteout marker still gets its data; `cfsc dump`, as libcomposefs, calls it a
        whiteout.)"""
        body, shared_only = self.image.xattr_body(raw)
        if shared_only:
            hit = self._xattr_cache.get(bytes(body))
            if hit is not None:
                return hit[:3]
        result = self._interpret(self.image.xattrs(raw))
        if shared_only:
            if len(self._xattr_cache) >= NODE_CACHE:  # a few hundred distinct sets is usual
                self._xattr_cache = {}
            self._xattr_cache[bytes(body)] = result
        return result[:3]

    def _interpret(self, items) -> tuple[tuple, bool, tuple | None, bool]:
        """`_xattrs` of these pairs, plus whether any was a metacopy or redirect."""
        pairs = []
        trusted = False
        lowered = []  # the metacopy and redirect pairs
        metacopy = False
        acl = self.acl
        for key, value in items:
            if key.startswith(TRUSTED_OVERLAY):
                if not key.startswith(ESCAPED):
                    if key == METACOPY:
                        metacopy = True
                        lowered.append((key, value))
                    elif key == REDIRECT:
                        lowered.append((key, value))
                    continue
                key = unescape_key(key)
            elif not key.startswith(LISTED_PREFIXES) and not (acl and key in ACL_KEYS):
                continue
            if key.startswith(TRUSTED):
                trusted = True
            pairs.append((key, value))
        store = None
        if metacopy:
            _xattrs, payload, digest, _whiteout = interpret_xattrs(lowered, True)
            store = (payload, digest)
        return tuple(pairs), trusted, store, bool(lowered)

    def content(self, node: Node) -> bytes | None:
        """A regular file's data held in the image (None: a hole, read as zeros)."""
        if node.content is None and not node.external:
            e = self.entries.of(self.image.inode(node.nid), again=True)
            node.content = e.content if e is not None else None
        return node.content

    def target(self, node: Node) -> bytes:
        if node.target is None:
            node.target = self.image.symlink(self.image.inode(node.nid))
        return node.target

    def getxattr(self, node: Node, key: bytes) -> bytes:
        if key in BARE_PREFIXES:  # the VFS resolves handlers by prefix: a bare one is invalid
            raise OSError(errno.EINVAL, "an xattr name needs more than its namespace")
        for k, v in node.xattrs:
            if k == key:
                if not v and key in ACL_KEYS:  # EROFS cannot parse an empty ACL
                    raise OSError(errno.EINVAL, "empty POSIX ACL")
                return v
        if key.startswith(LISTED_PREFIXES) or (self.acl and key in ACL_KEYS):
            raise OSError(errno.ENODATA, "no such attribute")
        raise OSError(errno.EOPNOTSUPP, "not a namespace the kernel mount serves")

    # -- directories ----------------------------------------------------------------------

    def listing(self, nid: int) -> Listing:
        listing = self._listings.get(nid)
        if listing is not None:
            if len(listing.names) > STREAM_ENTRIES and self._listings.pop(nid, None) is not None:
                self._listings[nid] = listing  # (popped by another thread's eviction: not back uncounted)
            return listing
        node = self.node(nid)
        if node is None or node.mode & S_IFMT != S_IFDIR:
            raise OSError(errno.ENOTDIR, "not a directory")
        names = []
        nids = []
        for name, child, ftype in self.image.dirents(self.image.inode(nid)):
            if ftype == EROFS_FT_CHRDEV and self.node(child) is None:
                continue  # a whiteout (overlayfs checks DT_CHR entries only, so do we)
            names.append(name)
            nids.append(child)
        listing = Listing(names, nids)
        self._listings[nid] = listing
        self._listed += len(names)
        if self._listed > LISTING_CACHE and len(self._listings) > 1:
            self._evict(self._listings, len(self._listings) // 4 or 1, listings=True)
        return listing

    def lookup(self, dir_nid: int, name: bytes) -> Node | None:
        """The node `name` in directory `dir_nid` refers to, or None if there is none."""
        listing = self.listing(dir_nid)
        names = listing.names
        i = bisect_left(names, name)
        if i == len(names) or names[i] != name:
            return None
        return self.named(listing.nids[i], dir_nid, name)

    def named(self, nid: int, dir_nid: int, name: bytes) -> Node | None:
        """`node(nid)`, remembering where it was reached if that is the first time."""
        node = self.node(nid)
        if node is not None and node.name is None:
            node.parent = dir_nid
            node.name = name
        return node

    def children(self, dir_nid: int, start: int = 0):
        """`(name, nid)` of a directory's entries from index `start`."""
        listing = self.listing(dir_nid)
        names = listing.names
        nids = listing.nids
        for i in range(start, len(names)):
            yield names[i], nids[i]

    # -- naming -----------------------------------------------------------------------------

    def path(self, node: Node) -> bytes:
        """The path of a node as far as the server saw it reached (for log messages)."""
        parts = []
        n: Node | None = node
        for _ in range(PATH_DEPTH_MAX):
            if n is None or n.nid == self.root_nid:
                break
            if n.name is None:
                parts.append(b"<nid %d>" % n.nid)
                break
            parts.append(n.name)
            n = self._nodes.get(n.parent)
        return b"/" + b"/".join(reversed(parts))

    # -- cache bounds -----------------------------------------------------------------------

    def _evict(self, cache: dict, count: int, listings: bool = False) -> None:
        with self._lock:
            try:
                old = list(islice(cache, count))
            except RuntimeError:  # another thread changed the cache: evict next time
                return
            for key in old:
                value = cache.pop(key, None)
                if listings and value is not None:
                    self._listed -= len(value)
