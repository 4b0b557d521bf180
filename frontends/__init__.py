"""Frontends: lower a source to the typed tree.

How to add a frontend: write `frontends/<format>.py` exposing `load(source, options) -> Tree`
(plus `load_many(sources, options)` if several inputs combine, like tar layers, and
`sniff(head: bytes) -> bool` if the format can be recognised from its first bytes), then add a
row to `FRONTENDS` saying what it can do.  Without `--from`, a source is recognised by its
kind (a `prefix`, a directory) or else by the first row whose `sniff` accepts the
(decompressed) head of the input.

The rows name modules rather than import them: a command imports only the frontend it runs
(start-up time), and detection imports a module only to ask its `sniff`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType

from cfsc.base import streams
from cfsc.base.errors import InputError, UsageError
from cfsc.base.options import Options
from cfsc.base.streams import source_name
from cfsc.base.tree import Tree

# What a source is (`Frontend.reads`).
DATA = "data"            # bytes: a file or standard input, recognised by its first bytes
DIRECTORY = "directory"  # a directory on disk
REF = "ref"              # a name starting with the frontend's `prefix` (`ostree:REPO:REF`)


class Frontend:
    """One source format and what it can do; `module` is imported on first use.

    (A plain class: every command builds these rows, and a NamedTuple or frozen dataclass
    costs ~1 ms more at start-up, measured.)"""

    __slots__ = ("combines", "delta", "description", "image", "module", "name", "prefix", "reads", "reorder",
                 "reorder_detail")

    def __init__(self, name: str, module: str, description: str, *, reads: str = DATA,
                 prefix: str | tuple[str, ...] | None = None,
                 combines: bool = False, image: bool = False, reorder: str | None = None, reorder_detail: str = "",
                 delta: str | None = None) -> None:
        self.name = name
        # load(source, options); sniff(head), load_many(sources, options), loads(data, options, name) if it has them
        self.module = module
        self.description = description
        self.reads = reads
        self.prefix = prefix  # REF: what its sources start with
        self.combines = combines  # several sources make one tree (`load_many`: layers, merged)
        self.image = image  # a composefs image already: inspected and compared as it is, never compiled
        # "module:function(source, out, seed)" writing the input in another order that means the
        # same tree, and how `cfsc check --reproducible` describes that order.
        self.reorder = reorder
        self.reorder_detail = reorder_detail
        # "module:function(a, b, options)": two inputs cut down to the parts they do not share,
        # each loading (`loads`) to a tree that diffs exactly like the whole input, or None.
        self.delta = delta

    def __repr__(self) -> str:
        return f"Frontend({self.name!r}, {self.module!r})"

    def code(self) -> ModuleType:
        return importlib.import_module(self.module)

    def sniff(self, head: bytes) -> bool:
        sniff = getattr(self.code(), "sniff", None) if self.reads == DATA else None
        return sniff is not None and sniff(head)

    def load(self, sources: list, options: Options) -> Tree:
        if len(sources) > 1:
            if not self.combines:
                raise UsageError(f"{self.name} sources do not combine: give exactly one", source_name(sources[1]))
            return self.code().load_many(sources, options)
        return self.code().load(sources[0], options)

    def loads(self, data: bytes, options: Options, name: str) -> Tree:
        """The tree of an input already read (`data`); `name` is what errors call it."""
        return self.code().loads(data, options, name)


def function(spec: str) -> Callable:
    """The function a row names as `module:function`, imported now."""
    module, _colon, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


# Order matters for detection.
FRONTENDS: dict[str, Frontend] = {f.name: f for f in (
    # dump first: the commonest source, and its module is the cheapest to import for sniffing
    Frontend("dump", "cfsc.frontends.dumpfile", "composefs dumpfile (mkcomposefs --from-file)",
             reorder="cfsc.frontends.reorder:shuffle_dump", reorder_detail="lines reordered, parents first",
             delta="cfsc.frontends.dumpfile_delta:reduce"),
    Frontend("image", "cfsc.frontends.image", "composefs image (re-encode, inspect)", image=True),
    Frontend("dir", "cfsc.frontends.directory", "a directory tree on disk (mkcomposefs DIR)", reads=DIRECTORY),
    Frontend("crfs", "cfsc.frontends.crfs.toc", "CRFS / stargz / eStargz TOC JSON (composefs-from-json)",
             combines=True, reorder="cfsc.frontends.reorder:shuffle_toc",
             reorder_detail="entries reordered (per path, ancestors and hard-link targets in order)"),
    Frontend("tar", "cfsc.frontends.tar.layers",
             "tar archive / OCI layer, plain or gzip/zstd/xz (several: layers, merged)",
             combines=True, reorder="cfsc.frontends.reorder:shuffle_tar",
             reorder_detail="members reordered (per path, ancestors and hard-link targets in order)"),
    Frontend("ostree", "cfsc.frontends.ostree.commit", "OSTree commit, read from the repository (ostree:REPO:REF)",
             reads=REF, prefix="ostree:"),
    Frontend("oci", "cfsc.frontends.oci",
             "container image: oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE,"
             " containers-storage:NAME (layers merged, digests checked)",
             reads=REF, prefix=("oci:", "oci-archive:", "docker-archive:", "containers-storage:")),
)}

HEAD_SIZE = 4096
COMPRESSED_HEAD_SIZE = 1 << 20  # zstd yields nothing before a whole block (up to 128 KiB) is in


def get(name: str) -> Frontend:
    try:
        return FRONTENDS[name]
    except KeyError:
        raise UsageError(f"unknown source format {name!r}: expected one of {', '.join(FRONTENDS)}", "--from") from None


def _head(source) -> tuple[bytes, str | None]:
    """The first HEAD_SIZE bytes of the (decompressed) input, and for a compressed input that
    gave fewer, why: truncated or corrupt (None when it is just short).  Compressed inputs are
    read further, up to COMPRESSED_HEAD_SIZE, until they yield enough.  Nothing is consumed: a
    pipe's head is kept for its reader (`streams.head`)."""
    want = HEAD_SIZE
    while True:
        raw = streams.head(source, want)
        kind = streams.compression(raw)
        if kind is None:
            return raw, None
        head, more, problem = streams.decompress_head(raw, HEAD_SIZE)
        if not more:
            return head, problem
        if len(raw) < want:  # the whole input, and it stops inside a member/frame
            return head, (f"truncated: the {kind} stream ends inside a {streams.UNITS[kind]} at compressed byte"
                          f" {len(raw)}, after {len(head)} bytes of data")
        if want >= COMPRESSED_HEAD_SIZE:
            return head, None
        want *= 4


def detect(source) -> str:
    """The frontend for a source, from its kind (a ref's prefix, a directory) or its first bytes."""
    if isinstance(source, str):
        for f in FRONTENDS.values():
            if f.prefix is not None and source.startswith(f.prefix):
                return f.name
    if source != "-" and os.path.isdir(source):
        for f in FRONTENDS.values():
            if f.reads == DIRECTORY:
                return f.name
        raise UsageError("a directory: no source format reads directories", source_name(source))
    head, problem = _head(source)
    for f in FRONTENDS.values():
        if f.sniff(head):
            return f.name
    if problem is not None:
        raise InputError(problem, source_name(source))
    raise UsageError(f"cannot tell the format from the content: use --from ({', '.join(FRONTENDS)})",
                     source_name(source))


def load(sources: list, options: Options | None = None, fmt: str | None = None) -> Tree:
    if not sources:
        raise UsageError("no source given")
    return get(fmt if fmt is not None else detect(sources[0])).load(list(sources), options or Options())
