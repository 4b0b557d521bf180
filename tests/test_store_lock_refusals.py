"""The store's lock file (`STORE/.cfsc-lock`, `cfsc.store.locks`) when it is not what it must
be, and stores that cannot be written: a compile (and gc) refuses with one line naming the
lock file and what was expected, and writes nothing — no image, no store object, no temp file.

Exit codes as the store's errors have them (`cfsc.store.objects`): the store's own shape
(something other than a regular file where the lock file belongs) is bad input, 2; a system
that refuses (no permission, a read-only file system) is the environment, 1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from cfsc.base import syscalls

from tests.helpers.nobody import AS_NOBODY, nobody_dir
from tests.helpers.data import CFSC, run_cfsc
from tests.helpers.dirtrees import Entry, make

LOCK = ".cfsc-lock"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts and setpriv need root")


def everything(path: Path) -> dict[str, tuple]:
    """Every name under `path` with its type, inode and size: to show a run changed nothing."""
    out = {}
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(path))] = (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def src(tmp_path) -> Path:
    root = tmp_path / "src"
    make(root, [Entry(b"", "dir"), Entry(b"a", data=b"a" * 5000), Entry(b"b", data=b"b" * 7000)])
    return root


def compile_into(src: Path, store: Path, out: Path, *run_as: str) -> subprocess.CompletedProcess:
    return subprocess.run([*run_as, CFSC, "compile", str(src), "-o", str(out), "--digest-store", str(store)],
                          capture_output=True, text=True)


def make_lock(store: Path, kind: str) -> None:
    lock = store / LOCK
    if kind == "directory":
        lock.mkdir()
    elif kind == "symlink":
        (store / "elsewhere").write_bytes(b"")
        lock.symlink_to("elsewhere")
    elif kind == "dangling symlink":
        lock.symlink_to("nowhere")
    elif kind == "FIFO":
        os.mkfifo(lock)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(lock))
        s.close()
    elif kind == "character device":
        os.mknod(lock, 0o600 | 0o020000, os.makedev(1, 3))  # /dev/null's numbers
    else:
        raise AssertionError(kind)


KINDS = {"directory": "a directory", "symlink": "a symlink", "dangling symlink": "a symlink", "FIFO": "a FIFO",
         "socket": "a socket", "character device": "a character device"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_lock_file_that_is_not_a_regular_file_is_refused_by_name(tmp_path, src, kind):
    if kind in ("character device",) and os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    store = tmp_path / "store"
    store.mkdir()
    make_lock(store, kind)
    before = everything(store)
    out = tmp_path / "x.cfs"
    p = compile_into(src, store, out)
    assert p.returncode == 2, p.stderr
    assert p.stderr == (f"error: {store / LOCK}: {KINDS[kind]} where the store's lock file belongs: "
                        "expected a regular file\n")
    assert not out.exists() and everything(store) == before
    # gc refuses it the same way, removing nothing
    (tmp_path / "keep").mkdir()
    p = run_cfsc("gc", str(store), "--keep-dir", str(tmp_path / "keep"))
    assert p.returncode == 2 and p.stderr.decode() == (
        f"error: {store / LOCK}: {KINDS[kind]} where the store's lock file belongs: expected a regular file\n")
    assert everything(store) == before




@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to run the compile as nobody")
def test_an_unreadable_lock_file_is_refused_and_nothing_is_written():
    """A store anyone may write to, whose lock file only root may read: a compile as another
    user cannot take the lease, so it must not use the store at all (gc could not exclude it)."""
    with nobody_dir("cfsc-lock-") as base:
        src = base / "src"
        make(src, [Entry(b"", "dir", mode=0o755), Entry(b"a", data=b"a" * 5000, mode=0o644)])
        store = base / "store"
        store.mkdir()
        store.chmod(0o777)
        (store / LOCK).write_bytes(b"")
        (store / LOCK).chmod(0)
        before = everything(store)
        p = compile_into(src, store, base / "x.cfs", *AS_NOBODY)
        assert p.returncode == 1, p.stderr
        assert p.stderr == f"error: {store / LOCK}: cannot open the store's lock file: Permission denied\n"
        assert not (base / "x.cfs").exists() and everything(store) == before


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to run the compile as nobody")
def test_a_store_without_write_permission_is_used_read_only():
    """No lock file and no permission to make one: the run uses the store without a lease
    (it can only read it).  Every object already there: the compile succeeds; one missing:
    one line naming the store, exit 1, nothing written."""
    with nobody_dir("cfsc-lock-") as base:
        src = base / "src"
        make(src, [Entry(b"", "dir", mode=0o755), Entry(b"a", data=b"a" * 5000, mode=0o644)])
        store = base / "store"
        full = compile_into(src, store, base / "first.cfs")
        assert full.returncode == 0, full.stderr
        (store / LOCK).unlink()
        store.chmod(0o755)  # root's: nobody may not write here
        before = everything(store)
        p = compile_into(src, store, base / "x.cfs", *AS_NOBODY)
        assert p.returncode == 0, p.stderr
        assert (base / "x.cfs").read_bytes() == (base / "first.cfs").read_bytes()
        assert everything(store) == before
        (src / "new").write_bytes(b"n" * 5000)
        (src / "new").chmod(0o644)
        p = compile_into(src, store, base / "y.cfs", *AS_NOBODY)
        assert p.returncode == 1, p.stderr
        assert p.stderr == f"error: {store}: cannot create a temporary file in the store: Permission denied\n"
        assert not (base / "y.cfs").exists() and everything(store) == before


@contextlib.contextmanager
def read_only(path: Path):
    """`path` bind-mounted read-only on itself."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield
    finally:
        syscalls.umount2(str(path), syscalls.MNT_DETACH)


@needs_root
def test_a_read_only_store_is_used_read_only(tmp_path, src):
    """The same on a file system mounted read-only, with or without a lock file in it."""
    store = tmp_path / "store"
    first = tmp_path / "first.cfs"
    p = compile_into(src, store, first)
    assert p.returncode == 0, p.stderr
    (src / "new").write_bytes(b"n" * 5000)
    for with_lock in (True, False):
        if not with_lock:
            (store / LOCK).unlink()
        with read_only(store):
            before = everything(store)
            p = compile_into(src, store, tmp_path / "y.cfs")
            assert p.returncode == 1, p.stderr
            assert p.stderr == f"error: {store}: cannot create a temporary file in the store: Read-only file system\n"
            assert not (tmp_path / "y.cfs").exists() and everything(store) == before
    (src / "new").unlink()
    run_cfsc("compile", str(src), "-o", str(tmp_path / "want.cfs"), check=True)  # (the source's mtime changed)
    with read_only(store):
        p = compile_into(src, store, tmp_path / "z.cfs")
        assert p.returncode == 0, p.stderr
        assert (tmp_path / "z.cfs").read_bytes() == (tmp_path / "want.cfs").read_bytes()
