"""Byte-level mutations any target can fall back on (format-aware ones live in the targets).

`generic(data, rng)` applies one mutation chosen from: bit flips, byte sets, inserts and
deletes, interesting integers (the boundary values parsers get wrong, in both byte orders and
every width), chunk duplication, moves and splices, and truncation.  Everything comes from
`rng`, so a case is reproduced from its seed alone.
"""

from __future__ import annotations

import random

MAX_SIZE = 1 << 20  # outputs stay small: a fuzz case should take milliseconds

INTERESTING_8 = (0, 1, 0x7F, 0x80, 0xFF, 0x10, 0x20, 0x40, 0x64, 0xFE)
INTERESTING = (0, 1, 2, 3, 4, 7, 8, 11, 12, 15, 16, 31, 32, 63, 64, 100, 127, 128, 255, 256, 511, 512,
               1000, 1023, 1024, 4095, 4096, 4097, 8191, 8192, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x100000000, 1 << 53, 0x7FFFFFFFFFFFFFFF,
               0x8000000000000000, 0xFFFFFFFFFFFFFFFF)
WIDTHS = (1, 2, 4, 8)


def interesting_int(rng: random.Random, width: int) -> int:
    """A boundary value that fits in `width` bytes (or its neighbour, or -1, or random)."""
    mask = (1 << (8 * width)) - 1
    roll = rng.random()
    if roll < 0.7:
        v = rng.choice(INTERESTING)
        if rng.random() < 0.3:
            v += rng.choice((-1, 1))
    elif roll < 0.85:
        v = mask  # -1
    else:
        v = rng.getrandbits(8 * width)
    return v & mask


def put_int(data: bytearray, offset: int, width: int, value: int, big: bool = False) -> None:
    """Overwrite `width` bytes at `offset` (clipped to the data) with `value`."""
    raw = value.to_bytes(width, "big" if big else "little")
    end = min(len(data), offset + width)
    data[offset:end] = raw[:end - offset]


def _offset(rng: random.Random, n: int, align: int = 1) -> int:
    if n <= 0:
        return 0
    off = rng.randrange(n)
    return off - off % align if rng.random() < 0.5 else off


def generic(data: bytes, rng: random.Random) -> bytes:
    """One random byte-level mutation of `data`."""
    buf = bytearray(data)
    n = len(buf)
    op = rng.randrange(11) if n else 3
    if op == 0:  # flip 1-4 bits
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # set a byte to an interesting or random value
        buf[rng.randrange(n)] = rng.choice(INTERESTING_8) if rng.random() < 0.6 else rng.randrange(256)
    elif op == 2:  # an interesting integer, any width, either byte order, often aligned
        width = rng.choice(WIDTHS)
        put_int(buf, _offset(rng, n, width), width, interesting_int(rng, width), rng.random() < 0.2)
    elif op == 3:  # insert bytes
        k = rng.choice((1, 1, 2, 4, 8, rng.randint(1, 256)))
        fill = bytes([rng.randrange(256)]) * k if rng.random() < 0.5 else rng.randbytes(k)
        i = rng.randint(0, n)
        buf[i:i] = fill
    elif op == 4:  # delete a run
        i = rng.randrange(n)
        del buf[i:i + rng.choice((1, 1, 2, 4, rng.randint(1, max(1, n // 4))))]
    elif op == 5:  # duplicate a chunk in place
        i = rng.randrange(n)
        chunk = buf[i:i + rng.randint(1, min(n - i, 512))]
        buf[i:i] = chunk * rng.choice((1, 1, 2, 4))
    elif op == 6:  # copy a chunk over another place (splice within the input)
        i, j = rng.randrange(n), rng.randrange(n)
        chunk = buf[i:i + rng.randint(1, min(n - i, 512))]
        buf[j:j + len(chunk)] = chunk
    elif op == 7:  # truncate
        del buf[rng.randint(0, n - 1):]
    elif op == 8:  # zero or 0xff a run
        i = rng.randrange(n)
        k = rng.randint(1, min(n - i, 64))
        buf[i:i + k] = bytes([rng.choice((0, 0xFF))]) * k
    elif op == 9:  # add or subtract a small amount from an integer field
        width = rng.choice(WIDTHS)
        i = _offset(rng, n, width)
        raw = bytes(buf[i:i + width]).ljust(width, b"\0")
        v = int.from_bytes(raw, "little") + rng.choice((-16, -4, -2, -1, 1, 2, 4, 16))
        put_int(buf, i, width, v & ((1 << (8 * width)) - 1))
    else:  # swap two chunks
        k = rng.randint(1, max(1, min(64, n // 2)))
        i, j = rng.randrange(n), rng.randrange(n)
        a, b = bytes(buf[i:i + k]), bytes(buf[j:j + k])
        if len(a) == len(b) == k and abs(i - j) >= k:
            buf[i:i + k], buf[j:j + k] = b, a
    return bytes(buf[:MAX_SIZE])


def splice(a: bytes, b: bytes, rng: random.Random) -> bytes:
    """The start of `a` and the end of `b` (two inputs crossed)."""
    return (a[:rng.randint(0, len(a))] + b[rng.randint(0, len(b)):])[:MAX_SIZE]
