"""Linux system calls Python's `os` lacks: mount, openat2, the new mount API, syncfs,
renameat2, capabilities, the parent-death signal.

Called through libc with ctypes; every failure is an `OSError` with the errno the kernel
returned.  Syscall numbers are the generic table's (the same on x86-64, arm64, riscv64 …
for calls added since 5.1), so no per-architecture lists are needed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_SILENT = 32768
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
SYS_OPENAT2 = 437
SYS_MOUNT_SETATTR = 442
FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOVE_MOUNT_F_EMPTY_PATH = 4
MOUNT_ATTR_RDONLY = 1
MOUNT_ATTR_NOSUID = 2
MOUNT_ATTR_NODEV = 4
MOUNT_ATTR_NOEXEC = 8
MOUNT_ATTR_RELATIME = 0
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MOUNT_ATTR_IDMAP = 0x100000
AT_EMPTY_PATH = 0x1000
# struct mount_attr (linux/mount.h, MOUNT_ATTR_SIZE_VER0): attr_set, attr_clr, propagation, userns_fd.
MOUNT_ATTR = struct.Struct("=QQQQ")

# struct open_how (linux/openat2.h): flags, mode, resolve.
OPEN_HOW = struct.Struct("=QQQ")
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

CAP_SYS_ADMIN = 21


def _check(result: int, what: str, path=None) -> int:
    """`result`, or the OSError of errno (`what` names the call for tracebacks)."""
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path if path is not None else what)
    return result


def _c(s) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(source, target, fstype: str, flags: int, data) -> None:
    _check(_libc.mount(_c(source), _c(target), fstype.encode(), flags, _c(data)), f"mount {fstype}", target)


def umount2(target, flags: int = 0) -> None:
    _check(_libc.umount2(_c(target), flags), "umount", target)


_openat2 = _libc["syscall"]  # a function object of its own, typed for this one call
_openat2.restype = ctypes.c_long
_openat2.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
_open_how: dict[tuple[int, int], ctypes.Array] = {}


def openat2(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
    """`openat2(2)`; ENOSYS on kernels before 5.6."""
    how = _open_how.get((flags, resolve))
    if how is None:
        how = _open_how[flags, resolve] = ctypes.create_string_buffer(OPEN_HOW.pack(flags, 0, resolve), OPEN_HOW.size)
    return _check(_openat2(SYS_OPENAT2, dirfd, path, how, OPEN_HOW.size), "openat2", path)


RENAME_NOREPLACE = 1


def syncfs(fd: int) -> None:
    """syncfs(2): write back the file system holding `fd`."""
    _check(_libc.syncfs(fd), "syncfs")


PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> None:
    """prctl(PR_SET_PDEATHSIG): this process gets `sig` when its parent dies."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0), "prctl")


def renameat2(src_dir: int, src, dst_dir: int, dst, flags: int) -> None:
    """renameat2(2) (glibc 2.28+; ENOSYS without the wrapper)."""
    call = getattr(_libc, "renameat2", None)
    if call is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), "renameat2")
    _check(call(src_dir, _c(src), dst_dir, _c(dst), flags), "renameat2", dst)


def fsopen(fstype: str) -> int:
    return _check(_libc.syscall(SYS_FSOPEN, ctypes.c_char_p(fstype.encode()), ctypes.c_uint(FSOPEN_CLOEXEC)),
                  f"fsopen {fstype}")


def fsconfig(fsfd: int, cmd: int, key: str | None = None, value=None) -> None:
    _check(_libc.syscall(SYS_FSCONFIG, ctypes.c_int(fsfd), ctypes.c_uint(cmd), ctypes.c_char_p(_c(key)),
                         ctypes.c_char_p(_c(value)), ctypes.c_int(0)),
           f"fsconfig {key}" + (f"={os.fsdecode(value)}" if value is not None else "") if key else "fsconfig create")


def fsmount(fsfd: int, attr_flags: int) -> int:
    return _check(_libc.syscall(SYS_FSMOUNT, ctypes.c_int(fsfd), ctypes.c_uint(FSMOUNT_CLOEXEC),
                                ctypes.c_uint(attr_flags)), "fsmount")


def move_mount(mntfd: int, target) -> None:
    _check(_libc.syscall(SYS_MOVE_MOUNT, ctypes.c_int(mntfd), ctypes.c_char_p(b""), ctypes.c_int(-100),
                         ctypes.c_char_p(_c(target)), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)),
           "move_mount", target)


def mount_setattr_idmap(mntfd: int, userns_fd: int) -> None:
    """Make the detached mount `mntfd` idmapped with the user namespace `userns_fd` (5.12+)."""
    attr = ctypes.create_string_buffer(MOUNT_ATTR.pack(MOUNT_ATTR_IDMAP, 0, 0, userns_fd), MOUNT_ATTR.size)
    _check(_libc.syscall(SYS_MOUNT_SETATTR, ctypes.c_int(mntfd), ctypes.c_char_p(b""),
                         ctypes.c_uint(AT_EMPTY_PATH), attr, ctypes.c_size_t(MOUNT_ATTR.size)), "mount_setattr")


def effective_caps(pid: int | str = "self") -> int:
    """The effective capability set of a process (0 if it is gone or not visible)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def has_cap_sys_admin(pid: int | str = "self") -> bool:
    return bool(effective_caps(pid) >> CAP_SYS_ADMIN & 1)
