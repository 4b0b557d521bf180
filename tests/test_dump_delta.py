"""The dumpfile shortcut of `cfsc diff` (`cfsc.frontends.dumpfile_delta`) says exactly what the full diff says."""

from __future__ import annotations

import random

import pytest
from cfsc.base.errors import CfscError
from cfsc.base.options import Options
from cfsc.frontends import dumpfile_delta as dump_delta
from cfsc.frontends.reorder import shuffle_dumpfile
from cfsc.tools import diff as diffing


def random_tree(rng: random.Random) -> list[bytes]:
    lines = [b"/ 0 40755 2 0 0 0 100.0 - - - user.root=%d" % rng.randint(0, 1)]
    dirs = [b""]
    files: list[bytes] = []
    for n in range(rng.randint(5, 60)):
        parent = rng.choice(dirs)
        name = rng.choice([b"f%d" % n, b"f%d" % n, b"sp\\x20%d" % n, b"%02x" % rng.randint(0, 255)])
        path = parent + b"/" + name
        if any(line.split(b" ", 1)[0] == path for line in lines):
            continue
        kind = rng.random()
        xattr = rng.choice([b"", b" user.a=1", b" user.a=2", b" trusted.overlay.opaque=y"])
        if kind < 0.2:
            lines.append(b"%s 0 40755 2 0 0 0 100.0 - - -%s" % (path, xattr))
            dirs.append(path)
        elif kind < 0.55:
            lines.append(b"%s 3 100644 1 0 0 0 100.0 - abc -%s" % (path, xattr))
            files.append(path)
        elif kind < 0.7:
            lines.append(b"%s 100 100755 1 0 0 0 100.0 ab/%064x - %064x%s" % (path, n, n, xattr))
            files.append(path)
        elif kind < 0.78:
            lines.append(b"%s 4 120777 1 0 0 0 100.0 dest - -" % path)
        elif kind < 0.86:
            lines.append(b"%s 0 20644 1 0 0 %d 100.0 - - -" % (path, rng.choice([0, 0, 259])))
        elif files:
            lines.append(b"%s 0 @100644 0 0 0 0 0.0 %s - -" % (path, rng.choice(files)))
    return lines


def mutate(rng: random.Random, lines: list[bytes]) -> list[bytes]:
    out = list(lines)
    for _ in range(rng.randint(0, 4)):
        k = rng.randrange(len(out))
        line = out[k]
        op = rng.random()
        if op < 0.2:
            out[k] = line.replace(b" 100644 ", b" 100600 ").replace(b" 40755 ", b" 40700 ")
        elif op < 0.35:
            out[k] = line + b" user.new=%d" % rng.randint(0, 3)
        elif op < 0.5:
            parent = line.split(b" ", 1)[0] if b" 40" in line else b""
            out.insert(rng.randrange(k + 1, len(out) + 1), b"%s/new%d 1 100644 1 0 0 0 100.0 - x -"
                       % (parent.rstrip(b"/"), rng.randint(0, 99)))
        elif op < 0.6 and k:
            del out[k]  # may orphan children or links: both diffs must then fail alike
        elif op < 0.7 and k:
            path = line.split(b" ", 1)[0]
            out = [x for x in out if not (x.split(b" ", 1)[0] + b"/").startswith(path + b"/")]
        elif op < 0.8 and k:  # moved (parents still first): the same tree
            out = shuffle_dumpfile(b"\n".join(out) + b"\n", rng.randint(0, 99)).splitlines()
        elif op < 0.9:
            out[k] = line.replace(b" 100.0 ", b" 101.5 ", 1)
        else:
            out.append(b"/wh%d 0 20000 1 0 0 0 100.0 - - -" % rng.randint(0, 9))
    return out


def outcome(a: bytes, b: bytes, tmp_path, full: bool, monkeypatch):
    pa, pb = tmp_path / "a.dump", tmp_path / "b.dump"
    pa.write_bytes(a)
    pb.write_bytes(b)
    with monkeypatch.context() as m:
        if full:
            m.setattr(dump_delta, "reduce", lambda *args: None)
        try:
            return diffing.report_json(diffing.diff(str(pa), str(pb), Options(), parallel=False))
        except CfscError as e:
            return type(e).__name__


def test_the_shortcut_agrees_with_the_full_diff(tmp_path, monkeypatch):
    monkeypatch.setattr(dump_delta, "MAX_SHARE", 1)  # small trees: let it apply however much differs
    rng = random.Random(8)
    applied = 0
    for _ in range(300):
        base = random_tree(rng)
        a = b"\n".join(base) + b"\n"
        b = b"\n".join(mutate(rng, base)) + b"\n"
        if rng.random() < 0.2:
            b = shuffle_dumpfile(b, rng.randint(0, 9))
        fast = outcome(a, b, tmp_path, False, monkeypatch)
        assert fast == outcome(a, b, tmp_path, True, monkeypatch), (a, b)
        applied += dump_delta.reduce(a, b, Options()) is not None
    assert applied > 150  # the shortcut is taken most of the time


PAD = b"".join(b"/pad%02d 1 100644 1 0 0 0 0.0 - x -\n" % i for i in range(30))  # so little differs


def test_what_it_keeps():
    a = (b"/ 0 40755 2 0 0 0 0.0 - - -\n/d 0 40755 2 0 0 0 0.0 - - -\n/d/e 0 40755 2 0 0 0 0.0 - - -\n"
         b"/d/e/f\\x20x 1 100644 1 0 0 0 0.0 - x -\n/d/g 1 100644 1 0 0 0 0.0 - y -\n/w 0 20000 1 0 0 0 0.0 - - -\n")
    b = a.replace(b"x 1 100644", b"x 1 100600")
    small_a, small_b = dump_delta.reduce(a + PAD, b + PAD, Options())
    assert small_a == (b"/ 0 40755 2 0 0 0 0.0 - - -\n/d 0 40755 2 0 0 0 0.0 - - -\n/w 0 20000 1 0 0 0 0.0 - - -\n"
                       b"/d/e 0 40755 2 0 0 0 0.0 - - -\n/d/e/f\\x20x 1 100644 1 0 0 0 0.0 - x -\n")
    assert small_b == small_a.replace(b"100644", b"100600")


ROOT = b"/ 0 40755 2 0 0 0 0.0 - - -\n"


@pytest.mark.parametrize("a,b", [
    # a hard link's target differs
    (ROOT + b"/f 1 100644 2 0 0 0 0.0 - x -\n/g 0 @100644 0 0 0 0 0.0 /f - -\n" + PAD,
     ROOT + b"/f 1 100600 2 0 0 0 0.0 - x -\n/g 0 @100644 0 0 0 0 0.0 /f - -\n" + PAD),
    # … or a link line (here: its target, written another way)
    (ROOT + b"/f 1 100644 2 0 0 0 0.0 - x -\n/g 0 @100644 0 0 0 0 0.0 /f - -\n" + PAD,
     ROOT + b"/f 1 100644 2 0 0 0 0.0 - x -\n/g 0 @100644 0 0 0 0 0.0 //f - -\n" + PAD),
    # strtoull's leniency: a mode with a sign
    (ROOT + b"/f 1 +100644 1 0 0 0 0.0 - x -\n" + PAD, ROOT + b"/f 1 +100600 1 0 0 0 0.0 - x -\n" + PAD),
    # a directory on one side only, with lines below it on the other (b is invalid)
    (ROOT + b"/d 0 40755 2 0 0 0 0.0 - - -\n/d/f 1 100644 1 0 0 0 0.0 - x -\n" + PAD,
     ROOT + b"/d/f 1 100644 1 0 0 0 0.0 - x -\n" + PAD),
    # everything differs
    (ROOT + b"/f 1 100644 1 0 0 0 0.0 - x -\n", ROOT + b"/f 1 100600 1 0 0 0 0.0 - x -\n"),
])
def test_when_it_steps_aside(a, b):
    assert dump_delta.reduce(a, b, Options()) is None
    assert dump_delta.reduce(a, b, Options(strict=True)) is None


def test_differing_lines_by_blocks_or_by_sets():
    rng = random.Random(1)
    base = [b"/x%06d 1 100644 1 0 0 0 0.0 - x -" % i for i in range(20000)]
    for _ in range(30):
        other = list(base)
        for _ in range(rng.randint(1, 5)):
            k = rng.randrange(len(other))
            op = rng.random()
            if op < 0.4:
                other[k] += b" user.x=1"
            elif op < 0.6:
                del other[k]
            elif op < 0.8:
                other.insert(k, b"/new%d 1 100644 1 0 0 0 0.0 - x -" % k)
            else:
                other.insert(rng.randrange(len(other)), other.pop(k))
        a, b = b"\n".join(base) + b"\n", b"\n".join(other) + b"\n"
        expected = set(base) - set(other), set(other) - set(base)
        assert dump_delta.differing_lines(a, b) == expected
        assert dump_delta._aligned(a, b) == expected  # these run alike: no sets needed
