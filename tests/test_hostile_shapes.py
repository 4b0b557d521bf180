"""Valid but extreme shapes, and what a hostile image can make add up: each verb of the real
CLI stays within memory (a cap on the child's address space, not a timing) and reports a
problem on one line.

* A deep chain: its paths add up to depth² bytes (10 GB at 100k levels), so a walk may hold
  the current path only, never every path it printed (the image walk, `export`'s tar walk,
  `composefs-dump`'s depth-first build, the dump writer's output batches, `check`'s dump
  round trip).
* Totals over fields an image declares go past 64 bits (`info --json`).
* Running out of memory is said on one line (exit 1), not as a traceback or as the input's
  fault, and leaves no output behind.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess

import pytest
from cfsc.backends.erofs.entries import Entries, resolve
from cfsc.backends.erofs.layout import EROFS_INODE_EXTENDED, EROFS_SUPER_BLOCK, EROFS_SUPER_OFFSET
from cfsc.backends.erofs.reader import Image
from cfsc.base.errors import InputError
from cfsc.base.options import Options
from cfsc.base.tree import S_IFDIR, S_IFREG, Inode, Tree
from cfsc.build import compile_tree

from tests.helpers.data import CFSC, image_of

DEPTH = 15000  # paths up to 30 KB: 225 MB of them, held at once before the fix
DEEP_LIMIT = 192 << 20  # address space of the CLI under test (linear walks need ~120 MiB)


def run_capped(limit: int, *args: str) -> subprocess.CompletedProcess:
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run([CFSC, *args], capture_output=True, preexec_fn=cap, timeout=600)


@pytest.fixture(scope="module")
def deep_image(tmp_path_factory) -> str:
    root = Inode(S_IFDIR | 0o755)
    d = root
    for _ in range(DEPTH):
        child = Inode(S_IFDIR | 0o755)
        d.add_child(b"d", child)
        d = child
    f = Inode(S_IFREG | 0o644, size=3, content=b"hi\n")
    d.add_child(b"f", f)
    d.add_child(b"g", f, link=True)  # a hard link at the bottom: its first path is spelled out
    path = tmp_path_factory.mktemp("deep") / "deep.cfs"
    path.write_bytes(compile_tree(Tree(root, "deep"), Options()))
    return str(path)


@pytest.mark.parametrize("verb", [["dump"], ["dump", "--json"], ["info"], ["ls", "-R"],
                                  ["export", "-o", "/dev/null"], ["composefs-dump", "/dev/null"]],
                         ids=lambda v: "-".join(a.strip("-/") for a in v))
def test_deep_chain_is_walked_in_linear_memory(deep_image, verb):
    args = [verb[0], deep_image, *verb[1:]] if verb[0] == "composefs-dump" else [*verb, deep_image]
    p = run_capped(DEEP_LIMIT, *args)
    assert p.returncode == 0, p.stderr.decode()[-2000:]


def test_deep_chain_dump_round_trip_of_check_is_streamed(deep_image):
    """`check --reproducible`'s dump way parses the dump as it is written (225 MB of text here,
    held twice before), and gives up past a budget for deeper trees instead of holding it."""
    p = run_capped(512 << 20, "check", "--reproducible", "--ways", "dump", deep_image)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert b"reproducible: 2 compilations, one digest" in p.stdout


def test_the_dump_round_trip_gives_up_past_its_budget():
    """What `check --reproducible` says when a dump would pass its budget: the pieces up to
    the budget go through, the one past it is refused in one line."""
    from cfsc.tools.check import DUMP_RATIO, _bounded

    pieces = _bounded(iter([b"ab", b"cd", b"ef"]), 5)
    assert next(pieces) == b"ab" and next(pieces) == b"cd"
    with pytest.raises(InputError) as e:
        next(pieces)
    assert str(e.value) == (f"dump of the image: its dump passes 5 bytes, {DUMP_RATIO} times the image and more "
                            "(paths of a deep tree add up to its depth squared): not compiled back")


def test_deep_chain_dump_names_the_link_at_the_bottom(deep_image):
    p = subprocess.run([CFSC, "dump", deep_image], capture_output=True, check=True)
    last = p.stdout.rsplit(b"\n", 2)[-2]
    first = b"/d" * DEPTH + b"/f"
    assert last.startswith(b"/d" * DEPTH + b"/g 3 @100644 2 ") and b" " + first + b" " in last


def test_info_json_total_beyond_64_bits(tmp_path):
    """Two external files of 2^64-1 bytes each: the total is written exactly."""
    dump = (b"/ 4096 40755 2 0 0 0 0.0 - - -\n"
            b"/a 100 100644 1 0 0 0 1.0 ab/cd - -\n"
            b"/b 100 100644 1 0 0 0 1.0 ab/ce - -\n")
    data = bytearray(image_of(dump))
    image = Image(bytes(data), "x")
    for name in (b"/a", b"/b"):
        raw = resolve(image, name, Entries(image)).raw
        assert raw.extended
        struct.pack_into("<Q", data, raw.offset + EROFS_INODE_EXTENDED.offset("i_size"), (1 << 64) - 1)
    bad = tmp_path / "big.cfs"
    bad.write_bytes(bytes(data))
    p = subprocess.run([CFSC, "info", "--json", str(bad)], capture_output=True)
    assert p.returncode == 0 and not p.stderr, p.stderr
    assert json.loads(p.stdout)["files"]["external_bytes"] == 2 * ((1 << 64) - 1)


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_out_of_memory_is_one_line_and_leaves_nothing(tmp_path, compressed):
    """A valid 256 MiB image (sparse) read by a CLI capped at 128 MiB of address space; the
    same gzipped, so that memory runs out in the decompressor (whose other errors blame the
    input)."""
    image = tmp_path / "sparse.cfs"
    data = bytearray(image_of(b"/ 4096 40755 2 0 0 0 0.0 - - -\n/f 5 100644 1 0 0 0 0.0 - hello -\n"))
    blocks = 1 << 16
    struct.pack_into("<I", data, EROFS_SUPER_OFFSET + EROFS_SUPER_BLOCK.offset("blocks"), blocks)
    image.write_bytes(bytes(data))
    os.truncate(image, blocks * 4096)
    if compressed:
        subprocess.run(["gzip", "-1", str(image)], check=True)
        image = tmp_path / "sparse.cfs.gz"
    out = tmp_path / "out" / "copy.cfs"
    out.parent.mkdir()
    p = run_capped(128 << 20, "compile", str(image), "-o", str(out))
    assert p.returncode == 1, p.stderr
    assert p.stderr.decode() == ("error: out of memory: a limit on memory (ulimit -v, a cgroup's memory.max) "
                                 "is reached\n")
    assert list(out.parent.iterdir()) == []


# -- hard links to directories ------------------------------------------------------------

DIR_LINK_ROOT = b"/ 4096 40755 2 0 0 0 0.0 - - -\n"
DIRECTORY_CYCLES = [
    ("link-to-root", DIR_LINK_ROOT + b"/b 0 @100644 0 0 0 0 0.0 / - -\n", 2, "/b"),
    ("two-links", DIR_LINK_ROOT + b"/a 0 40755 2 0 0 0 0.0 - - -\n/b 0 40755 2 0 0 0 0.0 - - -\n"
     b"/a/x 0 @100644 0 0 0 0 0.0 /b - -\n/b/y 0 @100644 0 0 0 0 0.0 /a - -\n", 5, "/b/y"),
    ("link-to-parent", DIR_LINK_ROOT + b"/a 0 40755 2 0 0 0 0.0 - - -\n/a/up 0 @100644 0 0 0 0 0.0 /a - -\n",
     3, "/a/up"),
]


@pytest.mark.parametrize("text, line, path", [c[1:] for c in DIRECTORY_CYCLES], ids=[c[0] for c in DIRECTORY_CYCLES])
def test_dumpfile_hard_links_making_a_directory_cycle_are_refused(tmp_path, text, line, path):
    """upstream mkcomposefs writes such an image (every walker of it then loops, the kernel
    says ELOOP); cfsc refuses the tree, for every source, naming the line of the link."""
    src = tmp_path / "cycle.dump"
    src.write_bytes(text)
    out = tmp_path / "out.cfs"
    for args in (["compile", str(src), "-o", str(out)], ["dump", str(src)], ["info", str(src)]):
        p = subprocess.run([CFSC, *args], capture_output=True)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.decode() == (f"error: {src}:{line}:{path}: leads back to a directory that contains it: "
                                     "hard links to directories make a directory cycle\n"), args
    assert sorted(os.listdir(tmp_path)) == ["cycle.dump"]


def test_dumpfile_hard_link_to_a_directory_elsewhere_is_kept(tmp_path):
    """Not a cycle: upstream's bytes (the link's inode is the directory)."""
    src = tmp_path / "ok.dump"
    src.write_bytes(DIR_LINK_ROOT + b"/b 0 40755 2 0 0 0 0.0 - - -\n/d 0 @100644 0 0 0 0 0.0 /b - -\n")
    p = subprocess.run([CFSC, "dump", str(src)], capture_output=True, check=True)
    assert b"/d 27 @40755 2 0 0 0 0.0 /b - -\n" in p.stdout


def test_a_links_first_path_skips_names_left_out_by_filter(tmp_path):
    """The walk spells a link's first path from the directory that named the inode first;
    with --filter that is the first name kept, not the first name on disk."""
    src = tmp_path / "links.dump"
    src.write_bytes(b"/ 4096 40755 3 0 0 0 0.0 - - -\n/a 5 100644 3 0 0 0 0.0 - hello -\n"
                    b"/b 5 @100644 3 0 0 0 0.0 /a - -\n/c 0 40755 2 0 0 0 0.0 - - -\n"
                    b"/c/d 5 @100644 3 0 0 0 0.0 /a - -\n")
    whole = subprocess.run([CFSC, "dump", str(src)], capture_output=True, check=True).stdout
    kept = subprocess.run([CFSC, "dump", "--filter", "b", "--filter", "c", str(src)], capture_output=True,
                          check=True).stdout
    assert whole.endswith(b"/c/d 5 @100644 3 0 0 0 0.0 /a hello -\n")
    assert kept.endswith(b"/b 5 100644 3 0 0 0 0.0 - hello -\n/c 40 40755 2 0 0 0 0.0 - - -\n"
                         b"/c/d 5 @100644 3 0 0 0 0.0 /b hello -\n")
