"""`cfsc export`: a tree → a tar layer that compiles back to the same image bytes.

Trees: the crafted archive of every file type the tar frontend takes (odd names, long paths,
xattrs, nanosecond and pre-1970 times, devices, hard links; `test_tar.spec`) and the Debian
data archives of tests/data/tar.  Each goes compile → export → compile; the two images must be
byte-identical, the export deterministic (twice the same bytes), and GNU tar must read it and
extract the tree the image shows.  (tests/test_oci.py does the same for a real multi-layer
container image.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cfsc.backends import tarlayer
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.checks import DEBS, EXTRACT, spec
from tests.helpers.data import run_cfsc
from tests.helpers.tarcraft import from_entries


def ok(*args: str) -> bytes:
    p = run_cfsc(*args)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout


def round_trip(layer: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    first = tmp_path / "first.cfs"
    ok("compile", str(layer), "-o", str(first), "--digest-store", str(store))
    exported = tmp_path / "exported.tar"
    ok("export", str(first), "--store", str(store), "-o", str(exported))
    again = tmp_path / "again.cfs"
    ok("compile", str(exported), "-o", str(again))
    assert again.read_bytes() == first.read_bytes()
    twice = tmp_path / "twice.tar"
    ok("export", str(first), "--store", str(store), "-o", str(twice))
    assert twice.read_bytes() == exported.read_bytes()
    return exported


def test_crafted_tree_round_trips(tmp_path):
    layer = tmp_path / "spec.tar"
    layer.write_bytes(from_entries(spec()))
    exported = round_trip(layer, tmp_path)
    # GNU tar extracts the same tree: compiled as a directory, it is the image again
    tree = tmp_path / "tree"
    tree.mkdir()
    subprocess.run([*EXTRACT, "-xf", str(exported), "-C", str(tree)], check=True)
    ok("compile", "--hardlinks", str(tree), "-o", str(tmp_path / "dir.cfs"))
    assert ok("dump", str(tmp_path / "dir.cfs")).splitlines()[1:] == ok("dump", str(tmp_path / "first.cfs")).splitlines()[1:]


@pytest.mark.parametrize("deb", DEBS, ids=lambda p: p.name.split("_")[0])
def test_debian_archives_round_trip(deb, tmp_path):
    round_trip(deb, tmp_path)


def test_missing_store_object_is_one_line(tmp_path):
    layer = tmp_path / "spec.tar"
    layer.write_bytes(from_entries(spec()))
    ok("compile", str(layer), "-o", str(tmp_path / "a.cfs"), "--digest-store", str(tmp_path / "s"))
    for p in (tmp_path / "s").glob("*/*"):
        if p.is_file():
            p.unlink()
            break
    out = tmp_path / "x.tar"
    p = run_cfsc("export", str(tmp_path / "a.cfs"), "--store", str(tmp_path / "s"), "-o", str(out))
    err = p.stderr.decode()
    assert p.returncode != 0 and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


def _split_reference(path: bytes):
    """ustar's rule, spelled out: the last `/` with at most 155 bytes before it and 100 after."""
    if len(path) <= 100:
        return b"", path
    for i in range(len(path) - 1, 0, -1):
        if path[i] == 0x2F and i <= 155 and len(path) - i - 1 <= 100:
            return path[:i], path[i + 1:]
    return None


@given(st.lists(st.sampled_from([b"a", b"/", b"bb", b"c" * 50]), max_size=40).map(b"".join))
@settings(max_examples=500, deadline=None)
def test_ustar_split_is_the_rule(path):
    assert tarlayer._split(path) == _split_reference(path)


@pytest.mark.parametrize("n", [100, 101, 155, 156, 157, 255, 256, 257])
def test_ustar_split_at_the_edges(n):
    for cut in (n - 101, n - 100, n - 99, 154, 155, 156):
        if 0 < cut < n - 1:
            path = b"a" * cut + b"/" + b"b" * (n - cut - 1)
            assert tarlayer._split(path) == _split_reference(path), (n, cut)
