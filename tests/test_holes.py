"""Files mostly made of holes, on this machine's ext4: read by their map, hashed by runs, copied
into the store with their holes kept; the digest is the `fsverity` tool's (which reads every
zero) and the image upstream mkcomposefs's."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from cfsc.base.fsverity import ALGORITHMS, FsVerityHasher, hash_fd, payload_path
from cfsc.base.errors import InputError
from cfsc.base.holes import data_extents, mostly_holes
from cfsc.frontends.oci.storage import DiffReader

from tests.helpers.checks import MKCOMPOSEFS, fsverity_tool, store_listing
from tests.helpers.data import CFSC
from tests.helpers.tarcraft import archive, member

pytestmark = [pytest.mark.tools]

MiB = 1 << 20
# (size, [(offset, data)]): data at the start, the end, off block edges, in many small pieces
LAYOUTS = {
    "middle": (300 * MiB, [(100 * MiB + 5, b"mid")]),
    "ends": (200 * MiB + 4097, [(0, b"head"), (200 * MiB + 4093, b"tail")]),
    "all-hole": (64 * MiB, []),
    "many": (64 * MiB, [(i * 300_007, b"%d" % i * 700) for i in range(200)]),
    "dense-start": (16 * MiB, [(0, os.urandom(3 * MiB)), (15 * MiB, b"z")]),
}


def make(path: Path, size: int, pieces: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
        f.truncate(size)


def by_runs(size: int, pieces: list[tuple[int, bytes]], algorithm=ALGORITHMS["sha256"]) -> bytes:
    """The digest from the layout alone: zeros as runs, the data as bytes."""
    hasher = FsVerityHasher(algorithm)
    at = 0
    for offset, data in pieces:
        hasher.update_zeros(offset - at)
        hasher.update(data)
        at = offset + len(data)
    hasher.update_zeros(size - at)
    return hasher.digest()


@pytest.mark.parametrize("name", ALGORITHMS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_file_of_holes_hashes_as_the_tool_reads_it(layout, name, tmp_path):
    size, pieces = LAYOUTS[layout]
    path = tmp_path / "f"
    make(path, size, pieces)
    assert mostly_holes(path.stat())
    expected = fsverity_tool(path, name)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert hash_fd(fd, 0, algorithm=ALGORITHMS[name]) == (bytes.fromhex(expected), size)
        os.lseek(fd, 0, os.SEEK_SET)  # from the current position, as for a pipe: read to the end
        assert hash_fd(fd, algorithm=ALGORITHMS[name])[0].hex() == expected
        assert os.lseek(fd, 0, os.SEEK_CUR) == size
        copy = tmp_path / "copy"
        out = os.open(copy, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            assert hash_fd(fd, 0, out, ALGORITHMS[name])[0].hex() == expected
        finally:
            os.close(out)
    finally:
        os.close(fd)
    assert by_runs(size, pieces, ALGORITHMS[name]).hex() == expected
    assert copy.read_bytes() == path.read_bytes()
    assert copy.stat().st_blocks <= path.stat().st_blocks + 16  # the holes stayed holes


def test_data_extents_of_a_dense_and_an_empty_range(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 * 4096))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert list(data_extents(fd, 0, 3 * 4096)) == [(0, 3 * 4096)]
        assert list(data_extents(fd, 4096, 5000)) == [(4096, 904)]
        assert list(data_extents(fd, 3 * 4096, 3 * 4096)) == []
        assert not mostly_holes(os.fstat(fd))
    finally:
        os.close(fd)
    make(path, 1 << 30, [])
    fd = os.open(path, os.O_RDONLY)
    try:
        assert list(data_extents(fd, 0, 1 << 30)) == []
    finally:
        os.close(fd)


def test_a_tree_with_sparse_files_against_mkcomposefs(tmp_path, cfsc):
    """The image is upstream's, byte for byte; the store objects have upstream's names and the
    sparse files' hold their holes (upstream's copies hold every zero)."""
    src = tmp_path / "src"
    src.mkdir()
    for layout, (size, pieces) in LAYOUTS.items():
        make(src / layout, size, pieces)
    (src / "plain").write_bytes(os.urandom(3 * MiB))
    ours, theirs = tmp_path / "ours.cfs", tmp_path / "theirs.cfs"
    cfsc("compile", str(src), "-o", str(ours), "--digest-store", str(tmp_path / "s1"), check=True)
    subprocess.run([MKCOMPOSEFS, f"--digest-store={tmp_path / 's2'}", str(src), str(theirs)], check=True)
    assert ours.read_bytes() == theirs.read_bytes()
    assert store_listing(tmp_path / "s1") == store_listing(tmp_path / "s2")
    for layout, (size, pieces) in LAYOUTS.items():
        obj = tmp_path / "s1" / payload_path(by_runs(size, pieces)).decode()
        assert obj.stat().st_blocks <= (src / layout).stat().st_blocks + 16
        assert obj.read_bytes() == (src / layout).read_bytes()


def test_a_terabyte_of_holes_in_a_tree_measure_and_fsck(tmp_path, cfsc):
    """A 1 TiB file holding 12 bytes (a large-uid lastlog, a VM disk) is compiled, measured
    and checked in the store without reading a terabyte of zeros."""
    src = tmp_path / "src"
    src.mkdir()
    size, pieces = 1 << 40, [(0, b"head"), (600 << 30, b"mid!"), ((1 << 40) - 4, b"tail")]
    make(src / "lastlog", size, pieces)
    digest = by_runs(size, pieces)
    p = cfsc("measure", str(src / "lastlog"), check=True)
    assert p.stdout.decode() == f"sha256:{digest.hex()} {src / 'lastlog'}\n"
    store = tmp_path / "store"
    image = tmp_path / "x.cfs"
    cfsc("compile", str(src), "-o", str(image), "--digest-store", str(store), check=True)
    obj = store / payload_path(digest).decode()
    assert obj.stat().st_size == size and obj.stat().st_blocks * 512 <= MiB
    cfsc("fsck-store", "--store", str(store), str(image), check=True)


def test_a_terabyte_of_holes_served_over_fuse(tmp_path, cfsc):
    """The FUSE server checks a backing file's digest when it is first opened: a sparse one is
    checked by its map, so reading 4 bytes of a 1 TiB file does not hash a terabyte."""
    src = tmp_path / "src"
    src.mkdir()
    size, pieces = 1 << 40, [(0, b"head"), (600 << 30, b"mid!"), ((1 << 40) - 4, b"tail")]
    make(src / "disk.img", size, pieces)
    store, image, mnt = tmp_path / "store", tmp_path / "x.cfs", tmp_path / "mnt"
    mnt.mkdir()
    cfsc("compile", str(src), "-o", str(image), "--digest-store", str(store), check=True)
    for passthrough in ("--passthrough", "--no-passthrough"):
        cfsc("mount", str(image), str(mnt), "--store", str(store), "--verity", "require", passthrough, check=True)
        try:
            with open(mnt / "disk.img", "rb") as f:
                f.seek(600 << 30)
                assert f.read(4) == b"mid!"
            assert (mnt / "disk.img").stat().st_size == size
        finally:
            cfsc("umount", str(mnt), check=True)


def test_hashing_by_the_map_keeps_the_read_position(tmp_path):
    """Finding the map moves the file position (lseek); a caller reading the same descriptor
    afterwards (`cfsc export` reads the object it just checked) must find it where it was."""
    size, pieces = LAYOUTS["ends"]
    path = tmp_path / "f"
    make(path, size, pieces)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 7, os.SEEK_SET)
        assert hash_fd(fd, 0)[1] == size
        assert os.lseek(fd, 0, os.SEEK_CUR) == 7
        assert os.read(fd, 4) == bytes(4)
    finally:
        os.close(fd)


def test_export_of_an_image_with_a_sparse_object_compiles_back(tmp_path, cfsc):
    src = tmp_path / "src"
    src.mkdir()
    size, pieces = LAYOUTS["middle"]
    make(src / "disk.img", size, pieces)
    store, image, layer, again = tmp_path / "s", tmp_path / "x.cfs", tmp_path / "x.tar", tmp_path / "y.cfs"
    cfsc("compile", str(src), "-o", str(image), "--digest-store", str(store), check=True)
    cfsc("export", str(image), "--store", str(store), "-o", str(layer), check=True)
    cfsc("compile", str(layer), "-o", str(again), check=True)
    assert again.read_bytes() == image.read_bytes()


def test_sparse_members_are_synced_by_their_data(tmp_path, cfsc):
    """The store syncs every 32 MiB of new objects; a sparse object counts its data, not its
    holes (50 members of 64 MiB with 2 bytes each made 51 syncfs calls)."""
    def sparse(name: bytes, size: int) -> bytes:
        return member(name, b"ab", pax={b"GNU.sparse.map": b"0,1,%d,1" % (size - 1), b"GNU.sparse.numblocks": b"2",
                                        b"GNU.sparse.size": b"%d" % size})

    layer = tmp_path / "layer.tar"
    layer.write_bytes(archive(*(sparse(b"f%d" % i, (64 << 20) + i) for i in range(50))))
    log = tmp_path / "strace"
    subprocess.run(["strace", "-f", "-e", "trace=syncfs", "-o", str(log), CFSC, "compile", str(layer), "-o",
                    str(tmp_path / "x.cfs"), "--digest-store", str(tmp_path / "s"), "--threads", "1"], check=True)
    assert log.read_text().count("syncfs(") <= 2


def test_a_sparse_file_the_store_cannot_hold_is_one_line(tmp_path, cfsc):
    """A 1 PiB sparse file (tmpfs holds it) into a store on ext4 (at most 16 TiB): the store's
    file system is named as the problem, not the source."""
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        make(shm / "huge", 1 << 50, [(0, b"x")])
        p = cfsc("compile", str(shm), "-o", str(tmp_path / "x.cfs"), "--digest-store", str(tmp_path / "s"))
        lines = p.stderr.decode().splitlines()
        assert p.returncode != 0 and len(lines) == 1, lines
        assert f"{tmp_path / 's'}: cannot write a store object: its file system holds no file reaching byte" \
            f" {1 << 50}" in lines[0]
        assert store_listing(tmp_path / "s") == []
    finally:
        shutil.rmtree(shm)


def test_containers_storage_diff_reads_a_sparse_file_by_its_map(tmp_path):
    """A layer's diff directory (containers-storage) holding a file mostly made of holes: the
    reader gives its holes as lengths, its data as bytes, in order."""
    diff = tmp_path / "diff"
    diff.mkdir()
    size, pieces = LAYOUTS["ends"]
    make(diff / "lastlog", size, pieces)
    (diff / "plain").write_bytes(b"data")
    reader = DiffReader(str(diff), None)
    got = {}
    for m in reader.members():
        if m.path in (b"lastlog", b"plain"):
            got[m.path] = (reader.has_holes, list(reader.extents(m.size)))
    holes, parts = got[b"lastlog"]
    assert holes and any(isinstance(p, int) for p in parts)
    assert b"".join(bytes(p) if isinstance(p, int) else p for p in parts) == (diff / "lastlog").read_bytes()
    assert got[b"plain"] == (False, [b"data"])


@pytest.mark.parametrize("layout", ["ends", "plain"])
def test_a_containers_storage_file_that_changes_while_read_is_refused(tmp_path, layout):
    """Grown or cut between the scan and the read: one located error, read by map or not."""
    diff = tmp_path / "diff"
    diff.mkdir()
    size, pieces = LAYOUTS["ends"] if layout == "ends" else (5000, [(0, os.urandom(5000))])
    make(diff / "f", size, pieces)
    for change in (size + 1, size - 4097):
        reader = DiffReader(str(diff), None)
        for m in reader.members():
            if m.path == b"f":
                assert reader.has_holes == (layout == "ends")
                os.truncate(diff / "f", change)
                with pytest.raises(InputError, match=r"changed while read") as e:
                    list(reader.extents(m.size))
                assert str(e.value).startswith(str(diff / "f"))
        make(diff / "f", size, pieces)


def test_hashing_by_the_map_can_be_cancelled_and_keeps_the_position(tmp_path):
    """`poll` runs before each read of the data regions (FUSE's INTERRUPT raises there), and a
    cancelled hash leaves the file position where it was."""
    size, pieces = LAYOUTS["dense-start"]
    path = tmp_path / "f"
    make(path, size, pieces)

    class Stop(Exception):
        pass

    calls = []

    def poll() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise Stop

    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 11, os.SEEK_SET)
        with pytest.raises(Stop):
            hash_fd(fd, 0, poll=poll)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 11 and len(calls) == 2
        calls.clear()
        assert hash_fd(fd, 0, poll=lambda: calls.append(1))[0].hex() == fsverity_tool(path)
        assert len(calls) >= 4  # (3 MiB + 1 byte of data, 1 MiB a read)
    finally:
        os.close(fd)
