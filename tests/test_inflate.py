"""gzip by ISA-L (`cfsc.base.inflate`) against the standard library's `GzipFile`, the reference.

The member reader must hand out what `gzip.GzipFile` hands out, in the same order relative to
any failure: every byte of a good member before an error after it (a bad next header, trailing
garbage), so that the tar reader locates failures where it did with the standard library.
Only a member whose CRC/size trailer fails, or is cut, may keep the data of its end back.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib

import pytest
from cfsc.base import inflate
from hypothesis import given, settings
from hypothesis import strategies as st


def read_all(stream, piece: int) -> tuple[bytes, str | None]:
    """Everything `read1(piece)` gives until the end or a failure, and the failure's kind."""
    out = []
    try:
        while data := stream.read1(piece):
            out.append(data)
    except EOFError:
        return b"".join(out), "cut"
    except (gzip.BadGzipFile, zlib.error) as e:
        return b"".join(out), "bad-crc" if "checksum" in str(e) or "CRC" in str(e) else f"bad:{e}"
    return b"".join(out), None


def member(data: bytes, level: int, name: bool) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(filename="x.txt" if name else "", mode="wb", fileobj=out, compresslevel=level, mtime=0) as f:
        f.write(data)
    return out.getvalue()


payloads = st.one_of(st.binary(max_size=3000), st.integers(0, 100000).map(lambda n: os.urandom(n // 2) + bytes(n)))
streams = st.lists(st.tuples(payloads, st.integers(0, 9), st.booleans(), st.integers(0, 3)), max_size=4).map(
    lambda ms: b"".join(member(d, lv, nm) + bytes(pad) for d, lv, nm, pad in ms))


@settings(max_examples=150, deadline=None)
@given(streams, st.sampled_from([b"", b"x", b"\x1f", b"garbage", b"\x1f\x8b\x08", b"junk-after-the-members!"]),
       st.integers(0, 40), st.sampled_from([7, 4096, 65536, 1 << 20]))
def test_the_member_reader_hands_out_what_gzipfile_does(stream, trailer, cut, piece):
    data = stream + trailer
    if cut and data:
        data = data[:max(0, len(data) - cut)] if cut % 2 else data
    ours, failure = read_all(inflate.gzip_reader(io.BytesIO(data)), piece)
    reference, reference_failure = read_all(inflate.gzip_reader(io.BytesIO(data), reference=True), piece)
    assert failure == reference_failure
    if failure in ("cut", "bad-crc"):  # ISA-L holds a member's end back until its trailer checks out
        assert reference.startswith(ours)
    else:
        assert ours == reference


@pytest.mark.parametrize("where", [-8, -5, -1])  # the CRC, the size, its last byte
def test_a_bad_trailer_fails_and_loses_at_most_the_last_call(where):
    payload = os.urandom(300000)
    data = bytearray(member(payload, 6, False))
    data[where] ^= 1
    got, failure = read_all(inflate.gzip_reader(io.BytesIO(bytes(data))), 65536)
    assert failure == "bad-crc" and payload.startswith(got) and len(payload) - len(got) <= 65536


def test_a_file_opened_for_its_members_is_closed_with_them(tmp_path):
    payload = os.urandom(5000) + bytes(100000)
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(payload) + bytes(7) + gzip.compress(payload))
    with inflate.open_gzip(str(path)) as f:
        assert f.read() == payload * 2
        raw = f.raw._fp
    assert raw.closed


@settings(max_examples=150, deadline=None)
@given(streams, st.integers(0, 1 << 30), st.integers(1, 255), st.sampled_from([7, 4096, 65536]))
def test_a_corrupt_byte_fails_both_or_neither(stream, at, flip, piece):
    """A byte changed anywhere: both readers fail (each where its decoder notices: the bytes
    before are the same), or both read the same bytes (a change in a name or padding)."""
    if not stream:
        return
    data = bytearray(stream)
    data[at % len(data)] ^= flip
    ours, failure = read_all(inflate.gzip_reader(io.BytesIO(bytes(data))), piece)
    reference, reference_failure = read_all(inflate.gzip_reader(io.BytesIO(bytes(data)), reference=True), piece)
    assert (failure is None) == (reference_failure is None)
    if failure is None:
        assert ours == reference
    else:
        assert ours.startswith(reference) or reference.startswith(ours)


def test_lines_of_a_gzip_file_as_gzip_open_gives_them(tmp_path):
    """tar-split files are read line by line (`oci.storage`): buffered, not a byte per call."""
    text = b"".join(b'{"type":1,"name":"usr/lib/f%d"}\n' % i for i in range(20000)) + b"no newline at the end"
    path = tmp_path / "x.tar-split.gz"
    path.write_bytes(gzip.compress(text[:300000]) + gzip.compress(text[300000:]))
    with inflate.open_gzip(str(path)) as ours, inflate.open_gzip(str(path), reference=True) as reference:
        assert list(ours) == list(reference)


def test_read_hands_out_the_data_before_a_failure_then_raises_it():
    """(GzipFile's `read` drops that data: the OCI path reads with `read`, and its failures
    are located after the good data all the same.)"""
    payload = os.urandom(100000)
    reader = inflate.gzip_reader(io.BytesIO(gzip.compress(payload) + b"trailing garbage"))
    assert reader.read(1 << 20) == payload
    with pytest.raises(gzip.BadGzipFile, match="Not a gzipped file"):
        reader.read(1 << 20)


def test_a_wrong_header_crc_is_refused_where_gzipfile_skips_it():
    """FHCRC: a CRC-16 of the header follows it.  Go's gzip (containers/image's) checks it,
    and so does ISA-L: refused, with nothing handed out; `GzipFile` does not look at it."""
    payload = os.urandom(3000)
    plain = gzip.compress(payload, mtime=0)
    header = bytearray(plain[:10])
    header[3] |= 0x02  # FHCRC
    crc16 = zlib.crc32(bytes(header)) & 0xFFFF
    good = bytes(header) + crc16.to_bytes(2, "little") + plain[10:]
    bad = bytes(header) + (crc16 ^ 1).to_bytes(2, "little") + plain[10:]
    assert inflate.gzip_reader(io.BytesIO(good)).read() == payload
    with pytest.raises(gzip.BadGzipFile, match="member 1: "):
        inflate.gzip_reader(io.BytesIO(bad)).read1(1 << 20)
    assert inflate.gzip_reader(io.BytesIO(bad), reference=True).read() == payload
