"""The kernel composefs mount: EROFS plus overlayfs, as upstream `mount.composefs` makes it.

1. The image is mounted as EROFS on a private temporary directory: straight from the file
   where the kernel can (file-backed EROFS, Linux 6.12+), else through a read-only,
   auto-clearing loop device; `noacl` unless the image's header says it has ACLs.
2. overlayfs goes on the mount point: the EROFS mount as the only lower layer, each base
   directory as a data-only layer (`datadir+`, or `::` in the legacy option string),
   `metacopy=on,redirect_dir=on`, and `verity=on|require` for `--verity if-present|require`.
3. The EROFS mount is detached at once: overlayfs holds it, so unmounting the mount point
   (`cfsc umount`, `umount`) releases everything, loop device included.

The kernel checks digests only through fs-verity on the store's files.  When `--verity`
asks for checks, one object of the image is probed first; if the store has no fs-verity
the mount is refused with a clear message instead of every read failing with EIO.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import tempfile

from cfsc.backends.erofs.layout import COMPOSEFS_FLAGS_HAS_ACL
from cfsc.backends.erofs.reader import HEAD_SIZE, Image
from cfsc.base import syscalls
from cfsc.base.errors import InputError, UsageError
from cfsc.base.fsverity import SHA256, algorithm_of, hash_fd, kernel_digest
from cfsc.fuse import check_digest, checked_view, parse_digest
from cfsc.fuse.attach import MountError, check_mountpoint, privileged
from cfsc.store.backing import NO_VERITY, VERITY_IF_PRESENT, VERITY_REQUIRED, Store

SOURCE = "composefs"
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
# struct loop_config: fd, block_size, struct loop_info64 (lo_device, lo_inode, lo_rdevice,
# lo_offset, lo_sizelimit, lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags,
# lo_file_name[64], lo_crypt_name[64], lo_encrypt_key[32], lo_init[2]), __reserved[8].
LOOP_CONFIG = struct.Struct("=II QQQQQ IIII 64s64s32s 16x 64x")
assert LOOP_CONFIG.size == 304
VERITY = {NO_VERITY: None, VERITY_IF_PRESENT: "on", VERITY_REQUIRED: "require"}  # -> overlayfs' verity=


def mount_kernel(image_path: str, mountpoint: str, options) -> None:
    if not privileged():
        raise UsageError("the kernel mount needs root (CAP_SYS_ADMIN); without it use the FUSE mount",
                         "--kernel")
    if not options.basedirs:
        raise UsageError("the kernel mount needs --store: overlayfs takes the store as its data layer",
                         "--kernel")
    check_mountpoint(mountpoint)
    basedirs = [os.path.abspath(d) for d in options.basedirs]
    try:
        fd = os.open(image_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror}", image_path) from None
    try:
        # Checked from the very file the kernel will mount (one open file): the image its
        # superblock declares is parsed, the whole file digested (streamed: what the kernel
        # measures), so a file padded with a gigabyte of anything is never held.
        image = Image(_read_fd(fd), image_path)
        checked_view(image, options.noacl)  # a corrupt image fails here, located, unmounted
        if options.digest is not None:
            algorithm = algorithm_of(parse_digest(options.digest))  # its length tells
            kernel = kernel_digest(fd, algorithm)
            if kernel and kernel.hex() == options.digest.lower():
                pass  # fs-verity on the image: the kernel keeps it that way
            else:
                check_digest(hash_fd(fd, 0, algorithm=algorithm)[0], options.digest, image_path)
        verity = VERITY[options.verity]
        if verity is not None:
            _probe_store(image, basedirs)
        _mount(fd, image_path, bool(image.flags & COMPOSEFS_FLAGS_HAS_ACL) and not options.noacl, mountpoint,
               basedirs, verity, options.verity == VERITY_REQUIRED, options.loop)
    finally:
        os.close(fd)


def _read_fd(fd: int) -> bytes:
    """The image in `fd`: its head, then up to the size its superblock declares."""
    chunks = [os.pread(fd, HEAD_SIZE, 0)]
    offset = len(chunks[0])
    end = Image.declared_size(chunks[0])
    while offset < end:
        chunk = os.pread(fd, min(1 << 22, end - offset), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _probe_store(image, basedirs: list[str]) -> None:
    """Refuse a verity mount over a store whose objects have no fs-verity: the kernel would
    then fail every read of a file with a digest."""
    # start-up: the entry walker ~10 ms; only a verity mount over a store needs it
    from cfsc.backends.erofs.entries import walk

    for _path, e, first in walk(image):
        if first is None and e.digest is not None and e.payload:
            break
    else:
        return
    store = Store(basedirs, "none")
    try:
        try:
            fd = store.open(e.payload, None, where=image.name)
        except OSError:
            return  # not there: nothing to learn
        try:
            got = kernel_digest(fd, algorithm_of(e.digest) or SHA256)
            if not got:
                why = ("the store's file system or this kernel has no fs-verity" if got is False
                       else "the store's objects have no fs-verity enabled")
                raise UsageError(
                    f"{why} (e.g. {e.payload.decode(errors='replace')}), so the kernel cannot check the "
                    "image's digests: pass --verity none, or mount without --kernel (the FUSE mount "
                    "checks digests itself)", "--verity")
        finally:
            os.close(fd)
    finally:
        store.close()


def _mount(fd: int, image_path: str, acl: bool, mountpoint: str, basedirs: list[str],
           verity: str | None, require: bool, loop: bool) -> None:
    lower = tempfile.mkdtemp(prefix=".composefs.")
    loopfd = None
    try:
        source = f"/proc/self/fd/{fd}"
        try:
            if loop:
                raise OSError(errno.ENOTBLK, "loop device requested")
            syscalls.mount(source, lower, "erofs", syscalls.MS_RDONLY, None if acl else "noacl")
        except OSError as e:
            if e.errno != errno.ENOTBLK:
                raise MountError(f"cannot mount the image as EROFS: {e.strerror}", image_path) from None
            loopfd, source = _loop_device(fd, image_path)
            try:
                syscalls.mount(source, lower, "erofs", syscalls.MS_RDONLY, None if acl else "noacl")
            except OSError as e2:
                raise MountError(f"cannot mount the image as EROFS ({source}): {e2.strerror}",
                                 image_path) from None
        try:
            _mount_overlay(lower, mountpoint, basedirs, verity, require)
        finally:
            syscalls.umount2(lower, syscalls.MNT_DETACH)
    finally:
        if loopfd is not None:
            os.close(loopfd)
        os.rmdir(lower)


def _loop_device(fd: int, image_path: str) -> tuple[int, str]:
    """A read-only loop device over `fd` that goes away with its last user."""
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _attempt in range(16):
            number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            path = f"/dev/loop{number}"
            loopfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            name = os.fsencode(image_path)[:63]
            config = LOOP_CONFIG.pack(fd, 4096, 0, 0, 0, 0, 0, 0, 0, 0,
                                      LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR, name, b"", b"")
            try:
                fcntl.ioctl(loopfd, LOOP_CONFIGURE, config)
                return loopfd, path
            except OSError as e:
                os.close(loopfd)
                if e.errno != errno.EBUSY:  # EBUSY: someone else took it first
                    raise MountError(f"cannot set up {path}: {e.strerror}", image_path) from None
        raise MountError("no free loop device", image_path)
    finally:
        os.close(ctl)


def _mount_overlay(lower: str, mountpoint: str, basedirs: list[str], verity: str | None, require: bool) -> None:
    try:
        _mount_overlay_fsconfig(lower, mountpoint, basedirs, verity, require)
        return
    except _Legacy:
        pass
    options = "metacopy=on,redirect_dir=on,lowerdir=" + "::".join(_escape(d) for d in [lower, *basedirs])
    if verity is not None:
        options += f",verity={verity}"
    try:
        syscalls.mount(SOURCE, mountpoint, "overlay", syscalls.MS_RDONLY, options)
    except OSError as e:
        raise MountError(f"cannot mount overlayfs: {e.strerror}", mountpoint) from None


class _Legacy(Exception):
    """The new mount API cannot express this here: use the option string."""


def _mount_overlay_fsconfig(lower, mountpoint, basedirs, verity, require) -> None:
    """overlayfs through fsopen/fsconfig: no escaping of `,` `:` `\\` in paths (6.7+)."""
    try:
        fsfd = syscalls.fsopen("overlay")
    except OSError:
        raise _Legacy from None
    try:
        S = syscalls.FSCONFIG_SET_STRING
        syscalls.fsconfig(fsfd, S, "source", SOURCE)
        syscalls.fsconfig(fsfd, S, "metacopy", "on")
        syscalls.fsconfig(fsfd, S, "redirect_dir", "on")
        if verity is not None:
            try:
                syscalls.fsconfig(fsfd, S, "verity", verity)
            except OSError as e:
                if require:
                    raise MountError(f"this kernel's overlayfs cannot require fs-verity: {e.strerror}",
                                     mountpoint) from None
        try:
            syscalls.fsconfig(fsfd, S, "lowerdir+", lower)
            for d in basedirs:
                syscalls.fsconfig(fsfd, S, "datadir+", d)
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise _Legacy from None  # no lowerdir+/datadir+ (before 6.7)
            raise MountError(f"overlayfs refused a layer: {e.strerror}", mountpoint) from None
        try:
            syscalls.fsconfig(fsfd, syscalls.FSCONFIG_CMD_CREATE)
        except OSError as e:
            raise MountError(f"cannot mount overlayfs: {e.strerror}", mountpoint) from None
        mntfd = syscalls.fsmount(fsfd, syscalls.MOUNT_ATTR_RDONLY)
        try:
            syscalls.move_mount(mntfd, mountpoint)
        except OSError as e:
            raise MountError(f"cannot attach the mount: {e.strerror}", mountpoint) from None
        finally:
            os.close(mntfd)
    finally:
        os.close(fsfd)


def _escape(path: str) -> str:
    """A path inside overlayfs' option string (`\\` escapes `,` `:` and itself)."""
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")
