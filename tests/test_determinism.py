"""Same tree, any valid line order → same bytes; compiling twice → same bytes."""

from __future__ import annotations

import random

import pytest
from cfsc.base.errors import TreeError

from tests.helpers.data import cases, image_of, read_input

GOOD = [c for c in cases() if c.get("expect") != "error"]


def shuffled(dump: bytes, seed: int) -> bytes:
    """The dump's records in another order that still lists parents before children."""
    lines = dump.rstrip(b"\n").split(b"\n")
    rng = random.Random(seed)
    root, rest = lines[0], lines[1:]
    keyed = [(line.split(b" ", 1)[0].rstrip(b"/").count(b"/"), rng.random(), line) for line in rest]
    keyed.sort()
    return b"\n".join([root] + [line for _d, _r, line in keyed]) + b"\n"


@pytest.mark.parametrize("case", GOOD, ids=[c["input"] for c in GOOD])
def test_line_order_does_not_matter(case):
    dump = read_input(case["input"])
    reference = image_of(dump, strict=False)
    assert image_of(dump, strict=False) == reference
    for seed in range(3):
        assert image_of(shuffled(dump, seed), strict=False) == reference


def test_writer_xattr_accounting_failure_is_reported_with_the_path():
    # The input already has the key the writer sets on whiteouts, with a longer value:
    # libcomposefs' budget goes negative and mkcomposefs fails with ERANGE.
    dump = (b"/ 0 40755 2 0 0 0 0.0 - - -\n"
            b"/w 0 20644 1 0 0 0 0.0 - - - user.overlay.whiteout=" + b"x" * 60 + b" user.other=1\n")
    with pytest.raises(TreeError) as info:
        image_of(dump)
    assert "/w" in str(info.value) and "accounting" in str(info.value)
    # The same value on a node the writer does not touch is fine.
    image_of(dump.replace(b"20644", b"100644"))


def test_pass_errors_name_the_dumpfile_line(cfsc, tmp_path):
    src = tmp_path / "w.dump"
    src.write_bytes(b"/ 0 40755 2 0 0 0 0.0 - - -\n/a 0 100644 1 0 0 0 0.0 - - -\n"
                    b"/w 0 20644 1 0 0 0 0.0 - - - user.overlay.whiteout=" + b"x" * 60 + b" user.other=1\n")
    p = cfsc("compile", str(src), "-o", str(tmp_path / "w.cfs"))
    assert p.returncode == 2
    assert f"{src}:3:/w: " in p.stderr.decode()
    assert not (tmp_path / "w.cfs").exists()
