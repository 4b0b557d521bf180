"""RFC 3339 times ↔ (seconds, nanoseconds) since the epoch, in exact integer arithmetic.

JSON formats (the CRFS TOC, reports) carry times as RFC 3339 strings.  `datetime` would cap
the year at 1…9999 and round nanoseconds to microseconds, so the calendar is done here:
proleptic Gregorian, days from civil date (H. Hinnant's algorithm), no leap seconds.
"""

from __future__ import annotations

import re

_TIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))")
_MONTH_DAYS = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
# Representable by format(): years 0001 to 9999.
FIRST = -62135596800  # 0001-01-01T00:00:00Z
LAST = 253402300799  # 9999-12-31T23:59:59Z


def _days_from_civil(y: int, m: int, d: int) -> int:
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m - 3 if m > 2 else m + 9) + 2) // 5 + d - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


def _civil_from_days(z: int) -> tuple[int, int, int]:
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (m <= 2), m, d


def parse(text: str) -> tuple[int, int] | None:
    """(seconds, nanoseconds) for an RFC 3339 date-time, or None if it is not one."""
    m = _TIME.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second = map(int, m.group(1, 2, 3, 4, 5, 6))
    if not 1 <= month <= 12 or hour > 23 or minute > 59 or second > 59:
        return None
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    if not 1 <= day <= _MONTH_DAYS[month] + (month == 2 and leap):
        return None
    seconds = _days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second
    if m.group(8):
        oh, om = int(m.group(9)), int(m.group(10))
        if oh > 23 or om > 59:
            return None
        offset = oh * 3600 + om * 60
        seconds -= offset if m.group(8) == "+" else -offset
    fraction = m.group(7)
    return seconds, int(fraction.ljust(9, "0")) if fraction else 0


def representable(seconds: int, nanoseconds: int = 0) -> bool:
    """Whether `format` can write this time (composefs times are any signed 64-bit second)."""
    return FIRST <= seconds <= LAST and 0 <= nanoseconds < 1_000_000_000


def format_or_none(seconds: int, nanoseconds: int = 0) -> str | None:
    """`format`, or None outside years 0001-9999: for text shown next to the raw number."""
    return format(seconds, nanoseconds) if representable(seconds, nanoseconds) else None


def format(seconds: int, nanoseconds: int = 0) -> str:
    """UTC, `Z`, fraction only when non-zero and without trailing zeros (Go's RFC3339Nano)."""
    if not representable(seconds, nanoseconds):
        raise ValueError(f"{seconds}.{nanoseconds:09d} is outside RFC 3339 years 0001-9999")
    days, rest = divmod(seconds, 86400)
    y, mo, d = _civil_from_days(days)
    h, rest = divmod(rest, 3600)
    mi, s = divmod(rest, 60)
    fraction = f".{nanoseconds:09d}".rstrip("0") if nanoseconds else ""
    return f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}{fraction}Z"
