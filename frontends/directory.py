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
descriptor with O_NOFOLLOW and checked to be the inode `lstat` saw; regular files are opened
by `cfsc.base.beneath.open_listed` (a FIFO swapped in neither hangs us nor is read) and described by
`fstat` of the very descriptor they are read from; other entries' xattrs are read through
`/proc/self/fd/N/NAME` without following the last component.  So swapping a directory for a
symlink mid-scan cannot lead the walk out of the tree.  A file that vanishes or changes
(size or mtime differ before and after reading it, the bytes read disagree with the size, or
it is no longer a regular file) is an error naming it: never an image that lies.  The limits
composefs sets (`cfsc.base.limits`) are enforced as entries are read, with the validation
pass's messages, so the tree comes `checked` and that pass skips its walk.

Speed: the scanning process lists directories and stats what is not a regular file (readdir's
d_type tells); regular files go in batches, with their directories' descriptors, to forked
worker processes (`directory_workers`, `threads` of them) that open, stat, read, hash and
stage them into the store while the scan goes on, truly in parallel (no GIL shared).  In a
process that already runs other threads (forking it is unsafe), or that cannot fork, a thread
pool takes the same batches instead: the reference route, tested equal.  Both routes read
every file with `directory_workers.FileReader` (one read path, one set of checks) and hand
back the same results, which this process alone turns into inodes and store objects
(`fill_in`).  Directory descriptors are reference-counted so a
directory stays open only while it has subdirectories to open or files to hand out.  Identical
xattr sets are interned.  A file under `WHOLE_READ` is read once, into its reader's reused
buffer, hashed there and, with a store that lacks it, written into the store from there: one
read in every store mode.  A bigger file is streamed through its reader in chunks; with a
store, it is copied first and the copy hashed while the store keeps missing objects, and
hashed first, then copied only if missing, once objects tend to be there (`Store.expects_new`).

Where the time goes (`bench/dir_profile.py`; `/usr`, 118k files, 5.9 GB, warm, 2 cores): the
walk is bound by the workers all along (the main process waits for their replies), 7.1 s of
worker CPU beside 0.9 s of the main process's; then the passes (0.4 s) and the writer (0.8 s)
run on one core.  Of the workers' CPU, 4.4 s is the floor of hashing from Python: fs-verity
needs 1.57M SHA-256 calls of 4 KiB, 2.77 us each as one call per block (2.34 us of it SHA-NI
streaming, the rest hashlib's per-call cost); the other 2.7 s is per file (open, fstat before
and after, flistxattr, read, close, the copy out of the page cache, Python, the replies).  Even
with no per-file cost, (4.4 + 0.9) / 2 + 1.2 = 3.9 s of wall, more than 0.6x mkcomposefs'
5.8 s: what would move the floor is the serial tail (the writer overlapping the hashing, or
faster), a native multi-block hasher (0.7 s of CPU), or more cores.  Hashing `mmap`ed files
instead of reading them (no copy) was measured and dropped: 1.28x the CPU (median of 5
interleaved runs over half of the files of 64 KiB to 64 MiB), the SHA loads missing the
caches and the TLB where a read into a reused buffer hands them warm data.
"""

from __future__ import annotations

import collections
import errno
import os
import sys
import threading

from cfsc.base import forked, limits
from cfsc.base.errors import CfscError, InputError, TreeError, UsageError
from cfsc.base.fsverity import algorithm_named, payload_path, short_gil_switches
from cfsc.base.options import Options
from cfsc.base.progress import Progress, mib
from cfsc.base.tree import S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Inode, Tree
from cfsc.frontends.directory_workers import (
    FileReader,
    Refused,
    WorkerDied,
    Workers,
    discard_staged,
    read_xattrs,
    refusal,
)
from cfsc.store.objects import Store, loaded, open_store

TYPE_CHECKING = False  # typing's, without importing typing (start-up); type checkers read it as True
if TYPE_CHECKING:  # concurrent.futures (with logging, traceback, tokenize) is imported for the thread pool only
    from concurrent.futures import Future

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
U32 = 0xFFFFFFFF
NAME_MAX, PATH_MAX = limits.NAME_MAX, limits.PATH_MAX
NS = 1_000_000_000
WHOLE_READ = 8 << 20  # files smaller than this are read with one call into a reused buffer
BATCH_FILES = 32  # files per pool task or worker message: amortises the per-batch cost
_FAST_ENCODE = sys.getfilesystemencoding() == "utf-8" and sys.getfilesystemencodeerrors() == "surrogateescape"
MAX_OPEN_DIRS = 256  # wait for reads to finish before holding more directories open
# Hash in forked worker processes (`directory_workers`): "auto" where that is safe (no other
# thread runs in this process), else in the thread pool, the reference path.  Tests pin one.
WORKERS = "auto"


def _fork_safe() -> bool:
    if WORKERS != "auto":
        return WORKERS == "processes"
    # (/proc: a worker reads an unreadable file's xattrs through /proc/self/fd, knowing no path)
    return forked.safe() and os.path.isdir("/proc/self/fd")


class _Dir:
    """An open directory.  `refs` counts what still needs `fd`: the listing, subdirectories
    to open, files to read.  Only the scanning thread changes it."""

    __slots__ = ("fd", "refs")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.refs = 1


class _Scanner:
    def __init__(self, source, options: Options) -> None:
        self.source = os.fsdecode(source)
        self.options = options
        self.algorithm = algorithm_named(options.hash)
        self.threads = max(1, options.threads)
        self.store: Store | None = None
        self.xattr_cache: dict[tuple, tuple] = {}
        self.read_xattrs = not options.skip_xattrs
        # With `hardlinks`: ((dev, ino), path, parent, name, node) of every entry with nlink > 1.
        self.multi: list[tuple[tuple[int, int], bytes, Inode, bytes, Inode]] = []
        self.open_dirs: set[_Dir] = set()
        self.failed = False
        self.progress = Progress(options.progress)
        self.entries = self.files = self.files_done = 0
        self.bytes_done = 0
        self.proc = os.path.isdir("/proc/self/fd")  # else xattrs are read by full path
        self.workers: Workers | None = None  # the worker processes, when hashing in them
        self.pool = None  # else the thread pool, each thread with its own `FileReader` (`local`)
        self.local = threading.local()
        # The batch being made: (node, parent, name, path) per file, what its reader gets
        # ((directory index, name) per file), and the batch's directories.
        self.files_batch: list[tuple[Inode, Inode, bytes, bytes]] = []
        self.items: list[tuple[int, bytes]] = []
        self.batch_dirs: dict[_Dir, int] = {}
        self.sent: dict[int, list[tuple[Inode, Inode, bytes, bytes]]] = {}  # batches the workers have, by id
        self.batch_id = 0
        # Batches in the pool: (future of the results, the batch, its directories, open till then)
        self.inflight: collections.deque[tuple[Future, list, list[_Dir]]] = collections.deque()

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
        if self.options.digest_store:
            try:
                self.store = open_store(self.options)
            except BaseException:
                os.close(fd)
                raise
        try:
            if _fork_safe():
                if self.store is not None:
                    self.store.hold()  # the workers share this process's lease
                try:
                    self.workers = Workers(self.threads, self.reader())
                except OSError as e:  # no process to be had (a process limit, no memory to copy this one)
                    if self.options.progress:
                        sys.stderr.write(f"cfsc: reading files in threads: cannot start hashing worker processes"
                                         f" ({e.strerror})\n")
            if self.workers is not None:
                root = self.inode(os.fstat(fd))
                self.walk(fd, root)
                self.send()
                while self.workers.busy():
                    self.take(block=True)
                self.workers.close(self.unread)
            else:
                from concurrent.futures import ThreadPoolExecutor

                self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cfsc-read")
                with short_gil_switches():  # the workers' hashing overlaps the scan
                    root = self.inode(os.fstat(fd))
                    self.walk(fd, root)
                    self.send()
                    while self.inflight:
                        self.reap()
            if self.store is not None:
                loaded(self.store, self.options)
        except BaseException:
            self.failed = True
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
                for future, _batch, _dirs in self.inflight:  # nobody adopts what these staged now
                    if not future.cancelled() and future.exception() is None:
                        self.unread(future.result())
                self.inflight.clear()
            if self.workers is not None:
                self.workers.close(self.unread)
                if self.store is not None:
                    self.workers.remove_leftovers(self.store)
            for d in self.open_dirs:
                os.close(d.fd)
            self.open_dirs.clear()
            if self.store is not None:
                self.store.close()
            raise
        finally:
            self.progress.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.finish_links()
        tree = Tree(root, self.source)
        tree.checked = True  # every limit was enforced here (`limit`): the validation pass skips its walk
        return tree

    def inode(self, st: os.stat_result) -> Inode:
        node = Inode(st.st_mode)
        self.set_stat(node, st)
        return node

    def set_stat(self, node: Inode, st: os.stat_result) -> None:
        node.mode = mode = st.st_mode
        node.uid = st.st_uid
        node.gid = st.st_gid
        if not self.options.use_epoch:
            node.mtime, node.mtime_nsec = divmod(st.st_mtime_ns, NS)
        if mode & S_IFMT == S_IFCHR or mode & S_IFMT == S_IFBLK:
            node.rdev = st.st_rdev & U32

    def walk(self, root_fd: int, root: Inode) -> None:
        options = self.options
        skip_devices = options.skip_devices
        hardlinks = options.hardlinks
        read_xattrs = self.read_xattrs
        fsencode = os.fsencode
        if _FAST_ENCODE:  # os.fsencode's own encoding, without its Python-level checks per name
            def fsencode(name: str, encode=str.encode) -> bytes:
                return encode(name, "utf-8", "surrogateescape")
        queue = self.queue
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
                if len(bname) > NAME_MAX:  # (a file system whose names may be longer than composefs')
                    raise self.limit(limits.check_name(bname), child_path)
                try:
                    if entry.is_file(follow_symlinks=False):
                        # A regular file (by d_type): a worker stats it through the descriptor
                        # it reads it with, which is one lstat less, and off this thread.
                        child = children[bname] = Inode(S_IFREG)
                        queue(d, bname, child_path, child, node)
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError as e:
                    raise self.os_error(e, child_path, "stat") from None
                ftype = st.st_mode & S_IFMT
                if ftype == S_IFDIR:
                    child = children[bname] = self.inode(st)
                    d.refs += 1
                    stack.append((d, bname, child, st.st_dev, st.st_ino, child_path))
                    continue
                if ftype == S_IFREG:  # d_type said otherwise a moment ago: let a worker look
                    child = children[bname] = Inode(S_IFREG)
                    queue(d, bname, child_path, child, node)
                    continue
                if skip_devices and (ftype == S_IFCHR or ftype == S_IFBLK):
                    continue
                child = children[bname] = self.inode(st)
                if read_xattrs:
                    child.xattrs = self.xattrs(self.path_at(fd, bname, child_path), child_path)
                if ftype == S_IFLNK:
                    try:
                        target = os.readlink(bname, dir_fd=fd)
                    except OSError as e:
                        raise self.os_error(e, child_path, "read the symlink") from None
                    if len(target) >= PATH_MAX:
                        raise self.limit(limits.check_symlink(target), child_path)
                    child.payload = target
                    child.size = len(target)
                if hardlinks and st.st_nlink > 1:
                    self.multi.append(((st.st_dev, st.st_ino), child_path, node, bname, child))
            self.release(d)
            self.progress.update(self.status)

    def path_at(self, fd: int, name: bytes, path: bytes) -> bytes:
        """A path to `name` in the directory open at `fd` that resolves through that descriptor
        (so no symlink swapped into the tree above it is followed)."""
        return b"/proc/self/fd/%d/%s" % (fd, name) if self.proc else self.source_path(path)

    def source_path(self, path: bytes) -> bytes:
        """`path` under the source, as bytes (`where` is for messages: it escapes what is not
        UTF-8, so it would name another file)."""
        return os.fsencode(self.source).rstrip(b"/") + b"/" + path if path else os.fsencode(self.source)

    def finish_links(self) -> None:
        """`hardlinks`: the names of one inode become one `Inode`, homed at the name first in
        depth-first name order.  (Each name was read on its own, as mkcomposefs reads them.)"""
        groups: dict[tuple[int, int], list] = {}
        for key, path, parent, name, node in self.multi:
            groups.setdefault(key, []).append((path.split(b"/"), parent, name, node, path))
        for names in groups.values():
            if len(names) < 2:
                continue
            names.sort(key=lambda item: item[0])
            home = names[0][3]
            for _parts, parent, name, node, path in names[1:]:
                if (node.mode, node.size, node.digest, node.payload) != (home.mode, home.size, home.digest, home.payload):
                    raise self.changed(path, "modified (its hard links differ)")
                parent.add_child(name, home, link=True)

    def xattrs(self, target: int | bytes, path: bytes) -> tuple:
        try:
            xattrs = read_xattrs(target, self.options.user_xattrs)
        except Refused as e:
            raise self.refused(e.reply, path) from None
        if not xattrs:
            return xattrs
        return self.xattr_cache.get(xattrs) or self.intern(xattrs, path)

    def intern(self, xattrs: tuple, path: bytes) -> tuple:
        """A set of xattrs not seen before: checked against the limits once, then shared."""
        problem = limits.xattrs_problem(xattrs)
        if problem:
            raise self.limit(problem, path)
        self.xattr_cache[xattrs] = xattrs
        return xattrs

    # The limits of `cfsc.base.limits` that a directory can break, enforced while it is read
    # (the rest hold by construction: the kernel's file types, 64-bit times, names without
    # '/' or NUL, inline content of 1..64 bytes, payloads that name digests), so that the
    # validation pass need not walk the tree again (`Tree.checked`).  Its messages and paths.

    def limit(self, problem: str, path: bytes) -> TreeError:
        return TreeError(problem, b"/" + path, self.source)

    def refused(self, reply: tuple, path: bytes) -> CfscError:
        """The located error for a refusal (`directory_workers.refusal`) of the entry at `path`."""
        if reply[0] == "limit":
            return self.limit(reply[1], path)
        return refusal(reply, self.where(path), lambda how: self.changed(path, how),
                       lambda e, doing: self.os_error(e, path, doing))

    def status(self) -> str:
        return f"scanned {self.entries} entries; read {self.files_done}/{self.files} files, {mib(self.bytes_done)}"

    # -- reading files: in batches, by a `FileReader` in a worker process or a pool thread --------

    def queue(self, d: _Dir, name: bytes, path: bytes, node: Inode, parent: Inode) -> None:
        index = self.batch_dirs.get(d)
        if index is None:
            index = self.batch_dirs[d] = len(self.batch_dirs)
            d.refs += 1  # until the batch is sent with its descriptor (to a worker), or read (in the pool)
        self.items.append((index, name))
        self.files_batch.append((node, parent, name, path))
        if len(self.items) >= BATCH_FILES:
            self.send()

    def send(self) -> None:
        """Hand the batch to a worker, with the descriptors of its directories (the worker
        gets its own: these can be closed as soon as it is sent), or to the pool."""
        if self.workers is None:
            self.submit()
            return
        workers = self.workers
        if self.items:
            while (w := workers.idle()) is None:
                self.take(block=True)
            self.batch_id += 1
            try:
                workers.send(w, self.batch_id, [d.fd for d in self.batch_dirs], self.items)
            except WorkerDied as e:
                raise InputError(f"cannot read files: a hashing worker process died ({e.strerror})",
                                 self.source) from None
            self.sent[self.batch_id] = self.files_batch
            self.files += len(self.items)
            for d in self.batch_dirs:
                self.release(d)
            self.files_batch, self.items, self.batch_dirs = [], [], {}
        self.take(block=False)

    # -- in the pool ------------------------------------------------------------------------

    def reader(self) -> FileReader:
        return FileReader(self.algorithm, self.options, self.store, WHOLE_READ, self.proc)

    def submit(self) -> None:
        if self.items:
            dirs = list(self.batch_dirs)
            future = self.pool.submit(self.read_batch, [d.fd for d in dirs], self.items)
            self.inflight.append((future, self.files_batch, dirs))
            self.files += len(self.items)
            self.files_batch, self.items, self.batch_dirs = [], [], {}
        while self.inflight and (self.inflight[0][0].done() or len(self.inflight) > 2 * self.threads
                                 or len(self.open_dirs) > MAX_OPEN_DIRS):
            self.reap()

    def read_batch(self, fds: list[int], items: list) -> list:
        """In a pool thread: the batch read by this thread's own reader (its own buffer)."""
        reader = getattr(self.local, "reader", None)
        if reader is None:
            reader = self.local.reader = self.reader()
        return reader.batch(fds, items, self.has_failed)

    def has_failed(self) -> bool:
        """(A pool thread stops at the next file once the run has failed.)"""
        return self.failed

    def reap(self) -> None:
        """Fill in the inodes of the pool's oldest batch (waiting for it)."""
        future, batch, dirs = self.inflight.popleft()
        try:
            self.fill_in(batch, future.result())
        finally:
            for d in dirs:
                self.release(d)
        self.progress.update(self.status)

    # -- from worker processes --------------------------------------------------------------

    def take(self, block: bool) -> None:
        """Fill in the inodes of the batches the workers answered."""
        try:
            replies = self.workers.replies(block)
        except WorkerDied:
            raise InputError("cannot read files: a hashing worker process died", self.source) from None
        for n, (batch_id, results) in enumerate(replies):
            try:
                self.fill_in(self.sent.pop(batch_id), results)
            except BaseException:
                for _batch_id, later in replies[n + 1:]:
                    self.unread(later)  # their staged temp files go too
                raise
        if replies:
            self.progress.update(self.status)

    def fill_in(self, batch: list, results: list) -> None:
        """One answered batch: each file's inode filled in, its staged object adopted."""
        use_epoch, hardlinks = self.options.use_epoch, self.options.hardlinks
        store, cache, multi = self.store, self.xattr_cache, self.multi
        reused = []  # digests the workers found in the store: `Store.found` takes them at once
        for i, result in enumerate(results):
            try:
                node, parent, name, path = batch[i]
                if type(result[0]) is str:
                    raise self.refused(result, path)
                mode, uid, gid, mtime_ns, size, nlink, dev, ino, xattrs, digest, content, staged, found = result
                node.mode = mode
                node.uid = uid
                node.gid = gid
                if not use_epoch:
                    node.mtime, node.mtime_nsec = divmod(mtime_ns, NS)
                node.size = size
                if xattrs:
                    node.xattrs = cache.get(xattrs) or self.intern(xattrs, path)
                elif xattrs is None:  # an unreadable (empty) file in a process without /proc
                    node.xattrs = self.xattrs(self.source_path(path), path)
                if hardlinks and nlink > 1:
                    multi.append(((dev, ino), path, parent, name, node))
                if digest is not None:
                    node.digest = digest
                    node.payload = payload_path(digest)
                    node.content = content
                    if staged is not None:
                        store.adopt(*staged, digest, size)
                    elif found:
                        reused.append(digest)
                self.bytes_done += size
            except BaseException:
                self.unread(results[i + 1:])  # nobody adopts these now
                raise
        if reused:
            store.found(reused)
        self.files_done += len(batch)

    def unread(self, results: list) -> None:
        """Failing: the temp files a worker staged for results nobody will adopt go."""
        discard_staged(self.store, results)

    def release(self, d: _Dir) -> None:
        d.refs -= 1
        if not d.refs:
            self.open_dirs.discard(d)
            os.close(d.fd)


def load(source, options: Options | None = None) -> Tree:
    options = options or Options()
    if options.skip_xattrs and options.user_xattrs:
        raise UsageError("--skip-xattrs and --user-xattrs conflict: give one of them", "--user-xattrs")
    return _Scanner(source, options).run()
