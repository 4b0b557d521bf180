"""GNU tar's PAX sparse files, read as Go's archive/tar reads them (and so umoci and
containers/storage extract them): the archive holds a file's data regions only, and a map.

Formats (GNU tar `--sparse --format=posix --sparse-version=…`): 0.0 (`GNU.sparse.offset` and
`GNU.sparse.numbytes` records, alternating), 0.1 (`GNU.sparse.map`, a comma list, with
`GNU.sparse.numblocks` regions) and 1.0 (`GNU.sparse.major=1`, `minor=0`: the map as decimal
lines — the number of regions, then each one's offset and length — padded to whole blocks at
the start of the member's data).  `GNU.sparse.name` is the member's name, `GNU.sparse.size`
(0.x) or `realsize` (1.0) the file's size.  The regions must be in order, inside the file, and
hold exactly the member's data; any other version is refused (Go would extract the raw data as
the file).

Holes stay holes where the reader's consumer takes them (`expand` with `holes`: a run's length,
for hole-aware hashing and a sparse store object), so a terabyte of holes costs microseconds.
Holes handed out as zeros cost what data costs but no room in the archive, so those are bounded
over the archive like a decompression ratio, about what gzip gives for zeros: 1 KB of archive
turned into 2^53 zero bytes is a bomb, not a file.
"""

from __future__ import annotations

from collections.abc import Iterator

from cfsc.base.errors import shown_path
from cfsc.frontends.tar.stream import (
    BLOCK,
    CHUNK,
    DATA_TYPES,
    EXTENDED_MAX,
    SIZE_MAX,
    Member,
    decimal,
    pax_number,
    shown_value,
)

REGIONS_MAX = 1 << 20  # data regions of one sparse file (its map is held in memory)
HOLES_FREE = 1 << 30
HOLES_PER_BYTE = 1024
ZEROS = bytes(CHUNK)  # a hole is handed out as slices of this


class Sparse:
    """A sparse member being read: its data regions (offset, length) in the file, the next
    one, and the bytes of the file (holes included) not yet handed out."""

    __slots__ = ("left", "member", "next", "regions", "size")

    def __init__(self, regions: list[tuple[int, int]], member: Member) -> None:
        self.regions = regions
        self.member = member
        self.next = 0
        self.size = member.size
        self.left = member.size


def parse(reader, m: Member, records: list[tuple[bytes, bytes]]) -> Sparse:
    """The sparse member `m` whose PAX records `records` (the GNU.sparse.* ones, in order)
    describe it; `reader` (a TarReader) stands at its data, whose size the header declared.
    Sets `m.path` and `m.size` to the file's; reads a 1.0 map from the data."""
    if m.type not in DATA_TYPES:
        raise reader.error("PAX GNU.sparse.* records on a member that is not a regular file", m)
    keys: dict[bytes, bytes] = {}
    pairs: list[bytes] = []  # 0.0: offset, numbytes, offset, … in record order
    for key, value in records:
        if key == b"GNU.sparse.offset" or key == b"GNU.sparse.numbytes":
            if (key == b"GNU.sparse.offset") != (len(pairs) % 2 == 0):
                raise reader.error(f"bad PAX record {shown_path(key)}: GNU.sparse.offset and numbytes must"
                                   " alternate, offset first (sparse format 0.0)", m)
            pairs.append(value)
        else:
            keys[key] = value
    version = keys.get(b"GNU.sparse.major"), keys.get(b"GNU.sparse.minor")
    if version == (b"1", b"0"):
        numbers = _map_1_0(reader, m)
    elif version not in ((None, None), (b"0", b"0"), (b"0", b"1")):
        raise reader.error(f"GNU sparse format {shown_value(version[0] or b'?')}.{shown_value(version[1] or b'?')}"
                           " is not supported: expected 0.0, 0.1 or 1.0", m)
    elif pairs or b"GNU.sparse.map" in keys:
        # Go's reader joins 0.0's offset/numbytes pairs into the map, over a map record
        if pairs:
            if len(pairs) % 2:
                raise reader.error("bad PAX records: a GNU.sparse.offset without its GNU.sparse.numbytes", m)
            numbers = pairs
        else:
            text = keys[b"GNU.sparse.map"]
            numbers = text.split(b",") if text else []
        if len(numbers) > 2 * REGIONS_MAX:  # (1.0's map is held to it as it is read)
            raise reader.error(f"a sparse map of {len(numbers) // 2} regions: at most {REGIONS_MAX} are accepted", m)
        count = keys.get(b"GNU.sparse.numblocks")
        try:
            listed = decimal(count) if count is not None else -1
        except (ValueError, OverflowError):
            listed = -1
        if listed * 2 != len(numbers):
            raise reader.error(f"bad PAX record GNU.sparse.numblocks={shown_value(count or b'')}: expected the"
                               f" number of regions the map lists ({len(numbers) // 2})", m)
    else:
        raise reader.error("PAX GNU.sparse.* records without a sparse map (expected GNU.sparse.map,"
                           " GNU.sparse.offset/numbytes, or major=1 and minor=0)", m)
    name = keys.get(b"GNU.sparse.name")
    if name:
        m.path = name
    size_key = b"GNU.sparse.size" if b"GNU.sparse.size" in keys else b"GNU.sparse.realsize"
    size = keys.get(size_key)
    if size is not None:
        try:
            m.size = pax_number(size, b"size")
        except (ValueError, OverflowError):
            raise reader.error(f"bad PAX record {size_key.decode()}={shown_value(size)}: expected a decimal number"
                               f" from 0 to {SIZE_MAX}", m) from None
    regions = []
    end = data = 0
    for i in range(0, len(numbers), 2):
        try:
            offset, length = pax_number(numbers[i], b"size"), pax_number(numbers[i + 1], b"size")
        except (ValueError, OverflowError):
            raise reader.error(f"bad sparse map: region {i // 2} is {shown_value(numbers[i])},"
                               f"{shown_value(numbers[i + 1])}, expected decimal OFFSET,LENGTH", m) from None
        if offset < end or offset + length > m.size:
            raise reader.error(f"bad sparse map: region {i // 2} ({offset}+{length}) overlaps the one before or"
                               f" ends past the file's {m.size} bytes", m)
        end = offset + length
        data += length
        if length:
            regions.append((offset, length))
    if data != reader.data_left:
        raise reader.error(f"bad sparse map: its regions hold {data} bytes, the member's data is"
                           f" {reader.data_left}", m)
    return Sparse(regions, m)


def _map_1_0(reader, m: Member) -> list[bytes]:
    """The map at the start of a 1.0 member's data (its blocks are read)."""
    numbers: list[bytes] = []
    want = -1
    rest = b""
    read = 0
    while want < 0 or len(numbers) < want:
        if read >= EXTENDED_MAX or reader.data_left < BLOCK:
            raise reader.error("bad sparse map (format 1.0): it does not end within the member's data"
                               f" (or within {EXTENDED_MAX} bytes)", m)
        *lines, rest = (rest + reader.read(BLOCK)).split(b"\n")
        read += BLOCK
        for line in lines:
            try:
                number = decimal(line)
            except (ValueError, OverflowError):
                raise reader.error(f"bad sparse map (format 1.0): {shown_value(line)} is not a decimal number",
                                   m) from None
            if want < 0:
                want = 2 * number
                if want > 2 * REGIONS_MAX:
                    raise reader.error(f"a sparse map of {want // 2} regions: at most {REGIONS_MAX} are accepted", m)
            elif len(numbers) < want:
                numbers.append(line)
    return numbers


def expand(reader, sparse: Sparse, n: int, holes: bool = False) -> Iterator[bytes | int]:
    """The next `n` bytes of the file: the archive's bytes (the reader's `stored_chunks`) for
    the data regions; for the holes, zeros or (`holes`) each run's length, an int."""
    if n > sparse.left:
        raise ValueError("read past the member's data")
    regions = sparse.regions
    size = sparse.size
    while n:
        at = size - sparse.left  # the file offset of the next byte
        i = sparse.next
        offset, length = regions[i] if i < len(regions) else (size, 0)
        if at < offset:  # in a hole
            if holes:
                take = min(offset - at, n)
            else:
                take = min(offset - at, n, CHUNK)
                _count_zeros(reader, sparse, take)
            sparse.left -= take
            n -= take
            yield take if holes else ZEROS if take == CHUNK else ZEROS[:take]
            continue
        take = min(offset + length - at, n)
        for piece in reader.stored_chunks(take):
            sparse.left -= len(piece)
            yield piece
        n -= take
        if at + take == offset + length:
            sparse.next = i + 1


def _count_zeros(reader, sparse: Sparse, n: int) -> None:
    """Bound the zeros handed out for holes over the whole archive (`reader.hole_bytes`)."""
    reader.hole_bytes += n
    allowed = HOLES_FREE + HOLES_PER_BYTE * reader.offset
    if reader.hole_bytes > allowed:
        raise reader.error(f"sparse holes read as {reader.hole_bytes} zero bytes so far: refused as a bomb (at"
                           f" most {HOLES_FREE >> 30} GiB plus {HOLES_PER_BYTE} per byte of the archive read,"
                           f" {allowed} here)", sparse.member)
