"""The content store: regular files kept under their fs-verity digest, `DIR/xx/yyyy…`.

A composefs image refers to external file content by store path (`payload`); the kernel
overlay finds the bytes there and checks them against the digest in the image.  So an
object's content must hash to its name, always — also after a crash or `kill -9` mid-import,
and when several importers share a store.  And an import either completes or leaves the store
as it was: a run that fails (a truncated archive, a file that changed, a full disk) must not
leave objects behind, not even complete ones, for nothing refers to them.  That decides the
design:

* An object is first written as a temp file inside the store (`DIR/.tmp-XXXXXXXX`: same file
  system, unique name), given mode 0644 and offered fs-verity (FS_IOC_ENABLE_VERITY; failure
  is ignored, as in mkcomposefs).
* Nothing gets an object name before `commit()`, which is called once, when the whole run
  succeeded — by the frontend when it has loaded its source, or, when `compile_image` holds
  the objects (`Options.held`, a `HeldObjects`), once the image is written, so that a run
  failing in the passes or the writer leaves no object behind either: a `syncfs` makes every temp file durable, then each is hard-linked to its
  object name and its temp name removed.  `close()` instead (after any error) removes every
  temp file: the store is as it was.  `link` never replaces an existing name, so an object
  appears complete or not at all and is never rewritten; a concurrent importer that got there
  first just wins (EEXIST).  File systems without hard links fall back to `rename`.
  Durability is batched: a `syncfs` every `SYNC_BYTES`/`SYNC_OBJECTS` imported (so the disk
  writes while the import goes on: one `syncfs` at the end, waiting for everything, made a
  200 MB tar import about a third slower) and one in `commit()`, instead of mkcomposefs' `fsync`
  per object (each of which is a journal commit: 5000 of them took seconds here).  The
  guarantee is the same — no name ever points at data that is not on disk yet.
* The digest that names an object is computed from the temp file's own bytes (while writing,
  or by reading the copy back), never trusted from a source that may change under us.  A caller
  that passes the digest it computed gets `SourceChanged` if the copy no longer matches.
* A killed import may leave `.tmp-*` files at the top of the store (as much as it had imported),
  never anything under an object name.  They are safe to delete while no import runs.
* The store directory is made when the first object is imported: a run that fails before
  creates nothing.

Copies use reflinks (FICLONE) where the file system shares extents, else `copy_file_range`,
else read/write.  Streams (tar members, OSTree objects) come in as chunks and are hashed while
they are written.  Methods are thread-safe: the directory frontend imports from a thread pool.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import tempfile
import threading
from collections.abc import Iterable

from cfsc.base.errors import InputError, OutputError
from cfsc.base.fsverity import FsVerityHasher, hash_fd, payload_path

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
FS_IOC_ENABLE_VERITY = 0x40806685  # _IOW('f', 133, struct fsverity_enable_arg)
# struct fsverity_enable_arg: version, hash_algorithm, block_size, salt_size, salt_ptr,
# sig_size, reserved1, sig_ptr, reserved2[11]
FSVERITY_ENABLE_ARG = struct.Struct("<IIIIQIIQ88x")
assert FSVERITY_ENABLE_ARG.size == 128
VERITY_ARG = FSVERITY_ENABLE_ARG.pack(1, 1, 4096, 0, 0, 0, 0, 0)
TEMP_PREFIX = ".tmp-"
OBJECT_MODE = 0o644
DIR_MODE = 0o755
SYNC_BYTES = 32 << 20
SYNC_OBJECTS = 4096
_CHUNK = 1 << 20
# "This file system cannot do that at all": stop trying for this store.
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EXDEV, errno.EINVAL})


class HeldObjects:
    """The stores a compile imports into, their objects named only when the image is written,
    and only those the image refers to: a file a later layer replaced or deleted, one
    `--exclude` left out, AUFS link data no link used, were imported while the source was
    read, and are dropped here instead of staying in the store unreferenced."""

    def __init__(self) -> None:
        self.stores: list[Store] = []

    def commit(self, keep: set[bytes] | None = None) -> None:
        for store in self.stores:
            store.commit(keep)

    def close(self) -> None:
        for store in self.stores:
            store.close()


def open_store(options) -> Store:
    """The store `--digest-store` names, held for the image if the compile holds objects."""
    store = Store(options.digest_store)
    if options.held is not None:
        options.held.stores.append(store)
    return store


def loaded(store: Store, options) -> None:
    """A frontend read its whole source: name its objects now, unless they are held."""
    if options.held is None:
        store.commit()


class SourceChanged(InputError):
    """The content being imported changed while it was read."""


class Store:
    """A content store rooted at `root` (created, with parents, at the first import).

    Use as a context manager, or call `commit()` when the run succeeded: imported objects
    appear under their names then, all at once.  `close()` discards them.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = os.fsdecode(root)
        self._root_made = False
        self.reflink = True
        self.copy_range = True
        self.verity = True
        self.hardlinks = True
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._present: set[bytes] = set()  # digests in the store or pending
        self._busy: dict[bytes, threading.Event] = {}  # digests being imported right now
        self._fanout: set[int] = set()  # `xx` directories known to exist
        self._pending: list[tuple[str, bytes]] = []  # (temp path, digest)
        self._unsynced = self._unsynced_bytes = 0  # objects and bytes imported since the last syncfs
        # Share of recent imports that found no object to reuse (a moving average).
        try:
            self.miss_rate = 1.0 if not any(len(n) == 2 for n in os.listdir(self.root)) else 0.5
        except OSError:
            self.miss_rate = 1.0

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.close()

    def expects_new(self) -> bool:
        """Recent imports mostly found nothing to reuse.  Then copying a file first and hashing
        the copy saves the separate hashing pass over the source; when objects tend to be there
        already, hashing first (and not copying) is cheaper."""
        return self.miss_rate > 0.5

    def path_of(self, digest: bytes) -> str:
        return os.path.join(self.root, payload_path(digest).decode())

    def __contains__(self, digest: bytes) -> bool:
        """In the store, or pending (imported in this process, not yet committed)."""
        if digest in self._present:
            return True
        try:
            os.lstat(self.path_of(digest))
        except FileNotFoundError:
            return False
        self._present.add(digest)
        return True

    # -- importing --------------------------------------------------------------------------

    def import_fd(self, fd: int, digest: bytes | None = None, where: str = "") -> bytes:
        """Copy the whole file open at `fd` (from offset 0) into the store; return its digest.

        With `digest` (what the caller hashed from that file), an object already present is
        not copied again, and a copy that does not hash to `digest` raises `SourceChanged`.
        """
        if digest is not None and not self._claim(digest):
            return digest
        claimed = digest
        try:
            temp = self._temp()
            try:
                got, size = self._copy(fd, temp.fd, where)
                if digest is not None and got != digest:
                    raise SourceChanged("changed while being copied into the store: the tree must not change"
                                        " during the scan", where)
                if claimed is None:
                    if not self._claim(got):
                        temp.discard()
                        return got
                    claimed = got
                self._add(temp, got, size)
            except BaseException:
                temp.discard()
                raise
            return got
        finally:
            if claimed is not None:
                self._release(claimed)

    def import_path(self, path: str | os.PathLike, digest: bytes | None = None) -> bytes:
        where = os.fsdecode(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as e:
            raise InputError(f"cannot open: {e.strerror}", where) from None
        try:
            return self.import_fd(fd, digest, where)
        finally:
            os.close(fd)

    def import_chunks(self, chunks: Iterable[bytes | bytearray | memoryview]) -> tuple[bytes, int]:
        """Store a stream of chunks, hashed while they are written; return (digest, size)."""
        temp = self._temp()
        try:
            hasher = FsVerityHasher()
            size = 0
            for chunk in chunks:
                hasher.update(chunk)
                size += len(chunk)
                _write_all(temp.fd, chunk, temp.path)
            digest = hasher.digest()
            if not self._claim(digest):
                temp.discard()
                return digest, size
            try:
                self._add(temp, digest, size)
            finally:
                self._release(digest)
        except BaseException:
            temp.discard()
            raise
        return digest, size

    def import_bytes(self, data: bytes | bytearray | memoryview, digest: bytes) -> None:
        """Store `data`, whose digest the caller computed from these same bytes (in memory, so
        they cannot change in between): hashed once, and not written when already present."""
        if not self._claim(digest):
            return
        try:
            temp = self._temp()
            try:
                _write_all(temp.fd, data, temp.path)
                self._add(temp, digest, len(data))
            except BaseException:
                temp.discard()
                raise
        finally:
            self._release(digest)

    def commit(self, keep: set[bytes] | None = None) -> None:
        """The run succeeded: make every pending object durable, then give it its name.

        With `keep` (digests), a pending object whose digest is not in it is dropped instead."""
        with self._commit_lock:
            with self._lock:
                pending, self._pending = self._pending, []
                if keep is not None:
                    unused = [p for p in pending if p[1] not in keep]
                    if unused:
                        pending = [p for p in pending if p[1] in keep]
                        for _tmp, digest in unused:
                            self._present.discard(digest)
                        _unlink_all(unused)
            if not pending:
                return
            try:
                self._sync()
            except BaseException:
                _unlink_all(pending)
                raise
            for i, (tmp, digest) in enumerate(pending):
                try:
                    self._name(tmp, digest)
                except BaseException:
                    _unlink_all(pending[i:])
                    raise

    def close(self) -> None:
        """The run failed: drop what is pending (its temp files are removed)."""
        with self._lock:
            pending, self._pending = self._pending, []
            for _tmp, digest in pending:
                self._present.discard(digest)
        _unlink_all(pending)

    # -- internals --------------------------------------------------------------------------

    def _claim(self, digest: bytes) -> bool:
        """True: the caller imports `digest`.  False: it is already there (maybe after waiting
        for another thread that was importing it)."""
        while True:
            with self._lock:
                if digest in self._present:
                    self.miss_rate -= self.miss_rate / 32
                    return False
                event = self._busy.get(digest)
                if event is None:
                    self._busy[digest] = threading.Event()
                    break
            event.wait()
        if digest in self:
            self._release(digest)
            self._learn(False)
            return False
        self._learn(True)
        return True

    def _learn(self, miss: bool) -> None:
        self.miss_rate += (miss - self.miss_rate) / 32  # unlocked: an estimate is enough

    def _release(self, digest: bytes) -> None:
        with self._lock:
            event = self._busy.pop(digest, None)
        if event is not None:
            event.set()

    def _copy(self, src: int, out: int, where: str) -> tuple[bytes, int]:
        """Copy `src` into `out`; return the digest and size of what `out` now holds."""
        try:
            if self.reflink:
                try:
                    fcntl.ioctl(out, FICLONE, src)
                    return hash_fd(out, 0)
                except OSError as e:
                    if e.errno not in _UNSUPPORTED:
                        raise
                    self.reflink = False
            if self.copy_range:
                copied = _copy_range(src, out)
                if copied:
                    return hash_fd(out, 0)
                if copied is None:
                    self.copy_range = False
            return _copy_plain(src, out)
        except OSError as e:
            raise InputError(f"cannot copy into the store: {e.strerror}", where) from None

    def _add(self, temp: _Temp, digest: bytes, size: int) -> None:
        """Finish a temp file holding `digest` and queue it for the commit."""
        try:
            os.fchmod(temp.fd, OBJECT_MODE)
            temp.close()
        except OSError as e:
            raise OutputError(f"cannot write a store object: {e.strerror}", temp.path) from None
        if self.verity:
            self._enable_verity(temp.path)
        with self._lock:
            self._pending.append((temp.path, digest))
            self._present.add(digest)
            self._unsynced += 1
            self._unsynced_bytes += size
            due = self._unsynced >= SYNC_OBJECTS or self._unsynced_bytes >= SYNC_BYTES
            if due:
                self._unsynced = self._unsynced_bytes = 0
        if due:
            self._sync()

    def _sync(self) -> None:
        try:
            _syncfs(self.root)
        except OSError as e:
            raise OutputError(f"cannot sync the store: {e.strerror}", self.root) from None

    def _name(self, tmp: str, digest: bytes) -> None:
        final = self.path_of(digest)
        self._make_fanout(digest)
        try:
            if self.hardlinks:
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    pass  # another importer was first: same name, same content
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                        raise
                    self.hardlinks = False
            if self.hardlinks:
                os.unlink(tmp)
            else:
                os.rename(tmp, final)
        except OSError as e:
            raise OutputError(f"cannot create a store object: {e.strerror}", final) from None

    def _enable_verity(self, tmp: str) -> None:
        # The kernel refuses while a writable fd is open, hence the fresh read-only one.
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, VERITY_ARG)
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                self.verity = False  # this file system (or kernel) has no fs-verity
        finally:
            os.close(fd)

    def _make_fanout(self, digest: bytes) -> None:
        if digest[0] in self._fanout:
            return
        path = os.path.join(self.root, f"{digest[0]:02x}")
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            pass
        except OSError as e:
            raise OutputError(f"cannot create a store directory: {e.strerror}", path) from None
        self._fanout.add(digest[0])

    def _temp(self) -> _Temp:
        """A new temp file; the store is created with the first one."""
        if not self._root_made:
            try:
                os.makedirs(self.root, DIR_MODE, exist_ok=True)
            except OSError as e:
                raise OutputError(f"cannot create the store: {e.strerror}", self.root) from None
            self._root_made = True
        return _Temp(self.root)


class _Temp:
    """A temp file in the store; `fd` is closed exactly once (fd numbers are reused by threads)."""

    __slots__ = ("fd", "path")

    def __init__(self, root: str) -> None:
        try:
            self.fd, self.path = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=root)
        except OSError as e:
            raise OutputError(f"cannot create a temporary file in the store: {e.strerror}", root) from None

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def discard(self) -> None:
        try:
            self.close()
        except OSError:
            pass
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _unlink_all(pending: list[tuple[str, bytes]]) -> None:
    for tmp, _digest in pending:
        try:
            os.unlink(tmp)
        except OSError:
            pass


_libc = None


def _syncfs(path: str) -> None:
    """syncfs(2) on the file system holding `path` (os has no wrapper); sync(2) without libc."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True).syncfs
        except (OSError, AttributeError):
            _libc = False
    if _libc is False:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(fd)


def _write_all(fd: int, data, where: str) -> None:
    view = memoryview(data).cast("B")
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        raise OutputError(f"cannot write a store object: {e.strerror}", where) from None


def _copy_range(src: int, out: int) -> bool | None:
    """copy_file_range the whole of `src`.  False: not for this file (copy it another way);
    None: not on this file system or kernel at all."""
    offset = 0
    while True:
        try:
            n = os.copy_file_range(src, out, 1 << 30, offset, offset)
        except OSError as e:
            if offset:
                raise
            if e.errno in (errno.ENOSYS, errno.EXDEV):
                return None
            if e.errno in (errno.EOPNOTSUPP, errno.EPERM, errno.EINVAL, errno.EBADF):
                return False
            raise
        if n == 0:
            # Some file systems (procfs, some overlays) report 0 instead of an error.
            return offset > 0 or os.fstat(src).st_size == 0
        offset += n


def _copy_plain(src: int, out: int) -> tuple[bytes, int]:
    os.ftruncate(out, 0)
    os.lseek(out, 0, os.SEEK_SET)
    return hash_fd(src, 0, out)
