"""`cfsc gc`: exactly the objects no kept image refers to go (and killed runs' leftovers),
nothing goes on a dry run or when a kept image cannot be read, and compiles running beside
gc (real processes, many rounds) never end with an image whose objects are missing."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import orjson
import pytest
from cfsc import schemas
from cfsc.backends.erofs.reader import Image
from cfsc.store.locks import LOCK_NAME
from cfsc.tools.images import object_path, objects

from tests.helpers.data import CFSC, run_cfsc
from tests.helpers.procs import pids, stat_fields

SHARED = [b"shared %d\n" % i * 40 for i in range(3)]  # > 64 bytes: external, in the store


def listing(store: Path) -> dict[str, tuple[int, int]]:
    """Every file in the store but its lock file: path → (inode, size)."""
    out = {}
    for p in store.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.name != LOCK_NAME:
            st = p.stat()
            out[str(p.relative_to(store))] = (st.st_ino, st.st_size)
    return out


def image_objects(image: Path) -> set[str]:
    return {object_path(p).decode() for p in objects([Image.open(str(image))])}


def tree(root: Path, tag: str, *contents: bytes) -> Path:
    root.mkdir()
    for i, data in enumerate([*SHARED, *contents]):
        (root / f"f{i}").write_bytes(data)
    (root / "small").write_bytes(tag.encode())  # inline: in the image, not the store
    return root


def compile_into(store: Path, src: Path, image: Path) -> None:
    run_cfsc("compile", str(src), "-o", str(image), "--digest-store", str(store), check=True)


def gc(*args: str, check: bool = True) -> dict:
    p = run_cfsc("gc", *args, "--json")
    assert p.returncode == 0 or not check, p.stderr.decode()
    report = orjson.loads(p.stdout)
    assert schemas.problems("gc-report", report) == []
    return report


@pytest.fixture
def two(tmp_path):
    """Two images in one store, sharing SHARED; each with objects of its own."""
    store = tmp_path / "store"
    a, b = tmp_path / "a.cfs", tmp_path / "b.cfs"
    compile_into(store, tree(tmp_path / "a", "a", b"only in a\n" * 20), a)
    compile_into(store, tree(tmp_path / "b", "b", b"only in b\n" * 20, b"also only in b\n" * 20), b)
    return store, a, b


def test_keeping_one_image_removes_exactly_the_others_unshared_objects(two):
    store, a, b = two
    before = listing(store)
    assert set(before) == image_objects(a) | image_objects(b)
    gone = image_objects(b) - image_objects(a)
    assert len(gone) == 2 and len(image_objects(a) & image_objects(b)) == len(SHARED)

    report = gc(str(store), "--keep", str(a), "--list")
    after = listing(store)
    assert set(after) == image_objects(a)
    assert {k: before[k] for k in after} == after  # what stays is untouched (same inodes)
    assert sorted(report["names"]) == sorted(gone)
    assert report["removed"] == {"count": 2, "bytes": sum(before[k][1] for k in gone)}
    assert report["kept"] == {"count": len(after), "bytes": sum(v[1] for v in after.values())}
    assert report["freed"] == report["removed"]["bytes"] and report["missing"] == 0 and report["other"] == []
    assert report["images"] == [{"path": str(a), "objects": len(after)}]
    assert run_cfsc("fsck-store", str(a), "--store", str(store)).returncode == 0
    assert run_cfsc("fsck-store", str(b), "--store", str(store)).returncode == 1  # b lost its own objects

    # Nothing more to do; both kept (a glob after --keep): nothing goes.
    assert gc(str(store), "--keep", str(a))["removed"]["count"] == 0
    assert gc(str(store), "--keep", str(a), str(b))["removed"]["count"] == 0
    assert listing(store) == after


def test_the_human_report(two):
    store, a, b = two
    p = run_cfsc("gc", str(store), "--keep", str(a), "--dry-run")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.decode().splitlines()
    assert lines[0].startswith("would remove 2 objects (") and lines[0].endswith(f"would be freed in {store}")
    assert lines[1].startswith(f"kept {len(image_objects(a))} objects (") and "that 1 image refers to" in lines[1]
    p = run_cfsc("gc", str(store), "--keep", str(a))
    assert p.stdout.decode().startswith("removed 2 objects (")


def test_dry_run_removes_nothing_and_reports_the_same(two):
    store, a, b = two
    before = listing(store)
    dry = gc(str(store), "--keep", str(a), "--dry-run", "--list")
    assert listing(store) == before
    assert dry["dry_run"] is True and dry["removed"]["count"] == 2
    real = gc(str(store), "--keep", str(a), "--list")
    assert real == {**dry, "dry_run": False}
    assert set(listing(store)) == set(before) - set(real["names"])


@pytest.mark.parametrize("bad", ["missing", "not-an-image", "truncated", "directory", "fifo"])
def test_a_kept_image_that_cannot_be_read_removes_nothing(two, bad):
    store, a, b = two
    before = listing(store)
    keep_dir = a.parent / "images"
    keep_dir.mkdir()
    (keep_dir / "b.cfs").write_bytes(b.read_bytes())
    target = keep_dir / "sub" / "bad.cfs"
    target.parent.mkdir()
    if bad == "not-an-image":
        target.write_bytes(b"just some text\n")
    elif bad == "truncated":
        target.write_bytes(a.read_bytes()[:3000])
    elif bad == "directory":
        target.mkdir()
        (target / "x").write_bytes(b"")  # an empty file is no image either
        target = target / "x"
    elif bad == "fifo":
        os.mkfifo(target)  # must not hang gc
    ways = [["--keep", str(target)]]
    if bad != "missing":  # a file that is not there is not under the directory
        ways.append(["--keep-dir", str(keep_dir)])
    for args in ways:
        p = run_cfsc("gc", str(store), "--keep", str(a), *args)
        err = p.stderr.decode()
        assert p.returncode == 2 and err.count("\n") == 1 and err.startswith(f"error: {target}"), err
        assert "Traceback" not in err
        if args[0] == "--keep-dir":
            assert f"every file under --keep-dir {keep_dir} must be an image" in err
        assert listing(store) == before


def test_keep_dir_reads_every_image_below_it(two, tmp_path):
    store, a, b = two
    keep = tmp_path / "keep"
    (keep / "deeper" / "still").mkdir(parents=True)
    (keep / "deeper" / "still" / "b.img").write_bytes(b.read_bytes())
    os.symlink(a, keep / "a-link")  # a file symlink is followed
    (keep / ".b.img.0123456789ab.tmp").write_bytes(b"half an image")  # a compile's output temp: skipped
    before = listing(store)
    report = gc(str(store), "--keep-dir", str(keep))
    assert listing(store) == before and report["removed"]["count"] == 0
    assert sorted(i["path"] for i in report["images"]) == [str(keep / "a-link"), str(keep / "deeper/still/b.img")]
    (keep / "a-link").unlink()
    assert gc(str(store), "--keep-dir", str(keep))["removed"]["count"] == len(image_objects(a) - image_objects(b))


def test_leftovers_of_killed_runs_go_and_foreign_names_stay(two):
    store, a, b = two
    temp = store / ".cfsc-tmp-0123456789abcdef"
    temp.write_bytes(b"half an object")
    journal = store / ".cfsc-tmp-commit-0123456789abcdef"
    journal.write_bytes(b".cfsc-tmp-fedcba9876543210 " + b"ab" * 32 + b"\n")
    sha512 = store / "ee" / ("f" * 126)  # a sha512 object no image refers to
    sha512.parent.mkdir(exist_ok=True)
    sha512.write_bytes(b"x" * 100)
    foreign = {"README": "a regular file", "ee/" + "f" * 100: "a regular file", "zz": "a directory",
               "ee/" + "a" * 62: "a symlink", ".cfsc-tmp-mine": "a regular file", "0a": "a symlink"}
    (store / "README").write_text("mine\n")
    (store / "ee" / ("f" * 100)).write_bytes(b"")
    (store / "zz").mkdir()
    (store / "zz" / ("0" * 62)).write_bytes(b"")  # under no fan-out: not an object
    os.symlink(a, store / "ee" / ("a" * 62))
    (store / ".cfsc-tmp-mine").write_bytes(b"")
    os.symlink(store / "zz", store / "0a")  # a fan-out that is a symlink is not followed
    report = gc(str(store), "--keep", str(a), "--keep", str(b), "--list")
    assert report["temp_files"] == {"count": 1, "bytes": 14} and report["journals"]["count"] == 1
    assert report["removed"] == {"count": 1, "bytes": 100}
    assert sorted(report["names"]) == sorted([temp.name, journal.name, f"ee/{'f' * 126}"])
    assert {o["path"]: o["kind"] for o in report["other"]} == foreign
    assert not temp.exists() and not journal.exists() and not sha512.exists()
    assert all(os.path.lexists(store / name) for name in foreign)
    assert (store / "zz" / ("0" * 62)).exists()


def test_grace_spares_what_changed_recently(two):
    store, a, b = two
    (store / ".cfsc-tmp-0123456789abcdef").write_bytes(b"")
    before = listing(store)
    report = gc(str(store), "--keep", str(a), "--grace", "1h")
    assert listing(store) == before
    assert report["grace"] == 3600 and report["young"]["count"] == 2 and report["young_temps"]["count"] == 1
    assert report["removed"]["count"] == 0
    report = gc(str(store), "--keep", str(a), "--grace", "0")
    assert report["removed"]["count"] == 2 and report["temp_files"]["count"] == 1


def test_usage_errors_are_one_line(two, tmp_path):
    store, a, _b = two
    for args, expect in [
        ([str(store)], "give the images to keep"),
        ([str(store), str(a)], "give the images to keep"),
        ([str(store), "--keep-dir", str(tmp_path), str(a)], "give --keep before them"),
        ([str(tmp_path / "nowhere"), "--keep", str(a)], "not a directory: expected the content store"),
        ([str(store), "--keep", str(a), "--grace", "soon"], "--grace: expected a duration"),
    ]:
        p = run_cfsc("gc", *args)
        err = p.stderr.decode()
        assert p.returncode == 2 and err.count("\n") == 1 and expect in err, (args, err)


# -- beside compiles ---------------------------------------------------------------------------

def _lease(store: Path, op: int) -> int:
    fd = os.open(store / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    fcntl.flock(fd, op)
    return fd


def test_gc_waits_for_a_run_using_the_store_then_gives_up(two):
    store, a, b = two
    before = listing(store)
    fd = _lease(store, fcntl.LOCK_SH)  # what every run using the store holds, here held by the test
    try:
        p = run_cfsc("gc", str(store), "--keep", str(a), "--wait", "0.2")
        err = p.stderr.decode()
        assert p.returncode == 1 and err.count("\n") == 1, err
        assert err == (f"error: {store}: in use by compiles (or other runs) using the store for more than 0.2 s"
                       " (--wait): nothing done, try again later\n")
        assert listing(store) == before
    finally:
        os.close(fd)
    assert gc(str(store), "--keep", str(a), "--wait", "0.2")["removed"]["count"] == 2


def _waiting_on_flock(pid: int) -> bool:
    """/proc/locks lists blocked requests with `->`: is `pid` waiting for a flock?"""
    with open("/proc/locks") as f:
        return any(line.split()[1:3] == ["->", "FLOCK"] and line.split()[5] == str(pid) for line in f
                   if "->" in line)


def test_a_compile_waits_while_gc_holds_the_store(two, tmp_path):
    store, a, b = two
    fd = _lease(store, fcntl.LOCK_EX)  # what gc holds, here held by the test
    try:
        src = tree(tmp_path / "c", "c", b"only in c\n" * 20)
        proc = subprocess.Popen([CFSC, "compile", str(src), "-o", str(tmp_path / "c.cfs"), "--digest-store",
                                 str(store)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not _waiting_on_flock(proc.pid):
            assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the compile never waited for the store's lock"
            time.sleep(0.005)
        assert not (tmp_path / "c.cfs").exists()
    finally:
        os.close(fd)
    assert proc.wait(60) == 0, proc.stderr.read().decode()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]
    assert image_objects(tmp_path / "c.cfs") <= set(listing(store))


def test_compiles_beside_gc_never_end_with_missing_objects(tmp_path):
    """A compile loop and a gc loop, real processes, at the same time.  Round n's tree holds
    SHARED, content n-1 and content n; before it compiles, the image of round n-1 is removed,
    so while it runs no kept image refers to SHARED or content n-1 — exactly the objects it
    finds in the store and relies on, which gc would remove if it could run meanwhile."""
    store, out = tmp_path / "store", tmp_path / "images"
    out.mkdir()
    rounds = 32
    failures: list[str] = []
    gc_reports: list[dict] = []
    done = threading.Event()

    def content(n: int) -> bytes:
        return b"round %d\n" % n * 20

    def compiles() -> None:
        try:
            for n in range(rounds):
                src = tree(tmp_path / f"src{n}", str(n), content(n - 1), content(n))
                image = out / f"img{n}.cfs"
                if n:
                    (out / f"img{n - 1}.cfs").unlink()
                p = run_cfsc("compile", str(src), "-o", str(image), "--digest-store", str(store))
                if p.returncode != 0:
                    failures.append(f"compile {n}: {p.stderr.decode()}")
                    return
                # The image exists and is kept (--keep-dir): every object must be there now.
                missing = sorted(o for o in image_objects(image) if not (store / o).is_file())
                if missing:
                    failures.append(f"round {n}: image without its objects {missing}")
                    return
        finally:
            done.set()

    def gcs() -> None:
        while not done.is_set():
            p = run_cfsc("gc", str(store), "--keep-dir", str(out), "--json")
            if p.returncode != 0:
                failures.append(f"gc: {p.stderr.decode()}")
                return
            gc_reports.append(json.loads(p.stdout))

    seed = tree(tmp_path / "seed", "seed", content(-1))  # the store exists before gc starts
    compile_into(store, seed, tmp_path / "seed.cfs")
    threads = [threading.Thread(target=compiles), threading.Thread(target=gcs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    last = out / f"img{rounds - 1}.cfs"
    assert sorted(os.listdir(out)) == [last.name]
    assert run_cfsc("fsck-store", str(last), "--store", str(store)).returncode == 0
    final = gc(str(store), "--keep-dir", str(out))
    assert set(listing(store)) == image_objects(last)
    removed = sum(r["removed"]["count"] for r in gc_reports) + final["removed"]["count"]
    # every content but the last two was removed once (and SHARED perhaps, and re-imported)
    assert removed >= rounds - 1
    print(f"{rounds} compiles beside {len(gc_reports)} gc runs; {removed} objects removed")


def _group_alive(pgid: int) -> bool:
    """A process of group `pgid` that is not a zombie exists."""
    for pid in pids():
        fields = stat_fields(pid)
        if fields is not None and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def test_the_temp_files_of_a_killed_compile_go(two, tmp_path):
    store, a, b = two
    src = tmp_path / "big"
    src.mkdir()
    for i in range(16):  # sparse: cheap to make, still 3 MiB each to hash and copy
        with open(src / f"f{i}", "wb") as f:
            f.write(b"big file %d\n" % i)
            f.truncate(3 << 20)
    proc = subprocess.Popen([CFSC, "compile", str(src), "-o", str(tmp_path / "big.cfs"), "--digest-store",
                             str(store), "--threads", "1"], stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(store.glob(".cfsc-tmp-*"))) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.killpg(proc.pid, 9)
    proc.wait()
    proc.stderr.close()  # type: ignore[union-attr]
    # Its hashing workers die with it, but a kill lands when a system call returns: wait until
    # none still runs (a zombie has closed its files), or a temp file could still grow below.
    while _group_alive(proc.pid):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    temps = {p.name: p.stat().st_size for p in store.glob(".cfsc-tmp-*")}
    report = gc(str(store), "--keep", str(a), "--keep", str(b))
    assert report["temp_files"] == {"count": len(temps), "bytes": sum(temps.values())}
    assert report["removed"]["count"] == 0 and not list(store.glob(".cfsc-tmp-*"))
