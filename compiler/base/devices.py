"""Device numbers: Linux's `makedev` encoding, as composefs stores `rdev` (32 bits).

glibc's 64-bit dev_t puts the major in bits 8-19 and 32-63 and the minor in bits 0-7 and 20-31
(and 44-63); an image keeps only the low 32 bits, so a major is at most 12 bits and a minor at
most 20.  Both directions are exact within that range.
"""

from __future__ import annotations

MAJOR_MAX = 0xFFF
MINOR_MAX = 0xFFFFF


def makedev(major: int, minor: int) -> int:
    return ((major & 0xFFF) << 8) | (minor & 0xFF) | ((minor & 0xFFF00) << 12)


def major(rdev: int) -> int:
    return (rdev >> 8) & 0xFFF


def minor(rdev: int) -> int:
    return (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)
