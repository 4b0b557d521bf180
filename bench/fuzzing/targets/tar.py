"""Tar layers (frontends/tar.py, tarstream.py): archive bytes, plain or gzip/zstd/xz, compiled
in-process to image bytes.

Mutations know the format: a header field rewritten (octal, base-256 of any width and sign,
spaces and NULs, junk) with the checksum fixed or not, a PAX record changed, added or broken
(huge, negative, fractional and 5000-digit numbers, odd paths, xattr spellings), members
inserted, dropped, repeated or cut short; compressed inputs are mutated decompressed and
compressed again (sometimes the compressed bytes themselves).  Some bits of the input's CRC
choose options (`--keep-whiteouts`, a lower layer under it, `--skip-devices`,
`--use-epoch`, a content store), so each case is reproduced from its bytes alone.  The image
must hold the numbers of the tree it was written from (`roundtrip`): nothing wrapped.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import random
import tarfile
import zlib

import zstandard
from cfsc.base.options import Options
from cfsc.build import compile_tree
from cfsc.frontends.tar import layers as tar

from bench.fuzzing.mutators import INTERESTING, generic
from bench.fuzzing.roundtrip import check_image, numbers
from tests.helpers.tarcraft import pax_records

NAME = "tar"
BLOCK = 512
FIELDS = {"name": (0, 100), "mode": (100, 8), "uid": (108, 8), "gid": (116, 8), "size": (124, 12),
          "mtime": (136, 12), "chksum": (148, 8), "typeflag": (156, 1), "linkname": (157, 100),
          "magic": (257, 6), "version": (263, 2), "devmajor": (329, 8), "devminor": (337, 8), "prefix": (345, 155)}
NUMERIC = ("mode", "uid", "gid", "size", "mtime", "devmajor", "devminor")
TYPEFLAGS = b"01234567xgLKVSDMNZ\0"
PAX_KEYS = (b"path", b"linkpath", b"size", b"uid", b"gid", b"mtime", b"atime", b"ctime", b"uname",
            b"SCHILY.xattr.user.a", b"SCHILY.xattr.trusted.overlay.opaque", b"LIBARCHIVE.xattr.user.%41",
            b"RHT.security.selinux", b"GNU.sparse.major", b"GNU.sparse.map", b"GNU.sparse.size",
            b"GNU.sparse.offset", b"GNU.sparse.numbytes", b"GNU.sparse.numblocks", b"comment")
NAMES = (b"a", b"./b", b"/abs", b"d/e", b"d/.wh.e", b"d/.wh..wh..opq", b".wh.", b"..", b"a/../b", b"d/",
         b"x" * 300, b"l/passwd", b".wh..wh.plnk/1.2", b"n\0ul", b"./", b"")


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value) if value >= 0 else b"-%o" % -value


def _checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)


def _header(name: bytes, typeflag: bytes = b"0", size: int = 0, linkname: bytes = b"", mode: int = 0o644) -> bytes:
    block = bytearray(BLOCK)
    block[0:100] = name[:100].ljust(100, b"\0")
    for field, value in (("mode", mode), ("uid", 0), ("gid", 0), ("size", size), ("mtime", 1_700_000_000)):
        at, width = FIELDS[field]
        block[at:at + width] = _octal(value, width)
    block[156:157] = typeflag
    block[157:257] = linkname[:100].ljust(100, b"\0")
    block[257:265] = b"ustar\x0000"
    _checksum(block)
    return bytes(block)


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)




def _member(name: bytes, data: bytes = b"", typeflag: bytes = b"0", pax=None, linkname: bytes = b"") -> bytes:
    out = b""
    if pax:
        body = pax_records(pax)
        out = _header(b"PaxHeaders/x", b"x", len(body)) + _pad(body)
    return out + _header(name, typeflag, len(data), linkname) + _pad(data)


# -- seeds ------------------------------------------------------------------------------------

def _tarfile(fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt,
                      pax_headers={"mtime": "1.5"} if fmt == tarfile.PAX_FORMAT else None) as t:
        def add(name, kind=tarfile.REGTYPE, data=b"", **attrs):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data)
            info.mtime = 1_700_000_000
            for k, v in attrs.items():
                setattr(info, k, v)
            t.addfile(info, io.BytesIO(data) if data else None)
        add("d", tarfile.DIRTYPE, mode=0o755)
        add("d/small", data=b"hello")
        add("d/big", data=bytes(range(256)) * 20)
        add("d/link", tarfile.LNKTYPE, linkname="d/big")
        add("d/sym", tarfile.SYMTYPE, linkname="../elsewhere")
        add("dev", tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("fifo", tarfile.FIFOTYPE)
        add("d/.wh.gone")
        add("e/.wh..wh..opq")
        add("long/" + "n" * 90 + "/" + "m" * 90, data=b"x")
        if fmt == tarfile.PAX_FORMAT:
            add("x", data=b"xattrs", pax_headers={"SCHILY.xattr.user.k": "v", "mtime": "-1.25", "uid": "7"})
    return out.getvalue()


def seeds() -> list[bytes]:
    plain = [_tarfile(f) for f in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT)]
    crafted = b"".join((
        _member(b"a", b"data", pax=[(b"mtime", b"12.123456789"), (b"LIBARCHIVE.xattr.user.%41", b"AAEC")]),
        _member(b"b", b"", b"1", linkname=b"a"),
        _member(b".wh.c"), _member(b"d/", typeflag=b"5"), _member(b"d/.wh..wh..opq"),
    )) + bytes(1024)
    # PAX sparse files, formats 0.0, 0.1 and 1.0 (the data regions only, the holes implied)
    sparse = b"".join((
        _member(b"s0", b"abcd", pax=[(b"GNU.sparse.size", b"9000"), (b"GNU.sparse.numblocks", b"2"),
                                     (b"GNU.sparse.offset", b"1"), (b"GNU.sparse.numbytes", b"2"),
                                     (b"GNU.sparse.offset", b"8998"), (b"GNU.sparse.numbytes", b"2")]),
        _member(b"GNUSparseFile.1/s1", b"xy", pax=[(b"GNU.sparse.map", b"0,1,70,1"), (b"GNU.sparse.numblocks", b"2"),
                                                   (b"GNU.sparse.name", b"s1"), (b"GNU.sparse.size", b"71")]),
        _member(b"GNUSparseFile.1/s2", _pad(b"2\n5\n3\n4096\n1\n") + b"abcd",
                pax=[(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"), (b"GNU.sparse.name", b"s2"),
                     (b"GNU.sparse.realsize", b"5000")]),
    )) + bytes(1024)
    empty = bytes(1024)
    out = plain + [crafted, sparse, empty]
    out += [gzip.compress(plain[1], mtime=0), zstandard.ZstdCompressor().compress(plain[0]),
            lzma.compress(crafted)]
    return out


# -- mutations ----------------------------------------------------------------------------------

def _headers(data: bytes) -> list[int]:
    """Offsets of blocks that look like headers (a ustar magic, or octal digits in `size`)."""
    out = []
    for at in range(0, len(data) - BLOCK + 1, BLOCK):
        block = data[at:at + BLOCK]
        size = block[124:135]
        if block[257:262] == b"ustar" or (size.strip(b"0 \0") and not size.translate(None, b"01234567 \0")):
            out.append(at)
    return out


def _number(rng: random.Random, width: int) -> bytes:
    value = rng.choice(INTERESTING + (1 << 88, (1 << 95) - 1, 10 ** 20, 0o7777, 0o177777, 1 << 33))
    kind = rng.randrange(6)
    if kind == 0:
        return _octal(value % (8 ** (width - 1)), width)
    if kind == 1:  # base-256, positive, possibly wider than any field should hold
        return b"\x80" + (value % (1 << (8 * (width - 1)))).to_bytes(width - 1, "big")
    if kind == 2:  # base-256, negative
        return (-(value % (1 << (8 * width - 1))) or -1).to_bytes(width, "big", signed=True)
    if kind == 3:
        return rng.choice((b"", b" " * width, b"\0" * width, b"\0" + b"7" * (width - 1), b" 12 34", b"-1"))
    if kind == 4:  # other first bytes with the top bit set
        return bytes([rng.randrange(0x81, 0xFF)]) + rng.randbytes(width - 1)
    return (b"%o" % value)[:width]


def _pax_value(rng: random.Random) -> bytes:
    return rng.choice((b"9" * rng.choice((19, 20, 30, 5000)), b"-9223372036854775808.5", b"18446744073709551615",
                       b"1." + b"9" * 12, b"-0", b"-1.0000000001", b"1e9", b"", b"x", b"4294967296", b"0",
                       b"9223372036854775807.999999999", b"a\0b", b"../../etc", b"/", b"d/.wh.x", b"AAE",
                       b"4294967295", b"-5", rng.randbytes(4)))


def _edit_field(data: bytearray, rng: random.Random, at: int) -> None:
    field = rng.choice(tuple(FIELDS))
    start, width = FIELDS[field]
    if field in NUMERIC or field == "chksum":
        value = _number(rng, width)
    elif field == "typeflag":
        value = bytes([rng.choice(TYPEFLAGS)])
    elif field in ("name", "linkname", "prefix"):
        value = rng.choice(NAMES)
    else:
        value = rng.choice((b"ustar\0", b"ustar ", b"\0" * 6, b"00", b" \0"))
    data[at + start:at + start + width] = value[:width].ljust(width, b"\0")
    if field != "chksum" and rng.random() < 0.85:
        block = bytearray(data[at:at + BLOCK])
        _checksum(block)
        data[at:at + BLOCK] = block


def _edit_pax(data: bytes, rng: random.Random, at: int) -> bytes:
    """Replace the member at `at` by one with a PAX header of changed records."""
    pairs = [(rng.choice(PAX_KEYS), _pax_value(rng)) for _ in range(rng.randint(1, 3))]
    body = pax_records(pairs)
    if rng.random() < 0.1:
        body = body.replace(b" ", b"  ", 1) if rng.random() < 0.5 else body[:-1]
    kind = b"g" if rng.random() < 0.2 else b"x"
    extension = _header(b"PaxHeaders/p", kind, len(body)) + _pad(body)
    return data[:at] + extension + data[at:]


def _new_member(rng: random.Random) -> bytes:
    name = rng.choice(NAMES)
    kind = rng.choice((b"0", b"1", b"2", b"3", b"5", b"6", b"7", b"\0"))
    payload = rng.choice((b"", b"x", b"y" * 65, b"z" * 5000))
    pax = [(rng.choice(PAX_KEYS), _pax_value(rng))] if rng.random() < 0.5 else None
    return _member(name, payload if kind in b"07\0" else b"", kind, pax, rng.choice(NAMES))


def _fix_checksums(data: bytes) -> bytes:
    out = bytearray(data)
    for at in _headers(data):
        block = bytearray(out[at:at + BLOCK])
        _checksum(block)
        out[at:at + BLOCK] = block
    return bytes(out)


def _mutate_plain(data: bytes, rng: random.Random) -> bytes:
    heads = _headers(data)
    choice = rng.randrange(9)
    if not heads or choice == 0:
        mutated = generic(data, rng)
        return _fix_checksums(mutated) if rng.random() < 0.7 else mutated  # past the checksum, into the fields
    at = rng.choice(heads)
    if choice <= 3:
        out = bytearray(data)
        _edit_field(out, rng, at)
        return bytes(out)
    if choice == 4:
        return _edit_pax(data, rng, at)
    if choice == 5:
        return data[:at] + _new_member(rng) + data[at:]
    if choice == 6:  # drop or repeat what lies between two headers
        later = [h for h in heads if h > at] + [len(data)]
        end = rng.choice(later)
        return data[:at] + data[end:] if rng.random() < 0.5 else data[:end] + data[at:end] + data[end:]
    if choice == 7:  # cut short at a block boundary, or lose the end marker
        return data[:rng.randrange(0, len(data) + 1, BLOCK)] if rng.random() < 0.5 else data.rstrip(b"\0")
    return generic(data, rng)


_COMPRESSORS = {
    "gzip": lambda d: gzip.compress(d, mtime=0),
    "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
    "xz": lambda d: lzma.compress(d, preset=1),  # (preset 6's 94 MiB encoder broke the 1 GiB address-space cap)
}


def _compression(data: bytes) -> str | None:
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if data[:6] == b"\xfd7zXZ\x00":
        return "xz"
    return None


_PLAIN_MAX = 4 << 20  # a mutated stream inflating past this is mutated as bytes (the mutator's memory)


def _decompress(data: bytes, kind: str) -> bytes | None:
    """The plain archive inside a compressed case, or None: broken, or a bomb the mutator
    would run out of memory on (the target itself bounds what it reads)."""
    try:
        if kind == "gzip":
            z = zlib.decompressobj(31)
            plain = z.decompress(data, _PLAIN_MAX + 1)
        elif kind == "zstd":
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True) as r:
                plain = r.read(_PLAIN_MAX + 1)
        else:
            z = lzma.LZMADecompressor()
            plain = z.decompress(data, _PLAIN_MAX + 1)
    except Exception:  # noqa: BLE001 - a broken stream is mutated as bytes instead
        return None
    return plain if len(plain) <= _PLAIN_MAX else None


def mutate(data: bytes, rng: random.Random) -> bytes:
    data = data[:_PLAIN_MAX]  # (repeating spans, generation after generation, grows a case without end)
    kind = _compression(data)
    if kind is not None:
        plain = _decompress(data, kind)
        if plain is None or rng.random() < 0.15:
            return generic(data, rng)
        mutated = _mutate_plain(plain, rng)[:_PLAIN_MAX]
        return _COMPRESSORS[rng.choice(list(_COMPRESSORS)) if rng.random() < 0.2 else kind](mutated)
    mutated = _mutate_plain(data, rng)[:_PLAIN_MAX]
    if rng.random() < 0.05:
        return _COMPRESSORS[rng.choice(list(_COMPRESSORS))](mutated)
    return mutated


# -- running --------------------------------------------------------------------------------------

LOWER = _member(b"d/", typeflag=b"5") + _member(b"d/e", b"lower") + _member(b"l", typeflag=b"2", linkname=b"d") \
    + _member(b"f", b"file") + bytes(1024)


def run(data: bytes, workdir: str) -> None:
    bits = zlib.crc32(data)
    options = Options(threads=1, keep_whiteouts=bool(bits & 1), skip_devices=bool(bits & 4), use_epoch=bool(bits & 8))
    layers = []
    if bits & 2:  # under a lower layer: whiteouts and replacements have something to act on
        lower = os.path.join(workdir, "lower.tar")
        with open(lower, "wb") as f:
            f.write(LOWER)
        layers.append(lower)
    path = os.path.join(workdir, "layer.tar")
    with open(path, "wb") as f:
        f.write(data)
    layers.append(path)
    if bits & 16:
        options.digest_store = os.path.join(workdir, "store")
    tree = tar.load_many(layers, options)
    want = numbers(tree)
    out = io.BytesIO()
    compile_tree(tree, options, out)
    check_image(want, out.getvalue())
