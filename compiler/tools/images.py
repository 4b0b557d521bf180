"""Any source as a composefs image, and what the inspection verbs report about images.

`open_image` opens an image as is and compiles any other source in memory first, so every
verb describes exactly what `cfsc compile` writes.  The functions here return data; the CLI
(`cfsc.cli.inspect`, `cfsc.cli.dropins`) only formats it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import BinaryIO

from cfsc import backends, build, frontends
from cfsc.backends.erofs.entries import Entries, Entry, walk
from cfsc.backends.erofs.layout import COMPOSEFS_FLAGS_HAS_ACL
from cfsc.backends.erofs.reader import Image
from cfsc.base.errors import InputError, UsageError
from cfsc.base.fsverity import SHA512, algorithm_of, digest_bytes
from cfsc.base.options import Options, reshapes
from cfsc.base.tree import FILE_TYPES, S_IFCHR, S_IFDIR, S_IFMT, S_IFREG, WHITEOUT


def open_image(source, options: Options | None = None, fmt: str | None = None, recompile: bool = False) -> Image:
    """An image source as is; any other source (dumpfile, directory, …) compiled in memory.

    `recompile`: an image too, when an option that applies to images is set (`reshapes`), so
    it shows what `cfsc compile` makes of it."""
    options = options or Options()
    if fmt is None:
        fmt = frontends.detect(source)
    if frontends.get(fmt).image and not (recompile and reshapes(options, "image")):
        return Image.open(source)
    return build.compile_in_memory(build.load([source], options, fmt), options)


def filter_names(filters: Iterable[str]) -> frozenset[bytes] | None:
    """`--filter NAME` values as a set of root-child names (None: no filter)."""
    names = [os.fsencode(f) for f in filters]
    for name in names:
        if b"/" in name:
            raise UsageError(f"filter must be a single name: {os.fsdecode(name)!r}", "--filter")
    return frozenset(names) if names else None


def dump(source, out: BinaryIO, fmt: str = "dump", names: frozenset[bytes] | None = None,
         options: Options | None = None, source_format: str | None = None) -> None:
    """Print a source with a text backend (`dump`, `json`, or any other registered one)."""
    backends.get(fmt, text=True)  # a bad --format fails before the source is read
    options = options or Options()
    build.write(open_image(source, options, source_format, recompile=True), fmt, out, options, names)


def listing(image: Image, path: bytes = b"/", recursive: bool = False,
            names: frozenset[bytes] | None = None):
    """Entries of `path` (a directory's children, or the entry itself if it is not one).

    Yields `(path, entry, first_path)` like `walk`; with `recursive`, everything below.
    """
    it = walk(image, names, Entries(image), top=path)
    top_path, top, _ = next(it)
    if top.mode & S_IFMT != S_IFDIR:
        yield top_path, top, None
        return
    depth = top_path.rstrip(b"/").count(b"/") + 1
    for item in it:
        if recursive or item[0].count(b"/") == depth:
            yield item


def objects(images: Iterable[Image], names: frozenset[bytes] | None = None) -> dict[bytes, Entry]:
    """Every backing file the images need: payload → the first entry using it.

    `names` keeps only those children of each root (composefs-info's `--filter`)."""
    found: dict[bytes, Entry] = {}
    for image in images:
        for _path, e, first in walk(image, names):
            if first is None and e.payload is not None and e.mode & S_IFMT == S_IFREG and e.payload not in found:
                found[e.payload] = e
    return found


def object_path(payload: bytes) -> bytes:
    """A payload as a path relative to the store (overlayfs' redirect is absolute in it)."""
    return payload.lstrip(b"/")


def open_basedir(basedir: str) -> int:
    try:
        return os.open(basedir, os.O_RDONLY | os.O_DIRECTORY | os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise InputError(f"cannot open the store directory: {e.strerror}", basedir) from None


def missing_objects(images: Iterable[Image], basedir: str | None,
                    names: frozenset[bytes] | None = None) -> dict[bytes, Entry]:
    """The objects with no file under `basedir`.

    Without a base directory upstream looks the paths up relative to file descriptor 0, so
    (stdin not being a directory) every object is listed; the drop-in keeps that quirk.
    Unlike upstream, a symlink on the way counts as missing (no reader of the store follows it).
    """
    # start-up: openat2 confinement ~4 ms; only `missing-objects` needs it
    from cfsc.base.beneath import open_path

    fd = open_basedir(basedir) if basedir is not None else 0
    try:
        missing = {}
        for payload, e in objects(images, names).items():
            try:  # confined as every reader of the store is: a path leaving it is missing from it
                os.close(open_path(fd, object_path(payload)))
            except OSError:
                missing[payload] = e
        return missing
    finally:
        if fd:
            os.close(fd)


def info(image: Image) -> dict:
    """Facts about an image: format, sizes, entry counts, xattr sharing, digest."""
    types = {name: 0 for name in FILE_TYPES.values()}
    hidden: list = []
    compact = extended = links = whiteouts = inline = external = empty = with_digest = 0
    external_bytes = 0
    refs: set[int] = set()
    payloads: set[bytes] = set()
    digest_sizes: set[int] = set()
    for _path, e, first in walk(image, hidden=hidden):
        if first is not None:
            links += 1
            continue
        raw = e.raw
        if raw.extended:
            extended += 1
        else:
            compact += 1
        ftype = e.mode & S_IFMT
        if ftype == S_IFCHR and e.rdev == 0:
            whiteouts += 1
        else:
            types[FILE_TYPES[ftype]] += 1
        if ftype == S_IFREG:
            if e.content is not None:
                inline += 1
            elif e.size:
                external += 1
                external_bytes += e.size
                if e.digest is not None:
                    with_digest += 1
                    digest_sizes.add(len(e.digest))
                if e.payload is not None:
                    payloads.add(e.payload)
            else:
                empty += 1
        if raw.xattr_size:
            refs.update(image.shared_xattr_refs(raw))
    for raw in hidden:
        if raw.extended:
            extended += 1
        else:
            compact += 1
        if raw.xattr_size:
            refs.update(image.shared_xattr_refs(raw))
    sb = image.super
    hashes = sorted(algorithm_of(bytes(n)).name for n in digest_sizes)  # type: ignore[union-attr]
    # An image of SHA-512 file digests belongs to a SHA-512 store (composefs-rs'): its own
    # digest there is the SHA-512 one too.
    sha512 = {"fsverity_digest_sha512": digest_bytes(image.data, SHA512).hex()} if SHA512.name in hashes else {}
    return {
        "image": image.name,
        "size": len(image.data),
        "blocks": sb.blocks,
        "format_version": image.version,
        "flags": image.flags,
        "has_acl": bool(image.flags & COMPOSEFS_FLAGS_HAS_ACL),
        "fsverity_digest": digest_bytes(image.data).hex(),
        **sha512,
        "inodes": sb.inos,
        "root_nid": image.root_nid,
        "build_time": image.build_time,
        "build_time_nsec": image.build_time_nsec,
        "entries": {**types, WHITEOUT: whiteouts, "hardlink": links},
        "files": {"inline": inline, "external": external, "empty": empty,
                  "external_bytes": external_bytes, "with_digest": with_digest,
                  "objects": len(payloads), "digest_hashes": hashes},
        "inode_formats": {"compact": compact, "extended": extended},
        "hidden_whiteouts": len(hidden),
        "shared_xattrs": {"count": len(refs), "bytes": sum(image.shared_entry_size(r) for r in refs)},
    }
