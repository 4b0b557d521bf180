"""`cfsc diff`: one golden text per change kind, the same from every pairing of source kinds.

A directory tree is built twice (as is, and with one change), then each side is turned into
the other source kinds cfsc reads (the image compiled from it, that image's dumpfile, its CRFS
TOC).  Whatever the pairing, the diff must say exactly the golden text: the sources mean the
same image, so any extra line is a false difference of the normalisation.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest
from cfsc import schemas
from cfsc.base.options import Options
from cfsc.base.query import parse
from cfsc.build import compile_image, compile_in_memory
from cfsc.build.pipeline import run_passes
from cfsc.cli.diff import render
from cfsc.frontends.image import read_tree
from cfsc.tools import diff as diffing
from cfsc.tools.images import dump
from cfsc.tools.manifest import NORMALISE, Ignore, Manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.data import run_cfsc
from tests.helpers.strategies import trees

pytestmark = [pytest.mark.tools]

T0 = 1_700_000_000
EXTERNAL = bytes(range(256)) * 2  # 512 bytes: stored in the object store, not inline


def build(root: Path, change: str | None = None) -> Path:
    """The test tree, optionally with one change; every mtime fixed, so two builds are equal."""
    root.mkdir()
    (root / "etc").mkdir()
    (root / "bin").mkdir()
    (root / "data").mkdir()
    hostname = root / "etc/hostname"
    hostname.write_bytes(b"bot\n" if change == "inline" else b"box\n")
    big = root / "etc/big.conf"
    big.write_bytes(EXTERNAL[::-1] if change == "content" else EXTERNAL)
    big.chmod(0o600 if change == "chmod" else 0o644)
    tool = root / "bin/tool"
    tool.write_bytes(b"#!/bin/sh\n" + b"x" * 100)
    tool.chmod(0o755)
    if change != "xattr-remove":
        os.setxattr(tool, "user.origin", b"pkg-2" if change == "xattr" else b"pkg-1")
    if change == "xattr-add":
        os.setxattr(hostname, "user.note", b"added")
    if change == "chown":
        os.chown(tool, 1000, 1000)
    os.symlink("tool2" if change == "symlink" else "tool", root / "bin/sh")
    a = root / "data/a"
    a.write_bytes(b"shared " * 20)
    if change == "hardlink":
        (root / "data/b").write_bytes(b"shared " * 20)
    else:
        os.link(a, root / "data/b")
    if change == "add":
        (root / "data/new").mkdir()
        (root / "data/new/file").write_bytes(b"new\n")
    if change == "remove":
        big.unlink()
    if change == "type":
        hostname.unlink()
        hostname.mkdir()
    if change == "whiteout":
        os.mknod(root / "data/gone", 0o20000 | 0o644, 0)
    if change in ("device", "rdev"):
        os.mknod(root / "data/disk", 0o60000 | 0o660, os.makedev(8, 1 if change == "rdev" else 0))
    for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)) + [root]:
        t = T0 + 60 if change == "mtime" and path.name == "hostname" else T0
        os.utime(path, ns=(t * 10**9, t * 10**9), follow_symlinks=False)
    root.chmod(0o755)
    return root


GOLDEN = {
    "chmod": """\
~ /etc/big.conf
    mode: 0644 → 0600
1 entry differs: 0 added, 0 removed, 1 changed
""",
    "inline": """\
~ /etc/hostname
    content: "box\\n" → "bot\\n"
1 entry differs: 0 added, 0 removed, 1 changed
""",
    "xattr": """\
~ /bin/tool
    xattr user.origin: "pkg-1" → "pkg-2"
1 entry differs: 0 added, 0 removed, 1 changed
""",
    "xattr-add": """\
~ /etc/hostname
    xattr user.note: added "added"
1 entry differs: 0 added, 0 removed, 1 changed
""",
    "xattr-remove": """\
~ /bin/tool
    xattr user.origin: removed (was "pkg-1")
1 entry differs: 0 added, 0 removed, 1 changed
""",
    "chown": """\
~ /bin/tool
    uid: 0 → 1000
    gid: 0 → 1000
1 entry differs: 0 added, 0 removed, 1 changed
""",
    "symlink": """\
~ /bin/sh
    target: "tool" → "tool2"
1 entry differs: 0 added, 0 removed, 1 changed
""",
    "mtime": """\
~ /etc/hostname
    mtime: 1700000000 (2023-11-14T22:13:20Z) → 1700000060 (2023-11-14T22:14:20Z)
1 entry differs: 0 added, 0 removed, 1 changed
""",
    "hardlink": """\
~ /data/a
    nlink: 2 → 1
    hardlinks: /data/a, /data/b → (none)
~ /data/b
    nlink: 2 → 1
    hardlinks: /data/a, /data/b → (none)
2 entries differ: 0 added, 0 removed, 2 changed
""",
    "add": """\
+ /data/new  dir 0755
+ /data/new/file  reg 0644 4 bytes
2 entries differ: 2 added, 0 removed, 0 changed
""",
    "remove": """\
- /etc/big.conf  reg 0644 512 bytes
1 entry differs: 0 added, 1 removed, 0 changed
""",
    "type": """\
~ /etc/hostname
    type: reg → dir
    mode: 0644 → 0755
    size: 4 → (none)
    nlink: 1 → (none)
    content: "box\\n" → (none)
1 entry differs: 0 added, 0 removed, 1 changed
""",
    "whiteout": """\
~ /data
    xattr trusted.overlay.opaque: added "x"
    xattr user.overlay.opaque: added "x"
+ /data/gone  whiteout 0644
2 entries differ: 1 added, 0 removed, 1 changed
""",
}
# Changes between two changed trees: (tree A, tree B, golden text).
GOLDEN_BETWEEN = {
    "join": ("hardlink", "base", """\
~ /data/a
    nlink: 1 → 2
    hardlinks: (none) → /data/a, /data/b
~ /data/b
    nlink: 1 → 2
    hardlinks: (none) → /data/a, /data/b
2 entries differ: 0 added, 0 removed, 2 changed
"""),
    "rdev": ("device", "rdev", """\
~ /data/disk
    rdev: 8:0 → 8:1
1 entry differs: 0 added, 0 removed, 1 changed
"""),
}
# The content change: the payload is the object path of the file's fs-verity digest, so both
# change; the golden text is completed from the digests (computed, not copied).
PAIRS = [("dir", "dir"), ("image", "dir"), ("dir", "image"), ("dump", "image"), ("image", "image"),
         ("crfs", "dump"), ("dump", "crfs"), ("tar", "dir"), ("dump", "tar"), ("tar", "image")]


def _content_golden() -> str:
    from cfsc.base.fsverity import digest_bytes, payload_path

    a, b = digest_bytes(EXTERNAL), digest_bytes(EXTERNAL[::-1])
    return (f'~ /etc/big.conf\n    payload: "{payload_path(a).decode()}" → "{payload_path(b).decode()}"\n'
            f"    digest: {a.hex()} → {b.hex()}\n1 entry differs: 0 added, 0 removed, 1 changed\n")


GOLDEN["content"] = _content_golden()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """change → {kind: path} for the original tree ("base") and each changed one."""
    top = tmp_path_factory.mktemp("diff")
    made = {}
    for change in ["base", *GOLDEN, "device", "rdev"]:
        d = build(top / change, None if change == "base" else change)
        image = top / f"{change}.cfs"
        compile_image([str(d)], str(image), Options(hardlinks=True))
        paths = {"dir": str(d), "image": str(image)}
        for kind, fmt, suffix in (("dump", "dump", ".dump"), ("crfs", "crfs", ".json")):
            with open(top / (change + suffix), "wb") as out:
                dump(str(image), out, fmt)
            paths[kind] = str(top / (change + suffix))
        tar = top / f"{change}.tar"  # GNU tar as root keeps owners, modes, xattrs, devices, links
        subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "--format=posix",
                        "-cf", str(tar), "-C", str(d), "."], check=True)
        paths["tar"] = str(tar)
        made[change] = paths
    return made


def body(report) -> str:
    out = io.BytesIO()
    render(report, out, color=False)
    lines = out.getvalue().decode().splitlines(keepends=True)[2:]  # without the ---/+++ header
    if report.layout:  # … and without the reasons two images' bytes differ (test_explain)
        start = lines.index("image bytes differ; why:\n")
        del lines[start:start + 1 + len(report.layout)]
    return "".join(lines)


def check_golden(a: dict, b: dict, golden: str, pairs=PAIRS) -> None:
    """The diff of `a` and `b` ({kind: path}) in every pairing of kinds is `golden`, and swapped back
    the same changes."""
    options = Options(hardlinks=True)
    for kind_a, kind_b in pairs:
        report = diffing.diff(a[kind_a], b[kind_b], options, parallel=False)
        assert body(report) == golden, f"{kind_a} vs {kind_b}"
        assert not report.identical
        # and back: the same changes, sides swapped
        back = diffing.diff(b[kind_b], a[kind_a], options, parallel=False)
        assert [c.path for c in back.changes] == [c.path for c in report.changes]
        swap = {"added": "removed", "removed": "added", "changed": "changed"}
        assert [c.kind for c in back.changes] == [swap[c.kind] for c in report.changes]


@pytest.mark.parametrize("change", list(GOLDEN))
def test_golden_for_every_pairing(sources, change):
    check_golden(sources["base"], sources[change], GOLDEN[change])


@pytest.mark.parametrize("change", list(GOLDEN_BETWEEN))
def test_golden_between_changed_trees(sources, change):
    a, b, golden = GOLDEN_BETWEEN[change]
    check_golden(sources[a], sources[b], golden)


def test_golden_standalone_size_change(sources, tmp_path):
    """A size change alone (same payload and digest): only dumpfiles, CRFS TOCs and images hold one."""
    base = sources["base"]
    text = Path(base["dump"]).read_bytes()
    line = next(line for line in text.splitlines() if line.startswith(b"/etc/big.conf "))
    assert line.split(b" ")[1] == b"512"
    changed = {"dump": str(tmp_path / "size.dump"), "image": str(tmp_path / "size.cfs"), "crfs": str(tmp_path / "size.json")}
    Path(changed["dump"]).write_bytes(text.replace(line, line.replace(b" 512 ", b" 600 ", 1)))
    compile_image([changed["dump"]], changed["image"], Options())
    with open(changed["crfs"], "wb") as out:
        dump(changed["image"], out, "crfs")
    check_golden(base, changed, """\
~ /etc/big.conf
    size: 512 → 600
1 entry differs: 0 added, 0 removed, 1 changed
""", [("dump", "dump"), ("dump", "image"), ("image", "crfs"), ("crfs", "dump"), ("dir", "image")])


@pytest.mark.parametrize("kind_a,kind_b", PAIRS)
def test_same_tree_in_every_pairing_is_identical(sources, kind_a, kind_b):
    report = diffing.diff(sources["base"][kind_a], sources["base"][kind_b], Options(hardlinks=True), parallel=False)
    assert report.changes == [], body(report)
    assert report.identical or {kind_a, kind_b} != {"image"}


OSTREE_CHANGES = ["chmod", "inline", "xattr", "xattr-add", "xattr-remove", "chown", "symlink", "add", "remove", "type"]


@pytest.fixture(scope="module")
def ostree_repo(tmp_path_factory):
    """An OSTree repository with a commit of the base tree and of each change OSTree can hold
    (no devices; every mtime 0, so no mtime change)."""
    top = tmp_path_factory.mktemp("ostree")
    repo = top / "repo"
    subprocess.run(["ostree", f"--repo={repo}", "init", "--mode=bare"], check=True)
    for change in ["base", *OSTREE_CHANGES]:
        d = build(top / change, None if change == "base" else change)
        # (branches named `tree-…`: a bare `add` is also hex, which ostree reads as the start of
        # a commit checksum first, and one commit in 4096 starts with it)
        subprocess.run(["ostree", f"--repo={repo}", "commit", f"--branch=tree-{change}", f"--tree=dir={d}"],
                       check=True, capture_output=True)
    return repo


@pytest.mark.parametrize("change", OSTREE_CHANGES)
def test_golden_for_ostree_commits(ostree_repo, tmp_path, change):
    base, changed = f"ostree:{ostree_repo}:tree-base", f"ostree:{ostree_repo}:tree-{change}"
    image = tmp_path / "changed.cfs"
    compile_image([changed], str(image), Options())
    # The payload of a file from a bare repository is its object, whose name hashes the file's
    # metadata too: a chmod or chown also changes it (a true difference of the images).
    for b in (changed, str(image)):
        report = diffing.diff(base, b, Options(), ignore=Ignore(["payload"]), parallel=False)
        assert body(report) == GOLDEN[change], b
    assert diffing.diff(base, base, Options(), parallel=False).identical


def test_cli_exit_codes_json_and_stat(sources):
    base, changed = sources["base"], sources["chmod"]
    same = run_cfsc("diff", "--hardlinks", base["dir"], base["image"])
    assert same.returncode == 0 and same.stdout.decode().endswith("identical\n")
    p = run_cfsc("diff", "--hardlinks", base["image"], changed["dir"], "--json")
    assert p.returncode == 1
    report = json.loads(p.stdout)
    assert schemas.problems("diff-report", report) == []
    assert report["changes"] == [{
        "path": "/etc/big.conf", "change": "changed",
        "a": report["changes"][0]["a"], "b": report["changes"][0]["b"],
        "attributes": [{"attribute": "mode", "a": 0o644, "b": 0o600}]}]
    assert report["summary"] == {"added": 0, "removed": 0, "changed": 1, "attributes": {"mode": 1}}
    stat = run_cfsc("diff", "--hardlinks", base["dump"], changed["dir"], "--stat")
    assert stat.returncode == 1 and b"changed 1" in stat.stdout and b"/etc  +0 -0 ~1" in stat.stdout
    stat_json = json.loads(run_cfsc("diff", "--hardlinks", base["dump"], changed["dir"], "--stat", "--json").stdout)
    assert "changes" not in stat_json and schemas.problems("diff-report", stat_json) == []
    assert run_cfsc("diff", base["dump"], "/nonexistent").returncode == 2
    assert run_cfsc("diff", base["dump"], base["dump"], "--where", "size >").returncode == 2
    assert run_cfsc("diff", base["dump"], base["dump"], "--ignore", "colour").returncode == 2
    # colour only on request (stdout is not a terminal here)
    assert b"\033[" not in p.stdout and b"\033[" in run_cfsc(
        "diff", "--hardlinks", base["image"], changed["dir"], "--color", "always").stdout


def test_json_of_every_change_kind_validates(sources):
    for change in GOLDEN:
        report = diffing.diff(sources["base"]["image"], sources[change]["image"], parallel=False)
        obj = diffing.report_json(report)
        assert schemas.problems("diff-report", obj) == [], change
        assert obj["layout"][0]["aspect"] == "digest"


def test_ignore_where_and_exclude(sources):
    base = sources["base"]["dump"]
    options = Options(hardlinks=True)
    chown = sources["chown"]["dir"]
    assert diffing.diff(base, chown, options, ignore=Ignore.parse(["owner"]), parallel=False).identical
    assert [a[0] for a in diffing.diff(base, chown, options, ignore=Ignore.parse(["uid"]), parallel=False)
            .changes[0].attributes] == ["gid"]
    xattr = sources["xattr"]["image"]
    assert not diffing.diff(base, xattr, parallel=False).identical
    assert diffing.diff(base, xattr, ignore=Ignore.parse(["xattr:user.origin"]), parallel=False).changes == []
    added = sources["add"]["dir"]
    only_files = diffing.diff(base, added, options, where=parse("type == reg"), parallel=False)
    assert [c.path for c in only_files.changes] == [b"/data/new/file"]
    assert diffing.diff(base, added, options, where=parse('path ~ "/etc/**"'), parallel=False).changes == []
    excluded = Options(hardlinks=True, exclude=('path ~ "/data/new"',))
    assert diffing.diff(base, added, excluded, parallel=False).changes == []


WHERE_A = b"""\
/ 0 40755 2 0 0 0 0.0 - - -
/big 2000000 100644 1 0 0 0 0.0 ab/cd - -
/small 10 100644 1 0 0 0 0.0 ab/ce - -
/l 3 120777 1 0 0 0 0.0 foo - -
/m 3 120777 1 0 0 0 0.0 baz - -
"""
WHERE_B = (WHERE_A.replace(b"/big 2000000 100644 1 0 0 0 0.0 ab/cd", b"/big 2000001 100644 1 5 0 0 0.0 ab/cf")
           .replace(b"/l 3 120777 1 0 0 0 0.0 foo", b"/l 3 120777 1 7 0 0 0.0 bar")
           .replace(b"/m 3 120777 1 0 0 0 0.0 baz", b"/m 3 120777 1 0 0 0 0.0 qux"))


def test_where_sees_attributes_that_are_ignored(tmp_path):
    """`--ignore` hides attributes from the comparison, not from the `--where` filter."""
    a, b = tmp_path / "a.dump", tmp_path / "b.dump"
    a.write_bytes(WHERE_A)
    b.write_bytes(WHERE_B)
    b_image = tmp_path / "b.cfs"
    compile_image([str(b)], str(b_image), Options())
    for other in (b, b_image):  # the dumpfile fast path and whole manifests
        p = run_cfsc("diff", str(a), str(other), "--ignore", "size", "--where", "size > 1K")
        assert p.returncode == 1, p.stdout
        assert p.stdout.decode().splitlines()[2:] == [
            "~ /big", "    uid: 0 → 5", '    payload: "ab/cd" → "ab/cf"',
            "1 entry differs: 0 added, 0 removed, 1 changed"]
        report = diffing.diff(str(a), str(other), ignore=Ignore(["target"]), where=parse('target == "foo"'),
                              parallel=False)
        assert [(c.path, c.attributes) for c in report.changes] == [(b"/l", [("uid", None, 0, 7)])]
        # /m differs only in its ignored target: no change, whatever the filter
        assert diffing.diff(str(a), str(other), ignore=Ignore(["target", "owner", "payload", "size"]),
                            where=parse('path ~ "/m"'), parallel=False).identical
        # an ignored xattr key is still visible to the filter
    c = tmp_path / "c.dump"
    c.write_bytes(WHERE_A.replace(b"/small 10 100644 1 0 0 0 0.0 ab/ce - -",
                                  b"/small 10 100644 1 0 0 0 0.0 ab/ce - - user.tag=x"))
    d = tmp_path / "d.dump"
    d.write_bytes(c.read_bytes().replace(b"/small 10 100644 1 0", b"/small 10 100600 1 0").replace(b"user.tag=x", b"user.tag=y"))
    report = diffing.diff(str(c), str(d), ignore=Ignore(["xattr:user.tag"]), where=parse('xattr["user.tag"] == "x"'),
                          parallel=False)
    assert [(c.path, c.attributes) for c in report.changes] == [(b"/small", [("mode", None, 0o644, 0o600)])]


def _layers(tmp_path) -> dict[str, str]:
    """Two stacks of two layers, A and B (B's top layer: one file changed, one more whited out),
    and the image of stack A; members are spelled like an OCI layer's."""
    from tests.helpers.tarcraft import archive, member

    bottom = archive(member(b"etc/", typeflag=b"5", mode=0o755), member(b"etc/keep", b"kept\n"),
                     member(b"etc/gone", b"whited out\n"), member(b"etc/also", b"also\n"),
                     member(b"usr/", typeflag=b"5", mode=0o755), member(b"usr/tool", b"t" * 300, mode=0o755))
    top_a = archive(member(b"etc/.wh.gone"), member(b"etc/new", b"new\n", mode=0o600))
    top_b = archive(member(b"etc/.wh.gone"), member(b"etc/.wh.also"), member(b"etc/new", b"new\n", mode=0o640))
    made = {}
    for name, data in (("l1.tar", bottom), ("l2a.tar", top_a), ("l2b.tar", top_b)):
        (tmp_path / name).write_bytes(data)
        made[name] = str(tmp_path / name)
    made["image"] = str(tmp_path / "a.cfs")
    compile_image([made["l1.tar"], made["l2a.tar"]], made["image"], Options())
    made["A"] = made["l1.tar"] + "+" + made["l2a.tar"]
    made["B"] = made["l1.tar"] + "+" + made["l2b.tar"]
    return made


def test_layers_as_a_side(tmp_path):
    """`L1.tar+L2.tar`: a stack of layers against an image, against another stack, in check."""
    made = _layers(tmp_path)
    same = run_cfsc("diff", made["A"], made["image"])
    assert same.returncode == 0, same.stdout.decode() + same.stderr.decode()
    assert same.stdout.decode() == f"--- {made['A']} (tar)\n+++ {made['image']} (image)\nidentical\n"
    golden = ["~ /etc/new", "    mode: 0600 → 0640", "- /etc/also  reg 0644 5 bytes",
              "2 entries differ: 0 added, 1 removed, 1 changed"]
    for a in (made["A"], made["image"]):  # layers vs layers, image vs layers
        p = run_cfsc("diff", a, made["B"])
        assert p.returncode == 1
        assert sorted(p.stdout.decode().splitlines()[2:-1]) == sorted(golden[:-1])
        assert p.stdout.decode().splitlines()[-1] == golden[-1]
    # the bottom layer alone is a plain source: the top layer's changes show
    p = run_cfsc("diff", made["l1.tar"], made["A"], "--json")
    report = json.loads(p.stdout)
    assert p.returncode == 1 and schemas.problems("diff-report", report) == []
    assert report["b"]["source"] == made["A"]
    assert [(c["path"], c["change"]) for c in report["changes"]] == [
        ("/etc/gone", "removed"), ("/etc/new", "added")]
    # in the library: a tuple of layers
    report = diffing.diff((made["l1.tar"], made["l2a.tar"]), made["image"], parallel=True)
    assert report.changes == [] and report.a.name == made["A"]
    # cfsc check: the same syntax
    digest = run_cfsc("compile", made["l1.tar"], made["l2a.tar"], "--print-digest-only", check=True).stdout
    p = run_cfsc("check", made["A"], "--expect-digest", digest.decode().strip(), "--reproducible",
                 "--ways", "shuffled,threads,environment")
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
    assert p.stdout.decode().endswith("reproducible: 5 compilations, one digest\n")
    p = run_cfsc("check", made["B"], "--reference", made["A"], "--json")
    assert p.returncode == 1 and json.loads(p.stdout)["reference"] == made["A"]


def test_layers_syntax_edges(tmp_path):
    made = _layers(tmp_path)
    # a file whose name has a + is that file
    plus = tmp_path / "a+b.tar"
    plus.write_bytes(Path(made["l1.tar"]).read_bytes())
    assert run_cfsc("diff", str(plus), made["l1.tar"]).returncode == 0
    # a missing layer is named; a name none of whose parts exists is named whole
    p = run_cfsc("diff", made["l1.tar"] + "+" + str(tmp_path / "nope.tar"), made["image"])
    assert p.returncode == 2 and p.stderr.decode().startswith(f"error: {tmp_path / 'nope.tar'}: cannot open")
    p = run_cfsc("diff", str(tmp_path / "x+y.tar"), made["image"])
    assert p.returncode == 2 and p.stderr.decode().startswith(f"error: {tmp_path / 'x+y.tar'}: cannot open")
    # layers of another format do not stack
    p = run_cfsc("diff", made["image"] + "+" + made["image"], made["image"])
    assert p.returncode == 2 and b"image sources do not combine" in p.stderr
    assert "base.tar+app.tar.gz" in run_cfsc("diff", "--help").stdout.decode()


def test_parallel_and_sequential_agree(sources):
    a, b = sources["base"]["dir"], sources["hardlink"]["dump"]
    options = Options(hardlinks=True)
    one = diffing.report_json(diffing.diff(a, b, options, parallel=False))
    two = diffing.report_json(diffing.diff(a, b, options, parallel=True))
    assert one == two
    # an error in the worker comes back as the same one-line error
    p = run_cfsc("diff", a, "/nonexistent.dump", "--threads", "2")
    assert p.returncode == 2 and p.stderr.startswith(b"error: /nonexistent.dump:")


class Counting(Manifest):
    asked: list

    def listings(self, paths):
        self.asked.extend(paths)
        return super().listings(paths)


def _manifest(dump: bytes, **options):
    from cfsc.frontends import dumpfile

    opts = Options(**options)
    tree = run_passes(dumpfile.loads(dump, opts), opts, NORMALISE)
    m = Counting(tree, True, Ignore(), "x", "dump")
    m.asked = []
    return m


def test_equal_subtrees_are_skipped():
    lines = [b"/ 0 40755 2 0 0 0 0.0 - - -"]
    for d in range(20):
        lines.append(b"/d%02d 0 40755 2 0 0 0 0.0 - - -" % d)
        for s in range(5):
            lines.append(b"/d%02d/s%d 0 40755 2 0 0 0 0.0 - - -" % (d, s))
            lines += [b"/d%02d/s%d/f%d 3 100644 1 0 0 0 0.0 - abc -" % (d, s, f) for f in range(10)]
    a = b"\n".join(lines) + b"\n"
    b = a.replace(b"/d07/s3/f4 3 100644", b"/d07/s3/f4 3 100600")
    ma, mb = _manifest(a), _manifest(b)
    changes = diffing.diff_manifests(ma, mb)
    assert [(c.path, c.attributes) for c in changes] == [(b"/d07/s3/f4", [("mode", None, 0o644, 0o600)])]
    assert ma.asked == mb.asked == [b"/", b"/d07", b"/d07/s3"]  # one path down, nothing else
    assert _manifest(a).root()[1] == ma.root()[1] != mb.root()[1]


SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(trees())
def test_a_tree_and_its_image_are_identical(tree):
    """The normalisation is exact: records and fingerprints of a source equal those of its image."""
    for version in (0, 1):
        options = Options(max_version=version)
        image = compile_in_memory(tree.copy(), options)
        source = run_passes(tree.copy(), options, NORMALISE)
        a = Manifest(source, True, Ignore(), "tree", "dump")
        b = Manifest(read_tree(image), False, Ignore(), "image", "image", image)
        assert diffing.diff_manifests(a, b) == []
        assert a.root() == b.root()


def _mutated(tree, data):
    """A copy of `tree` with a few entries changed, removed or linked, as `data` draws."""
    from cfsc.base.tree import S_IFMT, S_IFREG
    from hypothesis import strategies as st

    tree = tree.copy()
    entries = []
    stack = [tree.root]
    while stack:
        directory = stack.pop()
        for name, child in directory.children.items():
            entries.append((directory, name, child))
            if child.children is not None and not (directory.links and name in directory.links):
                stack.append(child)
    for _ in range(data.draw(st.integers(0, 4)) if entries else 0):
        parent, name, node = data.draw(st.sampled_from(entries))
        op = data.draw(st.sampled_from(["mode", "uid", "mtime", "xattr", "content", "rdev", "remove", "link"]))
        if op == "mode":
            node.mode = (node.mode & S_IFMT) | 0o711
        elif op == "uid":
            node.uid = data.draw(st.sampled_from([0, 7, 70000]))
        elif op == "mtime":
            node.mtime += 1
        elif op == "xattr":
            node.xattrs = tuple(sorted({**dict(node.xattrs), b"user.a": data.draw(st.binary(max_size=3))}.items()))
        elif op == "content" and node.content is not None:
            node.content = node.content[::-1] + b"!"
            node.size = len(node.content)
        elif op == "rdev" and node.rdev:
            node.rdev += 1
        elif op == "remove" and name in parent.children:
            del parent.children[name]
            if parent.links:
                parent.links.discard(name)
        elif op == "link" and node.mode & S_IFMT == S_IFREG:
            target = data.draw(st.sampled_from([d for d, _n, _c in entries] + [tree.root]))
            if target.children is not None and b"new-link" not in target.children:
                target.add_child(b"new-link", node, link=True)
    return tree


@SETTINGS
@given(trees(), st.data())
def test_images_in_step_agree_with_manifests(tree, data):
    """Two images walked in step give the changes the manifests of the two trees give."""
    from cfsc.tools.diff import diff_in_step

    other = data.draw(st.one_of(st.just(None), trees()))
    b_tree = _mutated(tree, data) if other is None else other
    from cfsc.base.errors import CfscError

    try:
        images = [compile_in_memory(t, Options(max_version=data.draw(st.sampled_from([0, 1]))))
                  for t in (tree.copy(), b_tree)]
    except CfscError:  # a change the compiler refuses (an xattr on a whiteout too long …)
        return
    ignore = Ignore(data.draw(st.sampled_from([[], ["mtime"], ["xattr:user.a"], ["hardlinks", "nlink"]])))
    where = data.draw(st.sampled_from([None, parse("type == reg"), parse("uid > 5")]))
    fast = diff_in_step(images[0], images[1], ignore.fields, ignore.projection(), where)
    sides = [Manifest(read_tree(image), False, ignore, "x", "image", image) for image in images]
    assert fast == diffing.diff_manifests(sides[0], sides[1], where)


def test_reasons_from_a_worker_process_are_the_same(sources, monkeypatch):
    """Big images have their bytes explained by a forked worker while the trees are compared."""
    from cfsc.backends.erofs.reader import Image

    a, b = Image.open(sources["base"]["image"]), Image.open(sources["xattr"]["image"])
    here = diffing.report_json(diffing.diff_images(a, b))
    monkeypatch.setattr(diffing, "ASIDE_MIN", 0)
    assert diffing.report_json(diffing.diff_images(a, b)) == here
    assert [r["aspect"] for r in here["layout"]][:2] == ["digest", "tree"]
    # --ignore layout: no reasons worked out at all
    monkeypatch.setattr("cfsc.tools.explain.explain", lambda *args, **kw: pytest.fail("explained"))
    assert diffing.diff_images(a, b, ignore=Ignore(["layout"])).layout is None


def test_images_another_writer_linked_fall_back_to_manifests():
    """An inode of nlink 1 reached by two names (a writer that does not count links): the
    in-step walk leaves it to the manifests, whose reader homes the link."""
    from cfsc.backends.erofs.entries import resolve
    from cfsc.backends.erofs.reader import Image
    from cfsc.frontends.image import read_tree
    from cfsc.tools.diff import _Unsuited, diff_in_step

    from tests.helpers.data import image_of

    dump = b"/ 0 40755 2 0 0 0 0.0 - - -\n/x 3 100644 1 0 0 0 0.0 - abc -\n/y 3 100600 1 0 0 0 0.0 - xyz -\n"
    image = image_of(dump)
    nid_x, nid_y = (resolve(Image(image), p).nid for p in (b"/x", b"/y"))
    root = Image(image).inode(Image(image).root_nid)
    assert not root.tail_size  # the dirents (with 256 root whiteouts) fill a block
    region = slice(root.blkaddr * 4096, root.blkaddr * 4096 + root.size)
    assert image[region].count(nid_y.to_bytes(8, "little")) == 1
    patched = bytearray(image)
    patched[region] = image[region].replace(nid_y.to_bytes(8, "little"), nid_x.to_bytes(8, "little"))
    a, b = Image(bytes(patched), "linked"), Image(image, "plain")
    with pytest.raises(_Unsuited):
        diff_in_step(a, b, Ignore().fields, None)
    report = diffing.diff_images(a, b)
    sides = [Manifest(read_tree(x), False, Ignore(), x.name, "image", x) for x in (a, b)]
    assert report.changes == diffing.diff_manifests(sides[0], sides[1])
    assert [c.path for c in report.changes] == [b"/x", b"/y"]


_NAMES = st.binary(min_size=1, max_size=3).filter(lambda n: b"/" not in n and b"\0" not in n)


@given(st.lists(st.lists(_NAMES, min_size=1, max_size=4).map(lambda parts: b"/" + b"/".join(parts)), max_size=12))
@settings(max_examples=300, deadline=None)
def test_changes_come_in_depth_first_path_order(paths):
    """The sort key (one bytes object a change) orders as the paths' components do."""
    changes = [diffing.Change(path, "added", None, None) for path in paths]
    by_key = sorted(changes, key=diffing._order)
    assert [c.path for c in by_key] == sorted(paths, key=lambda p: p.split(b"/"))
