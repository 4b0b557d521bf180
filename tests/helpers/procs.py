"""Looking at other processes through /proc (tests that check nothing is left running)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, …); None when
    the process is gone.  (The name may hold spaces and parentheses: it ends at the last `)`.)"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None


def cmdline(pid: int | str) -> bytes:
    """The process's NUL-separated command line; empty when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def pids() -> list[int]:
    """Every process now, but this one."""
    me = os.getpid()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me]


def children() -> set[int]:
    """This process's child processes (of every thread)."""
    out: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            out.update(int(p) for p in f.read().split())
    return out


def exits(pid: int, timeout: float = 10) -> bool:
    """Whether the process ends within `timeout` seconds (looked at once at least)."""
    end = time.monotonic() + timeout
    while True:
        fields = stat_fields(pid)
        if fields is None or fields[0] in (b"Z", b"X"):  # gone, or ended and not reaped yet by its new parent
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.02)
