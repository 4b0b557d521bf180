"""Hostile dumpfiles (issue #13): one test per finding, each asserting the one-line located
error (file:line:FIELD) or the right bytes, through both parser paths where that matters."""

from __future__ import annotations

import tracemalloc

import pytest
from cfsc.base import rfc3339
from cfsc.frontends import dumpfile

from bench.fuzzing.dumpgrammar import outcome
from tests.helpers.data import image_of

ROOT = b"/ 0 40755 2 0 0 0 0.0 - - -\n"
DIGEST = b"ab" * 32


def located(data: bytes, strict: bool = False) -> tuple[int, str, str]:
    """(line, field, message) of the error, the same through the fast and the reference path."""
    fast = outcome(data, True, strict)
    assert fast == outcome(data, False, strict)
    assert fast[0] == "error", fast
    return fast[1], fast[2], fast[3]


# -- 1: a column joined and split again moved values between lines ------------------------

@pytest.mark.parametrize("lines, field", [
    ([b"/a 0 100644 1 0 0 0 1 - - -", b"/b 0 100644 1 0 0 0 1.2.3 - - -"], "MTIME"),
    ([b"/a 0 100644 1 0 0 0 1.2.3 - - -", b"/b 0 100644 1 0 0 0 1 - - -"], "MTIME"),
    ([b"/a 0 100644 1 0 0 0 1633950376 - - -", b"/b 0 100644 1 0 0 0 5.1.2 - - -"], "MTIME"),
    # a hex digit moved from one DIGEST to the next (63 and 65 digits)
    ([b"/a 9 100644 1 0 0 0 0.0 - - " + DIGEST[:63], b"/b 9 100644 1 0 0 0 0.0 - - a" + DIGEST], "DIGEST"),
])
@pytest.mark.parametrize("strict", [False, True])
def test_values_do_not_move_between_lines(lines, field, strict):
    line, where, message = located(ROOT + b"\n".join(lines) + b"\n", strict)
    assert (line, where) == (2, field), message
    assert message.startswith(f"x.dump:2:{field}: ")


def test_each_line_keeps_its_own_mtime():
    tree = dumpfile.loads(ROOT + b"/a 0 100644 1 0 0 0 1.2 - - -\n/b 0 100644 1 0 0 0 33.44 - - -\n")
    a, b = tree.root.children[b"a"], tree.root.children[b"b"]
    assert (a.mtime, a.mtime_nsec, b.mtime, b.mtime_nsec) == (1, 2, 33, 44)


# -- 2: an empty symlink target ------------------------------------------------------------

@pytest.mark.parametrize("strict", [False, True])
def test_empty_symlink_target_is_refused(strict, cfsc, tmp_path):
    data = ROOT + b"/l 0 120777 1 0 0 0 0.0  - -\n"
    line, field, message = located(data, strict)
    assert (line, field) == (2, "PAYLOAD") and "symlink without a target" in message
    src, out = tmp_path / "in.dump", tmp_path / "out.cfs"
    src.write_bytes(data)
    p = cfsc("compile", str(src), "-o", str(out), *(["--strict"] if strict else []))
    assert p.returncode == 2 and p.stderr.decode().startswith(f"error: {src}:2:PAYLOAD: ")
    assert p.stderr.count(b"\n") == 1 and not out.exists()


# -- 3: missing fields; a DIGEST upstream would fill from uninitialised memory --------------

@pytest.mark.parametrize("strict", [False, True])
def test_missing_digest_is_refused(strict, cfsc, tmp_path):
    data = ROOT + b"/f 10 100644 1 0 0 0 0.0 - -\n"
    line, field, message = located(data, strict)
    assert (line, field) == (2, "DIGEST") and "missing field DIGEST" in message, message
    src, out = tmp_path / "in.dump", tmp_path / "out.cfs"
    src.write_bytes(data)
    p = cfsc("compile", str(src), "-o", str(out), *(["--strict"] if strict else []))
    assert p.returncode == 2, p.stderr
    assert p.stderr.decode() == f"error: {src}:2:DIGEST: {message.split(': ', 1)[1]}\n"
    assert not out.exists()


@pytest.mark.parametrize("line, field", [
    (b"/f 10 100644 1 0 0 0", "MTIME"),
    (b"/f 10 100644 1", "UID"),
    (b"/f 10", "MODE"),
    (b"/f 10 100644 1 0 0 0 0.0 -", "CONTENT"),
    (b"/l 0 120777 1 0 0 0 0.0", "PAYLOAD"),
    (b"/l 1 120777 1 0 0 0 0.0", "CONTENT"),  # upstream checks CONTENT against SIZE first
])
def test_missing_fields_are_named(line, field):
    n, where, message = located(ROOT + line + b"\n")
    assert (n, where) == (2, field) and f"missing field {field}" in message, message


def test_missing_fields_upstream_reads_as_empty_are_still_accepted():
    # As upstream's conformance vector honggfuzz-longlink-unterminated.dump: a device line
    # without CONTENT and DIGEST (empty content, size 0; no digest on a non-regular file).
    tree = dumpfile.loads(ROOT + b"/c 0 20644 1 0 0 0 0.0 - \n/d 0 40755 2 0 0 0 0.0\n")
    assert tree.root.children[b"c"].digest is None and tree.root.children[b"d"].digest is None


# -- 10b: one long line is linear, and refused early -------------------------------------------

def _zst_with_huge_xattr(path, mib: int) -> None:
    import zstandard

    c = zstandard.ZstdCompressor(level=3).compressobj()
    parts = [c.compress(ROOT + b"/f 0 100644 1 0 0 0 0.0 - - - user.x=")]
    block = b"a" * (1 << 20)
    parts += [c.compress(block) for _ in range(mib)]
    parts += [c.compress(b"\n"), c.flush()]
    path.write_bytes(b"".join(parts))


def test_huge_xattr_line_is_refused_before_it_is_read_whole(tmp_path):
    src = tmp_path / "big.dump.zst"
    _zst_with_huge_xattr(src, 512)
    assert src.stat().st_size < 64 << 10
    tracemalloc.start()
    try:
        with pytest.raises(dumpfile.DumpfileError) as info:
            dumpfile.load(str(src))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (info.value.line, info.value.field) == (2, "XATTRS") and "too many xattrs" in str(info.value)
    assert peak < 32 << 20, f"{peak} bytes held for a line refused after {dumpfile.LINE_MAX}"


def test_line_max_is_the_sum_of_the_field_limits():
    # A legal record with every field near its longest text stays within LINE_MAX.
    name = b"\\x41" * 255
    dirs = [b"/".join([name] * i) for i in range(1, 17)]
    head = b"".join(b"/%s 0 40755 2 0 0 0 0.0 - - -\n" % d for d in dirs)
    fields = [b"/" + dirs[-1] + b"/f", b"0" * 28 + b"5000", b"0" * 27 + b"100644", b"0" * 31 + b"1",
              b"0" * 32, b"0" * 32, b"0" * 32, b"0" * 32 + b"." + b"0" * 32, b"\\x70" * 4095,
              b"\\x78" * 5000, b"\\x61" * 128, b"user.a=" + b"\\x76" * 16382]  # DIGEST: SHA-512
    line = b" ".join(fields)
    assert dumpfile.LINE_MAX - 1000 < len(line) <= dumpfile.LINE_MAX
    tree = dumpfile.loads(ROOT + head + line + b"\n")
    node = tree.root
    for _ in range(16):
        node = node.children[b"A" * 255]
    assert node.children[b"f"].content == b"x" * 5000
    assert dumpfile.LINE_MAX == sum(dumpfile.FIELD_TEXT_MAX) + 11


def test_readme_states_the_line_limit():
    from tests.helpers.data import TESTS

    assert f"line longer than {dumpfile.LINE_MAX:,} bytes" in (TESTS.parent / "README.md").read_text()


@pytest.mark.parametrize("chunk", [None, 1, 7, 4096, 1 << 16])
@pytest.mark.parametrize("line, field, word", [
    (b"/f 0 100644 1 0 0 0 0.0 - - - user.x=" + b"a" * 200_000, "XATTRS", "too many xattrs"),
    (b"/f 0 100644 1 0 0 0 0.0 - - - user.x=" + b"a" * 200_000 + b"\n/g", "XATTRS", "too many xattrs"),
    (b"/" + b"p" * 200_000 + b" 0 100644 1 0 0 0 0.0 - - -", "PATH", "16384"),
    (b"/f " + b"0" * 200_000 + b" 100644 1 0 0 0 0.0 - - -", "SIZE", "32"),
    # the fixed fields are checked before the xattr section, as upstream does
    (b"/f 0 644 1 0 0 0 0.0 - - - user.x=" + b"a" * 200_000, "MODE", "mode"),
])
def test_long_line_error_is_located_and_independent_of_chunking(line, field, word, chunk):
    data = ROOT + line + b"\n"
    pieces = [data] if chunk is None else [data[i:i + chunk] for i in range(0, len(data), chunk)]
    with pytest.raises(dumpfile.DumpfileError) as info:
        dumpfile._Parser("x.dump", False).parse(pieces)
    assert (info.value.line, info.value.field) == (2, field), str(info.value)
    assert word in str(info.value) and "\n" not in str(info.value)


def test_an_earlier_bad_line_is_reported_before_a_long_one():
    data = ROOT + b"/f 0 1x 1 0 0 0 0.0 - - -\n/g 0 100644 1 0 0 0 0.0 - - - user.x=" + b"a" * 200_000 + b"\n"
    with pytest.raises(dumpfile.DumpfileError) as info:
        dumpfile._Parser("x.dump", False).parse([data[i:i + 100] for i in range(0, len(data), 100)])
    assert (info.value.line, info.value.field) == (2, "MODE")


# -- 14: an empty component right before the last name --------------------------------------

@pytest.mark.parametrize("path", [b"/a//f", b"//a/f", b"/a///f", b"a//f", b"a/f", b"//a//f"])
def test_empty_path_components_anywhere(path):
    canonical = image_of(ROOT + b"/a 0 40755 2 0 0 0 0.0 - - -\n/a/f 0 100644 1 0 0 0 0.0 - - -\n")
    data = ROOT + b"/a 0 40755 2 0 0 0 0.0 - - -\n" + path + b" 0 100644 1 0 0 0 0.0 - - -\n"
    assert outcome(data, True, False) == outcome(data, False, False)
    assert image_of(data) == canonical


def test_directory_records_with_empty_components_are_found_again():
    data = (ROOT + b"/a 0 40755 2 0 0 0 0.0 - - -\n/a///b// 0 40755 2 0 0 0 0.0 - - -\n")
    assert located(data)[1] == "PATH"  # a trailing '/' leaves an empty name, as upstream
    data = (ROOT + b"/a 0 40755 2 0 0 0 0.0 - - -\n/a///b 0 40755 2 0 0 0 0.0 - - -\n"
            b"/a/b//g 0 100644 1 0 0 0 0.0 - - -\n//a//b//h 0 100644 1 0 0 0 0.0 - - -\n")
    tree = dumpfile.loads(data)
    assert sorted(tree.root.children[b"a"].children[b"b"].children) == [b"g", b"h"]


# -- 13: times outside years 0001-9999 ----------------------------------------------------

def test_rfc3339_format_or_none_is_total():
    assert rfc3339.format_or_none(0) == "1970-01-01T00:00:00Z"
    assert rfc3339.format_or_none(rfc3339.LAST) == "9999-12-31T23:59:59Z"
    assert rfc3339.format_or_none(rfc3339.FIRST) == "0001-01-01T00:00:00Z"
    for sec in (rfc3339.LAST + 1, rfc3339.FIRST - 1, -(1 << 63), (1 << 63) - 1):
        assert rfc3339.format_or_none(sec) is None


@pytest.mark.parametrize("sec", [-(1 << 63), -99999999999999, (1 << 63) - 1, rfc3339.LAST + 1])
def test_diff_and_ls_print_times_outside_the_calendar_raw(sec, cfsc, tmp_path):
    a, b = tmp_path / "a.dump", tmp_path / "b.dump"
    a.write_bytes(ROOT + b"/f 0 100644 1 0 0 0 0.0 - - -\n")
    b.write_bytes(ROOT + b"/f 0 100644 1 0 0 0 %d.0 - - -\n" % sec)
    p = cfsc("diff", str(a), str(b))
    assert p.returncode == 1 and b"Traceback" not in p.stderr, p.stderr
    assert b"mtime: 0 (1970-01-01T00:00:00Z) \xe2\x86\x92 %d\n" % sec in p.stdout
    p = cfsc("diff", str(b), str(a))
    assert p.returncode == 1 and b"mtime: %d \xe2\x86\x92 0 (1970-01-01T00:00:00Z)\n" % sec in p.stdout
    p = cfsc("ls", str(b))
    assert p.returncode == 0 and b" %d f\n" % sec in p.stdout, p.stdout
