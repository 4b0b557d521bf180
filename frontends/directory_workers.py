"""Hashing worker processes for the directory frontend: regular files are opened, stat'ed,
read, hashed (and staged into the store) in forked processes, off the scanning process's GIL.

Why processes: with threads, hashlib releases the GIL per 4 KiB block, so the hashing
threads and the scanning thread hand the GIL back and forth (133k futex calls for the 6.8k
files of a Debian minbase tree) and the hashing hardly overlaps the scan.  Forked workers
hash truly beside it.  The thread pool in `cfsc.frontends.directory` stays the reference route
(and the route of a process that already runs other threads: forking one is unsafe); its
threads run the same `FileReader` on the same batches, so the two differ in transport alone.

Protocol, per worker: a `SOCK_SEQPACKET` socket carries requests (one batch each: marshalled
`(batch id, [(dir index, name), ...])`, the batch's directory descriptors attached with
SCM_RIGHTS), a pipe carries the replies (a 4-byte length, then marshalled `(batch id,
[result, ...])`).  A worker answers its batches in order and stops a batch at its first error
(a result `(kind, ...)` with a str kind, see `FileReader.read`).  Deadlock cannot happen: the
main process keeps at most `IN_FLIGHT` batches per worker (a few KiB each, far below a
socket's buffer), so a send never waits, and it reads replies whenever it waits at all.  A
worker exits when its request socket reaches EOF; one that dies shows as EOF on its reply
pipe; the kernel kills the workers when the main process dies (PR_SET_PDEATHSIG).

The store: a worker looks an object up (`Store.has`) and writes a missing one as a temp file
(`Store.stage_*`), replying its (name, dev, ino); all bookkeeping (pending, found, sync,
commit) stays in the main process (`Store.adopt`, `Store.found`).  A worker removes its own
temp file if it fails; the main process removes adopted ones if the run fails (`Store.close`)
and, before that, the ones in replies it had not read yet (`Workers.close`).  The store's
lease: the main process holds it from before the fork if the store exists (the workers share
that lock); a worker that creates the store takes its own until it exits, by when the main
process has adopted its objects and so taken the lease too.
"""

from __future__ import annotations

import errno
import marshal
import os
import select
from _signal import SIGKILL  # (not `signal`: its enums are ~5 ms of start-up)
import struct
from _socket import AF_UNIX, CMSG_LEN, MSG_CTRUNC, MSG_TRUNC, SCM_RIGHTS, SOCK_SEQPACKET, SOL_SOCKET, socketpair
from collections.abc import Callable

from cfsc.base import syscalls
from cfsc.base.beneath import NotRegular, open_listed
from cfsc.base.errors import CfscError, InputError, OutputError, StoreError
from cfsc.base.fsverity import digest_bytes, fill, hash_fd, write_all
from cfsc.base.limits import INLINE_MAX, MAX_EXTERNAL_SIZE, check_external_size
from cfsc.base.tree import S_IFMT, S_IFREG
from cfsc.store import tempfiles
from cfsc.store.objects import SourceChanged

IN_FLIGHT = 4  # batches per worker sent and not yet answered
MAX_REQUEST = 1 << 16  # bytes: a batch of names (each ≤ 255 bytes) stays far below it
MAX_FDS = 253  # SCM_MAX_FD
PIPE_READ = 1 << 16  # a pipe's capacity; a bigger read would malloc (mmap) a buffer it cannot fill
_LENGTH = struct.Struct("<I")
_FDS_SPACE = CMSG_LEN(MAX_FDS * 4)  # room for MAX_FDS descriptors (C ints)
# Errors a worker reports as (class name, what, where) and the main process raises again.
_ERRORS = {cls.__name__: cls for cls in (CfscError, InputError, OutputError, StoreError)}


class Refused(Exception):
    """A file the worker cannot take: `reply` says why (a result with a str kind)."""

    def __init__(self, *reply) -> None:
        super().__init__()
        self.reply = reply


class FileReader:
    """The one per-file read path of the directory frontend, in a worker process or a pool
    thread (each with its own reader: it owns a read buffer).  A result is either the file's
    `(mode, uid, gid, mtime_ns, size, nlink, dev, ino, xattrs, digest, content, staged, found)`
    (`staged`: the store temp file's (name, dev, ino) or None; `found`: the store has it;
    `xattrs` None: not read here, without /proc, the caller reads them by the file's path)
    or a refusal: `("changed", how)`, `("os", errno, strerror, doing)`, `("input", what)`,
    `("source", what)` (`SourceChanged`), `("limit", what)` (a `cfsc.base.limits` rule),
    `("cfsc", class name, what, where)`."""

    __slots__ = ("algorithm", "buf", "proc", "read_xattrs", "store", "user_xattrs", "whole_read")

    def __init__(self, algorithm, options, store, whole_read: int, proc: bool) -> None:
        self.algorithm = algorithm
        # hashlib (OpenSSL set up, ~5 ms) imported here, before the fork: else every worker
        # imported it again before its first digest.
        algorithm.new  # noqa: B018
        self.read_xattrs = not options.skip_xattrs
        self.user_xattrs = options.user_xattrs
        self.store = store
        self.whole_read = whole_read
        self.proc = proc  # the scanner's: without /proc it reads an unreadable file's xattrs itself
        self.buf: bytearray | None = None  # made on first use: the parent of workers never needs it

    def batch(self, fds: list[int], items: list, stop: Callable[[], bool] | None = None) -> list:
        """The results of `(dir index, name)` items, up to the first refusal (the caller raises
        it: the rest is not needed), or until `stop()` says the run failed elsewhere."""
        results = []
        try:
            for index, name in items:
                if stop is not None and stop():
                    break
                result = self.read(fds[index], name)
                results.append(result)
                if type(result[0]) is str:
                    break
        except BaseException:  # (not a refusal: a bug, no memory) nobody adopts what was staged
            discard_staged(self.store, results)
            raise
        return results

    def read(self, dirfd: int, name: bytes) -> tuple:
        try:
            fd, st = open_listed(dirfd, name)
        except PermissionError:
            return self.unreadable(dirfd, name)
        except NotRegular:
            return ("changed", "replaced by another file type")
        except OSError as e:
            return ("os", e.errno, e.strerror, "open")
        staged = None
        try:
            size = st.st_size
            xattrs = read_xattrs(fd, self.user_xattrs) if self.read_xattrs else ()
            digest = content = None
            found = False
            if size > MAX_EXTERNAL_SIZE:  # (a huge sparse file: refused before it is read)
                raise Refused("limit", check_external_size(size))
            if size:
                digest, content, staged, found = self.hash(fd, size, name)
                after = os.fstat(fd)
                if after.st_size != size or after.st_mtime_ns != st.st_mtime_ns:
                    raise Refused("changed", "modified")
        except BaseException as e:
            if staged is not None:
                self.store.discard_staged(staged[0])
            if isinstance(e, Refused):
                return e.reply
            if isinstance(e, SourceChanged):
                return ("source", e.what)
            if isinstance(e, CfscError):
                return ("cfsc", type(e).__name__, e.what, e.where)
            if isinstance(e, OSError):
                return ("os", e.errno, e.strerror, "read")
            raise
        finally:
            os.close(fd)
        return (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, size, st.st_nlink, st.st_dev, st.st_ino,
                xattrs, digest, content, staged, found)

    def hash(self, fd: int, size: int, name: bytes) -> tuple:
        """(digest, inline content, staged temp, found in the store) of a non-empty file."""
        store = self.store
        buf = self.buf
        if buf is None:
            buf = self.buf = bytearray(self.whole_read)  # reused: a fresh one faults its pages in again
        if size < len(buf):
            # Exactly `size` bytes, in one read as a rule: a file that grew or shrank meanwhile
            # shows in the `fstat` after (its size or mtime), a shorter read here too.
            data = memoryview(buf)[:size]
            if fill(fd, data) != size:
                raise Refused("changed", "modified (its size changed)")
            digest = digest_bytes(data, self.algorithm)
            if size <= INLINE_MAX:
                return digest, bytes(data), None, False
            if store is None:
                return digest, None, None, False
            if store.has(digest):
                return digest, None, None, True
            return digest, None, store.stage_bytes(data), False
        where = name.decode("utf-8", "backslashreplace")  # the main process names the whole path
        if store is not None and store.expects_new():
            # Copy first, hash the copy: the digest names exactly the bytes stored.
            def missing(digest: bytes, got: int) -> bool:  # (before the copy is finished)
                if got != size:
                    raise Refused("changed", "modified (its size changed)")
                return not store.has(digest)

            digest, _got, staged = store.stage_fd(fd, None, where, missing)
            return digest, None, staged, staged is None
        digest, got = hash_fd(fd, algorithm=self.algorithm)
        if got != size:
            raise Refused("changed", "modified (its size changed)")
        if store is None:
            return digest, None, None, False
        if store.has(digest):
            return digest, None, None, True
        return digest, None, store.stage_fd(fd, digest, where)[2], False

    def unreadable(self, dirfd: int, name: bytes) -> tuple:
        """No read permission: fine for an empty file (mkcomposefs never opens those)."""
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except OSError as e:
            return ("os", e.errno, e.strerror, "stat")
        if st.st_mode & S_IFMT != S_IFREG or st.st_size:
            return ("input", "cannot open: Permission denied")
        xattrs = ()
        if self.read_xattrs:
            if not self.proc:
                xattrs = None
            else:
                try:
                    xattrs = read_xattrs(b"/proc/self/fd/%d/%s" % (dirfd, name), self.user_xattrs)
                except Refused as e:
                    return e.reply
        return (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, 0, st.st_nlink, st.st_dev, st.st_ino,
                xattrs, None, None, None, False)


def discard_staged(store, results: list) -> None:
    """The store temp files staged for these results go (nobody will adopt them)."""
    for result in results:
        if type(result[0]) is not str and result[11] is not None:
            store.discard_staged(result[11][0])


def read_xattrs(target: int | bytes, user_only: bool) -> tuple:
    """The sorted (key, value) pairs of the file open at `target` (or at that path, not
    following its last component); a failure is a `Refused` with the reply that says why.
    The scan (in the main process) and the workers read xattrs with this one function."""
    by_fd = isinstance(target, int)
    try:
        keys = os.listxattr(target) if by_fd else os.listxattr(target, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            return ()  # a file system without xattrs
        raise Refused("os", e.errno, e.strerror, "list xattrs") from None
    if not keys:
        return ()
    if user_only:
        keys = [k for k in keys if k.startswith("user.")]
    items = []
    for key in keys:
        try:
            value = os.getxattr(target, key) if by_fd else os.getxattr(target, key, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:
                raise Refused("changed", f"xattr {key} removed") from None
            raise Refused("os", e.errno, e.strerror, f"read xattr {key}") from None
        items.append((os.fsencode(key), value))
    items.sort()
    return tuple(items)


def refusal(reply: tuple, where: str, changed: Callable, os_error: Callable) -> CfscError:
    """The located error the main process raises for a worker's refusal of the file at `where`."""
    kind = reply[0]
    if kind == "changed":
        return changed(reply[1])
    if kind == "os":
        return os_error(OSError(reply[1], reply[2]), reply[3])
    if kind == "input":
        return InputError(reply[1], where)
    if kind == "source":
        return SourceChanged(reply[1], where)
    return _ERRORS.get(reply[1], CfscError)(reply[2], reply[3])


class WorkerDied(OSError):
    pass


class _Worker:
    __slots__ = ("buf", "inflight", "pid", "pipe", "sock")

    def __init__(self, pid: int, sock, pipe: int) -> None:
        self.pid = pid
        self.sock = sock  # requests
        self.pipe = pipe  # replies (read end)
        self.buf = bytearray()
        self.inflight = 0


class Workers:
    """`count` forked workers, each running `reader.batch` on the batches sent to it."""

    def __init__(self, count: int, reader: FileReader) -> None:
        self.workers: list[_Worker] = []
        self.tags: list[str] = []  # each worker's temp-name tag (`tempfiles.tag`)
        try:
            for _ in range(count):
                self.workers.append(self._fork(reader))
        except BaseException:
            self.close(lambda _reply: None)
            raise

    def _fork(self, reader: FileReader) -> _Worker:
        ours, theirs = socketpair(AF_UNIX, SOCK_SEQPACKET)
        rd, wr = os.pipe()
        parent = os.getpid()
        tag = os.urandom(4).hex()
        self.tags.append(tag)
        try:
            pid = os.fork()
        except BaseException:
            for s in (ours, theirs):
                s.close()
            os.close(rd)
            os.close(wr)
            raise
        if pid == 0:  # the worker: never returns into the caller's code
            code = 1
            try:
                # Killed with the main process (`kill -9`): no orphan keeps writing temp files
                # into the store, nor holds the lease it shares (`cfsc gc` would wait for it).
                syscalls.die_with_parent(SIGKILL)
                if os.getppid() != parent:
                    return  # it died before that
                tempfiles.tag = tag
                ours.close()
                os.close(rd)
                for w in self.workers:  # the earlier workers' ends: their EOF must not wait for us
                    w.sock.close()
                    os.close(w.pipe)
                _serve(theirs, wr, reader)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        os.close(wr)
        return _Worker(pid, ours, rd)

    def idle(self) -> _Worker | None:
        """The least busy worker, if it can take another batch."""
        w = min(self.workers, key=lambda w: w.inflight)
        return w if w.inflight < IN_FLIGHT else None

    def send(self, w: _Worker, batch_id: int, fds: list[int], items: list) -> None:
        data = marshal.dumps((batch_id, items))
        try:
            w.sock.sendmsg([data], [(SOL_SOCKET, SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        except OSError as e:
            raise WorkerDied(e.errno, e.strerror) from None
        w.inflight += 1

    def busy(self) -> bool:
        return any(w.inflight for w in self.workers)

    def replies(self, block: bool) -> list[tuple[int, list]]:
        """Replies that arrived: (batch id, results) each; with `block`, wait for at least one."""
        out: list[tuple[int, list]] = []
        pipes = {w.pipe: w for w in self.workers if w.inflight}
        if not pipes:
            return out
        ready, _, _ = select.select(list(pipes), [], [], None if block else 0)
        for fd in ready:
            w = pipes[fd]
            chunk = os.read(fd, PIPE_READ)
            if not chunk:
                raise WorkerDied(errno.EPIPE, "a hashing worker process died")
            w.buf += chunk
            self._frames(w, out)
        return out

    def _frames(self, w: _Worker, out: list) -> None:
        buf = w.buf
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = _LENGTH.unpack_from(buf, pos)
            if len(buf) - pos - 4 < n:
                break
            out.append(marshal.loads(memoryview(buf)[pos + 4:pos + 4 + n]))
            pos += 4 + n
            w.inflight -= 1
        if pos:
            del buf[:pos]

    def close(self, unread: Callable[[tuple], None]) -> None:
        """Let the workers finish and exit; `unread(results)` for each reply not read yet (a
        run that failed removes their staged temp files, then `remove_leftovers`).  No worker
        is left running."""
        for w in self.workers:
            w.sock.close()
        for w in self.workers:
            try:
                while True:
                    chunk = os.read(w.pipe, PIPE_READ)
                    if not chunk:
                        break
                    w.buf += chunk
                    got: list = []
                    self._frames(w, got)
                    for _batch_id, results in got:
                        unread(results)
            except OSError:
                pass
            finally:
                os.close(w.pipe)
                os.waitpid(w.pid, 0)
        self.workers = []

    def remove_leftovers(self, store) -> None:
        """After a failed run (workers closed): the temp files workers made and never reported,
        e.g. one killed between writing a file and replying (in the store's directory as this
        run opened it: its path may be a symlink, or replaced since)."""
        try:
            rootfd = store.root_fd(create=False)
        except CfscError:
            return  # no store to clean (gone, or never a directory): the run's own error stands
        tempfiles.remove_tagged(rootfd, self.tags)


def _serve(sock, out: int, reader: FileReader) -> None:
    """A worker's loop: batches in, results out, until the request socket's EOF."""
    while True:
        msg, fds, flags = _receive(sock)
        if not msg:
            return
        try:
            if flags & (MSG_TRUNC | MSG_CTRUNC):
                raise OSError(errno.EMSGSIZE, "a request was cut short")
            batch_id, items = marshal.loads(msg)
            results = reader.batch(fds, items)
        finally:
            for fd in fds:
                os.close(fd)
        data = marshal.dumps((batch_id, results))
        write_all(out, _LENGTH.pack(len(data)) + data)


def _receive(sock) -> tuple[bytes, list[int], int]:
    """A request: its bytes, the descriptors attached (SCM_RIGHTS), recvmsg's flags.  (As
    `socket.recv_fds`: the `socket` module itself, with its enums and `selectors`, is ~3 ms
    of every directory compile's start-up, and only `_socket`'s calls are used.)"""
    msg, ancdata, flags, _addr = sock.recvmsg(MAX_REQUEST, _FDS_SPACE)
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == SOL_SOCKET and kind == SCM_RIGHTS:
            fds += struct.unpack(f"{len(data) // 4}i", data[:len(data) - len(data) % 4])
    return msg, fds, flags
