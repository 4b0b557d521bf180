"""The content store: regular files kept under their fs-verity digest, `DIR/xx/yyyy…`
(62 hex digits after the fan-out for SHA-256, 126 for SHA-512, as composefs-rs names them).

A composefs image refers to external file content by store path (`payload`); the kernel
overlay finds the bytes there and checks them against the digest in the image.  So an
object's content must hash to its name, always — also after a crash or `kill -9` mid-import,
and when several importers share a store.  And an import either completes or leaves the store
as it was: a run that fails (a truncated archive, a file that changed, a full disk, a name
that cannot be made) leaves no object behind, not even complete ones, for nothing refers to
them.  That decides the design:

* An object is first written as a temp file at the top of the store (`DIR/.cfsc-tmp-` and 16
  hex digits: same file system, unique name, recognisable), given mode 0644 and offered
  fs-verity (`cfsc.store.verity`; failure is ignored, as in mkcomposefs).
* Nothing gets an object name before `commit()`, which is called once, when the whole run
  succeeded — by the frontend when it has loaded its source, or, when `compile_image` holds
  the objects (`Options.held`, a `HeldObjects`), once the image is written, so that a run
  failing in the passes or the writer leaves no object behind either.  A `syncfs` makes every
  temp file durable, then each is hard-linked to its object name, and only when every name
  is made are the temp names removed.  If making a name fails (a full disk or quota, an I/O
  error, a fan-out directory on another mount), the names this commit made are removed again
  — only those whose inode is still the temp file's, never an object that was there before
  or that another importer made — and the temp files with them: the store is as it was.
  `close()` instead (after any error) removes every temp file.  `link` never replaces an
  existing name, so an object appears complete or not at all and is never rewritten; a
  concurrent importer that got there first just wins (EEXIST).  File systems without hard
  links fall back to `renameat2(RENAME_NOREPLACE)`.
* Commits of concurrent importers are serialised by an exclusive `flock` on the store
  directory, held while names are made (or unmade) — so a name one commit makes and then
  takes back is never the one another commit finds (EEXIST) and relies on.  An object a run
  found in the store while it read its source (and so did not import) is checked again under
  that lock (an `fstatat` each, or one listing of a fan-out where it found many of them):
  if it has gone meanwhile (a concurrent import that failed took it back, or someone removed
  it), the run fails rather than write an image that refers to nothing.
* Durability is batched: a `syncfs` every `SYNC_BYTES`/`SYNC_OBJECTS` imported (so the disk
  writes while the import goes on: one `syncfs` at the end, waiting for everything, made a
  200 MB tar import about a third slower) and one in `commit()`, instead of mkcomposefs' `fsync`
  per object (each of which is a journal commit: 5000 of them took seconds here).  The
  guarantee is the same — no name ever points at data that is not on disk yet.
* The digest that names an object is computed from the temp file's own bytes (while writing,
  or by reading the copy back), never trusted from a source that may change under us.  A caller
  that passes the digest it computed gets `SourceChanged` if the copy no longer matches.
* Nothing is ever written outside the store: the store directory is opened once, and every
  temp file, fan-out directory and name is made relative to its descriptor (`openat`,
  `mkdirat`, `linkat`), each fan-out opened `O_DIRECTORY | O_NOFOLLOW`.  A fan-out that is a
  symlink, a regular file or anything but a directory is refused (`StoreError`, naming it),
  never followed or repaired; so is anything but a regular file under an object's name.
* A commit first writes a journal, `DIR/.cfsc-tmp-commit-…`, listing the names it is about to
  make, and removes it once they are all made (or taken back).  A process killed in between
  (`kill -9`) leaves its journal, and the next commit into the store (holding the lock, so no
  live commit can own a journal it sees) takes those names back, by the same inode rule.
* `kill -9` leaves `.cfsc-tmp-*` files at the top of the store (as much as it had imported).
  Nothing reads them, their names cannot collide with new ones (O_EXCL), `fsck-store` counts
  them, and `cfsc gc` removes them (`cfsc.tools.gc`).
* A run holds a shared `flock` on `DIR/.cfsc-lock` from its first lookup until it is done (a
  compile: until its image is in place); `cfsc gc` takes it exclusively (`cfsc.store.locks`).
* The store directory is made when the first object is imported: a run that fails before
  creates nothing.

Errors: a store that is not laid out as one is a `StoreError` (bad input, exit 2); a system
that refuses (no space, quota, I/O error, read-only, another mount) an `OutputError` (exit 1);
both name the path in the store.

Copies use reflinks (FICLONE) where the file system shares extents, else `copy_file_range`,
else read/write.  Streams (tar members, OSTree objects) come in as chunks and are hashed while
they are written.  Methods are thread-safe: the directory frontend imports from a thread pool.
Or from forked worker processes: a worker looks objects up and writes missing ones as temp
files (`has`, `stage_bytes`, `stage_fd`), and the main process, which keeps all bookkeeping,
adopts them (`adopt`, `found`), so the rules above hold as for objects imported in-process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
from collections.abc import Callable, Iterable

from cfsc.base import beneath, syscalls
from cfsc.base.errors import CfscError, InputError, OutputError, StoreError
from cfsc.base.holes import mostly_holes
from cfsc.base.fsverity import (SHA256, FsVerityAlgorithm, FsVerityHasher, algorithm_named, hash_by_extents, hash_fd,
                                payload_path)
from cfsc.store import verity
from cfsc.store.filecopy import copy_plain, copy_range, rename_noreplace, seek, truncate, write_all
from cfsc.store.locks import flock, lease
from cfsc.store.tempfiles import TEMP_PREFIX
from cfsc.store.tempfiles import Temp as _Temp
from cfsc.store.tempfiles import failed as _failed
from cfsc.store.tempfiles import unlink_quietly as _unlink_quietly

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
JOURNAL_PREFIX = TEMP_PREFIX + "commit-"
OBJECT_MODE = 0o644
DIR_MODE = 0o755
SYNC_BYTES = 32 << 20
SYNC_OBJECTS = 4096
_CHUNK = 1 << 20
O_JOURNAL = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Copy errors that are the store's (writing), not the source's (reading).
_STORE_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


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
    store = Store(options.digest_store, algorithm_named(options.hash))
    if options.held is not None:
        store.held = True
        options.held.stores.append(store)
    return store


def loaded(store: Store, options) -> None:
    """A frontend read its whole source: name its objects now, unless they are held."""
    if options.held is None:
        store.commit()


class SourceChanged(InputError):
    """The content being imported changed while it was read."""


class _Pending:
    """A temp file waiting for its object name; (dev, ino) tell the name it gets is still it."""

    __slots__ = ("digest", "dev", "ino", "name")

    def __init__(self, name: str, digest: bytes, dev: int, ino: int) -> None:
        self.name = name
        self.digest = digest
        self.dev = dev
        self.ino = ino


class Store:
    """A content store rooted at `root` (created, with parents, at the first import).

    Use as a context manager, or call `commit()` when the run succeeded: imported objects
    appear under their names then, all at once.  `close()` discards them.
    """

    def __init__(self, root: str | os.PathLike, algorithm: FsVerityAlgorithm = SHA256) -> None:
        self.root = os.fsdecode(root)
        self.algorithm = algorithm  # of the digests it names objects by
        self._verity_arg = verity.enable_arg(algorithm)
        self.reflink = True
        self.copy_range = True
        self.verity = True
        self.hardlinks = True
        self.held = False  # True: the lease outlives `commit()`, until `close()` (`HeldObjects`)
        self._lock = threading.Lock()
        self._lease = -1  # descriptor of the lock file, flocked shared while this run uses the store
        self._commit_lock = threading.Lock()
        self._rootfd = -1
        self._fans: dict[int, int] = {}  # first digest byte -> descriptor of its `xx` directory
        self._present: set[bytes] = set()  # digests in the store or pending
        self._reused: set[bytes] = set()  # digests found in the store (not imported by this run)
        self._busy: dict[bytes, threading.Event] = {}  # digests being imported right now
        self._pending: list[_Pending] = []
        self._unsynced = self._unsynced_bytes = 0  # objects and bytes imported since the last syncfs
        # Share of recent imports that found no object to reuse (a moving average).
        try:
            self.miss_rate = 1.0 if not any(len(n) == 2 for n in os.listdir(self.root)) else 0.5
        except OSError:
            self.miss_rate = 1.0

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.commit() if exc_type is None else self.close()

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
        if self._lookup(digest) is None:
            return False
        with self._lock:
            self._present.add(digest)
            self._reused.add(digest)
        return True

    # -- importing --------------------------------------------------------------------------

    def import_fd(self, fd: int, digest: bytes | None = None, where: str = "") -> bytes:
        """Copy the whole file open at `fd` (from offset 0) into the store; return its digest.

        With `digest` (what the caller hashed from that file), an object already present is
        not copied again, and a copy that does not hash to `digest` raises `SourceChanged`.
        """
        if digest is not None and not self._claim(digest):
            return digest
        claimed = [digest]

        def claim(got: bytes, _size: int) -> bool:  # (a digest of the copy: claimed before it is finished)
            if not self._claim(got):
                return False
            claimed[0] = got
            return True

        try:
            got, size, staged = self.stage_fd(fd, digest, where, None if digest is not None else claim)
            if staged is None:
                return got
            name, dev, ino = staged
            try:
                self._queue(name, got, dev, ino, size)
            except BaseException:
                self.discard_staged(name)
                raise
            return got
        finally:
            if claimed[0] is not None:
                self._release(claimed[0])

    def import_path(self, path: str | os.PathLike, digest: bytes | None = None) -> bytes:
        where = os.fsdecode(path)
        try:
            fd, _st = beneath.open_named(path)
        except OSError as e:
            raise InputError(f"cannot open: {e.strerror}", where) from None
        try:
            return self.import_fd(fd, digest, where)
        finally:
            os.close(fd)

    def import_chunks(self, chunks: Iterable[bytes | bytearray | memoryview | int]) -> tuple[bytes, int]:
        """Store a stream of chunks, hashed while they are written; return (digest, size).  A
        chunk that is an int is a hole of that many zero bytes: skipped, so the object is as
        sparse as its source (hashed by runs, `update_zeros`)."""
        temp = self._temp()
        try:
            hasher = FsVerityHasher(self.algorithm)
            size = written = data = 0
            for chunk in chunks:
                if chunk.__class__ is int:
                    hasher.update_zeros(chunk)
                    size += chunk
                    continue
                hasher.update(chunk)
                if written < size:
                    seek(temp.fd, size, self.root)
                size += len(chunk)
                written = size
                data += len(chunk)
                write_all(temp.fd, chunk, self.root)
            if written < size:  # a hole at the end
                truncate(temp.fd, size, self.root)
            digest = hasher.digest()
            if not self._claim(digest):
                temp.discard()
                return digest, size
            try:
                self._add(temp, digest, data)
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
            name, dev, ino = self.stage_bytes(data)
            self._queue(name, digest, dev, ino, len(data))
        finally:
            self._release(digest)

    # -- staging: in a worker process (see the module docstring), or as the first step here ---

    def hold(self) -> None:
        """Take the lease now if the store exists (before forking workers, who share it)."""
        self.root_fd(create=False)

    def has(self, digest: bytes) -> bool:
        """In a worker: is `digest` in the store (one `fstatat`)?  Feeds `expects_new`."""
        found = self._lookup(digest) is not None
        self._learn(not found)
        return found

    def stage_bytes(self, data: bytes | bytearray | memoryview) -> tuple[str, int, int]:
        """A finished temp file holding `data`; its (name, dev, ino)."""
        temp = self._temp()
        try:
            write_all(temp.fd, data, self.root)
            self._finish(temp)
        except BaseException:
            temp.discard()
            raise
        return temp.name, temp.dev, temp.ino

    def stage_fd(self, fd: int, digest: bytes | None, where: str,
                 wanted: Callable[[bytes, int], bool] | None = None) -> tuple[bytes, int, tuple[str, int, int] | None]:
        """A finished temp file holding a copy of the file open at `fd`; the digest of the
        copy, its size, (name, dev, ino).  A copy not hashing to `digest` is `SourceChanged`.
        With `wanted(digest, size)` False (the store has it already, say) the copy goes
        before it is finished — fs-verity reads a whole file — and the third item is None."""
        temp = self._temp()
        try:
            got, size = self._copy(fd, temp, where)
            if digest is not None and got != digest:
                raise SourceChanged("changed while being copied into the store: the tree must not change"
                                    " during the scan", where)
            if wanted is not None and not wanted(got, size):
                temp.discard()
                return got, size, None
            self._finish(temp)
        except BaseException:
            temp.discard()
            raise
        return got, size, (temp.name, temp.dev, temp.ino)

    def adopt(self, name: str, dev: int, ino: int, digest: bytes, size: int) -> None:
        """In the main process: a temp file a worker staged becomes pending, like one imported
        here; if `digest` is pending or found already (two workers, same content), it goes."""
        root = self.root_fd(create=False)  # opened here (and leased) if a worker made the store
        if root is None:
            raise OutputError("cannot adopt a store object: the store vanished", self.root)
        if digest in self._present:
            _unlink_quietly(name, root)
            return
        self._queue(name, digest, dev, ino, size)

    def found(self, digests: list[bytes]) -> None:
        """In the main process: the workers found these digests in the store (a batch's)."""
        if digests:
            self.root_fd(create=False)  # this process holds the lease from now on
            with self._lock:
                new = set(digests).difference(self._present)
                self._present |= new
                self._reused |= new

    def discard_staged(self, name: str) -> None:
        """In the main process, failing: remove a temp file a worker staged and nobody adopted."""
        root = self.root_fd(create=False)
        if root is not None:
            _unlink_quietly(name, root)

    # -- committing -------------------------------------------------------------------------

    def commit(self, keep: set[bytes] | None = None) -> None:
        """The run succeeded: make every pending object durable, then give it its name — all
        of them, or (an error) none.

        With `keep` (digests), a pending object whose digest is not in it is dropped instead,
        and only the objects found in the store that are in it must still be there."""
        with self._commit_lock:
            with self._lock:
                pending, self._pending = self._pending, []
                reused = self._reused if keep is None else self._reused & keep
                if keep is not None:
                    unused = [p for p in pending if p.digest not in keep]
                    if unused:
                        pending = [p for p in pending if p.digest in keep]
                        for p in unused:
                            self._present.discard(p.digest)
                        self._unlink_temps(unused)
            try:
                if pending or reused:
                    if pending:
                        self._sync()
                    self._name_all(pending, reused)
            except BaseException:
                with self._lock:
                    for p in pending:
                        self._present.discard(p.digest)
                self._unlink_temps(pending)
                self._close_fds()
                raise
            self._unlink_temps(pending)
            with self._lock:
                self._reused.clear()
            self._close_fds()
            if not self.held:
                self.release()

    def close(self) -> None:
        """The run failed, or is done (a held store: its image is in place): drop what is
        pending (its temp files are removed) and let go of the store."""
        with self._lock:
            pending, self._pending = self._pending, []
            for p in pending:
                self._present.discard(p.digest)
        self._unlink_temps(pending)
        self._close_fds()
        self.release()

    def release(self) -> None:
        """Let go of the store's lock file: this run relies on nothing in the store any more."""
        with self._lock:
            fd, self._lease = self._lease, -1
        if fd >= 0:
            os.close(fd)

    def _name_all(self, pending: list[_Pending], reused: set[bytes]) -> None:
        """Name every pending object, and check the reused ones are still there, under the
        store's lock; on any failure take back the names made here."""
        root = self.root_fd(create=False)
        if root is None:  # only reused objects, and the store itself is gone
            raise self._vanished(next(iter(reused)))
        locked = flock(root, fcntl.LOCK_EX, self.root)
        named: list[tuple[int, str, _Pending]] = []
        journal = None
        try:
            if locked:
                self._take_back_killed_commits(root)
                if pending:
                    journal = self._write_journal(root, pending)
            for p in pending:
                fan = self._fan(p.digest[0], create=True)
                assert fan is not None
                name = p.digest[1:].hex()
                if self._link(p, fan, name):
                    named.append((fan, name, p))
            gone = self._missing(reused)
            if gone is not None:
                raise self._vanished(gone)
        except BaseException:
            for fan, name, p in reversed(named):
                _unname(fan, name, p.dev, p.ino)
            raise
        finally:
            if journal is not None:
                _unlink_quietly(journal, root)
            if locked:
                flock(root, fcntl.LOCK_UN, self.root)

    def _write_journal(self, root: int, pending: list[_Pending]) -> str:
        """The list of names this commit is about to make (`temp digest` lines), so that the
        next commit takes them back if this process dies before it is done."""
        text = "".join(f"{p.name} {p.digest.hex()}\n" for p in pending).encode()
        for _attempt in range(100):
            name = JOURNAL_PREFIX + os.urandom(8).hex()
            try:
                fd = os.open(name, O_JOURNAL, 0o600, dir_fd=root)
                break
            except FileExistsError:
                continue
            except OSError as e:
                raise _failed(e, "create the commit journal", self.root) from None
        else:
            raise OutputError("cannot create the commit journal: no free name", self.root)
        try:
            write_all(fd, text, self.root)
        except BaseException:
            os.close(fd)
            _unlink_quietly(name, root)
            raise
        os.close(fd)
        return name

    def _take_back_killed_commits(self, root: int) -> None:
        """Undo the commits whose process died while naming (`kill -9`): their journal is
        still there, and since we hold the lock, nobody is writing it.  A name goes only if it
        is still the inode of the temp file listed for it; then the temp file goes too."""
        try:
            names = [n for n in os.listdir(root) if n.startswith(JOURNAL_PREFIX)]
        except OSError:
            return
        for journal in names:
            try:
                fd, st = beneath.open_regular(root, journal.encode())
            except OSError:
                continue
            try:
                text = os.pread(fd, st.st_size, 0)
            except OSError:
                continue
            finally:
                os.close(fd)
            for line in text.splitlines():
                temp, _, hexdigest = line.decode("ascii", "replace").partition(" ")
                if not temp.startswith(TEMP_PREFIX) or "/" in temp or len(hexdigest) not in (64, 128):
                    continue
                try:
                    digest = bytes.fromhex(hexdigest)
                    st = os.stat(temp, dir_fd=root, follow_symlinks=False)
                except (ValueError, OSError):
                    continue  # no temp file to compare with: leave the name alone
                fan = self._fan(digest[0], create=False)
                if fan is not None:
                    _unname(fan, digest[1:].hex(), st.st_dev, st.st_ino)
                _unlink_quietly(temp, root)
            _unlink_quietly(journal, root)

    def _link(self, p: _Pending, fan: int, name: str) -> bool:
        """Give a pending object its name in `fan`; False if the name was there already."""
        try:
            if self.hardlinks:
                try:
                    os.link(p.name, name, src_dir_fd=self._rootfd, dst_dir_fd=fan, follow_symlinks=False)
                    return True
                except FileExistsError:
                    return False  # another importer was first: same name, same content
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                        raise
                    self.hardlinks = False
            try:
                rename_noreplace(self._rootfd, p.name, fan, name)
            except FileExistsError:
                return False
            return True
        except OSError as e:
            raise _failed(e, "name a store object", self.path_of(p.digest)) from None

    def _vanished(self, digest: bytes) -> OutputError:
        return OutputError("this run found the object in the store, and it is gone now (removed during the run:"
                           " by a concurrent import that failed, or by hand): run again", self.path_of(digest))

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
        try:
            found = digest in self
        except BaseException:
            self._release(digest)
            raise
        if found:
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

    def _lookup(self, digest: bytes) -> os.stat_result | None:
        """The stat of `digest`'s object in the store (None: not there), looked up through the
        fan-out directory's descriptor; anything but a regular file there is refused."""
        fan = self._fan(digest[0], create=False)
        if fan is None:
            return None
        name = digest[1:].hex()
        try:
            st = os.stat(name, dir_fd=fan, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise _failed(e, "look up a store object", self.path_of(digest)) from None
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{beneath.kind(st.st_mode)} where a store object belongs: expected a regular file"
                             " (remove it)", self.path_of(digest))
        return st

    def _missing(self, digests: Iterable[bytes]) -> bytes | None:
        """A digest among `digests` whose object is not in the store (None: all are there).
        A fan-out directory is listed (~0.2 µs an entry) where that is cheaper than a lookup
        of each (~3 µs); a name not listed as a regular file is looked up: `_lookup` decides."""
        by_fan: dict[int, list[bytes]] = {}
        for digest in digests:
            by_fan.setdefault(digest[0], []).append(digest)
        for first, group in by_fan.items():
            fan = self._fan(first, create=False)
            listed: set[str] = set()
            if fan is not None and os.fstat(fan).st_size <= 1024 * len(group):  # ~14 entries a KiB
                with contextlib.suppress(OSError):  # (then each is looked up)
                    listed = {e.name for e in os.scandir(fan) if e.is_file(follow_symlinks=False)}
            for digest in group:
                if digest[1:].hex() not in listed and self._lookup(digest) is None:
                    return digest
        return None

    def _copy(self, src: int, temp: _Temp, where: str) -> tuple[bytes, int]:
        """Copy `src` into the temp file; return the digest and size of what it now holds."""
        out = temp.fd
        try:
            if self.reflink:
                try:
                    fcntl.ioctl(out, FICLONE, src)
                    return hash_fd(out, 0, algorithm=self.algorithm)
                except OSError as e:
                    if e.errno not in verity.UNSUPPORTED:
                        raise
                    self.reflink = False
            st = os.fstat(src)
            if mostly_holes(st):  # copied by its map, holes kept (ext4's copy_file_range fills them in)
                truncate(out, st.st_size, self.root)  # (a file system that cannot hold it says so here)
                return hash_by_extents(src, 0, st.st_size, out, self.algorithm)
            if self.copy_range:
                copied = copy_range(src, out)
                if copied:
                    return hash_fd(out, 0, algorithm=self.algorithm)
                if copied is None:
                    self.copy_range = False
            return copy_plain(src, out, self.algorithm)
        except OSError as e:
            if e.errno in _STORE_FULL:
                raise OutputError(f"cannot write a store object: {e.strerror}", self.root) from None
            raise InputError(f"cannot copy into the store: {e.strerror}", where) from None

    def _add(self, temp: _Temp, digest: bytes, written: int) -> None:
        """Finish a temp file holding `digest` (`written` bytes of data) and queue it for the commit."""
        self._finish(temp)
        self._queue(temp.name, digest, temp.dev, temp.ino, written)

    def _finish(self, temp: _Temp) -> None:
        """Give a written temp file its object mode and offer it fs-verity."""
        ro = None
        try:
            os.fchmod(temp.fd, OBJECT_MODE)
            if self.verity:  # a read-only descriptor of the same file: fs-verity needs the writer closed
                ro = beneath.reopen(temp.fd)
            temp.close()
        except OSError as e:
            if ro is not None:
                os.close(ro)
            raise _failed(e, "write a store object", self.root) from None
        if self.verity and not verity.offer(temp, ro, self._rootfd, self._verity_arg):
            self.verity = False  # this file system (or kernel) has no fs-verity

    def _queue(self, name: str, digest: bytes, dev: int, ino: int, written: int) -> None:
        """Pending for the commit; `written`: its bytes of data, which a `syncfs` must flush
        (a sparse object's holes cost none)."""
        with self._lock:
            self._pending.append(_Pending(name, digest, dev, ino))
            self._present.add(digest)
            self._unsynced += 1
            self._unsynced_bytes += written
            due = self._unsynced >= SYNC_OBJECTS or self._unsynced_bytes >= SYNC_BYTES
            if due:
                self._unsynced = self._unsynced_bytes = 0
        if due:
            self._sync()

    def _sync(self) -> None:
        try:
            syscalls.syncfs(self._rootfd)
        except OSError as e:
            raise OutputError(f"cannot sync the store: {e.strerror}", self.root) from None

    def root_fd(self, create: bool) -> int | None:
        """The store directory's descriptor (made, with parents, if `create`; None if it does
        not exist yet)."""
        fd = self._rootfd
        if fd >= 0:
            return fd
        with self._lock:
            if self._rootfd >= 0:
                return self._rootfd
            if create:
                try:
                    os.makedirs(self.root, DIR_MODE, exist_ok=True)
                except (FileExistsError, NotADirectoryError):
                    raise StoreError("not a directory: expected the content store's directory", self.root) from None
                except OSError as e:
                    raise OutputError(f"cannot create the store: {e.strerror}", self.root) from None
            try:
                fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                if create:
                    raise OutputError("cannot open the store: it vanished", self.root) from None
                return None
            except NotADirectoryError:
                raise StoreError("not a directory: expected the content store's directory", self.root) from None
            except OSError as e:
                raise OutputError(f"cannot open the store: {e.strerror}", self.root) from None
            if self._lease < 0:
                try:
                    self._lease = lease(fd, self.root)
                except BaseException:
                    os.close(fd)
                    raise
            self._rootfd = fd
            return fd

    def _fan(self, first: int, create: bool) -> int | None:
        """The descriptor of the fan-out directory `xx` for digests starting with byte
        `first` (made if `create`; None if it does not exist)."""
        fd = self._fans.get(first)
        if fd is not None:
            return fd
        root = self.root_fd(create)
        if root is None:
            return None
        name = f"{first:02x}"
        try:
            fd = beneath.open_dir(root, name)
        except FileNotFoundError:
            if not create:
                return None
            try:
                os.mkdir(name, DIR_MODE, dir_fd=root)
            except FileExistsError:
                pass  # another importer made it (or it is something else: the open below says)
            except OSError as e:
                raise _failed(e, "create a store directory", os.path.join(self.root, name)) from None
            try:
                fd = beneath.open_dir(root, name)
            except OSError as e:
                raise self._fan_error(e, root, name) from None
        except OSError as e:
            raise self._fan_error(e, root, name) from None
        with self._lock:
            kept = self._fans.setdefault(first, fd)
        if kept != fd:
            os.close(fd)
        return kept

    def _fan_error(self, e: OSError, root: int, name: str) -> CfscError:
        where = os.path.join(self.root, name)
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            try:
                what = beneath.kind(os.stat(name, dir_fd=root, follow_symlinks=False).st_mode)
            except OSError:
                what = "not a directory"
            return StoreError(f"{what} where a store directory belongs: expected a directory", where)
        return _failed(e, "open a store directory", where)

    def _temp(self) -> _Temp:
        """A new temp file; the store is created with the first one."""
        root = self.root_fd(create=True)
        assert root is not None
        return _Temp(root, self.root)

    def _unlink_temps(self, pending: list[_Pending]) -> None:
        for p in pending:
            _unlink_quietly(p.name, self._rootfd)

    def _close_fds(self) -> None:
        with self._lock:
            fds = list(self._fans.values())
            self._fans.clear()
            if self._rootfd >= 0:
                fds.append(self._rootfd)
                self._rootfd = -1
        for fd in fds:
            os.close(fd)


def _unname(fan: int, name: str, dev: int, ino: int) -> None:
    """Take back a name a commit made — if it is still that commit's file (its inode)."""
    try:
        st = os.stat(name, dir_fd=fan, follow_symlinks=False)
        if (st.st_dev, st.st_ino) == (dev, ino):
            os.unlink(name, dir_fd=fan)
    except OSError:
        pass

