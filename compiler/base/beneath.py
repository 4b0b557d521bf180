"""Opening files inside a tree cfsc was given: never outside it, never anything but a regular
file, never waiting.

The trees cfsc reads by name are untrusted: a source directory, an OSTree repository, a
`--basedir` of payloads, the content store (whose object names come from images and whose
directories anyone with write access may have swapped).  Every open of a file inside one goes
through here, so the rules are kept in one place:

* Resolution stays beneath the root: `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` where
  the kernel has it (5.6+), else a walk one component at a time with `O_NOFOLLOW`.  Both give
  the same errnos (a test says so): EXDEV (a `..` component, even one that would stay inside;
  an absolute path), ELOOP (a symlink anywhere, the last component included), ENOTDIR (a
  component that is not a directory), ENOENT, EINVAL (an empty path, a NUL byte).
  `symlinks=True` (OSTree's ref aliases are symlinks) follows symlinks that stay beneath the
  root (RESOLVE_BENEATH); the walk cannot check that, so without openat2 it refuses them.
* Nothing but a regular file is opened for reading: the path is opened `O_PATH` first, which
  opens nothing (a FIFO does not block, a device's driver is not called: opening a tape
  rewinds it, opening a watchdog starts it), `fstat`ed, and only a regular file is then opened
  for reading, through `/proc/self/fd` (the same inode, no second lookup to race with).
  Anything else raises `NotRegular`.  Without `/proc` the file is opened
  `O_RDONLY | O_NONBLOCK | O_NOCTTY` directly and checked after.
* `open_listed` is the fast path for a name a directory listing just called a regular file
  (the directory frontend, per file): one `openat(O_NONBLOCK | O_NOCTTY | O_NOFOLLOW)` and the
  `fstat`, no `O_PATH` step.  A FIFO swapped in between does not block it and is refused the
  same way; a device swapped in (by someone who may create devices in the tree) would have
  its driver's open called, never a byte read.  It gives what `open_regular` gives for the
  same name (a test says so).
"""

from __future__ import annotations

import errno
import os
import stat

from cfsc.base import syscalls

RESOLVE = syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_SYMLINKS | syscalls.RESOLVE_NO_MAGICLINKS
RESOLVE_SYMLINKS = syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_MAGICLINKS
O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# What a path leaving the root gives: `..` or absolute (EXDEV), a symlink (ELOOP), no path
# at all (EINVAL: empty, or a NUL byte that would cut it short).
ESCAPES = (errno.EXDEV, errno.ELOOP, errno.EINVAL)

# Tests switch these off to run the fallbacks; `use_proc` is decided at the first open.
use_openat2 = True
use_proc: bool | None = None

_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFLNK: "a symlink"}


def kind(mode: int) -> str:
    """What a file of `mode` is, for messages ("a FIFO")."""
    return _KINDS.get(stat.S_IFMT(mode), "a regular file" if stat.S_ISREG(mode) else f"file type {mode >> 12:o}")


class NotRegular(OSError):
    """The path names something other than a regular file; `st` says what."""

    def __init__(self, path, st: os.stat_result) -> None:
        # ENXIO is open(2)'s own answer for a socket; strerror carries the real reason.
        super().__init__(errno.ENXIO, f"{kind(st.st_mode)}, not a regular file", path)
        self.st = st


def describe(e: OSError) -> str:
    """What an error of this module means, for a message (the bare strerror of ELOOP or EXDEV
    does not say it)."""
    if isinstance(e, NotRegular):
        return e.strerror
    if e.errno == errno.ELOOP:
        return "a symlink on the way (refused: only files inside are read)"
    if e.errno == errno.EXDEV:
        return "the path leads outside"
    if e.errno == errno.EINVAL:
        return "not a usable path (empty, or a NUL byte)"
    if e.errno == errno.ENOTDIR:
        return "a component of the path is not a directory"
    return e.strerror or str(e)


def open_path(dirfd: int, path: bytes, symlinks: bool = False) -> int:
    """An `O_PATH` descriptor of `path` beneath `dirfd` (opens nothing; a symlink as the last
    component is the symlink itself unless `symlinks`)."""
    _check_path(path)
    return _resolve(dirfd, path, O_PATH, symlinks)


def open_regular(dirfd: int, path: bytes, symlinks: bool = False) -> tuple[int, os.stat_result]:
    """A read-only descriptor of the regular file `path` beneath `dirfd`, and its `fstat`.

    OSError with an errno of ESCAPES, ENOTDIR, ENOENT … (see the module docstring); a final
    symlink is ELOOP; any other file type is `NotRegular`, and was never opened for reading."""
    _check_path(path)
    if _have_proc():
        return _through(open_path(dirfd, path, symlinks), path)
    try:
        fd = _open_read(dirfd, path, symlinks)
    except OSError as e:
        raise _refusal(e, lambda: open_path(dirfd, path, symlinks), path) from None
    return fd, _regular_stat(fd, path)


def open_listed(dirfd: int, name: bytes) -> tuple[int, os.stat_result]:
    """`open_regular` for one name in the directory open at `dirfd` that its listing called a
    regular file: the fast path (see the module docstring)."""
    try:
        fd = os.open(name, O_READ, dir_fd=dirfd)
    except OSError as e:
        raise _refusal(e, lambda: os.open(name, O_PATH, dir_fd=dirfd), name) from None
    return fd, _regular_stat(fd, name)


def open_named(path) -> tuple[int, os.stat_result]:
    """A regular file a caller named by path (directories on the way are the caller's choice,
    so symlinks there are followed; the last component must not be one)."""
    if _have_proc():
        return _through(os.open(path, O_PATH), path)
    try:
        fd = os.open(path, O_READ)
    except OSError as e:
        raise _refusal(e, lambda: os.open(path, O_PATH), path) from None
    return fd, _regular_stat(fd, path)


def reopen(fd: int, flags: int = os.O_RDONLY) -> int | None:
    """A new descriptor (new file description, `flags`) of the file open at `fd`: the same
    inode, never a name looked up again.  None without /proc."""
    if not _have_proc():
        return None
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC | os.O_NOCTTY)


def open_dir(dirfd: int, name: bytes) -> int:
    """The directory `name` in the directory open at `dirfd`, not following a symlink
    (ENOTDIR for a symlink or anything else that is not a directory)."""
    return os.open(name, O_DIR, dir_fd=dirfd)


def _have_proc() -> bool:
    global use_proc
    if use_proc is None:
        use_proc = os.path.isdir("/proc/self/fd")
    return use_proc


def _reopen(pfd: int) -> int:
    return os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)


def _check_path(path: bytes) -> None:
    # `..` is refused even where it would stay beneath (openat2 would take `d/../f`, the walk
    # cannot check that): one rule for both.  A NUL would cut the path short in C.
    if not path or b"\0" in path:
        raise OSError(errno.EINVAL, "an empty path or one with a NUL byte", path)
    if b".." in path.split(b"/"):
        raise OSError(errno.EXDEV, "the path leaves the directory", path)


def _through(pfd: int, path) -> tuple[int, os.stat_result]:
    """The file an O_PATH descriptor names, opened for reading if it is a regular file."""
    try:
        st = os.fstat(pfd)
        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISLNK(st.st_mode):
                raise OSError(errno.ELOOP, "a symlink", path)
            raise NotRegular(path, st)
        return _reopen(pfd), st
    finally:
        os.close(pfd)


def _refusal(e: OSError, open_path_fd, path) -> OSError:
    """open(2) refuses a socket (ENXIO) and a device without a driver (ENXIO, ENODEV): say
    what the file is, as the O_PATH way does."""
    if e.errno in (errno.ENXIO, errno.ENODEV):
        try:
            pfd = open_path_fd()
        except OSError:
            return e
        try:
            st = os.fstat(pfd)
        finally:
            os.close(pfd)
        if not stat.S_ISREG(st.st_mode):
            return NotRegular(path, st)
    return e


def _open_read(dirfd: int, path: bytes, symlinks: bool) -> int:
    """Without /proc: the file opened for reading directly (O_NONBLOCK: a FIFO does not block)."""
    return _resolve(dirfd, path, O_READ, symlinks)


def _resolve(dirfd: int, path: bytes, flags: int, symlinks: bool) -> int:
    """`path` opened with `flags` beneath `dirfd`: by openat2 (symlinks that stay inside
    followed, the last one too, if `symlinks`), or on kernels without it by the component
    walk, which follows none."""
    global use_openat2
    if use_openat2:
        try:
            return syscalls.openat2(dirfd, path, flags & ~os.O_NOFOLLOW if symlinks else flags,
                                    RESOLVE_SYMLINKS if symlinks else RESOLVE)
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
            use_openat2 = False
    return _walk(dirfd, path, flags)


def _regular_stat(fd: int, path) -> os.stat_result:
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(path, st)
    except BaseException:
        os.close(fd)
        raise
    return st


def _walk(dirfd: int, path: bytes, flags: int) -> int:
    """Open `path` beneath `dirfd` one component at a time, following no symlink (where
    openat2 is missing); the same errnos as openat2 with RESOLVE (a symlinked directory on the
    way is ELOOP, as there, not the ENOTDIR `O_NOFOLLOW | O_DIRECTORY` gives)."""
    parts = [p for p in path.split(b"/") if p and p != b"."]
    if path.startswith(b"/") or b".." in parts:
        raise OSError(errno.EXDEV, "the path leaves the directory", path)
    if not parts:
        raise OSError(errno.EINVAL, "an empty path", path)
    fd = dirfd
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except NotADirectoryError:
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, "a symlink on the way", path) from None
                raise
            if fd != dirfd:
                os.close(fd)
            fd = nxt
        return os.open(parts[-1], flags, dir_fd=fd)
    finally:
        if fd != dirfd:
            os.close(fd)
