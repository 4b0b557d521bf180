"""The dumpfile parser's fast path (`parse_batch`, column by column) against its reference
(`parse_line`, one record at a time), on malformed input above all.

Both must give the same tree, or the same error on the same line and field with the same
message, whatever the chunking; an accepted tree must meet every limit of the validation
pass the pipeline then skips.  The inputs are grammar mutations (bench/fuzzing/dumpgrammar.py):
missing, extra and empty fields, signs, dots, escapes, huge numbers, '//' in paths, lines
split, joined and moved, and -- what a column-wise path gets wrong -- good and bad lines mixed
in one batch (a line without '.' in MTIME next to one with two traded halves when the column
was joined and split again).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzzing import dumpgrammar
from cfsc.frontends.dumpfile import FIELDS

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))


def _check(data: bytes, chunk: int) -> None:
    for strict in (False, True):
        fast = dumpgrammar.outcome(data, True, strict)
        slow = dumpgrammar.outcome(data, False, strict)
        assert fast == slow, (strict, fast[:4], slow[:4])
        assert dumpgrammar.outcome(data, True, strict, chunk) == fast, "chunking changed the outcome"


@st.composite
def mixed_columns(draw, field: int) -> bytes:
    """Records whose one field keeps or changes by a grammar step each, then maybe a few
    grammar mutations anywhere."""
    choose = lambda n: draw(st.integers(0, n - 1))  # noqa: E731
    data = dumpgrammar.column_mix(choose, field, draw(st.integers(2, 8)))
    return dumpgrammar.apply(data, choose, draw(st.integers(0, 2)))


@st.composite
def mutated_seeds(draw) -> bytes:
    choose = lambda n: draw(st.integers(0, n - 1))  # noqa: E731
    data = draw(st.sampled_from(dumpgrammar.seeds()))
    return dumpgrammar.apply(data, choose, draw(st.integers(1, 5)))


@pytest.mark.parametrize("field", range(12), ids=[*FIELDS, "XATTRS"])
def test_fast_path_equals_reference_on_mixed_columns(field):
    @SETTINGS
    @given(mixed_columns(field), st.integers(1, 64))
    def check(data, chunk):
        _check(data, chunk)

    check()


@SETTINGS
@given(mutated_seeds(), st.integers(1, 64))
def test_fast_path_equals_reference_on_mutated_dumps(data, chunk):
    _check(data, chunk)


@pytest.mark.parametrize("seed", range(300))
def test_fast_path_equals_reference_on_seeded_mutations(seed):
    import random

    rng = random.Random(seed)
    base = dumpgrammar.seeds()[seed % 4] if seed % 2 else dumpgrammar.column_mix(rng.randrange, seed % 12, 8)
    _check(dumpgrammar.mutate(base, rng, 4), 1 + seed % 13)
