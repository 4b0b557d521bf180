"""Corrupt and malicious images, each made from one valid image by editing one structure
(found with the reader itself, so the edits follow the layout), with the byte offset and the
words the reader's error must carry: tests/test_hostile_images.py checks the reader, and
tests/test_fuse_fastpaths.py the FUSE server, on them."""

from __future__ import annotations

import struct

from cfsc.backends.erofs.entries import Entries, resolve
from cfsc.backends.erofs.reader import Image

from tests.helpers.data import image_of

ROOT = b"/ 4096 40755 2 0 0 0 0.0 - - - user.shared=1\n"
BASE_DUMP = ROOT + b"".join([
    b"/big 3000 100644 1 0 0 0 0.0 - " + b"a" * 3000 + b" -\n",
    b"/d 0 40755 3 0 0 0 0.0 - - - user.shared=1\n",
    b"/d/e 0 40755 2 0 0 0 0.0 - - -\n",
    b"/d/f 5 100644 2 0 0 0 0.0 - hello - user.only=x\n",
    b"/d/g 0 @100644 0 0 0 0 0.0 /d/f - -\n",
    b"/s 3 120777 1 0 0 0 0.0 foo - -\n",
    b"/x 99999 100644 1 0 0 0 0.0 ab/cdef - " + b"01" * 32 + b"\n",
])
BASE = image_of(BASE_DUMP)
NAME = "img.cfs"


def raw(path: bytes):
    image = Image(BASE, NAME)
    return resolve(image, path, Entries(image)).raw


def patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def truncate(data: bytes, size: int) -> bytes:
    """Cut the image and make the superblock agree, so the cut is found where it lands."""
    return patch(data[:size], 1024 + 36, "<I", size // 4096)


def dirent(path: bytes, name: bytes) -> int:
    """Offset of the dirent record of `name` in the inline tail of directory `path`."""
    d = raw(path)
    image = Image(BASE, NAME)
    names = sorted([n for n, _nid, _t in image.dirents(d)] + [b".", b".."])
    return d.tail + 12 * names.index(name)


def root_block() -> int:
    return raw(b"/").blkaddr * 4096


def shared_area() -> tuple[int, int]:
    image = Image(BASE, NAME)
    refs = image.shared_xattr_refs(raw(b"/"))
    return image.xattr_base + 4 * refs[0], refs[0]


D, F, S, BIG, ROOTI = raw(b"/d"), raw(b"/d/f"), raw(b"/s"), raw(b"/big"), raw(b"/")


def whiteouts_with_big_xattrs() -> bytes:
    """Every hidden root whiteout claims the xattrs of the next few inodes: overlapping."""
    out = BASE
    image = Image(BASE, NAME)
    for _name, nid, ftype in image.dirents(ROOTI):
        if ftype == 3:
            out = patch(out, image.inode_offset(nid) + 2, "<H", 64)
    return out


# (id, image bytes, expected offset, words in the message)
CORPUS = [
    ("empty", b"", 0, "truncated"),
    ("truncated-in-superblock", BASE[:1100], 1100, "truncated"),
    ("truncated-file", BASE[:8192], 1024 + 36, "the image has 8192 bytes (truncated?)"),
    ("truncated-in-dir-blocks", truncate(BASE, root_block()), root_block(), "directory nid 36: blocks"),
    ("truncated-in-file-block", truncate(BASE, BIG.blkaddr * 4096), BIG.blkaddr * 4096, "file content"),
    ("truncated-in-shared-xattrs", truncate(BASE, shared_area()[0] & ~4095), 1024 + 44, "xattr_blkaddr"),
    ("bad-magic", patch(BASE, 0, "<I", 0x12345678), 0, "magic 0x12345678"),
    ("bad-header-version", patch(BASE, 4, "<I", 2), 4, "version 2, expected 1"),
    ("bad-format-version", patch(BASE, 12, "<I", 7), 12, "format version 7"),
    ("bad-erofs-magic", patch(BASE, 1024, "<I", 0), 1024, "EROFS superblock: magic"),
    ("bad-block-size", patch(BASE, 1024 + 12, "<B", 9), 1024 + 12, "block size 2^9"),
    ("incompat-feature", patch(BASE, 1024 + 80, "<I", 0x1), 1024 + 80, "incompatible features"),
    ("directory-block-bits", patch(BASE, 1024 + 90, "<B", 1), 1024 + 90, "directory block bits 1"),
    ("block-count-too-big", patch(BASE, 1024 + 36, "<I", 999), 1024 + 36, "999 blocks"),
    ("block-count-zero", patch(BASE, 1024 + 36, "<I", 0), 1024 + 36, "too few"),
    ("meta-blkaddr-past-end", patch(BASE, 1024 + 40, "<I", 999), 1024 + 40, "meta_blkaddr"),
    ("root-nid-out-of-range", patch(BASE, 1024 + 14, "<H", 0xFFFF), 0xFFFF * 32, "inode nid 65535: past the end"),
    ("root-not-a-directory", patch(BASE, 1024 + 14, "<H", F.nid), F.offset, "not a directory"),
    ("dirent-nid-out-of-range", patch(BASE, dirent(b"/d", b"f"), "<Q", 1 << 40), dirent(b"/d", b"f"),
     "entry b'f' refers to nid 1099511627776, past the end"),
    ("dirent-nameoff-not-multiple", patch(BASE, D.tail + 8, "<H", 13), D.tail + 8, "first name offset 13"),
    ("dirent-nameoff-past-block", patch(BASE, D.tail + 8, "<H", 240), D.tail + 8, "first name offset 240"),
    ("dirent-nameoffs-out-of-order", patch(BASE, dirent(b"/d", b"f") + 8, "<H", 60), dirent(b"/d", b"f") + 8,
     "offsets must increase"),
    ("dirent-names-unsorted", BASE.replace(b"...efg", b"...gfe"), D.offset, "not after"),
    ("dirent-name-with-slash", BASE.replace(b"...efg", b".../fg"), D.tail, "contains '/'"),
    ("directory-cycle", patch(BASE, dirent(b"/d", b"e"), "<Q", D.nid), D.offset, "directory cycle"),
    ("self-referencing-root", patch(BASE, dirent(b"/d", b"e"), "<Q", ROOTI.nid), D.offset, "directory cycle"),
    ("huge-xattr-count", patch(BASE, F.offset + 2, "<H", 0xFFFF), F.offset, "xattrs and a"),
    ("shared-count-too-big", patch(BASE, F.xattr_offset + 4, "<B", 200), F.xattr_offset + 4, "h_shared_count 200"),
    ("bad-xattr-prefix-index", patch(BASE, F.xattr_offset + 12 + 1, "<B", 9), F.xattr_offset + 13, "name index 9"),
    ("shared-xattr-id-out-of-range", patch(BASE, ROOTI.xattr_offset + 12, "<I", 0xFFFFFFF), None, "shared xattr 268435455"),
    ("symlink-too-long", patch(patch(BASE, S.offset, "<H", 0), S.offset + 8, "<I", 5000), S.offset + 8,
     "symlink target of 5000"),
    ("symlink-empty", patch(BASE, S.offset + 8, "<I", 0), S.offset + 8, "symlink target of 0"),
    ("inline-size-over-5000", patch(BASE, BIG.offset + 8, "<I", 6000), BIG.offset, "inline file of 6000 bytes"),
    ("unknown-data-layout", patch(BASE, F.offset, "<H", 1 << 1), F.offset, "data layout 1"),
    ("unknown-format-bits", patch(BASE, F.offset, "<H", 0x40), F.offset, "i_format 0x40"),
    ("no-file-type", patch(BASE, F.offset + 4, "<H", 0o644), F.offset + 4, "no valid file type"),
    ("chunk-based-directory", patch(BASE, D.offset, "<H", 4 << 1), D.offset, "cannot be chunk based"),
    ("tail-crosses-block", patch(BASE, D.offset + 8, "<I", 4000), None, "crosses a block boundary"),
    ("tiny-dirent-block", patch(BASE, D.offset + 8, "<I", 5), D.tail, "cannot hold a dirent"),
    ("overlapping-inodes", whiteouts_with_big_xattrs(), None, "overlaps other structures"),
]
