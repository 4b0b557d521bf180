"""Reading a tar stream in one pass: headers, GNU and PAX extensions → `Member`s and their data.

Python's `tarfile` manages ~10–35k headers/s, turns PAX mtimes into floats and leaves xattrs
undecoded (inputs.md §2.13), so the header is parsed here: its layout is declared once
(`HEADER`), unpacked with one `struct` call, and the checksum is summed by `zlib.adler32`
over two 256-byte halves (each half sums to less than Adler's modulus, so the A component is the
exact byte sum).  File data is handed out as bytes (`read`) or as a stream of chunks (`chunks`)
straight from the decompressor: nothing is extracted to disk.

What is understood (inputs.md §2.2–2.4): ustar (the `prefix` field), GNU `L`/`K` long names,
PAX `x` records `path`, `linkpath`, `size`, `uid`, `gid`, `mtime` (fractions kept to the
nanosecond, negative times allowed), `SCHILY.xattr.*`, `LIBARCHIVE.xattr.*` (URL-encoded name,
base64 value; SCHILY wins when both name the same xattr), `RHT.security.selinux` and GNU tar's
PAX sparse files (`GNU.sparse.*`, formats 0.0, 0.1 and 1.0: holes read as zeros, as Go's
`archive/tar` reads them and so umoci and containers/storage extract them); PAX `g`
records give defaults for `uid`, `gid`, `mtime` and xattrs of every later member (a global
`path`, `linkpath` or `size` would name or size every member alike and is ignored; `atime` and
`ctime` are checked, like a member's); base-256 numbers; checksums summed over signed bytes
(some old writers).  An old-style `\\0` member whose name ends in `/` is a directory.  `V`
volume labels are skipped.

Choices where readers disagree, all following Go's `archive/tar` (which writes and reads most
container layers): hard links, symlinks, devices, FIFOs and directories have no data whatever
their `size` field says; uname/gname, atime and ctime are dropped (atime and ctime after the
checks GNU tar and Go make of them).  Two follow GNU tar instead, the stricter: a leading NUL
ends an octal field (Go skips it), and base-256 numbers start with 0x80 or 0xff (Go takes any
first byte with the top bit set).

Errors (`InputError`, located as `SOURCE: member 'NAME' at byte N`, offsets counted in the
decompressed stream): bad checksums, malformed numbers and PAX records, numbers a member
cannot have (`RANGES`: times and sizes beyond 64 bits, ids beyond 32, modes beyond the 16
bits of type and permissions, negative ones; in header fields, base-256 included, and in PAX
`size`, `uid`, `gid`, `mtime`, `atime` and `ctime` records, global ones too; GNU tar refuses
them too, but for modes and negative base-256 ids, which it masks and wraps), sparse maps
that do not describe the member's data (out of order, past the file's end, holding more or
fewer bytes than the member), holes handed out as zeros adding up to more than 1 GiB plus 1024 bytes per
byte of the archive (a sparse bomb; holes taken as holes cost nothing), old GNU sparse files (type `S`: umoci and containers/storage
refuse them too) and the other GNU types (`D`, `M`, `N`) and unknown type flags (nothing a layer
should hold; extracting them as regular files would give the wrong tree), extension headers
over 16 MiB, and an archive that ends early — inside a header or a member's data, or without
the end-of-archive zero block (an archive missing it cannot be told from one cut at a member
boundary).  After the end marker the rest of the input is read and discarded, so that
decompressors check their trailers and a writer piping into us never sees a broken pipe.
A decompression error (a truncated or corrupt gzip/xz stream, a CRC mismatch, trailing
garbage) is held back until the data decoded before it was read, so it names the member being
read (or the one before, or the end marker) and the archive offset where the good data ends,
with the compressed bytes read so far.  (python-zstandard does not report a zstd stream cut
short; the end-marker rule catches every cut that loses archive content.)
"""

from __future__ import annotations

import binascii
import re
import struct
import zlib
from collections.abc import Iterator
from urllib.parse import unquote_to_bytes

from cfsc.base.errors import InputError, shown_cut, shown_path
from cfsc.base.limits import PATH_MAX
from cfsc.base.streams import UNITS, decompressor, open_binary, source_name
from cfsc.frontends.tar.readahead import AHEAD, GZIP_PIECE, ReadAhead, gather

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
CHUNK = 1 << 20  # decompressed bytes read at a time
EXTENDED_MAX = 16 << 20  # a PAX or GNU long-name header larger than this is refused

# The header block (inputs.md §2.2), field names as POSIX spells them.
HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
assert HEADER.size == BLOCK
(NAME, MODE, UID, GID, SIZE, MTIME, CHKSUM, TYPEFLAG, LINKNAME, MAGIC, VERSION, UNAME, GNAME,
 DEVMAJOR, DEVMINOR, PREFIX) = range(16)
CHKSUM_OFFSET = 148
POSIX_MAGIC = b"ustar\x00"

# Type flags.  Only these carry data; every other known type has none whatever `size` says.
REGULAR = b"0"
REGULAR_OLD = b"\x00"
CONTIGUOUS = b"7"
HARDLINK = b"1"
SYMLINK = b"2"
CHAR = b"3"
BLOCKDEV = b"4"
DIRECTORY = b"5"
FIFO = b"6"
PAX = b"x"
PAX_GLOBAL = b"g"
GNU_LONGNAME = b"L"
GNU_LONGLINK = b"K"
VOLUME_LABEL = b"V"
UNSUPPORTED = {
    b"S": "old GNU sparse files (type S) are not supported (umoci and containers/storage refuse them too;"
          " GNU tar --format=posix writes sparse files they all read)",
    b"D": "GNU dump directories are not supported",
    b"M": "multi-volume archives are not supported",
    b"N": "old GNU long-name records are not supported",
}
ENTRY_TYPES = frozenset((REGULAR, REGULAR_OLD, CONTIGUOUS, HARDLINK, SYMLINK, CHAR, BLOCKDEV, DIRECTORY, FIFO))
DATA_TYPES = frozenset((REGULAR, REGULAR_OLD, CONTIGUOUS))

# What a member's numbers may be (inputs.md §2.2; GNU tar refuses the same, naming the field):
# permission and file-type bits (the tree keeps `mode & 07777`), 32-bit ids, a 64-bit signed
# size and time.  Nothing is ever reduced modulo a width.
MODE_MAX = 0o177777
ID_MAX = (1 << 32) - 1
SIZE_MAX = (1 << 63) - 1
TIME_MIN, TIME_MAX = -(1 << 63), (1 << 63) - 1
RANGES = {b"mode": (0, MODE_MAX, "the file type and permission bits"), b"uid": (0, ID_MAX, "a 32-bit id"),
          b"gid": (0, ID_MAX, "a 32-bit id"), b"size": (0, SIZE_MAX, "a 64-bit file size"),
          b"mtime": (TIME_MIN, TIME_MAX, "a 64-bit time"), b"atime": (TIME_MIN, TIME_MAX, "a 64-bit time"),
          b"ctime": (TIME_MIN, TIME_MAX, "a 64-bit time")}
DIGITS_MAX = 19  # decimal digits that may still be in range (leading zeros aside)
SHOWN_MAX = 40  # characters of a bad value a message shows

_OCTAL_DIGITS = b"01234567"
_OCTAL_TEXT = b"01234567 \x00"
_PAD = b" \x00"
_PAX_MTIME = re.compile(rb"(-?)([0-9]+)(?:\.([0-9]*))?")
DECIMAL = re.compile(rb"[0-9]+")
SCHILY_XATTR = b"SCHILY.xattr."
SPARSE = b"GNU.sparse."  # PAX records of a sparse file (`sparse`)
LIBARCHIVE_XATTR = b"LIBARCHIVE.xattr."
RHT_SELINUX = b"RHT.security.selinux"
SELINUX = b"security.selinux"
GLOBAL_KEYS = frozenset((b"uid", b"gid", b"mtime", b"atime", b"ctime"))
IGNORED_TIMES = (b"atime", b"ctime")  # checked (GNU tar and Go refuse bad ones), not kept
NS = 1_000_000_000


class Member:
    """One archive entry, extensions applied.  `type` is the header's type flag (one byte);
    `path` and `linkpath` are raw bytes as the archive spells them (not cleaned); `xattrs` is
    None or a dict; `offset` is where the member's own header starts (after any extension headers)."""

    __slots__ = ("devmajor", "devminor", "gid", "linkpath", "mode", "mtime", "mtime_nsec", "offset",
                 "path", "size", "type", "uid", "xattrs")

    def __init__(self, offset: int, typeflag: bytes, path: bytes, linkpath: bytes, mode: int, uid: int,
                 gid: int, size: int, mtime: int, devmajor: int, devminor: int) -> None:
        self.offset = offset
        self.type = typeflag
        self.path = path
        self.linkpath = linkpath
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = size
        self.mtime = mtime
        self.mtime_nsec = 0
        self.devmajor = devmajor
        self.devminor = devminor
        self.xattrs: dict[bytes, bytes] | None = None


def header_ok(block: bytes) -> bool:
    """True if `block` starts with a tar header whose checksum is right (for sniffing)."""
    if len(block) < BLOCK:
        return False
    block = block[:BLOCK]
    if block == ZERO_BLOCK:
        return False
    try:
        return _checksum_ok(block, _octal(block[CHKSUM_OFFSET:CHKSUM_OFFSET + 8]))
    except ValueError:
        return False


def _checksum(block: bytes) -> int:
    """The unsigned byte sum with the checksum field counted as eight spaces."""
    field = block[CHKSUM_OFFSET:CHKSUM_OFFSET + 8]
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2 - sum(field) + 256


def _checksum_ok(block: bytes, stored: int) -> bool:
    unsigned = _checksum(block)
    if stored == unsigned:
        return True
    # Some old writers summed signed chars: every byte >= 128 then counts 256 less.
    high = block[:CHKSUM_OFFSET].translate(_HIGH_BITS) + block[CHKSUM_OFFSET + 8:].translate(_HIGH_BITS)
    return stored == unsigned - 256 * high.count(1)


_HIGH_BITS = bytes(1 if b >= 128 else 0 for b in range(256))


def _octal(field: bytes) -> int:
    """ASCII octal, optionally space-padded, ended by NUL, space or the field's end."""
    digits = field.split(b"\x00", 1)[0].strip(b" ")
    if digits.translate(None, _OCTAL_DIGITS):
        raise ValueError(field)
    return int(digits, 8) if digits else 0


def number(field: bytes) -> int:
    """An octal or GNU base-256 numeric field: a first byte 0x80 is a positive number in the
    bytes after it, 0xff a negative one in two's complement over the whole field (GNU tar
    knows no other first byte with the top bit set; neither does this)."""
    first = field[0] if field else 0
    if first & 0x80:
        if first == 0xFF:
            return int.from_bytes(field, "big", signed=True)
        if first != 0x80:
            raise ValueError(field)
        return int.from_bytes(field[1:], "big")
    return _octal(field)


def header_numbers(h: tuple) -> tuple[int, int, int, int, int]:
    """(mode, uid, gid, size, mtime) of an unpacked header, each field octal or base-256: the
    reference for `fast_header_numbers`.  ValueError if one is neither."""
    return number(h[MODE]), number(h[UID]), number(h[GID]), number(h[SIZE]), number(h[MTIME])


def fast_header_numbers(h: tuple) -> tuple[int, int, int, int, int] | None:
    """`header_numbers` for the common header whose mode … chksum bytes are only octal digits,
    spaces and NULs (the caller checked): `int` reads each field once its ends are stripped.
    None when one is not plain digits then (a NUL before the digits ends an octal field
    there, so only spaces are stripped in front): `header_numbers` decides."""
    try:
        return (int(h[MODE].rstrip(_PAD).lstrip(b" "), 8), int(h[UID].rstrip(_PAD).lstrip(b" "), 8),
                int(h[GID].rstrip(_PAD).lstrip(b" "), 8), int(h[SIZE].rstrip(_PAD).lstrip(b" "), 8),
                int(h[MTIME].rstrip(_PAD).lstrip(b" "), 8))
    except ValueError:
        return None


def out_of_range(key: bytes, value: int) -> str | None:
    """Why `value` cannot be the member's `key` (a RANGES key), or None."""
    lo, hi, what = RANGES[key]
    if lo <= value <= hi:
        return None
    return f"{value} is out of range {lo}..{hi} ({what})"


def pax_time(value: bytes) -> tuple[int, int]:
    """A PAX time `[-]SECONDS[.FRACTION]` → (seconds, nanoseconds ≥ 0).  `-1.5` is 1.5 s
    before the epoch: (-2, 500000000).  Digits past the nanosecond round towards minus
    infinity, as GNU tar extracts them: `-1.0000000001` is -1.000000001 s (-2, 999999999).
    OverflowError when the seconds are outside TIME_MIN..TIME_MAX."""
    m = _PAX_MTIME.fullmatch(value)
    if m is None:
        raise ValueError(value)
    sign, sec, frac = m.groups()
    if len(sec.lstrip(b"0")) > DIGITS_MAX:  # before `int`: it refuses 4300 digits and more
        raise OverflowError(value)
    frac = frac or b""
    total = int(sec) * NS + int((frac + b"000000000")[:9])
    if sign:
        total = -total - (1 if frac[9:].strip(b"0") else 0)
    seconds, nanoseconds = divmod(total, NS)
    if not TIME_MIN <= seconds <= TIME_MAX:
        raise OverflowError(value)
    return seconds, nanoseconds


def decimal(value: bytes) -> int:
    """A decimal number of digits only; ValueError if it is none, OverflowError past
    DIGITS_MAX digits (checked before `int`, which refuses 4300 digits and more)."""
    if not DECIMAL.fullmatch(value):
        raise ValueError(value)
    if len(value.lstrip(b"0")) > DIGITS_MAX:
        raise OverflowError(value)
    return int(value)


def pax_number(value: bytes, key: bytes) -> int:
    """A PAX decimal number for `key` (a RANGES key); OverflowError when out of its range."""
    number = decimal(value)
    if out_of_range(key, number):
        raise OverflowError(value)
    return number


def parse_pax(data: bytes) -> list[tuple[bytes, bytes]]:
    """PAX records `LEN KEY=VALUE\n` (LEN counts the whole record), in order."""
    records = []
    pos = 0
    end = len(data)
    while pos < end:
        if data[pos] == 0:  # NUL padding after the last record
            if data.count(0, pos) != end - pos:
                raise ValueError(f"bad PAX record at +{pos}: NUL inside the records")
            break
        space = data.find(b" ", pos, pos + 21)
        length = data[pos:space]
        if space < 0 or not DECIMAL.fullmatch(length):
            raise ValueError(f"bad PAX record at +{pos}: expected 'LENGTH KEY=VALUE\\n'")
        stop = pos + int(length)
        if stop > end or stop <= space + 1 or data[stop - 1] != 0x0A:
            raise ValueError(f"bad PAX record at +{pos}: its length does not end at a newline")
        key, eq, value = data[space + 1:stop - 1].partition(b"=")
        if not eq or not key:
            raise ValueError(f"bad PAX record at +{pos}: expected KEY=VALUE")
        records.append((key, value))
        pos = stop
    return records


def _b64(value: bytes) -> bytes:
    """libarchive's base64, which omits the padding."""
    return binascii.a2b_base64(value + b"=" * (-len(value) % 4), strict_mode=True)


def _is_xattr_key(key: bytes) -> bool:
    return key.startswith(SCHILY_XATTR) or key.startswith(LIBARCHIVE_XATTR) or key == RHT_SELINUX


class TarReader:
    """Members of one tar stream (plain, gzip, zstd or xz; a path, `-` or a binary stream).

    Iterate `members()`; for a member with data, `read(n)` or `chunks(n)` take from it before
    the iteration resumes (what is left is skipped).  `offset` is the decompressed position.
    """

    def __init__(self, source) -> None:
        self.name = source_name(source)
        self._raw = open_binary(source)
        self._owned = self._raw is not source and source != "-"
        self._stream = None
        self._ahead: ReadAhead | None = None  # the decompressing thread
        self._kind: str | None = None  # the compression
        self._failure: BaseException | None = None  # a read error held back (`_next_chunk`)
        self._last: Member | None = None  # the latest entry handed out
        self._ended = False  # the end-of-archive marker was read
        # The decompressed stream is consumed from `_buf`; `_base` is the offset of `_buf[0]`.
        self._buf = b""
        self._pos = 0
        self._base = 0
        self._left = 0  # unread data bytes of the current member
        self._pad = 0  # padding after them
        self._member: Member | None = None
        self._sparse = None  # the current member's `sparse.Sparse`, if it is one
        self.hole_bytes = 0  # sparse holes handed out as zeros so far (`sparse` bounds them)
        self._globals: dict[bytes, bytes] = {}
        self._global_xattrs: dict[bytes, tuple[bytes, int]] = {}

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.stop()  # it closes the input, when its thread no longer reads it
        elif self._owned:
            self._raw.close()

    def __enter__(self) -> TarReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def offset(self) -> int:
        return self._base + self._pos

    @property
    def data_left(self) -> int:
        """What the archive still holds of the current member's data."""
        return self._left

    @property
    def member_end(self) -> int:
        """Where the current member's data (as the archive holds it: a sparse member's map and
        data regions) and its padding end."""
        return self.offset + self._left + self._pad

    # -- errors -----------------------------------------------------------------------------

    def where(self, member: Member | None = None, offset: int | None = None) -> str:
        """`SOURCE: member 'NAME' at byte N` (N: the member's header) or `SOURCE: byte N`."""
        if member is not None:
            return f"{self.name}: member '{shown_name(member.path)}' at byte {member.offset}"
        return f"{self.name}: byte {self.offset if offset is None else offset}"

    def error(self, what: str, member: Member | None = None, offset: int | None = None) -> InputError:
        return InputError(what, self.where(member, offset))

    # -- the byte stream --------------------------------------------------------------------

    def _next_chunk(self) -> bytes:
        """About CHUNK decompressed bytes, b"" at the end.  They are gathered from the
        decompressor's own pieces (`read1`), so when it fails, the data before the failure is
        handed out first and the error comes next, located where the good data ends.  A
        zstd or xz input is decoded in its own thread, ahead (`ReadAhead`)."""
        if self._failure is not None:
            raise self._read_error(self._failure)
        if self._stream is None:
            try:
                self._stream, self._kind = decompressor(self._raw)
            except Exception as e:
                raise self._read_error(e) from None
            if self._kind in AHEAD:
                self._ahead = ReadAhead(self._stream.read1, CHUNK, self._raw.close if self._owned else None)
        if self._ahead is not None:
            chunk, failure = self._ahead.get()
        else:
            chunk, failure = gather(self._stream.read1, CHUNK, GZIP_PIECE if self._kind == "gzip" else None)
        if failure is not None:
            if not chunk:
                raise self._read_error(failure) from None
            self._failure = failure
        return chunk

    def _read_error(self, e: BaseException) -> InputError:
        """The member being read (or the one before), the archive offset where the good data
        ends, and how far the decompressor had read its input."""
        at = self._base + len(self._buf)
        try:
            consumed: int | None = self._raw.tell()
        except (OSError, ValueError, AttributeError):
            consumed = None
        if self._ended:
            context = " after the end-of-archive marker"
        elif self._last is not None:
            context = f" after member '{shown_name(self._last.path)}'"
        else:
            context = " before the first member"
        if self._member is not None:  # `where` names the member's header: say where inside
            context = f" at byte {at} of the archive"
        kind = self._kind
        read = "" if consumed is None else f" ({consumed} compressed bytes read)"
        if kind is None:
            what = f"cannot read the archive{context}: {e}"
        elif isinstance(e, EOFError):
            what = f"truncated: the {kind} data ends inside a {UNITS[kind]}{read}{context}"
        else:
            what = f"cannot decompress ({kind}){context}{read}: {e}"
        return self.error(what, self._member, offset=at)

    def _refill(self) -> bool:
        """Replace the (fully consumed) buffer with the next chunk; False at the end."""
        chunk = self._next_chunk()
        if not chunk:
            return False
        self._base += len(self._buf)
        self._buf = chunk
        self._pos = 0
        return True

    def _take(self, n: int) -> bytes:
        """Up to `n` bytes (fewer only at the end of the input)."""
        buf = self._buf
        pos = self._pos
        end = pos + n
        if end <= len(buf):
            self._pos = end
            return buf[pos:end]
        parts = [buf[pos:]]
        have = len(buf) - pos
        self._pos = len(buf)
        while have < n and self._refill():
            take = min(n - have, len(self._buf))
            parts.append(self._buf[:take] if take < len(self._buf) else self._buf)
            self._pos = take
            have += take
        return b"".join(parts)

    def _skip(self, n: int) -> int:
        """Skip up to `n` bytes; return how many there were."""
        skipped = 0
        while True:
            take = min(n - skipped, len(self._buf) - self._pos)
            self._pos += take
            skipped += take
            if skipped == n or not self._refill():
                return skipped

    # -- member data ------------------------------------------------------------------------

    def read(self, n: int) -> bytes:
        """The next `n` bytes of the current member's data."""
        if self._sparse is not None:
            return b"".join(self.chunks(n))
        if n > self._left:
            raise ValueError("read past the member's data")
        data = self._take(n)
        self._left -= len(data)
        if len(data) < n:
            raise self._truncated()
        return data

    def chunks(self, n: int) -> Iterator[bytes]:
        """The next `n` bytes of the current member's data, in pieces as they come."""
        if self._sparse is not None:
            from cfsc.frontends.tar import sparse

            return sparse.expand(self, self._sparse, n)
        return self.stored_chunks(n)

    def extents(self, n: int) -> Iterator[bytes | int]:
        """`chunks`, but a sparse member's holes come as their lengths (ints), not as zeros."""
        if self._sparse is not None:
            from cfsc.frontends.tar import sparse

            return sparse.expand(self, self._sparse, n, holes=True)
        return self.stored_chunks(n)

    @property
    def has_holes(self) -> bool:
        """Whether the current member is sparse (its holes are best taken by `extents`)."""
        return self._sparse is not None

    def stored_chunks(self, n: int) -> Iterator[bytes]:
        """The next `n` bytes the archive holds for the member (a sparse one's data regions)."""
        if n > self._left:
            raise ValueError("read past the member's data")
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._refill():
                    raise self._truncated()
                avail = len(self._buf)
            take = min(avail, n)
            pos = self._pos
            self._pos = pos + take
            self._left -= take
            n -= take
            yield self._buf if take == len(self._buf) else self._buf[pos:pos + take]

    def _truncated(self) -> InputError:
        m = self._member
        assert m is not None
        return self.error(f"truncated: the archive ends at byte {self.offset}, {self._left} bytes short of the"
                          f" {m.size} bytes of data the header declares", m)

    # -- headers ----------------------------------------------------------------------------

    def _skip_rest(self) -> None:
        """Skip what the consumer left of the current member's data, and the padding."""
        left, pad = self._left, self._pad
        self._left = self._pad = 0
        skipped = self._skip(left + pad)
        if skipped < left:
            self._left = left - skipped
            raise self._truncated()
        if skipped < left + pad:
            raise self.error("truncated: the archive ends inside the padding after the member's data", self._member)

    def _header_block(self, start: int) -> bytes:
        block = self._take(BLOCK)
        if len(block) < BLOCK:
            if block:
                raise self.error(f"truncated: the archive ends inside a header ({len(block)} of 512 bytes)",
                                 offset=start)
            raise self.error("truncated: the archive ends without its end-of-archive marker (a zero block)",
                             offset=start)
        return block

    def _bad_checksum(self, block: bytes, h: tuple, start: int) -> InputError:
        try:
            stored = _octal(h[CHKSUM])
        except ValueError:
            return self.error("not a tar header: the checksum field is not an octal number"
                              " (corrupt, or not a tar archive)", offset=start)
        return self.error(f"bad header checksum (stored {stored}, computed {_checksum(block)}):"
                          " the archive is corrupt", offset=start)

    def _entry(self, h: tuple, octal: bool, start: int) -> Member:
        name = h[NAME].split(b"\x00", 1)[0]
        if h[MAGIC] == POSIX_MAGIC and h[PREFIX][0]:
            name = h[PREFIX].split(b"\x00", 1)[0] + b"/" + name
        numbers = fast_header_numbers(h) if octal else None
        if numbers is None:  # base-256, an empty field, digits after a NUL: the careful way
            try:
                numbers = header_numbers(h)
            except ValueError:
                raise self.error(f"bad header: a numeric field is neither octal nor base-256 ({_fields(h)})",
                                 offset=start) from None
        mode, uid, gid, size, mtime = numbers
        devmajor = devminor = 0
        typeflag = h[TYPEFLAG]
        if typeflag == CHAR or typeflag == BLOCKDEV:
            try:
                devmajor, devminor = number(h[DEVMAJOR]), number(h[DEVMINOR])
            except ValueError:
                raise self.error(f"bad header: a numeric field is neither octal nor base-256 ({_fields(h)})",
                                 offset=start) from None
        m = Member(start, typeflag, name, h[LINKNAME].split(b"\x00", 1)[0], mode & 0o7777, uid, gid, size, mtime,
                   devmajor, devminor)
        if not (mode <= MODE_MAX and uid <= ID_MAX and gid <= ID_MAX and size <= SIZE_MAX
                and TIME_MIN <= mtime <= TIME_MAX and min(mode, uid, gid, size) >= 0):
            for key, value in zip((b"mode", b"uid", b"gid", b"size", b"mtime"), numbers, strict=True):
                problem = out_of_range(key, value)
                if problem:
                    raise self.error(f"bad header: {key.decode()} {problem}", m)
        return m

    def members(self) -> Iterator[Member]:
        pax: dict[bytes, bytes] | None = None
        pax_xattrs: dict[bytes, tuple[bytes, int]] | None = None
        sparse: list[tuple[bytes, bytes]] | None = None  # the member's GNU.sparse.* records, in order
        longname = longlink = None
        pending = -1  # offset of an extension header still waiting for its member
        unpack = HEADER.unpack
        while True:
            if self._left or self._pad:
                self._skip_rest()
            self._member = None
            self._sparse = None
            start = self._base + self._pos
            block = self._buf[self._pos:self._pos + BLOCK]
            if len(block) == BLOCK:
                self._pos += BLOCK
            else:
                block = self._header_block(start)  # across the end of the buffer
            if block == ZERO_BLOCK:
                if pending >= 0:
                    raise self.error("an extended header is not followed by a member", offset=pending)
                self._ended = True
                self._drain()
                return
            h = unpack(block)
            # The fast path: mode … chksum hold only octal digits, spaces and NULs (one C-level
            # check), so `int` reads them; anything else (base-256, empty fields, junk) goes
            # through `number`, which decides.
            octal = not block[100:156].translate(None, _OCTAL_TEXT)
            try:
                stored = int(h[CHKSUM].rstrip(_PAD).lstrip(b" "), 8) if octal else _octal(h[CHKSUM])
            except ValueError:
                try:
                    stored = _octal(h[CHKSUM])
                except ValueError:
                    stored = -1
            if stored < 0 or not _checksum_ok(block, stored):
                raise self._bad_checksum(block, h, start)
            typeflag = h[TYPEFLAG]
            if typeflag in ENTRY_TYPES:
                m = self._member = self._entry(h, octal, start)
                if longname is not None:
                    m.path = longname
                if longlink is not None:
                    m.linkpath = longlink
                if self._globals or self._global_xattrs:
                    self._apply(m, self._globals, self._global_xattrs)
                if pax is not None:
                    self._apply(m, pax, pax_xattrs)
                if typeflag == REGULAR_OLD and m.path.endswith(b"/"):
                    m.type = DIRECTORY
                if sparse is not None:
                    from cfsc.frontends.tar import sparse as sparse_files  # rare: loaded when needed

                    self._left, self._pad = m.size, -m.size % BLOCK  # the map (1.0) and the data regions
                    self._sparse = sparse_files.parse(self, m, sparse)
                elif m.type in DATA_TYPES:
                    self._left = m.size
                    self._pad = -m.size % BLOCK
                else:
                    m.size = 0
                pax = pax_xattrs = sparse = longname = longlink = None
                pending = -1
                self._last = m
                yield m
                continue
            name = h[NAME].split(b"\x00", 1)[0]
            try:
                size = number(h[SIZE])
            except ValueError:
                raise self.error(f"bad header: size {h[SIZE]!r} is neither octal nor base-256", offset=start) from None
            m = self._member = Member(start, typeflag, name, b"", 0, 0, 0, size, 0, 0, 0)
            problem = out_of_range(b"size", size)
            if problem:
                raise self.error(f"bad header: size {problem}", m)
            # Extension headers and the rest.
            if typeflag in UNSUPPORTED:
                raise self.error(UNSUPPORTED[typeflag], m)
            if typeflag == VOLUME_LABEL:
                self._left, self._pad = m.size, -m.size % BLOCK
                continue
            if typeflag not in (PAX, PAX_GLOBAL, GNU_LONGNAME, GNU_LONGLINK):
                raise self.error(f"unknown type flag {typeflag!r}: expected a file, link, directory, device or"
                                 " FIFO (or a GNU/PAX extension header)", m)
            if m.size > EXTENDED_MAX:
                raise self.error(f"extended header of {m.size} bytes: at most {EXTENDED_MAX} are accepted", m)
            self._left, self._pad = m.size, -m.size % BLOCK
            data = self.read(m.size)
            if typeflag == GNU_LONGNAME:
                longname = data.split(b"\x00", 1)[0]
            elif typeflag == GNU_LONGLINK:
                longlink = data.split(b"\x00", 1)[0]
            else:
                try:
                    records = parse_pax(data)
                except ValueError as e:
                    raise self.error(str(e), m) from None
                if typeflag == PAX_GLOBAL:
                    self._add_globals(records, m)
                    continue
                if pax is None:
                    pax = {}
                for key, value in records:
                    if _is_xattr_key(key):
                        if pax_xattrs is None:
                            pax_xattrs = {}
                        self._xattr(pax_xattrs, key, value, m)
                    elif key.startswith(SPARSE):
                        if sparse is None:
                            sparse = []
                        sparse.append((key, value))
                    else:
                        pax[key] = value
            if pending < 0:
                pending = start

    def _add_globals(self, records: list, m: Member) -> None:
        for key, value in records:
            if key in GLOBAL_KEYS:
                self._globals[key] = value
            elif _is_xattr_key(key):
                self._xattr(self._global_xattrs, key, value, m)
            elif key.startswith(SPARSE):
                raise self.error(f"a global PAX header holds {shown_path(key)}: sparse records describe one"
                                 " member's data, never every member's", m)

    def _xattr(self, xattrs: dict, key: bytes, value: bytes, m: Member) -> None:
        """SCHILY (raw value) beats LIBARCHIVE (base64) beats RHT for the same name."""
        if key.startswith(SCHILY_XATTR):
            xattrs[key[len(SCHILY_XATTR):]] = (value, 0)
            return
        if key == RHT_SELINUX:
            name, rank = SELINUX, 2
        else:
            name, rank = unquote_to_bytes(key[len(LIBARCHIVE_XATTR):]), 1
            try:
                value = _b64(value)
            except (binascii.Error, ValueError):
                raise self.error(f"bad PAX record {shown_path(key)}: the value is not base64", m) from None
        old = xattrs.get(name)
        if old is None or old[1] >= rank:
            xattrs[name] = (value, rank)

    def _apply(self, m: Member, pax: dict, xattrs: dict | None) -> None:
        for key, value in pax.items():
            try:
                if key == b"path":
                    m.path = value
                elif key == b"linkpath":
                    m.linkpath = value
                elif key == b"size":
                    m.size = pax_number(value, key)
                elif key == b"uid":
                    m.uid = pax_number(value, key)
                elif key == b"gid":
                    m.gid = pax_number(value, key)
                elif key == b"mtime":
                    m.mtime, m.mtime_nsec = pax_time(value)
                elif key in IGNORED_TIMES:
                    pax_time(value)
            except OverflowError:
                lo, hi, what = RANGES[key]
                raise self.error(f"bad PAX record {shown_path(key)}={shown_value(value)}: out of range {lo}..{hi}"
                                 f" ({what})", m) from None
            except ValueError:
                raise self.error(f"bad PAX record {shown_path(key)}={shown_value(value)}: expected a decimal"
                                 + (" time" if key in RANGES and key.endswith(b"time") else " number"), m) from None
        if xattrs:
            if m.xattrs is None:
                m.xattrs = {}
            for name, (value, _rank) in xattrs.items():
                m.xattrs[name] = value

    def _drain(self) -> None:
        """Read the rest of the input (decompressors verify their trailers on the way)."""
        self._base += len(self._buf)
        self._buf = b""
        self._pos = 0
        while True:
            chunk = self._next_chunk()
            if not chunk:
                return
            self._base += len(chunk)


def shown_name(raw: bytes) -> str:
    """A member's name or link target for a message: whole up to PATH_MAX bytes (a longer one
    is refused anyway), the start and its length beyond."""
    return shown_cut(raw, PATH_MAX, 200)


def shown_value(value: bytes) -> str:
    """A PAX value for a one-line message."""
    return shown_cut(value, SHOWN_MAX)


def _fields(h: tuple) -> str:
    names = ("mode", "uid", "gid", "size", "mtime", "devmajor", "devminor")
    fields = (h[MODE], h[UID], h[GID], h[SIZE], h[MTIME], h[DEVMAJOR], h[DEVMINOR])
    return ", ".join(f"{n}={f!r}" for n, f in zip(names, fields, strict=True))
