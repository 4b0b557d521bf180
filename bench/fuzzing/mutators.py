"""Byte-level mutations shared by the fuzz targets (a minimal version; the runner's helper keeps one)."""

from __future__ import annotations

import random

INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 63, (1 << 64) - 1)


def generic(data: bytes, rng: random.Random) -> bytes:
    """Bit flips, byte inserts/deletes, interesting integers, chunk duplication or splice."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        at = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            i = min(at, len(buf) - 1)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[at:at] = bytes([rng.randrange(256)]) * rng.randint(1, 8)
        elif op == 2 and buf:
            del buf[at:at + rng.randint(1, 16)]
        elif op == 3:
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice(INTERESTING) & ((1 << (8 * width)) - 1)
            buf[at:at + width] = value.to_bytes(width, rng.choice(("little", "big")))
        elif buf:
            start = rng.randrange(len(buf))
            chunk = buf[start:start + rng.randint(1, 64)]
            buf[at:at] = chunk
    return bytes(buf)
