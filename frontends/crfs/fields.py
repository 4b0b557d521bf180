"""Reading one CRFS TOC entry's values: what `toc` (the reference path, `_Builder.apply`) and
`columns` (its column-wise fast path) both need, so the two check values by the same rules.

`_Bad` is one entry's problem (keys below the entry, what was expected); the builder turns it
into a `FILE: entries[N].KEY: …` line.  Names keep their leading underscore: they are the
frontend's own, shared only within `cfsc.frontends.crfs`.
"""

from __future__ import annotations

import binascii
import re

from cfsc.backends.crfs_format import twin

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
S64 = 1 << 63
ABSENT = object()  # "no such key" (JSON null is None, which is an error for every known key)


# Keys read by the code (checked as read); other keys are ignored, except unknown `x-` ones.
READ = frozenset({"type", "name", "linkName", "size", "modtime", "x-mtime", "mode", "uid", "gid",
                  "devMajor", "devMinor", "xattrs", "digest", "chunkOffset", "chunkSize",
                  "x-payload", "x-content", "x-fsverity-digest", "x-nlink"})
TWINS = frozenset({twin("name"), twin("linkName"), twin("x-payload"), twin("xattrs")})
RARE = frozenset({"x-payload", "x-content", "x-fsverity-digest", "x-mtime", "x-nlink", "chunkOffset", "chunkSize"})

_DIGEST = re.compile(r"[a-z0-9]+:([0-9a-f]{2,})")
_FSVERITY = re.compile(r"sha256:([0-9a-f]{64})|sha512:([0-9a-f]{128})")  # SHA-512: cfsc's extension


class _Bad(Exception):
    """One entry is wrong: `path` (keys below the entry) and what was expected."""

    def __init__(self, path: str | list, what: str) -> None:
        super().__init__(what)
        self.path = [path] if isinstance(path, str) else path
        self.what = what


def _b64(text, path) -> bytes:
    """Strict standard base64, padding optional (the schema's `base64`)."""
    if type(text) is not str:
        raise _Bad(path, "expected a base64 string")
    if len(text) & 3:
        if text.endswith("="):
            raise _Bad(path, "invalid base64: wrong padding")
        text += "=" * (-len(text) & 3)
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError) as e:
        raise _Bad(path, f"invalid base64: {e}") from None


def _int(value, path, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _Bad(path, f"expected an integer from {lo} to {hi}")
    return value


def _text(entry: dict, key: str, twins: bool):
    """The bytes under `key`, from its base64 twin if there is one (`cfsc.base.jsonbytes` rule)."""
    if twins:
        encoded = entry.get(twin(key), ABSENT)
        if encoded is not ABSENT:
            stand_in = entry.get(key, ABSENT)
            if stand_in is ABSENT:
                raise _Bad(key, f"missing: required with {twin(key)} (a readable stand-in)")
            if type(stand_in) is not str:  # unread, but the schema types it: so does the code
                raise _Bad(key, "expected a string")
            return _b64(encoded, twin(key))
    value = entry.get(key, ABSENT)
    if value is ABSENT:
        return ABSENT
    if type(value) is not str:
        raise _Bad(key, "expected a string")
    return value.encode("utf-8", "surrogateescape")


def _clean(raw: bytes, key: str) -> bytes:
    """A path relative to the root: no empty or `.` components; `..` is an error."""
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise _Bad(key, "'..' is not allowed in a path")
    return b"/".join(parts)


def _odd_path(name: bytes) -> bool:
    """Whether `_clean` would change a name (trailing slashes already stripped)."""
    return (not name or name[0] == 0x2F or b"//" in name or name in (b".", b"..")
            or name.startswith((b"./", b"../")) or name.endswith((b"/.", b"/..")) or b"/./" in name
            or b"/../" in name)


def _plan(keys: tuple) -> tuple[bool, bool, frozenset]:
    """For one key set: (base64 twins present, any rarer key present (extensions, chunk
    fields), the keys)."""
    twins = False
    for key in keys:
        if key in TWINS:
            twins = True
        elif key[:2] == "x-" and key not in READ:
            raise _Bad(key, "unknown composefs extension key")
    return twins, twins or not RARE.isdisjoint(keys), frozenset(keys)


BAD_PLAN = (False, True, frozenset())  # a key set with an unknown extension key


def _payload(digest: str) -> bytes:
    hexpart = digest[digest.index(":") + 1:]
    return f"{hexpart[:2]}/{hexpart[2:]}".encode()



def _integral(value):
    """jsonschema counts 3.0 as an integer; so does the slow path."""
    if type(value) is float and value.is_integer():
        return int(value)
    if type(value) is list:
        return [_integral(v) for v in value]
    return value

