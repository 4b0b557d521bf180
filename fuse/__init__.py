"""Mounting composefs images: the bundled FUSE server, and the kernel composefs mount.

    from cfsc.fuse import MountOptions, mount, unmount
    mount("img.cfs", "/mnt", MountOptions(basedirs=["/store"]))  # returns once it works
    unmount("/mnt")

The FUSE server speaks the kernel protocol over `/dev/fuse` itself, in pure Python (no
libfuse), and shows an image exactly as the kernel composefs mount (EROFS + overlayfs)
does.  `MountOptions(kernel=True)` makes that kernel mount instead, as `mount.composefs`.
`MountOptions(upperdir=…, workdir=…)` makes either writable (an overlayfs on top).

Modules, bottom up: `protocol` (the wire structures), `view` (the kernel mount's view of an
image, over the image reader), `server` (the request loop), `mount` (attach and detach a
FUSE connection), `daemon` (foreground and background life), `kernel` (EROFS + overlayfs).
Store access, confined and verified, is `cfsc.store.backing` (other readers of a store use it too);
the system calls Python's `os` lacks are `cfsc.base.syscalls`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from cfsc.base.errors import ImageError, IntegrityError, UsageError
from cfsc.base.fsverity import algorithm_of, digest_bytes
from cfsc.base.tree import S_IFDIR, S_IFMT
from cfsc.fuse.attach import check_mountpoint
from cfsc.fuse.attach import unmount as _unmount
from cfsc.store.backing import VERITY_IF_PRESENT, Store, verity_mode


@dataclass
class MountOptions:
    basedirs: list[str] = field(default_factory=list)  # stores, searched in order
    verity: str = VERITY_IF_PRESENT  # one of VERITY_MODES
    digest: str | None = None  # the image's expected fs-verity digest (hex)
    foreground: bool = False
    threads: int = 2
    passthrough: bool = True  # use FUSE passthrough when the kernel and our privileges allow
    allow_other: bool | None = None  # default: yes as root, no otherwise
    log_file: str | None = None
    debug: bool = False
    kernel: bool = False  # EROFS + overlayfs instead of FUSE (root only)
    loop: bool = False  # kernel mount: use a loop device even where EROFS can mount files
    noacl: bool = False  # ignore the image's POSIX ACLs (as upstream's `noacl`)
    # overlayfs upper and work directories (both or neither): the mount becomes writable,
    # writes landing in `upperdir`.  The FUSE mount puts a kernel overlayfs over itself.
    upperdir: str | None = None
    workdir: str | None = None
    readonly: bool | None = None  # None: read-only unless there is an upper directory
    # Kernel mount only:
    idmap: str | None = None  # a user namespace file (/proc/PID/ns/user) whose ID mapping the image gets
    try_verity: bool = False  # `verity` require where the kernel's overlayfs can, else no checks
    attrs: tuple[str, ...] = ()  # per-mount flags: nosuid nodev noexec noatime nodiratime relatime strictatime

    def read_only(self) -> bool:
        """The one rule: `ro` asked for, or no upper directory (overlayfs without one cannot
        be written, so it is flagged read-only even when `rw` was asked for)."""
        return self.readonly is True or self.upperdir is None


def parse_digest(text: str) -> bytes:
    try:
        digest = bytes.fromhex(text)
    except ValueError:
        digest = b""
    if algorithm_of(digest) is None:
        raise UsageError(f"expected 64 hex digits (a SHA-256 fs-verity digest) or 128 (SHA-512), got {text!r}",
                         "--digest")
    return digest


def check_digest(got: bytes, expected: str, name: str) -> None:
    """Refuse an image whose fs-verity digest `got` is not the `expected` hex digest."""
    want = parse_digest(expected)
    if got != want:
        raise IntegrityError(f"image fs-verity digest is {got.hex()}, expected {want.hex()}: refused", name)


def open_view(path: str, digest: str | None = None, noacl: bool = False):
    """The image at `path` as the kernel mount would show it, checked as far as mounting
    needs: it parses, its digest matches `digest`, and the root is a readable directory."""
    # start-up: the image reader ~8 ms; `cfsc umount` loads this package and never reads an image
    from cfsc.backends.erofs.reader import Image

    image = Image.open(path)
    if digest is not None:
        check_digest(digest_bytes(image.data, algorithm_of(parse_digest(digest))), digest, image.name)
    return checked_view(image, noacl)


def checked_view(image, noacl: bool = False):
    """An `ImageView` whose root was read: a corrupt superblock, root inode or root
    directory fails here, with the reader's located error, before anything is mounted."""
    # start-up: the FUSE view ~10-35 ms; `cfsc umount` needs it not
    from cfsc.fuse.view import ImageView

    view = ImageView(image, acl=False if noacl else None)
    root = view.node(view.root_nid)
    if root is None or root.mode & S_IFMT != S_IFDIR:
        raise ImageError(f"root inode nid {view.root_nid} is not a directory",
                         f"{image.name}@0x{image.inode_offset(view.root_nid):x}")
    view.listing(view.root_nid)
    return view


def mount(image: str, mountpoint: str, options: MountOptions | None = None) -> None:
    """Mount `image` on `mountpoint`, read-only unless `upperdir` takes the writes.  In the
    background (the default) this returns once the mount answers; with `foreground` it
    serves until unmounted."""
    options = options or MountOptions()
    verity_mode(options.verity)
    if (options.upperdir is None) != (options.workdir is None):
        raise UsageError("an upper directory needs a work directory and the other way round "
                         "(overlayfs takes both or neither)", "upperdir" if options.workdir is None else "workdir")
    if options.kernel:
        # import cycle (kernel.py imports this package) and start-up: only --kernel needs it
        from cfsc.fuse.kernel import mount_kernel

        mount_kernel(image, mountpoint, options)
        return
    for name, value in (("idmap", options.idmap), ("try_verity", options.try_verity), ("attrs", options.attrs)):
        if value:
            raise UsageError("the FUSE mount does not take this option; the kernel mount (--kernel) does", name)
    if options.upperdir is not None:
        from cfsc.fuse.kernel import overlay_fuse  # (import cycle, as above)

        overlay_fuse(image, mountpoint, options)
        return
    # start-up: the FUSE server ~20+ ms; kernel mounts and `cfsc umount` need it not
    from cfsc.fuse.daemon import serve_background, serve_foreground

    # The server outlives the caller's working directory (it moves to `/`): every path it
    # keeps is absolute, and messages and the mount table name the files the same way.
    absolute = os.path.abspath
    image = image if image == "-" else absolute(image)
    mountpoint = absolute(mountpoint)
    options = replace(options, basedirs=[absolute(d) for d in options.basedirs],
                      log_file=absolute(options.log_file) if options.log_file else None)
    view = open_view(image, options.digest, options.noacl)
    check_mountpoint(mountpoint)
    store = Store(options.basedirs, options.verity)
    if options.foreground:
        serve_foreground(view, store, mountpoint, options)
    else:
        serve_background(view, store, mountpoint, options)


def unmount(mountpoint: str, lazy: bool = False) -> None:
    _unmount(mountpoint, lazy)
