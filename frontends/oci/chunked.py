"""zstd:chunked and eStargz layers: finding their TOC, and reading a layer from its TOC alone.

Both formats are a compressed tar that any decompressor reads whole, plus a table of contents
(CRFS TOC JSON: one entry per tar member, with each file's SHA-256 content `digest` and where
its compressed data starts), so a reader can build the tree without decompressing file data:

* zstd:chunked (containers/storage `pkg/chunked`): the TOC is zstd-compressed inside a
  skippable frame; the layer descriptor's annotation `io.github.containers.zstd-chunked.
  manifest-position` (older writers: `io.containers.zstd-chunked.manifest-position`) says
  `OFFSET:COMPRESSED:UNCOMPRESSED:TYPE`, and so does the footer, the blob's last skippable
  frame (64 bytes of data: seven little-endian u64 — offset, compressed and uncompressed
  length, type 1, then the tar-split's three — and the magic `GnUlInUx` (some sources spell it
  `GNUlInUx`; both are taken); older writers wrote only the first four, 40 bytes).  `…manifest-checksum`, when present, is the SHA-256 of the
  compressed TOC and is checked.
* eStargz (stargz-snapshotter `estargz`): the blob ends with a 51-byte empty gzip member whose
  extra field (subfield `SG`) holds `%016x` of the TOC's offset and `STARGZ` (legacy stargz: 47
  bytes, the same text as the whole extra field); at that offset a gzip member holds a tar with
  the one file `stargz.index.json`.  `containerd.io/snapshot/stargz/toc.digest`, when present,
  is the SHA-256 of that JSON and is checked.

`--toc-only` (`TocReader`) feeds the TOC's entries to the layer merge as tar members, so
whiteouts, hard links and implied directories follow exactly the tar rules and the tree is the
full compile's.  A regular file's payload is named from its content digest as
containers/storage's composefs support names it (`HEX[:2]/HEX[2:]` of the SHA-256), with no
fs-verity digest (it would need the data).  Files of 1..64 bytes are inlined like everywhere
else, so their data is read: only their own few compressed bytes are decompressed, and checked
against the TOC's digest.  The eStargz metadata entries (`stargz.index.json`,
`.prefetch.landmark`, `.no.prefetch.landmark`) never reach the tree, in either mode.  TOC-only
reads trust the TOC: the layer blob's digest cannot be checked without reading the blob.  The
TOC's writers (Go) spell a name that is not UTF-8 with U+FFFD, losing it: a name or link target
holding U+FFFD is refused with --toc-only (the full read takes it from the tar header).  An
empty layer's TOC may say `"entries":null` (a Go nil slice): no entries.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import struct
import tarfile
import zlib

import orjson
from cfsc.base import rfc3339
from cfsc.base.errors import InputError
from cfsc.base.limits import INLINE_MAX
from cfsc.frontends.tar.stream import (
    BLOCKDEV,
    CHAR,
    DIRECTORY,
    FIFO,
    HARDLINK,
    REGULAR,
    SYMLINK,
    Member,
    shown_name,
)

from .blobs import Blob

ZSTD_CHUNKED_MAGICS = (b"GnUlInUx", b"GNUlInUx")  # as skopeo 1.9 writes it; the spelling in newer sources
SKIPPABLE = struct.Struct("<II")  # magic, size
SKIPPABLE_MAGIC = 0x184D2A50
FOOTER = struct.Struct("<QQQQ")  # offset, compressed, uncompressed, type (then tar-split, magic)
POSITION_KEYS = ("io.github.containers.zstd-chunked.manifest-position",
                 "io.containers.zstd-chunked.manifest-position")
CHECKSUM_KEYS = ("io.github.containers.zstd-chunked.manifest-checksum",
                 "io.containers.zstd-chunked.manifest-checksum")
ESTARGZ_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
ESTARGZ_FOOTER = 51
LEGACY_FOOTER = 47
ESTARGZ_TOC_NAME = "stargz.index.json"
METADATA_NAMES = frozenset((b"stargz.index.json", b".prefetch.landmark", b".no.prefetch.landmark"))
TOC_MAX = 512 << 20
_POSITION = re.compile(r"([0-9]+):([0-9]+):([0-9]+):([0-9]+)")
_SHA256 = re.compile(r"sha256:([0-9a-f]{64})")
TYPES = {"dir": DIRECTORY, "reg": REGULAR, "symlink": SYMLINK, "hardlink": HARDLINK, "char": CHAR,
         "block": BLOCKDEV, "fifo": FIFO}
# File-type bits a TOC `mode` may carry (Go writers include them) for each type; 0 is always fine.
MODE_TYPES = {DIRECTORY: 0o040000, REGULAR: 0o100000, SYMLINK: 0o120000, HARDLINK: 0o100000, CHAR: 0o020000,
              BLOCKDEV: 0o060000, FIFO: 0o010000}
GO_ZERO_TIME = (rfc3339.FIRST, 0)


def kind_of(blob: Blob, compression: str | None, annotations: dict) -> str | None:
    """"zstd:chunked", "estargz" or None, from the annotations or the blob's footer."""
    if compression == "zstd":
        if any(k in annotations for k in POSITION_KEYS):
            return "zstd:chunked"
        if blob.size >= 8 + 40 and blob.pread(blob.size - 8, 8) in ZSTD_CHUNKED_MAGICS:
            return "zstd:chunked"
    elif compression == "gzip":
        if ESTARGZ_TOC_DIGEST in annotations:
            return "estargz"
        for size in (ESTARGZ_FOOTER, LEGACY_FOOTER):
            if blob.size >= size and _estargz_footer(blob.pread(blob.size - size, size), size) is not None:
                return "estargz"
    return None


# -- finding and reading the TOC ------------------------------------------------------------

def read_toc(blob: Blob, kind: str, annotations: dict) -> dict:
    data = _zstd_chunked_toc(blob, annotations) if kind == "zstd:chunked" else _estargz_toc(blob, annotations)
    return toc_document(data, blob.name)


def toc_document(data: bytes, where: str) -> dict:
    """The TOC's JSON: an object with an `entries` array (`null` for an empty layer, which
    containers/storage (Go) writes for its nil slice; a missing key is no TOC)."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise InputError(f"the TOC is not valid JSON: {e}", where) from None
    if isinstance(doc, dict) and "entries" in doc and doc["entries"] is None:
        doc["entries"] = []
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise InputError("the TOC: expected an object with an `entries` array", where)
    return doc


def _zstd_chunked_toc(blob: Blob, annotations: dict) -> bytes:
    text = next((annotations[k] for k in POSITION_KEYS if k in annotations), None)
    if text is not None:
        m = _POSITION.fullmatch(text) if isinstance(text, str) else None
        if m is None:
            raise InputError(f"annotation {POSITION_KEYS[0]}: expected OFFSET:LENGTH:UNCOMPRESSED:TYPE, got {text!r}",
                             blob.name)
        offset, compressed, uncompressed, kind = map(int, m.groups())
        where = "the manifest-position annotation"
    else:
        offset, compressed, uncompressed, kind = _zstd_chunked_footer(blob)
        where = "the footer"
    if kind != 1:
        raise InputError(f"{where}: TOC type {kind}, expected 1 (CRFS)", blob.name)
    if offset + compressed > blob.size or compressed == 0:
        raise InputError(f"{where}: the TOC at bytes {offset}..{offset + compressed} lies outside the blob"
                         f" ({blob.size} bytes)", blob.name)
    if uncompressed > TOC_MAX:
        raise InputError(f"{where}: a TOC of {uncompressed} bytes is refused (at most {TOC_MAX})", blob.name)
    raw = blob.pread(offset, compressed)
    checksum = next((annotations[k] for k in CHECKSUM_KEYS if k in annotations), None)
    if checksum is not None and checksum != "sha256:" + hashlib.sha256(raw).hexdigest():
        raise InputError(f"the TOC at byte {offset} hashes to sha256:{hashlib.sha256(raw).hexdigest()}, the"
                         f" manifest-checksum annotation says {checksum}", blob.name)
    import zstandard

    try:
        data = zstandard.ZstdDecompressor().decompress(raw, max_output_size=uncompressed)
    except zstandard.ZstdError as e:
        raise InputError(f"the TOC at byte {offset} ({compressed} bytes, from {where}) does not decompress: {e}",
                         blob.name) from None
    if len(data) != uncompressed:
        raise InputError(f"the TOC at byte {offset} decompresses to {len(data)} bytes, {where} says {uncompressed}",
                         blob.name)
    return data


def _zstd_chunked_footer(blob: Blob) -> tuple[int, int, int, int]:
    for data_size in (64, 40):
        size = SKIPPABLE.size + data_size
        if blob.size < size:
            continue
        tail = blob.pread(blob.size - size, size)
        magic, frame = SKIPPABLE.unpack_from(tail)
        if tail[-8:] in ZSTD_CHUNKED_MAGICS and magic == SKIPPABLE_MAGIC and frame == data_size:
            return FOOTER.unpack_from(tail, SKIPPABLE.size)
    raise InputError(f"no zstd:chunked footer: the last bytes are not a skippable frame ending in"
                     f" {ZSTD_CHUNKED_MAGICS[0].decode()} (corrupt, or not zstd:chunked)", blob.name)


def _estargz_toc(blob: Blob, annotations: dict) -> bytes:
    offset = None
    for size in (ESTARGZ_FOOTER, LEGACY_FOOTER):
        if blob.size < size:
            continue
        footer = blob.pread(blob.size - size, size)
        offset = _estargz_footer(footer, size)
        if offset is not None:
            end = blob.size - size
            break
    if offset is None:
        raise InputError(f"no eStargz footer: the last {ESTARGZ_FOOTER} bytes are not an empty gzip member whose"
                         " extra field holds the TOC offset and STARGZ (corrupt, or not eStargz)", blob.name)
    if offset >= end:
        raise InputError(f"the footer puts the TOC at byte {offset}, past the data's end ({end})", blob.name)
    raw = blob.pread(offset, end - offset)
    try:
        d = zlib.decompressobj(31)
        tar_bytes = d.decompress(raw, TOC_MAX)
        if not d.eof:
            raise zlib.error("the gzip member does not end before the footer")
    except zlib.error as e:
        raise InputError(f"the TOC's gzip member at byte {offset} is corrupt: {e}", blob.name) from None
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tf:
            info = tf.next()
            if info is None or info.name != ESTARGZ_TOC_NAME or not info.isfile():
                raise InputError(f"the TOC member at byte {offset} holds {info.name if info else 'nothing'!r},"
                                 f" expected {ESTARGZ_TOC_NAME}", blob.name)
            data = tf.extractfile(info).read()  # type: ignore[union-attr]
    except tarfile.TarError as e:
        raise InputError(f"the TOC member at byte {offset} is not a tar: {e}", blob.name) from None
    digest = annotations.get(ESTARGZ_TOC_DIGEST)
    if digest is not None and digest != "sha256:" + hashlib.sha256(data).hexdigest():
        raise InputError(f"the TOC hashes to sha256:{hashlib.sha256(data).hexdigest()}, the {ESTARGZ_TOC_DIGEST}"
                         f" annotation says {digest}", blob.name)
    return data


def _estargz_footer(footer: bytes, size: int) -> int | None:
    """The TOC offset an eStargz (51-byte) or legacy stargz (47-byte) footer holds, or None."""
    if footer[:3] != b"\x1f\x8b\x08" or not footer[3] & 4:
        return None
    xlen = footer[10] | footer[11] << 8
    extra = footer[12:12 + xlen]
    if size == ESTARGZ_FOOTER:
        if xlen != 26 or extra[:2] != b"SG" or extra[2] | extra[3] << 8 != 22:
            return None
        text = extra[4:]
    else:
        if xlen != 22:
            return None
        text = extra
    if not text.endswith(b"STARGZ"):
        return None
    try:
        return int(text[:16], 16)
    except ValueError:
        return None


# -- reading a layer from its TOC -----------------------------------------------------------

class TocReader:
    """The layer merge's reader protocol (`members`, `read`, `extents`, `has_holes`, `error`,
    `offset`, `named`) over a TOC: members from its entries, data only for files inlined."""

    def __init__(self, blob: Blob, kind: str, annotations: dict) -> None:
        self.blob = blob
        self.kind = kind
        self.name = blob.name
        self.doc = read_toc(blob, kind, annotations)
        self.offset = 0
        self._index = 0
        self._digests: dict[int, str] = {}  # id(member) -> hex content digest
        self._current: tuple | None = None

    def __enter__(self) -> TocReader:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def error(self, what: str, member: Member | None = None, offset: int | None = None) -> InputError:
        where = f"{self.name}: TOC entries[{self._index}]"
        if member is not None:
            where += f" '{shown_name(member.path)}'"
        return InputError(what, where)

    def _bad(self, key: str, what: str) -> InputError:
        return InputError(f"{key}: {what}", f"{self.name}: TOC entries[{self._index}]")

    def members(self):
        entries = self.doc["entries"]
        for i, e in enumerate(entries):
            self._index = i
            if not isinstance(e, dict):
                raise self._bad("", "expected an object")
            kind = e.get("type")
            if kind == "chunk":
                continue
            t = TYPES.get(kind)  # type: ignore[arg-type]
            if t is None:
                raise self._bad("type", f"expected one of {', '.join(TYPES)} or chunk, got {kind!r}")
            m = self.member(e, t)
            if m.path.strip(b"/").removeprefix(b"./") in METADATA_NAMES:
                continue
            yield m

    def _int(self, e: dict, key: str, hi: int = (1 << 63) - 1) -> int:
        v = e.get(key, 0)
        if type(v) is not int or not 0 <= v <= hi:
            raise self._bad(key, f"expected an integer from 0 to {hi}")
        return v

    def _text(self, e: dict, key: str) -> bytes:
        v = e.get(key, "")
        if not isinstance(v, str):
            raise self._bad(key, "expected a string")
        if "\ufffd" in v:
            # Go's JSON writer puts U+FFFD for every byte that is not UTF-8: the tar header
            # holds the name, the TOC only a lossy spelling of it.
            raise self._bad(key, f"{ascii(v)} holds U+FFFD, which the TOC's writer puts for bytes that are not UTF-8:"
                                 " the name is lost in the TOC (compile without --toc-only: the tar has it)")
        return v.encode("utf-8", "surrogateescape")

    def member(self, e: dict, t: bytes) -> Member:
        name = self._text(e, "name")
        if not name:
            raise self._bad("name", "expected a non-empty path")
        mode = self._int(e, "mode", 0xFFFFFFFF)
        if mode & 0o170000 not in (0, MODE_TYPES[t]):
            raise self._bad("mode", f"file-type bits {mode & 0o170000:o} contradict type {e.get('type')!r}")
        size = self._int(e, "size") if t == REGULAR else 0
        when = e.get("modtime")
        sec, nsec = 0, 0
        if when is not None:
            parsed = rfc3339.parse(when) if isinstance(when, str) else None
            if parsed is None:
                raise self._bad("modtime", "expected an RFC 3339 time")
            if parsed != GO_ZERO_TIME:
                sec, nsec = parsed
        m = Member(self._index, t, name, self._text(e, "linkName"), mode & 0o7777, self._int(e, "uid"),
                   self._int(e, "gid"), size, sec, self._int(e, "devMajor"), self._int(e, "devMinor"))
        m.mtime_nsec = nsec
        xattrs = e.get("xattrs")
        if xattrs:
            if not isinstance(xattrs, dict):
                raise self._bad("xattrs", "expected an object of name → base64 value")
            m.xattrs = {}
            for k, v in xattrs.items():
                try:
                    m.xattrs[k.encode("utf-8", "surrogateescape")] = base64.b64decode(v, validate=True)
                except (binascii.Error, ValueError, TypeError):
                    raise self._bad(f"xattrs.{k}", "expected base64") from None
        if t == REGULAR and size:
            digest = e.get("digest")
            hit = _SHA256.fullmatch(digest) if isinstance(digest, str) else None
            if hit is None:
                raise self._bad("digest", "expected sha256: and 64 lowercase hex digits (a file with data)")
            self._current = (hit.group(1), self._int(e, "offset"), e.get("endOffset"), size)
        else:
            self._current = None
        return m

    # -- data -------------------------------------------------------------------------------

    def named(self, m: Member, node) -> bool:
        """Name the payload of a file too large to inline from its TOC digest (True), or leave
        a small one to `read` (False)."""
        assert self._current is not None
        hexdigest = self._current[0]
        if m.size <= INLINE_MAX:
            return False
        node.payload = (hexdigest[:2] + "/" + hexdigest[2:]).encode()
        return True

    def read(self, n: int) -> bytes:
        assert self._current is not None
        hexdigest, offset, end, size = self._current
        if self.kind == "zstd:chunked":
            if type(end) is not int or not offset < end <= self.blob.size:
                raise self._bad("endOffset", f"expected an offset after {offset}, inside the blob")
            import zstandard

            try:  # at most `size` + 1 bytes out, whatever the frame holds (a bomb costs nothing)
                with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(self.blob.pread(offset, end - offset)),
                                                                read_across_frames=True) as z:
                    data = z.read(size + 1)
            except zstandard.ZstdError as e:
                raise self._bad("offset", f"the data at byte {offset} does not decompress: {e}") from None
        else:
            raw = self.blob.pread(offset, min(self.blob.size - offset, 1 << 16))
            try:
                data = zlib.decompressobj(31).decompress(raw, size)
            except zlib.error as e:
                raise self._bad("offset", f"the data at byte {offset} does not decompress: {e}") from None
        data = data[:size]
        if len(data) != n or hashlib.sha256(data).hexdigest() != hexdigest:
            raise self._bad("digest", f"the {len(data)} bytes at byte {offset} do not hash to the TOC's digest")
        return data

    def extents(self, n: int):
        yield self.read(n)  # (a TOC names no holes)

    has_holes = False
