"""Byte-level mutations any target can fall back on (format-aware ones live in the targets).

`generic(data, rng)` applies one mutation: bit flips, byte sets, inserts and deletes,
interesting integers, chunk duplication and splices, truncation.  Everything comes from
`rng`, so a case is reproduced from its seed alone.
"""

from __future__ import annotations

import random

MAX_SIZE = 1 << 20  # outputs stay small: a fuzz case should take milliseconds
INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


def generic(data: bytes, rng: random.Random) -> bytes:
    """One random byte-level mutation of `data`."""
    buf = bytearray(data)
    n = len(buf)
    op = rng.randrange(7) if n else 2
    if op == 0:  # flip 1-4 bits
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
    elif op == 1:  # set a byte
        buf[rng.randrange(n)] = rng.randrange(256)
    elif op == 2:  # insert bytes
        at = rng.randint(0, n)
        buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif op == 3:  # delete a run
        at = rng.randrange(n)
        del buf[at:at + rng.randint(1, 16)]
    elif op == 4:  # an interesting integer, little or big endian
        width = rng.choice((1, 2, 4))
        at = rng.randrange(n)
        raw = (rng.choice(INTERESTING) & ((1 << 8 * width) - 1)).to_bytes(width, rng.choice(("little", "big")))
        buf[at:at + width] = raw
    elif op == 5:  # duplicate or splice a chunk
        a = rng.randrange(n)
        chunk = buf[a:a + rng.randint(1, 64)]
        at = rng.randint(0, n)
        buf[at:at] = chunk
    else:  # truncate
        del buf[rng.randrange(n):]
    return bytes(buf[:MAX_SIZE])
