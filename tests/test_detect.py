"""Source detection: compressed inputs, stdin and other pipes however their bytes arrive, and
damaged inputs sent to the frontend whose located error explains them.

Without `--from` the format is told from the first bytes of the (decompressed) input.  A pipe
gives what one write put in (a few bytes, or a zstd stream before its first whole block), so
detection reads until it has enough, and the frontend then reads the same bytes again.
"""

from __future__ import annotations

import gzip
import lzma
import os
import random
import subprocess
import threading
import time

import pytest
import zstandard
from cfsc import frontends
from cfsc.base import streams
from cfsc.frontends import dumpfile as dumpfile_frontend
from cfsc.frontends import image as image_frontend
from cfsc.frontends.tar import layers as tar

from tests.helpers.data import CFSC, image_of
from tests.helpers.dirtrees import Entry, dumpfile
from tests.helpers.tarcraft import from_entries

pytestmark = [pytest.mark.tools]

RNG = random.Random(20261205)  # incompressible data, the same on every run
SKIPPABLE = b"\x5a\x2a\x4d\x18" + (6).to_bytes(4, "little") + b"cfsc!!"  # magic 0x184D2A5A


def layer() -> tuple[bytes, bytes]:
    """A tar layer and the image it compiles to."""
    entries = [Entry(b"", "dir")] + [Entry(b"f%03d" % i, data=RNG.randbytes(i * 700)) for i in range(40)]
    return from_entries(entries), image_of(dumpfile(entries, hardlinks=True))


def compressed(data: bytes) -> dict[str, bytes]:
    return {"plain": data, "gz": gzip.compress(data), "xz": lzma.compress(data),
            "zst": zstandard.ZstdCompressor().compress(data),
            "zst-skippable-first": SKIPPABLE + zstandard.ZstdCompressor().compress(data)}


def trickle(args: list[str], pieces: list[bytes], pause: float = 0.3) -> subprocess.CompletedProcess:
    """Run cfsc with stdin fed piece by piece, pausing between pieces (a slow pipe)."""
    proc = subprocess.Popen([CFSC, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def feed() -> None:
        try:
            for i, piece in enumerate(pieces):
                if i:
                    time.sleep(pause)
                proc.stdin.write(piece)  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
        except BrokenPipeError:
            pass
        finally:
            proc.stdin.close()  # type: ignore[union-attr]

    writer = threading.Thread(target=feed)
    writer.start()
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    proc.wait()
    writer.join()
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.mark.parametrize("kind", ["plain", "gz", "xz", "zst", "zst-skippable-first"])
def test_stdin_is_detected_whatever_the_compression(kind, tmp_path, cfsc):
    """`zstd -c x.tar | cfsc compile -`: no --from needed (zstd yields nothing before a whole
    block is in, which one pipe read does not hold), also after a leading skippable frame."""
    data, want = layer()
    blob = compressed(data)[kind]
    p = cfsc("compile", "-", "-o", "-", input=blob)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout == want
    path = tmp_path / f"layer.{kind}"
    path.write_bytes(blob)
    assert frontends.detect(str(path)) == "tar"
    assert cfsc("compile", str(path), "-o", "-", check=True).stdout == want


@pytest.mark.parametrize("kind", ["plain", "gz", "zst"])
def test_slow_pipe(kind, cfsc):
    """The first write of a pipe holds 10 bytes (then 3, with --from): detection reads on, and
    the frontend still gets every byte."""
    data, want = layer()
    blob = compressed(data)[kind]
    p = trickle(["compile", "-", "-o", "-"], [blob[:10], blob[10:]])
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout == want
    p = trickle(["compile", "--from", "tar", "-", "-o", "-"], [blob[:3], blob[3:20], blob[20:]], pause=0.2)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout == want


def test_fifo_path_is_read_once(tmp_path, cfsc):
    """A FIFO (or `<(zstd -c x.tar)`) named as a path: detection must not eat its head."""
    data, want = layer()
    fifo = tmp_path / "layer.fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(compressed(data)["zst"])

    writer = threading.Thread(target=feed, daemon=True)  # left blocked if cfsc never reads
    writer.start()
    p = subprocess.run([CFSC, "compile", str(fifo), "-o", "-"], capture_output=True, timeout=30)
    writer.join(10)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout == want
    p = subprocess.run(["bash", "-c", f'"{CFSC}" compile <(zstd -qc) -o -'], input=data, capture_output=True,
                       timeout=30)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout == want


def test_truncated_zstd_is_a_located_error(tmp_path, cfsc):
    """A .zst cut inside its first block decompresses to nothing: a truncation error naming
    where the input ends, not "cannot tell the format"."""
    data, _want = layer()
    cut = tmp_path / "cut.tar.zst"
    cut.write_bytes(compressed(data)["zst"][:3000])
    p = cfsc("compile", str(cut), "-o", str(tmp_path / "x.cfs"))
    assert p.returncode == 2
    assert p.stderr.decode() == (f"error: {cut}: truncated: the zstd stream ends inside a frame at compressed"
                                 " byte 3000, after 0 bytes of data\n")
    p = cfsc("compile", "-", "-o", str(tmp_path / "x.cfs"), input=cut.read_bytes())
    assert p.returncode == 2 and "<stdin>: truncated: the zstd stream ends inside a frame" in p.stderr.decode()
    garbage = tmp_path / "garbage.gz"
    garbage.write_bytes(b"\x1f\x8b" + b"\xff" * 100)
    p = cfsc("compile", str(garbage), "-o", str(tmp_path / "x.cfs"))
    assert p.returncode == 2 and f"{garbage}: cannot decompress (gzip): " in p.stderr.decode()


def image_bytes(cfsc, tmp_path) -> bytes:
    src = tmp_path / "src.dump"
    src.write_bytes(b"/ 0 40755 2 0 0 0 0.0 - - -\n/f 3 100644 1 0 0 0 0.0 - abc -\n")
    cfsc("compile", str(src), "-o", str(tmp_path / "good.cfs"), check=True)
    return (tmp_path / "good.cfs").read_bytes()


def test_damaged_image_header_is_the_image_readers_error(tmp_path, cfsc):
    """An image whose first KiB is zeroed is not an empty tar (which printed an empty root and
    exited 0), and one with a damaged magic is not "cannot tell": both are images (the EROFS
    superblock says so), and the reader says what is wrong where."""
    good = image_bytes(cfsc, tmp_path)
    zeroed = tmp_path / "zeroed.cfs"
    zeroed.write_bytes(bytes(1024) + good[1024:])
    flipped = tmp_path / "flipped.cfs"
    flipped.write_bytes(bytes([good[0] ^ 0xFF]) + good[1:])
    for path, magic in ((zeroed, 0), (flipped, int.from_bytes(flipped.read_bytes()[:4], "little"))):
        want = f"error: {path}@0x0: composefs header: magic 0x{magic:08x}, expected 0xd078629a (not a composefs image)\n"
        for args in (["dump", str(path)], ["fsck-store", str(path), "--store", str(tmp_path)],
                     ["compile", str(path), "-o", str(tmp_path / "x.cfs")]):
            p = cfsc(*args)
            assert (p.returncode, p.stderr.decode()) == (2, want), args
        assert frontends.detect(str(path)) == "image"
    # compressed, too
    gz = tmp_path / "zeroed.cfs.gz"
    gz.write_bytes(gzip.compress(zeroed.read_bytes()))
    assert frontends.detect(str(gz)) == "image"


def test_empty_tar_only_when_the_head_is_all_zeros():
    assert tar.sniff(bytes(4096)) and tar.sniff(bytes(1024))
    assert not tar.sniff(bytes(1024) + b"\x01" + bytes(3071))
    assert not tar.sniff(bytes(4095) + b"x")


def test_dumpfile_with_a_bad_first_record_gets_the_parsers_error(tmp_path, cfsc):
    """Nothing sniffs a dumpfile whose first record is not `/`; the dumpfile parser's located
    error says more than "cannot tell the format"."""
    for text in (b"/etc 0 40755 2 0 0 0 0.0 - - -\n", b"etc 0 40755 2 0 0 0 0.0 - - -\n",
                 b"/\n", b"\xc3\xa9t\xc3\xa9 12 100644 1 0 0 0 0.0 - - -\n"):
        path = tmp_path / "bad.dump"
        path.write_bytes(text)
        p = cfsc("compile", str(path), "-o", str(tmp_path / "x.cfs"))
        assert p.returncode == 2
        assert p.stderr.decode().startswith(f"error: {path}:1:"), (text, p.stderr)
        assert frontends.detect(str(path)) == "dump"
    for other in (b'{"version": 1, "entries": []}', b"hello world\n", b"/abs\0\0\0\0"):
        assert not dumpfile_frontend.sniff(other), other


def test_image_sniff_by_erofs_superblock():
    head = bytearray(4096)
    head[1024:1028] = (0xE0F5E1E2).to_bytes(4, "little")
    assert image_frontend.sniff(bytes(head))
    assert not image_frontend.sniff(bytes(4096))


def test_a_pipe_read_again_is_empty(tmp_path):
    """In-process: the head is read once and replayed; a second open of the spent pipe gives
    nothing (as stdin does) instead of waiting forever for a writer (dumpfile error locating
    reads its source again)."""
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    data = RNG.randbytes(100_000)

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(data[:3])
            f.flush()
            time.sleep(0.2)
            f.write(data[3:])

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    assert streams.head(str(fifo), 10) == data[:10]  # two writes, read on until 10 bytes
    assert streams.head(str(fifo), 5) == data[:5]
    with streams.open_binary(str(fifo)) as f:
        assert f.read() == data
    writer.join(10)
    with streams.open_binary(str(fifo)) as f:
        assert f.read() == b""
