"""composefs images (backends/erofs/reader.py, entries.py, frontends/image.py, the FUSE view).

Seeds are small valid images compiled from dumpfiles in this module: inline and external
files, hard links, symlinks, devices and whiteouts (format 1), shared and escaped xattrs,
extended inodes, a directory spread over several blocks, a deep path, a hard-linked
directory.  An input is one
control byte (whether to feed the image as bytes, or as a file, plain or compressed,
through `Image.open` and its bounded read) and the image.  Mutations know the layout: they find the fields of the header,
superblock, every reachable inode, xattr body, shared xattr entry and dirent with the
reader itself and set one to a boundary value, nudge it, or copy another field of its width
over it (a dirent pointing at another inode, a block address at another block); byte-level
mutations and truncations (with a matching block count) do the rest.

`run` reads the image every way the verbs do — `info`, `dump` (text and JSON), `ls -R`,
`objects`, the FUSE view's walk (stat, readdir, readlink, read, xattrs), the faithful and the
upstream-style tree — and re-encodes a tree that reads: compiling it must succeed or fail
with a `CfscError`, and the image it gives must read back to the same image again.  Errors
must be one line, and the reader's name the image and a byte offset.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import random
import re
import struct
import zlib

from cfsc.backends.dumpfile import dump_image
from cfsc.backends.erofs import layout
from cfsc.backends.erofs.reader import Image
from cfsc.base.errors import CfscError, ImageError
from cfsc.base.options import Options
from cfsc.frontends import dumpfile
from cfsc.frontends.image import read_tree
from cfsc.tools import images

from bench.fuzzing.mutators import generic, interesting_int, put_int

NAME = "image"
TEST_CASES = 800
NAME_IN_ERRORS = "fuzz"
COMPRESSORS = {4: None, 5: "gzip", 6: "zstd", 7: "xz"}  # control byte % 8 (4: a plain file); else bytes
_LOCATED = re.compile(r"(^|/)fuzz@0x[0-9a-f]+$")  # the image's name (or path), its byte offset
VIEW_MAX = 2000  # nodes the view walk visits (a hostile image may reach one inode many ways)

_META = b"0123456789abcdef" * 4
DUMPS = [
    # inline, big inline, external with digest, hard link, symlink, shared xattrs (format 0)
    b"/ 4096 40755 2 0 0 0 0.0 - - - user.shared=1\n"
    b"/big 3000 100644 1 0 0 0 0.0 - " + b"a" * 3000 + b" -\n"
    b"/d 0 40755 3 0 0 0 0.0 - - - user.shared=1\n"
    b"/d/e 0 40755 2 0 0 0 0.0 - - -\n"
    b"/d/f 5 100644 2 0 0 0 0.0 - hello - user.only=x\n"
    b"/d/g 0 @100644 0 0 0 0 0.0 /d/f - -\n"
    b"/s 3 120777 1 0 0 0 0.0 foo - -\n"
    b"/x 99999 100644 1 0 0 0 0.0 ab/cdef - " + b"01" * 32 + b"\n",
    # devices, fifo, whiteout (format 1), escaped overlay xattrs, ACL-looking xattrs, extended inodes
    b"/ 4096 40555 2 0 0 0 1633950376.0 - - - trusted.foo1=bar-1 user.foo2=bar-2\n"
    b"/blockdev 0 60777 1 0 0 107690 1633950376.0 - - - trusted.bar=bar-2\n"
    b"/chardev 0 20777 1 70000 5 10769 1633950376.5 - - - trusted.foo=bar-2\n"
    b"/escaped 0 100777 1 0 0 0 1633950376.0 - - - trusted.overlay.redirect=/foo\\n user.overlay.redirect=/foo\n"
    b"/fifo 0 10777 1 0 0 0 1633950376.0 - - - trusted.bar=bar-2\n"
    b"/acl 0 100644 1 0 0 0 1.0 - - - system.posix_acl_access=\\x02\\x00\\x00\\x00\\x01\\x00\\x06\\x00\\xff\\xff\\xff\\xff\n"
    b"/sock 0 140777 1 0 0 0 1633950376.0 - - -\n"
    b"/wd 4096 40755 2 0 0 0 1633950376.0 - - -\n"
    b"/wd/whiteout 0 20000 1 0 0 0 1633950376.0 - - - trusted.foo=bar-2\n",
    # a directory over several blocks, and many shared-xattr bodies
    b"/ 4096 40755 2 0 0 0 0.0 - - -\n" + b"".join(
        b"/%s 0 100644 1 %d 0 0 5.%d - - - user.n=%d\n" % (b"n" * 120 + b"%03d" % i, i, i, i % 3)
        for i in range(60)),
    # deep path, long symlink target, inline sizes around the block, external without digest
    b"/ 4096 40755 2 0 0 0 0.0 - - -\n" + b"".join(
        b"/" + b"/".join(b"d%d" % j for j in range(i + 1)) + b" 0 40755 2 0 0 0 0.0 - - -\n" for i in range(12))
    + b"/d0/l 4095 120777 1 0 0 0 0.0 " + b"t" * 4095 + b" - -\n"
    + b"/d0/i4095 4095 100644 1 0 0 0 0.0 - " + b"b" * 4095 + b" -\n"
    + b"/d0/i4096 4096 100644 1 0 0 0 0.0 - " + b"c" * 4096 + b" -\n"
    + b"/d0/ext 8589934592 100644 1 0 0 0 0.0 " + _META + b" - -\n",
    # the smallest image
    b"/ 4096 40755 2 0 0 0 0.0 - - -\n",
    # a directory hard-linked elsewhere (upstream writes it): one nid reached twice, and a
    # dirent mutation away from a cycle
    b"/ 4096 40755 2 0 0 0 0.0 - - -\n/a 0 40755 2 0 0 0 0.0 - - -\n/a/x 5 100644 1 0 0 0 0.0 - hello -\n"
    b"/b 0 @100644 0 0 0 0 0.0 /a - -\n",
]


def _compile(dump: bytes, min_version: int = 0) -> bytes:
    from cfsc.build import compile_tree

    options = Options(min_version=min_version)
    out = io.BytesIO()
    compile_tree(dumpfile.loads(dump, options, "seed"), options, out)
    return out.getvalue()


def seeds() -> list[bytes]:
    out = []
    for dump in DUMPS:
        out.append(b"\0" + _compile(dump))
    # (format 1 puts 256 whiteouts in the root, which every walk reads: one more seed only)
    out.append(b"\1" + _compile(DUMPS[0], min_version=1))
    out.append(b"\6" + _compile(DUMPS[0]))  # fed zstd-compressed
    out.append(b"\4" + _compile(DUMPS[2]))  # fed as a plain file
    return out


# -- running ---------------------------------------------------------------------------------


class _Fail(Exception):
    """A property the reader must keep does not hold."""


def _open(data: bytes, workdir: str) -> Image:
    ctl, body = (data[0], data[1:]) if data else (0, b"")
    if ctl % 8 not in COMPRESSORS:
        return Image(body, NAME_IN_ERRORS)
    kind = COMPRESSORS[ctl % 8]
    if kind is None:
        packed = body
    elif kind == "gzip":
        packed = gzip.compress(body, 1, mtime=0)
    elif kind == "zstd":
        import zstandard

        packed = zstandard.ZstdCompressor(level=1).compress(body)
    else:
        packed = lzma.compress(body, preset=0)
    path = os.path.join(workdir, NAME_IN_ERRORS)
    with open(path, "wb") as f:
        f.write(packed)
    return Image.open(path)


def run(data: bytes, workdir: str) -> None:
    try:
        image = _open(data, workdir)
    except CfscError as e:
        _check_error(e)
        raise
    # One way of reading per case (each walk of a 256-whiteout root costs milliseconds),
    # chosen by the image's own bytes so that a saved input replays the same way.
    step = STEPS[zlib.crc32(data) % len(STEPS)]
    try:
        step(image)
    except CfscError as e:
        _check_error(e)
        raise


def _check_error(e: CfscError) -> None:
    text = str(e)
    if "\n" in text:
        raise _Fail(f"a {type(e).__name__} of several lines: {text!r}") from e
    if isinstance(e, ImageError) and not _LOCATED.search(e.where):
        raise _Fail(f"an image error not located at a byte offset: {text!r}") from e


def _info(image: Image) -> None:
    images.info(image)
    images.objects([image])


def _dump(image: Image) -> None:
    dump_image(image, io.BytesIO())


def _json(image: Image) -> None:
    from cfsc.backends.jsonlines import dump_image as json_dump

    json_dump(image, io.BytesIO(), None)


def _listing(image: Image) -> None:
    for _path, _entry, _first in images.listing(image, b"/", recursive=True):
        pass


def _view(image: Image) -> None:
    """What a FUSE mount serves: stat, readdir, lookup, readlink, read, xattrs."""
    from cfsc.fuse import checked_view

    try:
        view = checked_view(image)
    except OSError as e:
        if isinstance(e, CfscError):
            raise
        return
    stack = [view.root_nid]
    seen = {view.root_nid}
    while stack and len(seen) < VIEW_MAX:
        nid = stack.pop()
        try:
            node = view.node(nid)
            if node is None:
                continue
            for key, _value in node.xattrs:
                view.getxattr(node, key)
            ftype = node.mode & 0o170000
            if ftype == 0o040000:
                for name, child in zip(view.listing(nid).names, view.listing(nid).nids, strict=True):
                    view.lookup(nid, name)
                    if child not in seen:
                        seen.add(child)
                        stack.append(child)
            elif ftype == 0o120000:
                view.target(node)
            elif ftype == 0o100000:
                view.content(node)
        except OSError as e:
            if isinstance(e, CfscError):
                raise
            # errno answers (ENOTDIR, ENODATA, …) are what the server replies: fine


def _upstream_tree(image: Image) -> None:
    read_tree(image, upstream=True)  # what composefs-dump re-encodes


def _trees(image: Image) -> None:
    """The faithful tree; one that reads re-encodes, and its image reads back to itself."""
    from cfsc.build import compile_in_memory

    tree = read_tree(image)
    first = compile_in_memory(tree)
    again = compile_in_memory(read_tree(Image(first.data, NAME_IN_ERRORS)))
    if bytes(again.data) != bytes(first.data):
        raise _Fail("an image re-encoded from its own tree reads back differently")


STEPS = (_info, _dump, _json, _listing, _view, _upstream_tree, _trees, _trees)


# -- mutations --------------------------------------------------------------------------------


def _fields(fmt: str) -> list[tuple[int, int]]:
    """(offset, width) of each non-pad field of a struct format."""
    out = []
    pos = 0
    i = 1  # after "<"
    while i < len(fmt):
        j = i
        while fmt[j].isdigit():
            j += 1
        count = int(fmt[i:j]) if j > i else 1
        code = fmt[j]
        size = struct.calcsize("<" + code)
        if code == "x":
            pos += count
        elif code == "s":
            out.append((pos, count))
            pos += count
        else:
            for _ in range(count):
                out.append((pos, size))
                pos += size
        i = j + 1
    return out


HEADER_FIELDS = _fields(layout.COMPOSEFS_HEADER.struct.format)
SUPER_FIELDS = [(layout.EROFS_SUPER_OFFSET + o, w) for o, w in _fields(layout.EROFS_SUPER_BLOCK.struct.format)]
COMPACT_FIELDS = _fields(layout.EROFS_INODE_COMPACT.struct.format)
EXTENDED_FIELDS = _fields(layout.EROFS_INODE_EXTENDED.struct.format)
DIRENT_FIELDS = _fields(layout.EROFS_DIRENT.struct.format)
ENTRY_FIELDS = _fields(layout.EROFS_XATTR_ENTRY.struct.format)
IBODY_FIELDS = _fields(layout.EROFS_XATTR_IBODY_HEADER.struct.format)
INODES_MAX = 300
_cache: dict[bytes, list[tuple[int, int]]] = {}
_seed_fields: dict[int, list[tuple[bytes, list[tuple[int, int]]]]] | None = None


def structure_fields(img: bytes) -> list[tuple[int, int]]:
    """Offsets and widths of the fields of every structure the reader reaches in `img`
    (as far as it reads: a mutated image gives the fields before its first error)."""
    found = list(HEADER_FIELDS) + SUPER_FIELDS
    try:
        image = Image(img, "m")
    except (CfscError, struct.error, IndexError, ValueError):
        return found
    queue = [image.root_nid]
    seen = set(queue)
    shared: set[int] = set()
    while queue and len(seen) < INODES_MAX:
        nid = queue.pop()
        try:
            ino = image.inode(nid)
        except CfscError:
            continue
        found += [(ino.offset + o, w) for o, w in (EXTENDED_FIELDS if ino.extended else COMPACT_FIELDS)]
        if ino.xattr_size >= 12:
            x = ino.xattr_offset
            found += [(x + o, w) for o, w in IBODY_FIELDS]
            count = img[x + 4]
            found += [(x + 12 + 4 * k, 4) for k in range(count) if 12 + 4 * k + 4 <= ino.xattr_size]
            shared.update(struct.unpack_from(f"<{count}I", img, x + 12)) if 12 + 4 * count <= ino.xattr_size else None
            pos = 12 + 4 * count
            while pos + 4 <= ino.xattr_size:
                found += [(x + pos + o, w) for o, w in ENTRY_FIELDS]
                name_len, _index, value_len = struct.unpack_from("<BBH", img, x + pos)
                pos = (pos + 4 + name_len + value_len + 3) & ~3
        if ino.mode & 0o170000 == 0o040000:
            try:
                entries = image.dirents(ino)
            except CfscError:
                continue
            for block in _dirent_blocks(ino):
                if block + 12 > len(img):
                    continue
                nameoff0 = struct.unpack_from("<H", img, block + 8)[0]
                for k in range(min(nameoff0 // 12, 400)):
                    found += [(block + 12 * k + o, w) for o, w in DIRENT_FIELDS]
            for _name, child, _ftype in entries:
                if child not in seen:
                    seen.add(child)
                    queue.append(child)
    for ref in list(shared)[:64]:
        off = image.xattr_base + 4 * ref
        if off + 4 <= len(img):
            found += [(off + o, w) for o, w in ENTRY_FIELDS]
    return [(o, w) for o, w in found if o + w <= len(img)]


def _dirent_blocks(ino) -> list[int]:
    starts = []
    in_tail = ino.tail_size if ino.layout == layout.EROFS_INODE_FLAT_INLINE else 0
    in_blocks = ino.size - in_tail
    if in_blocks > 0:
        starts += [ino.blkaddr * layout.EROFS_BLKSIZ + k * layout.EROFS_BLKSIZ
                   for k in range(min(in_blocks // layout.EROFS_BLKSIZ, 16))]
    if in_tail:
        starts.append(ino.tail)
    return starts


def _known_fields(img: bytes) -> list[tuple[int, int]]:
    """The fields of the seed of this length, if there is one: a mutant that kept its
    length (most do) keeps its seed's layout, and parsing every mutant would cost more than
    the case.  Otherwise the image's own.  (A pure function of `img`: cases must be made
    again identically in any process.)"""
    global _seed_fields
    if _seed_fields is None:
        _seed_fields = {}
        for seed in seeds():
            _seed_fields.setdefault(len(seed) - 1, []).append((seed[1:], structure_fields(seed[1:])))
    same = _seed_fields.get(len(img))
    if same is not None:  # the seed it resembles most (bytes sampled)
        return max(same, key=lambda s: sum(s[0][i] == img[i] for i in range(0, len(img), 61)))[1]
    fields = _cache.get(img)
    if fields is None:
        if len(_cache) > 16:
            _cache.clear()
        fields = _cache[img] = structure_fields(img)
    return fields


def mutate(data: bytes, rng: random.Random) -> bytes:
    ctl, img = (data[:1] or b"\0"), data[1:]
    roll = rng.random()
    if roll < 0.03:
        return bytes([rng.randrange(256)]) + img
    if roll < 0.25:
        return ctl + generic(img, rng)
    buf = bytearray(img)
    if roll < 0.3 and len(buf) > 1100:  # cut, and usually make the block count agree
        del buf[rng.randrange(1064, len(buf)):]
        if rng.random() < 0.7:
            struct.pack_into("<I", buf, 1024 + 36, len(buf) // layout.EROFS_BLKSIZ)
        return ctl + bytes(buf)
    fields = _known_fields(img)
    if not fields:
        return ctl + generic(img, rng)
    offset, width = rng.choice(fields)
    if width > 8:  # uuid, volume name
        buf[offset:offset + width] = rng.randbytes(width)
        return ctl + bytes(buf)
    roll = rng.random()
    if roll < 0.55:
        put_int(buf, offset, width, interesting_int(rng, width))
    elif roll < 0.8:
        value = int.from_bytes(buf[offset:offset + width], "little") + rng.choice((-32, -4, -1, 1, 4, 32, 4096))
        put_int(buf, offset, width, value & ((1 << 8 * width) - 1))
    else:  # another field's value of the same width: inodes, blocks, names pointing elsewhere
        same = [f for f in fields if f[1] == width]
        src, _w = rng.choice(same)
        buf[offset:offset + width] = img[src:src + width]
    return ctl + bytes(buf)
