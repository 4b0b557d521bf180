"""`cfsc check`: expected digests and references, reproducibility, SOURCE_DATE_EPOCH."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
from cfsc import build, frontends, schemas
from cfsc.base.options import Options
from cfsc.cli.diff import render_check
from cfsc.frontends import reorder
from cfsc.tools import check

from tests.helpers.data import CONFORMANCE, DATA, cases, run_cfsc

pytestmark = [pytest.mark.tools]

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
    monkeypatch.setitem(frontends.FRONTENDS, "flaky", frontends.Frontend("flaky", "flaky_frontend", "test only: listing order matters"))
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
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # a pipe by path (as `<(…)`): read once, never reopened (nothing writes to it)
    p = run_cfsc("check", str(fifo), "--reproducible")
    assert p.returncode == 2 and b"can be read only once" in p.stderr, p.stderr


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
    lines = reorder.shuffle_dumpfile(dump, seed=3).splitlines()
    assert sorted(lines) == sorted(dump.splitlines())
    paths = [line.split(b" ", 1)[0] for line in lines]
    assert paths[0] == b"/" and paths.index(b"/d") < paths.index(b"/d/f") < paths.index(b"/d/e\\x2fx")
    assert reorder.shuffle_dumpfile(dump, seed=3) == reorder.shuffle_dumpfile(dump, seed=3)


def test_an_unknown_way_names_the_option(tmp_path):
    a = tmp_path / "a.dump"
    a.write_bytes(DUMP)
    p = run_cfsc("check", "--reproducible", str(a), "--ways", "shuffled,bogus")
    assert p.returncode == 2
    assert p.stderr.decode() == ("error: --ways: unknown way 'bogus': expected some of "
                                 "shuffled, reversed, threads, environment, dump, image\n")


# -- shuffled tar members and CRFS entries -----------------------------------------------------

TAR = sorted((DATA / "tar").glob("*.tar.xz"))
TOCS = [str(DATA / "crfs" / "basic.json"), str(DATA / "crfs" / "links.json"),
        f"{DATA / 'crfs' / 'layer-1.json'}+{DATA / 'crfs' / 'layer-2.json'}"]


def _member_paths(data: bytes) -> list[bytes]:
    import io

    from cfsc.frontends.tar.stream import TarReader

    with TarReader(io.BytesIO(data)) as reader:
        return [m.path for m in reader.members()]


@pytest.mark.parametrize("path", TAR, ids=[p.name.split("_")[0] for p in TAR])
def test_reproducible_with_tar_members_shuffled(path):
    import io
    import lzma

    out = io.BytesIO()
    reorder.shuffle_tar(str(path), out, seed=1)
    original = _member_paths(lzma.decompress(path.read_bytes()))
    shuffled = _member_paths(out.getvalue())
    assert sorted(shuffled) == sorted(original) and shuffled != original  # really another order
    report = check.reproducible(str(path), Options(), None, ["shuffled", "threads"])
    assert report.ok and [a.name for a in report.attempts] == ["shuffled", "threads"]
    p = run_cfsc("check", "--reproducible", str(path), "--ways", "shuffled", "--json")
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
    report = json.loads(p.stdout)
    assert schemas.problems("check-report", report) == [] and report["reproducible"][0]["way"] == "shuffled"


@pytest.mark.parametrize("source", TOCS, ids=["basic", "links", "layers"])
def test_reproducible_with_crfs_entries_shuffled(source):
    import io

    import orjson
    from cfsc.tools.manifest import inputs, layers

    side = layers(source)
    for one in inputs(side):
        out = io.BytesIO()
        reorder.shuffle_toc(one, out, seed=1)
        before = orjson.loads(open(one, "rb").read())["entries"]
        after = orjson.loads(out.getvalue())["entries"]
        assert sorted(map(orjson.dumps, after)) == sorted(map(orjson.dumps, before))
        assert len(before) < 4 or after != before
    report = check.reproducible(side, Options(), None, ["shuffled"])
    assert report.ok and [a.name for a in report.attempts] == ["shuffled"], check.report_json(report)


def test_shuffled_orders_mean_the_same(tmp_path):
    """Random layers and TOCs full of order-sensitive members (a path given twice, a file over a
    directory, hard links, whiteouts, nameless chunks): every order `reorder` allows compiles to
    the same image as the original (those the frontend accepts)."""
    import io
    import random

    import orjson
    from cfsc.base.errors import CfscError

    from tests.helpers.tarcraft import archive, member

    names = [b"a", b"b", b"a/x", b"a/y", b"b/x", b"a/x/z", b"c", b".wh.a", b"a/.wh.x", b"a/.wh..wh..opq"]

    def layer(rng):
        parts, files = [], []
        for _ in range(rng.randint(1, 12)):
            name, k = rng.choice(names), rng.random()
            if b".wh." in name:
                parts.append(member(b"./" + name))
            elif k < 0.35:
                parts.append(member(b"./" + name + b"/", typeflag=b"5", mode=rng.choice([0o755, 0o700])))
            elif k < 0.7:
                parts.append(member(b"./" + name, rng.choice([b"x", b"y" * 100]), mode=rng.choice([0o644, 0o600])))
                files.append(name)
            elif k < 0.8:
                parts.append(member(b"./" + name, typeflag=b"2", linkname=b"t"))
            elif files:
                parts.append(member(name, typeflag=b"1", linkname=b"./" + rng.choice(files)))
        return archive(*parts)

    def toc(rng):
        entries, files = [], []
        digest = "sha256:" + "ab" * 32
        for _ in range(rng.randint(1, 14)):
            name, k = rng.choice(["a", "b", "a/x", "a/y", "./a/", "/b", "a/x/z"]), rng.random()
            if k < 0.3:
                entries.append({"name": name, "type": "dir", "mode": rng.choice([0o755, 0o700])})
            elif k < 0.6:
                entries.append({"name": name, "type": "reg", "size": rng.choice([10, 10**5]), "digest": digest})
                files.append(name)
            elif k < 0.7:
                entries.append({"name": name, "type": "symlink", "linkName": "t"})
            elif k < 0.8 and files:
                entries.append({"name": name, "type": "hardlink", "linkName": rng.choice(files)})
            else:
                entries.append({"type": "chunk", "chunkOffset": rng.randint(0, 5) * 10**5, "chunkSize": 10**5})
        return orjson.dumps({"version": 1, "entries": entries})

    def compiled(inputs, fmt, options):
        return build.compile_tree(build.load([io.BytesIO(i) for i in inputs], options, fmt), options)

    tried = 0
    for seed in range(150):
        rng = random.Random(seed)
        for fmt, make, shuffle, options in (("tar", layer, reorder.shuffle_tar, Options(keep_whiteouts=bool(seed % 2))),
                                            ("crfs", toc, reorder.shuffle_toc, Options())):
            inputs = [make(rng) for _ in range(rng.randint(1, 3))]
            try:
                first = compiled(inputs, fmt, options)
            except CfscError:
                continue
            tried += 1
            for s in range(4):
                outs = []
                for i, data in enumerate(inputs):
                    out = io.BytesIO()
                    shuffle(io.BytesIO(data), out, seed=10 * s + i)
                    outs.append(out.getvalue())
                assert compiled(outs, fmt, options) == first, (fmt, seed, s)
    assert tried > 60


LAST_MEMBER = textwrap.dedent('''
    """A test tar frontend whose tree depends on the member order: the root records the last one."""
    from cfsc.frontends.tar import layers as tar
    from cfsc.frontends.tar.stream import TarReader

    def load(source, options):
        return load_many([source], options)

    def load_many(sources, options):
        tree = tar.load_many(sources, options)
        with TarReader(sources[-1]) as reader:
            last = [m.path for m in reader.members()][-1]
        tree.root.xattrs = tuple(sorted(tree.root.xattrs + ((b"user.order", last),)))
        return tree
''')
LAST_ENTRY = textwrap.dedent('''
    """A test CRFS frontend whose tree depends on the entry order: the root records the names in order."""
    import json

    from cfsc.frontends.crfs import toc as crfs

    def load(source, options):
        tree = crfs.load(source, options)
        names = " ".join(e.get("name", "-") for e in json.load(open(source))["entries"]).encode()
        tree.root.xattrs = tuple(sorted(tree.root.xattrs + ((b"user.order", names),)))
        return tree
''')


@pytest.mark.parametrize("fmt", ["tar", "crfs"])
def test_order_dependence_is_caught_by_shuffling(tmp_path, monkeypatch, fmt):
    module = f"last_{fmt}_frontend"
    (tmp_path / f"{module}.py").write_text(LAST_MEMBER if fmt == "tar" else LAST_ENTRY)
    monkeypatch.syspath_prepend(str(tmp_path))
    row = frontends.FRONTENDS[fmt]  # reordered as the real format, loaded by the test module
    monkeypatch.setitem(frontends.FRONTENDS, fmt, frontends.Frontend(
        fmt, module, "test only: the order matters", combines=True, reorder=row.reorder, reorder_detail=row.reorder_detail))
    source = str(TAR[0] if fmt == "tar" else DATA / "crfs" / "links.json")
    report = check.reproducible(source, Options(), fmt, ["shuffled", "threads"])
    assert not report.ok
    shuffled, threads = report.attempts
    assert threads.ok and shuffled.diff is not None
    [change] = shuffled.diff.changes
    assert change.path == b"/" and [a[:2] for a in change.attributes] == [("xattr", b"user.order")]
    import io

    out = io.BytesIO()
    render_check(report, out, color=False)
    text = out.getvalue().decode()
    assert "shuffled (entries reordered" in text or "shuffled (members reordered" in text
    assert "~ /\n    xattr user.order: " in text and text.endswith("not reproducible: 1 of 2 ways differ\n")
