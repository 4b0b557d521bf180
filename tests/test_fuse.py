"""The FUSE reader and the mount commands, on real mounts (we are root; /dev/fuse and loop
devices exist here and in CI).

The reference is the kernel composefs mount (EROFS + overlayfs with the store as data-only
layer): walking a FUSE mount of an image must give exactly what walking the kernel mount of
the same image gives — names in order, every lstat field but st_dev, symlink targets,
xattrs in order with their values, file bytes, and errors where the kernel gives them.
One errno differs on purpose: a corrupt inode is EIO on the FUSE mount (with a log line
naming the image offset), whatever errno the kernel picks for that kind of corruption
(`test_a_corrupt_inode_below_the_root_is_eio_and_logged`).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from cfsc.backends.erofs.writer import write_image
from cfsc.base import beneath
from cfsc.base.fsverity import digest_bytes, payload_path
from cfsc.base.options import Options
from cfsc.base.tree import S_IFREG
from cfsc.build.pipeline import run_passes
from cfsc.fuse import MountOptions, open_view
from cfsc.fuse import protocol as P
from cfsc.fuse.attach import MountError, unmount
from cfsc.fuse.kernel import mount_kernel
from cfsc.fuse.server import AHEAD_BATCH, Server
from cfsc.store.backing import Store
from hypothesis import HealthCheck, Phase, given, settings

from tests.helpers.data import CFSC, CONFORMANCE, run_cfsc
from tests.helpers.fuse import (compile_dump, compile_tree, data_image, fuse_mounted, put_object, read_or_errno, try_errno, walk)
from tests.helpers.strategies import trees
from tests.helpers.procs import exits

pytestmark = [pytest.mark.fuse, pytest.mark.kernel_mount, pytest.mark.root, pytest.mark.tools, pytest.mark.timeout(120)]
IMAGES = CONFORMANCE / "upstream-images"
UNMAPPED = 2**32 - 1  # (uid_t)-1


# -- mounting helpers --------------------------------------------------------------------


@contextlib.contextmanager
def kernel_mounted(image: Path, mnt: Path, basedirs=()):
    mount_kernel(str(image), str(mnt), MountOptions(basedirs=[str(b) for b in basedirs], verity="none"))
    try:
        yield
    finally:
        unmount(str(mnt))


def assert_same(kernel: list, fuse: list) -> None:
    assert len(kernel) == len(fuse)
    for k, f in zip(kernel, fuse, strict=True):
        assert k == f, f"kernel: {k!r}\nfuse:   {f!r}"


def compare_mounts(image: Path, tmp: Path, basedirs=()) -> list:
    (tmp / "k").mkdir(exist_ok=True)
    (tmp / "f").mkdir(exist_ok=True)
    with kernel_mounted(image, tmp / "k", basedirs):
        reference = walk(tmp / "k")
    with fuse_mounted(image, tmp / "f", basedirs):
        seen = walk(tmp / "f")
    assert_same(reference, seen)
    return seen


# -- the reference view ------------------------------------------------------------------


def conformance_store(image: Path, store: Path) -> dict[bytes, str]:
    """Give every external file of `image` data in `store`; returns the sha256 (hex) each
    such path must read as.

    The upstream images name store objects by paths whose content we do not have, and
    record no fs-verity digests for them (checked here: an object with a digest could only
    be made by knowing its content), so any bytes of the recorded size are a valid object.
    Each gets its own: its payload repeated at the start and the end, and zeros between —
    a hole, so 170 MB of objects cost little, except for hard-linked files.  (overlayfs
    reports a metacopy file's st_blocks from the size until it has looked the data up, then
    the data file's: a hard link read before the second lstat would show the hole.)"""
    from cfsc.backends.erofs.entries import walk as walk_image
    from cfsc.backends.erofs.reader import Image

    objects: dict[bytes, list] = {}  # payload -> [size, dense]
    paths = []
    for path, e, _first in walk_image(Image.open(str(image))):
        if e.mode & 0o170000 != S_IFREG or e.content is not None or not e.payload:
            continue
        assert e.digest is None, f"{path!r}: a digest of content we do not have"
        obj = objects.setdefault(e.payload, [e.size, False])
        assert obj[0] == e.size, f"{path!r}: object {e.payload!r} with two sizes"
        obj[1] = obj[1] or e.nlink > 1
        paths.append((path, e.payload))
    digests = {}
    for payload, (size, dense) in objects.items():
        mark = (payload * (size // len(payload) + 1))[:size if dense else min(size, 4096)]
        tail = mark[:min(size - len(mark), 4096)][::-1]
        target = store / os.fsdecode(payload)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            f.write(mark)
            f.seek(size - len(tail))
            f.write(tail)
        digests[payload] = hashlib.sha256(mark + bytes(size - len(mark) - len(tail)) + tail).hexdigest()
    return {path: digests[payload] for path, payload in paths}


@pytest.mark.parametrize("name", sorted(p.name for p in IMAGES.iterdir()))
def test_conformance_images_look_as_on_the_kernel_mount(name, tmp_path):
    image = tmp_path / "image.cfs"
    data = (IMAGES / name).read_bytes()
    image.write_bytes(gzip.decompress(data) if name.endswith(".gz") else data)
    store = tmp_path / "store"
    store.mkdir()
    expected = conformance_store(image, store)
    seen = compare_mounts(image, tmp_path, [store])
    assert len(seen) > 1
    contents = {rec[0]: rec[-1] for rec in seen if len(rec) > 3 and stat.S_ISREG(int(rec[1], 8))}
    for path, digest in expected.items():
        assert contents[path] == digest, path
    if name.startswith("config"):
        assert len(expected) > 6000, "the config images are mostly external files"


def test_the_view_takes_store_references_from_the_image_reader(tmp_path):
    """Payload and digest of a metacopy file are the reader's reading of the redirect and
    metacopy values, odd ones included (FUSE and `cfsc dump` must never disagree); whether
    the file takes its data from the store is overlayfs' rule: it carries a metacopy."""
    from cfsc.backends.erofs.entries import Entries
    from cfsc.backends.erofs.overlay import METACOPY as M
    from cfsc.backends.erofs.overlay import REDIRECT as R
    from cfsc.backends.erofs.reader import Image
    from cfsc.frontends import dumpfile
    from cfsc.fuse.view import ImageView

    odd = {b"plain": ((M, b""), (R, b"/ab/cd")), b"digest": ((M, bytes(4) + b"\x11" * 32), (R, b"ab/cd")),
           b"short-metacopy": ((M, b"\1" * 10), (R, b"//ab/cd")), b"nul": ((M, b""), (R, b"/ab/cd\0tail")),
           b"slash": ((M, b""), (R, b"/")), b"no-redirect": ((M, bytes(36)),),
           b"long-metacopy": ((M, bytes(37)), (R, b"/q")), b"no-metacopy": ((R, b"/ab/x"),)}
    dump = b"/ 4096 40755 2 0 0 0 0.0 - - -\n" + b"".join(b"/%s 3 100644 1 0 0 0 0.0 - abc -\n" % n for n in odd)
    tree = run_passes(dumpfile.loads(dump, Options(), "test.dump"), Options())
    for name, pairs in odd.items():  # lowered already: these go to the image as they are
        node = tree.root.children[name]
        node.xattrs = tuple(sorted(node.xattrs + pairs))
    out = io.BytesIO()
    write_image(tree, out)
    image = Image(out.getvalue(), "odd.cfs")
    view = ImageView(image)
    entries = Entries(image)
    for name, nid in view.children(image.root_nid):
        node = view.node(nid)
        entry = entries.get(nid)
        assert node.external == (name != b"no-metacopy"), name
        if node.external:
            assert (node.payload, node.digest) == (entry.payload, entry.digest), name
            assert bool(node.broken) == (not entry.payload), name
        else:
            assert node.payload is None and view.content(node) == b"abc"


def _materialise(tree, store: Path) -> dict[bytes, bytes]:
    """Give every external file of a random tree real data in `store`; returns what each
    regular file must read as."""
    expected = {}
    data_of: dict[int, bytes] = {}  # id(inode) -> its data (hard links share it)
    # Paths even root may not read, on both mounts: a POSIX ACL on the way (a random one is
    # mostly invalid), or an owner that maps to no user (root's DAC override needs one).
    barred = {b"": False}
    rng = random.Random(1)
    for path, node, _parent, _is_link in tree.walk():
        barred[path.rstrip(b"/")] = barred[path.rstrip(b"/").rpartition(b"/")[0]] or any(
            k.startswith(b"system.posix_acl") for k, _v in node.xattrs) or UNMAPPED in (node.uid, node.gid)
        if node.mode & 0o170000 != S_IFREG:
            continue
        if node.content is None and node.size:
            if id(node) not in data_of:
                data = data_of[id(node)] = rng.randbytes(node.size % 70001 + 1)
                node.size = len(data)
                node.payload = put_object(store, data)
                node.digest = digest_bytes(data)
            data = data_of[id(node)]
        else:
            data = node.content or b""
        if not barred[path]:
            expected[path] = data
    return expected


# Each example mounts twice (tens of milliseconds): 150 take about 6 s.  No shrinking
# (minutes per step).
@settings(max_examples=150, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(trees())
def test_random_trees_look_as_on_the_kernel_mount(tmp_path_factory, tree):
    tmp = tmp_path_factory.mktemp("random")
    store = tmp / "store"
    store.mkdir()
    expected = _materialise(tree, store)
    image = tmp / "image.cfs"
    compile_tree(tree, image)
    seen = compare_mounts(image, tmp, [store])
    contents = {rec[0]: rec[-1] for rec in seen if len(rec) > 3 and stat.S_ISREG(int(rec[1], 8))}
    for path, data in expected.items():
        if path in contents:  # whiteouts were regular files in the tree too
            assert contents[path] == hashlib.sha256(data).hexdigest(), path


@pytest.fixture
def public_tmp():
    """A directory every user can enter (pytest's tmp_path is not)."""
    base = Path(tempfile.mkdtemp(prefix="cfsc-fuse-"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_unprivileged_callers_do_not_see_trusted_xattrs(public_tmp):
    image = public_tmp / "i.cfs"
    compile_dump(b"/ 4096 40755 2 0 0 0 0.0 - - -\n/f 3 100644 1 0 0 0 0.0 - abc - trusted.x=1 user.y=2\n", image)
    os.chmod(image, 0o644)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
    listing = ["getfattr", "--absolute-names", "-m", "-", "-d"]
    for name in ("k", "f"):
        (public_tmp / name).mkdir()
    with kernel_mounted(image, public_tmp / "k", [public_tmp]), fuse_mounted(image, public_tmp / "f"):
        for name in ("k", "f"):
            path = str(public_tmp / name / "f")
            root = subprocess.run(listing + [path], capture_output=True, text=True, check=True)
            user = subprocess.run(nobody + listing + [path], capture_output=True, text=True, check=True)
            assert 'trusted.x="1"' in root.stdout and 'user.y="2"' in root.stdout, name
            assert "trusted" not in user.stdout and 'user.y="2"' in user.stdout, name


# -- data: passthrough, pread, verification, confinement -------------------------------------


def test_external_data_with_and_without_passthrough(tmp_path):
    import mmap

    image, store, files = data_image(tmp_path)
    mnt = tmp_path / "m"
    mnt.mkdir()
    for passthrough in (True, False):
        with fuse_mounted(image, mnt, [store], passthrough=passthrough) as server:
            assert server.passthrough == passthrough
            for name, data in files.items():
                assert (mnt / name).read_bytes() == data, name
            with open(mnt / "big", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                assert m[1 << 20:(1 << 20) + 100] == files["big"][1 << 20:(1 << 20) + 100]
                held = server._held[os.fstat(f.fileno()).st_ino]
                assert (held.backing_id is not None) == passthrough
                # passthrough needs OPEN; without it the kernel opens files by itself
                assert held.opens if passthrough else server.no_open
            end = time.monotonic() + 5  # RELEASE comes asynchronously after close
            while any(h.opens for h in server._held.values()) and time.monotonic() < end:
                time.sleep(0.01)
            assert not any(h.opens for h in server._held.values()), "every open released"
            assert set(server._idle) == set(server._held), "kept for the next open"
            assert (mnt / "big").read_bytes() == files["big"], "served again from the kept file"


def test_a_small_verified_file_is_passed_through_and_hashed_once(tmp_path):
    """With passthrough, a small file with a digest is read once, to be checked (with no
    fs-verity here), and its bytes are not kept: the kernel reads the file itself.  A file
    without a digest is neither read nor kept."""
    image, store, files = data_image(tmp_path)
    mnt = tmp_path / "m"
    mnt.mkdir()
    with fuse_mounted(image, mnt, [store]) as server:
        assert server.passthrough
        for name in ("small", "nodigest"):
            with open(mnt / name, "rb") as f:
                assert f.read() == files[name]
                held = server._held[os.fstat(f.fileno()).st_ino]
                assert held.backing_id is not None and held.data is None, name
        assert server.store.measured == len(files["small"]), "the small file hashed once, from its bytes"


def test_a_longer_backing_file_is_served_at_the_image_size_either_way(tmp_path):
    """With no digest to check, passthrough would let the kernel read a backing file longer
    than the image says to its own end; it is served by reads instead (cut at the image's
    size, as without passthrough), and a log line says why."""
    store = tmp_path / "store"
    store.mkdir()
    data = os.urandom(10000)
    payload = put_object(store, data)
    with open(store / os.fsdecode(payload), "ab") as f:
        f.write(b"EXTRA" * 1000)
    image = tmp_path / "x.cfs"
    compile_dump(b"/ 4096 40755 2 0 0 0 0.0 - - -\n/f %d 100644 1 0 0 0 0.0 %s - -\n" % (len(data), payload), image)
    mnt = tmp_path / "m"
    mnt.mkdir()
    for passthrough in (True, False):
        with fuse_mounted(image, mnt, [store], verity="none", passthrough=passthrough) as server:
            assert server.passthrough == passthrough
            with open(mnt / "f", "rb") as f:
                assert f.read() == data
                held = server._held.get(os.fstat(f.fileno()).st_ino)
                # without passthrough a small file is read once and not held (`_read_small`)
                assert held.backing_id is None if passthrough else held is None
            logged = [m for m in server._logged if "has 15000 bytes, the image says 10000" in m]
            assert len(logged) == passthrough and (not logged or logged[0].startswith(f"{image}:/f: backing file"))


def test_tampered_objects_give_eio_and_a_log_line(tmp_path):
    image, store, files = data_image(tmp_path)
    flipped = store / os.fsdecode(payload_path(digest_bytes(files["flipped"])))
    raw = bytearray(flipped.read_bytes())
    raw[5000] ^= 1
    flipped.write_bytes(raw)
    truncated = store / os.fsdecode(payload_path(digest_bytes(files["truncated"])))
    truncated.write_bytes(files["truncated"][:4096])
    mnt = tmp_path / "m"
    mnt.mkdir()
    for verity in ("if-present", "require", "none"):
        log = tmp_path / f"{verity}.log"
        p = run_cfsc("mount", str(image), str(mnt), "--store", str(store), "--verity", verity, "--log", str(log))
        assert p.returncode == 0, p.stderr
        try:
            got = {name: read_or_errno(mnt / name) for name in files}
        finally:
            run_cfsc("umount", str(mnt), check=True)
        assert got["small"] == files["small"] and got["big"] == files["big"]
        if verity == "none":
            assert got["flipped"] == bytes(raw) and got["truncated"] == files["truncated"][:4096]
            assert got["nodigest"] == files["nodigest"]
            continue
        assert got["flipped"] == "EIO" and got["truncated"] == "EIO"
        assert got["nodigest"] == ("EIO" if verity == "require" else files["nodigest"])
        text = _wait_for(log, "truncated")
        for name in ("flipped", "truncated"):
            line = next(line for line in text.splitlines() if f"data.cfs:/{name}:" in line)
            assert os.fsdecode(payload_path(digest_bytes(files[name]))) in line and "digest" in line
        if verity == "require":
            assert "data.cfs:/nodigest: no fs-verity digest" in text


def test_objects_written_to_after_use_are_checked_again(tmp_path):
    image, store, files = data_image(tmp_path)
    mnt = tmp_path / "m"
    mnt.mkdir()
    obj = store / os.fsdecode(payload_path(digest_bytes(files["small"])))
    for passthrough in (True, False):
        obj.write_bytes(files["small"])
        with fuse_mounted(image, mnt, [store], passthrough=passthrough):
            assert (mnt / "small").read_bytes() == files["small"]
            time.sleep(0.01)
            with open(obj, "r+b") as f:  # in place: the kept backing file sees it
                f.write(b"J")
            with contextlib.suppress(OSError), open(mnt / "small", "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # cached was checked: drop
            assert read_or_errno(mnt / "small") == "EIO", passthrough


def _wait_for(log: Path, text: str, timeout: float = 5) -> str:
    end = time.monotonic() + timeout
    while True:
        content = log.read_text() if log.exists() else ""
        if text in content or time.monotonic() > end:
            return content
        time.sleep(0.05)


def test_hostile_payloads_cannot_leave_the_store(tmp_path):
    outside = tmp_path / "secret"
    outside.write_bytes(b"SECRET")
    store = tmp_path / "store"
    (store / "ab").mkdir(parents=True)
    (store / "ab" / "ok").write_bytes(b"fine")
    (store / "link").symlink_to(tmp_path)  # a symlinked store directory
    (store / "ab" / "file-link").symlink_to(outside)
    payloads = {"dotdot": b"../secret", "deep": b"ab/../../secret", "absolute": os.fsencode(outside),
                "symdir": b"link/secret", "symfile": b"ab/file-link", "ok": b"ab/ok"}
    lines = [b"/ 4096 40755 2 0 0 0 0.0 - - -"]
    lines += [b"/%s 6 100644 1 0 0 0 0.0 %s - -" % (n.encode(), p) for n, p in payloads.items()]
    image = tmp_path / "hostile.cfs"
    compile_dump(b"\n".join(lines) + b"\n", image)
    mnt = tmp_path / "m"
    mnt.mkdir()
    with fuse_mounted(image, mnt, [store]), pytest.MonkeyPatch.context() as mp:
        for fallback in (False, True):  # openat2, then the component walk
            mp.setattr(beneath, "use_openat2", not fallback)
            for name in payloads:
                got = read_or_errno(mnt / name)
                assert got == (b"fine" if name == "ok" else "EIO"), (name, fallback, got)


# -- mounting, failing, stopping --------------------------------------------------------------


def test_corrupt_image_fails_with_the_located_error_and_leaves_no_mount(tmp_path):
    good = (IMAGES / "special.v1.cfs").read_bytes()
    from cfsc.backends.erofs.reader import Image

    root = Image(good).inode_offset(Image(good).root_nid)
    bad = bytearray(good)
    bad[root + 4:root + 6] = b"\xff\xff"  # the root's mode: no valid file type
    image = tmp_path / "bad.cfs"
    image.write_bytes(bad)
    mnt = tmp_path / "m"
    mnt.mkdir()
    for extra in ([], ["--kernel", "--store", str(tmp_path)]):
        p = run_cfsc("mount", str(image), str(mnt), *extra)
        assert p.returncode == 2
        assert p.stderr.decode().startswith(f"error: {image}@0x{root + 4:x}: inode nid"), p.stderr
        assert not os.path.ismount(mnt) and not os.listdir(mnt)
    image.write_bytes(good[:8192])  # truncated
    p = run_cfsc("mount", str(image), str(mnt))
    assert p.returncode == 2 and b"truncated" in p.stderr and not os.path.ismount(mnt)


def test_a_corrupt_inode_below_the_root_is_eio_and_logged(tmp_path, caplog):
    """The kernel's errno for a corrupt inode depends on the check that fails it and on the
    kernel version (EOPNOTSUPP for unknown i_format bits, EUCLEAN for a bogus mode, …) and
    tells nothing of where; the FUSE mount answers EIO — "this file system cannot be read" —
    for every corrupt-image refusal and logs the image offset once.  The name is still
    listed on both, and the rest of the tree still works."""
    from cfsc.backends.erofs.reader import Image

    good = (IMAGES / "special.v1.cfs").read_bytes()
    reader = Image(good)
    nid = reader.lookup(reader.inode(reader.root_nid), b"inline")
    offset = reader.inode_offset(nid)
    bad = bytearray(good)
    bad[offset:offset + 2] = b"\xff\xff"  # i_format: unknown bits, no such layout
    image = tmp_path / "bad.cfs"
    image.write_bytes(bad)
    for name in ("k", "f"):
        (tmp_path / name).mkdir()
    with kernel_mounted(image, tmp_path / "k", [tmp_path]):
        assert "inline" in os.listdir(tmp_path / "k")
        assert try_errno(os.lstat, tmp_path / "k" / "inline") is not None  # which errno depends on the kernel
    with fuse_mounted(image, tmp_path / "f"):
        assert "inline" in os.listdir(tmp_path / "f")
        assert try_errno(os.lstat, tmp_path / "f" / "inline") == "EIO"
        assert os.getxattr(tmp_path / "f" / "escaped-xattr", "user.foo") == b"bar-2"
    assert f"{image}@0x{offset:x}: inode nid {nid}: i_format 0xffff" in caplog.text


def test_digest_option(tmp_path):
    image = IMAGES / "special.v1.cfs"
    digest = digest_bytes(image.read_bytes()).hex()
    mnt = tmp_path / "m"
    mnt.mkdir()
    p = run_cfsc("mount", str(image), str(mnt), "--digest", "00" * 32)
    assert p.returncode == 2 and b"fs-verity digest is " + digest.encode() in p.stderr
    assert not os.path.ismount(mnt)
    for extra in ([], ["--kernel", "--verity", "none", "--store", str(tmp_path)]):
        p = run_cfsc("mount", str(image), str(mnt), "--digest", digest, *extra)
        assert p.returncode == 0, p.stderr
        assert (mnt / "inline").read_bytes() == b"FOOBAR\nINAFILE\n"
        run_cfsc("umount", str(mnt), check=True)
        assert not os.path.ismount(mnt)


def test_foreground_server_stops_on_sigterm_and_on_outside_unmount(tmp_path):
    image = IMAGES / "special.v1.cfs"
    mnt = tmp_path / "m"
    mnt.mkdir()
    for how in ("sigterm", "sigint", "umount"):
        proc = subprocess.Popen([CFSC, "mount", "-f", str(image), str(mnt)], stderr=subprocess.PIPE)
        try:
            _wait_mounted(mnt)
            assert (mnt / "inline").read_bytes() == b"FOOBAR\nINAFILE\n"
            if how == "umount":
                subprocess.run(["umount", str(mnt)], check=True)
            else:
                proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
            assert proc.wait(10) == 0, proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
        assert not os.path.ismount(mnt)


def _wait_mounted(mnt: Path, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not os.path.ismount(mnt):
        assert time.monotonic() < end, "not mounted"
        time.sleep(0.02)


def test_a_failed_background_mount_names_the_place_once(tmp_path):
    """The background server's error reaches the caller as the server raised it (it used to
    come wrapped in a second copy of the mount point), and says what the foreground does."""
    shutil.copy(IMAGES / "special.v1.cfs", tmp_path / "img.cfs")
    (tmp_path / "f").mkdir()
    (tmp_path / "store").mkdir()
    # /dev/null in place of /dev/fuse, in a private mount namespace: it opens, mount(2) refuses it
    script = ('mount --bind /dev/null /dev/fuse; for f in "" -f; do '
              '"$CFSC" mount $f img.cfs f --store store; echo "rc=$?"; done')
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], cwd=tmp_path,
                       env=dict(os.environ, CFSC=CFSC), capture_output=True, text=True, timeout=60)
    assert p.stderr == f"error: {tmp_path / 'f'}: mount failed: Invalid argument\n" * 2
    assert p.stdout == "rc=1\n" * 2
    assert not os.path.ismount(tmp_path / "f")


def _server_pid(log: Path) -> int:
    """The background server's pid, from its first log line."""
    text = _wait_for(log, "serving")
    found = re.search(r"cfsc\[(\d+)\]: serving", text)
    assert found, text
    return int(found.group(1))


def test_background_server_leaves_the_working_directory_and_stops_on_sigterm_and_outside_unmount(tmp_path):
    image, store, files = data_image(tmp_path)
    mnt = tmp_path / "m"
    mnt.mkdir()
    for how in ("sigterm", "umount"):
        log = tmp_path / f"{how}.log"
        # relative paths, from a directory the server must not keep busy; and a pipe the
        # caller leaves open to it, which the server must not keep either
        r, w = os.pipe()
        os.set_inheritable(w, True)
        p = subprocess.run([CFSC, "mount", image.name, mnt.name, "--store", store.name, "--log", log.name],
                           cwd=tmp_path, capture_output=True, pass_fds=(w,))
        os.close(w)
        assert p.returncode == 0, p.stderr
        pid = _server_pid(log)
        try:
            os.set_blocking(r, False)
            try:
                assert os.read(r, 1) == b""
            except BlockingIOError:
                pytest.fail("the server holds the caller's pipe open")
            os.close(r)
            assert os.readlink(f"/proc/{pid}/cwd") == "/"
            assert (mnt / "big").read_bytes() == files["big"], "the store found from /"
            mounts = Path("/proc/self/mounts").read_text().splitlines()
            assert f"{image} {mnt} fuse.composefs ro," in "\n".join(mounts), "the source is absolute"
            if how == "umount":
                subprocess.run(["umount", str(mnt)], check=True)
            else:
                os.kill(pid, signal.SIGTERM)
            assert exits(pid), f"the server is still running after {how}"
            assert not os.path.ismount(mnt)
        finally:
            if not exits(pid, 0):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(MountError):  # gone already (a dead server's mount is not stat-able)
                unmount(str(mnt), lazy=True)
        assert "error" not in log.read_text().lower(), log.read_text()


def test_kernel_mount_file_backed_and_loop(tmp_path):
    image, store, files = data_image(tmp_path)
    mnt = tmp_path / "m"
    mnt.mkdir()
    for extra in ([], ["--loop"]):
        p = run_cfsc("mount", "--kernel", "--verity", "none", str(image), str(mnt), "--store", str(store), *extra)
        assert p.returncode == 0, p.stderr
        try:
            assert (mnt / "big").read_bytes() == files["big"]
        finally:
            run_cfsc("umount", str(mnt), check=True)
    # Digests to check, a store without fs-verity: the kernel could only fail every read.
    p = run_cfsc("mount", "--kernel", str(image), str(mnt), "--store", str(store))
    assert p.returncode == 2 and b"no fs-verity" in p.stderr and not os.path.ismount(mnt)
    assert b"pass --verity none" in p.stderr, "what to do about it"


def test_composefs_fuse_drop_in(tmp_path):
    image, store, files = data_image(tmp_path)
    mnt = tmp_path / "m"
    mnt.mkdir()
    (tmp_path / "empty").mkdir()  # base directories are searched in order, like data layers
    p = run_cfsc("composefs-fuse", "-o", f"source={image},basedir={tmp_path / 'empty'}:{store}", str(mnt))
    assert p.returncode == 0, p.stderr
    try:
        assert (mnt / "small").read_bytes() == files["small"]
    finally:
        run_cfsc("umount", str(mnt), check=True)
    assert b"source=IMAGE" in run_cfsc("composefs-fuse", "--help").stdout
    p = run_cfsc("composefs-fuse", "-o", "source=x,bogus", str(mnt))
    assert p.returncode == 2 and b"unknown option 'bogus'" in p.stderr
    assert run_cfsc("composefs-fuse", "-o", f"basedir={store}", str(mnt)).returncode == 2


# -- an ordinary user ------------------------------------------------------------------------

USER = "cfsc-fuse-test"
# Runs in a private mount namespace: as root, then as USER.  The host's /dev/fuse may be
# 0600 (this VM has no udev): the namespace gets a 0666 one, as udev makes it on Debian.
# Directories on the way to the interpreter that USER cannot enter (a pyenv under /root)
# are covered, in the namespace only, by a tmpfs holding just the way through.
UNPRIVILEGED_SCRIPT = r"""
set -e
mount -t tmpfs -o mode=0755 tmpfs "$NS"
mknod -m 0666 "$NS/fuse" c 10 229
mount --bind "$NS/fuse" /dev/fuse
@COVER@
setpriv --reuid="$USER_NAME" --regid="$USER_NAME" --clear-groups --inh-caps=-all sh -c '
    set -e
    "$CFSC" mount "$IMAGE" "$MNT" --store "$STORE" --log "$LOG"
    grep -q " $MNT fuse.composefs ro,nosuid,nodev" /proc/self/mounts
    cat "$MNT/small" > "$OUT"
    "$CFSC" umount "$MNT"
    if grep -q " $MNT " /proc/self/mounts; then echo still mounted; exit 1; fi
'
"""


def _cover_commands(path: str, ns: str) -> str:
    """Shell commands making `path` reachable for every user in this mount namespace."""
    commands = []
    parts = Path(path).parts
    for i in range(1, len(parts) - 1):
        d = Path(*parts[:i + 1])
        if os.stat(d).st_mode & 0o001:
            continue
        child = Path(*parts[:i + 2])
        keep = f"{ns}/keep{i}"
        commands += [f"mkdir -p {keep}", f"mount --bind {child} {keep}",
                     f"mount -t tmpfs -o mode=0755 tmpfs {d}", f"mkdir -p {child}", f"mount --bind {keep} {child}"]
    return "\n".join(commands)


def test_an_ordinary_user_mounts_with_fusermount3(public_tmp):
    assert shutil.which("fusermount3"), "fusermount3 is missing: .ci/setup --test installs fuse3"
    if subprocess.run(["id", USER], capture_output=True).returncode:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True)
    image, store, files = data_image(public_tmp)
    for p in public_tmp.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    mnt = public_tmp / "mnt"
    mnt.mkdir()
    shutil.chown(mnt, USER, USER)
    out = public_tmp / "out"
    log = public_tmp / "log"
    for path in (out, log):
        path.touch()
        shutil.chown(path, USER, USER)
    ns = public_tmp / "ns"
    ns.mkdir()
    script = UNPRIVILEGED_SCRIPT.replace("@COVER@", _cover_commands(os.path.realpath(sys.executable), str(ns)))
    env = dict(os.environ, NS=str(ns), USER_NAME=USER, CFSC=CFSC, IMAGE=str(image), MNT=str(mnt),
               STORE=str(store), LOG=str(log), OUT=str(out))
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert out.read_bytes() == files["small"]


# -- the protocol, against a fake kernel ------------------------------------------------------


class FakeKernel:
    """Talks to a `Server` over a SOCK_SEQPACKET pair: one message per request and reply,
    as `/dev/fuse` frames them."""

    def __init__(self, image: Path, basedirs=(), threads=2):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.fd = theirs.detach()
        self.server = Server(self.fd, open_view(str(image)), Store([str(b) for b in basedirs]),
                             threads=threads, passthrough=True)
        self.server.start()
        self.unique = 0
        self.lock = threading.Lock()

    def send(self, opcode, body=b"", nodeid=1, unique=None) -> int:
        if unique is None:
            self.unique += 2
            unique = self.unique
        header = P.IN_HEADER.pack(40 + len(body), opcode, unique, nodeid, 0, 0, os.getpid(), 0)
        self.sock.send(header + body)
        return unique

    def receive(self, timeout=5.0):
        self.sock.settimeout(timeout)
        data = self.sock.recv(1 << 21)
        length, error, unique = P.OUT_HEADER.unpack_from(data)
        assert length == len(data)
        return unique, error, data[16:]

    def call(self, opcode, body=b"", nodeid=1):
        unique = self.send(opcode, body, nodeid)
        got_unique, error, payload = self.receive()
        assert got_unique == unique
        return error, payload

    def init(self, major=7, minor=45, flags=0xFFFFFFFF, flags2=0xFFFFFFFF):
        return self.call(P.Opcode.INIT, P.INIT_IN.pack(major, minor, 1 << 20, flags)
                         + P.INIT_IN_FLAGS2.pack(flags2))

    def close(self):
        self.sock.close()
        self.server.wait(5)
        self.server.close()
        os.close(self.fd)


@pytest.fixture
def fake():
    kernels = []

    def make(image=IMAGES / "special.v1.cfs", **kw):
        k = FakeKernel(image, **kw)
        kernels.append(k)
        return k

    yield make
    for k in kernels:
        k.close()


def test_init_negotiation(fake):
    k = fake()
    error, out = k.init()
    assert error == 0
    reply = P.INIT_OUT.read(out)
    assert (reply.major, reply.minor, reply.max_pages, reply.max_readahead) == (7, 45, 256, 1 << 20)
    for flag in (P.FUSE_DO_READDIRPLUS, P.FUSE_PARALLEL_DIROPS, P.FUSE_CACHE_SYMLINKS, P.FUSE_MAX_PAGES):
        assert reply.flags & flag
    assert not reply.flags & P.FUSE_POSIX_ACL, "special.v1 has no ACLs"
    assert reply.flags2 << 32 & P.FUSE_PASSTHROUGH and reply.max_stack_depth == 1  # offered, and we are root
    old = fake()
    error, out = old.init(minor=31, flags=P.FUSE_ASYNC_READ | P.FUSE_MAX_PAGES)
    reply = P.INIT_OUT.read(out)
    assert error == 0 and reply.minor == 31 and reply.flags == P.FUSE_ASYNC_READ | P.FUSE_MAX_PAGES
    assert reply.flags2 == 0 and reply.max_stack_depth == 0, "passthrough not offered"
    newer = fake()
    error, out = newer.init(major=8)
    assert error == 0 and P.INIT_OUT.read(out)[:2] == (7, 45), "answer with our major; the kernel retries"
    ancient = fake()
    assert ancient.init(minor=12)[0] == -errno.EPROTO


def test_requests(fake):
    k = fake()
    k.init()
    error, entry = k.call(P.Opcode.LOOKUP, b"inline\0")
    entry = P.ENTRY_OUT.read(entry)
    assert error == 0 and entry.ino == entry.nodeid - 2 and entry.size == 15 and entry.entry_valid > 0
    error, negative = k.call(P.Opcode.LOOKUP, b"nothing\0")
    assert error == 0 and P.ENTRY_OUT.read(negative).nodeid == 0 and P.ENTRY_OUT.read(negative).entry_valid > 0
    assert k.call(P.Opcode.LOOKUP, b"00\0")[1][:8] == bytes(8), "a root whiteout is not there"
    error, opened = k.call(P.Opcode.OPEN, P.OPEN_IN.pack(os.O_RDONLY, 0), entry.nodeid)
    assert error == 0 and P.OPEN_OUT.read(opened).open_flags & P.FOPEN_KEEP_CACHE
    error, data = k.call(P.Opcode.READ, P.READ_IN.pack(0, 7, 100, 0, 0), entry.nodeid)
    assert (error, data) == (0, b"INAFILE\n")
    assert k.call(P.Opcode.OPEN, P.OPEN_IN.pack(os.O_RDWR, 0), entry.nodeid)[0] == -errno.EROFS
    assert k.call(P.Opcode.MKDIR, b"\0" * 8 + b"x\0")[0] == -errno.EROFS
    assert k.call(P.Opcode.SETXATTR, b"\0" * 16 + b"user.x\0v")[0] == -errno.EROFS
    for op in (P.Opcode.FLUSH, P.Opcode.STATX, P.Opcode.LSEEK, P.Opcode.IOCTL, P.Opcode.ACCESS, 63):
        assert k.call(op, bytes(64), entry.nodeid)[0] == -errno.ENOSYS, op
    # xattrs: the size probe, ERANGE, a namespace EROFS has no handler for
    error, size = k.call(P.Opcode.GETXATTR, P.GETXATTR_IN.pack(0) + b"user.foo\0", entry.nodeid)
    assert error == 0 and P.GETXATTR_OUT.read(size).size == 5
    assert k.call(P.Opcode.GETXATTR, P.GETXATTR_IN.pack(3) + b"user.foo\0", entry.nodeid)[0] == -errno.ERANGE
    assert k.call(P.Opcode.GETXATTR, P.GETXATTR_IN.pack(99) + b"user.foo\0", entry.nodeid) == (0, b"bar-2")
    assert k.call(P.Opcode.GETXATTR, P.GETXATTR_IN.pack(99) + b"user.no\0", entry.nodeid)[0] == -errno.ENODATA
    assert k.call(P.Opcode.GETXATTR, P.GETXATTR_IN.pack(99) + b"lustre.x\0", entry.nodeid)[0] == -errno.EOPNOTSUPP
    error, names = k.call(P.Opcode.LISTXATTR, P.GETXATTR_IN.pack(4096), 1)
    assert names.split(b"\0")[:-1] == [b"trusted.foo1", b"trusted.overlay.opaque", b"trusted.overlay.whiteouts",
                                       b"user.foo2", b"user.overlay.opaque", b"user.overlay.whiteouts"]
    # FORGET, BATCH_FORGET and INTERRUPT are never answered: the next reply is STATFS's
    k.send(P.Opcode.FORGET, P.FORGET_IN.pack(1), entry.nodeid)
    k.send(P.Opcode.BATCH_FORGET, P.BATCH_FORGET_IN.pack(0))
    k.send(P.Opcode.INTERRUPT, P.INTERRUPT_IN.pack(12345))
    error, statfs = k.call(P.Opcode.STATFS)
    assert error == 0 and P.STATFS_OUT.read(statfs).bsize == 4096


def test_readdir_pages_through_a_directory(fake, tmp_path):
    names = sorted(f"entry-{i:04d}-{'x' * (i % 40)}".encode() for i in range(600))
    dump = b"/ 4096 40755 2 0 0 0 0.0 - - -\n" + b"".join(
        b"/%s 0 100644 1 0 0 0 0.0 - - -\n" % n for n in names)
    image = tmp_path / "big.cfs"
    compile_dump(dump, image)
    k = fake(image)
    k.init()
    for opcode, record in ((P.Opcode.READDIR, 0), (P.Opcode.READDIRPLUS, P.ENTRY_OUT.size)):
        seen = []
        offset = 0
        while True:
            error, data = k.call(opcode, P.READ_IN.pack(0, offset, 4096, 0, 0))
            assert error == 0 and len(data) <= 4096
            if not data:
                break
            pos = 0
            while pos < len(data):
                if record:
                    assert P.ENTRY_OUT.read(data, pos).nodeid in (0, P.DIRENT.read(data, pos + record).ino + 2)
                d = P.DIRENT.read(data, pos + record)
                start = pos + record + P.DIRENT.size
                seen.append(data[start:start + d.namelen])
                offset = d.off
                pos = start + (d.namelen + 7) // 8 * 8
        assert seen == [b".", b".."] + names, opcode


def test_interrupt_cancels_a_digest_in_progress(fake, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    payload = put_object(store, b"seed")
    with open(store / os.fsdecode(payload), "r+b") as f:
        # allocated, not written: slow to hash, cheap to make (a sparse file is hashed by its map)
        os.posix_fallocate(f.fileno(), 0, 1 << 30)
    image = tmp_path / "i.cfs"
    compile_dump(b"/ 4096 40755 2 0 0 0 0.0 - - -\n/f %d 100644 1 0 0 0 0.0 %s - %s\n"
                 % (1 << 30, payload, digest_bytes(b"seed").hex().encode()), image)
    k = fake(image, basedirs=[store], threads=2)
    k.init()
    entry = P.ENTRY_OUT.read(k.call(P.Opcode.LOOKUP, b"f\0")[1])
    start = time.monotonic()
    unique = k.send(P.Opcode.OPEN, P.OPEN_IN.pack(os.O_RDONLY, 0), entry.nodeid)
    time.sleep(0.05)
    k.send(P.Opcode.INTERRUPT, P.INTERRUPT_IN.pack(unique))
    got_unique, error, _ = k.receive(timeout=30)
    assert (got_unique, error) == (unique, -errno.EINTR)
    assert time.monotonic() - start < 5, "cancelled long before 1 GiB was hashed"


def test_concurrent_opens_of_one_file_share_one_verification(fake, tmp_path):
    """Opens of a file while another worker verifies it wait for that opening (the kernel's
    readahead sends several at once): all succeed on one handle, and the file is hashed once."""
    size = 32 << 20
    digest = digest_bytes(bytes(size))
    store = tmp_path / "store"
    payload = payload_path(digest)
    target = store / os.fsdecode(payload)
    target.parent.mkdir(parents=True)
    with open(target, "wb") as f:
        f.truncate(size)  # sparse zeros: the digest above
    image = tmp_path / "i.cfs"
    compile_dump(b"/ 4096 40755 2 0 0 0 0.0 - - -\n/f %d 100644 1 0 0 0 0.0 %s - %s\n"
                 % (size, payload, digest.hex().encode()), image)
    k = fake(image, basedirs=[store], threads=2)
    k.init()
    entry = P.ENTRY_OUT.read(k.call(P.Opcode.LOOKUP, b"f\0")[1])
    sent = {k.send(P.Opcode.OPEN, P.OPEN_IN.pack(os.O_RDONLY, 0), entry.nodeid) for _ in range(3)}
    replies = [k.receive(timeout=30) for _ in range(3)]
    assert {unique for unique, _e, _o in replies} == sent
    assert [error for _u, error, _o in replies] == [0, 0, 0]
    assert len({P.OPEN_OUT.read(opened).fh for _u, _e, opened in replies}) == 1
    assert k.server.store.measured == size, "hashed once, by the first opening"
    error, data = k.call(P.Opcode.READ, P.READ_IN.pack(P.OPEN_OUT.read(replies[0][2]).fh, size - 10, 100, 0, 0),
                         entry.nodeid)
    assert (error, data) == (0, bytes(10))


def test_read_ahead_stops_for_a_waiting_request_and_goes_on_after_it(tmp_path):
    """The worker encoding listings ahead looks for a waiting request every few entries and
    stops there; later it goes on where it stopped, and the stream is the one a request
    would have had encoded."""
    names = [b"f%03d" % i for i in range(100)]
    dump = b"/ 4096 40755 2 0 0 0 0.0 - - -\n/d 4096 40755 2 0 0 0 0.0 - - -\n" + b"".join(
        b"/d/%s 6 100644 1 0 0 0 0.0 - inline -\n" % n for n in names)
    image = tmp_path / "i.cfs"
    compile_dump(dump, image)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        fresh = Server(devnull, open_view(str(image)), Store([]))
        expected = fresh._encoded(fresh.view.lookup(fresh.view.root_nid, b"d"), True)
        server = Server(devnull, open_view(str(image)), Store([]))
        d = server.view.lookup(server.view.root_nid, b"d")
        key = d.nid * 2 + 1  # d's READDIRPLUS stream
        server._ahead.append(key)
        before = len(server.view._nodes)
        looks = []

        def waiting(_timeout):  # a request comes in at the third look
            looks.append(1)
            return len(looks) > 2

        server._read_ahead(waiting)
        assert key not in server._streams and server._ahead == [key], "stopped, to go on later"
        assert len(server.view._nodes) == before + 2 * AHEAD_BATCH, "two batches made, and kept"
        server._read_ahead(lambda _timeout: False)
        assert server._ahead == [] and server._streams[key] == expected
        assert len(server.view._nodes) == before + len(names)
    finally:
        os.close(devnull)
