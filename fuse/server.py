"""The FUSE protocol server: requests from `/dev/fuse`, answered from an `ImageView`.

Several worker threads share the device fd; each `read()` returns one whole request, and
the reply is one `write()`.  One worker at a time reads requests and answers the quick ones
itself (no hand-over between threads per request); before one that may block — hashing or
reading a large backing file, waiting for another worker's opening — it lets the next worker
read (`_let_go`).  Device reads, `pread` and hashing release the GIL, so a thread stuck on
cold data or a long digest does not stop the others.  While no request waits, the reading
worker encodes the directory listings a walk will ask for next (`_read_ahead`).

The image is immutable, so the kernel is told to cache everything for `TTL` seconds:
entries (negative ones too), attributes, symlink targets (`FUSE_CACHE_SYMLINKS`), file pages
(`FOPEN_KEEP_CACHE`) and whole directory streams (`FOPEN_CACHE_DIR`).  Listings come as
READDIRPLUS, so `find` needs no LOOKUP per entry.  OPENDIR — and OPEN, unless passthrough
needs it — is answered ENOSYS once, after which the kernel opens and releases by itself
with those cache flags ("zero-message open"): a warm walk or read sends no request at all.
Node ids are the image's nids + 2 (the root is FUSE's 1): stable, never reused, so FORGET
needs no bookkeeping.

External data goes through FUSE passthrough when the kernel offers it (7.40+) and we hold
CAP_SYS_ADMIN: the backing file is registered with `FUSE_DEV_IOC_BACKING_OPEN` and the
kernel reads it directly, page cache and all.  Otherwise reads are `pread` + `writev`.  A
backing file whose size is not the image's is never passed through (`_passable`): both ways
serve the same bytes.
A small backing file is read once, verified from those bytes and served from them until its
last RELEASE (`Store.open_read`); read without an open (zero-message open), it is opened,
read, verified and closed within its READ (`_read_small`), nothing kept.
A file opened by OPEN, or a large one, is opened and verified once and then kept (`Held`)
for the next use, shared by all concurrent opens of its inode (passthrough requires one
backing id per inode), and let go only when it is among the oldest unused ones — never
right after an OPEN reply, while the kernel may still be setting the file up.  Before each
new use it is checked again, which costs an fstat unless it was written to.

Errors: a refusal with a reason (a corrupt image, a missing, escaping or tampered object)
is logged once per distinct message and answered with its errno (usually EIO); anything
unexpected is logged and answered EIO, and the server keeps going.  INTERRUPT cancels a
digest computation in progress (EINTR); other requests finish too quickly to bother.
Unmounting makes `read()` fail with ENODEV, which ends every worker.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import stat
import sys
import threading
import time
from bisect import bisect_right
from collections.abc import Iterator

from cfsc.base.errors import CfscError
from cfsc.base.limits import NAME_MAX
from cfsc.base.syscalls import has_cap_sys_admin
from cfsc.fuse import protocol as P
from cfsc.fuse.view import BLOCK_SIZE, STREAM_ENTRIES, TRUSTED, ImageView, Node
from cfsc.store.backing import Cancelled, Store

log = logging.getLogger("cfsc.fuse")

TTL = 86400  # seconds the kernel may cache entries and attributes: the image never changes
MAX_PAGES = 256  # 1 MiB per READ
MAX_WRITE = 1 << 17  # never used (read-only), but sizes the kernel's buffer check
BUFFER_SIZE = MAX_WRITE + 4096
DT_UNKNOWN = 0
LOGGED_MAX = 1000  # distinct log messages remembered (to log each once)
IDLE_BACKING = 512  # backing files kept open (or registered) after their last RELEASE
SERVED_FROM_MEMORY = 1 << 17  # a file up to this size is read once, verified, served from memory
STREAMS_KEPT = 64  # encoded directory streams kept (`_encoded`)
AHEAD_ENCODED = 32  # streams encoded ahead of the walk and not yet asked for, at most
AHEAD_PENDING = 4096  # directories queued to be encoded ahead, at most (the newest kept)
AHEAD_ENTRIES = 4096  # a larger directory is encoded when asked for, not ahead
AHEAD_BATCH = 8  # entries prepared ahead between two looks for a waiting request
# (`view.STREAM_ENTRIES`: a larger directory is encoded page by page as asked; its whole
# stream, ~200 bytes an entry with READDIRPLUS and twice that while joined, is not held)
DT_DIR = stat.S_IFDIR >> 12

_pack_out = P.OUT_HEADER.pack
_pack_entry = P.ENTRY_OUT.pack
_pack_dirent = P.DIRENT.pack
_unpack_in = P.IN_HEADER.unpack_from
NEGATIVE_ENTRY = _pack_entry(0, 0, TTL, 0, 0, 0, *([0] * len(P.ATTR.fields)))
NO_ENTRY = bytes(P.ENTRY_OUT.size)  # readdirplus: "no attributes for this name"
ATTR_PREFIX = P.ATTR_OUT.pack(TTL, 0)
PADS = [b"\0" * n for n in range(8)]
assert BLOCK_SIZE == 4096  # `_wire` computes st_blocks with shifts


class Held:
    """The backing file of one inode, shared by all its opens: an fd (to pread from, and to
    check again) and, with passthrough, its backing id.  Kept a while after the last
    RELEASE (`IDLE_BACKING`), so opening a file again costs no lookup, no registration and,
    unless the file was written to meanwhile, no digest."""

    __slots__ = ("fd", "backing_id", "opens", "data")

    def __init__(self, fd: int, backing_id: int | None, data: bytes | None = None) -> None:
        self.fd = fd
        self.backing_id = backing_id
        self.opens = 1
        self.data = data  # a small file's content as verified, served until the last RELEASE


class Server:
    """Serves one mounted connection (`start`) until it ends (`done`), then `close`."""

    def __init__(self, fd: int, view: ImageView, store: Store, *, threads: int = 2,
                 passthrough: bool = True, source: str = "", debug: bool = False) -> None:
        self.fd = fd
        self.view = view
        self.store = store
        self.threads = max(1, threads)
        self.want_passthrough = passthrough
        self.passthrough = False
        self.source = source or view.image.name
        self.minor = 0
        self.no_opendir = False
        self.no_open = False
        self.ready = threading.Event()  # INIT answered
        self.done = threading.Event()  # a worker saw the end of the connection
        self._root_nid = view.root_nid
        self._held: dict[int, Held] = {}  # nid -> its backing file (fh = nid + 1)
        self._idle: dict[int, Held] = {}  # the held ones nobody has open, oldest first
        self._streams: dict[int, tuple[bytes, list[int]]] = {}  # nid*2+plus -> `_encoded`
        self._ahead: list[int] = []  # directories a walk lists next (nid*2+plus), the next last
        self._unasked: set[int] = set()  # streams encoded ahead that no request has asked for yet
        self._reading = threading.Lock()  # held by the worker reading requests (`_let_go`)
        self._local = threading.local()  # .reading: this worker holds `_reading`
        self._pending: dict[int, threading.Event | None] = {}  # nid being opened -> set when done
        self._lock = threading.Lock()
        self._interrupted: set[int] = set()
        self._logged: set[str] = set()
        self._workers: list[threading.Thread] = []
        h = [self._enosys] * 64
        for op in P.MODIFYING:
            h[op] = self._erofs
        for op, fn in ((P.Opcode.INIT, self._init), (P.Opcode.LOOKUP, self._lookup),
                       (P.Opcode.FORGET, self._no_reply), (P.Opcode.BATCH_FORGET, self._no_reply),
                       (P.Opcode.GETATTR, self._getattr), (P.Opcode.READLINK, self._readlink),
                       (P.Opcode.OPEN, self._open), (P.Opcode.READ, self._read),
                       (P.Opcode.RELEASE, self._release), (P.Opcode.OPENDIR, self._opendir),
                       (P.Opcode.READDIR, self._readdir), (P.Opcode.READDIRPLUS, self._readdirplus),
                       (P.Opcode.RELEASEDIR, self._ok), (P.Opcode.STATFS, self._statfs),
                       (P.Opcode.GETXATTR, self._getxattr), (P.Opcode.LISTXATTR, self._listxattr),
                       (P.Opcode.INTERRUPT, self._interrupt), (P.Opcode.DESTROY, self._destroy)):
            h[op] = fn
        self._handlers = [_traced(i, fn) for i, fn in enumerate(h)] if debug else h

    # -- running --------------------------------------------------------------------------

    def start(self) -> None:
        for i in range(self.threads):
            t = threading.Thread(target=self._worker, name=f"fuse-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the connection ends and every worker has stopped (True) or `timeout`
        passes (False).  Only then may the caller close the device fd: a worker still about to
        read would otherwise read from whatever the fd number is reused for (the next mount's
        INIT, taken by a server that no longer answers)."""
        end = None if timeout is None else time.monotonic() + timeout
        if not self.done.wait(timeout):
            return False
        for t in self._workers:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
            if t.is_alive():
                return False
        return True

    def _worker(self) -> None:
        fd = self.fd
        buf = bytearray(BUFFER_SIZE)
        view = memoryview(buf)
        handlers = self._handlers
        readv = os.readv
        reading = self._reading
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poll = poller.poll
        local = self._local
        local.reading = False
        try:
            while True:
                if not local.reading:  # (let go of for a slow request: wait for our turn)
                    reading.acquire()
                    local.reading = True
                    if self.done.is_set():  # another worker saw the end meanwhile
                        break
                try:
                    if self._ahead:
                        self._read_ahead(poll)
                    n = readv(fd, [buf])
                except OSError as e:
                    if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                        continue  # interrupted before we read it, or a spurious wakeup
                    if e.errno not in (errno.ENODEV, errno.EBADF, errno.ECONNABORTED):
                        log.error("reading /dev/fuse: %s", e.strerror)
                    break
                if n < P.IN_HEADER.size:
                    if n == 0:  # end of file: only a test's socket does that
                        break
                    continue
                length, opcode, unique, nodeid, uid, gid, pid, _ext = _unpack_in(buf)
                try:
                    handlers[opcode if opcode < 64 else 0](unique, nodeid, view[P.IN_HEADER.size:n], pid)
                except OSError as e:
                    self._failed(unique, e)
                except Cancelled:
                    self._error(unique, errno.EINTR)
                except Exception as e:  # a bug: keep serving, say what happened
                    self._log(f"{self.source}: internal error answering {_opname(opcode)}: "
                              f"{type(e).__name__}: {e}")
                    self._error(unique, errno.EIO)
                if self.done.is_set():
                    break
        finally:
            self._let_go()  # the others see the end too
        self.done.set()

    def _let_go(self) -> None:
        """Let another worker take the next requests: called before a request may block
        (hashing or reading a large backing file, waiting for another worker's opening).
        Quick requests are answered by the worker that read them, which then reads the
        next: no hand-over between threads, no GIL convoy, per request."""
        local = self._local
        if getattr(local, "reading", False):
            local.reading = False
            self._reading.release()

    def _failed(self, unique: int, e: OSError) -> None:
        self._failed_quietly(e)
        self._error(unique, e.errno if e.errno else errno.EIO)

    def _failed_quietly(self, e: OSError) -> None:
        """Log an error that does not fail the request it happened in."""
        if isinstance(e, CfscError):
            self._log(str(e))

    def _log(self, message: str) -> None:
        if message in self._logged:
            return
        if len(self._logged) < LOGGED_MAX:
            self._logged.add(message)
        log.error("%s", message)

    # -- replies --------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        try:
            os.write(self.fd, data)
        except OSError as e:
            self._write_failed(e)

    def _write_failed(self, e: OSError) -> None:
        if e.errno == errno.ENOENT:
            return  # the request was interrupted and the kernel no longer waits
        if e.errno in (errno.ENODEV, errno.EBADF):
            self.done.set()
            return
        log.error("replying on /dev/fuse: %s", e.strerror)

    def _reply(self, unique: int, payload: bytes = b"") -> None:
        self._send(_pack_out(16 + len(payload), 0, unique) + payload)

    def _error(self, unique: int, code: int) -> None:
        self._send(_pack_out(16, -code, unique))

    def _ok(self, unique, nodeid, body, pid) -> None:
        self._reply(unique)

    def _no_reply(self, unique, nodeid, body, pid) -> None:
        pass

    def _enosys(self, unique, nodeid, body, pid) -> None:
        self._error(unique, errno.ENOSYS)

    def _erofs(self, unique, nodeid, body, pid) -> None:
        self._error(unique, errno.EROFS)

    # -- nodes ----------------------------------------------------------------------------

    def _node(self, nodeid: int) -> Node:
        node = self.view.node(self._root_nid if nodeid == P.ROOT_ID else nodeid - 2)
        if node is None:
            raise OSError(errno.ENOENT, "whiteout")
        return node

    def _wire(self, node: Node) -> bytes:
        """fuse_entry_out of a node, encoded once."""
        w = node.wire
        if w is None:
            nid = node.nid
            t = node.mtime
            ns = node.mtime_nsec
            size = node.size  # st_blocks below: 512-byte units of whole 4 KiB blocks
            w = node.wire = _pack_entry(
                P.ROOT_ID if nid == self._root_nid else nid + 2, 0, TTL, TTL, 0, 0,
                nid, size, (size + 4095) >> 12 << 3, t, t, t, ns, ns, ns, node.mode, node.nlink,
                node.uid, node.gid, node.rdev, BLOCK_SIZE, 0)
        return w

    def _where(self, node: Node) -> str:
        return f"{self.source}:{self.view.path(node).decode('utf-8', 'backslashreplace')}"

    # -- INIT -----------------------------------------------------------------------------

    def _init(self, unique, nodeid, body, pid) -> None:
        major, minor, max_readahead, flags = P.INIT_IN.unpack_from(body)
        if major > P.KERNEL_VERSION:  # the kernel will ask again with our major
            self._reply(unique, P.INIT_OUT.pack(P.KERNEL_VERSION, P.KERNEL_MINOR_VERSION,
                                                *([0] * (len(P.INIT_OUT.fields) - 2))))
            return
        if major < P.KERNEL_VERSION or minor < P.OLDEST_MINOR_VERSION:
            log.error("the kernel speaks FUSE %d.%d; at least %d.%d is needed", major, minor,
                      P.KERNEL_VERSION, P.OLDEST_MINOR_VERSION)
            self._error(unique, errno.EPROTO)
            self.done.set()
            return
        if flags & P.FUSE_INIT_EXT and len(body) >= P.INIT_IN.size + P.INIT_IN_FLAGS2.size:
            flags |= P.INIT_IN_FLAGS2.unpack_from(body, P.INIT_IN.size)[0] << 32
        self.minor = min(minor, P.KERNEL_MINOR_VERSION)
        want = (P.FUSE_ASYNC_READ | P.FUSE_DO_READDIRPLUS | P.FUSE_PARALLEL_DIROPS
                | P.FUSE_CACHE_SYMLINKS | P.FUSE_MAX_PAGES | P.FUSE_EXPLICIT_INVAL_DATA
                | P.FUSE_ABORT_ERROR | P.FUSE_BIG_WRITES | P.FUSE_INIT_EXT)
        if self.view.acl:
            want |= P.FUSE_POSIX_ACL  # the kernel then enforces the image's ACLs, as EROFS does
        if self.want_passthrough and flags & P.FUSE_PASSTHROUGH and has_cap_sys_admin():
            want |= P.FUSE_PASSTHROUGH
        got = flags & want
        self.passthrough = bool(got & P.FUSE_PASSTHROUGH)
        # Zero-message opendir: OPENDIR answered ENOSYS once, the kernel stops sending
        # OPENDIR and RELEASEDIR and caches directories by default (KEEP_CACHE|CACHE_DIR).
        self.no_opendir = bool(flags & P.FUSE_NO_OPENDIR_SUPPORT)
        # Zero-message open likewise, unless passthrough needs OPEN to name a backing file:
        # a file read from the page cache then costs no request at all.
        self.no_open = bool(flags & P.FUSE_NO_OPEN_SUPPORT) and not self.passthrough
        out = P.INIT_OUT.pack(
            P.KERNEL_VERSION, self.minor, max_readahead, got & 0xFFFFFFFF, 16, 12, MAX_WRITE, 1,
            MAX_PAGES, 0, got >> 32, 1 if self.passthrough else 0)
        self._reply(unique, out)
        self.ready.set()

    def _destroy(self, unique, nodeid, body, pid) -> None:
        self._reply(unique)
        self.done.set()

    def _interrupt(self, unique, nodeid, body, pid) -> None:
        target = P.INTERRUPT_IN.unpack_from(body)[0]
        if len(self._interrupted) > 1024:
            self._interrupted.clear()
        self._interrupted.add(target)

    # -- metadata -------------------------------------------------------------------------

    def _lookup(self, unique, nodeid, body, pid) -> None:
        name = bytes(body[:-1]) if body[-1:] == b"\0" else bytes(body)
        node = self.view.lookup(self._root_nid if nodeid == P.ROOT_ID else nodeid - 2, name)
        if node is None:
            self._reply(unique, NEGATIVE_ENTRY)
            return
        if node.broken:
            self._log(f"{self._where(node)}: {node.broken}")
            self._error(unique, errno.EIO)
            return
        self._reply(unique, node.wire or self._wire(node))

    def _getattr(self, unique, nodeid, body, pid) -> None:
        node = self._node(nodeid)
        self._reply(unique, ATTR_PREFIX + (node.wire or self._wire(node))[40:])

    def _readlink(self, unique, nodeid, body, pid) -> None:
        node = self._node(nodeid)
        if not stat.S_ISLNK(node.mode):
            raise OSError(errno.EINVAL, "not a symlink")
        self._reply(unique, node.target or self.view.target(node))

    def _statfs(self, unique, nodeid, body, pid) -> None:
        image = self.view.image
        self._reply(unique, P.STATFS_OUT.pack(image.super.blocks, 0, 0, image.inode_count, 0,
                                              BLOCK_SIZE, NAME_MAX, BLOCK_SIZE))

    def _getxattr(self, unique, nodeid, body, pid) -> None:
        size = P.GETXATTR_IN.unpack_from(body)[0]
        name = bytes(body[P.GETXATTR_IN.size:]).rstrip(b"\0")
        value = self.view.getxattr(self._node(nodeid), name)
        self._sized(unique, size, value)

    def _listxattr(self, unique, nodeid, body, pid) -> None:
        size = P.GETXATTR_IN.unpack_from(body)[0]
        node = self._node(nodeid)
        pairs = node.xattrs
        if node.trusted and not (pid and has_cap_sys_admin(pid)):
            # overlayfs lists trusted.* only to CAP_SYS_ADMIN (reading them is refused by the
            # VFS before any file system is asked)
            pairs = [kv for kv in pairs if not kv[0].startswith(TRUSTED)]
        self._sized(unique, size, b"".join([k + b"\0" for k, _v in pairs]))

    def _sized(self, unique: int, size: int, data: bytes) -> None:
        """The getxattr/listxattr convention: size 0 asks for the length only."""
        if not size:
            self._reply(unique, P.GETXATTR_OUT.pack(len(data)))
        elif len(data) > size:
            self._error(unique, errno.ERANGE)
        else:
            self._reply(unique, data)

    # -- directories ----------------------------------------------------------------------

    def _opendir(self, unique, nodeid, body, pid) -> None:
        node = self._node(nodeid)
        if not stat.S_ISDIR(node.mode):
            raise OSError(errno.ENOTDIR, "not a directory")
        if self.no_opendir:
            self._error(unique, errno.ENOSYS)
            return
        self._reply(unique, P.OPEN_OUT.pack(0, P.FOPEN_KEEP_CACHE | P.FOPEN_CACHE_DIR, 0))

    def _readdir(self, unique, nodeid, body, pid) -> None:
        self._listing(unique, nodeid, body, False)

    def _readdirplus(self, unique, nodeid, body, pid) -> None:
        self._listing(unique, nodeid, body, True)

    def _listing(self, unique: int, nodeid: int, body, plus: bool) -> None:
        _fh, offset, size, _rf, _flags = P.READ_IN.unpack_from(body)
        node = self._node(nodeid)
        if node.nid * 2 + plus not in self._streams and len(self.view.listing(node.nid).names) > STREAM_ENTRIES:
            self._reply(unique, self._page(node, offset, size, plus))
            return
        blob, ends = self._encoded(node, plus)
        if offset >= len(ends):
            self._reply(unique, b"")
            return
        start = ends[offset - 1] if offset else 0
        stop = ends[bisect_right(ends, start + size, offset) - 1] if ends[offset] <= start + size else start
        self._reply(unique, blob[start:stop])

    def _encoded(self, node: Node, plus: bool, poll=None) -> tuple[bytes, list[int]] | None:
        """A directory's whole READDIR(PLUS) stream, records from `_records`, and where each
        record ends: the kernel pages through it one request per buffer, and each page is
        then a slice.  The last few directories are kept (the kernel caches the pages
        itself: FOPEN_CACHE_DIR).  `poll`: encoded ahead by `_read_ahead`, before any
        request; None as soon as a request waits (looked for every `AHEAD_BATCH` entries)."""
        ahead = poll is not None
        key = node.nid * 2 + plus
        hit = self._streams.get(key)
        if hit is not None:
            if not ahead:
                self._unasked.discard(key)
            return hit
        parts = []
        ends = []
        subdirs = []
        used = 0
        add = parts.extend
        for index, ino, dtype, size, record in self._encoding(node, 0, plus, ahead):
            # (at index i the first i - 1 entries' nodes are made)
            if ahead and index > 1 and (index - 1) % AHEAD_BATCH == 0 and poll(0):
                return None  # a request came first (the nodes made so far stay cached)
            add(record)
            used += size
            ends.append(used)
            if dtype == DT_DIR and index > 1:
                subdirs.append(ino * 2 + plus)
        hit = self._streams[key] = (b"".join(parts), ends)
        if ahead:
            self._unasked.add(key)
        # A walk lists the subdirectories next, depth first: the first one on top.
        subdirs.reverse()
        self._ahead += subdirs
        if len(self._ahead) > AHEAD_PENDING:
            del self._ahead[:len(self._ahead) - AHEAD_PENDING]
        while len(self._streams) > STREAMS_KEPT:
            try:
                old = next(iter(self._streams))
                del self._streams[old]
            except (KeyError, RuntimeError, StopIteration):  # another thread evicted it
                break
            self._unasked.discard(old)
        return hit

    def _page(self, node: Node, offset: int, size: int, plus: bool) -> bytes:
        """The records of a large directory from index `offset` that fit in `size` bytes,
        encoded for this request only (the kernel caches the pages it gets)."""
        parts = []
        add = parts.extend
        used = 0
        for _index, _ino, _dtype, record_size, record in self._encoding(node, offset, plus):
            used += record_size
            if used > size:
                break
            add(record)
        return b"".join(parts)

    def _encoding(self, node: Node, start: int, plus: bool, ahead: bool = False) -> Iterator[tuple]:
        """The READDIR(PLUS) records of a directory from index `start`, one encoding for the
        whole stream and for a page: (index, ino, dtype, size, its pieces), a record's offset
        being the next index."""
        fixed = P.DIRENT.size + (P.ENTRY_OUT.size if plus else 0)
        for index, (name, ino, dtype, entry) in enumerate(self._records(node, start, plus, ahead), start):
            n = len(name)
            pad = PADS[-n % 8]
            dirent = _pack_dirent(ino, index + 1, n, dtype)
            yield (index, ino, dtype, fixed + n + len(pad),
                   (entry, dirent, name, pad) if plus else (dirent, name, pad))

    def _read_ahead(self, poll) -> None:
        """While no request waits, encode the directories a walk will list next: a fresh
        mount's first `find` then finds each stream ready, the work done on the other core
        while the kernel and the walker handle the previous reply.  Only the worker that
        holds `_reading` (the next to take a request) does this, and it looks for a waiting
        request every `AHEAD_BATCH` entries (`_encoded`): a request waits for a few entries'
        work, not a whole directory's, and no other worker ever waits on it for the GIL.
        Errors are left for the request that asks (then answered and logged)."""
        ahead = self._ahead
        view = self.view
        while ahead and len(self._unasked) < AHEAD_ENCODED and not poll(0):
            try:
                key = ahead.pop()
            except IndexError:
                return
            if key in self._streams:
                continue
            try:
                node = view.node(key >> 1)
                if node is None or not stat.S_ISDIR(node.mode) or len(view.listing(node.nid)) > AHEAD_ENTRIES:
                    continue
                if self._encoded(node, bool(key & 1), poll) is None:
                    ahead.append(key)  # a request came first: go on after it
                    return
            except Exception:  # left for the request that asks: answered and logged then
                continue

    def _records(self, node: Node, start: int, plus: bool, strict: bool = False):
        """`(name, ino, d_type, fuse_entry_out)` of a directory from index `start`: "." and
        ".." (which the kernel does not link from READDIRPLUS), then the entries.  `strict`
        (ahead of a request): a corrupt inode raises, left for the request to log."""
        dots = ((b".", node.nid), (b"..", node.parent if node.parent is not None else node.nid))
        for name, ino in dots[start:]:
            yield name, ino, stat.S_IFDIR >> 12, NO_ENTRY
        named = self.view.named
        for name, nid in self.view.children(node.nid, max(0, start - 2)):
            entry = NO_ENTRY
            try:
                child = named(nid, node.nid, name)
            except OSError as e:  # a corrupt inode: list the name, as the kernel does
                if strict:
                    raise
                self._failed_quietly(e)
                child = None
            if child is None:
                dtype = DT_UNKNOWN
            else:
                dtype = (child.mode >> 12) & 15
                if plus and not child.broken:
                    entry = child.wire or self._wire(child)
            yield name, nid, dtype, entry

    # -- files ----------------------------------------------------------------------------

    def _open(self, unique, nodeid, body, pid) -> None:
        flags = P.OPEN_IN.unpack_from(body)[0]
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EROFS, "read-only")
        if self.no_open:  # once: the kernel then opens and releases files by itself
            self._error(unique, errno.ENOSYS)
            return
        node = self._node(nodeid)
        if not node.external:
            self._reply(unique, P.OPEN_OUT.pack(0, P.FOPEN_KEEP_CACHE, 0))
            return
        held = self._acquire(unique, node)
        if held.backing_id is not None:
            self._reply(unique, P.OPEN_OUT.pack(node.nid + 1, P.FOPEN_PASSTHROUGH, held.backing_id))
        else:
            self._reply(unique, P.OPEN_OUT.pack(node.nid + 1, P.FOPEN_KEEP_CACHE, 0))

    def _acquire(self, unique: int, node: Node) -> Held:
        """The node's backing file, checked, counted as in use until `_release_nid`.

        One thread opens and verifies a file while others wanting it wait (the kernel's
        readahead sends several READs of a file at once)."""
        nid = node.nid
        while True:
            with self._lock:
                held = self._held.get(nid)
                if held is not None:
                    held.opens += 1
                    self._idle.pop(nid, None)
                    break
                first = nid not in self._pending
                if first:
                    self._pending[nid] = None  # opening; an Event only once someone waits
                else:
                    pending = self._pending[nid]
                    if pending is None:
                        pending = self._pending[nid] = threading.Event()
            if first:
                try:
                    return self._hold(unique, node)
                finally:
                    with self._lock:
                        pending = self._pending.pop(nid)
                    if pending is not None:
                        pending.set()
            self._let_go()
            pending.wait()  # then take what it held (or fail as it did)
        try:
            self._checked(unique, node, self.store.recheck, held.fd, node.payload, node.digest)
        except BaseException:
            self._release_nid(nid)
            raise
        return held

    def _checked(self, unique: int, node: Node, func, *args):
        """`func(*args, cancelled)`, cancellable by INTERRUPT; errors name the file."""
        interrupted = self._interrupted
        try:
            return func(*args, lambda: unique in interrupted)
        except CfscError as e:
            e.where = self._where(node)  # name the file in the image (computed only now)
            raise
        finally:
            interrupted.discard(unique)

    def _hold(self, unique: int, node: Node) -> Held:
        """Open, verify and (with passthrough) register a node's backing file.  A small file
        is read whole only to be served from memory; the open's size says whether it may be
        passed through (no second fstat), and a digest the kernel keeps costs no read."""
        passthrough = self.passthrough
        limit = -1 if passthrough else SERVED_FROM_MEMORY
        if node.size > SERVED_FROM_MEMORY:
            self._let_go()  # hashing (or at least opening) a large file
        fd, data, size = self._checked(unique, node, self.store.open_read, node.payload, node.digest, limit)
        # (with passthrough, `limit` -1 read no data: the kernel reads the file itself)
        backing_id = self._register(fd) if passthrough and self._passable(node, size) else None
        held = Held(fd, backing_id, data)
        with self._lock:
            self._held[node.nid] = held
        return held

    def _passable(self, node: Node, size: int) -> bool:
        """Whether passthrough serves this backing file as reads would: only at the image's
        size.  The kernel reads a passed-through file to its own end, so a longer one (possible
        with no digest to check, or --verity none) would show bytes the image does not have;
        reads stop at the image's size.  Such a file is served by reads (and logged).
        `size`: the file's when it was opened."""
        if size == node.size:
            return True
        self._log(f"{self._where(node)}: backing file {node.payload.decode('utf-8', 'backslashreplace')} has {size}"
                  f" bytes, the image says {node.size}: served by reads, not passthrough")
        return False

    def _register(self, fd: int) -> int | None:
        """A passthrough backing id for `fd`, or None to serve this file by pread."""
        arg = bytearray(P.BACKING_MAP.pack(fd, 0, 0))
        try:
            return fcntl.ioctl(self.fd, P.FUSE_DEV_IOC_BACKING_OPEN, arg)
        except OSError as e:
            if e.errno == errno.EPERM:
                self.passthrough = False  # not allowed after all: stop trying
            self._log(f"{self.source}: passthrough refused ({e.strerror}); serving by reads")
            return None

    def _drop(self, held: Held) -> None:
        os.close(held.fd)
        if held.backing_id is not None:
            try:
                fcntl.ioctl(self.fd, P.FUSE_DEV_IOC_BACKING_CLOSE,
                            bytearray(held.backing_id.to_bytes(4, sys.byteorder)))
            except OSError as e:
                if e.errno not in (errno.ENODEV, errno.EBADF):
                    self._log(f"{self.source}: closing a passthrough backing file: {e.strerror}")

    def _read(self, unique, nodeid, body, pid) -> None:
        fh, offset, size, _rf, _flags = P.READ_IN.unpack_from(body)
        if fh:
            held = self._held.get(fh - 1)
            if held is None:
                raise OSError(errno.EBADF, "no such open file")
            data = held.data
            if data is None and size >= SERVED_FROM_MEMORY:
                self._let_go()  # a large read, maybe from disk
            self._send_data(unique, data[offset:offset + size] if data is not None else os.pread(held.fd, size, offset))
            return
        node = self._node(nodeid)
        if node.external:  # zero-message open: the first READ opens and checks the file
            if node.size <= SERVED_FROM_MEMORY and node.nid not in self._held:
                self._send_data(unique, self._read_small(unique, node, offset, size))
                return
            held = self._acquire(unique, node)
            try:
                data = held.data
                if data is None and size >= SERVED_FROM_MEMORY:
                    self._let_go()  # a large read, maybe from disk
                data = data[offset:offset + size] if data is not None else os.pread(held.fd, size, offset)
            finally:
                self._release_nid(node.nid)
            self._send_data(unique, data)
            return
        content = node.content
        if content is None:
            content = self.view.content(node)
        if content is None:  # a hole: zeros
            content = b"\0" * max(0, min(size, node.size - offset))
            offset = 0
        self._reply(unique, content[offset:offset + size])

    def _read_small(self, unique: int, node: Node, offset: int, size: int) -> bytes:
        """A READ of a small file nobody holds open (zero-message open: the usual READ of a
        small file): opened, read whole, verified from those bytes and closed at once.  No
        `Held` is kept: the kernel keeps the pages (FOPEN_KEEP_CACHE), so another READ of
        the file is rare, and keeping one cost more than it saved.  `_acquire` is the
        reference path (open files, large ones); a test serves every file both ways."""
        fd, data, _size = self._checked(unique, node, self.store.open_read, node.payload, node.digest,
                                 SERVED_FROM_MEMORY)
        try:
            if data is None:  # it changed while read: verified from the fd, served by pread
                return os.pread(fd, size, offset)
        finally:
            os.close(fd)
        return data[offset:offset + size]

    def _send_data(self, unique: int, data: bytes) -> None:
        try:
            os.writev(self.fd, [_pack_out(16 + len(data), 0, unique), data])
        except OSError as e:
            self._write_failed(e)

    def _release(self, unique, nodeid, body, pid) -> None:
        fh = P.RELEASE_IN.unpack_from(body)[0]
        if fh:
            self._release_nid(fh - 1)
        self._reply(unique)

    def _release_nid(self, nid: int) -> None:
        """One open of `nid` fewer; keep its backing file, dropping the oldest unused ones."""
        dropped = []
        with self._lock:
            held = self._held.get(nid)
            if held is not None:
                held.opens -= 1
                if not held.opens:
                    held.data = None  # the next open reads the file again (after `recheck`)
                    self._idle[nid] = held
                    while len(self._idle) > IDLE_BACKING:
                        oldest = next(iter(self._idle))
                        dropped.append(self._idle.pop(oldest))
                        del self._held[oldest]
        for held in dropped:
            self._drop(held)

    def close(self) -> None:
        """Release every backing file still held (after the connection ended)."""
        with self._lock:
            held = list(self._held.values())
            self._held.clear()
            self._idle.clear()
        for h in held:
            os.close(h.fd)


def _traced(opcode: int, handler):
    """`handler`, logging each request (`--debug`; costs nothing when off)."""
    name = _opname(opcode)

    def trace(unique, nodeid, body, pid):
        log.debug("%s unique=%d nodeid=%d pid=%d %d bytes", name, unique, nodeid, pid, len(body))
        return handler(unique, nodeid, body, pid)

    return trace


def _opname(opcode: int) -> str:
    try:
        return P.Opcode(opcode).name
    except ValueError:
        return f"opcode {opcode}"
