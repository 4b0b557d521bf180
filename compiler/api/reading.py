"""Reading: `open(source)` → an `Image` whose entries carry what a user of the mount sees.

An image is read as it is; any other source (dumpfile, directory, tar layers, OCI image, CRFS
TOC, OSTree commit) is compiled in memory first, exactly as `cfsc compile` would write it, so
`open` describes the image a source *becomes* (what `cfsc dump`, `ls` and `info` show too).

Entries are made on demand from the image bytes, one small object per entry visited, and are
not kept: walking a million-entry image holds one entry at a time beside the image itself.
An `Entry` wraps the reader's entry (`cfsc.backends.erofs.entries`) rather than copying it.
The image is read into memory whole, so an `Image` holds no open file; `close()` (or a `with`
block) only lets go of its bytes early.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from cfsc.api.arguments import Source, options_of, side_of
from cfsc.base.errors import LookupFailed
from cfsc.base.options import Options
from cfsc.base.tree import FILE_TYPES, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, WHITEOUT

if TYPE_CHECKING:
    from cfsc.backends.erofs import entries as _entries
    from cfsc.backends.erofs import reader as _reader

PathArg = str | bytes | os.PathLike


def _path_bytes(path: PathArg) -> bytes:
    return os.fsencode(path)


class Entry:
    """One entry of an image: a path and the inode it names, as a user of the mount sees it.

    `mode` is the whole `st_mode` (type and permission bits, as `os.stat` gives it: use
    `stat.S_IMODE` for the permissions); `type` names the type (`reg`, `dir`, `symlink`,
    `block`, `char`, `fifo`, `socket`, or `whiteout` for a character device 0:0).  Names,
    paths, targets, payloads, xattr keys and values are `bytes`.  An attribute the entry's
    type does not have is None (`target` of a regular file, `payload` of a directory).
    """

    __slots__ = ("_e", "hardlink", "path")

    def __init__(self, path: bytes, entry: _entries.Entry, hardlink: bytes | None = None) -> None:
        self.path: bytes = path
        # The path this inode was first met at, when a walk meets it again (a hard link: the
        # dump's `@` lines); None for a first occurrence and for entries `lookup` returns.
        self.hardlink: bytes | None = hardlink
        self._e = entry

    @property
    def name(self) -> bytes:
        """The last component of the path (`b""` for the root)."""
        return self.path.rpartition(b"/")[2]

    @property
    def type(self) -> str:
        ftype = self._e.mode & S_IFMT
        if ftype == S_IFCHR and self._e.rdev == 0:
            return WHITEOUT
        return FILE_TYPES[ftype]

    @property
    def mode(self) -> int:
        return self._e.mode

    @property
    def uid(self) -> int:
        return self._e.uid

    @property
    def gid(self) -> int:
        return self._e.gid

    @property
    def size(self) -> int:
        return self._e.size

    @property
    def mtime(self) -> int:
        """Seconds since the epoch (may be negative); `mtime_nsec` holds the nanoseconds."""
        return self._e.mtime

    @property
    def mtime_nsec(self) -> int:
        return self._e.mtime_nsec

    @property
    def nlink(self) -> int:
        return self._e.nlink

    @property
    def ino(self) -> int:
        """The inode number the image stores (`st_ino` of the mounted file)."""
        return self._e.ino

    @property
    def rdev(self) -> int:
        """A device's number (`os.major`/`os.minor` split it); 0 for every other type."""
        return self._e.rdev

    @property
    def target(self) -> bytes | None:
        """A symlink's target."""
        return self._e.payload if self._e.mode & S_IFMT == S_IFLNK else None

    @property
    def payload(self) -> bytes | None:
        """A regular file's backing file, relative to the object store (`ab/cdef…`)."""
        return self._e.payload if self._e.mode & S_IFMT == S_IFREG else None

    @property
    def digest(self) -> bytes | None:
        """The fs-verity digest the image records for the backing file, if any."""
        return self._e.digest

    @property
    def content(self) -> bytes | None:
        """A regular file's data when the image holds it inline (small files), else None."""
        content = self._e.content
        return None if content is None else content[:self._e.size]

    @property
    def xattrs(self) -> dict[bytes, bytes]:
        """Extended attributes, key → value, in the order composefs' reader lists them (the
        overlay ones composefs itself uses are not shown: `payload`, `digest`)."""
        return dict(self._e.xattrs)

    def xattr(self, key: str | bytes) -> bytes | None:
        """One xattr's value, or None."""
        want = os.fsencode(key)
        for k, v in self._e.xattrs:
            if k == want:
                return v
        return None

    def __repr__(self) -> str:
        link = f" hardlink={self.hardlink!r}" if self.hardlink is not None else ""
        return f"<cfsc.Entry {self.path!r} {self.type} {self.mode & 0o7777:04o} size={self.size}{link}>"


class Image:
    """A composefs image open for reading (`cfsc.open`).

    Iterating walks every entry (`walk()`); `lookup(path)` finds one, `path in image` asks
    whether it exists, `listdir(path)` lists a directory.
    """

    __slots__ = ("_algorithm", "_digest", "_image", "_lookups")

    def __init__(self, image: _reader.Image, algorithm: str = "sha256") -> None:
        from cfsc.backends.erofs.entries import Entries

        self._algorithm = algorithm  # `Options.hash`: the digest `compile` would print
        self._image: _reader.Image | None = image
        self._lookups = Entries(image)  # lookups are not charged to a walk's read budget
        self._digest: bytes | None = None

    @property
    def _open(self) -> _reader.Image:
        if self._image is None:
            raise ValueError("the image is closed")
        return self._image

    @property
    def name(self) -> str:
        """The source's name (its path, or `<compiled>` for a tree without one)."""
        return self._open.name

    @property
    def version(self) -> int:
        """The composefs format version (0 or 1)."""
        return self._open.version

    @property
    def data(self) -> bytes:
        """The image's bytes (what `cfsc compile` writes for the source)."""
        return bytes(self._open.data)

    @property
    def digest(self) -> bytes:
        """The image's fs-verity digest (what `mount -o digest=` and `cfsc check` compare)."""
        if self._digest is None:
            from cfsc.base.fsverity import algorithm_named, digest_bytes

            self._digest = digest_bytes(self._open.data, algorithm_named(self._algorithm))
        return self._digest

    def walk(self, top: PathArg = "/", where: str | None = None) -> Iterator[Entry]:
        """Every entry from `top` down, depth-first, children in name order: the order of
        `cfsc dump`.  A hard link's later names come with `hardlink` set to its first one.

        `where` keeps the entries matching a query, as `cfsc ls --where` does
        (`path ~ "/usr/**" and type == reg and size > 1M`; see `cfsc diff --help`)."""
        from cfsc.backends.erofs.entries import Entries, walk

        image = self._open
        walker = walk(image, None, Entries(image), top=_path_bytes(top))
        if where is None:
            for path, e, first in walker:
                yield Entry(path, e, first)
            return
        from cfsc.base.query import parse  # start-up: lark, only for queries

        match = parse(where, "where")
        for path, e, first in walker:
            if match(path, e):
                yield Entry(path, e, first)

    def __iter__(self) -> Iterator[Entry]:
        return self.walk()

    def lookup(self, path: PathArg) -> Entry:
        """The entry at `path` (symlinks are not followed).

        Raises `cfsc.errors.LookupFailed` (an `OSError`, errno ENOENT, whose message names the
        image and the path) when there is none: `path in image` asks without raising."""
        from cfsc.backends.erofs.entries import resolve

        raw = _path_bytes(path)
        parts = [p for p in raw.split(b"/") if p]
        return Entry(b"/" + b"/".join(parts), resolve(self._open, raw, self._lookups))

    def __contains__(self, path: object) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        try:
            self.lookup(path)
        except LookupFailed:
            return False
        return True

    def listdir(self, path: PathArg = "/") -> list[Entry]:
        """The entries of one directory, in name order (`hardlink` is not set: only a walk
        knows which name of an inode comes first)."""
        from cfsc.backends.erofs.entries import Entries

        top = self.lookup(path)
        if top._e.mode & S_IFMT != S_IFDIR:
            import errno

            raise LookupFailed("not a directory", f"{self.name}:{os.fsdecode(top.path)}", errno.ENOTDIR)
        image = self._open
        entries = Entries(image)  # a fresh read budget: a hostile directory cannot make it loop
        prefix = top.path.rstrip(b"/")
        out = []
        for name, nid, _ftype in image.dirents(top._e.raw):
            e = entries.of(image.inode(nid))
            if e is not None:  # (None: a whiteout the image hides)
                out.append(Entry(prefix + b"/" + name, e))
        return out

    def close(self) -> None:
        """Let go of the image's bytes (nothing else is held: no file stays open)."""
        self._image = None

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._image is None else f"{len(self._image.data)} bytes, version {self._image.version}"
        return f"<cfsc.Image {self.name if self._image is not None else ''} ({state})>"


def open(source: Source, *, format: str | None = None, options: Options | None = None,  # noqa: A001
         **option_fields: Any) -> Image:
    """Open an image, or compile any other source in memory and open the result.

    `source`: an image, dumpfile, directory, tar layer, CRFS TOC, `ostree:REPO:REF`,
    `oci:DIR`, … (detected from its content; `format` names it: `dump`, `image`, `dir`,
    `tar`, `crfs`, `ostree`, `oci`), or a list of tar layers, bottom first.  Keywords are
    `cfsc.Options` fields (`max_version=0`, `exclude=['path ~ "/tmp/**"']`); as in `cfsc ls`,
    an image is compiled again only when such an option applies to images.

    Errors are `cfsc.errors.CfscError`s: `InputError` for a bad source, `UsageError` for bad
    options."""
    from cfsc import build
    from cfsc.tools.images import open_image

    opts = options_of(options, option_fields)
    side = side_of(source)
    if isinstance(side, tuple):
        return Image(build.compile_in_memory(build.load(list(side), opts, format), opts), opts.hash)
    return Image(open_image(side, opts, format, recompile=True), opts.hash)


__all__ = ["Entry", "Image", "open"]
