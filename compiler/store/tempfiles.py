"""Temp files at the top of a content store (`DIR/.cfsc-tmp-` and 16 hex digits), where every
object is written before it gets its name (`cfsc.store.objects`), and the store's one way of
turning a refused system call into an error."""

from __future__ import annotations

import errno
import os

from cfsc.base.errors import CfscError, OutputError, StoreError

TEMP_PREFIX = ".cfsc-tmp-"
# A forked hashing worker's temp names start with its tag (8 of the 16 hex digits), so a run whose
# worker was killed before it could report a temp file still finds and removes it
# (`remove_tagged`); "" in every other process: all 16 digits random.
tag = ""
O_TEMP = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Temp:
    """A temp file at the top of the store; `fd` is closed exactly once (fd numbers are reused
    by threads)."""

    __slots__ = ("dev", "fd", "ino", "name", "rootfd")

    def __init__(self, rootfd: int, root: str) -> None:
        self.rootfd = rootfd
        for _attempt in range(100):
            self.name = TEMP_PREFIX + tag + os.urandom(8 - len(tag) // 2).hex()
            try:
                self.fd = os.open(self.name, O_TEMP, 0o600, dir_fd=rootfd)
                break
            except FileExistsError:
                continue
            except OSError as e:
                raise failed(e, "create a temporary file in the store", root) from None
        else:
            raise OutputError("cannot create a temporary file in the store: no free name", root)
        st = os.fstat(self.fd)
        self.dev, self.ino = st.st_dev, st.st_ino

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def discard(self) -> None:
        try:
            self.close()
        except OSError:
            pass
        unlink_quietly(self.name, self.rootfd)


def failed(e: OSError, doing: str, where: str) -> CfscError:
    """A store operation the system refused: the store's own shape (a symlink or file on the
    way: StoreError, bad input) or the environment (OutputError)."""
    if e.errno in (errno.ENOTDIR, errno.ELOOP):
        return StoreError(f"cannot {doing}: {e.strerror}: expected a directory on the way", where)
    hint = ""
    if e.errno == errno.EXDEV:
        hint = " (the store must be one file system: is one of its directories another mount?)"
    return OutputError(f"cannot {doing}: {e.strerror}{hint}", where)


def unlink_quietly(name: str, dirfd: int) -> None:
    try:
        os.unlink(name, dir_fd=dirfd)
    except OSError:
        pass


def remove_tagged(rootfd: int | None, tags: list[str]) -> None:
    """Remove the temp files whose names carry one of `tags` from the top of the store whose
    directory `rootfd` is (a failed run's dead workers' leftovers; quietly: the run is failing
    already).  A foreign temp name shares a tag's 8 digits with odds of 2**-32 per worker; it
    would fail that other run's commit loudly, never name a wrong object."""
    prefixes = tuple(TEMP_PREFIX + t for t in tags if t)
    if rootfd is None or not prefixes:
        return
    try:
        for name in os.listdir(rootfd):
            if name.startswith(prefixes):
                unlink_quietly(name, rootfd)
    except OSError:
        pass
