"""The content store: one object per distinct content, named by its fs-verity digest (checked
with the Debian `fsverity` tool), atomic under kill -9, shared safely by concurrent importers."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import threading
import time

import pytest
from cfsc.base.fsverity import digest_bytes, payload_path
from cfsc.store.locks import LOCK_NAME
from cfsc.store.objects import TEMP_PREFIX, SourceChanged, Store

from tests.helpers.data import CFSC, image_of
from tests.helpers.dirtrees import Entry, dumpfile, make
from tests.helpers.tarcraft import from_entries

pytestmark = [pytest.mark.tools, pytest.mark.root]


def objects(store) -> dict[str, os.stat_result]:
    """Every object name (`xx/yyyy…`) in a store, with its stat."""
    out = {}
    for fan in sorted(os.listdir(store)):
        if fan.startswith(TEMP_PREFIX) or fan == LOCK_NAME:
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
    assert {os.stat(store / fan).st_mode for fan in os.listdir(store) if fan != LOCK_NAME} == {0o40000 | (0o755 & ~umask)}
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
    assert os.listdir(tmp_path / "bad") == [LOCK_NAME]  # made with the store; it stays


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


def temps(store) -> list[str]:
    return [n for n in os.listdir(store) if n.startswith(TEMP_PREFIX)] if os.path.isdir(store) else []


def test_killed_import_leaves_no_partial_object(tmp_path):
    _sparse_tree(tmp_path / "src", b"kill", 32, 3 << 20)
    store = tmp_path / "store"
    proc = subprocess.Popen([CFSC, "compile", str(tmp_path / "src"), "-o", str(tmp_path / "x.cfs"),
                             "--digest-store", str(store), "--threads", "1"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(temps(store)) < 16:  # killed mid-way, with more imported than one old batch (32 MiB)
        assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()  # type: ignore[union-attr]
    assert check_objects(store) == {}  # objects get their names only when the whole run succeeded
    assert not (tmp_path / "x.cfs").exists()
    # What may remain is temp files, recognisable by name, at the top of the store.
    assert all(n.startswith(TEMP_PREFIX) or len(n) == 2 or n == LOCK_NAME for n in os.listdir(store))
    # A new run completes the store.
    subprocess.run([CFSC, "compile", str(tmp_path / "src"), "-o", str(tmp_path / "x.cfs"),
                    "--digest-store", str(store)], check=True)
    assert len(check_objects(store)) == 32


def test_concurrent_imports_into_one_store(tmp_path):
    """Two directory imports of overlapping trees, started at the same moment (both wait for
    a file the test creates once both are running), into one store."""
    for tag in (b"a", b"b"):
        _sparse_tree(tmp_path / f"src-{tag.decode()}", tag, 48, 1 << 20, shared=32)
    store = tmp_path / "store"
    gate = tmp_path / "go"
    procs = [subprocess.Popen(["sh", "-c", 'while [ ! -e "$1" ]; do sleep 0.01; done; exec "$2" compile "$3" -o "$4"'
                               ' --digest-store "$5" --threads 2', "sh", str(gate), CFSC, str(tmp_path / f"src-{t}"),
                               str(tmp_path / f"{t}.cfs"), str(store)], stderr=subprocess.PIPE)
             for t in "ab"]
    gate.touch()  # both shells poll for it: they start within 10 ms of each other
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    assert len(check_objects(store)) == 32 + 16 + 16
    assert not temps(store)
    for t in "ab":  # both agree with a run on its own, without a store
        alone = subprocess.run([CFSC, "compile", str(tmp_path / f"src-{t}"), "-o", "-"], check=True,
                               capture_output=True).stdout
        assert (tmp_path / f"{t}.cfs").read_bytes() == alone


def test_concurrent_commits_race_for_every_shared_object(tmp_path):
    """Two tar imports from pipes, held back before their end-of-archive marker until both
    have every object pending (as temp files, counted), then released together: for each
    shared object one of them links it and the other finds it there (EEXIST).  Both succeed,
    agree, and the store is exactly right."""
    shared = [os.urandom(3000) for _ in range(40)]
    layers, alone = {}, {}
    for t in "ab":
        own = [os.urandom(5000) for _ in range(10)]
        # Last in the archive: the reader takes 1 MiB at a time, this pushes the rest through.
        filler = os.urandom(3 << 20)
        entries = [Entry(b"", "dir"), Entry(b"zz-filler", data=filler)]
        entries += [Entry(b"s%02d" % i, data=d) for i, d in enumerate(shared)]
        entries += [Entry(b"%s%02d" % (t.encode(), i), data=d) for i, d in enumerate(own)]
        layers[t] = from_entries(entries)
        alone[t] = image_of(dumpfile(entries, hardlinks=True))
    store = tmp_path / "store"
    procs = {t: subprocess.Popen([CFSC, "compile", "-", "-o", str(tmp_path / f"{t}.cfs"), "--digest-store",
                                  str(store), "--threads", "1"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
             for t in "ab"}
    try:
        for t, p in procs.items():
            body = layers[t][:-1024 - (2 << 20)]  # all but 2 MiB of the filler, and the end marker
            p.stdin.write(body)  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        want = 2 * len(shared) + 2 * 10
        deadline = time.monotonic() + 60
        while len(temps(store)) < want:
            assert all(p.poll() is None for p in procs.values())
            assert time.monotonic() < deadline, len(temps(store))
            time.sleep(0.01)
        assert objects(store) == {}
        for t, p in procs.items():
            p.stdin.write(layers[t][-1024 - (2 << 20):])  # type: ignore[union-attr]
        for p in procs.values():
            p.stdin.close()  # type: ignore[union-attr]
        for p in procs.values():
            err = p.stderr.read()  # type: ignore[union-attr]
            assert p.wait(60) == 0, err.decode()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    found = check_objects(store)
    assert len(found) == len(shared) + 2 * 10 + 2  # + the two fillers
    assert not temps(store)
    for t in "ab":
        assert (tmp_path / f"{t}.cfs").read_bytes() == alone[t]


def test_commit_when_another_importer_linked_first(tmp_path):
    """The EEXIST path: the other importer's object stays (not rewritten), ours is dropped."""
    data = os.urandom(10_000)
    digest = digest_bytes(data)
    ours, theirs = Store(tmp_path / "store"), Store(tmp_path / "store")
    ours.import_bytes(data, digest)
    theirs.import_bytes(data, digest)
    assert len(temps(tmp_path / "store")) == 2 and objects(tmp_path / "store") == {}
    theirs.commit()
    first = os.stat(tmp_path / "store" / payload_path(digest).decode())
    ours.commit()
    after = check_objects(tmp_path / "store")
    assert list(after) == [payload_path(digest).decode()]
    assert (after[payload_path(digest).decode()].st_ino, after[payload_path(digest).decode()].st_nlink) == (
        first.st_ino, 1)
    assert not temps(tmp_path / "store")


def test_a_failed_run_leaves_the_store_as_it_was(tmp_path, cfsc):
    """All or nothing: a truncated archive of more objects than any batch (4096 files, 32 MiB)
    and a gzip whose CRC fails at its very end (all members read) leave no object and no temp
    file, with any number of threads; a run that fails before importing anything does not even
    create the store."""
    entries = [Entry(b"", "dir")] + [Entry(b"f%04d" % i, data=b"%d" % i * 40) for i in range(4200)]
    entries += [Entry(b"big%d" % i, data=os.urandom(1 << 20) * 9) for i in range(4)]  # 36 MiB
    layer = from_entries(entries)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(layer[:-1024])  # every member there, the end marker missing
    corrupt = bytearray(gzip.compress(layer, compresslevel=1))
    corrupt[-8] ^= 1  # the CRC, checked after the last byte of data
    bad_crc = tmp_path / "crc.tar.gz"
    bad_crc.write_bytes(bytes(corrupt))
    store = tmp_path / "store"
    old = os.urandom(1000)  # an object from an earlier run stays
    with Store(store) as s:
        s.import_bytes(old, digest_bytes(old))
    for source, message in ((truncated, "without its end-of-archive marker"), (bad_crc, "Incorrect checksum")):
        for threads in ("1", "2"):
            p = cfsc("compile", str(source), "-o", str(tmp_path / "x.cfs"), "--digest-store", str(store),
                     "--threads", threads)
            assert p.returncode == 2 and message in p.stderr.decode(), p.stderr.decode()
            assert list(objects(store)) == [payload_path(digest_bytes(old)).decode()]
            assert not temps(store)
            assert not (tmp_path / "x.cfs").exists()
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"x" * 512 + bytes(1024))
    for source in (broken, tmp_path / "missing"):
        p = cfsc("compile", "--from", "tar", str(source), "-o", str(tmp_path / "x.cfs"), "--digest-store",
                 str(tmp_path / "new-store"))
        assert p.returncode == 2
        assert not (tmp_path / "new-store").exists()


@pytest.mark.parametrize("kind", ["dir", "tar"])
def test_a_compile_failing_after_the_load_names_no_object(tmp_path, cfsc, kind):
    """Objects get their names once the image is written (`Options.held`): a run that read its
    whole source but cannot write the image leaves the store as it was."""
    entries = [Entry(b"", "dir"), Entry(b"a", data=b"A" * 5000), Entry(b"b", data=b"B" * 70000)]
    if kind == "dir":
        source = tmp_path / "tree"
        make(source, entries)
    else:
        source = tmp_path / "layer.tar"
        source.write_bytes(from_entries(entries))
    store = tmp_path / "store"
    p = cfsc("compile", str(source), "-o", str(tmp_path / "no-such-dir" / "x.cfs"), "--digest-store", str(store))
    assert p.returncode != 0 and b"no-such-dir" in p.stderr, p.stderr
    assert not store.exists() or (not objects(store) and not temps(store))
    p = cfsc("compile", str(source), "-o", str(tmp_path / "x.cfs"), "--digest-store", str(store))
    assert p.returncode == 0, p.stderr
    assert len(check_objects(store)) == 2 and not temps(store)


def test_only_objects_the_image_refers_to_are_named(tmp_path, cfsc):
    """A file a later layer replaces or deletes, and one `--exclude` leaves out, were imported
    while their source was read: the commit drops them, so no object stays unreferenced."""
    big = {name: name.encode() * 3000 for name in ("old", "new", "gone", "kept", "skipped")}
    l1 = tmp_path / "l1.tar"
    l1.write_bytes(from_entries([Entry(b"", "dir"), Entry(b"f", data=big["old"]), Entry(b"g", data=big["gone"]),
                                 Entry(b"k", data=big["kept"])]))
    l2 = tmp_path / "l2.tar"
    l2.write_bytes(from_entries([Entry(b"", "dir"), Entry(b"f", data=big["new"]), Entry(b".wh.g", data=b"")]))
    store = tmp_path / "store"
    cfsc("compile", str(l1), str(l2), "-o", str(tmp_path / "x.cfs"), "--digest-store", str(store), check=True)
    wanted = {payload_path(digest_bytes(big[n])).decode() for n in ("new", "kept")}
    assert set(check_objects(store)) == wanted and not temps(store)
    tree = tmp_path / "tree"
    make(tree, [Entry(b"", "dir"), Entry(b"a", data=big["kept"]), Entry(b"skip", data=big["skipped"])])
    cfsc("compile", str(tree), "-o", str(tmp_path / "y.cfs"), "--digest-store", str(store), "--exclude",
         'path == "/skip"', check=True)
    assert set(check_objects(store)) == wanted and not temps(store)


def test_a_verity_mode_is_checked_by_the_one_list_of_modes(cfsc, tmp_path):
    """`--verity` of `cfsc mount`, `-o verity=` of composefs-fuse and the library's
    MountOptions all go through `backing.verity_mode`."""
    from cfsc.base.errors import UsageError
    from cfsc.store.backing import VERITY_MODES, verity_mode

    assert [verity_mode(m) for m in VERITY_MODES] == ["none", "if-present", "require"]
    with pytest.raises(UsageError, match="verity mode 'sometimes': expected none, if-present or require"):
        verity_mode("sometimes")
    for args in (["mount", "--verity", "sometimes", "img.cfs", str(tmp_path)],
                 ["composefs-fuse", "-o", "verity=sometimes", "img.cfs", str(tmp_path)]):
        p = cfsc(*args)
        assert p.returncode == 2 and b"--verity: verity mode 'sometimes'" in p.stderr, (args, p.stderr)
