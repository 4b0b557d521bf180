"""A source as a manifest: what each path of the image it compiles to holds, with subtree fingerprints.

`cfsc diff` compares *what a user of the image sees*, whatever the sources are, so an image
and the directory it was built from are identical.  Each side is normalised the way
compile + read would change it, without writing an image:

* an image is read with the image frontend (`read_tree`: overlay xattrs already undone);
* any other source goes through the pipeline's passes up to the overlay lowering — the very
  passes `cfsc compile` runs (exclusion, mtime clamping, hard-link homes and nlink, version
  choice, overlay xattrs; not the limit checks, which change nothing: a diff also compares
  sources `compile` would refuse) — and each inode is then read back the way the image reader
  reads it (`entries.interpret_xattrs` on its lowered xattrs: escaping undone, writer markers
  dropped, whiteouts recognised, version 1's `opaque=x` markers visible like in the image).

A path's *record* is then a tuple of `FIELDS`, where what the image cannot hold is None:
directory size and nlink (derived from the layout), a symlink's size (its target's length),
the size and rdev of devices, fifos and sockets, payload and digest of a file with inline
data, a whiteout's type bits (`whiteout`).  A property test checks that a tree's records
equal those of the image it compiles to.

`--ignore` does not change records (a `--where` query sees an entry's real values): the diff
compares them through `Ignore.projection`, and fingerprints are taken of the projections.

Fingerprints: every home directory gets blake3 over a canonical encoding of its own record
and its children's names, records and fingerprints (`marshal` format 2: deterministic, no
back-references), computed bottom-up without recursion.  Two directories with equal
fingerprints hold the same subtree (hard-link groups included: each record lists every
path of its inode), so a diff skips them without looking inside.

Two sides load in parallel: `open_pair` loads one in a forked worker process that answers
the diff's questions (`listings`, `below`, `image`) over a pipe; records are small tuples,
and only differing directories are ever sent.
"""

from __future__ import annotations

import marshal
import multiprocessing
import os
import traceback
from collections.abc import Callable, Iterable
from itertools import repeat
from operator import attrgetter, itemgetter

from blake3 import blake3
from cfsc import build, frontends
from cfsc.backends.erofs.entries import Entries, interpret_xattrs
from cfsc.backends.erofs.overlay import is_external
from cfsc.backends.erofs.reader import Image
from cfsc.base import record
from cfsc.base.errors import CfscError, UsageError
from cfsc.base.options import Options, reshapes
from cfsc.base.streams import is_reference, source_name
from cfsc.base.tree import FILE_TYPES, S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, WHITEOUT, Inode, Tree
from cfsc.build.pipeline import PASSES, run_passes
from cfsc.frontends.image import read_tree
from cfsc.passes.add_overlay_xattrs import add_overlay_xattrs
from cfsc.passes.exclude_entries import exclude_entries
from cfsc.passes.resolve_hardlinks import resolve_hardlinks
from cfsc.passes.validate_limits import validate_limits

FIELDS = ("type", "mode", "uid", "gid", "rdev", "mtime", "mtime_nsec", "size", "nlink",
          "target", "payload", "digest", "content", "xattrs", "hardlinks")
# --ignore names: each hides some fields (or, as `xattr:KEY`, one xattr).
IGNORABLE = {
    "mode": ("mode",), "uid": ("uid",), "gid": ("gid",), "owner": ("uid", "gid"),
    "rdev": ("rdev",), "mtime": ("mtime", "mtime_nsec"), "mtime_nsec": ("mtime_nsec",),
    "size": ("size",), "nlink": ("nlink",), "target": ("target",), "payload": ("payload",),
    "digest": ("digest",), "content": ("content",), "data": ("payload", "digest", "content"),
    "xattrs": ("xattrs",), "hardlinks": ("hardlinks",),
    "layout": (),  # two images with equal trees but different bytes (`cfsc.tools.diff`)
}
TYPE_NAMES = {**FILE_TYPES, -1: "whiteout"}
# What a source goes through: the pipeline up to the overlay lowering, without the limit
# checks (they reject, they change nothing: a diff also compares sources `compile` refuses).
NORMALISE = tuple(p for p in PASSES[:PASSES.index(add_overlay_xattrs) + 1] if p is not validate_limits)

Record = tuple
# (name, record, fingerprint or None): a child as a listing gives it; the fingerprint is set
# for home directories only (links and files are compared by their record alone).
Item = tuple[bytes, Record, bytes | None]


class Ignore:
    """What `--ignore` hides: whole fields and single xattr keys."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        fields: set[str] = set()
        keys: set[bytes] = set()
        self.names: frozenset[str] = frozenset(n.strip() for n in names if n.strip())
        for name in self.names:
            if name.startswith("xattr:"):
                keys.add(os.fsencode(name[6:]))
            elif name in IGNORABLE:
                fields.update(IGNORABLE[name])
            else:
                raise UsageError(f"cannot ignore {name!r}: expected {', '.join(IGNORABLE)} or xattr:KEY", "--ignore")
        self.fields = tuple(f for f in FIELDS if f not in fields)
        self.keys = frozenset(keys)

    def projection(self) -> Callable[[Record], Record] | None:
        """A record as the comparison sees it: ignored fields and xattr keys left out (None:
        nothing is ignored).  Records themselves stay whole, so `--where` sees real values."""
        if self.fields == FIELDS and not self.keys:
            return None
        getter = itemgetter(*(FIELDS.index(f) for f in self.fields))
        pick = getter if len(self.fields) > 1 else lambda rec: (getter(rec),)
        if not self.keys or "xattrs" not in self.fields:
            return pick
        hidden = self.keys
        at = self.fields.index("xattrs")
        source = FIELDS.index("xattrs")
        shown: dict[tuple, tuple] = {}  # xattr tuple -> without the hidden keys

        def project(rec: Record) -> Record:
            xattrs = rec[source]
            kept = pick(rec)
            if not xattrs:
                return kept
            view = shown.get(xattrs)
            if view is None:
                view = tuple(kv for kv in xattrs if kv[0] not in hidden)
                view = shown[xattrs] = xattrs if len(view) == len(xattrs) else view
            return kept if view is xattrs else (*kept[:at], view, *kept[at + 1:])

        return project

    @classmethod
    def parse(cls, values: Iterable[str]) -> Ignore:
        """From `--ignore a,b --ignore c`."""
        return cls(part for value in values for part in value.split(","))

    def __reduce__(self):
        return (Ignore, (sorted(self.names),))


# -- a side: one source, or a stack of tar layers ---------------------------------------------

def layers(text):
    """A side as the command line gives it: `l1.tar+l2.tar+…` is a stack of layers, bottom first
    (merged as `cfsc compile l1.tar l2.tar` merges them), unless a file has that very name or
    none of the parts exists; anything else is one source, returned as is."""
    if (not isinstance(text, str) or "+" not in text or is_reference(text)
            or os.path.lexists(text)):
        return text
    parts = tuple(text.split("+"))
    if "" in parts or not any(map(os.path.lexists, parts)):
        return text  # (opening it names the whole text)
    return parts


def inputs(side) -> list:
    """What the frontend reads for a side: its layers, or the one source."""
    return list(side) if isinstance(side, tuple) else [side]


def side_name(side) -> str:
    return "+".join(map(source_name, side)) if isinstance(side, tuple) else source_name(side)


def detect(side) -> str:
    """The source format of a side (of its first layer)."""
    return frontends.detect(inputs(side)[0])


class _Xattrs:
    """A tree's xattr tuples as the image shows them, worked out once per distinct tuple."""

    def __init__(self, lowered: bool) -> None:
        self.identity = not lowered
        # (id(tuple), regular) -> (the tuple, kept alive so its id stays unique; shown; whiteout)
        self.cache: dict[tuple[int, bool], tuple[tuple, tuple, bool]] = {}
        self.shown_regular: dict[int, tuple] = {}  # id -> shown, for regular files (column path)
        self.whiteout_ids: set[int] = set()  # ids of tuples that make a regular file a whiteout

    def view(self, xattrs: tuple, regular: bool) -> tuple[tuple, bool]:
        """(xattrs as read back, sorted; whether the inode reads back as a whiteout)."""
        if not xattrs or self.identity:
            return xattrs, False
        hit = self.cache.get((id(xattrs), regular))
        if hit is None:
            items, _payload, _digest, whiteout = interpret_xattrs(list(xattrs), regular)
            shown = tuple(sorted(items))
            hit = self.cache[(id(xattrs), regular)] = (xattrs, shown, whiteout)
            if regular:
                self.shown_regular[id(xattrs)] = shown
                if whiteout:
                    self.whiteout_ids.add(id(xattrs))
        return hit[1], hit[2]

    def column(self, tuples: list[tuple]) -> tuple[list[tuple], list[int]]:
        """Views of many regular files' tuples, and the positions that read back as whiteouts."""
        if self.identity:
            return tuples, []
        ids = list(map(id, tuples))
        shown = self.shown_regular
        missing = set(ids).difference(shown)
        if missing:
            for xattrs in tuples:
                if id(xattrs) in missing:
                    self.view(xattrs, True)
            shown[id(())] = ()
        flagged = []
        if self.whiteout_ids and not self.whiteout_ids.isdisjoint(ids):
            flagged = [i for i, key in enumerate(ids) if key in self.whiteout_ids]
        return list(map(shown.__getitem__, ids)), flagged


_MODE = attrgetter("mode")
_UID = attrgetter("uid")
_GID = attrgetter("gid")
_MTIME = attrgetter("mtime")
_NSEC = attrgetter("mtime_nsec")
_SIZE = attrgetter("size")
_NLINK = attrgetter("nlink")
_PAYLOAD = attrgetter("payload")
_DIGEST = attrgetter("digest")
_CONTENT = attrgetter("content")
_XATTRS = attrgetter("xattrs")


class _Records:
    """Records of inodes: one at a time (`one`), or a directory's worth by columns (`column`)."""

    def __init__(self, lowered: bool, hardlinks: dict[int, tuple]) -> None:
        self.xattrs = _Xattrs(lowered)
        self.hardlinks = hardlinks

    def one(self, node: Inode) -> Record:
        mode = node.mode
        ftype = mode & S_IFMT
        size = rdev = target = payload = digest = content = None
        nlink = node.nlink
        kind = FILE_TYPES.get(ftype, "?")
        if ftype == S_IFREG:
            xattrs, whiteout = self.xattrs.view(node.xattrs, True)
            if whiteout:
                kind = WHITEOUT
            else:
                size = node.size
                if is_external(node):
                    payload = node.payload or None
                    digest = node.digest
                else:
                    content = node.content or None
        else:
            xattrs = self.xattrs.view(node.xattrs, False)[0]
            if ftype == S_IFDIR:
                nlink = None
            elif ftype == S_IFLNK:
                target = node.payload
            elif ftype == S_IFCHR and node.rdev == 0:
                kind = WHITEOUT
            elif ftype == S_IFCHR or ftype == S_IFBLK:
                rdev = node.rdev
        return (kind, mode & 0o7777, node.uid, node.gid, rdev, node.mtime, node.mtime_nsec, size, nlink,
                target, payload, digest, content, xattrs, self.hardlinks.get(id(node)))

    def column(self, nodes: list[Inode]) -> list[Record]:
        """Records of many inodes: built column by column as regular files (C-level maps, the
        common case), then every inode that is something else redone by `one`."""
        n = len(nodes)
        modes = list(map(_MODE, nodes))
        odd = [i for i, m in enumerate(modes) if m & S_IFMT != S_IFREG]
        shown, flagged = self.xattrs.column(list(map(_XATTRS, nodes)))
        sizes = list(map(_SIZE, nodes))
        contents = list(map(_CONTENT, nodes))
        if contents.count(None) == n and 0 not in sizes:  # all external
            payloads = [p or None for p in map(_PAYLOAD, nodes)]
            digests: list = list(map(_DIGEST, nodes))
            contents = [None] * n
        else:
            # `overlay.is_external` of each (all are regular here: the others are redone below)
            external = [bool(s) and c is None for s, c in zip(sizes, contents, strict=True)]
            payloads = [(p or None) if e else None for p, e in zip(map(_PAYLOAD, nodes), external, strict=True)]
            digests = [d if e else None for d, e in zip(map(_DIGEST, nodes), external, strict=True)]
            contents = [None if e else (c or None) for c, e in zip(contents, external, strict=True)]
        links = map(self.hardlinks.get, map(id, nodes)) if self.hardlinks else repeat(None, n)
        none = repeat(None, n)
        records = list(zip(repeat(FILE_TYPES[S_IFREG], n), [m & 0o7777 for m in modes], map(_UID, nodes), map(_GID, nodes), none,
                           map(_MTIME, nodes), map(_NSEC, nodes), sizes, map(_NLINK, nodes), repeat(None, n),
                           payloads, digests, contents, shown, links, strict=True))
        for i in (set(odd).union(flagged) if flagged else odd):
            records[i] = self.one(nodes[i])
        return records


class ImageRecords:
    """Records of single inodes of an image, as a `Manifest` of the image has them (without
    `hardlinks`, which the caller gives): for comparing two images in step, parsing only the
    inodes whose bytes differ (`cfsc.tools.diff`)."""

    def __init__(self, image) -> None:
        self.image = image
        self.entries = Entries(image)
        self.records = _Records(False, {})

    def record(self, nid: int, links: tuple | None) -> Record:
        e = self.entries.of(self.image.inode(nid))
        assert e is not None  # (the caller skips the whiteouts an image hides)
        if e.xattrs:
            e.xattrs = self.entries.sorted_xattrs(e.xattrs)  # as `read_tree` keeps them
        rec = self.records.one(e)  # an `Entry` has the attributes of an `Inode`
        return rec if links is None else (*rec[:-1], links)


class Manifest:
    """One normalised source held in this process (see the module docstring)."""

    def __init__(self, tree: Tree, lowered: bool, ignore: Ignore, name: str, fmt: str,
                 image=None) -> None:
        self.tree = tree
        self.name = name
        self.fmt = fmt
        self.fields = ignore.fields  # what a diff compares (records hold every field)
        self.project = ignore.projection()
        self.image = image  # the source's Image, if it is one
        self.options: Options | None = None
        # In a lowered tree the root holds the 256 whiteouts the reader hides.
        self.hidden_root = lowered
        order = self._directories()
        self.records = _Records(lowered, self._hardlinks(order))
        self.record = self.records.one
        self.prints: dict[int, bytes] = {}
        prints = self.prints
        record = self.record
        project = self.project
        for _path, directory in reversed(order):
            # Fingerprints cover what is compared: subtrees differing only in ignored fields are skipped.
            if project is None:
                shape = (record(directory), self.items(directory))
            else:
                shape = (project(record(directory)), [(n, project(r), fp) for n, r, fp in self.items(directory)])
            prints[id(directory)] = blake3(marshal.dumps(shape, 2)).digest()
        self._pending: tuple[str, object] | None = None

    def _directories(self) -> list[tuple[bytes, Inode]]:
        """Home directories with their paths, each before its subdirectories."""
        root = self.tree.root
        order = [(b"/", root)]
        self.dirs = {b"/": root}
        i = 0
        while i < len(order):
            path, directory = order[i]
            i += 1
            prefix = path if path != b"/" else b""
            links = directory.links
            for name, child in directory.children.items():  # type: ignore[union-attr]
                if child.children is not None and (links is None or name not in links):
                    child_path = prefix + b"/" + name
                    order.append((child_path, child))
                    self.dirs[child_path] = child
        return order

    @staticmethod
    def _hardlinks(order: list[tuple[bytes, Inode]]) -> dict[int, tuple]:
        """id(inode) -> every path of it (sorted), for inodes with more than one name."""
        linked = set()
        for _path, directory in order:
            links = directory.links
            if links:
                children = directory.children
                linked.update(id(children[name]) for name in links)  # type: ignore[index]
        if not linked:
            return {}
        paths: dict[int, list[bytes]] = {}
        for path, directory in order:
            prefix = path if path != b"/" else b""
            for name, child in directory.children.items():  # type: ignore[union-attr]
                if id(child) in linked:
                    paths.setdefault(id(child), []).append(prefix + b"/" + name)
        return {key: tuple(sorted(names)) for key, names in paths.items() if len(names) > 1}

    def items(self, directory: Inode) -> list[Item]:
        """A directory's children, sorted by name, as `(name, record, fingerprint or None)`."""
        children = directory.children
        assert children is not None
        if not children:
            return []
        names = sorted(children)
        nodes = list(map(children.__getitem__, names))
        if self.hidden_root and directory is self.tree.root:
            # the root whiteouts the reader hides
            kept = [i for i, c in enumerate(nodes) if not (c.mode & S_IFMT == S_IFCHR and c.rdev == 0)]
            names = [names[i] for i in kept]
            nodes = [nodes[i] for i in kept]
        prints = list(map(self.prints.get, map(id, nodes)))  # set for home directories only…
        links = directory.links
        if links:  # … and a link to a directory is compared by its record alone
            prints = [None if name in links else fp for name, fp in zip(names, prints, strict=True)]
        return list(zip(names, self.records.column(nodes) if nodes else [], prints, strict=True))

    # -- the questions a diff asks (the same for a remote manifest) ---------------------------

    def root(self) -> tuple[Record, bytes]:
        root = self.tree.root
        return self.record(root), self.prints[id(root)]

    def listings(self, paths: list[bytes]) -> list[list[Item]]:
        return [self.items(self.dirs[path]) for path in paths]

    def below(self, paths: list[bytes]) -> list[list[tuple[bytes, Record]]]:
        """Everything under each directory, depth-first, names sorted: `(path, record)`."""
        return [self._below(path) for path in paths]

    def _below(self, top: bytes) -> list[tuple[bytes, Record]]:
        out: list[tuple[bytes, Record]] = []
        stack = [(top.rstrip(b"/"), iter(self.items(self.dirs[top])))]
        while stack:
            prefix, it = stack[-1]
            for name, rec, fingerprint in it:
                path = prefix + b"/" + name
                out.append((path, rec))
                if fingerprint is not None:
                    stack.append((path, iter(self.items(self.dirs[path]))))
                    break
            else:
                stack.pop()
        return out

    def image_bytes(self, _arg=None) -> bytes:
        """The image this source is (an image) or compiles to (with the options it was loaded with)."""
        if self.image is not None:
            return bytes(self.image.data)
        # (the tree went through some passes already: they are idempotent)
        return build.compile_tree(self.tree, self.options)  # type: ignore[return-value]

    # Asynchronous form: `start` a question, then `finish` it (a remote side works meanwhile).
    def start(self, op: str, arg=None) -> None:
        self._pending = (op, arg)

    def finish(self):
        assert self._pending is not None
        op, arg = self._pending
        self._pending = None
        return getattr(self, OPS[op])(arg)

    def close(self) -> None:
        pass


OPS = {"listings": "listings", "below": "below", "image": "image_bytes"}


def load(source, options: Options | None = None, fmt: str | None = None, ignore: Ignore | None = None,
         data: bytes | None = None) -> Manifest:
    """Normalise one side (see the module docstring): a source or a tuple of layers (`layers`);
    `data`: its input, already read (a format with `Frontend.delta`)."""
    options = options or Options()
    ignore = ignore or Ignore()
    if fmt is None:
        fmt = detect(source)
    frontend = frontends.get(fmt)
    name = side_name(source)
    # An image is compared as it is, filtered by --exclude; the other options that apply to
    # images (versions, --clamp-mtime) make it a source compiled like any other.
    as_is = not reshapes(record.replace(options, exclude=()), "image")
    with build.batch_allocation():
        if frontend.image and not isinstance(source, tuple) and as_is:  # (several: the frontend says no)
            image = Image.open(source)
            tree = read_tree(image)
            if options.exclude:
                tree = run_passes(tree, options, (exclude_entries, resolve_hardlinks))  # re-home links
            manifest = Manifest(tree, False, ignore, name, fmt, image)
        else:
            if data is not None:
                tree = frontend.loads(data, options, name)
            else:
                tree = build.load(inputs(source), options, fmt)
            manifest = Manifest(run_passes(tree, options, NORMALISE), True, ignore, name, fmt)
    manifest.options = options
    return manifest


# -- a manifest in a worker process ----------------------------------------------------------

class RemoteError(CfscError):
    """An error the worker process hit, passed on with its message and exit code."""

    def __init__(self, text: str, code: int, trace: str) -> None:
        super().__init__(text)
        self.exit_code = code
        self.trace = trace


class RemoteManifest:
    """A manifest loaded and held by a forked worker; same questions, answered over a pipe."""

    def __init__(self, source, options: Options, fmt: str | None, ignore: Ignore, data: bytes | None = None) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        # (forked: the arguments, `data` too, are inherited, not pickled)
        self.proc = ctx.Process(target=_serve, args=(child, source, options, fmt, ignore, data), daemon=True)
        self.proc.start()
        child.close()
        self.image = None
        self.name = side_name(source)
        self.source = source
        self.fmt = fmt
        self.fields = ignore.fields
        self.project = ignore.projection()
        self._root: tuple[Record, bytes] | None = None
        self._read_here = False

    def _receive(self):
        try:
            reply = self.conn.recv()
        except EOFError:
            raise CfscError(f"the worker loading {self.name} died (exit status {self.proc.exitcode})") from None
        if reply[0] == "error":
            raise RemoteError(reply[1], reply[2], reply[3])
        return reply[1]

    def ready(self) -> None:
        """Wait for the worker to finish loading (raises what it hit)."""
        if self._root is None:
            self.fmt, self._root = self._receive()

    def root(self) -> tuple[Record, bytes]:
        self.ready()
        assert self._root is not None
        return self._root

    def start(self, op: str, arg=None) -> None:
        if op == "image" and self.source != "-" and frontends.get(self.fmt).image:  # type: ignore[arg-type]
            self._read_here = True  # an image file: read it here rather than through the pipe
            return
        self.conn.send((op, arg))

    def finish(self):
        if self._read_here:
            self._read_here = False
            return bytes(Image.open(self.source).data)  # (only what the superblock declares)
        return self._receive()

    def listings(self, paths: list[bytes]) -> list[list[Item]]:
        self.start("listings", paths)
        return self.finish()

    def below(self, paths: list[bytes]) -> list[list[tuple[bytes, Record]]]:
        self.start("below", paths)
        return self.finish()

    def image_bytes(self, _arg=None) -> bytes:
        self.start("image")
        return self.finish()

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("close", None))
            except OSError:
                pass
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        self.conn.close()


def _serve(conn, source, options: Options, fmt: str | None, ignore: Ignore, data: bytes | None) -> None:
    def fail(e: BaseException) -> None:
        code = e.exit_code if isinstance(e, CfscError) else 1
        text = str(e) if isinstance(e, CfscError) else f"{type(e).__name__}: {e}"
        conn.send(("error", text, code, traceback.format_exc()))

    try:
        manifest = load(source, options, fmt, ignore, data)
        conn.send(("ok", (manifest.fmt, manifest.root())))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        fail(e)
        return
    while True:
        try:
            op, arg = conn.recv()
        except EOFError:
            return
        if op == "close":
            return
        try:
            conn.send(("ok", getattr(manifest, OPS[op])(arg)))
        except BaseException as e:  # noqa: BLE001
            fail(e)


def open_pair(a, b, options: Options, fmt: str | None = None, ignore: Ignore | None = None,
              parallel: bool | None = None, data: tuple[bytes, bytes] | None = None) -> tuple:
    """Both sides of a diff, B loading in a worker process while A loads here (if CPUs allow).

    Stdin (`-`) is always read here; `data`: both sides are dumpfiles, read already.  The
    caller closes both (`close()`).
    """
    ignore = ignore or Ignore()
    data_a, data_b = data if data is not None else (None, None)
    if parallel is None:
        parallel = len(os.sched_getaffinity(0)) > 1 and options.threads > 1
    if not parallel or (a == "-" and b == "-" and data is None):
        return load(a, options, fmt, ignore, data_a), load(b, options, fmt, ignore, data_b)
    swap = b == "-" and data is None
    (remote_source, remote_data), (local_source, local_data) = ((a, data_a), (b, data_b)) if swap else ((b, data_b), (a, data_a))
    remote = RemoteManifest(remote_source, options, fmt, ignore, remote_data)
    try:
        local = load(local_source, options, fmt, ignore, local_data)
        remote.ready()
    except BaseException:
        remote.close()
        raise
    return (remote, local) if swap else (local, remote)
