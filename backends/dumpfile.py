"""Image → dumpfile text, byte for byte as `composefs-info dump` 1.0.8 prints it (format note §11).

One line per entry of the depth-first walk (`cfsc.backends.erofs.entries.walk`):

    PATH SIZE [@]MODE NLINK UID GID RDEV SEC.NSEC PAYLOAD CONTENT DIGEST[ KEY=VALUE...]

A hard link (second or later occurrence of an inode) gets `@` before MODE, the first
occurrence's path as PAYLOAD, and every other field from that first occurrence.  xattrs come
in the reader's order (inline, then shared).  Escaping: `cfsc.backends.dumptext`.

The text describes an *image*: a tree from any other source is compiled first (in memory,
`cfsc.build.write`) and read back, so `cfsc dump x.dump` prints what `cfsc dump` of the
compiled image prints.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import BinaryIO

from cfsc.backends.dumptext import escape, escape_equal, escape_optional
from cfsc.backends.erofs.entries import Entries, walk
from cfsc.backends.erofs.reader import Image


def dump_lines(image: Image, names: frozenset[bytes] | None = None) -> Iterator[bytes]:
    """The dump of an image, line by line; `names` keeps only those children of the root."""
    entries = Entries(image)
    xattr_text: dict[int, bytes] = {}  # id(interned xattrs) -> text
    for path, e, first in walk(image, names, entries):
        xattrs = e.xattrs
        if xattrs:
            tail = xattr_text.get(id(xattrs))
            if tail is None:
                tail = b"".join(b" " + escape_equal(k) + b"=" + escape_equal(v) for k, v in xattrs)
                if entries.interned(xattrs):
                    xattr_text[id(xattrs)] = tail
        else:
            tail = b""
        content = e.content
        if content is not None:
            content = escape_optional(content[:e.size])
        else:
            content = b"-"
        digest = e.digest
        yield b"%s %d %s%o %d %d %d %d %d.%d %s %s %s%s\n" % (
            escape(path), e.size, b"@" if first is not None else b"", e.mode, e.nlink,
            e.uid, e.gid, e.rdev, e.mtime, e.mtime_nsec,
            escape_optional(first if first is not None else e.payload), content,
            digest.hex().encode() if digest is not None else b"-", tail)


def batched(lines: Iterable[bytes], size: int = 1 << 18) -> Iterator[bytes]:
    """Lines joined into pieces of about `size` bytes; counted in bytes, as the lines of a
    deep tree are each as long as its path (a count of lines could join gigabytes)."""
    pending: list[bytes] = []
    add = pending.append
    total = 0
    for line in lines:
        add(line)
        total += len(line)
        if total >= size:
            yield b"".join(pending)
            pending.clear()
            total = 0
    yield b"".join(pending)


def write_lines(out: BinaryIO, lines: Iterable[bytes]) -> None:
    """Write lines in pieces of a few hundred KiB (one write per piece, not per line)."""
    for piece in batched(lines):
        out.write(piece)


def dump_image(image: Image, out: BinaryIO, names: frozenset[bytes] | None = None) -> None:
    """Write the dump of an image; `names` keeps only those children of the root (`--filter`)."""
    write_lines(out, dump_lines(image, names))
