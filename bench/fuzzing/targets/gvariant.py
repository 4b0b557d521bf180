"""GVariant decoder (frontends/gvariant.py): the serialised values OSTree keeps, and variants.

An input is one byte choosing a type from `TYPES` and the serialised value.  The oracle is
stronger than "does not crash": the decoder accepts only normal form, and normal form is
unique, so whatever decodes must encode back to exactly the input bytes.  Mutations are
byte-level on the value, a change of type, or structural: a decoded value changed (a longer
string, one more element, a variant nested in a variant) and encoded again, which reaches
the deep paths random bytes seldom do.
"""

from __future__ import annotations

import random
import sys

from cfsc.frontends.ostree import gvariant
from cfsc.frontends.ostree.gvariant import GVariantError, Variant

from bench.fuzzing.mutators import generic

NAME = "gvariant"
TEST_CASES = 3000
MAX_INPUT = 1 << 16  # tweaks multiply lists: keep cases small and fast

TYPES = [
    gvariant.parse(t).sig for t in (
        # OSTree's objects (frontends/ostreerepo.py)
        "(a{sv}aya(say)sstayay)", "(a(say)a(sayay))", "(uuua(ayay))", "(uuuusa(ayay))", "(tuuuusa(ayay))",
        # variants, maybes, dict entries, every basic type, the unit, nesting
        "v", "av", "a{sv}", "mv", "maay", "m(ys)", "(bynqiuxthdsog)", "aas", "a(ayay)", "(()v)", "a{ya{sv}}",
        "(tsmay)", "aav", "mmv", "(iv)", "ad", "ab", "ao", "ag", "a(yv)", "(vv)", "mab",
    )
]


class _Fail(Exception):
    """The encoded value is not the input: two normal forms, or an encoder that disagrees."""


def _split(data: bytes) -> tuple[str, bytes]:
    if not data:
        return TYPES[0], b""
    return TYPES[data[0] % len(TYPES)], data[1:]


def run(data: bytes, workdir: str) -> None:
    sig, payload = _split(data)
    try:
        value = gvariant.decode(sig, payload)
    except GVariantError:
        return
    again = gvariant.encode(sig, value)
    if again != payload and not _nested_maybe(sig, value):
        raise _Fail(f"{sig}: {payload.hex()} decodes to {value!r}, which encodes as {again.hex()}")


def _nested_maybe(sig: str, value) -> bool:
    """Whether a maybe holds a maybe somewhere: those decode Just Nothing as Nothing (the
    decoder says so; OSTree never nests maybes), so their bytes cannot come back."""
    if "mm" in sig:
        return True
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, Variant):
            if "mm" in v.type:
                return True
            stack.append(v.value)
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return False


# -- seeds and mutations ----------------------------------------------------------------------

_SAMPLES = {
    "b": [False, True], "y": [0, 7, 255], "n": [-2, 300], "q": [65535], "i": [-1, 1 << 20], "u": [42],
    "x": [-(1 << 40)], "t": [1 << 50], "h": [3], "d": [1.5, -0.0], "s": [b"", b"usr", b"caf\xc3\xa9"],
    "o": [b"/", b"/org/x"], "g": [b"", b"a{sv}", b"(ii)"],
}
_VARIANT_TYPES = ["s", "u", "ay", "as", "(ss)", "v", "a{sv}", "mu", "t", "b", "()"]


def _sample(node, rng: random.Random, depth: int = 0):
    """A random value of a parsed type (small: a few elements, shallow variants)."""
    sig = node.sig
    if sig in _SAMPLES:
        return rng.choice(_SAMPLES[sig])
    if sig == "v":
        inner = rng.choice(_VARIANT_TYPES if depth < 3 else _VARIANT_TYPES[:4])
        return Variant(inner, _sample(gvariant.parse(inner), rng, depth + 1))
    if sig.startswith("a"):
        if sig == "ay":
            return rng.randbytes(rng.choice((0, 1, 32, 40)))
        return [_sample(node.elem, rng, depth + 1) for _ in range(rng.randint(0, 3 if depth < 4 else 1))]
    if sig.startswith("m"):
        return None if rng.random() < 0.3 else _sample(node.elem, rng, depth + 1)
    return tuple(_sample(m, rng, depth + 1) for m in node.members)


def seeds() -> list[bytes]:
    rng = random.Random(1)
    out = []
    for i, sig in enumerate(TYPES):
        node = gvariant.parse(sig)
        for _ in range(3):
            out.append(bytes([i]) + gvariant.encode(node, _sample(node, rng)))
    return out


def _tweak(node, value, rng: random.Random, depth: int = 0):
    """The value with one random node changed (still a value of the type)."""
    sig = node.sig
    if sig in _SAMPLES:
        if sig in "sog":
            if sig == "s" and rng.random() < 0.5:
                return value * rng.choice((2, 8, 64)) or b"x" * rng.choice((1, 255, 256))
            return rng.choice(_SAMPLES[sig])
        if sig == "d":
            return rng.choice((0.0, float("inf"), float("nan"), 1e308))
        if sig == "b":
            return not value
        width = node.size * 8
        signed = sig in "nixh"
        v = rng.choice((0, 1, -1, (1 << (width - 1)) - 1, rng.getrandbits(width)))
        lo, hi = (-(1 << (width - 1)), (1 << (width - 1)) - 1) if signed else (0, (1 << width) - 1)
        return min(max(v, lo), hi)
    if sig == "v":
        roll = rng.random()
        if roll < 0.15 or depth > 40:
            return Variant("v", value)  # one level deeper
        if roll < 0.3:  # deeper still: layers of a variant at the bottom of k arrays
            k = rng.choice((1, 2, 30, 60, 63))
            for _ in range(rng.choice((1, 1, 2, 10, 40))):
                for _ in range(k):
                    value = [value]
                value = Variant("a" * k + "v", value)
            return value
        inner = gvariant.parse(value.type)
        return Variant(value.type, _tweak(inner, value.value, rng, depth + 1))
    if sig.startswith("a"):
        if sig == "ay":
            roll = rng.random()
            if roll < 0.3:
                return value + rng.randbytes(rng.choice((1, 200, 300)))
            return value[:rng.randint(0, len(value))]
        items = list(value)
        roll = rng.random()
        if not items or roll < 0.25:
            items.insert(rng.randint(0, len(items)), _sample(node.elem, rng, 3))
        elif roll < 0.4:
            del items[rng.randrange(len(items))]
        elif roll < 0.5:
            items = items * rng.choice((2, 16, 100)) if len(items) < 64 else items
        else:
            i = rng.randrange(len(items))
            items[i] = _tweak(node.elem, items[i], rng, depth + 1)
        return items
    if sig.startswith("m"):
        if value is None:
            return _sample(node.elem, rng, 3)
        return None if rng.random() < 0.2 else _tweak(node.elem, value, rng, depth + 1)
    if not node.members:
        return value
    items = list(value)
    i = rng.randrange(len(items))
    items[i] = _tweak(node.members[i], items[i], rng, depth + 1)
    return tuple(items)


def mutate(data: bytes, rng: random.Random) -> bytes:
    sig, payload = _split(data)
    head = data[:1] or b"\0"
    roll = rng.random()
    if roll < 0.1:
        return bytes([rng.randrange(len(TYPES))]) + payload
    if roll < 0.4:
        node = gvariant.parse(sig)
        try:
            value = gvariant.decode(node, payload)
        except GVariantError:
            return head + generic(payload, rng)
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(20000)  # the encoder recurses per level: let it build what the decoder must refuse
        try:
            out = head + gvariant.encode(node, _tweak(node, value, rng))
        except (ValueError, OverflowError, TypeError, RecursionError):  # a tweak the type cannot hold
            return data
        finally:
            sys.setrecursionlimit(limit)
        return out if len(out) <= MAX_INPUT else data
    return head + generic(payload, rng)
