"""A directory on disk → tree, exactly as `mkcomposefs DIR IMAGE` 1.0.8 builds it (format note §9).

Per entry: `lstat` mode, uid, gid, rdev, mtime with nanoseconds (0.0 with `use_epoch`), the
xattrs of the entry itself (none with `skip_xattrs`, only `user.*` with `user_xattrs`), symlink
targets.  Regular files of 1..64 bytes are inlined; every non-empty regular file gets its
fs-verity digest and the payload `xx/yyyy…` naming it, and with `digest_store` the external
ones (65 bytes and up) are imported into that content store.  `skip_devices` drops character
and block devices (whiteouts included, as upstream).  Hard links: upstream ignores them (each
name becomes its own inode, nlink 1); `hardlinks` keeps them as one inode whose home is the name
first in depth-first name order, the name a dumpfile of the tree lists in full.

Safety: the walk never follows a symlink.  Every directory is opened relative to its parent's
descriptor with O_NOFOLLOW and checked to be the inode `lstat` saw, files are opened the same
way, and xattrs are read through `/proc/self/fd/N/NAME` without following the last component,
so swapping a directory for a symlink mid-scan cannot lead the walk out of the tree.  A file
that vanishes or changes (identity, size or mtime differ between `lstat` and the read, or the
bytes read disagree with the size) is an error naming it: never an image that lies.

Speed: the scanning thread lists and stats; a thread pool (`threads`) reads, hashes and copies
files in batches while the scan goes on (hashlib releases the GIL).  Directory descriptors are
reference-counted so a directory stays open only while it has subdirectories to open or files
to read.  Identical xattr sets are interned.  With a store, a file is copied first and the
copy hashed while the store keeps missing objects (one pass over the data fewer), and hashed
first, then copied only if missing, once objects tend to be there (`Store.expects_new`).
"""

from __future__ import annotations

import collections
import errno
import os
from concurrent.futures import Future, ThreadPoolExecutor

from cfsc.errors import InputError, UsageError
from cfsc.fsverity import digest_bytes, hash_fd, payload_path
from cfsc.options import Options
from cfsc.progress import Progress, mib
from cfsc.store import Store
from cfsc.tree import S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Inode, Tree

INLINE_MAX = 64  # LCFS_RECOMMENDED_INLINE_CONTENT_MAX: directory scans inline 1..64 bytes
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a regular file swapped for a FIFO after lstat must not hang the open.
O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
U32 = 0xFFFFFFFF
NS = 1_000_000_000
SMALL_READ = 1 << 20  # files up to this size are read with one call
BATCH_FILES = 64  # files per pool task: amortises the executor's per-task cost
BATCH_BYTES = 16 << 20
MAX_OPEN_DIRS = 256  # wait for reads to finish before holding more directories open


class _Dir:
    """An open directory.  `refs` counts what still needs `fd`: the listing, subdirectories
    to open, files to read.  Only the scanning thread changes it."""

    __slots__ = ("fd", "refs")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.refs = 1


class _File:
    """One regular file to read: where it is and what `lstat` said about it."""

    __slots__ = ("dir", "ino", "mtime_ns", "name", "node", "path", "size", "dev")

    def __init__(self, d: _Dir, name: bytes, path: bytes, node: Inode, st: os.stat_result) -> None:
        self.dir = d
        self.name = name
        self.path = path
        self.node = node
        self.size = st.st_size
        self.mtime_ns = st.st_mtime_ns
        self.dev = st.st_dev
        self.ino = st.st_ino


class _Scanner:
    def __init__(self, source, options: Options) -> None:
        self.source = os.fsdecode(source)
        self.options = options
        self.threads = max(1, options.threads)
        self.store = Store(options.digest_store) if options.digest_store else None
        self.xattr_cache: dict[tuple, tuple] = {}
        self.linked: dict[tuple[int, int], list] = {}  # (dev, ino) -> [node, [(path, parent, name)]]
        self.twins: list[tuple[Inode, Inode, bytes]] = []  # (copy, original, path) without `hardlinks`
        self.batch: list[_File] = []
        self.batch_bytes = 0
        self.inflight: collections.deque[tuple[Future, list[_File]]] = collections.deque()
        self.open_dirs: set[_Dir] = set()
        self.failed = False
        self.progress = Progress(options.progress)
        self.entries = self.files = self.files_done = 0
        self.bytes = self.bytes_done = 0
        self.proc = os.path.isdir("/proc/self/fd")  # else xattrs are read by full path

    # -- errors -----------------------------------------------------------------------------

    def where(self, path: bytes) -> str:
        if not path:
            return self.source
        return self.source.rstrip("/") + "/" + path.decode("utf-8", "backslashreplace")

    def changed(self, path: bytes, how: str) -> InputError:
        return InputError(f"{how} during the scan: the tree must not change while it is compiled", self.where(path))

    def os_error(self, e: OSError, path: bytes, doing: str) -> InputError:
        if e.errno == errno.ENOENT:
            return self.changed(path, "vanished")
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            return self.changed(path, "replaced by a symlink or other file type")
        return InputError(f"cannot {doing}: {e.strerror}", self.where(path))

    # -- the walk ---------------------------------------------------------------------------

    def run(self) -> Tree:
        try:
            fd = os.open(self.source, O_DIR)
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                raise InputError("not a directory: expected the directory to compile", self.source) from None
            raise InputError(f"cannot open: {e.strerror}", self.source) from None
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cfsc-read")
        self.pool = pool
        try:
            root = self.inode(os.fstat(fd), S_IFDIR)
            self.walk(fd, root)
            self.flush()
            while self.inflight:
                self.reap()
            if self.store is not None:
                self.store.commit()
        except BaseException:
            self.failed = True
            pool.shutdown(wait=True, cancel_futures=True)
            for d in self.open_dirs:
                os.close(d.fd)
            self.open_dirs.clear()
            if self.store is not None:
                self.store.close()
            raise
        finally:
            self.progress.close()
        pool.shutdown(wait=True)
        self.finish_links()
        return Tree(root, self.source)

    def inode(self, st: os.stat_result, ftype: int) -> Inode:
        sec, nsec = (0, 0) if self.options.use_epoch else divmod(st.st_mtime_ns, NS)
        rdev = st.st_rdev & U32 if ftype == S_IFCHR or ftype == S_IFBLK else 0
        return Inode(st.st_mode, st.st_uid, st.st_gid, sec, nsec, 0, rdev)

    def walk(self, root_fd: int, root: Inode) -> None:
        options = self.options
        skip_devices = options.skip_devices
        read_xattrs = not options.skip_xattrs
        fsencode = os.fsencode
        # (parent, name, inode, dev, ino, path) of directories still to list; parent None = root
        stack: list = [(None, b"", root, 0, 0, b"")]
        while stack:
            parent, name, node, dev, ino, path = stack.pop()
            if parent is None:
                fd = root_fd
            else:
                try:
                    fd = os.open(name, O_DIR, dir_fd=parent.fd)
                except OSError as e:
                    raise self.os_error(e, path, "open the directory") from None
                finally:
                    self.release(parent)
                st = os.fstat(fd)
                if st.st_ino != ino or st.st_dev != dev:
                    os.close(fd)
                    raise self.changed(path, "replaced")
            d = _Dir(fd)
            self.open_dirs.add(d)
            if read_xattrs:
                node.xattrs = self.xattrs(fd, path)
            try:
                entries = list(os.scandir(fd))
            except OSError as e:
                raise self.os_error(e, path, "read the directory") from None
            children = node.children
            assert children is not None
            prefix = path + b"/" if path else b""
            self.entries += len(entries)
            for entry in entries:
                bname = fsencode(entry.name)
                child_path = prefix + bname
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as e:
                    raise self.os_error(e, child_path, "stat") from None
                ftype = st.st_mode & S_IFMT
                if ftype == S_IFDIR:
                    child = self.inode(st, ftype)
                    children[bname] = child
                    d.refs += 1
                    stack.append((d, bname, child, st.st_dev, st.st_ino, child_path))
                    continue
                if skip_devices and (ftype == S_IFCHR or ftype == S_IFBLK):
                    continue
                if st.st_nlink > 1:
                    twin = self.link(st, node, bname, child_path)
                    if twin is not None:
                        children[bname] = twin
                        continue
                child = self.inode(st, ftype)
                if read_xattrs:
                    child.xattrs = self.xattrs(b"/proc/self/fd/%d/%s" % (fd, bname) if self.proc
                                               else fsencode(self.where(child_path)), child_path)
                if ftype == S_IFREG:
                    child.size = st.st_size
                    if st.st_size:
                        self.queue(_File(d, bname, child_path, child, st))
                elif ftype == S_IFLNK:
                    try:
                        target = os.readlink(bname, dir_fd=fd)
                    except OSError as e:
                        raise self.os_error(e, child_path, "read the symlink") from None
                    child.payload = target
                    child.size = len(target)
                if st.st_nlink > 1:
                    self.linked[(st.st_dev, st.st_ino)] = [child, [(child_path, node, bname)]]
                children[bname] = child
            self.release(d)
            self.progress.update(self.status)

    def link(self, st: os.stat_result, parent: Inode, name: bytes, path: bytes) -> Inode | None:
        """A further name of an inode seen before: the same `Inode` with `hardlinks`, else a
        copy whose content fields are filled from the original after reading (read once)."""
        group = self.linked.get((st.st_dev, st.st_ino))
        if group is None:
            return None
        node = group[0]
        if st.st_mode != node.mode or (node.mode & S_IFMT == S_IFREG and st.st_size != node.size):
            raise self.changed(path, "modified")
        if self.options.hardlinks:
            group[1].append((path, parent, name))
            return node
        twin = Inode(node.mode, node.uid, node.gid, node.mtime, node.mtime_nsec, node.size, node.rdev,
                     payload=node.payload, xattrs=node.xattrs)
        if node.mode & S_IFMT == S_IFREG and node.size:
            self.twins.append((twin, node, path))
        return twin

    def finish_links(self) -> None:
        for twin, node, _path in self.twins:
            twin.content = node.content
            twin.digest = node.digest
            twin.payload = node.payload
        if not self.options.hardlinks:
            return
        for node, names in self.linked.values():
            if len(names) < 2:
                continue
            names.sort(key=lambda item: item[0].split(b"/"))
            for _path, parent, name in names[1:]:
                parent.add_child(name, node, link=True)

    def xattrs(self, target: int | bytes, path: bytes) -> tuple:
        by_fd = isinstance(target, int)
        try:
            keys = os.listxattr(target) if by_fd else os.listxattr(target, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.EOPNOTSUPP:
                return ()  # a file system without xattrs
            raise self.os_error(e, path, "list xattrs") from None
        if not keys:
            return ()
        if self.options.user_xattrs:
            keys = [k for k in keys if k.startswith("user.")]
        items = []
        for key in keys:
            try:
                value = os.getxattr(target, key) if by_fd else os.getxattr(target, key, follow_symlinks=False)
            except OSError as e:
                if e.errno == errno.ENODATA:
                    raise self.changed(path, f"xattr {key} removed") from None
                raise self.os_error(e, path, f"read xattr {key}") from None
            items.append((os.fsencode(key), value))
        items.sort()
        xattrs = tuple(items)
        return self.xattr_cache.setdefault(xattrs, xattrs)

    def status(self) -> str:
        return (f"scanned {self.entries} entries; read {self.files_done}/{self.files} files, "
                f"{mib(self.bytes_done)}/{mib(self.bytes)}")

    # -- reading files in the pool ----------------------------------------------------------

    def queue(self, job: _File) -> None:
        job.dir.refs += 1
        self.batch.append(job)
        self.files += 1
        self.bytes += job.size
        self.batch_bytes += job.size
        if len(self.batch) >= BATCH_FILES or self.batch_bytes >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.batch:
            self.inflight.append((self.pool.submit(self.read_batch, self.batch), self.batch))
            self.batch = []
            self.batch_bytes = 0
        while self.inflight and (self.inflight[0][0].done() or len(self.inflight) > 2 * self.threads
                                 or len(self.open_dirs) > MAX_OPEN_DIRS):
            self.reap()

    def reap(self) -> None:
        future, batch = self.inflight.popleft()
        future.result()  # re-raises the worker's error
        for job in batch:
            self.release(job.dir)
            self.bytes_done += job.size
        self.files_done += len(batch)
        self.progress.update(self.status)

    def release(self, d: _Dir) -> None:
        d.refs -= 1
        if not d.refs:
            self.open_dirs.discard(d)
            os.close(d.fd)

    def read_batch(self, batch: list[_File]) -> None:
        for job in batch:
            if self.failed:
                return
            self.read(job)

    def read(self, job: _File) -> None:
        try:
            fd = os.open(job.name, O_FILE, dir_fd=job.dir.fd)
        except OSError as e:
            raise self.os_error(e, job.path, "open") from None
        try:
            st = os.fstat(fd)
            if (st.st_ino != job.ino or st.st_dev != job.dev or st.st_size != job.size
                    or st.st_mtime_ns != job.mtime_ns):
                raise self.changed(job.path, "replaced or modified")
            size = job.size
            content = None
            store = self.store
            if store is not None and size > INLINE_MAX and store.expects_new():
                # Copy first, hash the copy: the digest names exactly the bytes stored.
                digest = store.import_fd(fd, None, self.where(job.path))
                store = None
            elif size <= SMALL_READ:
                data = os.read(fd, size + 1)
                if len(data) != size:
                    data += self.read_rest(fd, size + 1 - len(data))
                if len(data) != size:
                    raise self.changed(job.path, "modified (its size changed)")
                digest = digest_bytes(data)
                if size <= INLINE_MAX:
                    content = data
            else:
                digest = self.digest_large(fd, job)
            st = os.fstat(fd)
            if st.st_size != job.size or st.st_mtime_ns != job.mtime_ns:
                raise self.changed(job.path, "modified")
            if store is not None and content is None:
                store.import_fd(fd, digest, self.where(job.path))
        except OSError as e:
            raise self.os_error(e, job.path, "read") from None
        finally:
            os.close(fd)
        node = job.node
        node.digest = digest
        node.payload = payload_path(digest)
        node.content = content

    @staticmethod
    def read_rest(fd: int, limit: int) -> bytes:
        parts = []
        while limit > 0:
            part = os.read(fd, limit)
            if not part:
                break
            parts.append(part)
            limit -= len(part)
        return b"".join(parts)

    def digest_large(self, fd: int, job: _File) -> bytes:
        digest, size = hash_fd(fd)
        if size != job.size:
            raise self.changed(job.path, "modified (its size changed)")
        return digest

def load(source, options: Options | None = None) -> Tree:
    options = options or Options()
    if options.skip_xattrs and options.user_xattrs:
        raise UsageError("--skip-xattrs and --user-xattrs conflict: give one of them", "--user-xattrs")
    return _Scanner(source, options).run()
