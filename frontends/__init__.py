"""Frontends: lower a source to the typed tree.

How to add a frontend: write `frontends/<format>.py` exposing `load(source, options) -> Tree`
(plus `load_many(sources, options)` if several inputs combine, like tar layers, and
`sniff(head: bytes) -> bool` if the format can be recognised from its first bytes), then add a
row to `FRONTENDS`.  Without `--from`, the first row whose `sniff` accepts the (decompressed)
head of the input wins.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from cfsc.base import streams
from cfsc.base.errors import InputError, UsageError
from cfsc.base.options import Options
from cfsc.base.streams import source_name
from cfsc.base.tree import Tree

# name → (module, description); order matters for detection.
FRONTENDS: dict[str, tuple[str, str]] = {
    # dump first: the commonest source, and its module is the cheapest to import for sniffing
    "dump": ("cfsc.frontends.dumpfile", "composefs dumpfile (mkcomposefs --from-file)"),
    "image": ("cfsc.frontends.image", "composefs image (re-encode, inspect)"),
    "dir": ("cfsc.frontends.directory", "a directory tree on disk (mkcomposefs DIR)"),
    "crfs": ("cfsc.frontends.crfs.toc", "CRFS / stargz / eStargz TOC JSON (composefs-from-json)"),
    "tar": ("cfsc.frontends.tar.layers", "tar archive / OCI layer, plain or gzip/zstd/xz (several: layers, merged)"),
    "ostree": ("cfsc.frontends.ostree.commit", "OSTree commit, read from the repository (ostree:REPO:REF)"),
    "oci": ("cfsc.frontends.oci", "container image: oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE,"
                                  " containers-storage:NAME (layers merged, digests checked)"),
}

HEAD_SIZE = 4096
COMPRESSED_HEAD_SIZE = 1 << 20  # zstd yields nothing before a whole block (up to 128 KiB) is in


def module(name: str) -> ModuleType:
    try:
        return importlib.import_module(FRONTENDS[name][0])
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
    """The frontend for a source, from its kind (directory, ref) or its first bytes."""
    if streams.is_reference(source):
        return next(fmt for prefix, fmt in streams.REFERENCES.items() if source.startswith(prefix))
    if source != "-" and os.path.isdir(source):
        if "dir" in FRONTENDS:
            return "dir"
        raise UsageError("directory sources are not supported yet", source_name(source))
    head, problem = _head(source)
    for name, (modname, _desc) in FRONTENDS.items():
        sniff = getattr(importlib.import_module(modname), "sniff", None)
        if sniff is not None and sniff(head):
            return name
    if problem is not None:
        raise InputError(problem, source_name(source))
    raise UsageError(f"cannot tell the format from the content: use --from ({', '.join(FRONTENDS)})",
                     source_name(source))


def load(sources: list, options: Options | None = None, fmt: str | None = None) -> Tree:
    options = options or Options()
    if not sources:
        raise UsageError("no source given")
    if fmt is None:
        fmt = detect(sources[0])
    mod = module(fmt)
    if len(sources) > 1:
        load_many = getattr(mod, "load_many", None)
        if load_many is None:
            raise UsageError(f"{fmt} sources do not combine: give exactly one", source_name(sources[1]))
        return load_many(sources, options)
    return mod.load(sources[0], options)
