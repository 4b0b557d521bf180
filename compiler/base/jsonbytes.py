"""Byte strings in JSON, reversibly.

Names, link targets, payloads and xattr keys are bytes and need not be UTF-8; JSON strings
must be.  Convention (used by `dump --json`, the CRFS TOC and every JSON report):

* bytes that are valid UTF-8 are written as a plain JSON string under their key;
* otherwise the plain key holds a readable stand-in (invalid bytes as U+FFFD) and a *twin*
  key holds the exact bytes in standard base64 (`<key>_b64` by default; CRFS uses
  `x-<key>-b64`, as composefs' own TOC extensions are `x-` keys).  Readers prefer the twin.

So a reader that knows nothing of the twin still sees a sensible string, and one that does
gets the exact bytes back.
"""

from __future__ import annotations

import base64
import binascii
from typing import Callable

from cfsc.base.errors import InputError

_U64_RANGE = range(-(1 << 63), 1 << 64)  # what orjson encodes


def json_line(obj) -> bytes:
    """One JSON document and a newline, as every report writes it.

    orjson refuses integers beyond 64 bits, and report totals add up values an image
    declares (`info`'s external bytes: two files of 2^64-1 bytes make 2^65): those are written
    by the standard encoder, whose output is the same JSON for everything else."""
    import orjson

    try:
        return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:
        if not _has_wide_int(obj):
            raise
    import json

    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _has_wide_int(obj) -> bool:
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, int) and item not in _U64_RANGE:
            return True
    return False


def default_twin(key: str) -> str:
    return key + "_b64"


def put(obj: dict, key: str, raw: bytes, twin: Callable[[str], str] = default_twin) -> None:
    try:
        obj[key] = raw.decode("utf-8")
    except UnicodeDecodeError:
        obj[key] = raw.decode("utf-8", "replace")
        obj[twin(key)] = base64.b64encode(raw).decode("ascii")


def get(obj: dict, key: str, where: str, twin: Callable[[str], str] = default_twin) -> bytes | None:
    """The bytes stored under `key` (twin first), or None if neither key is present."""
    encoded = obj.get(twin(key))
    if encoded is not None:
        if not isinstance(encoded, str):
            raise InputError(f"expected a base64 string, got {type(encoded).__name__}", f"{where}.{twin(key)}")
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("invalid base64", f"{where}.{twin(key)}") from None
    text = obj.get(key)
    if text is None:
        return None
    if not isinstance(text, str):
        raise InputError(f"expected a string, got {type(text).__name__}", f"{where}.{key}")
    return text.encode("utf-8", "surrogateescape")
