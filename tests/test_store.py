"""The content store: one object per distinct content, named by its fs-verity digest (checked
with the Debian `fsverity` tool), atomic under kill -9, shared safely by concurrent importers."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest
from conftest import CFSC, image_of
from dirtrees import Entry, dumpfile, make

from cfsc.fsverity import digest_bytes, payload_path
from cfsc.store import TEMP_PREFIX, SourceChanged, Store


def objects(store) -> dict[str, os.stat_result]:
    """Every object name (`xx/yyyy…`) in a store, with its stat."""
    out = {}
    for fan in sorted(os.listdir(store)):
        if fan.startswith(TEMP_PREFIX):
            continue
        assert len(fan) == 2, fan
        for name in os.listdir(os.path.join(store, fan)):
            out[f"{fan}/{name}"] = os.lstat(os.path.join(store, fan, name))
    return out


def check_objects(store) -> dict[str, os.stat_result]:
    """Every object's fs-verity digest, by `fsverity digest`, equals its name."""
    found = objects(store)
    if found:
        out = subprocess.run(["fsverity", "digest", *found], cwd=store, check=True, capture_output=True,
                             text=True).stdout
        for line in out.splitlines():
            digest, name = line.split()
            assert digest == "sha256:" + name.replace("/", ""), f"object {name} holds other content"
    return found


def test_one_object_per_distinct_content(tmp_path, cfsc):
    contents = [b"", b"s" * 64, b"a" * 65, b"a" * 65, b"b" * 4096, os.urandom(300_000), os.urandom(300_000)]
    spec = [Entry(b"", "dir"), Entry(b"sub", "dir")]
    spec += [Entry(b"f%d" % i, data=c) for i, c in enumerate(contents)]
    spec += [Entry(b"sub/copy%d" % i, data=c) for i, c in enumerate(contents)]
    make(tmp_path / "src", spec)
    store = tmp_path / "store"
    cfsc("compile", str(tmp_path / "src"), "-o", str(tmp_path / "x.cfs"), "--digest-store", str(store), check=True)
    found = check_objects(store)
    # Only external files (65 bytes and up) are stored; inline ones live in the image.
    assert set(found) == {payload_path(digest_bytes(c)).decode() for c in contents if len(c) > 64}
    umask = os.umask(0)
    os.umask(umask)
    assert {st.st_mode for st in found.values()} == {0o100644}
    assert {os.stat(store / fan).st_mode for fan in os.listdir(store)} == {0o40000 | (0o755 & ~umask)}
    assert (tmp_path / "x.cfs").read_bytes() == image_of(dumpfile(spec))  # the store changes nothing

    # A second import finds everything there and rewrites nothing.
    cfsc("compile", str(tmp_path / "src"), "-o", str(tmp_path / "y.cfs"), "--digest-store", str(store), check=True)
    again = objects(store)
    assert {k: (v.st_ino, v.st_mtime_ns) for k, v in again.items()} == {
        k: (v.st_ino, v.st_mtime_ns) for k, v in found.items()}


def test_store_api(tmp_path):
    data = os.urandom(100_000)
    digest = digest_bytes(data)
    src = tmp_path / "src"
    src.write_bytes(data)
    with Store(tmp_path / "store") as store:
        assert store.import_path(src) == digest
        assert store.import_chunks([data[:10], memoryview(data)[10:]]) == (digest, len(data))
        assert digest in store
    assert (tmp_path / "store" / payload_path(digest).decode()).read_bytes() == data

    # Each way of copying gives the same object.
    for reflink, copy_range in ((True, True), (False, True), (False, False)):
        with Store(tmp_path / f"store-{reflink}-{copy_range}") as store:
            store.reflink, store.copy_range = reflink, copy_range
            assert store.import_path(src, digest) == digest
        assert check_objects(tmp_path / f"store-{reflink}-{copy_range}").keys() == {payload_path(digest).decode()}

    # A copy that does not match the digest the caller computed: an error, nothing left.
    with pytest.raises(SourceChanged), Store(tmp_path / "bad") as store:
        store.import_path(src, digest_bytes(b"something else"))
    assert os.listdir(tmp_path / "bad") == []


def test_threads_importing_the_same_content(tmp_path):
    data = os.urandom(1_000_000)
    (tmp_path / "src").write_bytes(data)
    with Store(tmp_path / "store") as store:
        threads = [threading.Thread(target=store.import_path, args=(tmp_path / "src",)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert list(check_objects(tmp_path / "store")) == [payload_path(digest_bytes(data)).decode()]
    assert not [n for n in os.listdir(tmp_path / "store") if n.startswith(TEMP_PREFIX)]


def _sparse_tree(root, tag: bytes, count: int, size: int, shared: int = 0) -> None:
    """`count` distinct files of `size` bytes (a unique head, then a hole: cheap to make, and
    still `size` bytes to hash and copy); the first `shared` are the same in every tree."""
    root.mkdir()
    for i in range(count):
        with open(root / f"f{i:03d}", "wb") as f:
            f.write(b"%s file %d\n" % (b"shared" if i < shared else tag, i))
            f.truncate(size)


def test_killed_import_leaves_no_partial_object(tmp_path):
    _sparse_tree(tmp_path / "src", b"kill", 32, 3 << 20)  # the store commits every 32 MiB
    store = tmp_path / "store"
    proc = subprocess.Popen([CFSC, "compile", str(tmp_path / "src"), "-o", str(tmp_path / "x.cfs"),
                             "--digest-store", str(store)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (store.is_dir() and objects(store)):
        assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()  # type: ignore[union-attr]
    found = check_objects(store)
    assert 0 < len(found) < 32
    assert not (tmp_path / "x.cfs").exists()
    # What may remain is temp files, recognisable by name, at the top of the store.
    assert all(n.startswith(TEMP_PREFIX) or len(n) == 2 for n in os.listdir(store))
    # A new run completes the store.
    subprocess.run([CFSC, "compile", str(tmp_path / "src"), "-o", str(tmp_path / "x.cfs"),
                    "--digest-store", str(store)], check=True)
    assert len(check_objects(store)) == 32


def test_concurrent_imports_into_one_store(tmp_path):
    for tag in (b"a", b"b"):
        _sparse_tree(tmp_path / f"src-{tag.decode()}", tag, 24, 1 << 20, shared=16)
    store = tmp_path / "store"
    procs = [subprocess.Popen([CFSC, "compile", str(tmp_path / f"src-{t}"), "-o", str(tmp_path / f"{t}.cfs"),
                               "--digest-store", str(store), "--threads", "2"], stderr=subprocess.PIPE)
             for t in "ab"]
    for p in procs:
        _out, err = p.communicate()
        assert p.returncode == 0, err.decode()
    assert len(check_objects(store)) == 16 + 8 + 8
    assert not [n for n in os.listdir(store) if n.startswith(TEMP_PREFIX)]
    for t in "ab":  # both agree with a run on its own, without a store
        alone = subprocess.run([CFSC, "compile", str(tmp_path / f"src-{t}"), "-o", "-"], check=True,
                               capture_output=True).stdout
        assert (tmp_path / f"{t}.cfs").read_bytes() == alone
