"""fs-verity digests against the Debian `fsverity` tool (the kernel's algorithm)."""

from __future__ import annotations

import os
import subprocess

import pytest
from cfsc.base.fsverity import FsVerityHasher, digest_bytes, digest_file

pytestmark = [pytest.mark.tools]

SIZES = [0, 1, 4095, 4096, 4097, 128 * 4096, 128 * 4096 + 1, 3 * 1024 * 1024 + 17, 128 * 128 * 4096 + 4097]


def fsverity_tool(path) -> str:
    out = subprocess.run(["fsverity", "digest", str(path)], check=True, capture_output=True, text=True).stdout
    algo_hex, _name = out.split()
    assert algo_hex.startswith("sha256:")
    return algo_hex[len("sha256:"):]


@pytest.mark.parametrize("size", SIZES)
def test_matches_fsverity_tool(size, tmp_path, cfsc):
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    expected = fsverity_tool(path)
    assert digest_bytes(data).hex() == expected
    assert digest_file(path).hex() == expected
    p = cfsc("measure", str(path), check=True)
    assert p.stdout.decode() == f"sha256:{expected} {path}\n"


def test_empty_file_is_the_kernel_value_not_composefs_1_0_8():
    # composefs 1.0.8's measure-file gives cfc3391077…; the kernel and fsverity give 3d248ca5….
    assert digest_bytes(b"").hex().startswith("3d248ca5")


def test_incremental_any_chunking():
    data = os.urandom(600_000)
    for step in (1, 7, 4096, 4097, 65536):
        h = FsVerityHasher()
        for i in range(0, len(data), step):
            h.update(data[i:i + step])
        assert h.digest() == digest_bytes(data)


def test_measure_several_files_and_missing(tmp_path, cfsc):
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"")
    p = cfsc("measure", str(tmp_path / "a"), str(tmp_path / "b"), check=True)
    assert len(p.stdout.splitlines()) == 2
    p = cfsc("measure", str(tmp_path / "missing"))
    assert p.returncode == 2 and p.stderr.decode().startswith("error: ")
