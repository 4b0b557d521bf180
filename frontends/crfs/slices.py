"""A big JSON document's top-level `entries` array, parsed a few MiB at a time; duplicate keys.

orjson parses a whole document at once, and a 1M-entry TOC is ~2 GB of dicts.  Entries are
objects, so the array is cut at `},{` between two of them and each slice parsed on its own.
A cut inside a string parses as invalid JSON and the next candidate is tried; a slice is
right when it parses, because JSON tokenises the same from a known state.  When the document
does not have the expected shape the caller parses it whole instead (`Unsure`).

Reading is linear: the search for a cut resumes where the last one stopped, and while there
is none the buffer grows by doubling (each byte is searched and copied a bounded number of
times).  Memory is bounded by ENTRY_MAX: JSON text that runs that long without the end of an
entry (a huge value, or white space a small compressed file expands to) is refused
(`Oversized`) rather than held.

Duplicate keys: orjson keeps the last value of a key given twice, other readers the first or
both, so a document with one means different trees to different readers: `duplicate_keys`
finds them.  It counts colons: outside strings a colon ends a key, and re-serialising what
orjson parsed writes each kept key's colon once and the colons inside strings as they are,
so the text has more colons exactly when a key was dropped (or when a colon inside a string
is written as a `\\u003a` escape, counted as a possible one).  Only then is the text
tokenised to name each duplicate by its JSON path.
"""

from __future__ import annotations

import json
import re

import orjson

SLICE_BYTES = 4 << 20
HEAD_BYTES = 1 << 20  # the top-level "entries" key is looked for this far
ENTRY_MAX = 16 << 20  # JSON text between two entries' starts (white space included)
TRIES = 4  # cuts tried per slice (one inside a string fails to parse)
# JSON's white space only: a regex `\s` also takes \v and \f, and a cut there dropped them from
# the text parsed, so a TOC orjson refuses whole was accepted in slices.
_WS = rb"[ \t\n\r]*"
_ENTRIES = re.compile(rb'"entries"' + _WS + rb":" + _WS + rb"\[")
_BOUNDARY = re.compile(rb"\}" + _WS + rb"," + _WS + rb"\{")
# Strings (a key when a colon follows) and the structural characters; scalars are skipped.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"(\s*:)?|[{}\[\],]')
_ESCAPED_COLONS = (b"\\u003a", b"\\u003A")


class Unsure(Exception):
    """The cheap cut of the entries array cannot be proven right: parse the whole document."""


class Oversized(Exception):
    """No end of entry `index` within ENTRY_MAX bytes of JSON text."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


class EntrySlices:
    """Iterate over (index of the first entry, entries, duplicate-key paths) slices of a TOC's
    entries array, reading the input block by block and keeping only a few MiB of it.

    Paths are as `duplicate_keys` gives them, from the slice's first entry (index 0).
    Afterwards `header` is the top-level object with `entries: []`.  Raises Unsure when a cut
    cannot be proven or the top level has a duplicate key (the `done` entries yielded before
    are right all the same), Oversized when an entry does not end within ENTRY_MAX bytes.
    """

    def __init__(self, blocks) -> None:
        self.blocks = iter(blocks)
        self.eof = False
        self.data = b""
        self.pos = 0
        self.done = 0
        self.header: dict = {}

    def fill(self, need: int) -> None:
        """At least `need` bytes after `pos`, unless the input ends first."""
        have = len(self.data) - self.pos
        if have >= need or self.eof:
            return
        parts = [self.data[self.pos:]] if have else []
        while have < need:
            block = next(self.blocks, None)
            if block is None:
                self.eof = True
                break
            parts.append(block)
            have += len(block)
        self.data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.pos = 0

    def __iter__(self):
        self.fill(HEAD_BYTES)
        m = _ENTRIES.search(self.data)
        if m is None:
            raise Unsure
        prefix = self.data[:m.start()]
        # Only the top-level "entries" makes prefix + `"entries":0}` an object with entries 0.
        text = prefix + b'"entries":0}'
        top = _top_level(text)
        if top is None or duplicate_keys(text, top):
            raise Unsure
        self.pos = m.end()
        failures = 0  # in this slice
        ahead = SLICE_BYTES  # from `pos`: where the search for the next cut starts
        while True:
            self.fill(2 * SLICE_BYTES)
            data, pos = self.data, self.pos
            if len(data) - pos <= SLICE_BYTES and self.eof:
                break
            start = pos + ahead
            cut = _BOUNDARY.search(data, start)
            while cut is not None:
                text = b"[" + data[pos:cut.start() + 1] + b"]"
                entries = _parse(text)
                if entries is not None:
                    break
                failures += 1  # cut inside a string, or bad JSON
                if failures == TRIES:
                    raise Unsure
                start = cut.end()
                cut = _BOUNDARY.search(data, start)
            if cut is None:
                if self.eof:
                    break  # the rest is the last slice
                have = len(data) - pos
                if have > SLICE_BYTES + ENTRY_MAX:
                    raise Oversized(self.done)
                # Resume at a `}` that may begin a cut the next block completes.
                last = data.rfind(b"}", start)
                ahead = (last if last >= 0 else len(data)) - pos
                self.fill(min(2 * have, SLICE_BYTES + ENTRY_MAX + 1))
                continue
            dups = duplicate_keys(text, entries)
            del text
            yield self.done, entries, dups
            self.done += len(entries)
            self.pos = cut.end() - 1  # at the next entry's "{"
            ahead = SLICE_BYTES
            failures = 0
            del entries
        data, pos = self.data, self.pos
        end = len(data)
        for _attempt in range(3):  # the array's "]": the last one that leaves a valid top level
            end = data.rfind(b"]", pos, end)
            if end < 0:
                break
            text = prefix + b'"entries":0' + data[end + 1:]
            header = _top_level(text)
            if header is None:
                continue
            if duplicate_keys(text, header):
                break  # whole-document parsing reports it, the same way at any size
            text = b"[" + data[pos:end + 1]
            entries = _parse(text)
            if entries is None:
                break
            header["entries"] = []
            self.header = header
            yield self.done, entries, duplicate_keys(text, entries)
            self.done += len(entries)
            return
        raise Unsure


def _parse(text: bytes):
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def _top_level(text: bytes) -> dict | None:
    """The object, if `text` is one whose (last) "entries" is the 0 put there."""
    doc = _parse(text)
    return doc if type(doc) is dict and type(doc.get("entries")) is int and doc["entries"] == 0 else None


def duplicate_keys(text: bytes, value) -> list[list]:
    """The JSON path (keys and indexes, the duplicate key last) of every key given twice in
    its object, in document order; `value` is what orjson parsed from `text`."""
    colons = text.count(b":")
    if b"\\" in text:  # rare: no backslash, no escape (memchr is ~20x faster than counting)
        colons += sum(map(text.count, _ESCAPED_COLONS))
    try:
        if colons == orjson.dumps(value).count(b":"):
            return []
    except (orjson.JSONEncodeError, TypeError):
        pass
    return _find_duplicates(text)


def _find_duplicates(text: bytes) -> list[list]:
    """Tokenise valid JSON `text` (iteratively: nesting depth is the input's) for keys given
    twice in one object."""
    found = []
    # One frame per open container: [path, keys seen (None for an array), key or index].
    stack: list[list] = []
    for m in _TOKEN.finditer(text):
        token = m.group()
        c = token[0]
        if c == 0x22:  # a string
            if m.group(1) is not None:  # a key
                raw = token[:token.rindex(b'"') + 1]
                key = json.loads(raw) if b"\\" in raw else raw[1:-1].decode("utf-8", "surrogateescape")
                frame = stack[-1]
                if key in frame[1]:
                    found.append([*frame[0], key])
                frame[1].add(key)
                frame[2] = key
        elif c == 0x7B or c == 0x5B:  # { or [
            path = [*stack[-1][0], stack[-1][2]] if stack else []
            stack.append([path, set() if c == 0x7B else None, 0])
        elif c == 0x2C:  # ,
            frame = stack[-1]
            if frame[1] is None:
                frame[2] += 1
        else:  # } or ]
            stack.pop()
    return found
