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
import subprocess

import pytest
from cfsc.backends.dumpfile import dump_image
from cfsc.backends.erofs.reader import Image
from cfsc.base.errors import ImageError
from cfsc.base.fsverity import digest_bytes
from cfsc.frontends.image import read_tree

from tests.helpers.data import CFSC, image_of
from tests.helpers.hostile_images import BASE, BASE_DUMP, CORPUS, NAME, D, dirent, patch



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
