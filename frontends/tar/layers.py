"""Tar archives and OCI image layers → tree, one streaming pass per layer.

`cfsc compile layer.tar[.gz|.zst|.xz] -o IMAGE [--digest-store STORE]` builds the image of the
tree that extracting the archive would give, without extracting it: headers are parsed as they
stream by (`tarstream`) and file data goes straight into the hashing and the store
(`contents`).  Several archives are layers, merged bottom first with OCI whiteouts.

The tree an archive gives (what GNU tar extracting it as root with `-p --same-owner
--numeric-owner --xattrs --xattrs-include='*'` gives; tested byte for byte):

* file type from the type flag, permissions `mode & 07777` (symlinks always 0777, as Linux
  has them), numeric uid/gid, mtime with nanoseconds (PAX), rdev of devices, symlink targets
  verbatim, xattrs from PAX records.  `--use-epoch` sets every mtime to 0; `--skip-xattrs`,
  `--user-xattrs` and `--skip-devices` work as for directories.
* regular files: 1..64 bytes inline, larger ones external (payload `xx/yyyy…` = fs-verity
  digest), exactly as the directory frontend and mkcomposefs do.
* hard links (type `1`) name an inode already in the tree (an earlier member, or a lower
  layer): one inode, `nlink` = its names.  The home entry is the first name in depth-first
  name order, as the directory frontend chooses it.  A link to a path that does not exist
  (yet), to a directory or to itself is an error (umoci and containers/storage fail on each).
* directories the archive never lists (parents of members) are implied: 040755, owner 0:0,
  mtime 0 (the same defaults as the CRFS frontend, composefs-from-json and containers/storage;
  a fixed default keeps images reproducible where an extractor would use the current time).
  The root is implied the same way unless a member names it (`./`, `/`).
* duplicate members: the last wins, as extraction does.  A directory over a directory replaces
  the metadata (and xattrs) and keeps the children; anything else replaces the entry, removing
  a directory's whole subtree (the OCI rule; GNU tar would refuse to unlink a non-empty
  directory).  A hard link keeps the inode it was made to, whatever later replaces its target.

Safety: member names are cleaned (a leading `/` is stripped, as GNU tar does; `./`, empty
components and trailing `/` dropped) and must stay inside the root: a `..` component anywhere
is an error (GNU tar refuses such members too).  The tree cannot follow symlinks, so a member
whose path runs through a symlink the same layer made (the symlink-then-file trick: `lnk ->
/etc`, then `lnk/passwd`) or through any other non-directory of that layer is an error rather
than a write "through" the link; GNU tar refuses the same for links it considers unsafe.  (A
lower layer's symlink or file on the path is another matter, see Layers.)  Hard-link targets
are cleaned the same way.  Nothing from the archive is ever used as a host path: data only goes
into store objects named by their digest.  Size fields are checked against composefs' limit
before any data is read, data is streamed (a huge declared size costs no memory), and an
archive that ends early, has a bad checksum or malformed field, or fails to decompress is an
error naming the member (or the member before) and the byte offset.  On any error no image is
written and the store is left as it was: objects are linked into place only when every layer
was read (`contents`, `cfsc.store.objects`), so not even the complete members before the error stay.

Layers (`cfsc compile l1.tar l2.tar l3.tar`, bottom first; OCI image-spec `layer.md`,
inputs.md §2.8): `DIR/.wh.NAME` deletes NAME (a whole subtree) from the layers below, and
`DIR/.wh..wh..opq` hides everything the layers below put in DIR, whatever the marker's position
in the archive.  Neither ever affects the layer's own entries: the result is "apply the
layer's whiteouts first, then extract the rest", computed in one pass by remembering which
entries the current layer made.  (containers/storage treats opaque markers so but lets a later
`.wh.X` remove the layer's own X; composefs-rs applies both kinds in stream order.  They differ
only for a layer whose marker comes after its own entries that the marker names, which the
spec says a whiteout never affects; inputs.md §2.8.)  A whiteout for a missing path deletes
nothing; the marker files never appear in the image; a bare `.wh.` is an error.  A single layer
is a stack of one: its whiteouts hide nothing and are dropped.

AUFS metadata is not part of the tree: a member with a path component `.wh..wh.*` other than a
final `.wh..wh..opq` (`.wh..wh.plnk/123.456`, `.wh..wh.aufs`, `.wh..wh.orph/…`) is dropped.
AUFS keeps a layer's hard-linked files in `/.wh..wh.plnk/`, so the regular files there are
kept aside (their data is read like any file's; `compile` names in the store only the objects
the image refers to, so one no link used leaves nothing) and a hard link in the same layer to
one of them gets that inode (containers/storage resolves such links through them too).

Each layer is its own upper directory (OCI `layer.md`, overlayfs, containers/storage): a layer
whose member runs through a path that a lower layer made a symlink or a file (lower `lib ->
usr/lib`, then this layer's `lib/b` without a `lib/` member) has the directory there that it
implies, and in the merged view that directory replaces the lower symlink or file, holding only
this layer's entries (overlayfs shows an upper directory over a lower non-directory, nothing of
the lower).  GNU tar extracting the layer over the merged tree would write through the symlink
instead; that is not how layers stack.

`--keep-whiteouts` keeps whiteouts for stacking the image over lower layers instead (composefs
stores a character device 0:0 as an overlay whiteout, and format 1 marks its directory too):
`.wh.NAME` becomes a character device 0:0 NAME (permissions 0, owner and mtime of the marker)
unless the layer itself has an entry NAME, and `.wh..wh..opq` becomes `trusted.overlay.opaque=y`
on the directory.  Whiteouts inside an opaque directory are dropped: they are redundant, and
libcomposefs would turn the opaque `y` into `x` (inputs.md §2.9).  `--skip-devices` drops the
archive's devices, not these whiteouts.  With several layers the result is their squash:
mounted over any lower tree it shows what the whole stack would, so whiteouts and opaque
directories that may hide something below the stack are kept, and a directory that replaces a
whiteout or any other non-directory becomes opaque.  (A layer that leaves out parent
directories cannot be stacked faithfully: its implied directories, 0755 0:0 mtime 0, would
cover the lower ones' metadata.)

Hard links resolve when they are read: a link made before the same layer whites out its
target keeps the inode (the whiteout removes only the name).

Threads (`--threads`) hash and store file data while the archive is read (`contents`).
Progress goes to stderr when asked (the CLI asks when stderr is a terminal).
"""

from __future__ import annotations

from cfsc.backends.erofs.overlay import OPAQUE_DIR_XATTR
from cfsc.base import devices, limits
from cfsc.base.errors import InputError, UsageError, shown_path
from cfsc.base.fsverity import short_gil_switches
from cfsc.base.options import Options
from cfsc.base.progress import Progress, mib
from cfsc.base.tree import S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, Inode, Tree
from cfsc.frontends.tar.contents import WHOLE_MAX, Contents
from cfsc.frontends.tar.stream import (
    BLOCKDEV,
    CHAR,
    CONTIGUOUS,
    DIRECTORY,
    FIFO,
    HARDLINK,
    REGULAR,
    REGULAR_OLD,
    SYMLINK,
    Member,
    TarReader,
    header_ok,
    shown_name,
)

IMPLIED_MODE = S_IFDIR | 0o755
WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
AUFS_META = b".wh..wh."
AUFS_LINKS = b".wh..wh.plnk"
NOT_NAMES = frozenset((b"", b".", b".."))
DEVICE_TYPES = {CHAR: S_IFCHR, BLOCKDEV: S_IFBLK}


def sniff(head: bytes) -> bool:
    """A ustar/GNU header (magic at 257), a v7 header with a valid checksum, or an empty
    archive (OCI images have empty layers): zero blocks and nothing else in the whole head.  Zero
    blocks followed by data are not an archive: an image whose first block was wiped, say."""
    return head[257:262] == b"ustar" or header_ok(head) or (len(head) >= 1024 and not head.strip(b"\0"))


def load(source, options: Options | None = None) -> Tree:
    return load_many([source], options)


def load_many(sources, options: Options | None = None) -> Tree:
    """Layers, bottom first, merged into one tree (see the module docstring)."""
    return merge_layers(sources, options or Options(), ", ".join(str(s) for s in sources))


def merge_layers(sources, options: Options, name: str) -> Tree:
    """`load_many` for any layer sources: tar paths or streams, or objects whose `open_reader()`
    gives a reader with TarReader's protocol (container images' layers, `frontends.oci`)."""
    if options.skip_xattrs and options.user_xattrs:
        raise UsageError("--skip-xattrs and --user-xattrs conflict: give one of them", "--user-xattrs")
    contents = Contents(options)
    builder = _Builder(options, contents)
    try:
        with short_gil_switches():  # the pool's hashing overlaps the parsing
            for index, source in enumerate(sources):
                builder.layer_from(source, index, len(sources))
            contents.finish()
    except BaseException:
        contents.abort()
        raise
    finally:
        builder.progress.close()
    return builder.finish(name)


class _Builder:
    def __init__(self, options: Options, contents: Contents) -> None:
        self.options = options
        self.contents = contents
        self.keep = options.keep_whiteouts
        self.root = Inode(IMPLIED_MODE)
        self.linked: set[Inode] = set()  # inodes that hard-link members gave further names
        self.opaque: set[Inode] = set()  # with keep: directories that hide what lies below
        self.placeholders: set[Inode] = set()  # with keep: the whiteout devices made here
        self.xattr_sets: dict[tuple, tuple] = {}
        self.progress = Progress(options.progress)
        self.layer_name = ""
        self.members = 0
        self.reader: TarReader | None = None
        # Per layer.  `dirs`: a parent's spelling in the archive → that directory (cleared when
        # a directory leaves the tree).  With a layer below: `ours` holds the entries this layer
        # made (directories it listed or implied, new inodes), `our_links` its hard-link entries
        # as (parent, name), `touched` the lower directories its entries went into.
        self.dirs: dict[bytes, Inode] = {}
        self.ours: set[Inode] | None = None
        self.our_links: set[tuple[Inode, bytes]] = set()
        self.touched: set[Inode] = set()
        self.aufs_links: dict[bytes, Inode] = {}  # the layer's `/.wh..wh.plnk/NAME` files

    # -- layers -----------------------------------------------------------------------------

    def layer_from(self, source, index: int, count: int) -> None:
        self.dirs = {b"": self.root, b".": self.root}
        self.ours = set() if index else None
        self.our_links = set()
        self.touched = set()
        self.aufs_links = {}
        self.layer_name = f"layer {index + 1}/{count} " if count > 1 else ""
        open_reader = getattr(source, "open_reader", None)
        with TarReader(source) if open_reader is None else open_reader() as reader:
            self.reader = reader
            for m in reader.members():
                self.member(m)
        self.reader = None
        self.ours = None
        self.our_links = set()
        self.touched = set()

    def status(self) -> str:
        c = self.contents
        reader = self.reader
        read = mib(reader.offset) if reader is not None else "?"
        return (f"{self.layer_name}{self.members} members, {read} read; "
                f"hashed {c.files_done}/{c.files} files, {mib(c.bytes_done)}/{mib(c.bytes)}")

    # -- one member -------------------------------------------------------------------------

    def error(self, what: str, m: Member) -> InputError:
        assert self.reader is not None
        return self.reader.error(what, m)

    def member(self, m: Member) -> None:
        self.members += 1
        self.progress.update(self.status)
        raw = m.path
        if raw.endswith(b"/"):
            raw = raw.rstrip(b"/")
        if AUFS_META in raw and self.aufs_metadata(m):
            return
        head, _, name = raw.rpartition(b"/")
        parent = self.dirs.get(head)
        if (parent is None or name in NOT_NAMES or len(name) > limits.NAME_MAX or b"\0" in raw
                or len(raw) >= limits.PATH_MAX):
            resolved = self.resolve(m, head, name)
            if resolved is None:
                self.root_entry(m)
                return
            parent, name = resolved
        if name.startswith(WHITEOUT):
            self.whiteout(m, parent, name)
            return
        t = m.type
        if t == DIRECTORY:
            self.directory(m, parent, name)
            return
        if t == HARDLINK:
            self.hardlink(m, parent, name)
            return
        options = self.options
        uid, gid = self.owner(m)
        mtime, nsec = (0, 0) if options.use_epoch else (m.mtime, m.mtime_nsec)
        xattrs = self.xattrs(m) if m.xattrs else ()
        if t == SYMLINK:
            problem = limits.check_symlink(m.linkpath)
            if problem is not None:
                raise self.error(problem, m)
            node = Inode(S_IFLNK | 0o777, uid, gid, mtime, nsec, len(m.linkpath), payload=m.linkpath, xattrs=xattrs)
        elif t == FIFO:
            node = Inode(S_IFIFO | m.mode, uid, gid, mtime, nsec, xattrs=xattrs)
        elif t in DEVICE_TYPES:
            if options.skip_devices:
                self.remove_entry(parent, name)  # extracting replaced what was there
                return
            if m.devmajor < 0 or m.devmajor > devices.MAJOR_MAX or m.devminor < 0 or m.devminor > devices.MINOR_MAX:
                raise self.error(f"device {m.devmajor}:{m.devminor}: composefs stores majors up to"
                                 f" {devices.MAJOR_MAX} and minors up to {devices.MINOR_MAX}", m)
            node = Inode(DEVICE_TYPES[t] | m.mode, uid, gid, mtime, nsec, rdev=devices.makedev(m.devmajor, m.devminor),
                         xattrs=xattrs)
        else:  # regular
            self.regular(m, parent, name, uid, gid, mtime, nsec, xattrs)
            return
        self.place(parent, name, node)

    def regular(self, m: Member, parent: Inode | None, name: bytes, uid: int, gid: int, mtime: int, nsec: int,
                xattrs: tuple) -> Inode:
        """A file, placed (unless `parent` is None), then its data read."""
        size = m.size
        if size > limits.MAX_EXTERNAL_SIZE:
            raise self.error(f"declares {size} bytes of data: composefs stores files up to"
                             f" {limits.MAX_EXTERNAL_SIZE} bytes", m)
        node = Inode(S_IFREG | m.mode, uid, gid, mtime, nsec, size, xattrs=xattrs)
        if parent is not None:
            self.place(parent, name, node)
        if size:
            self.data(m, node, size)
        return node

    def aufs_metadata(self, m: Member) -> bool:
        """AUFS metadata (a component named `.wh..wh.*` other than an opaque marker at the
        end) is not part of the tree.  Files in the root's `.wh..wh.plnk/` are kept aside as
        hard-link targets: AUFS keeps the hard-linked files of a layer there, and links to them
        must resolve (containers/storage keeps them for that too)."""
        parts = self.clean(m.path, m, "member name")
        meta = [p.startswith(AUFS_META) for p in parts]
        if not any(meta) or (parts[-1] == OPAQUE and not any(meta[:-1])):
            return False
        if len(parts) == 2 and parts[0] == AUFS_LINKS and m.type in (REGULAR, REGULAR_OLD, CONTIGUOUS):
            uid, gid = self.owner(m)
            mtime, nsec = (0, 0) if self.options.use_epoch else (m.mtime, m.mtime_nsec)
            self.aufs_links[parts[1]] = self.regular(m, None, parts[1], uid, gid, mtime, nsec,
                                                     self.xattrs(m) if m.xattrs else ())
        return True

    def data(self, m: Member, node: Inode, size: int) -> None:
        reader = self.reader
        assert reader is not None
        named = getattr(reader, "named", None)
        if named is not None and named(m, node):
            return  # a layer read from its TOC: the payload is named there, the data not read
        if size <= limits.INLINE_MAX:
            self.contents.inline(node, reader.read(size))
        elif size <= WHOLE_MAX and not reader.has_holes:
            self.contents.whole(node, reader.read(size))
        else:  # (a sparse file's holes stay holes: hashed by runs, skipped in the store object)
            self.contents.stream(node, size, reader.extents(size))

    def owner(self, m: Member) -> tuple[int, int]:
        return m.uid, m.gid  # 32-bit: `tarstream` refuses any other id, naming the field

    def xattrs(self, m: Member) -> tuple:
        items = m.xattrs
        assert items is not None
        if self.options.skip_xattrs:
            return ()
        pairs = tuple(sorted(items.items()))
        if self.options.user_xattrs:
            pairs = tuple(kv for kv in pairs if kv[0].startswith(b"user."))
        return self.xattr_sets.setdefault(pairs, pairs)

    # -- paths ------------------------------------------------------------------------------

    def resolve(self, m: Member, head: bytes, last: bytes) -> tuple[Inode, bytes] | None:
        """The slow path: clean the name, walk (creating implied directories), cache the parent.
        None for a name that reduces to the root."""
        parts = self.clean(m.path, m, "member name")
        if not parts:
            return None
        parent = self.walk(parts[:-1], m)
        if last == parts[-1]:
            self.dirs[head] = parent
        return parent, parts[-1]

    def clean(self, raw: bytes, m: Member, what: str) -> list[bytes]:
        if b"\0" in raw:  # only PAX records can hold one; GNU tar would cut the name there
            raise self.error(f"{what} '{shown_name(raw)}' contains a NUL byte: no file name can", m)
        parts = [p for p in raw.split(b"/") if p and p != b"."]
        if b".." in parts:
            raise self.error(f"{what} '{shown_name(raw)}' contains '..': refused (it could leave the root;"
                             " GNU tar refuses it too)", m)
        for p in parts:
            if len(p) > limits.NAME_MAX:
                raise self.error(f"{what} has a component of {len(p)} bytes: at most {limits.NAME_MAX}", m)
        # (as an absolute path: `/` before each component; a 4 MB PAX path made 2 million
        # directories in memory)
        problem = limits.check_archive_path(len(parts) + sum(map(len, parts)))
        if problem:
            raise self.error(f"{what} is {problem}", m)
        return parts

    def walk(self, parts: list[bytes], m: Member) -> Inode:
        node = self.root
        ours = self.ours
        for i, part in enumerate(parts):
            children = node.children
            assert children is not None
            child = children.get(part)
            if child is None or child in self.placeholders:
                implied = Inode(IMPLIED_MODE)
                if child is not None:
                    self.opaque.add(implied)  # replaces a whiteout: hide what lies below
                node.add_child(part, implied)
                if ours is not None:
                    ours.add(implied)
                child = implied
            elif child.children is None and ours is not None and not self.is_ours(node, part, child):
                # A lower layer's symlink or file: each layer is its own upper directory, and
                # the directory this one needs there replaces it in the merged view (overlayfs
                # shows an upper directory over a lower non-directory, nothing of the lower).
                implied = Inode(IMPLIED_MODE)
                self.place(node, part, implied)
                child = implied
            elif child.children is None:
                where = shown_path(b"/".join(parts[:i + 1]))
                if child.mode & S_IFMT == S_IFLNK:
                    raise self.error(f"the path goes through the symlink '{where}' (-> "
                                     f"'{shown_path(child.payload or b'')}'): refused, the tree does not follow"
                                     " links (the symlink-then-file trick)", m)
                raise self.error(f"the path goes through '{where}', which is not a directory", m)
            elif ours is not None and child not in ours:
                self.touched.add(child)
            node = child
        return node

    def lookup(self, parts: list[bytes]) -> Inode | None:
        node = self.root
        for part in parts:
            if node.children is None:
                return None
            nxt = node.children.get(part)
            if nxt is None or nxt in self.placeholders:
                return None
            node = nxt
        return node

    # -- placing entries --------------------------------------------------------------------

    def place(self, parent: Inode, name: bytes, node: Inode, link: bool = False) -> None:
        old = parent.children.get(name)  # type: ignore[union-attr]
        if old is not None:
            if old.children is not None:
                self.dirs.clear()  # cached parents may lie inside the directory that goes
            elif self.keep and node.children is not None:
                # Whatever lies below the stack here was hidden by a non-directory (a whiteout
                # or a file): the directory replacing it must hide it too.
                self.opaque.add(node)
        parent.add_child(name, node, link)
        if self.ours is not None:
            if link:
                self.our_links.add((parent, name))
            else:
                self.ours.add(node)

    def remove_entry(self, parent: Inode, name: bytes) -> None:
        old = parent.children.get(name)  # type: ignore[union-attr]
        if old is not None:
            if old.children is not None:
                self.dirs.clear()
            parent.remove_child(name)

    def root_entry(self, m: Member) -> None:
        if m.type != DIRECTORY:
            raise self.error("names the root, which can only be a directory", m)
        self.set_dir_metadata(self.root, m)

    def set_dir_metadata(self, node: Inode, m: Member) -> None:
        node.mode = S_IFDIR | m.mode
        node.uid, node.gid = self.owner(m)
        node.mtime, node.mtime_nsec = (0, 0) if self.options.use_epoch else (m.mtime, m.mtime_nsec)
        node.xattrs = self.xattrs(m) if m.xattrs else ()

    def directory(self, m: Member, parent: Inode, name: bytes) -> None:
        old = parent.children.get(name)  # type: ignore[union-attr]
        if old is not None and old.children is not None:
            self.set_dir_metadata(old, m)  # merge: metadata replaced, children kept
            if self.ours is not None:
                self.ours.add(old)
            return
        node = Inode(IMPLIED_MODE)
        self.set_dir_metadata(node, m)
        self.place(parent, name, node)

    def hardlink(self, m: Member, parent: Inode, name: bytes) -> None:
        parts = self.clean(m.linkpath, m, "hard-link target")
        if len(parts) == 2 and parts[0] == AUFS_LINKS:
            target = self.aufs_links.get(parts[1])
        else:
            target = self.lookup(parts)
        if target is None:
            where = ("earlier in this layer (AUFS link files are per layer)" if len(parts) == 2 and parts[0] == AUFS_LINKS
                     else "earlier in the archive (or in a lower layer)")
            raise self.error(f"hard link to '{shown_name(m.linkpath)}', which does not exist: the target must"
                             f" come {where}", m)
        if target.children is not None:
            raise self.error(f"hard link to the directory '{shown_name(m.linkpath)}': expected a file", m)
        if parent.children.get(name) is target:  # type: ignore[union-attr]
            if parts[-1] == name and self.lookup(parts[:-1]) is parent:
                # A link to itself: container extractors (umoci, containers/storage) remove
                # the member's path before linking, so its target is gone and they fail; GNU
                # tar leaves the file.  An image must not depend on which one extracted it.
                raise self.error(f"hard link to itself ('{shown_name(m.linkpath)}'): expected another file", m)
            return  # the same link again
        self.place(parent, name, target, link=True)
        self.linked.add(target)

    # -- whiteouts --------------------------------------------------------------------------

    def is_ours(self, parent: Inode, name: bytes, node: Inode) -> bool:
        """Did the current layer make this entry?  (Always, when no layer lies below.)"""
        if self.ours is None:
            return True
        return node in self.ours or (parent, name) in self.our_links

    def whiteout(self, m: Member, parent: Inode, name: bytes) -> None:
        victim = name[len(WHITEOUT):]
        if victim in NOT_NAMES:
            raise self.error(f"whiteout '{shown_path(name)}' names no entry", m)
        if self.ours is None and not self.keep:
            return  # the bottom layer: nothing below to hide
        if name == OPAQUE:
            self.purge(parent)
            if self.keep:
                self.opaque.add(parent)
            return
        node = parent.children.get(victim)  # type: ignore[union-attr]
        if node is not None:
            if node in self.placeholders:
                return  # already a whiteout
            if self.is_ours(parent, victim, node):
                if node.children is not None:  # the layer's directory replaces the one below
                    self.purge(node)
                    if self.keep:
                        self.opaque.add(node)
                return  # the layer's own entry stays (and hides what lies below)
            if node.children is not None and node in self.touched:
                self.adopt(node)  # this layer put entries below it: they stay
                self.purge(node)
                if self.keep:
                    self.opaque.add(node)
                return
            self.remove_entry(parent, victim)
        if self.keep:
            uid, gid = self.owner(m)
            mtime, nsec = (0, 0) if self.options.use_epoch else (m.mtime, m.mtime_nsec)
            placeholder = Inode(S_IFCHR, uid, gid, mtime, nsec)
            self.placeholders.add(placeholder)
            parent.add_child(victim, placeholder)

    def adopt(self, node: Inode) -> None:
        """A lower directory the layer deletes but put entries under: it becomes the implied
        directory those entries need (the layer's own from now on), holding only them."""
        node.mode = IMPLIED_MODE
        node.uid = node.gid = node.mtime = node.mtime_nsec = 0
        node.xattrs = ()
        assert self.ours is not None
        self.ours.add(node)

    def purge(self, directory: Inode) -> None:
        """Remove what lower layers put in `directory`, recursively; keep this layer's entries."""
        if self.ours is None:
            return
        stack = [directory]
        while stack:
            d = stack.pop()
            for name, child in list(d.children.items()):  # type: ignore[union-attr]
                if self.is_ours(d, name, child):
                    if child.children is not None:
                        stack.append(child)
                elif child.children is not None and child in self.touched:
                    self.adopt(child)
                    stack.append(child)
                else:
                    self.remove_entry(d, name)

    # -- the end ----------------------------------------------------------------------------

    def finish(self, source: str) -> Tree:
        if self.linked:
            self.choose_homes()
        if self.keep:
            for d in self.opaque:
                for name, child in list(d.children.items()):  # type: ignore[union-attr]
                    if child in self.placeholders:
                        d.remove_child(name)
                d.set_xattr(*OPAQUE_DIR_XATTR)
        return Tree(self.root, source)

    def choose_homes(self) -> None:
        """Each linked inode's home is its first name in depth-first name order (what the
        directory frontend picks), whatever order the archive and later replacements left."""
        linked = self.linked
        names: dict[int, list] = {}
        stack = [(b"", self.root)]
        while stack:
            path, d = stack.pop()
            links = d.links
            for name, child in d.children.items():  # type: ignore[union-attr]
                if child.children is not None:
                    if links is None or name not in links:
                        stack.append((path + b"/" + name, child))
                elif child in linked:
                    names.setdefault(id(child), []).append((path + b"/" + name, d, name, child))
        for entries in names.values():
            entries.sort(key=lambda e: e[0].split(b"/"))
            for i, (_path, d, name, child) in enumerate(entries):
                d.add_child(name, child, link=i > 0)
