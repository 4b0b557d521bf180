"""External file data: backing files opened from the store(s), confined and verified.

Every reader of a store goes through here: the FUSE server, `fsck-store`, the CRFS
frontend's `--payload-dir`.

A payload comes from the image, so it is untrusted: `../`, an absolute path or a symlink
anywhere on the way must never reach a file outside the base directory, and a FIFO or device
in the store must neither block a server thread nor be opened: files are opened with
`cfsc.base.beneath.open_regular`, which refuses all of that.  Base directories are tried in order (`A:B`, like
overlayfs' data-only layers): only "not found" moves on to the next.

Integrity (`verity`): when the image records an fs-verity digest for a file, the backing
file's digest is taken before any byte is served — from the kernel (FS_IOC_MEASURE_VERITY)
when the file has fs-verity enabled with the digest's algorithm, which is instant, else computed here
over the whole file (SHA-256 or SHA-512: the recorded digest's size tells).  Computed digests
are cached per backing file by (device, inode, size, mtime, ctime, algorithm),
so a file replaced or rewritten in place is measured again.  `require` also refuses files
the image records no digest for; `none` checks nothing.

Every refusal is an `OSError` subclass whose errno is the reply (ENOENT for a missing
object, as the kernel mount gives; EIO otherwise) and whose text is the one log line.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from itertools import islice

from cfsc.base import beneath
from cfsc.base.beneath import ESCAPES, NotRegular, kind
from cfsc.base.errors import IntegrityError, LookupFailed, UsageError, shown_path
from cfsc.base.fsverity import SHA256, FsVerityAlgorithm, algorithm_of, digest_bytes, hash_fd, kernel_digest

# Checking backing files against the image's fs-verity digests: never, where the image has
# a digest, always (a file without one is refused).
VERITY_MODES = ("none", "if-present", "require")
NO_VERITY, VERITY_IF_PRESENT, VERITY_REQUIRED = VERITY_MODES
DIGEST_CACHE = 1 << 16
READ_CHUNK = 1 << 20


class Refused(LookupFailed):
    """A backing file could not be opened; `cause` is the system's errno (the reply is EIO)."""

    def __init__(self, what: str, where: str, cause: int) -> None:
        super().__init__(what, where, errno.EIO)
        self.cause = cause


class WrongType(LookupFailed):
    """A backing file that is not a regular file (a FIFO, a directory …; `kind` says): EIO."""

    def __init__(self, payload: bytes, kind: str, where: str) -> None:
        super().__init__(f"object {shown_path(payload)} is not a regular file ({kind})", where, errno.EIO)
        self.kind = kind


class Cancelled(Exception):
    """The request asking for the data was interrupted."""


def parse_basedirs(value: str) -> list[str]:
    """`A:B:C` as upstream's `basedir=` takes it (empty parts are ignored)."""
    return [part for part in value.split(":") if part]


def verity_mode(value: str, where: str = "--verity") -> str:
    """A verity mode a user gave, checked."""
    if value not in VERITY_MODES:
        raise UsageError(f"verity mode {value!r}: expected {', '.join(VERITY_MODES[:-1])} or {VERITY_MODES[-1]}", where)
    return value


class Store:
    """The base directories external payloads are opened from."""

    def __init__(self, basedirs: list[str], verity: str = VERITY_IF_PRESENT) -> None:
        if verity not in VERITY_MODES:
            raise ValueError(f"verity mode {verity!r}")
        self.basedirs = list(basedirs)
        self.verity = verity
        self.fds = []
        try:
            for d in self.basedirs:
                self.fds.append(os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        except OSError as e:
            self.close()
            raise LookupFailed(f"cannot open the store directory: {e.strerror}", d, e.errno) from None
        self._digests: dict[tuple, bytes] = {}
        self._no_kernel_verity: set[int] = set()  # devices whose file system has no fs-verity
        self.measured = 0  # bytes hashed in userspace (for statistics)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    # -- opening -------------------------------------------------------------------------

    def open(self, payload: bytes, digest: bytes | None, cancelled: Callable[[], bool] | None = None,
             where: str = "") -> int:
        """A read-only fd of the verified backing file of `payload`.

        `cancelled` is polled while a digest is computed; `where` names the file in the
        image in errors (callers may fill it in later: `error.where`).
        """
        return self.open_read(payload, digest, -1, cancelled, where)[0]

    def open_read(self, payload: bytes, digest: bytes | None, limit: int,
                  cancelled: Callable[[], bool] | None = None, where: str = "") -> tuple[int, bytes | None, int]:
        """`open`, plus the whole content of a file of at most `limit` bytes (else None),
        read once: the bytes checked against the digest are the bytes a server hands out,
        and a small file costs one read instead of one to verify and one to serve; and its
        size when opened (passthrough compares it with the image's, no second fstat)."""
        if digest is None and self.verity == VERITY_REQUIRED:
            raise IntegrityError(f"no fs-verity digest recorded for object {shown_path(payload)} "
                                 "(--verity=require)", where)
        if not self.fds:
            raise LookupFailed(f"object {shown_path(payload)} needs a store, and none was given"
                               " (mount --store DIR; composefs-fuse -o basedir=DIR)",
                               where, errno.EIO)
        fd, st = self._find(payload, where)
        data = None
        try:
            if st.st_size <= limit:
                try:
                    data = os.pread(fd, st.st_size + 1, 0)  # one byte more shows a file that grew
                except OSError as e:
                    raise IntegrityError(f"object {shown_path(payload)}: cannot read it: {e.strerror}", where) from None
                if len(data) != st.st_size:
                    data = None  # changed under us: verified (and served) the long way
            if digest is not None and self.verity != "none":
                self._verify(fd, st, payload, digest, where, cancelled, data)
        except BaseException:
            os.close(fd)
            raise
        return fd, data, st.st_size

    def recheck(self, fd: int, payload: bytes, digest: bytes | None,
                cancelled: Callable[[], bool] | None = None) -> None:
        """Check a backing file opened earlier again before it is used again: free unless
        its size, mtime or ctime changed since it was measured (it was written to)."""
        if digest is not None and self.verity != "none":
            self._verify(fd, os.fstat(fd), payload, digest, "", cancelled)

    def _find(self, payload: bytes, where: str) -> tuple[int, os.stat_result]:
        for basedir, dirfd in zip(self.basedirs, self.fds, strict=True):
            try:
                return beneath.open_regular(dirfd, payload)
            except FileNotFoundError:
                continue
            except NotRegular as e:
                raise WrongType(payload, kind(e.st.st_mode), where) from None
            except OSError as e:
                if e.errno in ESCAPES:
                    raise Refused(f"object {shown_path(payload)} leads outside the store {basedir} "
                                  f"({os.strerror(e.errno)}): refused", where, e.errno) from None
                if e.errno == errno.ENOTDIR:
                    raise Refused(f"object {shown_path(payload)} in {basedir}: a component of the path is not a "
                                  "directory", where, e.errno) from None
                raise Refused(f"object {shown_path(payload)} in {basedir}: {os.strerror(e.errno)}",
                              where, e.errno) from None
        stores = ":".join(self.basedirs)
        raise LookupFailed(f"object {shown_path(payload)} not found in {stores}", where, errno.ENOENT)

    # -- verification --------------------------------------------------------------------

    def _verify(self, fd: int, st: os.stat_result, payload: bytes, digest: bytes, where: str,
                cancelled: Callable[[], bool] | None, data: bytes | None = None) -> None:
        """Raise unless the file's fs-verity digest is `digest`; `data`: its whole content,
        already read (hashed instead of reading it again)."""
        got = None
        algorithm = algorithm_of(digest) or SHA256  # (the image reader yields no other size)
        if st.st_dev not in self._no_kernel_verity:
            got = kernel_digest(fd, algorithm)
            if got is False:  # this file system has no fs-verity at all: stop asking it
                self._no_kernel_verity.add(st.st_dev)
        if not got:
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, algorithm.id)
            got = self._digests.get(key)
            if got is None:
                try:
                    if data is not None:
                        self.measured += len(data)
                        got = digest_bytes(data, algorithm)
                    else:
                        got = self._measure(fd, st.st_size, cancelled, algorithm)
                except OSError as e:
                    raise IntegrityError(f"object {shown_path(payload)}: cannot read it to check its "
                                         f"digest: {e.strerror}", where) from None
                self._digests[key] = got
                if len(self._digests) > DIGEST_CACHE:
                    for old in list(islice(self._digests, DIGEST_CACHE // 4)):
                        self._digests.pop(old, None)
        if got != digest:
            raise IntegrityError(f"object {shown_path(payload)}: fs-verity digest {got.hex()}, the image "
                                 f"records {digest.hex()} (tampered or corrupt): refused", where)

    def _measure(self, fd: int, size: int, cancelled: Callable[[], bool] | None,
                 algorithm: FsVerityAlgorithm = SHA256) -> bytes:
        """The fs-verity digest of what `fd` holds now (whatever `size` fstat said)."""
        if size < READ_CHUNK:  # the usual small object: one read (one more byte shows EOF)
            data = os.pread(fd, size + 1, 0)
            if len(data) <= size:
                self.measured += len(data)
                return digest_bytes(data, algorithm)
        def poll() -> None:
            if cancelled is not None and cancelled():
                raise Cancelled

        got, n = hash_fd(fd, 0, algorithm=algorithm, poll=poll)  # (a sparse object: by its map)
        self.measured += n
        return got
