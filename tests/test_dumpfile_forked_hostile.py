"""Hostile large dumpfiles through the forked column stage: the same tree, or the same
one-line error, as the parse in one process — for the inputs that touch the handover
itself (see bench/fuzzing/targets/dumpfile_forked.py, which fuzzes around these).
"""

from __future__ import annotations

import gzip
import os

import pytest
from cfsc.base import forked
from cfsc.frontends.dumpfile_stream import BATCH

from bench.fuzzing.targets.dumpfile_forked import big_dump, outcome

pytestmark = [pytest.mark.skipif(not hasattr(os, "fork") or forked._processors() < 2,
                                 reason="needs fork and a second processor"),
              pytest.mark.usefixtures("forkable")]

SEED = big_dump(4 * BATCH + 100, 1)  # five batches, one read chunk (the child computes jobs 1-3)
LINES = SEED.split(b"\n")


def edited(at: int, new: list[bytes], drop: int = 0) -> bytes:
    return b"\n".join(LINES[:at] + new + LINES[at + drop:])


CASES = {
    # a NUL sends its chunk down the line-by-line path: no job numbers there, for both
    "nul in the child's batch": edited(BATCH + 5, [LINES[BATCH + 5][:10] + b"\0" + LINES[BATCH + 5][10:]], 1),
    # a line past LINE_MAX stops the lines early: the child has sent batches the parser never asks for
    "long line in a later batch": edited(2 * BATCH + 7, [b"/long 0 100644 1 0 0 0 0.0 - - - user.a=" + b"v" * 90000]),
    # an error the column stage finds, in the child's batch, after a good parser batch
    "bad field in the child's batch": edited(BATCH + 1, [LINES[BATCH + 1].replace(b" 100644 ", b" 10064x ", 1)], 1),
    "bad field at a batch boundary": edited(2 * BATCH, [LINES[2 * BATCH].replace(b" 1700000000.", b" 17.00.", 1)], 1),
    # cut mid-line: the parser's tail, strict mode's missing newline
    "truncated mid-line": SEED[:SEED.index(LINES[3 * BATCH + 3]) + 20],
    # CRLF lines: the CR is part of the last field, whoever reads it
    "crlf in the child's batch": edited(BATCH, [line + b"\r" for line in LINES[BATCH:BATCH + 50]], 50),
    # compressed: the child decompresses on its own; cut short, both readers fail alike
    "gzip": gzip.compress(SEED, 1, mtime=0),
    "gzip cut short": gzip.compress(SEED, 1, mtime=0)[:300000],
    # past several read chunks (`streams.CHUNK`): lines cut by chunk boundaries, in the child's batches
    "two read chunks": big_dump(9 * BATCH + 4321, 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_forked_parse_gives_what_the_sequential_parse_gives(tmp_path, name):
    path = tmp_path / "in.dump"
    path.write_bytes(CASES[name])
    for strict in (False, True):
        sequential = outcome(str(path), strict, False)
        assert outcome(str(path), strict, True) == sequential, (name, strict, sequential[:3])
        if sequential[0] == "error":
            assert "\n" not in sequential[2]
