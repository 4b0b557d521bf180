"""FUSE mounts as the tests drive them: a server of the test's own process on a mount point,
the walk that compares one mount with another, small images and stores to mount."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from pathlib import Path

from cfsc import build
from cfsc.base.fsverity import digest_bytes, payload_path
from cfsc.base.options import Options
from cfsc.fuse import open_view
from cfsc.fuse.attach import mount_fuse, unmount
from cfsc.fuse.server import Server
from cfsc.store.backing import Store


@contextlib.contextmanager
def fuse_mounted(image: Path, mnt: Path, basedirs=(), verity="if-present", passthrough=True, threads=2):
    """The FUSE server of this process on `mnt` (faster than a `cfsc mount` per example)."""
    view = open_view(str(image))
    store = Store([str(b) for b in basedirs], verity)
    fd = mount_fuse(str(mnt), str(image))
    server = Server(fd, view, store, threads=threads, passthrough=passthrough)
    server.start()
    try:
        assert server.ready.wait(10), "no INIT from the kernel"
        yield server
    finally:
        unmount(str(mnt))
        assert server.wait(10), "the server did not see the unmount"
        server.close()
        os.close(fd)
        store.close()


def walk(root: Path) -> list[tuple]:
    """Everything a program can see below `root`, in readdir order, errors included."""
    out = []
    stack = [b""]
    base = os.fsencode(root)
    while stack:
        rel = stack.pop()
        path = base + rel
        try:
            st = os.lstat(path)
        except OSError as e:
            out.append((rel, "lstat", errno.errorcode[e.errno]))
            continue
        rec = [rel, oct(st.st_mode), st.st_ino, st.st_nlink, st.st_uid, st.st_gid, st.st_size,
               st.st_rdev, st.st_blocks, st.st_blksize, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns]
        if stat.S_ISLNK(st.st_mode):
            rec.append(os.readlink(path))
        xattrs = []
        for key in try_errno(os.listxattr, path, follow_symlinks=False):
            xattrs.append((key, try_errno(os.getxattr, path, key, follow_symlinks=False)))
        rec.append(xattrs)
        if stat.S_ISREG(st.st_mode):
            rec.append(read_digest(path))
        if stat.S_ISDIR(st.st_mode):
            names = try_errno(os.listdir, path)
            rec.append(names)
            if isinstance(names, list):
                stack.extend(rel + b"/" + n for n in reversed(names))
        out.append(tuple(rec))
    return out


def try_errno(func, *args, **kwargs):
    """func's result, or the name of the errno it failed with."""
    try:
        return func(*args, **kwargs)
    except OSError as e:
        return errno.errorcode[e.errno]


def read_digest(path) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        return errno.errorcode[e.errno]


def read_or_errno(path):
    try:
        return path.read_bytes()
    except OSError as e:
        return errno.errorcode[e.errno]


def compile_tree(tree, image: Path) -> None:
    image.write_bytes(build.compile_tree(tree))


def compile_dump(text: bytes, image: Path) -> None:
    from cfsc.frontends import dumpfile

    compile_tree(dumpfile.loads(text, Options(), "test.dump"), image)


def put_object(store: Path, data: bytes) -> bytes:
    """Store `data` under its fs-verity digest; returns the payload path."""
    path = payload_path(digest_bytes(data))
    target = store / os.fsdecode(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return path


def data_image(tmp: Path) -> tuple[Path, Path, dict[str, bytes]]:
    store = tmp / "store"
    store.mkdir()
    files = {"small": b"hello\n" * 20, "big": os.urandom(3 << 20), "nodigest": b"no digest here\n" * 9,
             "flipped": b"x" * 10000, "truncated": os.urandom(9000)}
    lines = [b"/ 4096 40755 2 0 0 0 0.0 - - -"]
    for name, data in files.items():
        payload = put_object(store, data)
        digest = b"-" if name == "nodigest" else digest_bytes(data).hex().encode()
        lines.append(b"/%s %d 100644 1 0 0 0 0.0 %s - %s" % (name.encode(), len(data), payload, digest))
    image = tmp / "data.cfs"
    compile_dump(b"\n".join(lines) + b"\n", image)
    return image, store, files
