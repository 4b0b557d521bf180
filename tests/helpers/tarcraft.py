"""Tar archives built byte by byte for tests: any header field, any order, any damage.

`member` writes one entry (with a PAX `x` header when given records), `archive` joins members
and adds the end-of-archive blocks, and `from_entries` writes a `dirtrees` spec as a PAX
archive, so that `dirtrees.dumpfile` of the same spec states the tree it must compile to.
"""

from __future__ import annotations

from tests.helpers.dirtrees import Entry, order

BLOCK = 512
TYPES = {"reg": b"0", "dir": b"5", "symlink": b"2", "chr": b"3", "blk": b"4", "fifo": b"6"}
FIELDS = (("name", 100), ("mode", 8), ("uid", 8), ("gid", 8), ("size", 12), ("mtime", 12), ("chksum", 8),
          ("typeflag", 1), ("linkname", 100), ("magic", 6), ("version", 2), ("uname", 32), ("gname", 32),
          ("devmajor", 8), ("devminor", 8), ("prefix", 155), ("pad", 12))


def octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def base256(value: int, width: int) -> bytes:
    """GNU base-256: 0x80 and a big-endian number (0xff and two's complement when negative)."""
    if value >= 0:
        return b"\x80" + value.to_bytes(width - 1, "big")
    return value.to_bytes(width, "big", signed=True)


def header(name: bytes, typeflag: bytes = b"0", *, size: int = 0, mode: int = 0o644, uid: int = 0, gid: int = 0,
           mtime: int = 1_700_000_000, linkname: bytes = b"", devmajor: int = 0, devminor: int = 0,
           magic: bytes = b"ustar\0", version: bytes = b"00", prefix: bytes = b"", raw: dict | None = None,
           checksum: int | None = None) -> bytes:
    """One header block; `raw` overrides fields with exact bytes, `checksum` forces a value."""
    values = {"name": name, "mode": octal(mode, 8), "uid": octal(uid, 8), "gid": octal(gid, 8),
              "size": octal(size, 12), "mtime": octal(mtime, 12), "chksum": b" " * 8, "typeflag": typeflag,
              "linkname": linkname, "magic": magic, "version": version, "uname": b"root", "gname": b"root",
              "devmajor": octal(devmajor, 8), "devminor": octal(devminor, 8), "prefix": prefix, "pad": b""}
    values.update(raw or {})
    block = b"".join(values[f][:w].ljust(w, b"\0") for f, w in FIELDS)
    assert len(block) == BLOCK
    if "chksum" not in (raw or {}):
        total = sum(block) if checksum is None else checksum
        block = block[:148] + b"%06o\0 " % total + block[156:]
    return block


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def pax_records(records) -> bytes:
    """`LEN KEY=VALUE\\n` records; LEN counts itself."""
    out = []
    for key, value in (records.items() if isinstance(records, dict) else records):
        body = b" %s=%s\n" % (key, value)
        n = len(body) + 1
        while len(b"%d" % n) + len(body) != n:
            n += 1
        out.append(b"%d" % n + body)
    return b"".join(out)


def member(name: bytes, data: bytes = b"", typeflag: bytes = b"0", *, pax=None, size: int | None = None,
           **fields) -> bytes:
    """A header (preceded by a PAX `x` header if `pax` records are given) and its padded data."""
    out = b""
    if pax:
        body = pax_records(pax)
        out += header(b"PaxHeaders/" + name[-80:], b"x", size=len(body)) + padded(body)
    return out + header(name, typeflag, size=len(data) if size is None else size, **fields) + padded(data)


def gnu_long(kind: bytes, value: bytes) -> bytes:
    """A GNU `L` (long name) or `K` (long link) record for the next member."""
    data = value + b"\0"
    return header(b"././@LongLink", kind, size=len(data), magic=b"ustar ", version=b" \0") + padded(data)


def archive(*parts: bytes, end: int = 2) -> bytes:
    return b"".join(parts) + bytes(BLOCK * end)


def pax_time(sec: int, nsec: int) -> bytes:
    total = sec * 1_000_000_000 + nsec
    sign = b"-" if total < 0 else b""
    return sign + b"%d.%09d" % divmod(abs(total), 1_000_000_000)


def from_entries(entries: list[Entry], prefix: bytes = b"./") -> bytes:
    """A PAX archive of a `dirtrees` spec: parents first, hard links after their targets,
    nanosecond mtimes and xattrs in PAX records."""
    parts = []
    for e in sorted(order(entries), key=lambda e: e.link is not None):
        name = prefix + e.path + (b"/" if e.kind == "dir" and e.path else b"")
        if not e.path:
            name = prefix or b"./"
        if e.link is not None:
            parts.append(member(name, b"", b"1", linkname=prefix + e.link))
            continue
        records = [(b"mtime", pax_time(*e.mtime))]
        records += [(b"SCHILY.xattr." + k, v) for k, v in sorted(e.xattrs.items())]
        if len(name) > 99:
            records.append((b"path", name))
        link = b""
        data = b""
        if e.kind == "symlink":
            link = e.data
            if len(link) > 99:
                records.append((b"linkpath", link))
        elif e.kind == "reg":
            data = e.data
        major, minor = e.rdev
        parts.append(member(name[:99], data, TYPES[e.kind], pax=records, mode=e.mode, uid=e.uid, gid=e.gid,
                            mtime=max(e.mtime[0], 0), linkname=link[:99], devmajor=major, devminor=minor))
    return archive(*parts)
