"""fs-verity digests against the Debian `fsverity` tool (the kernel's algorithm)."""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from cfsc.base import fsverity
from cfsc.base.fsverity import (ALGORITHMS, SHA512, FsVerityHasher, digest_bytes, digest_file, hash_fd,
                                reference_digest)
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.checks import fsverity_tool

pytestmark = [pytest.mark.tools]

# Tree edges of both algorithms: 128 SHA-256 hashes fill a block, 64 SHA-512 ones.
SIZES = [0, 1, 4095, 4096, 4097, 64 * 4096, 64 * 4096 + 1, 128 * 4096, 128 * 4096 + 1, 3 * 1024 * 1024 + 17,
         64 * 64 * 4096 + 1, 128 * 128 * 4096 + 4097]


@pytest.mark.parametrize("name", ALGORITHMS)
@pytest.mark.parametrize("size", SIZES)
def test_matches_fsverity_tool(size, name, tmp_path, cfsc):
    algorithm = ALGORITHMS[name]
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    expected = fsverity_tool(path, name)
    assert reference_digest(data, algorithm).hex() == expected
    assert digest_bytes(data, algorithm).hex() == expected
    assert digest_file(path, algorithm).hex() == expected
    assert digest_file(path, algorithm, fsverity.hash_pool()).hex() == expected
    p = cfsc("measure", *(["--hash", name] if name != "sha256" else []), str(path), check=True)
    assert p.stdout.decode() == f"{name}:{expected} {path}\n"


def test_empty_file_is_the_kernel_value_not_composefs_1_0_8():
    # composefs 1.0.8's measure-file gives cfc3391077…; the kernel and fsverity give 3d248ca5….
    assert digest_bytes(b"").hex().startswith("3d248ca5")


@pytest.mark.parametrize("name", ALGORITHMS)
def test_incremental_any_chunking(name):
    algorithm = ALGORITHMS[name]
    data = os.urandom(600_000)
    for step in (1, 7, 4096, 4097, 65536):
        h = FsVerityHasher(algorithm)
        for i in range(0, len(data), step):
            h.update(data[i:i + step])
        assert h.digest() == digest_bytes(data, algorithm)


# Runs of zeros that start and end off block and off level-block edges (128 hashes a block
# for SHA-256, 64 for SHA-512), and ones that fill whole level blocks two levels up.
_ZERO_RUNS = [0, 1, 4095, 4096, 4097, 64 * 4096 - 1, 64 * 4096, 128 * 4096 + 3, 128 * 128 * 4096, 300_000]


@pytest.mark.parametrize("name", ALGORITHMS)
@given(parts=st.lists(st.one_of(st.sampled_from(_ZERO_RUNS), st.integers(0, 600_000),
                                st.binary(min_size=1, max_size=9000)), max_size=6))
@settings(max_examples=60, deadline=None)
def test_update_zeros_equals_hashing_the_zeros(name, parts):
    """A hole hashed by runs (`update_zeros`) is the tree of its zero bytes, wherever it
    starts and ends."""
    algorithm = ALGORITHMS[name]
    by_runs = FsVerityHasher(algorithm)
    data = []
    for part in parts:
        if isinstance(part, int):
            by_runs.update_zeros(part)
            data.append(bytes(part))
        else:
            by_runs.update(part)
            data.append(part)
    assert by_runs.digest() == reference_digest(b"".join(data), algorithm)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_a_sparse_file_by_runs_matches_fsverity_tool(name, tmp_path):
    """300 MiB of holes around three bytes of data: the `fsverity` tool reads the zeros, the
    hasher takes the holes as runs."""
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.write(b"a")
        f.seek(100 << 20)
        f.write(b"b")
        f.seek((300 << 20) + 4095)
        f.write(b"c")
    h = FsVerityHasher(ALGORITHMS[name])
    h.update(b"a")
    h.update_zeros((100 << 20) - 1)
    h.update(b"b")
    h.update_zeros((200 << 20) + 4094)
    h.update(b"c")
    assert h.digest().hex() == fsverity_tool(path, name)


def test_measure_sha512_default_and_bad_hash(tmp_path, cfsc):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 5000)
    assert cfsc("measure", "--hash", "sha256", str(path), check=True).stdout == cfsc("measure", str(path)).stdout
    assert len(digest_bytes(b"x", SHA512)) == 64
    p = cfsc("measure", "--hash", "md5", str(path))
    assert p.returncode == 2 and p.stderr.decode() == "error: --hash: 'md5': expected sha256 or sha512\n"


def test_measure_several_files_and_missing(tmp_path, cfsc):
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"")
    p = cfsc("measure", str(tmp_path / "a"), str(tmp_path / "b"), check=True)
    assert len(p.stdout.splitlines()) == 2
    p = cfsc("measure", str(tmp_path / "missing"))
    assert p.returncode == 2 and p.stderr.decode().startswith("error: ")


# Sizes around every boundary the fast paths have: a block, a level-1 block of hashes (128
# blocks), the pool's chunk (4 MiB) and several of them, plus anything in between.
EDGES = [0, 1, 4095, 4096, 4097, 128 * 4096 - 1, 128 * 4096, 128 * 4096 + 1, (4 << 20) - 1, 4 << 20,
         (4 << 20) + 1, 3 * (4 << 20) + 4097, 129 * 128 * 4096 + 1]
SIZES_ANY = st.one_of(st.sampled_from(EDGES), st.integers(0, 5 << 20))


@pytest.fixture(scope="module")
def pool():
    """A pool of this module's own, ended after it (idle threads would keep other tests from forking)."""
    with ThreadPoolExecutor(2) as executor:
        yield executor


@settings(max_examples=40, deadline=None)
@given(size=SIZES_ANY, seed=st.integers(0, 2**32), step=st.integers(1, 3 << 20))
def test_block_hashes_and_pooled_hash_fd_equal_reference_digest(size, seed, step, tmp_path_factory, pool):
    """block_hashes/digest_bytes, the incremental hasher with any chunking, and hash_fd
    sequential and pooled (files, pipes, with a copy written on the way) against the plain
    sequential Merkle tree."""
    data = random.Random(seed).randbytes(size)
    expected = reference_digest(data)
    assert digest_bytes(data) == expected
    h = FsVerityHasher()
    for i in range(0, size, step):
        h.update(data[i:i + step])
    assert h.digest() == expected
    path = tmp_path_factory.mktemp("f") / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        for maybe in (None, pool):
            assert hash_fd(fd, 0, pool=maybe) == (expected, size)
        copy = os.open(path.with_name("copy"), os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            assert hash_fd(fd, 0, copy, pool=pool) == (expected, size)
        finally:
            os.close(copy)
        assert path.with_name("copy").read_bytes() == data
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [0, 4097, (4 << 20) + 4097, 3 * (4 << 20)])
def test_pooled_hash_of_a_pipe(size, pool):
    """Pipes return short reads: a pooled chunk must still hold whole blocks."""
    data = random.Random(size).randbytes(size)
    r, w = os.pipe()
    with ThreadPoolExecutor(1) as writer:
        done = writer.submit(lambda: (os.write(w, data[:5000]), os.write(w, data[5000:]), os.close(w)))
        try:
            assert hash_fd(r, pool=pool) == (reference_digest(data), size)
        finally:
            os.close(r)
        done.result()


def test_update_hashes_refuses_misaligned_input():
    h = FsVerityHasher()
    with pytest.raises(ValueError):
        h.update_hashes(b"", 100)
    h.update(b"x")
    with pytest.raises(ValueError):
        h.update_hashes(b"", 4096)


def test_the_shared_pool_is_one_pool():
    assert fsverity.hash_pool() is fsverity.hash_pool()


def test_short_gil_switches_restores_the_interval():
    import sys

    before = sys.getswitchinterval()
    with pytest.raises(KeyError), fsverity.short_gil_switches():
        assert sys.getswitchinterval() == min(before, fsverity.SWITCH_INTERVAL)
        raise KeyError
    assert sys.getswitchinterval() == before
