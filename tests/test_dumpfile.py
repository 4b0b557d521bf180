"""The dumpfile frontend: upstream's parsing rules, quirks and located errors."""

from __future__ import annotations

import pytest
from cfsc.backends.dumptext import BadEscape, escape, escape_equal, escape_ls, escape_optional, unescape
from cfsc.base.errors import CfscError, DumpfileError
from cfsc.base.tree import S_IFCHR, S_IFDIR, S_IFREG
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.data import image_of, tree_of

ROOT = b"/ 0 40755 2 0 0 0 0.0 - - -\n"


def error_of(dump: bytes, **options) -> DumpfileError:
    with pytest.raises(DumpfileError) as info:
        tree_of(dump, **options)
    return info.value


def test_fields_and_escapes():
    tree = tree_of(ROOT + b"/a\\x20b\\\\c 5 100640 3 1000 100 0 12.34 - a\\tb\\nc - user.k\\x3d=v=w\\x00z\n")
    node = tree.root.children[b"a b\\c"]
    assert (node.mode, node.nlink, node.uid, node.gid, node.mtime, node.mtime_nsec) == (0o100640, 3, 1000, 100, 12, 34)
    assert node.content == b"a\tb\nc" and node.size == 5
    assert node.xattrs == ((b"user.k=", b"v=w\0z"),)


@given(st.binary(max_size=64))
def test_every_escaping_is_undone_by_the_one_unescape(data):
    """The writer's escapes (backend, listings) and the reader's unescape are one module."""
    for escaped in (escape(data), escape_equal(data), escape_ls(data)):
        assert unescape(escaped) == data
    assert b" " not in escape(data) and b"=" not in escape_equal(data)
    assert unescape(escape_optional(data)) == data and escape_optional(None) == b"-"


def test_escapes_as_composefs_info_writes_them():
    assert escape(b"a b\\c\n\r\t\xff=") == b"a\\x20b\\\\c\\n\\r\\t\\xff="
    assert escape_equal(b"k=v") == b"k\\x3dv" and escape_ls(b"a b") == b"a b"
    assert escape_optional(b"-") == b"\\x2d"
    with pytest.raises(BadEscape):
        unescape(b"\\q")


def test_dash_means_absent_but_escaped_dash_is_a_value():
    tree = tree_of(ROOT + b"/f 10 100644 1 0 0 0 0.0 \\x2d - -\n")
    assert tree.root.children[b"f"].payload == b"-"
    tree = tree_of(ROOT + b"/f 10 100644 1 0 0 0 0.0 - - -\n")
    assert tree.root.children[b"f"].payload is None


def test_missing_trailing_newline_lenient_and_strict():
    data = ROOT + b"/f 0 100644 1 0 0 0 0.0 - - -"
    assert b"f" in tree_of(data).root.children
    err = error_of(data, strict=True)
    assert err.line == 2 and "trailing newline" in str(err)


def test_blank_line_is_an_empty_path():
    err = error_of(ROOT + b"\n/f 0 100644 1 0 0 0 0.0 - - -\n")
    assert (err.line, err.field) == (2, "PATH")


def test_hardlinks_share_the_inode_and_keep_the_target_nlink():
    tree = tree_of(ROOT + b"/l1 0 @100644 9 9 9 9 9.9 /f - -\n/l2 0 @100644 0 0 0 0 0.0 l1 - -\n"
                   b"/f 3 100644 7 0 0 0 0.0 - abc -\n")
    root = tree.root
    assert root.children[b"l1"] is root.children[b"l2"] is root.children[b"f"]
    assert root.links == {b"l1", b"l2"}
    assert root.children[b"f"].nlink == 7


@pytest.mark.parametrize("forward", [False, True])
def test_long_hardlink_chains_resolve_to_the_final_target(forward):
    # /f1 @ /f0, /f2 @ /f1, …: every name ends at /f0, whichever way the lines run (each
    # chain is followed once; a chain of 20,000 links took minutes when walked per link).
    n = 20000
    links = [b"/f%d 0 @100644 1 0 0 0 0.0 /f%d - -\n" % (i, i - 1) for i in range(1, n + 1)]
    home = b"/f0 3 100644 1 0 0 0 0.0 - abc -\n"
    tree = tree_of(ROOT + (b"".join(reversed(links)) + home if forward else home + b"".join(links)))
    children = tree.root.children
    assert all(children[b"f%d" % i] is children[b"f0"] for i in range(n + 1))
    assert len(tree.root.links) == n


@pytest.mark.parametrize("dump, field, word", [
    (b"/a 0 @100644 1 0 0 0 0.0 /a - -\n", "PAYLOAD", "itself"),
    (b"/a 0 @100644 1 0 0 0 0.0 /b - -\n/b 0 @100644 1 0 0 0 0.0 /a - -\n", "PAYLOAD", "cycle"),
    (b"/a 0 @100644 1 0 0 0 0.0 /b - -\n/b 0 @100644 1 0 0 0 0.0 /c - -\n/c 0 @100644 1 0 0 0 0.0 /b - -\n",
     "PAYLOAD", "cycle"),
    (b"/a 0 @100644 1 0 0 0 0.0 /nope - -\n", "PAYLOAD", "does not exist"),
    (b"/a 0 @100644 1 0 0 0 0.0 - - -\n", "PAYLOAD", "without a target"),
    (b"/a 0 @40755 1 0 0 0 0.0 / - -\n", "MODE", "directories"),
])
def test_bad_hardlinks(dump, field, word):
    err = error_of(ROOT + dump)
    assert err.field == field and word in str(err) and err.line >= 2


def test_hardlink_to_a_directory_is_accepted_like_upstream():
    tree = tree_of(ROOT + b"/d 0 40755 2 0 0 0 0.0 - - -\n/l 0 @100644 1 0 0 0 0.0 /d - -\n")
    assert tree.root.children[b"l"] is tree.root.children[b"d"]
    image_of(ROOT + b"/d 0 40755 2 0 0 0 0.0 - - -\n/l 0 @100644 1 0 0 0 0.0 /d - -\n")


@pytest.mark.parametrize("dump, line, field, word", [
    (b"/f 0 100644 1 0 0 0 0.0 - - -\n", 1, "PATH", "root"),
    (ROOT + ROOT, 2, "PATH", "second root"),
    (b"/ 0 100644 1 0 0 0 0.0 - - -\n", 1, "MODE", "root must be a directory"),
    (ROOT + b"/a/b 0 100644 1 0 0 0 0.0 - - -\n", 2, "PATH", "/a missing"),
    (ROOT + b"/a 0 100644 1 0 0 0 0.0 - - -\n/a/b 0 100644 1 0 0 0 0.0 - - -\n", 3, "PATH", "not a directory"),
    (ROOT + b"/a 0 100644 1 0 0 0 0.0 - - -\n/a 0 100644 1 0 0 0 0.0 - - -\n", 3, "PATH", "already exists"),
    (ROOT + b"/" + b"x" * 256 + b" 0 100644 1 0 0 0 0.0 - - -\n", 2, "PATH", "255"),
    (ROOT + b"/f 1_0 100644 1 0 0 0 0.0 - - -\n", 2, "SIZE", "integer"),
    (ROOT + b"/f 0 100648 1 0 0 0 0.0 - - -\n", 2, "MODE", "integer"),
    (ROOT + b"/f 0 100644 1 0 0 0 5 - - -\n", 2, "MTIME", "SECONDS.NANOSECONDS"),
    (ROOT + b"/f 0 100644 1 0 0 0 5.x - - -\n", 2, "MTIME", "integer"),
    (ROOT + b"/f 2 100644 1 0 0 0 0.0 - abc -\n", 2, "CONTENT", "must match"),
    (ROOT + b"/f 0 100644 1 0 0 0 0.0 \\q - -\n", 2, "PAYLOAD", "escape"),
    (ROOT + b"/f 0 100644 1 0 0 0 0.0 \\x4 - -\n", 2, "PAYLOAD", "escape"),
    (ROOT + b"/f 0 100644 1 0 0 0 0.0 - - - novalue\n", 2, "XATTRS", "'='"),
    (ROOT + b"/f 0 100644 1 0 0 0 0.0 - - - user.a=1  user.b=2\n", 2, "XATTRS", "'='"),
    (ROOT + b"/f 0 100644 1 0 0 0 0.0 " + b"p" * 4096 + b" - -\n", 2, "PAYLOAD", "4095"),
    (ROOT + b"/f\0 0 100644 1 0 0 0 0.0 - - -\n", 2, "", "NUL"),
])
def test_located_errors(dump, line, field, word):
    err = error_of(dump)
    assert (err.line, err.field) == (line, field), str(err)
    assert word in str(err)
    assert str(err).startswith(f"test.dump:{line}")


def test_strict_only_rules():
    cases = [
        (ROOT + b"/f 0 100644 1 0 0 7 0.0 - - -\n", "RDEV"),
        (ROOT + b"/l 3 120777 1 0 0 0 0.0 target - -\n", "SIZE"),
        (ROOT + b"/l 6 120777 1 0 0 0 0.0 target xxxxxx -\n", "CONTENT"),
    ]
    for dump, field in cases:
        tree_of(dump)  # lenient: accepted
        assert error_of(dump, strict=True).field == field


def test_strtoull_quirks():
    # Leading white space (not space: that separates fields) and signs, like C strtoull.
    tree = tree_of(ROOT + b"/f 0 +100644 \t2 -1 0 0 -5.4294967297 - - -\n")
    node = tree.root.children[b"f"]
    assert node.nlink == 2 and node.uid == 0xFFFFFFFF  # -1 wraps, then is cut to 32 bits
    assert node.mtime == -5 and node.mtime_nsec == 1  # time_t is signed; nsec cut to 32 bits


def test_bad_gid_or_rdev_only_counts_when_uid_is_zero():
    node = tree_of(ROOT + b"/c 0 20644 1 5 x y 0.0 - - -\n").root.children[b"c"]
    assert (node.gid, node.rdev) == (0, 0)
    assert error_of(ROOT + b"/c 0 20644 1 0 x 1 0.0 - - -\n").field == "GID"
    assert error_of(ROOT + b"/c 0 20644 1 0 0 y 0.0 - - -\n").field == "RDEV"


def test_lenient_digest():
    # Upstream reads the first 64 hex digits and ignores what follows.
    good = "ab" * 32
    node = tree_of(ROOT + b"/f 9 100644 1 0 0 0 0.0 - - %s\n" % good.encode()).root.children[b"f"]
    assert node.digest == bytes.fromhex(good)
    node = tree_of(ROOT + b"/f 9 100644 1 0 0 0 0.0 - - %szz\n" % good.encode()).root.children[b"f"]
    assert node.digest == bytes.fromhex(good)


@pytest.mark.parametrize("digest", [b"abcdzz", b"", b"ab" * 31, b"\\x00" + b"ab" * 31, b"ab\tcd" + b"ab" * 30])
@pytest.mark.parametrize("strict", [False, True])
def test_short_digest_is_refused(digest, strict):
    # Fewer than 64 hex digits: upstream fills the rest of the digest from uninitialised
    # memory (a different image each run), so the line means nothing; zero-filling it would
    # record a digest no file has.  Only regular files use DIGEST.
    err = error_of(ROOT + b"/f 9 100644 1 0 0 0 0.0 - - " + digest + b"\n", strict=strict)
    assert (err.line, err.field) == (2, "DIGEST") and "64 hex digits" in str(err), str(err)
    tree_of(ROOT + b"/d 0 40755 1 0 0 0 0.0 - - " + digest + b"\n", strict=strict)


def test_repeated_xattr_key_replaces():
    node = tree_of(ROOT + b"/f 0 100644 1 0 0 0 0.0 - - - user.a=1 user.b=2 user.a=3\n").root.children[b"f"]
    assert node.xattrs == ((b"user.a", b"3"), (b"user.b", b"2"))


def test_symlink_size_follows_target_in_lenient_mode():
    node = tree_of(ROOT + b"/l 99 120777 1 0 0 0 0.0 target - -\n").root.children[b"l"]
    assert node.size == 6 and node.payload == b"target"


def test_paths_collapse_slashes_and_may_omit_the_leading_one():
    tree = tree_of(ROOT + b"d 0 40755 2 0 0 0 0.0 - - -\n//d///f 0 100644 1 0 0 0 0.0 - - -\n")
    assert tree.root.children[b"d"].children[b"f"].mode == S_IFREG | 0o644


def test_types():
    tree = tree_of(ROOT + b"/c 0 20600 1 0 0 259 0.0 - - -\n/d 0 40700 1 0 0 0 0.0 - - -\n")
    assert tree.root.children[b"c"].mode & 0o170000 == S_IFCHR and tree.root.children[b"c"].rdev == 259
    assert tree.root.children[b"d"].mode & 0o170000 == S_IFDIR


def test_stdin(cfsc, tmp_path):
    p = cfsc("compile", "-", "-o", str(tmp_path / "x.cfs"), input=ROOT)
    assert p.returncode == 0, p.stderr
    p2 = cfsc("compile", "-", "-o", "-", input=ROOT)
    assert p2.stdout == (tmp_path / "x.cfs").read_bytes()


def test_compressed_input(cfsc, tmp_path):
    import gzip

    (tmp_path / "x.dump.gz").write_bytes(gzip.compress(ROOT))
    p = cfsc("compile", str(tmp_path / "x.dump.gz"), "-o", "-")
    assert p.returncode == 0 and p.stdout == image_of(ROOT)


def _both_paths(data: bytes, strict: bool):
    """Compile with the batch fast path and with every line through the reference path."""
    from cfsc.build import compile_tree
    from cfsc.frontends.dumpfile import _Parser

    results = []
    for fast in (True, False):
        try:
            results.append(compile_tree(_Parser("x.dump", strict, fast).parse([data])))
        except CfscError as e:  # compare the error, too
            results.append(f"{type(e).__name__}: {e}")
    return results


def test_fast_path_equals_reference_path_on_conformance_inputs():
    from tests.helpers.data import cases, read_input

    for case in cases():
        data = read_input(case["input"])
        for strict in (False, True):
            fast, slow = _both_paths(data, strict)
            assert fast == slow, (case["input"], strict)
            assert isinstance(fast, bytes) == (case.get("expect") != "error" and (case["strict"] or not strict)), fast


def test_chunk_boundaries_do_not_matter():
    from cfsc.frontends.dumpfile import _Parser

    from tests.helpers.data import read_input

    data = read_input("special.dump")
    reference = image_of(data)
    for size in (1, 7, 100, 4096):
        chunks = [data[i:i + size] for i in range(0, len(data), size)]
        tree = _Parser("x", False).parse(chunks)
        from cfsc.build import compile_tree

        assert compile_tree(tree) == reference


def test_fast_path_equals_reference_path_on_random_dumps():
    from tests.helpers.randomdump import random_dump

    for seed in range(40):
        data = random_dump(seed, 40)
        for strict in (False, True):
            fast, slow = _both_paths(data, strict)
            assert fast == slow, (seed, strict)


@pytest.mark.parametrize("line", [
    b"/l 1 120777 1 0 0 0 0.0 - - -",            # symlink without a target
    b"/l 3 120777 1 0 0 0 0.0 abcd - -",         # symlink size mismatch (strict only)
    b"/f 3 100644 1 0 0 0 0.0 - ab -",           # content size mismatch
    b"/f 0 100644 1 0 0 5 0.0 - - -",            # rdev on a regular file
    b"/f 0 100644 1 +0 0 0 0.0 - - -",           # signed integer
    b"/f 0 100644 1 0 0 0 -1.0 - - -",           # negative mtime
    b"/f 0 100644 1 0 0 0 1.99999999999 - - -",  # nsec beyond 32 bits
    b"/f 9 100644 1 0 0 0 0.0 - - abz",          # short digest
    b"/f 9 100644 1 0 0 0 0.0 - - " + b"a " * 32,  # digest with spaces
    b"/d 0 40755 1 0 0 0 0.0 x - -",             # payload on a directory
    b"/f 99999999999999999999 100644 1 0 0 0 0.0 - - -",  # saturating integer
    b"/f 0 @100644 1 0 0 0 0.0 /g - -",          # hardlink to a missing target
    b"a/b 0 100644 1 0 0 0 0.0 - - -",           # missing parent
    b"/x 0 100644 1 0 0 0 0.0 - - -\n/x 0 100644 1 0 0 0 0.0 - - -",  # duplicate
])
def test_fast_path_equals_reference_path_on_odd_lines(line):
    data = ROOT + b"/g 0 100644 1 0 0 0 0.0 - - -\n" + line + b"\n"
    for strict in (False, True):
        fast, slow = _both_paths(data, strict)
        assert fast == slow


def test_checked_trees_really_meet_every_limit():
    """The frontend marks its trees `checked` (validation is skipped): a dumpfile it accepts
    must pass the validation pass too."""
    from cfsc.base.options import Options
    from cfsc.passes.validate_limits import validate_limits

    from tests.helpers.data import cases, read_input
    from tests.helpers.randomdump import random_dump

    inputs = [read_input(c["input"]) for c in cases() if c.get("expect") != "error"]
    inputs += [random_dump(seed, 40) for seed in range(30)]
    inputs.append(ROOT + b"/l 0 @100644 1 0 0 0 0.0 /f - -\n/f 5000 100644 1 0 0 0 0.0 - " + b"x" * 5000
                  + b" -\n/s 4095 120777 1 0 0 0 0.0 " + b"t" * 4095 + b" - -\n")
    for data in inputs:
        try:
            tree = tree_of(data)
        except DumpfileError:
            continue
        assert tree.checked
        tree.checked = False
        validate_limits(tree, Options())


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"bc", b"\n", b"\0"]), max_size=120).map(b"".join),
       st.lists(st.integers(1, 12), min_size=1, max_size=20), st.integers(3, 30))
def test_lines_are_the_same_however_the_input_is_cut(data, cuts, limit):
    """`Lines` splits each chunk as it comes and joins only the line begun before it: the
    lines, the long line and the tail are those of the whole input read at once, and every
    list holding a NUL says so."""
    from cfsc.frontends.dumpfile_stream import Lines

    def read(chunks):
        lines_of = Lines(chunks, limit)
        lists = []
        for lines in lines_of:
            assert lines_of.nul or not any(b"\0" in line for line in lines)
            lists.append(lines)
        return [line for lines in lists for line in lines], lines_of.long, lines_of.tail

    pieces, at = [], 0
    for i in range(len(data)):
        if at < len(data):
            n = cuts[i % len(cuts)]
            pieces.append(data[at:at + n])
            at += n
    assert read(pieces) == read([data] if data else [])
