"""The query language (`cfsc.base.query`) and its users: `compile --exclude`, `ls --where`."""

from __future__ import annotations

import random
import subprocess

import pytest
from cfsc.base import globs, query
from cfsc.base.globs import Glob, reference_regex
from cfsc.base.options import Options
from cfsc.base.tree import S_IFCHR, S_IFDIR, S_IFLNK, S_IFREG, Inode
from cfsc.build.pipeline import run_passes
from cfsc.passes.exclude_entries import exclude_entries
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.data import CFSC, image_of, run_cfsc, tree_of

FILE = Inode(S_IFREG | 0o644, uid=1000, gid=100, mtime=1_700_000_000, size=3 << 20, nlink=2,
             payload=b"ab/cd", digest=bytes(range(32)),
             xattrs=((b"security.selinux", b"system_u:object_r:bin_t:s0"), (b"user.\xff", b"\x00\x01")))


@pytest.mark.parametrize("text,path,node,expected", [
    ('path ~ "/usr/lib/**" and type == reg and size > 1M', b"/usr/lib/x/libc.so", FILE, True),
    ('path ~ "/usr/lib/**"', b"/usr/lib", FILE, False),  # below it, not itself
    ('path ~ "/usr/lib/**"', b"/usr/libexec/x", FILE, False),
    ('path ~ "/usr/**/lib"', b"/usr/lib", FILE, True),  # **/ is zero or more components
    ('path ~ "/usr/**/lib"', b"/usr/a/b/lib", FILE, True),
    ('path ~ "**/*.so"', b"/a/b.so", FILE, True),
    ('path ~ "/*.so"', b"/a/b.so", FILE, False),  # * stays in one component
    ('name ~ "lib[!a-c]?.so"', b"/x/libd1.so", FILE, True),
    ('name ~ "lib[!a-c]?.so"', b"/x/liba1.so", FILE, False),
    ('name == "b.so" or size < 1K', b"/a/b.so", FILE, True),
    ("size == 3M and size == 3MiB and size > 3MB and size < 4M", b"/f", FILE, True),
    ("mode == 644 and mode == 0o644 and not mode == 755", b"/f", FILE, True),
    ('uid == 1000 and gid >= 100 and nlink != 1', b"/f", FILE, True),
    ('mtime > "2023-01-01" and mtime < "2023-11-15T00:00:00Z" and mtime == 1700000000', b"/f", FILE, True),
    ('payload == "ab/cd" and digest ~ "000102*"', b"/f", FILE, True),
    ('xattr["security.selinux"] ~ "*:bin_t:*"', b"/f", FILE, True),
    ('xattr["user.\\xff"] == "\\x00\\x01"', b"/f", FILE, True),
    ('xattr["user.missing"]', b"/f", FILE, False),
    ('not xattr["user.missing"]', b"/f", FILE, True),
    ('xattr["user.missing"] != "x"', b"/f", FILE, False),  # a missing value compares false
    ("target ~ \"*\"", b"/f", FILE, False),
    ('type == symlink and target == "../x"', b"/l", Inode(S_IFLNK | 0o777, payload=b"../x"), True),
    ("type == whiteout and not type == char", b"/w", Inode(S_IFCHR | 0o644), True),
    ("type == char and rdev == 0x0501", b"/c", Inode(S_IFCHR | 0o600, rdev=0x501), True),
    ("type == dir and (uid == 1 or (gid == 2 and not mode == 700))", b"/d", Inode(S_IFDIR | 0o755, gid=2), True),
    ("nlink == 1", b"/d", Inode(S_IFREG), False),  # not known yet (None) before the passes
])
def test_queries(text, path, node, expected):
    assert query.parse(text)(path, node) is expected


@pytest.mark.parametrize("text,message", [
    ("size > ", "--where:8: incomplete query: expected a value"),
    ("size >> 1", "--where:7: unexpected '>'"),
    ("colour == 1", "--where:1: unknown field 'colour': expected one of path, name, type"),
    ('size ~ "1"', "--where:8: ~ does not apply to size"),
    ("type == blob", "--where:9: unknown type blob"),
    ("type < reg", "--where:8: < does not apply to type"),
    ("path == 3", '--where:9: path compares with a string: expected "…", got 3'),
    ("mode == 8", "--where:9: mode: expected an octal number"),
    ("size > 1X", "--where:8: size: expected a number with an optional unit"),
    ('mtime > "yesterday"', "--where:9: mtime: expected seconds since the epoch or an RFC 3339 time"),
    ('path == "\\q"', "--where:9: invalid escape \\q"),
    ("(uid == 1", "--where:10: incomplete query: expected )"),
    ("uid == 1 uid", "--where:10: unexpected 'uid'"),
])
def test_bad_queries_name_the_column(text, message):
    with pytest.raises(query.QueryError) as info:
        query.parse(text, "--where")
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


DUMP = b"""\
/ 0 40755 2 0 0 0 0.0 - - -
/doc 0 40755 2 0 0 0 0.0 - - -
/doc/a.txt 3 100644 1 0 0 0 0.0 - abc -
/doc/sub 0 40755 2 0 0 0 0.0 - - -
/doc/sub/b.txt 3 100644 1 0 0 0 0.0 - abc -
/bin 0 40755 2 0 0 0 0.0 - - -
/bin/tool 100 100755 3 0 0 0 0.0 ab/cdef - -
/bin/tool2 100 @100755 3 0 0 0 0.0 /bin/tool - -
/doc/tool3 100 @100755 3 0 0 0 0.0 /bin/tool - -
/w 0 20000 1 0 0 0 0.0 - - -
"""


def test_exclude_removes_subtrees_and_names_keeping_linked_inodes():
    tree = tree_of(DUMP)
    tool = tree.lookup(b"/bin/tool")
    exclude_entries(tree, Options(exclude=('path ~ "/doc"', 'name == "tool"')))
    assert sorted(p for p, *_ in tree.walk()) == [b"/", b"/bin", b"/bin/tool2", b"/w"]
    # /bin/tool (home) and /doc/tool3 went: the inode lives on as /bin/tool2, with one name
    assert tree.lookup(b"/bin/tool2") is tool and tool.nlink == 1
    compiled = run_passes(tree, Options())
    assert not compiled.root.children[b"bin"].is_link(b"tool2")  # re-homed by resolve_hardlinks


def test_exclude_is_a_pass_before_version_selection():
    # the only whiteout excluded: the image is version 0, exactly as without it
    without = DUMP.replace(b"/w 0 20000 1 0 0 0 0.0 - - -\n", b"")
    assert image_of(DUMP, exclude=("type == whiteout",)) == image_of(without)
    assert image_of(DUMP)[12] == 1
    # idempotent, and no effect on a lowered tree
    tree = run_passes(tree_of(DUMP), Options(exclude=('path ~ "/doc/**"',)))
    count = sum(1 for _ in tree.walk())
    exclude_entries(tree, Options(exclude=("type == reg",)))
    assert sum(1 for _ in tree.walk()) == count


def test_compile_exclude_and_ls_where(tmp_path):
    src = tmp_path / "t.dump"
    src.write_bytes(DUMP)
    image = tmp_path / "t.cfs"
    run_cfsc("compile", str(src), "-o", str(image), "--exclude", 'path ~ "/doc/**"', "--exclude", "type == whiteout",
             check=True)
    listed = run_cfsc("ls", "-R", str(image), check=True).stdout
    assert b"/doc/a.txt" not in listed and b"/doc\n" in listed and b"/w" not in listed
    where = run_cfsc("ls", "-R", str(src), "--where", 'type == reg and path ~ "/doc/**"', check=True).stdout
    assert [line.split()[7] for line in where.splitlines()] == [b"/doc/a.txt", b"/doc/sub/b.txt", b"/doc/tool3"]
    bad = run_cfsc("compile", str(src), "-o", str(image), "--exclude", "size >")
    assert bad.returncode == 2 and bad.stderr == b"error: --exclude:7: incomplete query: expected a value " \
        b'(a number, a "string" or a type name)\n'
    assert run_cfsc("ls", str(src), "--where", "bogus").returncode == 2


# -- globs: linear time, the regex's meaning ----------------------------------------------

GLOB_PIECES = ["a", "b", "/", "*", "**", "***", "?", "[ab]", "[!a]", "[]a]", "[!]a]", "**/", "/**/", "[a-c]",
               "[", "]", "\\", "[^a]", "[/]", "[!/]", ".", "[[]"]


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(GLOB_PIECES), max_size=8).map("".join),
       st.lists(st.binary(min_size=1, max_size=12).map(lambda b: bytes(c % 7 for c in b)), max_size=6))
def test_glob_matches_what_its_regex_matched(pattern, raw_values):
    """The linear-time matcher and the regex the globs were written as (the reference, fast
    on inputs this small) agree on every value; a class the regex refuses is refused too."""
    pattern = pattern.encode()
    try:
        regex = reference_regex(pattern)
    except ValueError:
        with pytest.raises(ValueError):
            Glob(pattern)
        return
    glob = Glob(pattern)
    # Values over the bytes the pieces use, so they match often enough to matter.
    for value in [bytes(b"ab/c]\\x"[c] for c in v) for v in raw_values] + [b""]:
        assert glob(value) == (regex.fullmatch(value) is not None), (pattern, value)


def test_glob_reuses_its_table_and_bounds_it():
    glob = Glob(b"/**/x/**/x/**/y")
    assert glob(b"/x/x/y") and glob(b"/a/x/b/x/c/y") and not glob(b"/x/y")
    assert glob(b"/x" * 1000 + b"/y") and not glob(b"/x" * 1000 + b"y")
    states = len(glob._masks)
    glob(b"/x" * 1000 + b"y")
    assert len(glob._masks) == states  # the second time, nothing new is worked out
    pattern = b"**a" + b"?" * 12  # a DFA of 2^13 states, more than one table keeps
    many, regex = Glob(pattern), reference_regex(pattern)
    rng = random.Random(1)
    for _ in range(3000):
        value = bytes(rng.choice(b"ab") for _ in range(rng.randint(0, 60)))
        assert many(value) == (regex.fullmatch(value) is not None)
        assert len(many._masks) <= globs.MAX_STATES


def test_backtracking_globs_finish_on_hostile_trees(tmp_path):
    """`/**/x/**/x/**/y` over a 1000-deep tree and `/*a*a*a*a*a*a*a*ab` over 250-byte names
    took minutes as regexes; now `ls --where` and `compile --exclude` answer at once (the
    generous timeout only keeps a regression from hanging the suite)."""
    deep = b"".join(b"/x" * k + b" 0 40755 2 0 0 0 0.0 - - -\n" for k in range(1, 1001))
    names = [b"a" * 250, b"a" * 249 + b"b", b"a" * 247 + b"cab", b"ab" * 125]
    dump = (b"/ 0 40755 2 0 0 0 0.0 - - -\n" + deep
            + b"".join(b"/" + n + b" 0 100644 1 0 0 0 0.0 - - -\n" for n in names)
            + b"/x" * 1000 + b"y 0 100644 1 0 0 0 0.0 - - -\n")
    src = tmp_path / "hostile.dump"
    src.write_bytes(dump)
    for query_text, expected in (('path ~ "/**/x/**/x/**/y"', []),
                                 ('path ~ "/*a*a*a*a*a*a*a*ab"', [b"/" + names[1], b"/" + names[2], b"/" + names[3]])):
        p = subprocess.run([CFSC, "ls", "-R", str(src), "--where", query_text], capture_output=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert [line.rsplit(b" ", 1)[-1] for line in p.stdout.splitlines()] == expected, p.stdout[:300]
    out = tmp_path / "o.cfs"
    p = subprocess.run([CFSC, "compile", str(src), "-o", str(out), "--exclude", 'path ~ "/**/x/**/x/**/y"',
                        "--exclude", 'path ~ "/*a*a*a*a*a*a*a*ab"'], capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_bad_glob_class_is_a_query_error():
    with pytest.raises(query.QueryError, match=r"--where:8: glob \"\[z-a\]\": invalid character class"):
        query.parse('name ~ "[z-a]"', "--where")
