"""Comparing what cfsc builds with what the real tools build: images, stores, extractions."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cfsc.build import compile_tree
from cfsc.store.locks import LOCK_NAME

from tests.helpers.data import DATA
from tests.helpers.dirtrees import Entry, full_spec

# Debian packages' data.tar.xz members (tests/data/README.md)
DEBS = sorted((DATA / "tar").glob("*.data.tar.xz"))

# GNU tar, extracting as root with everything a layer can carry: the oracle for tar layers.
EXTRACT = ["tar", "--xattrs", "--xattrs-include=*", "--same-owner", "-p", "--numeric-owner",
           "--delay-directory-restore"]


# Upstream composefs 1.0.8's tools, built by .ci/setup (the byte reference).
MKCOMPOSEFS = "/tmp/cfs-src/build/tools/mkcomposefs"


def fsverity_tool(path, name: str = "sha256") -> str:
    """The Debian `fsverity digest` tool's hex digest of a file (the kernel's algorithm)."""
    out = subprocess.run(["fsverity", "digest", f"--hash-alg={name}", str(path)], check=True, capture_output=True,
                         text=True).stdout
    algo_hex, _name = out.split()
    assert algo_hex.startswith(f"{name}:")
    return algo_hex[len(name) + 1:]


def image(tree) -> bytes:
    return compile_tree(tree)


def store_listing(store: Path) -> list[tuple[str, int]]:
    """Objects and temp files, with their sizes (not the store's lock file: it stays)."""
    if not store.exists():
        return []
    return sorted((str(p.relative_to(store)), p.stat().st_size) for p in store.rglob("*")
                  if p.is_file() and p.name != LOCK_NAME)


def compare_images(cfsc, got: Path, want: Path) -> None:
    if got.read_bytes() != want.read_bytes():
        a = cfsc("dump", str(want), check=True).stdout.decode().splitlines()
        b = cfsc("dump", str(got), check=True).stdout.decode().splitlines()
        diff = [f"- {x}" for x in a if x not in b] + [f"+ {x}" for x in b if x not in a]
        raise AssertionError("images differ:\n" + "\n".join(diff[:40]))


def spec() -> list[Entry]:
    """Every kind of entry a tar layer can hold (the directory frontend's full tree, less sockets)."""
    return [e for e in full_spec() if e.kind != "sock"]
