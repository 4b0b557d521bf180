"""`cfsc check`: expected digests and references, reproducibility, SOURCE_DATE_EPOCH."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
from conftest import CONFORMANCE, cases, run_cfsc

from cfsc import check, frontends, schemas
from cfsc.cli.diff import render_check
from cfsc.options import Options

GOOD = [c for c in cases() if c.get("expect") != "error"]
DUMP = b"""\
/ 0 40755 2 0 0 0 100.0 - - -
/a 5 100644 1 0 0 0 100.0 - hello -
/d 0 40755 2 0 0 0 100.0 - - -
/d/f 3 100644 1 0 0 0 2000000000.5 - abc -
"""


@pytest.mark.parametrize("case", GOOD, ids=[c["input"] for c in GOOD])
def test_reproducible_on_every_conformance_dumpfile(case):
    path = str(CONFORMANCE / "upstream" / case["input"])
    strict = ["--strict"] if case.get("strict") else []
    p = run_cfsc("check", "--reproducible", *strict, path, "--json")
    report = json.loads(p.stdout)
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
    assert schemas.problems("check-report", report) == []
    assert report["ok"]
    ways = [w["way"] for w in report["reproducible"]]
    assert ways == ["shuffled", "reversed", "threads", "environment", "environment", "dump", "image"]
    assert {w["digest"] for w in report["reproducible"]} == {report["digest"]}


def test_reproducible_on_a_directory_tree(tmp_path):
    root = tmp_path / "tree"
    for d in ("a/b/c", "x", "y/z"):
        (root / d).mkdir(parents=True)
    for i, name in enumerate(["a/f", "a/b/g", "a/b/c/h", "x/big", "y/z/s", "top"]):
        (root / name).write_bytes(os.urandom(10 + 500 * i))
        os.setxattr(root / name, "user.n", b"%d" % (i % 2))
    os.link(root / "a/f", root / "x/f-link")
    os.symlink("../a/f", root / "x/sym")
    os.mkfifo(root / "y/fifo")
    p = run_cfsc("check", "--reproducible", "--hardlinks", str(root))
    out = p.stdout.decode()
    assert p.returncode == 0, out + p.stderr.decode()
    assert "shuffled" not in out and out.endswith("reproducible: 7 compilations, one digest\n")


FLAKY = textwrap.dedent('''
    """A test frontend whose tree depends on the order it happens to list its input in: a
    dumpfile whose lines come in another order each time, where a later line for a path wins."""
    import itertools
    import random

    from cfsc.frontends import dumpfile

    runs = itertools.count()

    def load(source, options):
        lines = open(source, "rb").read().splitlines()
        root, rest = lines[0], lines[1:]
        random.Random(next(runs)).shuffle(rest)
        last = {line.split(b" ", 1)[0]: line for line in rest}
        ordered = sorted(last.values(), key=lambda line: line.count(b"/"))
        return dumpfile.loads(b"\\n".join([root, *ordered]) + b"\\n", options, source)
''')


def test_non_determinism_is_caught_with_a_useful_diff(tmp_path, monkeypatch):
    (tmp_path / "flaky_frontend.py").write_text(FLAKY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(frontends.FRONTENDS, "flaky", ("flaky_frontend", "test only: listing order matters"))
    source = tmp_path / "input.dump"
    source.write_bytes(DUMP + b"/a 5 100600 1 0 0 0 100.0 - hello -\n")  # /a twice: which one wins?
    ways = ["reversed", "threads", "dump", "image"]
    report = check.reproducible(str(source), Options(), "flaky", ways)
    assert not report.ok
    bad = [a for a in report.attempts if not a.ok]
    assert bad and all(a.name in ("reversed", "threads") for a in bad)
    for attempt in bad:
        changes = attempt.diff.changes
        assert [(c.path, c.attributes) for c in changes] == [(b"/a", [("mode", None, changes[0].a[1], changes[0].b[1])])]
        assert {changes[0].a[1], changes[0].b[1]} == {0o644, 0o600}
    assert schemas.problems("check-report", check.report_json(report)) == []
    import io

    out = io.BytesIO()
    render_check(report, out, color=False)
    text = out.getvalue().decode()
    assert "differs from the first compilation:\n" in text and "~ /a\n    mode: " in text
    assert text.endswith(f"not reproducible: {len(bad)} of 4 ways differ\n")


def test_expect_digest_and_reference(tmp_path):
    a = tmp_path / "a.dump"
    a.write_bytes(DUMP)
    b = tmp_path / "b.dump"
    b.write_bytes(DUMP.replace(b"/a 5 100644", b"/a 5 100600"))
    digest = run_cfsc("compile", str(a), "--print-digest-only", check=True).stdout.decode().strip()
    assert run_cfsc("check", str(a), "--expect-digest", f"sha256:{digest}").returncode == 0
    assert run_cfsc("check", str(a), "--expect-digest", digest.upper()).returncode == 0
    p = run_cfsc("check", str(b), "--expect-digest", digest)
    assert p.returncode == 1 and b"DIFFERS" in p.stdout and b"--reference" in p.stdout
    image = tmp_path / "a.cfs"
    run_cfsc("compile", str(a), "-o", str(image), check=True)
    for reference in (image, a):
        p = run_cfsc("check", str(b), "--reference", str(reference), "--json")
        report = json.loads(p.stdout)
        assert p.returncode == 1 and schemas.problems("check-report", report) == []
        assert report["expected"] == digest and not report["ok"]
        assert report["diff"]["changes"][0]["attributes"] == [{"attribute": "mode", "a": 0o600, "b": 0o644}]
    assert run_cfsc("check", str(a), "--reference", str(image)).returncode == 0
    assert run_cfsc("check", str(a), "--expect-digest", "sha256:abc").returncode == 2
    assert run_cfsc("check", str(a)).returncode == 2
    assert run_cfsc("check", "-", "--reproducible", input=DUMP).returncode == 2


def test_clamp_mtime_from_source_date_epoch(tmp_path):
    a = tmp_path / "a.dump"
    a.write_bytes(DUMP)
    env = {"SOURCE_DATE_EPOCH": "1500000000"}
    image = tmp_path / "a.cfs"
    run_cfsc("compile", str(a), "-o", str(image), "--clamp-mtime", env=env, check=True)
    dumped = run_cfsc("dump", str(image), check=True).stdout
    assert b"/d/f 3 100644 1 0 0 0 1500000000.0 " in dumped  # later: clamped
    assert b"/a 5 100644 1 0 0 0 100.0 " in dumped  # earlier: kept
    assert run_cfsc("compile", str(a), "--print-digest-only", "--clamp-mtime").returncode == 2
    assert run_cfsc("compile", str(a), "--print-digest-only", "--clamp-mtime",
                    env={"SOURCE_DATE_EPOCH": "soon"}).returncode == 2
    # the child processes of --reproducible compile with the same clamp
    p = run_cfsc("check", "--reproducible", "--clamp-mtime", str(a), "--ways", "environment,dump", env=env)
    assert p.returncode == 0, p.stdout.decode()
    clamped = run_cfsc("compile", str(a), "--print-digest-only", "--clamp-mtime", env=env).stdout.decode().strip()
    assert f"sha256:{clamped}" in p.stdout.decode()
    # diff clamps a non-image side too
    assert run_cfsc("diff", "--clamp-mtime", str(a), str(image), env=env).returncode == 0
    assert run_cfsc("diff", str(a), str(image)).returncode == 1


def test_shuffle_keeps_parents_first():
    dump = DUMP + b"/d/e\\x2fx 0 100644 1 0 0 0 0.0 - - -\n"  # an escaped '/': one level deeper
    lines = check.shuffle_dumpfile(dump, seed=3).splitlines()
    assert sorted(lines) == sorted(dump.splitlines())
    paths = [line.split(b" ", 1)[0] for line in lines]
    assert paths[0] == b"/" and paths.index(b"/d") < paths.index(b"/d/f") < paths.index(b"/d/e\\x2fx")
    assert check.shuffle_dumpfile(dump, seed=3) == check.shuffle_dumpfile(dump, seed=3)


def test_an_unknown_way_names_the_option(tmp_path):
    a = tmp_path / "a.dump"
    a.write_bytes(DUMP)
    p = run_cfsc("check", "--reproducible", str(a), "--ways", "shuffled,bogus")
    assert p.returncode == 2
    assert p.stderr.decode() == ("error: --ways: unknown way 'bogus': expected some of "
                                 "shuffled, reversed, threads, environment, dump, image\n")
