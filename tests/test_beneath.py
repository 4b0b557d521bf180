"""Files opened in untrusted trees (`cfsc.base.beneath`): every way of opening gives the same
answer, nothing outside the tree is reached, nothing but a regular file is opened, nothing
blocks — and the trees cfsc reads by name go through it: OSTree refs, config and objects,
CRFS `--payload-dir`, `fsck-store`, `missing-objects`."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from cfsc.base import beneath
from cfsc.base.beneath import NotRegular
from cfsc.base.fsverity import digest_bytes, payload_path
from cfsc.store.objects import JOURNAL_PREFIX, TEMP_PREFIX

from tests.helpers.data import CFSC, image_of, run_cfsc

# path -> what opening it gives (ELOOP for a symlink anywhere, EXDEV for any `..`)
EXPECTED = {
    b"f": ("data", b"data"), b"./f": ("data", b"data"), b"d//g": ("data", b"g"), b"d/g": ("data", b"g"),
    b"d": ("not regular", "a directory"), b"p": ("not regular", "a FIFO"), b"s": ("not regular", "a socket"),
    b"null": ("not regular", "a character device"), b"nodriver": ("not regular", "a character device"),
    b"l": ("errno", "ELOOP"), b"out": ("errno", "ELOOP"), b"dl/g": ("errno", "ELOOP"),
    b"f/x": ("errno", "ENOTDIR"), b"../x": ("errno", "EXDEV"), b"d/../f": ("errno", "EXDEV"),
    b"/etc/passwd": ("errno", "EXDEV"), b"": ("errno", "EINVAL"), b"f\0x": ("errno", "EINVAL"),
    b"missing": ("errno", "ENOENT"), b"d/missing": ("errno", "ENOENT"),
}
DEVICES = (b"null", b"nodriver")


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "t"
    (root / "d").mkdir(parents=True)
    (root / "f").write_bytes(b"data")
    (root / "d" / "g").write_bytes(b"g")
    os.mkfifo(root / "p")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "s"))
    (root / "l").symlink_to("f")
    (root / "out").symlink_to("/etc/passwd")
    (root / "dl").symlink_to("d")
    if os.geteuid() == 0:
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(root / "nodriver", stat.S_IFCHR | 0o666, os.makedev(240, 77))  # local use: no driver
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    yield fd
    os.close(fd)
    sock.close()


def outcome(opener, *args):
    try:
        fd, st = opener(*args)
    except NotRegular as e:
        return ("not regular", beneath.kind(e.st.st_mode))
    except OSError as e:
        return ("errno", errno.errorcode[e.errno])
    try:
        assert stat.S_ISREG(st.st_mode) and os.fstat(fd).st_ino == st.st_ino
        return ("data", os.read(fd, 100))
    finally:
        os.close(fd)


@pytest.mark.timeout(120)
def test_every_way_of_opening_gives_the_same_answer(tree, monkeypatch):
    """openat2 or the component walk, O_PATH first or O_NONBLOCK (no /proc), and the
    directory frontend's fast path for listed names: one answer per path."""
    expected = {p: v for p, v in EXPECTED.items() if os.geteuid() == 0 or p not in DEVICES}
    for use_openat2 in (True, False):
        for use_proc in (True, False):
            monkeypatch.setattr(beneath, "use_openat2", use_openat2)
            monkeypatch.setattr(beneath, "use_proc", use_proc)
            got = {p: outcome(beneath.open_regular, tree, p) for p in expected}
            assert got == expected, (use_openat2, use_proc)
            for name in (p for p in expected if p and b"/" not in p and b"\0" not in p):
                assert outcome(beneath.open_listed, tree, name) == expected[name], name
            pfd = beneath.open_path(tree, b"l")  # O_PATH: the last symlink is the symlink itself
            assert stat.S_ISLNK(os.fstat(pfd).st_mode)
            os.close(pfd)
            for path, code in ((b"dl/g", errno.ELOOP), (b"../x", errno.EXDEV), (b"f/x", errno.ENOTDIR)):
                with pytest.raises(OSError) as e:
                    beneath.open_path(tree, path)
                assert e.value.errno == code


def test_a_fifo_is_never_opened_for_reading(tree):
    """O_PATH first: the FIFO gets no reader, so a writer opening it without blocking is told
    there is none (ENXIO) even while cfsc holds what it opened."""
    pfd = beneath.open_path(tree, b"p")
    try:
        with pytest.raises(NotRegular):
            beneath.open_regular(tree, b"p")
        with pytest.raises(OSError) as e:
            os.close(os.open(b"p", os.O_WRONLY | os.O_NONBLOCK, dir_fd=tree))
        assert e.value.errno == errno.ENXIO
    finally:
        os.close(pfd)


# -- OSTree: refs, config and objects -------------------------------------------------------------


@pytest.fixture
def repo(tmp_path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(b"b" * 5000)
    repo = tmp_path / "repo"
    subprocess.run(["ostree", "init", f"--repo={repo}", "--mode=bare"], check=True)
    subprocess.run(["ostree", "commit", f"--repo={repo}", "-b", "main", str(src)], check=True, capture_output=True)
    return repo


def compile_fails(source: str, *extra: str) -> str:
    p = subprocess.run([CFSC, "compile", source, "-o", "-", *extra], capture_output=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stderr
    return p.stderr.decode()


def test_a_fifo_at_an_ostree_ref_is_refused_not_waited_on(repo):
    os.mkfifo(repo / "refs/heads/stuck")
    assert compile_fails(f"ostree:{repo}:stuck") == (
        f"error: {repo}/refs/heads/stuck: cannot read the ref: a FIFO, not a regular file\n")


def test_a_fifo_as_the_ostree_config_is_refused_not_waited_on(repo):
    os.rename(repo / "config", repo / "config.real")
    os.mkfifo(repo / "config")
    assert compile_fails(f"ostree:{repo}:main") == (
        f"error: {repo}/config: cannot read the repository config: a FIFO, not a regular file\n")


def test_ostree_refs_aliases_stay_inside_the_repository(repo):
    (repo / "refs/heads/alias").symlink_to("main")  # as `ostree refs --alias` makes them
    p = run_cfsc("compile", f"ostree:{repo}:alias", "-o", "-")
    assert p.returncode == 0 and p.stdout == run_cfsc("compile", f"ostree:{repo}:main", "-o", "-").stdout
    (repo / "refs/heads/evil").symlink_to("/etc/passwd")
    assert compile_fails(f"ostree:{repo}:evil") == f"error: {repo}/refs/heads/evil: cannot read the ref: the path leads outside\n"


def test_ostree_objects_behind_a_symlink_or_as_fifos_are_refused(repo, tmp_path):
    (obj,) = [p for p in (repo / "objects").rglob("*.file")]
    os.unlink(obj)
    os.mkfifo(obj)
    err = compile_fails(f"ostree:{repo}:main")
    assert err.startswith(f"error: {obj}: cannot open: a FIFO, not a regular file"), err
    # A fan-out directory of the repository that is a symlink out of it: refused, not read.
    fan = obj.parent
    elsewhere = tmp_path / "elsewhere"
    os.rename(fan, elsewhere)
    os.unlink(elsewhere / obj.name)
    (elsewhere / obj.name).write_bytes(b"x")
    fan.symlink_to(elsewhere)
    err = compile_fails(f"ostree:{repo}:main")
    # (whichever object of that fan-out is read first: the commit's digest may share its two
    # hex digits with the file's, one time in 256)
    assert err.startswith(f"error: {fan}/") and ": cannot open: a symlink on the way (refused" in err, err


# -- stores and base directories ------------------------------------------------------------------


def test_crfs_basedir_payloads_that_are_fifos_are_refused(tmp_path):
    store = tmp_path / "store"
    (store / "ab").mkdir(parents=True)
    os.mkfifo(store / "ab" / "cd")
    toc = tmp_path / "t.json"
    toc.write_text(json.dumps({"version": 1, "entries": [{"type": "reg", "name": "f", "size": 10,
                                                           "x-payload": "ab/cd"}]}))
    err = compile_fails(str(toc), "--payload-dir", str(store))
    assert err.startswith(f"error: {toc}:/f: object ab/cd is not a regular file (a FIFO)"), err


def test_fsck_store_refuses_fifos_and_counts_temp_files(tmp_path):
    data = os.urandom(5000)
    payload = payload_path(digest_bytes(data))
    image = tmp_path / "x.cfs"
    image.write_bytes(image_of(b"/ 4096 40755 2 0 0 0 0.0 - - -\n/f %d 100644 1 0 0 0 0.0 %s - %s\n"
                               % (len(data), payload, digest_bytes(data).hex().encode())))
    store = tmp_path / "store"
    (store / payload.decode()).parent.mkdir(parents=True)
    os.mkfifo(store / payload.decode())
    (store / f"{TEMP_PREFIX}0123456789abcdef").write_bytes(b"x" * 1000)
    (store / f"{JOURNAL_PREFIX}0123456789abcdef").write_bytes(b"y" * 24)
    p = subprocess.run([CFSC, "fsck-store", str(image), "--store", str(store)], capture_output=True, timeout=120)
    assert p.returncode == 1
    assert f"corrupt {payload.decode()}: not a regular file (a FIFO)\n".encode() in p.stdout, p.stdout
    assert b"2 temp files of interrupted imports (1024 bytes)" in p.stdout
    p = subprocess.run([CFSC, "fsck-store", "--json", str(image), "--store", str(store)], capture_output=True,
                       timeout=120)
    report = json.loads(p.stdout)
    assert (report["corrupt"], report["temp_files"], report["temp_bytes"]) == (1, 2, 1024)


def test_missing_objects_counts_an_object_behind_a_symlink_as_missing(tmp_path):
    data = os.urandom(5000)
    payload = payload_path(digest_bytes(data)).decode()
    image = tmp_path / "x.cfs"
    image.write_bytes(image_of(b"/ 4096 40755 2 0 0 0 0.0 - - -\n/f %d 100644 1 0 0 0 0.0 %s - -\n"
                               % (len(data), payload.encode())))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / payload[3:]).write_bytes(data)
    store = tmp_path / "store"
    store.mkdir()
    (store / payload[:2]).symlink_to(outside)
    p = run_cfsc("missing-objects", str(image), "--store", str(store))
    assert p.stdout.decode().split() == [payload]
    os.unlink(store / payload[:2])
    os.rename(outside, store / payload[:2])
    assert run_cfsc("missing-objects", str(image), "--store", str(store)).stdout == b""
