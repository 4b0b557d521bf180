"""The reader on corrupt and malicious images: one located `ImageError`, nothing else.

Each corpus case edits one structure of a valid image (found with the reader itself, so
the edits follow the layout) and names the byte offset and words the error must carry.
The fuzz test mutates valid images at random (seeded, so failures reproduce) and accepts only
success or an `ImageError` from every reader path (the faithful and the upstream-style tree,
the dump, `info`, `objects`, the `ls` walk).  It has found no crasher yet; one it finds
becomes a corpus case (the failing input is kept in /tmp for that).
"""

from __future__ import annotations

import io
import random
import struct
import time
from pathlib import Path

import pytest
from cfsc.backends.dumpfile import dump_image
from cfsc.backends.erofs.entries import Entries, resolve
from cfsc.backends.erofs.reader import Image
from cfsc.base.errors import ImageError
from cfsc.frontends.image import read_tree
from cfsc.tools import images
from conftest import image_of, read_input

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


@pytest.mark.parametrize("data, offset, words", [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_corrupt_image_gives_one_located_error(data, offset, words):
    with pytest.raises(ImageError) as info:
        image = Image(data, NAME)
        read_tree(image)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{NAME}@0x"), message
    if offset is not None:
        assert message.startswith(f"{NAME}@0x{offset:x}: "), message
    assert words in message, message
    # The dump walk reports the same kind of problem (it reads the same structures).
    with pytest.raises(ImageError):
        dump_image(Image(data, NAME), io.BytesIO())


def test_the_corpus_is_large_and_the_base_image_is_valid():
    assert len(CORPUS) >= 20
    assert BASE.count(b"...efg") == 1  # /d's names, edited by two cases
    assert len({c[0] for c in CORPUS}) == len(CORPUS)
    tree = read_tree(Image(BASE, NAME))
    assert tree.root.children[b"d"].children[b"g"] is tree.root.children[b"d"].children[b"f"]


def test_cli_reports_a_corrupt_image_on_one_line(cfsc, tmp_path):
    bad = tmp_path / "bad.cfs"
    bad.write_bytes(patch(BASE, dirent(b"/d", b"e"), "<Q", D.nid))
    for args in (["dump", str(bad)], ["compile", str(bad), "-o", str(tmp_path / "o.cfs")],
                 ["composefs-info", "ls", str(bad)], ["info", str(bad)]):
        p = cfsc(*args)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.decode().count("\n") == 1 and "directory cycle" in p.stderr.decode(), p.stderr
        assert b"Traceback" not in p.stderr
    assert not (tmp_path / "o.cfs").exists()


# -- fuzzing ------------------------------------------------------------------------------

def _structure_offsets(data: bytes) -> list[int]:
    """Where mutations matter most: visible inodes, their xattrs and tails, dirent blocks."""
    image = Image(data, "base")
    offsets = [0, 1024]
    entries = Entries(image)
    from cfsc.backends.erofs.entries import walk

    for _path, e, _first in walk(image, entries=entries):
        r = e.raw
        offsets += [r.offset, r.xattr_offset, r.tail]
        if r.mode & 0o170000 == 0o040000 and r.size >= 4096:
            offsets.append(r.blkaddr * 4096)
    return offsets


FUZZ_BASES = [BASE, image_of(read_input("special.dump")),
              image_of(ROOT + b"".join(b"/%s 0 100644 1 %d 0 0 5.%d - - - user.n=%d\n" % (b"n" * 200 + b"%03d" % i, i, i, i % 3)
                                       for i in range(40)))]
INTERESTING = (0, 1, 2, 12, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)


def mutate(rng: random.Random, data: bytes, hot: list[int]) -> bytes:
    out = bytearray(data)
    n = len(out)
    if n < 1200:
        return data[:rng.randrange(n + 1)]
    kind = rng.random()
    if kind < 0.3:  # a few random bytes, mostly near a structure
        for _ in range(rng.randint(1, 4)):
            i = min(n - 1, rng.choice(hot) + rng.randrange(64)) if rng.random() < 0.8 else rng.randrange(n)
            out[i] = rng.randrange(256)
    elif kind < 0.7:  # an aligned field set to a boundary value
        width = rng.choice((1, 2, 4, 8))
        i = min(n - 8, rng.choice(hot) + rng.randrange(64)) & ~(width - 1)
        value = (rng.choice(INTERESTING) + rng.choice((0, 0, -1, 1))) & ((1 << 8 * width) - 1)
        out[i:i + width] = value.to_bytes(width, "little")
    elif kind < 0.85:  # truncation, usually with a matching block count
        del out[rng.randrange(n):]
        if rng.random() < 0.7 and len(out) >= 1100:
            struct.pack_into("<I", out, 1024 + 36, len(out) // 4096)
    else:  # a run of bytes copied from elsewhere (dirents and inodes pointing at others)
        a, b, length = rng.randrange(n - 64), min(rng.choice(hot), n - 64), rng.randint(4, 64)
        out[b:b + length] = out[a:a + length]
    return bytes(out)


def check_one(data: bytes, every_path: bool) -> None:
    """Read a (mutated) image every way the verbs do; only a located ImageError may escape."""
    for step in (_faithful, _dump, _upstream, _info) if every_path else (_faithful,):
        try:
            step(Image(data, "fuzz"))
        except ImageError as e:
            message = str(e)
            assert "\n" not in message and message.startswith("fuzz@0x"), message


def _faithful(image: Image) -> None:
    read_tree(image)


def _dump(image: Image) -> None:
    dump_image(image, io.BytesIO())


def _upstream(image: Image) -> None:
    read_tree(image, upstream=True)  # what composefs-dump re-encodes


def _info(image: Image) -> None:
    images.info(image)
    images.objects([image])
    list(images.listing(image, recursive=True))


def test_fuzz_mutated_images_only_raise_image_error():
    rng = random.Random(20261126)
    hot = [_structure_offsets(b) for b in FUZZ_BASES]
    start = time.monotonic()
    count = 10_000
    for i in range(count):
        k = i % len(FUZZ_BASES)
        data = mutate(rng, FUZZ_BASES[k], hot[k])
        try:
            check_one(data, every_path=i % 4 == 0)
        except Exception as e:  # keep the input for a regression case
            path = Path("/tmp") / f"cfsc-crasher-{i}.cfs"
            path.write_bytes(data)
            raise AssertionError(f"mutation {i}: {type(e).__name__}: {e} (input kept in {path})") from e
    assert time.monotonic() - start < 120, "the fuzz test became slow"
