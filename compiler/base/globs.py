"""Glob matching in time linear in the value, for query patterns (`path ~ "…"`, `--exclude`).

The values come from the source, which may be hostile: a regex translation of a glob
backtracks, and `/**/x/**/x/**/y` against a path 1000 components deep, or `*a*a*a*a*a*a*a*ab`
against one 250-byte name, ran for minutes.  So a pattern becomes an NFA of one-byte steps
and loops and runs as a DFA built lazily: each byte of the value is one table lookup, and
a transition not seen yet is worked out once (from the set of NFA positions, at most the
pattern's length) and kept.  However the pattern and value are made, matching costs
O(len(value) × len(pattern)) at worst and O(len(value)) once the table is warm.

Semantics (unchanged; `reference_regex` is the regex they were written as, and the tests
check that both agree): the whole value must match; `*` is any bytes but `/`, `?` one byte but
`/`; `**` (or more stars) is any bytes, `/` included, except that at the start or after a `/`
and followed by `/` it is zero or more whole components (`/usr/**/lib` matches `/usr/lib`);
`[abc]`, `[a-z]`, `[!abc]` are one byte of a class (`/` included), a `]` first in the class
being a member; a `[` without its `]` and every other byte are literal.
"""

from __future__ import annotations

import functools
import re
import warnings

ANY = bytes([1]) * 256
NONE = bytes(256)
NOT_SLASH = bytes(1 if b != 0x2F else 0 for b in range(256))
SINGLE = [bytes(1 if b == c else 0 for b in range(256)) for c in range(256)]  # one byte's table
SLASH = SINGLE[0x2F]
MAX_STATES = 4096  # DFA states kept per pattern (a hostile value may visit a new one per byte)


def _class_end(pattern: bytes, i: int) -> int:
    """Where the class opened by `[` at `i` closes (-1: it does not, the `[` is literal)."""
    k = i + 1
    if pattern[k:k + 1] == b"!":
        k += 1
    if pattern[k:k + 1] == b"]":
        k += 1  # a `]` first in the class is a member
    return pattern.find(b"]", k)


def _class_regex(body: bytes) -> bytes:
    if body[:1] == b"!":
        body = b"^" + body[1:]
    return b"[" + body.replace(b"\\", b"\\\\") + b"]"


def _compile(regex: bytes) -> re.Pattern:
    with warnings.catch_warnings():  # `[[` reads as a literal `[` (re warns of future nested sets)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return re.compile(regex, re.DOTALL)
        except re.error as e:
            raise ValueError(f"invalid character class ({e.msg})") from None


@functools.lru_cache(maxsize=256)
def _members(body: bytes) -> bytes:
    """A class body as a 256-entry membership table, by the regex class it always meant."""
    match = _compile(_class_regex(body)).fullmatch
    return bytes(1 if match(bytes((b,))) else 0 for b in range(256))


def reference_regex(pattern: bytes) -> re.Pattern:
    """The glob as a (backtracking) regex: the reference the DFA is tested against."""
    out = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i:i + 1]
        if pattern.startswith(b"**", i):
            j = i + 2
            while pattern.startswith(b"*", j):
                j += 1
            before_slash = i == 0 or pattern[i - 1:i] == b"/"
            if before_slash and pattern.startswith(b"/", j):
                out.append(b"(?:.*/)?")  # `**/` matches zero or more whole components
                j += 1
            else:
                out.append(b".*")
            i = j
            continue
        if c == b"*":
            out.append(b"[^/]*")
        elif c == b"?":
            out.append(b"[^/]")
        elif c == b"[":
            end = _class_end(pattern, i)
            if end < 0:
                out.append(re.escape(c))
            else:
                out.append(_class_regex(pattern[i + 1:end]))
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return _compile(b"".join(out))


def _elements(pattern: bytes) -> tuple[list[tuple[bool, bytes]], int]:
    """The NFA: elements `(loop, members)` — a loop takes zero or more bytes of `members`, any
    other exactly one — and a mask of positions with an extra ε-edge three positions on: `**/`
    is an ε-node, a loop over any byte and a `/`, or nothing."""
    elements: list[tuple[bool, bytes]] = []
    skips = 0
    i, n = 0, len(pattern)
    while i < n:
        if pattern.startswith(b"**", i):
            j = i + 2
            while pattern.startswith(b"*", j):
                j += 1
            if (i == 0 or pattern[i - 1] == 0x2F) and pattern.startswith(b"/", j):
                # An ε-node first: the skip leaves from it, not from the loop (which, once
                # it took bytes, must be followed by the `/`).
                skips |= 1 << len(elements)
                elements += [(True, NONE), (True, ANY), (False, SLASH)]
                j += 1
            else:
                elements.append((True, ANY))
            i = j
            continue
        c = pattern[i]
        if c == 0x2A:  # *
            elements.append((True, NOT_SLASH))
        elif c == 0x3F:  # ?
            elements.append((False, NOT_SLASH))
        elif c == 0x5B and (end := _class_end(pattern, i)) >= 0:  # [
            elements.append((False, _members(pattern[i + 1:end])))
            i = end
        else:
            elements.append((False, SINGLE[c]))
        i += 1
    return elements, skips


class Glob:
    """A compiled glob: `glob(value)` says whether the whole of `value` matches.

    The literal bytes the pattern starts and ends with are compared first (at C speed; most
    values fail there); only the middle runs through the DFA, and a middle that is one `*`
    or `**` (`*.pyc`, `/usr/lib/**`) needs no DFA at all.
    """

    __slots__ = ("pattern", "_prefix", "_suffix", "_whole", "_middle", "_elements", "_loops",
                 "_skips", "_final", "_start", "_index", "_masks", "_rows", "_accept")

    def __init__(self, pattern: bytes) -> None:
        self.pattern = pattern
        elements, skips = _elements(pattern)
        head = _literal(elements, range(len(elements)), 0)
        tail = _literal(elements, range(len(elements) - 1, len(head) - 1, -1), skips << 2)[::-1]
        self._prefix, self._suffix = head, tail
        self._whole = len(head) + len(tail)
        elements = elements[len(head):len(elements) - len(tail)]
        self._middle = "empty" if not elements else "any" if elements == [(True, ANY)] else \
            "component" if elements == [(True, NOT_SLASH)] else "dfa"
        self._elements = elements
        self._skips = skips >> len(head)
        self._loops = sum(1 << p for p, (loop, _m) in enumerate(elements) if loop)
        self._final = 1 << len(elements)
        self._start = self._closure(1)
        self._reset()

    def __call__(self, value: bytes) -> bool:
        if len(value) < self._whole or not value.startswith(self._prefix) or not value.endswith(self._suffix):
            return False
        middle = self._middle
        if middle == "any":
            return True
        mid = value[len(self._prefix):len(value) - len(self._suffix)]
        if middle == "component":
            return b"/" not in mid
        if middle == "empty":
            return not mid
        return self.run(mid)

    def run(self, value: bytes) -> bool:
        """The DFA over `value` (for the pattern without its literal ends)."""
        rows = self._rows
        state = 1
        for byte in value:
            target = rows[state][byte]
            if target < 0:
                target = self._step(state, byte)
                rows = self._rows  # (a reset replaces the table)
            if not target:
                return False
            state = target
        return self._accept[state]

    def _reset(self) -> None:
        self._index = {0: 0, self._start: 1}  # NFA position set -> DFA state; 0 is the dead state
        self._masks = [0, self._start]
        self._rows = [[0] * 256, [-1] * 256]
        self._accept = [False, bool(self._start & self._final)]

    def _closure(self, positions: int) -> int:
        """Add what ε-edges reach: past a loop, and over a `**/`."""
        while True:
            more = positions | (positions & self._loops) << 1 | (positions & self._skips) << 3
            if more == positions:
                return positions
            positions = more

    def _step(self, state: int, byte: int) -> int:
        """The DFA state after `byte` from `state` (worked out once, then kept)."""
        positions = self._masks[state]
        after = 0
        elements = self._elements
        rest = positions & (self._final - 1)
        while rest:
            low = rest & -rest
            rest ^= low
            loop, members = elements[low.bit_length() - 1]
            if members[byte]:
                after |= low if loop else low << 1
        after = self._closure(after)
        target = self._index.get(after)
        if target is None:
            if len(self._masks) >= MAX_STATES:  # keep memory bounded: start a fresh table
                self._reset()
                state = self._add(positions)
            target = self._add(after)
        self._rows[state][byte] = target
        return target

    def _add(self, positions: int) -> int:
        found = self._index.get(positions)
        if found is not None:
            return found
        self._index[positions] = len(self._masks)
        self._masks.append(positions)
        self._rows.append([-1] * 256)
        self._accept.append(bool(positions & self._final))
        return len(self._masks) - 1

    def __repr__(self) -> str:
        return f"Glob({self.pattern!r})"


def _literal(elements: list[tuple[bool, bytes]], order: range, skipped: int) -> bytes:
    """The bytes every match has at one end: the one-member, one-byte elements met first in
    `order`, up to a loop, a class or an element an ε-edge can skip (`skipped`)."""
    out = bytearray()
    for p in order:
        loop, members = elements[p]
        if loop or skipped >> p & 1 or sum(members) != 1:
            break
        out.append(members.index(1))
    return bytes(out)
