"""The dumpfile parser with a forked child running the column stage of most batches
(`frontends.dumpfile_stream.ForkedColumns`) against the parse in one process: the same tree,
or the same error on the same line, and a child that stops early changes nothing."""

from __future__ import annotations

import os
import random

import pytest
from cfsc.base import forked
from cfsc.base.errors import DumpfileError
from cfsc.base.options import Options
from cfsc.base.streams import chunks
from cfsc.build import compile_tree
from cfsc.frontends import dumpfile
from cfsc.frontends.dumpfile import LINE_MAX, _Parser
from cfsc.frontends.dumpfile_stream import BATCH, ForkedColumns

from bench.fuzzing import dumpgrammar

pytestmark = [pytest.mark.skipif(not hasattr(os, "fork") or forked._processors() < 2,
                                 reason="needs fork and a second processor"),
              pytest.mark.usefixtures("forkable")]


def big_dump(batches: float = 4.5) -> bytes:
    """Some batches' worth of records: directories, external and inline files, symlinks,
    hard links, escapes and xattr sets, so every batch has fast and slow lines."""
    lines = [b"/ 4096 40755 2 0 0 0 1700000000.0 - - - user.root=1"]
    d = 0
    while len(lines) < batches * BATCH:
        lines.append(b"/d%04d 4096 40755 2 0 0 0 1700000000.0 - - - security.selinux=a_t" % d)
        for i in range(300):
            path = b"/d%04d/f%03d" % (d, i)
            if i % 61 == 0:
                lines.append(b"/d%04d/\\x41%03d 3 100644 1 0 0 0 1.5 - abc - user.x=%d" % (d, i, i % 3))
            elif i % 47 == 0:
                lines.append(b"%s 0 @100644 0 0 0 0 0.0 /d%04d/f001 - -" % (path, d))
            elif i % 13 == 0:
                lines.append(b"%s 9 120777 1 0 0 0 1700000000.0 ../target - -" % path)
            else:
                digest = b"%064x" % (d * 1000 + i)
                lines.append(b"%s %d 100644 1 %d 0 0 1700000000.%d %s/%s - %s security.selinux=%s" % (
                    path, 100 + i, i % 2, i % 3, digest[:2], digest[2:], digest, (b"a_t", b"b_t")[i % 2]))
        d += 1
    return b"\n".join(lines) + b"\n"


def forked_outcome(path, strict: bool, column_stage=None) -> tuple:
    parser = _Parser("x.dump", strict)
    helper = ForkedColumns.start(column_stage or parser.batch_columns, str(path), LINE_MAX, min_bytes=0, busy=True)
    assert helper is not None
    try:
        tree = parser.parse(chunks(str(path)), helper)
    except DumpfileError as e:
        return ("error", e.line, e.field, str(e))
    finally:
        helper.close()
    return ("ok", dumpgrammar.signature(tree))


def test_forked_parse_gives_the_sequential_tree_and_image(tmp_path):
    data = big_dump()
    path = tmp_path / "in.dump"
    path.write_bytes(data)
    assert forked_outcome(path, False) == dumpgrammar.outcome(data, True, False)
    assert forked_outcome(path, False)[0] == "ok"
    # the frontend takes the forked path by itself above FORK_MIN_BYTES when a processor is idle
    assert len(data) > 2 << 20
    forked_image = compile_tree(dumpfile.load(str(path)), Options())
    assert forked_image == compile_tree(dumpfile.loads(data), Options())


@pytest.mark.parametrize("seed", range(12))
def test_forked_parse_equals_sequential_on_mutated_dumps(seed, tmp_path):
    """Grammar mutations anywhere (in the child's batches mostly): the same tree, or the same
    first error."""
    rng = random.Random(seed)
    lines = big_dump(3.5).split(b"\n")
    # mutate a window in a batch the child computes (batches 1-3), keep the rest as it is
    start = rng.randrange(BATCH, 3 * BATCH)
    window = b"\n".join(lines[start:start + 40])
    lines[start:start + 40] = dumpgrammar.mutate(window, rng, 4).split(b"\n")
    data = b"\n".join(lines)
    path = tmp_path / "in.dump"
    path.write_bytes(data)
    for strict in (False, True):
        assert forked_outcome(path, strict) == dumpgrammar.outcome(data, True, strict)


def test_a_child_that_stops_early_leaves_the_parser_to_do_the_rest(tmp_path):
    data = big_dump()
    path = tmp_path / "in.dump"
    path.write_bytes(data)
    parser_for_child = _Parser("x.dump", False)
    done = []

    def fails_on_the_third(lines):  # (runs in the child)
        done.append(1)
        if len(done) == 3:
            raise MemoryError
        return parser_for_child.batch_columns(lines)

    assert forked_outcome(path, False, fails_on_the_third) == dumpgrammar.outcome(data, True, False)
