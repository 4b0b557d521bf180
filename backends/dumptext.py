"""Escaping in dumpfile text, both ways: what `composefs-info dump` writes and `mkcomposefs
--from-file` reads (format note §7, §11).  The dumpfile backend, the dumpfile frontend, the
dump diff and the listings all use these, so text written is text read.

Writing (C locale): `\\\\`, `\\n`, `\\r`, `\\t`, and other bytes outside 0x21..0x7E as `\\xHH`;
`=` too inside xattrs; a lone `-` as `\\x2d` in PAYLOAD and CONTENT (`-` means absent).
Reading undoes `\\\\`, `\\n`, `\\r`, `\\t` and `\\xHH` (either case); any other backslash
sequence is a `BadEscape`.
"""

from __future__ import annotations

import re
from functools import partial

# Bytes that need escaping: anything but 0x21..0x7E, and the backslash.
_STANDARD = re.compile(rb"[^\x21-\x5b\x5d-\x7e]")
_EQUAL = re.compile(rb"[^\x21-\x3c\x3e-\x5b\x5d-\x7e]")  # also '='
_SPACE_OK = re.compile(rb"[^\x20-\x5b\x5d-\x7e]")  # `ls` prints spaces raw
_TABLE = [b"\\x%02x" % i for i in range(256)]
_SIMPLE = {b"\\": b"\\", b"n": b"\n", b"r": b"\r", b"t": b"\t"}  # escape letter -> byte
for _letter, _byte in _SIMPLE.items():
    _TABLE[_byte[0]] = b"\\" + _letter
_ESCAPE = re.compile(rb"\\(?:x([0-9a-fA-F]{2})|([\\nrt])|(.?.?))", re.DOTALL)


def _repl(m: re.Match) -> bytes:
    return _TABLE[m.group()[0]]


# Partials of the compiled patterns' `sub`: no Python frame per field on the dump's hot path.
escape = partial(_STANDARD.sub, _repl)  # PATH, and a hard link's target
escape_equal = partial(_EQUAL.sub, _repl)  # xattr keys and values
escape_ls = partial(_SPACE_OK.sub, _repl)  # names in listings (`cfsc ls`, `composefs-info ls`)


def escape_optional(data: bytes | None) -> bytes:
    """PAYLOAD / CONTENT: `-` means absent, so a value that is exactly `-` is escaped."""
    if data is None:
        return b"-"
    if data == b"-":
        return b"\\x2d"
    return _STANDARD.sub(_repl, data)


class BadEscape(ValueError):
    """A backslash sequence the format does not have (its text is the argument)."""


def _unescape_repl(m: re.Match) -> bytes:
    if m.group(1) is not None:
        return bytes((int(m.group(1), 16),))
    if m.group(2) is not None:
        return _SIMPLE[m.group(2)]
    raise BadEscape(m.group(0).decode("latin-1"))


def unescape(text: bytes) -> bytes:
    """A dumpfile field without its escapes (`\\\\`, `\\n`, `\\r`, `\\t`, `\\xHH`); BadEscape if bad."""
    return _ESCAPE.sub(_unescape_repl, text) if b"\\" in text else text
