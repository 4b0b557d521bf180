"""Fuzz target: a composefs dumpfile, parsed and compiled to image bytes in process.

Each case goes through the parser's fast path and its reference path, lenient and strict:
both must give the same tree or the same located error, and an accepted tree must meet every
limit the validation pass checks (the frontend marks its trees checked, so the pipeline
skips that pass).  An accepted case is then compiled through every pass to image bytes.
A disagreement is raised as AssertionError, so the runner reports it as a crash.
"""

from __future__ import annotations

import random

from cfsc.base.errors import CfscError
from cfsc.base.options import Options

from bench.fuzzing import dumpgrammar
from bench.fuzzing.mutators import generic

NAME = "dumpfile"


# A hard link to a directory (upstream writes it): a payload mutation makes it a cycle, which
# the hard-link pass must refuse, located, instead of compiling an image every walk loops on.
DIRECTORY_LINK = (b"/ 4096 40755 2 0 0 0 0.0 - - -\n/a 0 40755 2 0 0 0 0.0 - - -\n/a/x 0 100644 1 0 0 0 0.0 - - -\n"
                  b"/b 0 @100644 0 0 0 0 0.0 /a - -\n")


def seeds() -> list[bytes]:
    return dumpgrammar.seeds() + [dumpgrammar.column_mix(lambda n: 0, 0, 3), DIRECTORY_LINK]


def mutate(data: bytes, rng: random.Random) -> bytes:
    """Mostly grammar mutations (fields, separators, escapes, lines); sometimes a byte-level one."""
    if rng.random() < 0.15:
        return generic(data, rng)
    if rng.random() < 0.2:
        return dumpgrammar.column_mix(rng.randrange, rng.randrange(12), rng.randint(2, 12))
    return dumpgrammar.mutate(data, rng)


def run(data: bytes, workdir: str) -> None:
    for strict in (False, True):
        try:
            fast = dumpgrammar.outcome(data, True, strict)
            slow = dumpgrammar.outcome(data, False, strict)
        except CfscError as e:  # the validation pass refused a tree the frontend accepted
            raise AssertionError(f"an accepted dumpfile breaks a limit (strict={strict}): {e}") from e
        if fast != slow:
            raise AssertionError(f"fast path {fast[:4]} != reference path {slow[:4]} (strict={strict})")
        if fast[0] == "ok":
            dumpgrammar.compile_bytes(data, Options(strict=strict))
