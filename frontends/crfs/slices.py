"""A big JSON document's top-level `entries` array, parsed a few MiB at a time.

orjson parses a whole document at once, and a 1M-entry TOC is ~2 GB of dicts.  Entries are
objects, so the array is cut at `},{` between two of them and each slice parsed on its own.
A cut inside a string parses as invalid JSON and the next candidate is tried; a slice is
right when it parses, because JSON tokenises the same from a known state.  When the document
does not have the expected shape the caller parses it whole instead (`Unsure`).
"""

from __future__ import annotations

import re

import orjson

SLICE_BYTES = 4 << 20
_ENTRIES = re.compile(rb'"entries"\s*:\s*\[')
_BOUNDARY = re.compile(rb"\}\s*,\s*\{")


class Unsure(Exception):
    """The cheap cut of the entries array cannot be proven right: parse the whole document."""


class EntrySlices:
    """Iterate over (index of the first entry, entries) slices of a TOC's entries array,
    reading the input block by block and keeping only a few MiB of it.

    Afterwards `header` is the top-level object with `entries: []`.  Raises Unsure when a cut
    cannot be proven (the `done` entries yielded before are right all the same).
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
        self.fill(1 << 20)
        m = _ENTRIES.search(self.data)
        if m is None:
            raise Unsure
        prefix = self.data[:m.start()]
        # Only the top-level "entries" makes prefix + `"entries":0}` an object with entries 0.
        if _top_level(prefix + b'"entries":0}') is None:
            raise Unsure
        self.pos = m.end()
        failures = 0
        while True:
            self.fill(2 * SLICE_BYTES)
            data, pos = self.data, self.pos
            if len(data) - pos <= SLICE_BYTES and self.eof:
                break
            cut = _BOUNDARY.search(data, pos + SLICE_BYTES)
            while cut is not None:
                try:
                    entries = orjson.loads(b"[" + data[pos:cut.start() + 1] + b"]")
                    break
                except orjson.JSONDecodeError:  # cut inside a string, or bad JSON
                    failures += 1
                    if failures > 3:
                        raise Unsure from None
                    cut = _BOUNDARY.search(data, cut.end())
            if cut is None:
                if self.eof:
                    break  # the rest is the last slice
                self.fill(len(data) - pos + SLICE_BYTES)
                continue
            yield self.done, entries
            self.done += len(entries)
            self.pos = cut.end() - 1  # at the next entry's "{"
            del entries
        data, pos = self.data, self.pos
        end = len(data)
        for _attempt in range(3):  # the array's "]": the last one that leaves a valid top level
            end = data.rfind(b"]", pos, end)
            if end < 0:
                break
            header = _top_level(prefix + b'"entries":0' + data[end + 1:])
            if header is None:
                continue
            try:
                entries = orjson.loads(b"[" + data[pos:end + 1])
            except orjson.JSONDecodeError:
                break
            header["entries"] = []
            self.header = header
            yield self.done, entries
            self.done += len(entries)
            return
        raise Unsure


def _top_level(text: bytes) -> dict | None:
    """The object, if `text` is one whose (last) "entries" is the 0 put there."""
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return doc if type(doc) is dict and type(doc.get("entries")) is int and doc["entries"] == 0 else None
