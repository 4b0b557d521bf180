"""The store's two locks: who may change which names, and when `cfsc gc` may run.

* The commit lock: an exclusive `flock` on the store directory itself, held by a commit while
  it makes (or takes back) object names (`cfsc.store.objects`), so that two commits never
  rely on a name the other is about to take back.
* The lease: a `flock` on the lock file `DIR/.cfsc-lock`.  Every run that uses the store
  (`cfsc.store.objects.Store`) holds it *shared* from the moment it first opens the store —
  before its first lookup, so before it finds any object it will rely on and before it
  writes any temp file — until it is done: a compile until its image has been renamed into
  place, any other run until it commits or gives up.  `cfsc gc` holds it *exclusively*
  while it reads the images to keep and removes what they do not need.  So gc and a run in
  flight never overlap: an object that run found or named cannot vanish before its image
  exists, and every temp file gc sees belongs to a run that is over (killed).

Always the lease first, then the commit lock (a commit happens inside a lease; gc takes
both): no two processes wait on each other in opposite orders.  Shared holders never wait
for each other; a run waits while gc holds the lease (gc is bounded: one pass over the store).
gc waits for runs in flight up to a timeout, polling: `flock` grants a shared lock whenever
no exclusive one is held, so a blocking exclusive request could wait forever behind a stream
of overlapping compiles, and a poll can give up with a clear message.

The lock file is made with the store (or by the first run to open it) and stays: removing a
lock file others may hold open would let two holders lock two different files.  A store
where it cannot be made (read-only: such a run imports nothing) or where `flock` does not
work (some network file systems) is used without a lease; gc refuses such a store.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

from cfsc.base import beneath
from cfsc.base.errors import CfscError, OutputError, StoreError

LOCK_NAME = ".cfsc-lock"
LOCK_MODE = 0o644
_POLL = (0.002, 0.05)  # gc's first and longest wait between attempts, in seconds


class StoreBusy(CfscError):
    """Runs in flight held the store longer than gc would wait (exit 1: try again later)."""

    exit_code = 1


def open_lock(root: int, where: str, create: bool = True) -> int:
    """A read-only descriptor of the store's lock file (made if missing and `create`); -1
    where it cannot be made (a read-only store, no write permission)."""
    path = os.path.join(where, LOCK_NAME)
    flags = beneath.O_READ
    try:
        fd = os.open(LOCK_NAME, flags, dir_fd=root)
    except FileNotFoundError:
        if not create:
            return -1
        try:
            fd = os.open(LOCK_NAME, flags | os.O_CREAT, LOCK_MODE, dir_fd=root)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return -1
            raise OutputError(f"cannot create the store's lock file: {e.strerror}", path) from None
    except OSError as e:
        # A symlink (ELOOP), a socket (ENXIO) …: the store's shape, named, not the system's refusal.
        try:
            mode = os.stat(LOCK_NAME, dir_fd=root, follow_symlinks=False).st_mode
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise _not_regular(mode, path) from None
        raise OutputError(f"cannot open the store's lock file: {e.strerror}", path) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(mode, path)
    return fd


def _not_regular(mode: int, path: str) -> StoreError:
    return StoreError(f"{beneath.kind(mode)} where the store's lock file belongs: expected a regular file", path)


def lease(root: int, where: str) -> int:
    """The store's lock file locked shared, waiting while gc holds it; -1: no lease to be had."""
    fd = open_lock(root, where)
    if fd >= 0 and not flock(fd, fcntl.LOCK_SH, where):
        os.close(fd)
        return -1
    return fd


def exclusive(fd: int, where: str, timeout: float, what: str) -> None:
    """Lock `fd` exclusively, polling for up to `timeout` seconds; `StoreBusy` after that.
    `what` says who would hold it meanwhile, for the message."""
    deadline = time.monotonic() + timeout
    pause = _POLL[0]
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise OutputError("cannot lock the store: this file system has no flock(2), so gc cannot tell"
                                  " whether a compile is using the store", where) from None
            raise OutputError(f"cannot lock the store: {e.strerror}", where) from None
        left = deadline - time.monotonic()
        if left <= 0:
            raise StoreBusy(f"in use by {what} for more than {timeout:g} s (--wait): nothing done, try again later",
                            where)
        time.sleep(min(pause, left))
        pause = min(pause * 2, _POLL[1])


def flock(fd: int, op: int, where: str) -> bool:
    """flock(2); False where the file system has no locks (ENOLCK: some network file systems)."""
    try:
        fcntl.flock(fd, op)
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return False
        raise OutputError(f"cannot lock the store: {e.strerror}", where) from None
    return True
