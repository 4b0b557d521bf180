"""The directory frontend's worker processes against its thread pool (the reference path):
same image bytes, same store, same errors; and no worker outlives a load, even a failed one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cfsc.base.errors import InputError
from cfsc.base.fsverity import digest_bytes
from cfsc.base.options import Options
from cfsc.build import compile_image
from cfsc.frontends import directory, directory_workers
from cfsc.store.locks import LOCK_NAME
from cfsc.store.objects import TEMP_PREFIX, Store

from tests.helpers.nobody import AS_NOBODY, nobody_dir
from tests.helpers.data import CFSC
from tests.helpers.dirtrees import Entry, full_spec, make
from tests.helpers.procs import children

pytestmark = [pytest.mark.root]

FLAGS = [{}, {"hardlinks": True}, {"use_epoch": True}, {"skip_xattrs": True}, {"user_xattrs": True},
         {"threads": 1}, {"hash": "sha512"}]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers") / "src"
    spec = full_spec()
    # Many files and directories: batches fill, several workers take them, directories close.
    for d in range(12):
        spec.append(Entry(b"many%d" % d, "dir"))
        for f in range(40):
            spec.append(Entry(b"many%d/f%d" % (d, f), data=(b"%d-%d " % (d, f)) * (f * 37 % 3000)))
    spec.append(Entry(b"many0/again", data=b"1-1 " * 37))  # content a worker may stage twice
    make(root, spec)
    return root


def store_listing(store: Path) -> dict[str, bytes]:
    """Every name in a store (temp files too) with its content; the lock file aside."""
    out = {}
    for p in sorted(store.rglob("*")):
        if p.is_file() and p.name != LOCK_NAME:
            out[str(p.relative_to(store))] = p.read_bytes()
    return out


def compile_with(hashing: str, source: Path, out: Path, monkeypatch, **flags) -> bytes:
    monkeypatch.setattr(directory, "WORKERS", hashing)
    compile_image([str(source)], str(out), Options(**flags))
    return out.read_bytes()


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "defaults")
def test_processes_build_the_threads_image(tree, tmp_path, monkeypatch, flags):
    before = children()
    a = compile_with("threads", tree, tmp_path / "threads.cfs", monkeypatch, **flags)
    b = compile_with("processes", tree, tmp_path / "processes.cfs", monkeypatch, **flags)
    assert a == b
    assert children() == before  # every worker was waited for


@pytest.mark.parametrize("whole_read", [None, 1 << 20], ids=["whole", "streamed"])
@pytest.mark.parametrize("mode", ["new", "full", "half"])
def test_processes_fill_the_store_as_threads_do(tree, tmp_path, monkeypatch, mode, whole_read):
    """New store, full store (every object there: found, not written), half full (some found,
    some staged); big files read whole or streamed (copied into the store from the file)."""
    if whole_read:
        monkeypatch.setattr(directory, "WHOLE_READ", whole_read)
    results = {}
    for hashing in ("threads", "processes"):
        store = tmp_path / f"{hashing}-store"
        if mode == "full":
            compile_with("threads", tree, tmp_path / "fill.cfs", monkeypatch, digest_store=str(store))
        elif mode == "half":
            for name in ("big", "s65", "many3/f5", "many7/f30"):
                data = (tree / name).read_bytes()
                with Store(store) as s:
                    s.import_bytes(data, digest_bytes(data))
        image = compile_with(hashing, tree, tmp_path / f"{hashing}.cfs", monkeypatch, digest_store=str(store))
        results[hashing] = image, store_listing(store)
        assert not [n for n in os.listdir(store) if n.startswith(TEMP_PREFIX)]
    assert results["threads"] == results["processes"]


def test_a_killed_worker_is_a_located_error_and_leaves_no_object(tree, tmp_path, monkeypatch):
    """A worker that dies mid-run (here: SIGKILL while hashing one file): the load fails with a
    one-line error naming the source, nothing is named in the store, and no worker is left."""
    real = directory_workers.digest_bytes
    victim = os.getpid()

    def dying(data, algorithm):
        if len(data) == 3 * 1024 * 1024 + 17 and os.getpid() != victim:  # "big", in a worker
            os.kill(os.getpid(), signal.SIGKILL)
        return real(data, algorithm)

    monkeypatch.setattr(directory_workers, "digest_bytes", dying)
    monkeypatch.setattr(directory, "WORKERS", "processes")
    store = tmp_path / "store"
    before = children()
    with pytest.raises(InputError, match="hashing worker process died") as e:
        compile_image([str(tree)], str(tmp_path / "x.cfs"), Options(digest_store=str(store)))
    assert e.value.where == str(tree)
    assert children() == before
    assert not (tmp_path / "x.cfs").exists()
    assert not store.exists() or not [n for n in os.listdir(store) if len(n) == 2]  # no object named
    # The killed worker's own temp files (of its unanswered batch) are what `cfsc gc` removes.


@pytest.mark.parametrize("hashing", ["threads", "processes"])
def test_a_refused_file_discards_what_workers_staged(tmp_path, monkeypatch, hashing):
    """The run fails on one file while workers (or pool threads) have staged others: no temp
    file stays."""
    root = tmp_path / "src"
    make(root, [Entry(b"", "dir")] + [Entry(b"f%03d" % i, data=b"%d" % i * 5000) for i in range(300)])
    real = directory_workers.digest_bytes

    def modifying(data, algorithm):
        result = real(data, algorithm)
        if bytes(data[:4]) == b"2502":  # f250: grows while it is read
            with open(root / "f250", "ab") as f:
                f.write(b"more")
        return result

    monkeypatch.setattr(directory_workers, "digest_bytes", modifying)
    monkeypatch.setattr(directory, "WORKERS", hashing)
    store = tmp_path / "store"
    with pytest.raises(InputError, match="modified during the scan") as e:
        directory.load(str(root), Options(digest_store=str(store)))
    assert e.value.where == f"{root}/f250"
    assert not [p for p in store.rglob("*") if p.is_file() and p.name != LOCK_NAME]


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to run the compile as nobody")
def test_unreadable_files_as_a_user(tmp_path):
    """Without read permission (root reads everything, so this runs as nobody): an empty file
    is fine (mkcomposefs never opens it), a non-empty one is a located error."""
    with nobody_dir("cfsc-unreadable-") as base:
        root = base / "src"
        make(root, [Entry(b"", "dir", mode=0o755), Entry(b"ok", data=b"x" * 100, mode=0o644),
                    Entry(b"empty", data=b"", mode=0o000)])
        run = [*AS_NOBODY, CFSC, "compile", str(root), "-o", str(base / "x.cfs")]
        p = subprocess.run(run, capture_output=True)
        assert p.returncode == 0, p.stderr
        (root / "secret").write_bytes(b"s" * 10)
        (root / "secret").chmod(0)
        p = subprocess.run(run, capture_output=True)
        assert p.returncode == 2 and p.stderr.decode() == f"error: {root}/secret: cannot open: Permission denied\n"


def test_workers_die_with_a_killed_compile(tmp_path):
    """`kill -9` of the compile: its workers die too (no orphan keeps writing into the store or
    holding its lease), leaving temp files for `cfsc gc` as any killed import does."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(64):  # sparse: cheap to make, still 3 MiB each to hash and copy
        with open(src / f"f{i:02d}", "wb") as f:
            f.write(b"file %d\n" % i)
            f.truncate(3 << 20)
    store = tmp_path / "store"
    proc = subprocess.Popen([CFSC, "compile", str(src), "-o", str(tmp_path / "x.cfs"), "--digest-store", str(store),
                             "--threads", "2"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120  # a bound against hanging, not a timing assert
    workers: set[int] = set()
    while len(workers) < 2 or not list(store.glob(TEMP_PREFIX + "*")):
        assert proc.poll() is None and time.monotonic() < deadline
        for task in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{task}/children") as f:
                workers.update(int(p) for p in f.read().split())
        time.sleep(0.002)
    for pid in workers:  # stopped, they could not notice their socket's EOF: only the kernel ends them
        os.kill(pid, signal.SIGSTOP)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    try:
        while any(alive(pid) for pid in workers):
            assert time.monotonic() < deadline, workers
            time.sleep(0.01)
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not (tmp_path / "x.cfs").exists()
    assert not [n for n in os.listdir(store) if len(n) == 2]  # no object named


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
