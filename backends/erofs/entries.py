"""What a user sees of an image: composefs' overlay conventions undone (format note §8).

The writer lowers the tree into overlayfs conventions (`cfsc.backends.erofs.overlay`);
this module reverses that per inode, exactly as libcomposefs' reader does, so that an image
means the same thing whichever tool reads it:

* `trusted.overlay.redirect` → payload (one leading `/` removed), `trusted.overlay.metacopy`
  → fs-verity digest; neither stays an xattr;
* a regular file marked `trusted.overlay.overlay.whiteout` → a whiteout (char device 0:0);
* `…overlay.whiteouts`, `user.overlay.whiteout(s)` and the other `trusted.overlay.*` keys
  (the root's `opaque=y`) are dropped; `trusted.overlay.overlay.X` → `trusted.overlay.X`;
* a character device 0:0 *in the image* (the 256 root whiteouts `00`…`ff`) is not an entry.

xattrs are processed in on-disk order (inline, then shared) against the inode's type *at
that point*, like upstream, and `Entry.xattrs` keeps that order because `composefs-info dump`
prints it.  Upstream's reader over-reads the redirect value by one byte (format note §8
"Quirk"); that is a bug we do not copy: no reference dump depends on it (every payload there
is a 65-byte object path, whose entry is followed by zero padding).

`walk()` is the depth-first pre-order walk composefs-info uses: the second and later
occurrences of an inode are hard links to the first.
"""

from __future__ import annotations

from collections.abc import Iterator

from cfsc.backends.erofs.layout import (
    EROFS_INODE_CHUNK_BASED,
    EROFS_XATTR_ALIGN,
    EROFS_XATTR_ENTRY,
    EROFS_XATTR_IBODY_HEADER,
    XATTR_PREFIXES,
)
from cfsc.backends.erofs.overlay import (
    ESCAPED,
    ESCAPED_WHITEOUT,
    METACOPY,
    METACOPY_DIGEST_SIZE,
    METACOPY_DIGEST_SIZES,
    METACOPY_HEADER,
    READER_DROPPED,
    REDIRECT,
    TRUSTED_OVERLAY,
    metacopy_digest,
    redirect_payload,
)
from cfsc.backends.erofs.reader import Image, RawInode, ReadBudget
from cfsc.base.errors import LookupFailed
from cfsc.base.tree import S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG

_TRUSTED = XATTR_PREFIXES.index(b"trusted.")
_REDIRECT_NAME = REDIRECT[len(XATTR_PREFIXES[_TRUSTED]):]
_METACOPY_NAME = METACOPY[len(XATTR_PREFIXES[_TRUSTED]):]
_TRUSTED_OVERLAY_LEN = len(TRUSTED_OVERLAY)
_ESCAPED_LEN = len(ESCAPED)
# `Entries._implied_inline` (per file) spells these out as literals, as the reader's per-inode
# paths do: the xattr body header, its shared count's offset, an entry header, the entry
# alignment, a metacopy value holding a digest and its header.
assert (EROFS_XATTR_IBODY_HEADER.size, EROFS_XATTR_IBODY_HEADER.offset("h_shared_count"), EROFS_XATTR_ENTRY.size,
        EROFS_XATTR_ALIGN, METACOPY_DIGEST_SIZE, len(METACOPY_HEADER)) == (12, 4, 4, 4, 36, 4)
assert METACOPY_DIGEST_SIZES == {36, 68}  # SHA-256, SHA-512
_unpack_entry = EROFS_XATTR_ENTRY.unpack_from


class Entry:
    """One inode as a user sees it: `struct stat` fields plus composefs' extras.

    payload: symlink target, or a regular file's backing path (`ab/cdef…`), or None.
    content: inline data of a regular file, or None.  digest: 32 bytes or None.
    xattrs: `(key, value)` pairs in upstream's reader order.  `raw` is the on-disk inode.
    """

    __slots__ = ("nid", "ino", "mode", "nlink", "uid", "gid", "size", "rdev", "mtime",
                 "mtime_nsec", "payload", "content", "digest", "xattrs", "raw")

    @property
    def ftype(self) -> int:
        return self.mode & S_IFMT

    def __repr__(self) -> str:
        return f"<Entry nid={self.nid} mode={self.mode:o} size={self.size}>"


class Entries:
    """Turns raw inodes of one image into entries.

    The interpretation of an xattr body that only refers to shared entries is cached: those
    bodies repeat (a few hundred distinct ones cover a million inodes), and the cached
    tuples are the same objects for every inode that has them.
    """

    def __init__(self, image: Image) -> None:
        self.image = image
        self.budget = ReadBudget(image)
        self._cache: dict[tuple[bytes, bool], tuple[tuple, bytes | None, bytes | None, bool]] = {}
        self._cached: set[int] = set()  # ids of the cached tuples (alive as long as the cache)
        self._sorted: dict[int, tuple] = {}  # id(cached reader-order tuple) -> sorted tuple

    def get(self, nid: int) -> Entry | None:
        return self.of(self.image.inode(nid))

    def of(self, raw: RawInode, again: bool = False) -> Entry | None:
        """The entry for a raw inode, or None for a whiteout the image hides (char 0:0).

        Reads are charged to `budget` unless `again` (a walker reading an inode a second
        time, which it does at most once per inode).
        """
        mode = raw.mode
        ftype = mode & S_IFMT
        image = self.image
        if not again:
            self.budget.charge(image.footprint(raw), raw.offset, f"inode nid {raw.nid}")
        if ftype == S_IFCHR and raw.blkaddr == 0:
            return None
        e = Entry()
        e.nid = raw.nid
        e.ino = raw.ino
        e.nlink = raw.nlink
        e.uid = raw.uid
        e.gid = raw.gid
        e.mtime = raw.mtime
        e.mtime_nsec = raw.mtime_nsec
        e.raw = raw
        size = raw.size
        payload = content = digest = None
        rdev = 0
        if ftype == S_IFREG:
            if size and raw.layout != EROFS_INODE_CHUNK_BASED:
                content = image.content(raw)
        elif ftype == S_IFLNK:
            payload = image.symlink(raw)
        elif ftype == S_IFBLK or ftype == S_IFCHR:
            rdev = raw.blkaddr
        xattrs: tuple = ()
        if raw.xattr_size:
            regular = ftype == S_IFREG
            body, shared_only = image.xattr_body(raw)
            if shared_only:
                hit = self._shared_part(raw, body, regular)
            else:
                hit = self._implied_inline(raw, body, regular) or interpret_xattrs(image.xattrs(raw), regular)
            xattrs, redirect, metacopy, whiteout = hit
            if redirect is not None:
                payload = redirect
            if metacopy is not None:
                digest = metacopy
            if whiteout:
                mode = (mode & ~S_IFMT) | S_IFCHR
                rdev = 0
                size = 0
        e.mode = mode
        e.size = size
        e.rdev = rdev
        e.payload = payload
        e.content = content
        e.digest = digest
        e.xattrs = xattrs
        return e

    def _shared_part(self, raw: RawInode, head: bytes, regular: bool) -> tuple:
        """The interpretation of a body of shared references only (cached: they repeat)."""
        key = (head, regular)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = interpret_xattrs(self.image.parse_xattr_body(raw, head), regular)
            self._cached.add(id(hit[0]))
        return hit

    def _implied_inline(self, raw: RawInode, body: bytes, regular: bool) -> tuple | None:
        """The common body with inline entries: the writer's per-file metacopy and redirect,
        everything else shared.  Read without the generic parse, the shared part from the
        cache; None for any other body (or a malformed one: the generic path locates it).

        Same result as `interpret_xattrs` over inline-then-shared: the inline pair only sets
        payload and digest, which a shared metacopy or redirect, coming later, overrides."""
        size = len(body)
        pos = 12 + 4 * body[4] if size >= 12 else size + 1
        if pos >= size:
            return None
        head = body[:pos]
        payload = digest = None
        while pos < size:
            if pos + 4 > size:
                return None
            name_len, index, value_len = _unpack_entry(body, pos)
            name_end = pos + 4 + name_len
            end = name_end + value_len
            if end > size or index != _TRUSTED:
                return None
            name = body[pos + 4:name_end]
            # `overlay.redirect_payload` and `overlay.metacopy_digest`, written out (per file)
            if name == _REDIRECT_NAME:
                if regular:
                    value = body[name_end:end]
                    value = value[1:] if len(value) > 1 and value[:1] == b"/" else value
                    payload = value.partition(b"\0")[0]
            elif name == _METACOPY_NAME:
                if regular and (value_len == 36 or value_len == 68):
                    digest = body[name_end + 4:end]
            else:
                return None
            pos = (end + 3) & ~3
        xattrs, s_payload, s_digest, whiteout = self._shared_part(raw, head, regular)
        return (xattrs, s_payload if s_payload is not None else payload,
                s_digest if s_digest is not None else digest, whiteout)

    def interned(self, xattrs: tuple) -> bool:
        """Whether many entries may share this very tuple (worth caching what derives from it)."""
        return id(xattrs) in self._cached

    def sorted_xattrs(self, xattrs: tuple) -> tuple:
        """An entry's xattrs as the tree keeps them (sorted), one tuple per cached set."""
        hit = self._sorted.get(id(xattrs))
        if hit is not None:
            return hit
        keys = [k for k, _v in xattrs]
        result = xattrs if all(map(bytes.__lt__, keys, keys[1:])) else tuple(sorted(xattrs))
        if id(xattrs) in self._cached:
            self._sorted[id(xattrs)] = result
        return result


def interpret_xattrs(items: list, regular: bool) -> tuple[tuple, bytes | None, bytes | None, bool]:
    """(user xattrs in reader order, redirect payload, metacopy digest, became a whiteout)."""
    xattrs: list[tuple[bytes, bytes]] = []
    where: dict[bytes, int] = {}  # key -> index in xattrs
    payload = digest = None
    whiteout = False
    for key, value in items:
        if key[:_TRUSTED_OVERLAY_LEN] == TRUSTED_OVERLAY:
            if key == REDIRECT:
                if regular:
                    payload = redirect_payload(value)
                continue
            if key == METACOPY:
                if regular and (found := metacopy_digest(value)) is not None:
                    digest = found
                continue
            if key[:_ESCAPED_LEN] != ESCAPED:
                continue  # the writer's own markers (the root's opaque=y)
            if key == ESCAPED_WHITEOUT and regular:
                regular = False
                whiteout = True
                continue
            if key in READER_DROPPED:
                continue
            key = TRUSTED_OVERLAY + key[_ESCAPED_LEN:]  # `overlay.unescape_key`
        elif key in READER_DROPPED:
            continue
        i = where.get(key)
        if i is not None:  # never in writer output; upstream moves the last pair into the slot
            last = xattrs.pop()
            if i < len(xattrs):
                xattrs[i] = last
                where[last[0]] = i
        where[key] = len(xattrs)
        xattrs.append((key, value))
    return tuple(xattrs), payload, digest, whiteout


def resolve(image: Image, path: bytes, entries: Entries | None = None) -> Entry:
    """The entry at `path` (components looked up one by one; symlinks are not followed)."""
    entries = entries or Entries(image)
    # Not charged to the walk budget: a lookup reads one inode per path component (bounded
    # by the path), and one Entries may serve any number of lookups.
    e = entries.of(image.inode(image.root_nid), again=True)
    walked = b""
    for part in path.split(b"/"):
        if not part:
            continue
        walked += b"/" + part
        if e is None or e.mode & S_IFMT != S_IFDIR:
            raise LookupFailed("not a directory", f"{image.name}:{walked.decode('utf-8', 'backslashreplace')}")
        nid = image.lookup(e.raw, part)
        e = entries.of(image.inode(nid), again=True) if nid is not None else None
        if e is None:
            raise LookupFailed("no such file or directory", f"{image.name}:{walked.decode('utf-8', 'backslashreplace')}")
    if e is None:
        raise LookupFailed("no such file or directory", f"{image.name}:/")
    return e


def walk(image: Image, names: frozenset[bytes] | None = None, entries: Entries | None = None,
         top: bytes = b"/", hidden: list | None = None) -> Iterator[tuple[bytes, Entry, bytes | None]]:
    """Depth-first pre-order from `top` (default the root), children in on-disk (sorted) order.

    Yields `(path, entry, first_path)`: `first_path` is None for the first occurrence of an
    inode and the path of that first occurrence for every later one (a hard link; then
    `entry` is the first occurrence's entry and nothing below it is walked again).  `top`
    comes first (the root as `b"/"`).  `names` keeps only those children of `top`
    (`--filter`); `hidden` collects the raw inodes of the whiteouts the image hides.

    A directory that contains itself or one of its ancestors is a cycle the kernel refuses
    to walk (ELOOP); it is reported instead of being printed as a hard link.
    """
    entries = entries or Entries(image)
    if top.strip(b"/"):
        first = resolve(image, top, entries)
        top = b"/" + b"/".join(p for p in top.split(b"/") if p)
    else:
        raw = image.inode(image.root_nid)
        if raw.mode & S_IFMT != S_IFDIR:
            raise image.error(raw.offset, f"root inode nid {raw.nid}: mode {raw.mode:o} is not a directory")
        first = entries.of(raw)  # type: ignore[assignment]
        top = b"/"
    yield top, first, None
    if first.mode & S_IFMT != S_IFDIR:
        return
    # Memory stays linear in the tree however deep it is: only the current directory's path
    # is held (a 100k-deep chain has 10 GB of paths), and an inode is remembered by the
    # directory that named it first; a link's first path is spelled out when one is met.
    root_nid = first.nid
    seen: dict[int, int | None] = {root_nid: root_nid}  # nid -> directory nid (None: hidden)
    active = {root_nid}  # directories being walked: a link to one of them is a cycle
    linked: dict[int, tuple[Entry, bytes]] = {}  # nid -> (entry, first path), for inodes reached again
    named: dict[int, dict[int, bytes]] = {}  # directory nid -> {nid: first name}, built for links only
    prefix = top.rstrip(b"/")  # the path of the directory on top of the stack
    stack = [(root_nid, iter(image.dirents(first.raw)), len(prefix))]
    while stack:
        dir_nid, it, _length = stack[-1]
        for name, nid, _ftype in it:
            if names is not None and len(stack) == 1 and name not in names:
                continue
            if nid in seen:
                if seen[nid] is None:
                    continue
                if nid in active:
                    raise image.error(image.inode_offset(dir_nid),
                                      f"directory nid {dir_nid}: entry {name!r} points back to nid {nid}, "
                                      "which contains it (a directory cycle)")
                hit = linked.get(nid)
                if hit is None:  # read again only once: a hostile image may link it a million times
                    hit = linked[nid] = (entries.of(image.inode(nid), again=True),  # type: ignore[assignment]
                                         _first_path(image, seen, named, nid, root_nid, top, names))
                yield prefix + b"/" + name, hit[0], hit[1]
                continue
            raw = image.inode(nid)
            e = entries.of(raw)
            if e is None:
                seen[nid] = None
                if hidden is not None:
                    hidden.append(raw)
                continue
            seen[nid] = dir_nid
            path = prefix + b"/" + name
            yield path, e, None
            if raw.mode & S_IFMT == S_IFDIR:
                active.add(nid)
                stack.append((nid, iter(image.dirents(raw)), len(path)))
                prefix = path
                break
        else:
            stack.pop()
            active.discard(dir_nid)
            if stack:
                prefix = prefix[:stack[-1][2]]


def _first_path(image: Image, seen: dict, named: dict, nid: int, root_nid: int, top: bytes,
                names: frozenset[bytes] | None) -> bytes:
    """The path an inode was first reached at: up the chain of directories that named each
    first, each name looked up in its directory (one map per directory, made once)."""
    parts = []
    while nid != root_nid:
        dir_nid = seen[nid]
        first_names = named.get(dir_nid)
        if first_names is None:  # (reversed: the first of several names of one inode wins)
            first_names = named[dir_nid] = {
                child: name for name, child, _t in reversed(image.dirents(image.inode(dir_nid)))
                if names is None or dir_nid != root_nid or name in names}
        parts.append(first_names[nid])
        nid = dir_nid
    parts.append(top.rstrip(b"/"))
    return b"/".join(reversed(parts))
