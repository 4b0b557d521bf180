"""The reader on corrupt and malicious images: one located `ImageError`, nothing else.

Each corpus case edits one structure of a valid image (found with the reader itself, so
the edits follow the layout) and names the byte offset and words the error must carry.
Random mutations of valid images are the `image` fuzz target's job (bench/fuzzing/targets/
image.py, run briefly by tests/test_fuzz.py and at length by bench/fuzz.py); an input it finds
is kept in tests/data/fuzz-regressions/image/ and replayed there.
"""

from __future__ import annotations

import io
import json
import resource
import struct
import subprocess

import pytest
from cfsc.backends.dumpfile import dump_image
from cfsc.backends.erofs.entries import Entries, resolve
from cfsc.backends.erofs.reader import Image
from cfsc.base.errors import ImageError
from cfsc.base.fsverity import digest_bytes
from cfsc.frontends.image import read_tree

from tests.helpers.data import CFSC, image_of

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


# -- decompression bombs ------------------------------------------------------------------

BOMB_ZEROS = 96 << 24  # 1.5 GiB after the image
BOMB_LIMIT = 512 << 20  # address space of the CLI under test: a third of what inflating would take


def _compressed_units(kind: str, data: bytes) -> bytes:
    import lzma
    import zlib

    import zstandard

    if kind == "zst":
        return zstandard.ZstdCompressor(level=3).compress(data)
    if kind == "gz":
        c = zlib.compressobj(9, zlib.DEFLATED, 31)
        return c.compress(data) + c.flush()
    return lzma.compress(data, preset=0)


def bomb(kind: str, head: bytes, fill: bytes = b"\0") -> bytes:
    """`head` then 1.5 GiB of `fill`, compressed: frames, members or streams of 16 MiB each
    repeated (every format reads a concatenation as one stream), so it is quick to make."""
    unit = _compressed_units(kind, fill * (1 << 24))
    return _compressed_units(kind, head) + unit * (BOMB_ZEROS >> 24)


def run_bounded(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a child whose address space is capped: inflating the bomb would fail it."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (BOMB_LIMIT, BOMB_LIMIT))

    return subprocess.run([CFSC, *args], capture_output=True, preexec_fn=cap, timeout=300)


@pytest.mark.parametrize("kind", ["zst", "gz", "xz"])
def test_compressed_image_is_read_only_as_far_as_its_superblock_says(kind, tmp_path):
    """A valid image followed by 1.5 GiB of zeros, compressed to well under 2 MiB: every
    verb reads the header, learns the image's size and inflates no further; data after the
    declared image in a compressed stream is refused, on one line, with exit code 2."""
    image = image_of(BASE_DUMP)
    path = tmp_path / f"bomb.cfs.{kind}"
    path.write_bytes(bomb(kind, image))
    assert path.stat().st_size < 2 << 20
    declared = len(image)
    (tmp_path / "same.cfs").write_bytes(image)
    (tmp_path / "mnt").mkdir()
    src = str(path)
    for args in (["info", src], ["dump", src], ["ls", "-R", src], ["objects", src],
                 ["compile", src, "-o", str(tmp_path / "o.cfs")], ["mount", src, str(tmp_path / "mnt"), "--foreground"],
                 ["composefs-info", "dump", src], ["diff", src, str(tmp_path / "same.cfs")]):
        p = run_bounded(*args)
        err = p.stderr.decode()
        assert p.returncode == 2, (args, p.returncode, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"@0x{declared:x}: the " in err and "trailing data" in err, err
    assert not (tmp_path / "o.cfs").exists()
    # The same image, compressed without the zeros, reads as it is.
    path.write_bytes(_compressed_units(kind, image))
    p = run_bounded("info", "--json", str(path))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["size"] == declared


def test_uncompressed_image_file_is_read_as_far_as_its_superblock_says(cfsc, tmp_path):
    """A file (or device) may be longer than its file system, as for the kernel: the rest
    is not read, and the image is the declared blocks."""
    image = image_of(BASE_DUMP)
    path = tmp_path / "padded.cfs"
    with open(path, "wb") as f:
        f.write(image)
        f.truncate(len(image) + BOMB_ZEROS)  # sparse: 1.5 GiB of zeros at no cost
    p = run_bounded("info", "--json", str(path))
    assert p.returncode == 0, p.stderr
    facts = json.loads(p.stdout)
    assert facts["size"] == len(image) and facts["fsverity_digest"] == digest_bytes(image).hex()
    assert run_bounded("dump", str(path)).stdout == cfsc("dump", "-", input=image).stdout


@pytest.mark.parametrize("fill", [b"\n", b"\0"], ids=["blank-lines", "zeros"])
def test_compressed_text_read_whole_is_bounded(fill, tmp_path):
    """The one place an input is decompressed whole into memory (`streams.read_all`: the fast
    diff of two dumpfiles, check's reordered inputs, a TOC from stdin) refuses to inflate past
    64 MiB and 100× the compressed bytes, on one line."""
    dump = tmp_path / "bomb.dump.zst"
    dump.write_bytes(bomb("zst", BASE_DUMP, fill))
    other = tmp_path / "other.dump"
    other.write_bytes(BASE_DUMP)
    p = run_bounded("diff", str(dump), str(other))
    err = p.stderr.decode()
    assert p.returncode == 2, err
    assert err.count("\n") == 1 and "decompression bomb" in err, err
