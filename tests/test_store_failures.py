"""The content store under a hostile layout and failing disks: real frontends, real mounts
(tmpfs for another file system and for a full one), real `kill -9`.  Every object left under
its name is checked with cfsc's own fs-verity digest."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cfsc.base import syscalls
from cfsc.base.errors import OutputError, StoreError
from cfsc.base.fsverity import digest_bytes, digest_fd, payload_path
from cfsc.store.locks import LOCK_NAME
from cfsc.store.objects import JOURNAL_PREFIX, TEMP_PREFIX, Store

from tests.helpers.data import CFSC, run_cfsc
from tests.helpers.dirtrees import Entry, make
from tests.helpers.tarcraft import from_entries

MS_REMOUNT = 32
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def state(store: Path, checked: set | None = None) -> dict[str, int]:
    """Every object (`xx/yyyy…`) with its inode; each must hash to its name (`checked`: the
    (name, inode, ctime) of objects hashed before, not hashed again)."""
    out = {}
    if not store.is_dir():
        return out
    for fan in sorted(os.listdir(store)):
        if fan.startswith(TEMP_PREFIX) or fan == LOCK_NAME:
            continue
        assert len(fan) == 2 and (store / fan).is_dir() and not (store / fan).is_symlink(), fan
        for name in os.listdir(store / fan):
            fd = os.open(store / fan / name, os.O_RDONLY)
            try:
                st = os.fstat(fd)
                key = (fan + name, st.st_ino, st.st_ctime_ns)
                if checked is None or key not in checked:
                    assert digest_fd(fd).hex() == fan + name, f"object {fan}/{name} holds other content"
                    if checked is not None:
                        checked.add(key)
            finally:
                os.close(fd)
            out[f"{fan}/{name}"] = st.st_ino
    return out


def leftovers(store: Path) -> list[str]:
    return sorted(n for n in os.listdir(store) if n.startswith(TEMP_PREFIX)) if store.is_dir() else []


def name_of(data: bytes) -> str:
    return payload_path(digest_bytes(data)).decode()


def contents(rng: random.Random, count: int, fanouts: set[str] | None = None, size: int = 3000) -> list[bytes]:
    """`count` random contents, each in a fan-out directory of its own (none in `fanouts`)."""
    taken = set(fanouts or ())
    out = []
    while len(out) < count:
        data = rng.randbytes(size)
        fan = name_of(data)[:2]
        if fan not in taken:
            taken.add(fan)
            out.append(data)
    return out


def source(tmp_path: Path, kind: str, datas: list[bytes]) -> Path:
    """A directory or tar layer of files f00, f01, … (tar: imported in that order)."""
    entries = [Entry(b"", "dir")] + [Entry(b"f%02d" % i, data=d) for i, d in enumerate(datas)]
    if kind == "dir":
        make(tmp_path / "tree", entries)
        return tmp_path / "tree"
    (tmp_path / "layer.tar").write_bytes(from_entries(entries))
    return tmp_path / "layer.tar"


def seed_store(store: Path, data: bytes) -> dict[str, int]:
    """A store holding one object from an earlier run (it must stay, untouched)."""
    with Store(store) as s:
        s.import_bytes(data, digest_bytes(data))
    return state(store)


def compile_into(src: Path, store: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cfsc("compile", str(src), "-o", str(out), "--digest-store", str(store), *extra)


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    syscalls.mount("tmpfs", path, "tmpfs", 0, options)
    try:
        yield
    finally:
        syscalls.umount2(path, syscalls.MNT_DETACH)


# -- a store that is not laid out as one ------------------------------------------------------


@pytest.mark.parametrize("kind", ["dir", "tar"])
@pytest.mark.parametrize("what", ["symlink", "file"])
def test_a_fanout_that_is_not_a_directory_is_a_located_store_error(tmp_path, kind, what):
    """A symlink where `xx/` belongs (pointing out of the store) or a regular file there: one
    line naming STORE/xx and what was expected, exit 2, nothing written outside, no object
    left, the earlier object untouched (finding: the import wrote `/dir/<62 hex>` through the
    symlink; a file there was blamed on the source, or was a raw errno with exit 1)."""
    rng = random.Random(f"{kind}-{what}")
    old = rng.randbytes(5000)
    datas = contents(rng, 6, {name_of(old)[:2]})
    store = tmp_path / "store"
    before = seed_store(store, old)
    fan = name_of(datas[3])[:2]
    outside = tmp_path / "outside"
    outside.mkdir()
    src = source(tmp_path, kind, datas)
    for threads in ("1", "2"):
        if what == "symlink":
            (store / fan).symlink_to(outside)
        else:
            (store / fan).write_bytes(b"not a directory")
        p = compile_into(src, store, tmp_path / "x.cfs", "--threads", threads)
        lines = p.stderr.decode().splitlines()
        assert p.returncode == 2 and len(lines) == 1, p.stderr
        kind_text = "a symlink" if what == "symlink" else "a regular file"
        assert lines[0] == f"error: {store}/{fan}: {kind_text} where a store directory belongs: expected a directory"
        assert "scan" not in lines[0]
        assert os.listdir(outside) == []
        os.unlink(store / fan)
        assert state(store) == before and not leftovers(store)
        assert not (tmp_path / "x.cfs").exists()


def test_a_fanout_replaced_before_the_commit_is_refused_there(tmp_path):
    """The commit opens each fan-out `O_NOFOLLOW` itself: a symlink swapped in after the
    import looked is refused, the names made before it taken back, nothing written outside."""
    rng = random.Random(7)
    datas = contents(rng, 4)
    store, outside = tmp_path / "store", tmp_path / "outside"
    outside.mkdir()
    s = Store(store)
    for d in datas:
        s.import_bytes(d, digest_bytes(d))
    fan = name_of(datas[2])[:2]
    (store / fan).symlink_to(outside)
    with pytest.raises(StoreError) as e:
        s.commit()
    assert str(e.value) == f"{store}/{fan}: a symlink where a store directory belongs: expected a directory"
    assert os.listdir(outside) == []
    os.unlink(store / fan)
    assert state(store) == {} and not leftovers(store)


def test_an_ostree_import_names_the_bad_fanout(tmp_path):
    rng = random.Random(3)
    datas = contents(rng, 3)
    make(tmp_path / "tree", [Entry(b"", "dir")] + [Entry(b"f%d" % i, data=d) for i, d in enumerate(datas)])
    repo = tmp_path / "repo"
    subprocess.run(["ostree", "init", f"--repo={repo}", "--mode=bare"], check=True)
    subprocess.run(["ostree", "commit", f"--repo={repo}", "-b", "main", str(tmp_path / "tree")], check=True,
                   capture_output=True)
    store = tmp_path / "store"
    store.mkdir()
    fan = name_of(datas[1])[:2]
    (store / fan).write_bytes(b"")
    p = run_cfsc("compile", f"ostree:{repo}:main", "-o", str(tmp_path / "x.cfs"), "--digest-store", str(store))
    assert p.returncode == 2, p.stderr
    assert p.stderr.decode() == f"error: {store}/{fan}: a regular file where a store directory belongs: expected a directory\n"
    os.unlink(store / fan)
    assert state(store) == {} and not leftovers(store)


def test_a_non_regular_file_under_an_object_name_is_refused(tmp_path):
    data = os.urandom(4000)
    store = tmp_path / "store"
    (store / name_of(data)[:2]).mkdir(parents=True)
    os.mkfifo(store / name_of(data))
    with pytest.raises(StoreError) as e, Store(store) as s:
        s.import_bytes(data, digest_bytes(data))
    assert str(e.value) == f"{store}/{name_of(data)}: a FIFO where a store object belongs: expected a regular file (remove it)"


def test_a_store_path_that_is_a_file_is_bad_input(tmp_path, cfsc):
    (tmp_path / "store").write_bytes(b"")
    make(tmp_path / "tree", [Entry(b"", "dir"), Entry(b"f", data=os.urandom(100))])
    p = compile_into(tmp_path / "tree", tmp_path / "store", tmp_path / "x.cfs")
    assert p.returncode == 2
    assert p.stderr.decode() == f"error: {tmp_path}/store: not a directory: expected the content store's directory\n"


# -- failing disks -----------------------------------------------------------------------------


@needs_root
def test_a_fanout_on_another_mount_fails_the_commit_and_takes_back_its_names(tmp_path):
    """EXDEV in the final commit: the last object's `xx/` is a tmpfs.  The objects named
    before it are taken back, the one that was there before (and found there, EEXIST) stays,
    no temp file or journal is left, no image is written; without the mount the run succeeds."""
    rng = random.Random(11)
    old = rng.randbytes(4000)
    datas = [old] + contents(rng, 5, {name_of(old)[:2]})
    store = tmp_path / "store"
    before = seed_store(store, old)
    last = name_of(datas[-1])[:2]
    (store / last).mkdir()
    src = source(tmp_path, "tar", datas)
    with tmpfs(store / last, "size=1m"):
        p = compile_into(src, store, tmp_path / "x.cfs", "--threads", "1")
        assert p.returncode == 1, p.stderr
        assert p.stderr.decode() == (f"error: {store}/{name_of(datas[-1])}: cannot name a store object: Invalid"
                                     " cross-device link (the store must be one file system: is one of its"
                                     " directories another mount?)\n")
        assert os.listdir(store / last) == []
    assert state(store) == before and not leftovers(store)
    assert not (tmp_path / "x.cfs").exists()
    assert compile_into(src, store, tmp_path / "x.cfs").returncode == 0
    after = state(store)
    assert set(after) == {name_of(d) for d in datas} and after[name_of(old)] == before[name_of(old)]


@needs_root
@pytest.mark.parametrize("kind", ["dir", "tar"])
def test_a_full_store_fails_the_import_and_leaves_it_as_it_was(tmp_path, kind):
    """ENOSPC while the objects are written: one line naming the store, exit 1."""
    store = tmp_path / "store"
    store.mkdir()
    rng = random.Random(kind)
    datas = contents(rng, 6, size=400_000)  # 2.4 MB into 1 MB
    src = source(tmp_path, kind, datas)
    with tmpfs(store, "size=1m"):
        old = rng.randbytes(3000)
        before = seed_store(store, old)
        for threads in ("1", "2"):
            p = compile_into(src, store, tmp_path / "x.cfs", "--threads", threads)
            assert p.returncode == 1, p.stderr
            assert p.stderr.decode() == f"error: {store}: cannot write a store object: No space left on device\n"
            assert state(store) == before and not leftovers(store)
            assert not (tmp_path / "x.cfs").exists()


@needs_root
def test_no_space_for_a_fanout_in_the_final_commit_takes_back_its_names(tmp_path):
    """ENOSPC in the final commit: the store's tmpfs has inodes for the temp files, the
    journal and two names (tmpfs counts a hard link as an inode) and none to spare, so making
    the third object's `xx/` fails after two objects were named in fan-outs that existed:
    both names are taken back."""
    rng = random.Random(5)
    old = rng.randbytes(4000)
    datas = contents(rng, 4, {name_of(old)[:2]})
    store = tmp_path / "store"
    store.mkdir()
    src = source(tmp_path, "tar", datas)
    with tmpfs(store, "size=16m"):
        before = seed_store(store, old)
        for d in datas[:2]:
            (store / name_of(d)[:2]).mkdir()
        st = os.statvfs(store)
        used = st.f_files - st.f_ffree
        syscalls.mount("tmpfs", store, "tmpfs", MS_REMOUNT, f"nr_inodes={used + len(datas) + 1 + 2}")
        p = compile_into(src, store, tmp_path / "x.cfs", "--threads", "1")
        assert p.returncode == 1, p.stderr
        fan = name_of(datas[2])[:2]
        assert p.stderr.decode() == (f"error: {store}/{fan}: cannot create a store directory: No space left on"
                                     " device\n")
        assert state(store) == before and not leftovers(store)
        assert not (tmp_path / "x.cfs").exists()


# -- kill -9 -------------------------------------------------------------------------------


def _round_layer(tmp_path: Path, rng: random.Random, tag: str, shared: list[bytes],
                 count: int = 40) -> tuple[Path, set[str]]:
    """A layer of the shared files and `count` of its own (small and large)."""
    own = [rng.randbytes(rng.choice((100, 5000, 70_000, 300_000))) for _ in range(count)]
    entries = [Entry(b"", "dir")] + [Entry(b"s%02d" % i, data=d) for i, d in enumerate(shared)]
    entries += [Entry(b"%s%02d" % (tag.encode(), i), data=d) for i, d in enumerate(own)]
    path = tmp_path / f"{tag}.tar"
    path.write_bytes(from_entries(entries))
    return path, {name_of(d) for d in own}


def test_kill9_at_random_points_leaves_all_or_nothing(tmp_path):
    """20 real imports killed at seeded random moments (before, during and after their
    import and commit).  After each: every named object holds its digest; the killed run's
    own objects are all there (it had committed) or none (after the next run into the store,
    which takes back a commit killed half-way); its temp files break nothing (the next run
    succeeds); fsck-store counts them."""
    rng = random.Random(20)
    store = tmp_path / "store"
    shared = [rng.randbytes(3000) for _ in range(20)]
    base, _ = _round_layer(tmp_path, rng, "base", shared)
    start = time.monotonic()
    assert compile_into(base, store, tmp_path / "base.cfs", "--threads", "2").returncode == 0
    full = time.monotonic() - start  # how long one run takes here: kills spread over it
    outcomes = {"none": 0, "all": 0}
    checked: set = set()
    for i in range(20):
        layer, own = _round_layer(tmp_path, rng, f"r{i:02d}", shared)
        before = set(state(store, checked))
        proc = subprocess.Popen([CFSC, "compile", str(layer), "-o", str(tmp_path / "r.cfs"), "--digest-store",
                                 str(store), "--threads", "2"], stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, 1.2) * full)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # The next run into the store: a small layer of its own, which must succeed.
        follow, follow_own = _round_layer(tmp_path, rng, f"f{i:02d}", [], 3)
        assert compile_into(follow, store, tmp_path / "f.cfs").returncode == 0
        now = set(state(store, checked))
        assert not any(n.startswith(JOURNAL_PREFIX) for n in leftovers(store))
        assert follow_own <= now
        got = now & own
        assert got in (set(), own), f"round {i}: {len(got)} of {len(own)} objects of the killed run"
        assert now - before - follow_own == got  # nothing else appeared
        if (tmp_path / "r.cfs").exists():
            assert got == own
            (tmp_path / "r.cfs").unlink()
        outcomes["all" if got else "none"] += 1
    print("killed runs that had committed / not:", outcomes)
    temps = leftovers(store)
    p = run_cfsc("fsck-store", str(tmp_path / "base.cfs"), "--store", str(store))
    assert p.returncode == 0, p.stdout
    if temps:
        size = sum(os.lstat(store / t).st_size for t in temps)
        assert f"{len(temps)} temp files of interrupted imports ({size} bytes)".encode() in p.stdout
    assert compile_into(base, store, tmp_path / "again.cfs").returncode == 0


def test_a_commit_killed_half_way_is_taken_back_by_the_next(tmp_path):
    """A real import of thousands of objects, killed while its commit journal exists (it is
    naming objects): some names are made, the journal stays.  The next commit into the store
    takes back exactly those names (and their temp files), and nothing else."""
    rng = random.Random(9)
    store = tmp_path / "store"
    old = rng.randbytes(3000)
    before = seed_store(store, old)
    many = [rng.randbytes(100) for _ in range(3000)]
    entries = [Entry(b"", "dir"), Entry(b"old", data=old)] + [Entry(b"m%05d" % i, data=d) for i, d in enumerate(many)]
    layer = tmp_path / "many.tar"
    layer.write_bytes(from_entries(entries))
    for _attempt in range(5):
        proc = subprocess.Popen([CFSC, "compile", str(layer), "-o", str(tmp_path / "x.cfs"), "--digest-store",
                                 str(store), "--threads", "1"], stderr=subprocess.DEVNULL)
        caught = False
        while proc.poll() is None:
            with contextlib.suppress(OSError):
                if any(n.startswith(JOURNAL_PREFIX) for n in os.listdir(store)):
                    proc.send_signal(signal.SIGKILL)
                    caught = True
                    break
            time.sleep(0.001)
        proc.wait()
        journals = [n for n in leftovers(store) if n.startswith(JOURNAL_PREFIX)]
        named = set(state(store)) - set(before)
        if caught and journals and 0 < len(named) < len(many):
            break
        # Too early or too late (no name made yet, or all): start again from the store as it was.
        for name in set(state(store)) - set(before):
            os.unlink(store / name)
        for t in leftovers(store):
            os.unlink(store / t)
        with contextlib.suppress(FileNotFoundError):
            (tmp_path / "x.cfs").unlink()
    else:
        pytest.fail("never killed while naming")
    assert not (tmp_path / "x.cfs").exists()
    listed = (store / journals[0]).read_text().split()[::2]
    assert all((store / t).exists() for t in listed)
    other = rng.randbytes(5000)
    make(tmp_path / "tree", [Entry(b"", "dir"), Entry(b"f", data=other)])
    assert compile_into(tmp_path / "tree", store, tmp_path / "y.cfs").returncode == 0
    assert state(store) == {**before, name_of(other): state(store)[name_of(other)]}
    assert not any(n.startswith(JOURNAL_PREFIX) for n in leftovers(store))
    assert not any((store / t).exists() for t in listed)



def test_taking_back_never_removes_a_name_that_is_not_the_listed_file(tmp_path):
    """A journal left by a killed commit lists its temp files; a name it made that has since
    become another file (someone else's object now) stays, and only the journal's own temp
    files go."""
    store = tmp_path / "store"
    mine, theirs = os.urandom(3000), os.urandom(4000)
    with Store(store) as s:  # theirs: an object named by another run
        s.import_bytes(theirs, digest_bytes(theirs))
    before = state(store)
    temp_a, temp_b = TEMP_PREFIX + "a" * 16, TEMP_PREFIX + "b" * 16
    (store / temp_a).write_bytes(mine)
    (store / name_of(mine)).parent.mkdir(exist_ok=True)
    os.link(store / temp_a, store / name_of(mine))  # the killed commit named this one
    (store / temp_b).write_bytes(theirs)  # and was about to name this one, which exists already
    (store / f"{JOURNAL_PREFIX}{'c' * 16}").write_text(
        f"{temp_a} {digest_bytes(mine).hex()}\n{temp_b} {digest_bytes(theirs).hex()}\n")
    other = os.urandom(5000)
    with Store(store) as s:
        s.import_bytes(other, digest_bytes(other))
    after = state(store)
    assert set(after) == {name_of(theirs), name_of(other)} and after[name_of(theirs)] == before[name_of(theirs)]
    assert leftovers(store) == []


def test_an_object_found_in_the_store_and_gone_at_the_commit_fails_the_run(tmp_path):
    """A run that found an object in the store (and so did not import it) checks at its
    commit that it is still there: an image must not refer to nothing."""
    store = tmp_path / "store"
    data, new = os.urandom(3000), os.urandom(3000)
    with Store(store) as s:
        s.import_bytes(data, digest_bytes(data))
    s = Store(store)
    s.import_bytes(data, digest_bytes(data))  # found: not imported
    s.import_bytes(new, digest_bytes(new))
    os.unlink(store / name_of(data))  # taken back by a failed run, or removed by hand
    with pytest.raises(OutputError) as e:
        s.commit()
    assert str(e.value).startswith(f"{store}/{name_of(data)}: this run found the object in the store, and it is gone")
    assert state(store) == {} and not leftovers(store)


def test_the_commit_check_by_listing_agrees_with_a_lookup_of_each_object(tmp_path):
    """`Store._missing` takes a name listed as a regular file as there (a fan-out whose
    objects are mostly checked is listed once) and looks up every other one (`_lookup`, the
    reference): so an absent object is reported, and a directory, symlink or FIFO under an
    object's name is the same StoreError as a lookup raises."""
    store = tmp_path / "store"
    with Store(store) as s:
        s.import_bytes(b"x" * 100, digest_bytes(b"x" * 100))
    for fan in ("ab", "cd"):
        (store / fan).mkdir(exist_ok=True)
    present = [bytes([0xAB]) + os.urandom(31) for _ in range(60)] + [bytes([0xCD]) + os.urandom(31)]
    for d in present:
        (store / payload_path(d).decode()).write_bytes(b"object")
    absent = [bytes([0xAB]) + os.urandom(31), bytes([0xCD]) + os.urandom(31), bytes([0xEF]) + os.urandom(31)]
    odd = [bytes([0xAB]) + os.urandom(31) for _ in range(3)]
    (store / payload_path(odd[0]).decode()).mkdir()
    (store / payload_path(odd[1]).decode()).symlink_to(store / payload_path(present[0]).decode())
    os.mkfifo(store / payload_path(odd[2]).decode())
    s = Store(store)
    try:
        assert os.stat(store / "ab").st_size <= 1024 * 60  # the "ab" group is checked by listing it
        assert s._missing(present) is None and all(s._lookup(d) is not None for d in present)
        for d in absent:
            assert s._lookup(d) is None and s._missing([*present, d]) == d
        for d in odd:
            with pytest.raises(StoreError) as reference:
                s._lookup(d)
            with pytest.raises(StoreError) as listed:
                s._missing([*present, d])
            assert str(listed.value) == str(reference.value)
    finally:
        s.close()


def test_an_object_gone_from_a_listed_fanout_fails_the_commit(tmp_path):
    """The same check as above, on a store where every fan-out holds many of the objects a
    run found there (so each is listed, not looked up object by object)."""
    store = tmp_path / "store"
    blobs = [b"%06d" % i * 20 for i in range(3000)]
    with Store(store) as s:
        for b in blobs:
            s.import_bytes(b, digest_bytes(b))
    s = Store(store)
    for b in blobs:
        s.import_bytes(b, digest_bytes(b))  # found: not imported
    gone = blobs[1234]
    fan = name_of(gone)[:2]
    assert os.stat(store / fan).st_size <= 1024 * sum(name_of(b).startswith(fan) for b in blobs)
    os.unlink(store / name_of(gone))
    with pytest.raises(OutputError) as e:
        s.commit()
    assert str(e.value).startswith(f"{store}/{name_of(gone)}: this run found the object in the store, and it is gone")
