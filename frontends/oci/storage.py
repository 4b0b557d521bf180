"""containers-storage (overlay driver) → the layers of an image, read from their `diff`
directories in place, without exporting the image first.

The store (`/var/lib/containers/storage`, `--storage-root DIR`, or the `[overlay@ROOT+RUNROOT]`
prefix containers/image accepts) keeps `overlay-images/images.json` (each image's `id`,
`names`, `digest(s)` and top `layer`), `overlay-layers/layers.json` (each layer's `parent`) and
`overlay/ID/diff`, the layer unpacked.  IMAGE is matched against, in order: an id (or a prefix
of one that fits exactly one image), `NAME@sha256:…` (a manifest digest of the image), and
names, where a short name is tried as podman resolves local images (`NAME`, `NAME:latest`,
`localhost/NAME[:latest]`, `docker.io/library/NAME[:latest]`).  Several images for one name is
an error listing their ids.

A diff directory is fed to the tar layer merge as the members its layer's tar had: overlay
whiteouts (character devices 0:0) become `.wh.NAME`, opaque directories (`trusted.overlay.
opaque` or, rootless, `user.overlay.opaque` = `y`) get `.wh..wh..opq`, and files sharing an
inode become hard links to the first name in walk order; overlay's own xattrs are not part of
the tree.  The store records which paths each layer's tar listed (`overlay-layers/ID.tar-split.gz`,
tar-split's JSON lines): a directory its tar did not list, and the diff directory's own root,
are left out, so they are implied as for every other transport (040755 0:0 mtime 0) instead
of taking the mode and the unpack time the store gave them; a tar that lists `./` gives the
root the metadata of that member, read from the header bytes tar-split keeps (the store does
not apply it to the diff directory).  An mtime before 1970 (or after 2262) is read from there
too: the store sets such times to the epoch on its files, while the layer and every export of
the image keep them.  Without that file every directory
counts as listed.  The store verified each layer when it was pulled; its diff is trusted as is.
"""

from __future__ import annotations

import base64
import os
import re
import stat

import orjson
from cfsc.base.errors import InputError
from cfsc.base.holes import data_extents, mostly_holes
from cfsc.base.inflate import open_gzip
from cfsc.frontends.tar.stream import BLOCKDEV, CHAR, DIRECTORY, FIFO, HARDLINK, REGULAR, SYMLINK, Member, TarReader

from .reference import Reference

_HEX = re.compile(r"[0-9a-f]{3,64}")
OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque")
OVERLAY_PREFIXES = (b"trusted.overlay.", b"user.overlay.")
CHUNK = 1 << 20
BLOCK = 512
MTIME_OFFSET = 136  # of the mtime field in a tar header
UNIX_MAX_SECONDS = ((1 << 63) - 1) // 1_000_000_000  # Go's unixMaxTime: the nanoseconds fit an int64
_FAR_PAX_MTIME = re.compile(rb"[0-9] mtime=(?:-|9[2-9][0-9]{8}|[0-9]{11})")  # before 1970, or from 2261 on


def _load_json(path: str, what: str):
    try:
        with open(path, "rb") as f:
            return orjson.loads(f.read())
    except FileNotFoundError:
        raise InputError(f"no {what} (expected an overlay containers-storage root)", path) from None
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror}", path) from None
    except orjson.JSONDecodeError as e:
        raise InputError(f"not valid JSON: {e}", path) from None


def _candidates(name: str) -> list[str]:
    names = [name]
    if "@" in name:
        return names
    last = name.rsplit("/", 1)[-1]
    tagged = ":" in last
    if not tagged:
        names.append(name + ":latest")
    if "/" not in name or "." not in name.split("/", 1)[0] and ":" not in name.split("/", 1)[0] \
            and name.split("/", 1)[0] != "localhost":
        for prefix in ("localhost/", "docker.io/library/" if "/" not in name else "docker.io/"):
            names.append(prefix + name)
            if not tagged:
                names.append(prefix + name + ":latest")
    return names


def find_image(ref: Reference) -> tuple[dict, str]:
    """The images.json record IMAGE names, and where it was found (for messages)."""
    path = os.path.join(ref.path, "overlay-images", "images.json")
    images = _load_json(path, "overlay-images/images.json")
    if not isinstance(images, list):
        raise InputError("expected a JSON array of images", path)
    text = ref.image or ""
    records = [r for r in images if isinstance(r, dict) and isinstance(r.get("id"), str)]
    if _HEX.fullmatch(text):
        hits = [r for r in records if r["id"].startswith(text)]
        if len(hits) == 1:
            return hits[0], path
        if len(hits) > 1:
            raise InputError(f"ambiguous: the id prefix {text!r} fits {len(hits)} images", path)
    if "@sha256:" in text:
        name, _, digest = text.partition("@")
        hits = [r for r in records if digest == r.get("digest") or digest in (r.get("digests") or ())]
        if name:
            hits = [r for r in hits if any(n.split(":")[0].endswith(name) for n in r.get("names") or ())] or hits
        if len(hits) == 1:
            return hits[0], path
    for candidate in _candidates(text):
        hits = [r for r in records if candidate in (r.get("names") or ())]
        if len(hits) == 1:
            return hits[0], path
        if len(hits) > 1:
            raise InputError(f"ambiguous: {candidate!r} names {len(hits)} images ("
                             + ", ".join(r["id"][:12] for r in hits) + ")", path)
    known = sorted(n for r in records for n in (r.get("names") or ()) if isinstance(n, str))
    raise InputError(f"image {text!r} not found: the store has "
                     + (", ".join(known[:20]) + (" …" if len(known) > 20 else "") if known else "no named images"), path)


def layers(ref: Reference) -> list:
    image, images_path = find_image(ref)
    layers_path = os.path.join(ref.path, "overlay-layers", "layers.json")
    records = _load_json(layers_path, "overlay-layers/layers.json")
    if not isinstance(records, list):
        raise InputError("expected a JSON array of layers", layers_path)
    by_id = {r["id"]: r for r in records if isinstance(r, dict) and isinstance(r.get("id"), str)}
    chain = []
    at = image.get("layer")
    while at:
        if not isinstance(at, str) or at not in by_id:
            raise InputError(f"layer {at!r} (of image {image['id'][:12]}) is not in layers.json", layers_path)
        if len(chain) > 4096 or at in chain:
            raise InputError(f"layer {at!r}: the parent chain loops or is too long", layers_path)
        chain.append(at)
        at = by_id[at].get("parent")
    chain.reverse()
    return [DiffLayer(ref.path, layer_id) for layer_id in chain]


def _listed(root: str, layer_id: str) -> tuple[set[bytes] | None, Member | None, dict]:
    """The paths the layer's tar listed (from its tar-split), cleaned; the tar's own member
    for the root if it listed `./` (the store does not apply that one to the diff directory,
    whose root keeps the mode and time the store gave it); and the mtimes the store could not
    give its files, by path (see `_unsettable_time`).  (None, None, {}) if the store recorded
    no tar-split."""
    path = os.path.join(root, "overlay-layers", layer_id + ".tar-split.gz")
    try:
        f = open_gzip(path)
    except FileNotFoundError:
        return None, None, {}
    names: set[bytes] = set()
    times: dict[bytes, tuple[int, int]] = {}
    segments: list[bytes] = []  # raw tar bytes since the last entry: the next entry's headers
    root_member = None
    try:
        with f:
            for line in f:
                rec = orjson.loads(line)
                if rec.get("type") == 2:
                    segments.append(base64.b64decode(rec.get("payload") or ""))
                    continue
                if rec.get("type") != 1:
                    continue
                raw = base64.b64decode(rec["name_raw"]) if rec.get("name_raw") else rec.get("name", "").encode(
                    "utf-8", "surrogateescape")
                name = b"/".join(p for p in raw.split(b"/") if p and p != b".")
                names.add(name)
                headers = b"".join(segments)
                if not name and root_member is None:
                    root_member = _header_member(headers, path)
                elif _unsettable_time(headers):
                    try:
                        m = _header_member(headers, path)
                    except InputError:  # a member that needs its data to be read (a sparse map)
                        m = None
                    if m is not None and not 0 <= m.mtime <= UNIX_MAX_SECONDS:
                        times[name] = (m.mtime, m.mtime_nsec)
                segments = []
    except (OSError, EOFError, orjson.JSONDecodeError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"cannot read the layer's tar-split: {e}", path) from None
    return names, root_member, times


def _unsettable_time(headers: bytes) -> bool:
    """Might these headers hold an mtime before 1970 or after 2262?  The store sets those to
    the epoch on the files it unpacks (containers/storage `pkg/system.Chtimes`: "os.Chtimes
    has undefined behavior" outside that range), but the layer, the tar-split and every export
    of the image keep the header's.  Go writes such a time as a PAX `mtime` record (or GNU
    base-256, whose first byte has the top bit set): only those headers are parsed (GNU tar
    writes a PAX mtime for every member, so the record's value is looked at too)."""
    return _FAR_PAX_MTIME.search(headers) is not None or (
        len(headers) >= BLOCK and headers[-BLOCK + MTIME_OFFSET] & 0x80 != 0)


def _header_member(raw: bytes, where: str) -> Member | None:
    """The member whose headers (PAX ones included) `raw` holds, after the previous member's
    zero padding."""
    import io

    stream = io.BytesIO(raw.lstrip(b"\0") + bytes(1024))
    stream.name = where  # type: ignore[attr-defined]
    with TarReader(stream) as reader:
        return next(iter(reader.members()), None)


class DiffLayer:
    """A layer as the layer merge takes it (`open_reader`), read from `overlay/ID/diff`."""

    __slots__ = ("layer_id", "root")

    def __init__(self, root: str, layer_id: str) -> None:
        self.root = root
        self.layer_id = layer_id

    def __str__(self) -> str:
        return f"containers-storage layer {self.layer_id}"

    def open_reader(self) -> DiffReader:
        diff = os.path.join(self.root, "overlay", self.layer_id, "diff")
        if not os.path.isdir(diff):
            raise InputError("missing: the layer's diff directory is not there", diff)
        listed, root_member, times = _listed(self.root, self.layer_id)
        return DiffReader(diff, listed, root_member, times)


class DiffReader:
    """The layer merge's reader protocol over a diff directory (see the module docstring)."""

    def __init__(self, top: str, listed: set[bytes] | None, root_member: Member | None = None,
                 times: dict | None = None) -> None:
        self.top = os.fsencode(top)
        self.times = times or {}  # path → the tar's mtime, where the store could not set it
        self.root_member = root_member
        self.name = top
        self.listed = listed
        self.offset = 0
        self._file: bytes | None = None
        self._size = 0
        self._holes = False  # the current file is mostly holes (`has_holes`)

    def __enter__(self) -> DiffReader:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def error(self, what: str, member: Member | None = None, offset: int | None = None) -> InputError:
        where = self.name if member is None else os.path.join(self.name, os.fsdecode(member.path))
        return InputError(what, where)

    def _xattrs(self, path: bytes) -> dict[bytes, bytes]:
        out = {}
        try:
            for key in os.listxattr(path, follow_symlinks=False):
                raw = os.fsencode(key)
                out[raw] = os.getxattr(path, key, follow_symlinks=False)
        except OSError as e:
            raise InputError(f"cannot read xattrs: {e.strerror}", os.fsdecode(path)) from None
        return out

    def _list(self, rel: bytes):
        full = os.path.join(self.top, rel) if rel else self.top
        try:
            return iter(sorted(os.listdir(full)))
        except OSError as e:
            raise InputError(f"cannot list: {e.strerror}", os.fsdecode(full)) from None

    def members(self):
        """Depth first, names in byte order: a directory's entries right after it."""
        links: dict[tuple[int, int], bytes] = {}
        if self.root_member is not None:  # the tar named `./`
            yield self.root_member
        stack = [(b"", self._list(b""))]
        while stack:
            rel, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                continue
            path = rel + b"/" + name if rel else name
            is_dir = yield from self._entry(path, links, self.listed)
            if is_dir:
                stack.append((path, self._list(path)))

    def _entry(self, path: bytes, links: dict, listed: set[bytes] | None):
        abspath = os.path.join(self.top, path)
        try:
            st = os.lstat(abspath)
        except OSError as e:
            raise InputError(f"cannot stat: {e.strerror}", os.fsdecode(abspath)) from None
        mode = st.st_mode
        head, _, name = path.rpartition(b"/")
        if stat.S_ISCHR(mode) and st.st_rdev == 0:
            yield self._member(REGULAR, (head + b"/" if head else b"") + b".wh." + name, st, {})
            return False
        xattrs = self._xattrs(abspath)
        opaque = any(xattrs.get(k) == b"y" for k in OPAQUE_XATTRS)
        xattrs = {k: v for k, v in xattrs.items() if not k.startswith(OVERLAY_PREFIXES)}
        if stat.S_ISDIR(mode):
            if listed is None or path in listed:
                yield self._member(DIRECTORY, path, st, xattrs)
            if opaque:
                yield self._member(REGULAR, path + b"/.wh..wh..opq", st, {})
            return True
        if not stat.S_ISDIR(mode) and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = links.get(key)
            if first is not None:
                m = self._member(HARDLINK, path, st, {})
                m.linkpath = first
                yield m
                return False
            links[key] = path
        if stat.S_ISREG(mode):
            m = self._member(REGULAR, path, st, xattrs)
            m.size = st.st_size
            self._file = abspath
            self._size = st.st_size
            self._holes = mostly_holes(st)
            yield m
            self._file = None
        elif stat.S_ISLNK(mode):
            m = self._member(SYMLINK, path, st, xattrs)
            m.linkpath = os.readlink(abspath)
            yield m
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            m = self._member(CHAR if stat.S_ISCHR(mode) else BLOCKDEV, path, st, xattrs)
            m.devmajor, m.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            yield m
        elif stat.S_ISFIFO(mode):
            yield self._member(FIFO, path, st, xattrs)
        else:
            raise InputError("a socket or an unknown file type: a layer cannot hold it", os.fsdecode(abspath))
        return False

    def _member(self, t: bytes, path: bytes, st, xattrs: dict) -> Member:
        self.offset += 1
        m = Member(self.offset, t, path, b"", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, 0,
                   st.st_mtime_ns // 1_000_000_000, 0, 0)
        m.mtime_nsec = st.st_mtime_ns % 1_000_000_000
        if self.times and path in self.times:
            m.mtime, m.mtime_nsec = self.times[path]
        if xattrs:
            m.xattrs = xattrs
        return m

    # -- data of the current regular file ---------------------------------------------------

    def read(self, n: int) -> bytes:
        return b"".join(self.chunks(n))

    @property
    def has_holes(self) -> bool:
        """Whether the current file is mostly holes (a lastlog, a disk image): `extents`."""
        return self._holes

    def chunks(self, n: int):
        return self._pieces(n, False)

    def extents(self, n: int):
        """`chunks`, but a file mostly made of holes is read by its map, a hole as its length."""
        return self._pieces(n, self._holes)

    def _pieces(self, n: int, holes: bool):
        """The current file's `n` bytes in pieces, read where `holes` says the data is (the
        file's map; else all of it); it must still hold exactly `n` bytes at the end."""
        assert self._file is not None
        path = self._file
        at = 0
        try:
            with open(path, "rb") as f:
                fd = f.fileno()
                for offset, length in data_extents(fd, 0, n) if holes else ((0, n),):
                    if offset > at:
                        yield offset - at
                    at, stop = offset, offset + length
                    while at < stop:
                        data = os.pread(fd, min(CHUNK, stop - at), at)
                        if not data:
                            raise InputError(f"changed while read: {at} of {n} bytes there", os.fsdecode(path))
                        at += len(data)
                        yield data
                if at < n:
                    yield n - at
                size = os.fstat(fd).st_size
                if size != n:
                    raise InputError(f"changed while read: {size} bytes, not {n}", os.fsdecode(path))
        except OSError as e:
            raise InputError(f"cannot read: {e.strerror}", os.fsdecode(path)) from None
