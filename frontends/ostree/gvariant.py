"""A strict GVariant codec for the serialised objects OSTree keeps (commit, dirtree, dirmeta,
file headers; inputs.md §3.2–3.4).

GLib's own reader is lenient: malformed data reads as default values.  Here every value must
be in *normal form* — the one encoding GLib's writer produces — or decoding fails with a
`GVariantError` that says which member (`files[3].name`), at which byte offset, broke which
rule.  The checks (GVariant specification, "Serialisation" and "Normal form"):

* framing offsets are little-endian, their width fixed by the container's size (1 byte up
  to 0xff, 2 up to 0xffff, 4, 8); every offset in range, none going backwards, and the
  last member (or element) ending exactly where the offset table starts;
* padding before an aligned member is zero bytes, and so is a fixed-size tuple's tail;
* fixed-size values have exactly their size; booleans are 0 or 1; strings are UTF-8 with
  one NUL, at their end; object paths and signatures follow their grammar;
* a variant's type string is one complete type, its value normal too (nesting is capped as
  GLib caps it); a maybe holding a variable-size value ends in one zero byte.

Types are declared with GVariant type strings, optionally with member names for messages:
`(files: a(name: s, checksum: ay), dirs: a(name: s, tree: ay, meta: ay))` is the dirtree's
`(a(say)a(sayay))`.  Decoded values: integers, floats, bools, `bytes` for strings and byte
arrays (names stay bytes end to end), lists for arrays, tuples for tuples and dict entries,
None or the value for maybes (so `mmT` cannot tell Just Nothing from Nothing: OSTree never
nests maybes), `Variant` for variants.  The encoder is the exact inverse (OSTree checksums
its file headers in serialised form, so `--verify` must build them byte for byte).

Byte order is GVariant's little-endian; OSTree's own big-endian fields are the caller's
business.
"""

from __future__ import annotations

import functools
import re
import struct
from typing import Any, NamedTuple

MAX_DEPTH = 64  # container nesting (all kinds, across variants), as GLib's G_VARIANT_MAX_RECURSION_DEPTH bounds it (128)
_OFFSET_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
_BASIC = {  # type char -> struct code (little-endian), alignment = size
    "y": "B", "b": "B", "n": "h", "q": "H", "i": "i", "u": "I", "h": "i", "x": "q", "t": "Q", "d": "d",
}
_OBJECT_PATH = re.compile(rb"/|(/[A-Za-z0-9_]+)+")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


class GVariantError(ValueError):
    """Data that is not a normal-form serialisation of the expected type."""

    def __init__(self, what: str, offset: int) -> None:
        super().__init__(what)
        self.what = what
        self.offset = offset
        self.path: list[str] = []  # member names / [indices], outermost first

    def where(self) -> str:
        path = "".join(self.path).lstrip(".")
        return f"{path} at byte {self.offset:#x}" if path else f"byte {self.offset:#x}"

    def __str__(self) -> str:
        return f"{self.where()}: {self.what}"


class Variant(NamedTuple):
    """A `v` value: its type string and its decoded value."""

    type: str
    value: Any


def offset_size(n: int) -> int:
    """Width of the framing offsets of a container of `n` bytes (offsets included)."""
    if n > 0xFFFFFFFF:
        return 8
    if n > 0xFFFF:
        return 4
    if n > 0xFF:
        return 2
    return 1 if n else 0


def _framed_size(body: int, count: int) -> int:
    """The width of `count` offsets after `body` bytes: the smallest that can address the total."""
    for width, limit in ((1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF)):
        if body + width * count <= limit:
            return width
    return 8


def _zero(buf: bytes, start: int, end: int) -> bool:
    return start == end or buf.count(0, start, end) == end - start


class _Type:
    """One node of a parsed type.  `size` is None for variable-size types."""

    __slots__ = ("align", "sig", "size")

    def decode(self, buf: bytes, start: int, end: int, depth: int) -> Any:
        raise NotImplementedError

    def encode(self, value: Any) -> bytes:
        raise NotImplementedError


class _Fixed(_Type):
    __slots__ = ("packer",)

    def __init__(self, char: str) -> None:
        self.sig = char
        self.packer = struct.Struct("<" + _BASIC[char])
        self.size = self.align = self.packer.size

    def decode(self, buf, start, end, depth):
        if end - start != self.size:
            raise GVariantError(f"{end - start} bytes for a {self.sig!r}: expected {self.size}", start)
        value = self.packer.unpack_from(buf, start)[0]
        if self.sig == "b":
            if value > 1:
                raise GVariantError(f"boolean byte {value}: expected 0 or 1", start)
            return bool(value)
        return value

    def encode(self, value):
        return self.packer.pack(value)


class _String(_Type):
    """`s`, `o`, `g`: UTF-8 text with one terminating NUL; the value is the text as bytes."""

    def __init__(self, char: str) -> None:
        self.sig = char
        self.size = None
        self.align = 1

    def decode(self, buf, start, end, depth):
        if end <= start or buf[end - 1] != 0:
            raise GVariantError("string without its terminating NUL", start)
        if buf.find(0, start, end - 1) >= 0:
            raise GVariantError("NUL inside a string", buf.find(0, start, end - 1))
        text = buf[start:end - 1]
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GVariantError(f"string is not UTF-8 ({e.reason})", start + e.start) from None
        if self.sig == "o" and not _OBJECT_PATH.fullmatch(text):
            raise GVariantError("not a D-Bus object path", start)
        if self.sig == "g" and not _is_signature(text):
            raise GVariantError("not a D-Bus type signature", start)
        return text

    def encode(self, value):
        if isinstance(value, str):
            value = value.encode()
        return bytes(value) + b"\0"


class _Array(_Type):
    __slots__ = ("elem", "fixed_struct")

    def __init__(self, elem: _Type) -> None:
        self.elem = elem
        self.sig = "a" + elem.sig
        self.size = None
        self.align = elem.align
        basic = _BASIC.get(elem.sig)
        # Arrays of fixed numbers unpack in one call (booleans need their 0/1 check).
        self.fixed_struct = basic if basic and elem.sig not in ("y", "b") else None

    def decode(self, buf, start, end, depth):
        elem = self.elem
        n = end - start
        if elem.sig == "y":
            return buf[start:end]
        if depth >= MAX_DEPTH:  # every container counts: arrays in variants in arrays … recurse
            raise GVariantError("nested too deeply", start)
        depth += 1
        size = elem.size
        if size is not None:
            if n % size:
                raise GVariantError(f"{n} bytes: not a whole number of {size}-byte elements", start)
            if self.fixed_struct is not None:
                return list(struct.unpack_from(f"<{n // size}{self.fixed_struct}", buf, start))
            return [self._child(i, buf, start + i * size, start + (i + 1) * size, depth) for i in range(n // size)]
        if n == 0:
            return []
        width = offset_size(n)
        last = int.from_bytes(buf[end - width:end], "little")
        table = n - last
        if last > n or table <= 0 or table % width:
            raise GVariantError(f"array offset table: last element ends at {last} of {n} bytes", end - width)
        ends = struct.unpack_from(f"<{table // width}{_OFFSET_CODES[width]}", buf, start + last)
        mask = elem.align - 1
        decode_elem = elem.decode
        out = []
        pos = 0
        for i, off in enumerate(ends):
            begin = (pos + mask) & ~mask
            if off < begin or off > last:
                raise GVariantError(f"array element {i} ends at {off}, outside {begin}..{last}", start + last + i * width)
            if begin != pos and not _zero(buf, start + pos, start + begin):
                raise GVariantError("non-zero padding", start + pos)
            try:
                out.append(decode_elem(buf, start + begin, start + off, depth))
            except GVariantError as e:
                e.path.insert(0, f"[{i}]")
                raise
            pos = off
        return out

    def _child(self, i, buf, start, end, depth):
        try:
            return self.elem.decode(buf, start, end, depth)
        except GVariantError as e:
            e.path.insert(0, f"[{i}]")
            raise

    def encode(self, value):
        elem = self.elem
        if elem.sig == "y":
            return bytes(value)
        if elem.size is not None:
            return b"".join(elem.encode(v) for v in value)
        out = bytearray()
        ends = []
        mask = elem.align - 1
        for v in value:
            out += bytes(-len(out) & mask)
            out += elem.encode(v)
            ends.append(len(out))
        if not ends:
            return b""
        width = _framed_size(len(out), len(ends))
        out += struct.pack(f"<{len(ends)}{_OFFSET_CODES[width]}", *ends)
        return bytes(out)


class _Tuple(_Type):
    """A tuple or dict entry: members in order, end offsets of the non-last variable ones
    stored at the end in reverse member order."""

    __slots__ = ("framed", "labels", "members", "plan")

    def __init__(self, members: list[_Type], names: list[str | None], entry: bool = False) -> None:
        self.members = members
        self.labels = [f".{name}" if name else f"[{i}]" for i, name in enumerate(names)]
        inner = "".join(m.sig for m in members)
        self.sig = "{" + inner + "}" if entry else "(" + inner + ")"
        self.align = max((m.align for m in members), default=1)
        # non-last variable members: their end offsets are in the table
        self.framed = sum(1 for m in members[:-1] if m.size is None)
        if all(m.size is not None for m in members):
            pos = 0
            for m in members:
                pos = ((pos + m.align - 1) & ~(m.align - 1)) + m.size
            self.size = max(1, (pos + self.align - 1) & ~(self.align - 1))  # () is one zero byte
        else:
            self.size = None
        # Per member: alignment mask, fixed size, which offset of the table ends it (0: the
        # member is fixed-size or last), its decoder, its label.
        plan = []
        k = 0
        for i, m in enumerate(members):
            if m.size is None and i != len(members) - 1:
                k += 1
                plan.append((m.align - 1, None, k, m.decode, self.labels[i]))
            else:
                plan.append((m.align - 1, m.size, 0, m.decode, self.labels[i]))
        self.plan = plan

    def decode(self, buf, start, end, depth):
        if depth >= MAX_DEPTH:
            raise GVariantError("nested too deeply", start)
        n = end - start
        fixed = self.size is not None
        if fixed:
            if n != self.size:
                raise GVariantError(f"{n} bytes for a fixed-size {self.sig}: expected {self.size}", start)
            width = 0
            table = n
        else:
            width = offset_size(n)
            table = n - width * self.framed
            if table < 0 or (self.framed and not width):  # (0 bytes: no room for the offsets either)
                raise GVariantError(f"{n} bytes cannot hold the offset table of a {self.sig}", start)
        out = []
        pos = 0
        depth += 1
        for mask, size, k, decode_member, label in self.plan:
            begin = (pos + mask) & ~mask
            if size is not None:
                stop = begin + size
            elif k:
                stop = int.from_bytes(buf[end - k * width:end - (k - 1) * width], "little")
            else:
                stop = table
            if begin > stop or stop > table:
                raise GVariantError(f"member {label.lstrip('.')} spans {begin}..{stop}, outside the"
                                    f" {table} bytes before the offset table", start + min(begin, table))
            if begin != pos and not _zero(buf, start + pos, start + begin):
                raise GVariantError("non-zero padding", start + pos)
            try:
                out.append(decode_member(buf, start + begin, start + stop, depth))
            except GVariantError as e:
                e.path.insert(0, label)
                raise
            pos = stop
        if not self.members:
            if buf[start] != 0:
                raise GVariantError("the unit value () is one zero byte", start)
        elif pos != table:
            if not fixed:
                raise GVariantError(f"{table - pos} stray bytes after the last member", start + pos)
            if not _zero(buf, start + pos, end):
                raise GVariantError("non-zero padding", start + pos)
        return tuple(out)

    def encode(self, value):
        members = self.members
        if len(value) != len(members):
            raise ValueError(f"{self.sig} needs {len(members)} members, got {len(value)}")
        if not members:
            return b"\0"
        out = bytearray()
        ends = []
        last = len(members) - 1
        for i, (m, v) in enumerate(zip(members, value, strict=True)):
            out += bytes(-len(out) & (m.align - 1))
            out += m.encode(v)
            if m.size is None and i != last:
                ends.append(len(out))
        if self.size is not None:
            out += bytes(self.size - len(out))
        elif ends:
            width = _framed_size(len(out), len(ends))
            out += struct.pack(f"<{len(ends)}{_OFFSET_CODES[width]}", *reversed(ends))
        return bytes(out)


class _Maybe(_Type):
    __slots__ = ("elem",)

    def __init__(self, elem: _Type) -> None:
        self.elem = elem
        self.sig = "m" + elem.sig
        self.size = None
        self.align = elem.align

    def decode(self, buf, start, end, depth):
        if end == start:
            return None
        if depth >= MAX_DEPTH:
            raise GVariantError("nested too deeply", start)
        elem = self.elem
        if elem.size is not None:
            if end - start != elem.size:
                raise GVariantError(f"{end - start} bytes for {self.sig}: expected 0 or {elem.size}", start)
            return elem.decode(buf, start, end, depth + 1)
        if buf[end - 1] != 0:
            raise GVariantError("a maybe's value must be followed by one zero byte", end - 1)
        return elem.decode(buf, start, end - 1, depth + 1)

    def encode(self, value):
        if value is None:
            return b""
        data = self.elem.encode(value)
        return data if self.elem.size is not None else data + b"\0"


class _VariantType(_Type):
    def __init__(self) -> None:
        self.sig = "v"
        self.size = None
        self.align = 8

    def decode(self, buf, start, end, depth):
        if depth >= MAX_DEPTH:
            raise GVariantError("nested too deeply", start)
        sep = buf.rfind(0, start, end)
        if sep < 0:
            raise GVariantError("variant without the zero byte before its type", start)
        try:
            sig = buf[sep + 1:end].decode("ascii")
            inner = _plain(sig)
        except (UnicodeDecodeError, ValueError):
            raise GVariantError(f"variant type {buf[sep + 1:end]!r} is not one complete type", sep + 1) from None
        try:
            value = inner.decode(buf, start, sep, depth + 1)
        except GVariantError as e:
            e.path.insert(0, f"<{sig}>")
            raise
        return Variant(sig, value)

    def encode(self, value):
        return _plain(value.type).encode(value.value) + b"\0" + value.type.encode("ascii")


# -- type strings ---------------------------------------------------------------------------


def _is_signature(text: bytes) -> bool:
    try:
        sig = text.decode("ascii")
        i = 0
        while i < len(sig):
            i = _Parser(sig, i, labels=False).skip()
        return True
    except (UnicodeDecodeError, ValueError):
        return False


class _Parser:
    """Recursive descent over a type string: plain (from data), or with `name:` labels, spaces
    and commas in tuples (declarations)."""

    def __init__(self, text: str, pos: int = 0, labels: bool = True) -> None:
        self.text = text
        self.pos = pos
        self.labels = labels

    def skip(self) -> int:
        self.one(0)
        return self.pos

    def _space(self) -> None:
        while self.labels and self.pos < len(self.text) and self.text[self.pos] in " \t\n,":
            self.pos += 1

    def one(self, depth: int) -> _Type:
        if depth > MAX_DEPTH:
            raise ValueError("type nested too deeply")
        self._space()
        if self.pos >= len(self.text):
            raise ValueError(f"type string {self.text!r} ends early")
        c = self.text[self.pos]
        self.pos += 1
        if c in _BASIC:
            return _Fixed(c)
        if c in "sog":
            return _String(c)
        if c == "v":
            return _VariantType()
        if c == "a":
            return _Array(self.one(depth + 1))
        if c == "m":
            return _Maybe(self.one(depth + 1))
        if c in "({":
            close = ")" if c == "(" else "}"
            members: list[_Type] = []
            names: list[str | None] = []
            while True:
                self._space()
                if self.pos >= len(self.text):
                    raise ValueError(f"type string {self.text!r}: unclosed {c}")
                if self.text[self.pos] == close:
                    self.pos += 1
                    break
                label = _NAME.match(self.text, self.pos) if self.labels else None
                name = None
                if label and self.text.startswith(":", label.end()):
                    name = label.group()
                    self.pos = label.end() + 1
                members.append(self.one(depth + 1))
                names.append(name)
            if c == "{" and (len(members) != 2 or members[0].sig not in _BASIC.keys() | set("sog")):
                raise ValueError(f"dict entry {{{''.join(m.sig for m in members)}}}: expected a basic key and a value")
            return _Tuple(members, names, entry=c == "{")
        raise ValueError(f"type string {self.text!r}: unexpected {c!r}")


@functools.lru_cache(maxsize=256)
def parse(text: str) -> _Type:
    """The type a declaration (one complete type; labels, spaces and commas allowed) names."""
    return _parse(text, True)


@functools.lru_cache(maxsize=256)
def _plain(text: str) -> _Type:
    """The type a type string found in data names (GVariant's grammar only)."""
    return _parse(text, False)


def _parse(text: str, labels: bool) -> _Type:
    parser = _Parser(text, 0, labels)
    node = parser.one(0)
    parser._space()
    if parser.pos != len(text):
        raise ValueError(f"type string {text!r}: {text[parser.pos:]!r} after one complete type")
    return node


def decode(type_: str | _Type, data: bytes) -> Any:
    """Decode normal-form `data` as `type_`; GVariantError says where it is not."""
    node = parse(type_) if isinstance(type_, str) else type_
    return node.decode(bytes(data), 0, len(data), 0)


def encode(type_: str | _Type, value: Any) -> bytes:
    """The normal-form serialisation of `value` as `type_` (what GLib writes)."""
    node = parse(type_) if isinstance(type_, str) else type_
    return node.encode(value)
