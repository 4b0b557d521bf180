"""Attaching a FUSE connection to a mount point, and detaching it.

As root (CAP_SYS_ADMIN): open `/dev/fuse` and `mount(2)` it with `fd=N` — the kernel wants
`fd`, `rootmode`, `user_id` and `group_id`.  As an ordinary user: the setuid `fusermount3`
does the policy checks (mount point owned by the user, `user_allow_other` for
`allow_other`) and the mount, then hands the device fd back over a socket whose number it
finds in `_FUSE_COMMFD`, with one data byte and SCM_RIGHTS — libfuse's protocol.

Both mounts are read-only with `default_permissions` (the kernel checks modes, and ACLs
when the image has them, as it does for the kernel composefs mount).  The file system type
is `fuse.composefs` and the source the image path, so `findmnt` tells what is mounted.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess

from cfsc.base import syscalls
from cfsc.base.errors import CfscError, InputError

DEVICE = "/dev/fuse"
SUBTYPE = "composefs"


class MountError(CfscError):
    """Mounting or unmounting failed; `where` is the mount point."""

    exit_code = 1


def privileged() -> bool:
    return syscalls.has_cap_sys_admin()


def check_mountpoint(mountpoint: str) -> None:
    try:
        st = os.stat(mountpoint)
    except OSError as e:
        raise InputError(f"cannot use as a mount point: {e.strerror}", mountpoint) from None
    if not stat.S_ISDIR(st.st_mode):
        raise InputError("the mount point is not a directory", mountpoint)


def mount_fuse(mountpoint: str, source: str, *, allow_other: bool | None = None) -> int:
    """Mount a new FUSE connection read-only on `mountpoint`; returns the device fd.

    `allow_other` (default: as root yes, else no) lets other users in, as with a kernel
    mount; an ordinary user needs `user_allow_other` in /etc/fuse.conf for it.
    """
    check_mountpoint(mountpoint)
    if privileged():
        return _mount_privileged(mountpoint, source, True if allow_other is None else allow_other)
    return _mount_fusermount(mountpoint, source, bool(allow_other))


def _mount_privileged(mountpoint: str, source: str, allow_other: bool) -> int:
    try:
        fd = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(f"cannot open {DEVICE}: {e.strerror}", mountpoint) from None
    options = f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},default_permissions"
    if allow_other:
        options += ",allow_other"
    try:
        syscalls.mount(source, mountpoint, f"fuse.{SUBTYPE}", syscalls.MS_RDONLY, options)
    except OSError as e:
        os.close(fd)
        raise MountError(f"mount failed: {e.strerror}", mountpoint) from None
    return fd


def _fusermount() -> str:
    path = shutil.which("fusermount3") or shutil.which("fusermount")
    if path is None:
        raise MountError("mounting as an ordinary user needs fusermount3 (Debian package fuse3)", "fusermount3")
    return path


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,")


def _mount_fusermount(mountpoint: str, source: str, allow_other: bool) -> int:
    options = f"ro,default_permissions,fsname={_escape(source)},subtype={SUBTYPE}"
    if allow_other:
        options += ",allow_other"
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        p = subprocess.run([_fusermount(), "-o", options, "--", mountpoint], env=env,
                           pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                           capture_output=True)
        theirs.close()
        if p.returncode != 0:
            said = p.stderr.decode(errors="replace").strip().splitlines()
            raise MountError(f"fusermount3 failed: {said[-1] if said else f'exit status {p.returncode}'}",
                             mountpoint)
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise MountError("fusermount3 did not hand over the /dev/fuse descriptor", mountpoint)
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        theirs.close()
        ours.close()


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """Unmount a FUSE (or kernel composefs) mount; `lazy` detaches it even while busy."""
    if privileged():
        try:
            syscalls.umount2(mountpoint, (syscalls.MNT_DETACH if lazy else 0) | syscalls.UMOUNT_NOFOLLOW)
        except OSError as e:
            why = "nothing is mounted there" if e.errno == errno.EINVAL else e.strerror
            raise MountError(f"unmount failed: {why}", mountpoint) from None
        return
    p = subprocess.run([_fusermount(), "-u", *(["-z"] if lazy else []), "--", mountpoint],
                       stdin=subprocess.DEVNULL, capture_output=True)
    if p.returncode != 0:
        said = p.stderr.decode(errors="replace").strip().splitlines()
        raise MountError(f"fusermount3 -u failed: {said[-1] if said else f'exit status {p.returncode}'}",
                         mountpoint)
