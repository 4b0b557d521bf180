"""fs-verity digests against the Debian `fsverity` tool (the kernel's algorithm)."""

from __future__ import annotations

import os
import subprocess

import pytest
from cfsc.base.fsverity import ALGORITHMS, SHA512, FsVerityHasher, digest_bytes, digest_file

pytestmark = [pytest.mark.tools]

# Tree edges of both algorithms: 128 SHA-256 hashes fill a block, 64 SHA-512 ones.
SIZES = [0, 1, 4095, 4096, 4097, 64 * 4096, 64 * 4096 + 1, 128 * 4096, 128 * 4096 + 1, 3 * 1024 * 1024 + 17,
         64 * 64 * 4096 + 1, 128 * 128 * 4096 + 4097]


def fsverity_tool(path, name: str = "sha256") -> str:
    out = subprocess.run(["fsverity", "digest", f"--hash-alg={name}", str(path)], check=True, capture_output=True,
                         text=True).stdout
    algo_hex, _name = out.split()
    assert algo_hex.startswith(f"{name}:")
    return algo_hex[len(name) + 1:]


@pytest.mark.parametrize("name", ALGORITHMS)
@pytest.mark.parametrize("size", SIZES)
def test_matches_fsverity_tool(size, name, tmp_path, cfsc):
    algorithm = ALGORITHMS[name]
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    expected = fsverity_tool(path, name)
    assert digest_bytes(data, algorithm).hex() == expected
    assert digest_file(path, algorithm).hex() == expected
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
