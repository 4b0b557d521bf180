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

An upper and a work directory (overlayfs `upperdir`/`workdir`) make the mount writable:
copy-up takes a file's data from the store, the image and the store stay untouched.  With
`idmap`, the EROFS mount is made ID-mapped (`mount_setattr`, new mount API only) before
overlayfs stacks on it, so the whole tree shows the user namespace's mapping, as upstream.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
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
# Per-mount flags a caller may ask for: (fsmount attribute, mount(2) flag).
ATTRS = {
    "nosuid": (syscalls.MOUNT_ATTR_NOSUID, syscalls.MS_NOSUID),
    "nodev": (syscalls.MOUNT_ATTR_NODEV, syscalls.MS_NODEV),
    "noexec": (syscalls.MOUNT_ATTR_NOEXEC, syscalls.MS_NOEXEC),
    "noatime": (syscalls.MOUNT_ATTR_NOATIME, syscalls.MS_NOATIME),
    "nodiratime": (syscalls.MOUNT_ATTR_NODIRATIME, syscalls.MS_NODIRATIME),
    "relatime": (syscalls.MOUNT_ATTR_RELATIME, syscalls.MS_RELATIME),
    "strictatime": (syscalls.MOUNT_ATTR_STRICTATIME, syscalls.MS_STRICTATIME),
}


class NoStoreVerity(UsageError):
    """Digests to check, and a store the kernel cannot check them in; `fact` says why
    without the advice (which names the caller's options)."""

    def __init__(self, fact: str, advice: str, where: str) -> None:
        super().__init__(f"{fact}: {advice}", where)
        self.fact = fact


class _Plan:
    """What overlayfs gets, decided once for both ways of asking it."""

    __slots__ = ("lower", "basedirs", "upperdir", "workdir", "verity", "require", "readonly", "attrs", "verity_known")

    def __init__(self, lower, basedirs, options) -> None:
        self.lower = lower
        self.basedirs = basedirs
        self.upperdir = os.path.abspath(options.upperdir) if options.upperdir else None
        self.workdir = os.path.abspath(options.workdir) if options.workdir else None
        self.verity = VERITY[options.verity]
        # tryverity: ask for the checks, take a kernel that cannot make them as it is
        self.require = options.verity == VERITY_REQUIRED and not options.try_verity
        self.readonly = options.read_only()
        self.attrs = tuple(options.attrs)
        self.verity_known = False  # overlayfs took `verity` through fsconfig (a refusal is then not about it)

    def flags(self, which: int) -> int:
        """The mount's flags: fsmount attributes (`which` 0) or mount(2) flags (1)."""
        out = (syscalls.MOUNT_ATTR_RDONLY, syscalls.MS_RDONLY)[which] if self.readonly else 0
        for name in self.attrs:
            out |= ATTRS[name][which]
        return out


def mount_kernel(image_path: str, mountpoint: str, options) -> None:
    if not privileged():
        raise UsageError("the kernel mount needs root (CAP_SYS_ADMIN); without it use the FUSE mount",
                         "--kernel")
    if not options.basedirs:
        raise UsageError("the kernel mount needs --store: overlayfs takes the store as its data layer",
                         "--kernel")
    unknown = sorted(set(options.attrs) - ATTRS.keys())
    if unknown:
        raise UsageError(f"unknown mount flag {unknown[0]!r}: expected one of {', '.join(ATTRS)}", "attrs")
    check_mountpoint(mountpoint)
    for name in ("upperdir", "workdir"):
        if getattr(options, name) is not None:
            _check_dir(getattr(options, name), name)
    basedirs = [os.path.abspath(d) for d in options.basedirs]
    for d in basedirs:  # (overlayfs would refuse one without naming it)
        _check_dir(d, "store directory")
    userns = _open_userns(options.idmap) if options.idmap is not None else None
    try:
        fd = os.open(image_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if userns is not None:
            os.close(userns)
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
        if VERITY[options.verity] is not None:
            _probe_store(image, basedirs)
        _mount(fd, image_path, bool(image.flags & COMPOSEFS_FLAGS_HAS_ACL) and not options.noacl, mountpoint,
               basedirs, options, userns)
    finally:
        os.close(fd)
        if userns is not None:
            os.close(userns)


def _check_dir(path: str, what: str) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"cannot use as the {what}: {e.strerror}", path) from None
    if not stat.S_ISDIR(st.st_mode):
        raise InputError(f"the {what} is not a directory", path)


def _open_userns(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise InputError(f"cannot open the user namespace for idmap: {e.strerror}", path) from None


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
                raise NoStoreVerity(
                    f"{why} (e.g. {e.payload.decode(errors='replace')}), so the kernel cannot check the "
                    "image's digests", "pass --verity none, or mount without --kernel (the FUSE mount "
                    "checks digests itself)", "--verity")
        finally:
            os.close(fd)
    finally:
        store.close()


def _mount(fd: int, image_path: str, acl: bool, mountpoint: str, basedirs: list[str], options,
           userns: int | None) -> None:
    lower = tempfile.mkdtemp(prefix=".composefs.")
    loopfd = None
    try:
        source = f"/proc/self/fd/{fd}"
        try:
            if options.loop:
                raise OSError(errno.ENOTBLK, "loop device requested")
            _mount_erofs(source, lower, acl, userns)
        except OSError as e:
            if e.errno != errno.ENOTBLK:
                raise MountError(f"cannot mount the image as EROFS: {e.strerror}", image_path) from None
            loopfd, source = _loop_device(fd, image_path)
            try:
                _mount_erofs(source, lower, acl, userns)
            except OSError as e2:
                raise MountError(f"cannot mount the image as EROFS ({source}): {e2.strerror}",
                                 image_path) from None
        try:
            _mount_overlay(mountpoint, _Plan(lower, basedirs, options))
        finally:
            syscalls.umount2(lower, syscalls.MNT_DETACH)
    finally:
        if loopfd is not None:
            os.close(loopfd)
        os.rmdir(lower)


def _mount_erofs(source: str, target: str, acl: bool, userns: int | None) -> None:
    """The image read-only on `target`; ID-mapped by the user namespace `userns` if given
    (that takes the new mount API: mount(2) cannot)."""
    if userns is None:
        syscalls.mount(source, target, "erofs", syscalls.MS_RDONLY, None if acl else "noacl")
        return
    try:
        fsfd = syscalls.fsopen("erofs")
    except OSError as e:
        raise OSError(e.errno, f"an ID-mapped mount needs the new mount API (Linux 5.12+): {e.strerror}") from None
    try:
        syscalls.fsconfig(fsfd, syscalls.FSCONFIG_SET_STRING, "source", source)
        syscalls.fsconfig(fsfd, syscalls.FSCONFIG_SET_FLAG, "ro")
        if not acl:
            syscalls.fsconfig(fsfd, syscalls.FSCONFIG_SET_FLAG, "noacl")
        syscalls.fsconfig(fsfd, syscalls.FSCONFIG_CMD_CREATE)
        mntfd = syscalls.fsmount(fsfd, syscalls.MOUNT_ATTR_RDONLY)
    finally:
        os.close(fsfd)
    try:
        try:
            syscalls.mount_setattr_idmap(mntfd, userns)
        except OSError as e:
            raise OSError(e.errno, f"cannot ID-map it with the idmap user namespace: {e.strerror}") from None
        syscalls.move_mount(mntfd, target)
    finally:
        os.close(mntfd)


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


def _mount_overlay(mountpoint: str, plan: _Plan) -> None:
    try:
        _mount_overlay_fsconfig(mountpoint, plan)
    except _Legacy:
        _mount_overlay_legacy(mountpoint, plan)


def _mount_overlay_legacy(mountpoint: str, plan: _Plan) -> None:
    """overlayfs through mount(2)'s option string (kernels before 6.7); a test holds it to
    give the tree the fsconfig way gives."""
    options = "metacopy=on,redirect_dir=on,lowerdir=" + "::".join(_escape(d) for d in [plan.lower, *plan.basedirs])
    if plan.upperdir is not None:
        options += f",upperdir={_escape(plan.upperdir)},workdir={_escape(plan.workdir)}"
    try:
        if plan.verity is None:
            syscalls.mount(SOURCE, mountpoint, "overlay", plan.flags(1), options)
            return
        try:
            syscalls.mount(SOURCE, mountpoint, "overlay", plan.flags(1), f"{options},verity={plan.verity}")
        except OSError as e:
            # overlayfs before 6.6 has no verity= (6.5 brought the data-only layers) and refuses
            # the whole string (EINVAL): checks asked for only where the kernel can make them
            # (tryverity; if-present, as the fsconfig way takes it) go without
            if e.errno != errno.EINVAL or plan.verity_known:
                raise
            if plan.require:
                raise MountError(f"this kernel's overlayfs cannot require fs-verity: {e.strerror}", mountpoint) from None
            syscalls.mount(SOURCE, mountpoint, "overlay", plan.flags(1), options)
    except OSError as e:
        raise MountError(f"cannot mount overlayfs: {e.strerror}{_upper_hint(plan, e)}", mountpoint) from None


class _Legacy(Exception):
    """The new mount API cannot express this here: use the option string."""


def _mount_overlay_fsconfig(mountpoint: str, plan: _Plan) -> None:
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
        if plan.verity is not None:
            try:
                syscalls.fsconfig(fsfd, S, "verity", plan.verity)
                plan.verity_known = True
            except OSError as e:
                if plan.require:
                    raise MountError(f"this kernel's overlayfs cannot require fs-verity: {e.strerror}",
                                     mountpoint) from None
        try:
            syscalls.fsconfig(fsfd, S, "lowerdir+", plan.lower)
            for d in plan.basedirs:
                syscalls.fsconfig(fsfd, S, "datadir+", d)
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise _Legacy from None  # no lowerdir+/datadir+ (before 6.7)
            raise MountError(f"overlayfs refused a layer: {e.strerror}", mountpoint) from None
        for key in ("upperdir", "workdir"):
            path = getattr(plan, key)
            if path is not None:
                try:
                    # unlike lowerdir+/datadir+, overlayfs unescapes these (`\\x` is `x`)
                    syscalls.fsconfig(fsfd, S, key, _escape(path))
                except OSError as e:
                    raise MountError(f"overlayfs refused the {key}: {e.strerror}", path) from None
        try:
            syscalls.fsconfig(fsfd, syscalls.FSCONFIG_CMD_CREATE)
        except OSError as e:
            raise MountError(f"cannot mount overlayfs: {e.strerror}{_upper_hint(plan, e)}", mountpoint) from None
        mntfd = syscalls.fsmount(fsfd, plan.flags(0))
        try:
            syscalls.move_mount(mntfd, mountpoint)
        except OSError as e:
            raise MountError(f"cannot attach the mount: {e.strerror}", mountpoint) from None
        finally:
            os.close(mntfd)
    finally:
        os.close(fsfd)


def _upper_hint(plan: _Plan, e: OSError) -> str:
    """What overlayfs wants of upper and work directories, when it refused them (the kernel
    says why only in its log)."""
    if plan.upperdir is None or e.errno not in (errno.EINVAL, errno.EBUSY, errno.EXDEV):
        return ""
    return (" (upperdir and workdir must be distinct, empty-or-overlay-owned directories on one file "
            "system that supports trusted.* xattrs, neither inside the other, and in use by no other overlay)")


def _escape(path: str) -> str:
    """A path inside overlayfs' option string (`\\` escapes `,` `:` and itself)."""
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def overlay_fuse(image_path: str, mountpoint: str, options) -> None:
    """The FUSE mount made writable: the FUSE server serves the image on a private temporary
    directory, overlayfs stacks `upperdir`/`workdir` on it at `mountpoint`, and the
    temporary mount is detached at once (overlayfs holds it), so unmounting `mountpoint`
    ends the server too.  Needs root (overlayfs), and a server in the background."""
    from dataclasses import replace

    from cfsc.fuse import mount
    from cfsc.fuse.attach import unmount

    if not privileged():
        raise UsageError("an upper directory takes an overlayfs mount, which needs root (CAP_SYS_ADMIN)",
                         "--upperdir")
    if options.foreground:
        raise UsageError("an upper directory over the FUSE mount needs the server in the background",
                         "--foreground")
    check_mountpoint(mountpoint)
    _check_dir(options.upperdir, "upperdir")
    _check_dir(options.workdir, "workdir")
    lower = tempfile.mkdtemp(prefix=".composefs-fuse.")
    try:
        mount(image_path, lower, replace(options, upperdir=None, workdir=None, readonly=None))
        try:
            plan = _Plan(lower, [], replace(options, verity=NO_VERITY))  # the server checks digests
            _mount_overlay(mountpoint, plan)
        except BaseException:
            unmount(lower, lazy=True)
            raise
        syscalls.umount2(lower, syscalls.MNT_DETACH)
    except BaseException:
        with contextlib.suppress(OSError):  # (busy if it is still mounted: the first error is the one to see)
            os.rmdir(lower)
        raise
    os.rmdir(lower)
