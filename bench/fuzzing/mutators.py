"""Byte-level mutations any target can fall back on (format-aware ones live in the targets).

`generic(data, rng)` applies one mutation: bit flips, byte sets, inserts and deletes,
interesting integers, chunk duplication and splices, truncation.  Everything comes from
`rng`, so a case is reproduced from its seed alone.
"""

from __future__ import annotations

import random

MAX_SIZE = 1 << 20  # outputs stay small: a fuzz case should take milliseconds
INTERESTING = (0, 1, 2, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 511, 512, 1023, 1024, 4095, 4096,
               32767, 32768, 65535, 65536, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63,
               (1 << 64) - 1)
WIDTHS = (1, 2, 4, 8)


def _flip(data: bytearray, rng: random.Random) -> None:
    if data:
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)


def _set_byte(data: bytearray, rng: random.Random) -> None:
    if data:
        data[rng.randrange(len(data))] = rng.choice((0, 0x20, 0x7F, 0x80, 0xFF, rng.randrange(256)))


def _insert(data: bytearray, rng: random.Random) -> None:
    at = rng.randint(0, len(data))
    data[at:at] = rng.randbytes(rng.choice((1, 2, 4, 16, 512)))


def _delete(data: bytearray, rng: random.Random) -> None:
    if data:
        at = rng.randrange(len(data))
        del data[at:at + rng.choice((1, 2, 4, 16, 512))]


def _integer(data: bytearray, rng: random.Random) -> None:
    width = rng.choice(WIDTHS)
    if len(data) < width:
        return
    value = rng.choice(INTERESTING) % (1 << (8 * width))
    if rng.random() < 0.3:
        value = (-value) % (1 << (8 * width))
    at = rng.randrange(len(data) - width + 1)
    data[at:at + width] = value.to_bytes(width, rng.choice(("big", "little")))


def _duplicate(data: bytearray, rng: random.Random) -> None:
    if data:
        start = rng.randrange(len(data))
        chunk = data[start:start + rng.choice((1, 8, 64, 512, 4096))]
        at = rng.randint(0, len(data))
        data[at:at] = chunk * rng.choice((1, 2, 8))


def _splice(data: bytearray, rng: random.Random) -> None:
    """A chunk copied over another place of the same input."""
    if len(data) > 1:
        start = rng.randrange(len(data))
        chunk = data[start:start + rng.choice((4, 64, 512))]
        at = rng.randrange(len(data))
        data[at:at + len(chunk)] = chunk


def _truncate(data: bytearray, rng: random.Random) -> None:
    if data:
        del data[rng.randrange(len(data)):]


MUTATIONS = (_flip, _set_byte, _insert, _delete, _integer, _duplicate, _splice, _truncate)


def generic(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    rng.choice(MUTATIONS)(out, rng)
    return bytes(out[:MAX_SIZE])
