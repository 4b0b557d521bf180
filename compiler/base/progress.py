"""A one-line progress display on stderr for long jobs (directory scans, store imports).

The CLI decides whether to show it (stderr is a terminal); the code doing the work only
calls `update`.  Nothing is drawn during the first second, so quick runs stay silent, and
redraws are throttled so a million updates cost a million float compares, not writes.
"""

from __future__ import annotations

import sys
import time

DELAY = 1.0
INTERVAL = 0.2


class Progress:
    __slots__ = ("_drawn", "_next", "enabled")

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._next = time.monotonic() + DELAY
        self._drawn = False

    def update(self, text_of) -> None:
        """Redraw with `text_of()` if it is time; `text_of` is only called then."""
        if not self.enabled:
            return
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + INTERVAL
        sys.stderr.write("\r\x1b[K" + text_of())
        sys.stderr.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._drawn = False


def mib(n: int) -> str:
    return f"{n / 1048576:.0f} MiB"
