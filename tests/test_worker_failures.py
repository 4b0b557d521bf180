"""The directory frontend's worker processes when something goes wrong under them: a worker
that dies as a batch is sent to it, a request cut short, replies larger than one pipe read,
the store removed or made read-only during the run, a worker killed while it stages an
object.  Each is a real event in real processes (a worker really killed, a store really
removed or remounted); the hooks below only choose the moment.  The run fails with one
located line, no worker outlives it, and nothing is named in the store.
"""

from __future__ import annotations

import contextlib
import errno
import marshal
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cfsc.base import syscalls
from cfsc.base.errors import CfscError, InputError
from cfsc.base.options import Options
from cfsc.build import compile_image
from cfsc.frontends import directory, directory_workers
from cfsc.store import objects
from cfsc.store.locks import LOCK_NAME
from cfsc.store.objects import TEMP_PREFIX

from tests.helpers.data import run_cfsc
from tests.helpers.dirtrees import Entry, make
from tests.helpers.procs import children, stat_fields

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="trusted.* xattrs and mounts need root")]
ROOT = Path(__file__).resolve().parent.parent


def files(count: int, size: int = 5000, prefix: bytes = b"f") -> list[Entry]:
    return [Entry(b"", "dir")] + [Entry(b"%s%03d" % (prefix, i), data=b"%d." % i * (size // 4)) for i in range(count)]


def named(store: Path) -> list[str]:
    """Objects with a name (`xx/yyyy…`) in the store."""
    if not store.is_dir():
        return []
    return [f"{fan}/{n}" for fan in os.listdir(store) if len(fan) == 2 for n in os.listdir(store / fan)]


def temps(store: Path) -> list[str]:
    return sorted(n for n in os.listdir(store) if n.startswith(TEMP_PREFIX)) if store.is_dir() else []


def empty(tmp_path: Path) -> Path:
    """A directory of no images, for `cfsc gc --keep-dir` (keep nothing)."""
    d = tmp_path / "no-images"
    d.mkdir(exist_ok=True)
    return d


def zombie(pid: int) -> bool:
    fields = stat_fields(pid)
    assert fields is not None, f"process {pid} is gone (reaped)"
    return fields[0] == b"Z"


def one_line(e: CfscError) -> str:
    text = str(e)
    assert "\n" not in text and "Traceback" not in text
    return text


def cli(hook: str, *args: str) -> subprocess.CompletedProcess:
    """`cfsc ARGS` in a fresh process that first runs `hook` (it patches the moment to act)."""
    code = textwrap.dedent(hook) + "\nimport sys\nfrom cfsc.cli import main\nmain(sys.argv[1:])\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


# -- a worker that is gone when a batch is sent to it ------------------------------------------


def test_a_worker_dead_when_a_batch_is_sent_is_a_located_error(tmp_path, monkeypatch):
    """The first batch goes to a worker killed (and dead: a zombie) just before: the send
    fails (EPIPE), the load fails naming the source, every worker is reaped, nothing stays."""
    src = tmp_path / "src"
    make(src, files(100))
    real = directory_workers.Workers.send
    killed = []

    def send(self, w, batch_id, fds, items):
        if not killed:
            os.kill(w.pid, signal.SIGKILL)
            while not zombie(w.pid):
                time.sleep(0.001)
            killed.append(w.pid)
        return real(self, w, batch_id, fds, items)

    monkeypatch.setattr(directory_workers.Workers, "send", send)
    monkeypatch.setattr(directory, "WORKERS", "processes")
    store = tmp_path / "store"
    before = children()
    with pytest.raises(InputError) as e:
        compile_image([str(src)], str(tmp_path / "x.cfs"), Options(digest_store=str(store), threads=2))
    assert killed
    assert one_line(e.value) == f"{src}: cannot read files: a hashing worker process died (Broken pipe)"
    assert e.value.exit_code == 2
    assert children() == before
    assert not (tmp_path / "x.cfs").exists()
    assert not named(store) and not temps(store)


# -- requests and replies at their sizes' edges ------------------------------------------------


def test_the_largest_batch_request_fits_one_message():
    """A request is one SOCK_SEQPACKET message read into MAX_REQUEST bytes: the largest batch
    (BATCH_FILES names of 255 bytes, each in a directory of its own) must fit, with room."""
    items = [(i, b"n" * 255) for i in range(directory.BATCH_FILES)]
    assert len(marshal.dumps((1 << 62, items))) * 4 < directory_workers.MAX_REQUEST
    assert directory.BATCH_FILES <= directory_workers.MAX_FDS


@pytest.mark.parametrize("cut", ["data", "descriptors"])
def test_a_request_cut_short_fails_the_run_and_leaves_nothing(tmp_path, monkeypatch, cut):
    """Were a request ever larger than the worker's buffer (MSG_TRUNC) or to carry more
    descriptors than it takes (MSG_CTRUNC), the worker refuses it and exits: the load fails
    with the located error of a dead worker, nothing staged stays, no worker is left."""
    src = tmp_path / "src"
    make(src, files(100))
    # (the worker reads these when it receives: set before the fork, they are its limits)
    if cut == "data":
        monkeypatch.setattr(directory_workers, "MAX_REQUEST", 64)
    else:
        monkeypatch.setattr(directory_workers, "_FDS_SPACE", 0)  # (MAX_FDS's room, made at import)
    monkeypatch.setattr(directory, "WORKERS", "processes")
    store = tmp_path / "store"
    before = children()
    with pytest.raises(InputError) as e:
        directory.load(str(src), Options(digest_store=str(store), threads=2))
    assert one_line(e.value).startswith(f"{src}: cannot read files: a hashing worker process died")
    assert children() == before
    assert not named(store) and not temps(store)


def test_replies_larger_than_a_pipe_read_give_the_threads_image(tmp_path, monkeypatch):
    """A batch of files with 4 KB xattrs each answers in a reply of about 130 KB: more than
    one pipe read (PIPE_READ) and more than the pipe holds, so the worker waits in its write
    while the main process reads the reply in pieces.  Same image as the thread pool's."""
    src = tmp_path / "src"
    entries = [Entry(b"", "dir")]
    for i in range(3 * directory.BATCH_FILES):
        entries.append(Entry(b"x%03d" % i, data=b"%d" % i * 40,  # inline: the content is in the reply too
                             xattrs={b"trusted.big": b"%03d" % i * 1300, b"user.small": b"s"}))
    make(src, entries)
    reply = marshal.dumps((1, [(0, 0, 0, 0, 0, 0, 0, 0, ((b"trusted.big", b"%03d" % i * 1300),), None, b"c" * 40,
                                None, False) for i in range(directory.BATCH_FILES)]))
    assert len(reply) > directory_workers.PIPE_READ
    images = {}
    for hashing in ("threads", "processes"):
        monkeypatch.setattr(directory, "WORKERS", hashing)
        compile_image([str(src)], str(tmp_path / f"{hashing}.cfs"), Options(threads=2))
        images[hashing] = (tmp_path / f"{hashing}.cfs").read_bytes()
    assert images["threads"] == images["processes"]


# -- the store removed or made read-only under the run -----------------------------------------


ADOPT_HOOK = """
import os, shutil, subprocess
from cfsc.frontends import directory
from cfsc.store.objects import Store
directory.WORKERS = "processes"
real = Store.adopt
def adopt(self, *args):
    if not getattr(adopt, "done", False):
        adopt.done = True
        {action}
    return real(self, *args)
Store.adopt = adopt
"""


@pytest.mark.parametrize("existing", [False, True], ids=["made-by-a-worker", "existing"])
def test_a_store_removed_during_the_run_fails_it_with_one_line(tmp_path, existing):
    """The store directory is removed (`rm -rf`) as the first staged object is adopted.  A
    store a worker made is looked for by path and found gone; an existing one is still held
    open, and its removed directory refuses new entries.  Either way: one line naming the
    store, exit 1 (the environment, not the input: as a full disk), no image, no object."""
    src = tmp_path / "src"
    make(src, files(200))
    store = tmp_path / "store"
    if existing:
        store.mkdir()
    # (workers may stage into it meanwhile: removed again until it is gone)
    remove = (f"for _ in range(10000):\n            shutil.rmtree({str(store)!r}, ignore_errors=True)\n"
              f"            if not os.path.lexists({str(store)!r}): break")
    p = cli(ADOPT_HOOK.format(action=remove),
            "compile", str(src), "-o", str(tmp_path / "x.cfs"), "--digest-store", str(store), "--threads", "2")
    assert p.returncode == 1, p.stderr
    (line,) = p.stderr.splitlines()
    if existing:
        assert line.startswith(f"error: {store}") and ": cannot create " in line and "No such file or directory" in line
    else:
        assert line == f"error: {store}: cannot adopt a store object: the store vanished"
    assert not (tmp_path / "x.cfs").exists()
    # (a worker that had not opened the store yet makes it again, as a first import does: empty)
    assert not named(store) and not temps(store)


@contextlib.contextmanager
def tmpfs(path: Path):
    path.mkdir()
    syscalls.mount("tmpfs", str(path), "tmpfs", 0, "size=64m")
    try:
        yield
    finally:
        syscalls.umount2(str(path), syscalls.MNT_DETACH)


def test_a_store_made_read_only_during_the_run_fails_it_and_names_nothing(tmp_path):
    """The store's file system is remounted read-only as the first staged object is adopted:
    the next staging (in a worker) or the commit is refused, one line naming the store,
    exit 1; no object gets a name.  What was staged before cannot be removed from a
    read-only file system: those temp files are what `cfsc gc` removes once it is writable."""
    src = tmp_path / "src"
    make(src, files(200))
    store = tmp_path / "store"
    with tmpfs(store):
        # (EBUSY while a worker has a temp file open for writing: tried again until it is not)
        remount = ("import time\n        for _ in range(10000):\n            if not subprocess.run(['mount', '-o', "
                   f"'remount,ro', {str(store)!r}], stderr=subprocess.DEVNULL).returncode: break\n"
                   "            time.sleep(0.001)")
        p = cli(ADOPT_HOOK.format(action=remount),
                "compile", str(src), "-o", str(tmp_path / "x.cfs"), "--digest-store", str(store), "--threads", "2")
        assert p.returncode == 1, p.stderr
        (line,) = p.stderr.splitlines()
        assert line.startswith(f"error: {store}: cannot ") and line.endswith("Read-only file system"), line
        assert not (tmp_path / "x.cfs").exists() and not named(store)
        subprocess.run(["mount", "-o", "remount,rw", str(store)], check=True)
        assert temps(store)  # (left by the refused run)
        run_cfsc("gc", str(store), "--keep-dir", str(empty(tmp_path)), check=True)
        assert not temps(store) and not named(store)


# -- a worker killed while it stages an object -------------------------------------------------


@pytest.mark.parametrize("via", ["path", "symlink"])
def test_a_worker_killed_while_staging_leaves_no_temp_file(tmp_path, monkeypatch, via):
    """A worker killed right after it wrote a temp file (before replying): the main process
    never heard that file's name, but it carries the worker's tag, so the failed run removes
    it with every other temp file, also where the store's path is a symlink to it.  Nothing
    is named; nothing is left for `cfsc gc`."""
    src = tmp_path / "src"
    make(src, files(100))
    main = os.getpid()
    real = objects.Store._finish

    def finish(self, temp):
        real(self, temp)
        if os.getpid() != main:  # in a worker: its temp file is finished, its reply not sent
            os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(objects.Store, "_finish", finish)
    monkeypatch.setattr(directory, "WORKERS", "processes")
    store = tmp_path / "store"
    if via == "symlink":
        (tmp_path / "real").mkdir()
        store.symlink_to(tmp_path / "real")
    before = children()
    with pytest.raises(InputError) as e:
        directory.load(str(src), Options(digest_store=str(store), threads=2))
    assert one_line(e.value) == f"{src}: cannot read files: a hashing worker process died"
    assert children() == before
    assert not named(store)
    assert not temps(store) and sorted(os.listdir(store)) == [LOCK_NAME]


# -- no worker process to be had -----------------------------------------------------------------


@pytest.mark.parametrize("progress", [False, True], ids=["quiet", "progress"])
def test_a_failed_fork_reads_in_threads_and_says_so_with_progress(tmp_path, monkeypatch, capsys, progress):
    """fork() refused (EAGAIN: a process limit): the same image from the thread pool, and,
    when progress is shown, one line on stderr saying why the files were read in threads."""
    src = tmp_path / "src"
    make(src, files(3 * directory.BATCH_FILES))
    monkeypatch.setattr(directory, "WORKERS", "threads")
    compile_image([str(src)], str(tmp_path / "threads.cfs"), Options(threads=2))

    def refused_fork():
        raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    before = children()
    monkeypatch.setattr(directory_workers.os, "fork", refused_fork)
    monkeypatch.setattr(directory, "WORKERS", "processes")
    capsys.readouterr()
    compile_image([str(src)], str(tmp_path / "fallback.cfs"), Options(threads=2, progress=progress))
    err = capsys.readouterr().err
    assert (tmp_path / "fallback.cfs").read_bytes() == (tmp_path / "threads.cfs").read_bytes()
    assert children() == before
    notice = "cfsc: reading files in threads: cannot start hashing worker processes (Resource temporarily unavailable)\n"
    # (a slow run may also draw the progress line itself: `\r`-led, never a whole line)
    assert err.count(notice) == (1 if progress else 0) and err.count("\n") == err.count(notice)
