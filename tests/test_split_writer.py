"""The image writer's split path (a forked child sizes, places and encodes the second half of
the inodes into the same file, trading offsets and nids with the parent) against its
sequential reference, and the child's failures."""

from __future__ import annotations

import hashlib
import io
import os
import resource
import signal
import subprocess
import sys

import pytest
from cfsc.backends.erofs import writer
from cfsc.backends.erofs.writer import SPLIT_MIN_INODES, write_image
from cfsc.backends.erofs.xattrs import XattrEncoder
from cfsc.base import forked
from cfsc.base.errors import DumpfileError
from cfsc.base.options import Options
from cfsc.base.tree import Tree
from cfsc.build.pipeline import run_passes
from cfsc.frontends import dumpfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.checks import MKCOMPOSEFS
from tests.helpers.data import CFSC, cases, read_input
from tests.helpers.strategies import trees

pytestmark = [pytest.mark.skipif(not hasattr(os, "fork") or forked._processors() < 2,
                                 reason="needs fork and a second processor"),
              pytest.mark.usefixtures("forkable")]
GOOD = [c for c in cases() if c.get("expect") != "error" and not c["strict"]]


LEAD = b"leading bytes the image must not overwrite"


def sequential_image(tree: Tree) -> bytes:
    out = io.BytesIO()
    write_image(tree, out, split=False)
    return out.getvalue()


def split_at(tree: Tree, k: int, path) -> bytes:
    """The image written split, the child's half from inode `k`."""
    with open(path, "wb") as f:
        f.write(LEAD)
        assert writer._write_split(tree, XattrEncoder(tree.shared_xattrs), f, f.fileno(), k)
        assert f.tell() == os.path.getsize(path)
    return path.read_bytes()[len(LEAD):]


def both_ways(tree: Tree, path) -> tuple[bytes, bytes]:
    """The image written sequentially, and written split (into a file, as the split needs)."""
    sequential = io.BytesIO()
    write_image(tree, sequential, split=False)
    with open(path, "wb") as f:
        f.write(b"leading bytes the image must not overwrite")
        write_image(tree, f, split=True)
        f.flush()
        assert f.tell() == os.path.getsize(path)
    return sequential.getvalue(), path.read_bytes()[42:]


@pytest.mark.parametrize("case", GOOD, ids=[c["input"] for c in GOOD])
def test_split_writer_equals_sequential_on_conformance_cases(case, tmp_path):
    tree = run_passes(dumpfile.loads(read_input(case["input"]), Options()), Options())
    sequential, split = both_ways(tree, tmp_path / "out.cfs")
    assert split == sequential
    assert hashlib.sha256(split).hexdigest() == case["sha256"]["default"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                  HealthCheck.function_scoped_fixture])
@given(trees(max_entries=120), st.data())
def test_split_writer_equals_sequential_on_random_trees(tmp_path, tree, data):
    tree = run_passes(tree, Options())
    sequential, split = both_ways(tree, tmp_path / "out.cfs")
    assert split == sequential
    if len(tree.inodes) > 1:  # and split anywhere, not only where `_split_point` puts it
        k = data.draw(st.integers(1, len(tree.inodes) - 1), label="k")
        assert split_at(tree, k, tmp_path / "at.cfs") == sequential


def edges_dump() -> bytes:
    """The layout's edge cases next to one another, so that a split lands beside each:
    inline tails and chunk indexes that fit, are padded into the next block or move out to a
    block of their own; symlinks whose record fits a block, crosses one or fills one; extended inodes (a
    time of their own, a 32-bit id, a 4 GiB size); a directory of several dirent blocks
    made of hard links back to the first half; devices, fifos, empty files, chunked
    external files; directories below directories of either half."""
    t = b"1700000000.0"
    lines = [b"/ 4096 40755 4 0 0 0 %s - - - user.root=1" % t,
             b"/a 4096 40755 3 0 0 0 %s - - - security.selinux=x" % t,
             b"/big 4096 40755 3 0 0 0 %s - - -" % t]
    for i, size in enumerate((1000, 1500, 2000, 2047, 2048, 2049, 3000, 4095, 4097, 4999, 3100, 2900)):
        lines.append(b"/a/f%02d %d 100644 1 0 0 0 %s - %s -" % (i, size, t, b"abcdefgh"[i % 8:i % 8 + 1] * size))
    for i, length in enumerate((1, 100, 1000, 2000, 3000, 3900, 4000, 4060, 3500)):
        lines.append(b"/a/l%02d %d 120777 1 0 0 0 %s %s - -" % (i, length, t, b"t" * length))
    digest = hashlib.sha256(b"x").hexdigest().encode()
    external = b"%s/%s - %s" % (digest[:2], digest[2:], digest)  # PAYLOAD CONTENT DIGEST
    lines += [b"/a/own-time 10 100644 1 0 0 0 1700000001.5 - 0123456789 -",
              b"/a/big-uid 0 100644 1 70000 0 0 %s - - -" % t,
              b"/a/huge %d 100644 1 0 0 0 %s %s" % (5 << 30, t, external),
              b"/a/chunky %d 100644 1 0 0 0 %s %s user.n=1" % ((1 << 40) + 5, t, external),
              # chunk indexes of 2.4 to 4 KiB: placed inline where they fit, else in a block
              *[b"/a/index%d %d 100644 1 0 0 0 %s %s" % (c, c << 43, t, external)
                for c in (600, 1000, 1024, 900, 700)],
              b"/a/dev 0 20644 1 0 0 1234 %s - - -" % t,
              b"/a/fifo 0 10644 1 0 0 0 %s - - -" % t,
              b"/a/empty 0 100644 1 0 0 0 %s - - - user.e=%s" % (t, b"v" * 200),
              b"/a/sub 4096 40755 3 0 0 0 %s - - -" % t,
              b"/a/sub/deeper 4096 40755 2 0 0 0 %s - - -" % t,
              b"/a/sub/deeper/x 3 100644 1 0 0 0 %s - xyz -" % t,
              b"/big/sub 4096 40755 2 0 0 0 %s - - -" % t,
              b"/big/sub/y 0 100644 1 0 0 0 %s - - -" % t]
    for i in range(150):
        lines.append(b"/big/%s%03d 0 @100644 1 0 0 0 %s /a/f00 - -" % (b"n" * 50, i, t))
    return b"\n".join(lines) + b"\n"


def test_split_writer_equals_sequential_split_at_every_inode(tmp_path):
    tree = run_passes(dumpfile.loads(edges_dump(), Options()), Options())
    sequential = sequential_image(tree)
    for k in range(1, len(tree.inodes)):
        assert split_at(tree, k, tmp_path / "out.cfs") == sequential, k
    if not os.access(MKCOMPOSEFS, os.X_OK):
        pytest.skip(f"upstream mkcomposefs not built at {MKCOMPOSEFS}: compared with the sequential path only")
    (tmp_path / "edges.dump").write_bytes(edges_dump())
    subprocess.run([MKCOMPOSEFS, "--from-file", str(tmp_path / "edges.dump"), str(tmp_path / "c.cfs")], check=True)
    assert (tmp_path / "c.cfs").read_bytes() == sequential


@pytest.mark.parametrize("where", ["parent", "child", "both"])
def test_an_error_while_sizing_is_the_sequential_paths_error(tmp_path, where):
    """A broken xattr value (not bytes: the pipeline would never let one through) in the
    parent's half, the child's or both: the split path raises what the sequential one does,
    the first half's error first."""
    tree = run_passes(dumpfile.loads(edges_dump(), Options()), Options())
    if where in ("parent", "both"):
        tree.inodes[1].xattrs = ((b"user.first", 1),)
    if where in ("child", "both"):
        tree.inodes[-1].xattrs = ((b"user.last", None),)
    with pytest.raises(Exception) as sequential:
        sequential_image(tree)
    with pytest.raises(Exception) as split:
        split_at(tree, len(tree.inodes) // 2, tmp_path / "out.cfs")
    assert type(split.value) is type(sequential.value)
    assert str(split.value) == str(sequential.value)


def synthetic_dump(entries: int) -> bytes:
    """Directories of 500 files, big files among them (a data block each), and symlinks."""
    lines = [b"/ 4096 40755 2 0 0 0 1700000000.0 - - - user.root=1"]
    for d in range(entries // 500):
        lines.append(b"/d%03d 4096 40755 2 0 0 0 1700000000.0 - - -" % d)
        for i in range(500):
            if i % 7 == 0:
                lines.append(b"/d%03d/l%03d 10 120777 1 0 0 0 1700000000.0 target%04d - -" % (d, i, i))
                continue
            digest = hashlib.sha256(b"%d/%d" % (d, i)).hexdigest().encode()
            size = (1 << 33) + i if i % 97 == 0 else 100 + i
            lines.append(b"/d%03d/f%03d %d 100644 1 0 0 0 1700000000.%d %s/%s - %s user.n=%d" % (
                d, i, size, i % 2, digest[:2], digest[2:], digest, i % 5))
    return b"\n".join(lines) + b"\n"


def test_compile_matches_mkcomposefs_above_the_threshold(tmp_path):
    """Above the threshold `cfsc compile` splits by itself when a processor is idle (else it
    writes sequentially): the bytes are upstream's either way."""
    mkcomposefs = MKCOMPOSEFS
    dump = synthetic_dump(SPLIT_MIN_INODES + 5000)
    src = tmp_path / "in.dump"
    src.write_bytes(dump)
    ours = tmp_path / "ours.cfs"
    subprocess.run([CFSC, "compile", str(src), "-o", str(ours)], check=True)
    tree = run_passes(dumpfile.loads(dump, Options()), Options())
    sequential = io.BytesIO()
    write_image(tree, sequential, split=False)
    assert ours.read_bytes() == sequential.getvalue()
    if not os.access(mkcomposefs, os.X_OK):
        pytest.skip(f"upstream mkcomposefs not built at {mkcomposefs}: compared with the sequential path only")
    theirs = tmp_path / "theirs.cfs"
    subprocess.run([mkcomposefs, "--from-file", str(src), str(theirs)], check=True)
    assert ours.read_bytes() == theirs.read_bytes()


# What `compile_image` does, with the split forced: the atomic output around the writer.
SPLIT_INTO_ATOMIC_OUTPUT = """
import sys
from cfsc.backends.erofs.writer import write_image
from cfsc.base.output import atomic_output
from cfsc.build import load
from cfsc.build.pipeline import run_passes
tree = run_passes(load([sys.argv[1]]))
try:
    with atomic_output(sys.argv[2]) as out:
        write_image(tree, out, split=True)
except OSError as e:
    print(e, file=sys.stderr)
    sys.exit(1)
"""


def test_a_failed_split_write_leaves_no_output(tmp_path):
    """A file size limit within the child's part of the image (the parent's shared xattrs
    and directory blocks lie beyond it too): whichever process hits it first, the write
    fails with that error, and nothing is left."""
    src = tmp_path / "in.dump"
    src.write_bytes(synthetic_dump(SPLIT_MIN_INODES + 5000))
    out = tmp_path / "out" / "img.cfs"
    out.parent.mkdir()

    def limit() -> None:  # (in the child process, before it starts)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20))

    p = subprocess.run([sys.executable, "-c", SPLIT_INTO_ATOMIC_OUTPUT, str(src), str(out)], preexec_fn=limit,
                       capture_output=True)
    assert p.returncode == 1, p.stderr
    assert p.stderr.decode().strip().splitlines() == ["[Errno 27] File too large"]
    assert os.listdir(out.parent) == []


def test_an_error_in_the_childs_half_is_the_sequential_paths_error(tmp_path):
    """An inode the pipeline would have refused (a uid past 32 bits), slipped in after it,
    in the child's half: the split path raises what the sequential one raises."""
    tree = run_passes(dumpfile.loads(synthetic_dump(2000), Options()), Options())
    tree.inodes[-1].uid = 1 << 40
    with pytest.raises(Exception) as sequential:
        write_image(tree, io.BytesIO(), split=False)
    with open(tmp_path / "out.cfs", "wb") as f, pytest.raises(Exception) as split:
        write_image(tree, f, split=True)
    assert type(split.value) is type(sequential.value)
    assert str(split.value) == str(sequential.value)


def test_a_partners_error_that_cannot_be_pickled_keeps_its_class_name_and_message():
    class Local(Exception):  # (a local class: pickle cannot name it)
        pass

    def fails(line: forked.Line) -> None:
        raise Local("no such thing")

    with forked.Partner(fails) as child, pytest.raises(RuntimeError, match="^Local: no such thing$"):
        child.join()


def test_a_partner_that_has_ended_raises_its_ending_again_and_reaps_nothing_else():
    """After the child's error (or its result), later calls raise that ending again: none
    waits for another child of this process (a `waitpid` of pid 0 would take any)."""
    other = subprocess.Popen(["sleep", "30"])
    try:
        def fails(line: forked.Line) -> None:
            raise ValueError("first")

        with forked.Partner(fails) as child:
            with pytest.raises(ValueError, match="^first$"):
                child.receive()
            for call in (child.join, child.receive, lambda: child.send(b"x")):
                with pytest.raises(ValueError, match="^first$"):
                    call()
        with forked.Partner(lambda line: b"done") as child:
            assert child.join() == b"done"
            with pytest.raises(ChildProcessError, match="result was taken"):
                child.receive()
        assert other.poll() is None  # still running, still this test's to reap
    finally:
        other.kill()
        other.wait()


def test_outputs_a_child_cannot_write_into_are_written_sequentially(tmp_path):
    """split=True on an output opened for appending, or not a file: the sequential bytes."""
    tree = run_passes(dumpfile.loads(synthetic_dump(2000), Options()), Options())
    sequential = io.BytesIO()
    write_image(tree, sequential, split=False)
    buffer = io.BytesIO()
    write_image(tree, buffer, split=True)
    assert buffer.getvalue() == sequential.getvalue()
    with open(tmp_path / "out.cfs", "ab") as f:
        write_image(tree, f, split=True)
    assert (tmp_path / "out.cfs").read_bytes() == sequential.getvalue()


def test_a_partner_trades_messages_both_ways_and_returns_its_result():
    def work(line: forked.Line) -> bytes:
        first = line.receive()
        line.send(first[::-1] * 100000)  # (more than a pipe holds, both ways)
        return b"done:%d" % len(line.receive())

    with forked.Partner(work) as child:
        child.send(b"abc")
        assert child.receive() == b"cba" * 100000
        child.send(bytes(1 << 20))
        assert child.join() == b"done:%d" % (1 << 20)
    assert child.pid == 0


def test_a_partners_error_is_raised_by_the_parents_next_receive_or_send():
    def fails(line: forked.Line) -> None:
        raise DumpfileError("invalid integer 'x': expected a base-10 number", "in.dump", 7, "SIZE")

    with forked.Partner(fails) as child, pytest.raises(DumpfileError) as caught:
        child.receive()
    assert str(caught.value) == "in.dump:7:SIZE: invalid integer 'x': expected a base-10 number"
    with forked.Partner(fails) as child, pytest.raises(DumpfileError):
        for _ in range(64):  # writes until the pipe is found broken (the child has ended)
            child.send(bytes(1 << 20))


def test_a_partner_that_dies_is_an_error():
    with forked.Partner(lambda line: os._exit(3)) as child, pytest.raises(ChildProcessError, match="status 3"):
        child.receive()
    with forked.Partner(lambda line: os._exit(0)) as child, pytest.raises(ChildProcessError, match="status 0"):
        child.join()


def test_leaving_a_partner_early_kills_and_reaps_it():
    child = forked.Partner(lambda line: line.receive())
    pid = child.pid
    with child:
        pass
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, 0)
