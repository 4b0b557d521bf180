"""`cfsc mount`, `cfsc umount` and the drop-in `cfsc composefs-fuse`: using an image.

`mount` serves an image over FUSE (the bundled pure-Python server: no root needed, no
fs-verity needed, digests checked in userspace) or, with `--kernel`, makes the kernel
composefs mount (EROFS + overlayfs, as `mount.composefs`).  Both show the same tree.
"""

from __future__ import annotations

import sys

import typer
from cfsc.base.errors import UsageError
from cfsc.cli import command, renamed
from cfsc.cli.getopt import getopt_long


def _verity(value: str) -> str:
    from cfsc.store.backing import verity_mode  # (not at import: `cfsc --help` stays fast)

    return verity_mode(value)


@command("mount")
def mount_cmd(
    image: str = typer.Argument(..., help="The composefs image."),
    mountpoint: str = typer.Argument(..., help="An existing directory to mount on."),
    store: str | None = typer.Option(None, "--store", metavar="DIR[:DIR…]", help="Store(s) holding the backing files (external file data), searched in order."),
    old_store: str | None = typer.Option(None, "--basedir", hidden=True, help="The old name of --store."),
    verity: str = typer.Option("if-present", "--verity", help="Check backing files against the image's fs-verity digests: none, if-present, require."),
    digest: str | None = typer.Option(None, "--digest", help="Refuse the image unless its own fs-verity digest is this (hex)."),
    foreground: bool = typer.Option(False, "--foreground", "-f", help="Serve in the foreground until unmounted or interrupted."),
    kernel: bool = typer.Option(False, "--kernel", help="Kernel composefs mount (EROFS + overlayfs; root) instead of FUSE."),
    threads: int = typer.Option(2, "--threads", min=1, max=64, help="FUSE worker threads."),
    passthrough: bool = typer.Option(True, "--passthrough/--no-passthrough", help="Let the kernel read backing files directly (FUSE passthrough; needs root and Linux 6.9+)."),
    allow_other: bool | None = typer.Option(None, "--allow-other/--no-allow-other", help="Let other users in (default: yes as root)."),
    log_file: str | None = typer.Option(None, "--log", help="Log file of the background server (default: syslog)."),
    noacl: bool = typer.Option(False, "--noacl", help="Ignore the image's POSIX ACLs (upstream's noacl)."),
    loop: bool = typer.Option(False, "--loop", help="--kernel: mount the image through a loop device even where EROFS can mount files."),
    upperdir: str | None = typer.Option(None, "--upperdir", metavar="DIR", help="Make the mount writable: overlayfs upper directory, where writes land (needs --workdir; root). FUSE: overlayfs over the FUSE mount."),
    workdir: str | None = typer.Option(None, "--workdir", metavar="DIR", help="overlayfs work directory for --upperdir (empty, on the upper directory's file system)."),
    idmap: str | None = typer.Option(None, "--idmap", metavar="USERNS", help="--kernel: show the image through this user namespace's ID mapping (e.g. /proc/PID/ns/user)."),
    debug: bool = typer.Option(False, "--debug", help="Log more."),
) -> None:
    """Mount a composefs image read-only (writable with --upperdir/--workdir): over FUSE
    (default) or the kernel's EROFS + overlayfs.

    Returns once the mount works (the FUSE server goes on in the background) or fails with
    the reason; `cfsc umount MOUNTPOINT` ends it.
    """
    # start-up: cfsc.fuse and the store reader ~7-12 ms, which `cfsc --help` (it loads
    # every verb's module) would pay
    from cfsc.fuse import MountOptions, mount, parse_digest
    from cfsc.store.backing import parse_basedirs

    store = renamed(store, old_store, "--store", "--basedir")
    options = MountOptions(
        basedirs=parse_basedirs(store) if store else [], verity=_verity(verity), digest=digest,
        foreground=foreground, threads=threads, passthrough=passthrough, allow_other=allow_other,
        log_file=log_file, debug=debug, kernel=kernel, loop=loop, noacl=noacl, upperdir=upperdir,
        workdir=workdir, idmap=idmap)
    if digest is not None:
        parse_digest(digest)
    mount(image, mountpoint, options)


@command("umount")
def umount_cmd(
    mountpoint: str = typer.Argument(..., help="Where an image is mounted (FUSE or kernel)."),
    lazy: bool = typer.Option(False, "--lazy", "-l", help="Detach now even if busy; it goes away when no longer used."),
) -> None:
    """Unmount an image mounted with `cfsc mount` (its FUSE server then exits)."""
    from cfsc.fuse import unmount  # start-up: cfsc.fuse ~7 ms, which `cfsc --help` would pay

    unmount(mountpoint, lazy)


COMPOSEFS_FUSE_HELP = """\
usage: cfsc composefs-fuse [options] <mountpoint>

    -h   --help            print help
    -V   --version         print version
    -d   -o debug          enable debug output (implies -f)
    -f                     foreground operation
    -s                     disable multi-threaded operation
    -o source=IMAGE        the composefs image (required)
    -o basedir=DIR[:DIR]   where external file data lives
    -o noacl               do not enforce the image's POSIX ACLs
    -o allow_other         allow access by all users
    -o max_threads=N       worker threads (default 2)
    -o verity=MODE         none, if-present (default) or require (cfsc extension)
    -o digest=DIGEST       required fs-verity digest of the image (cfsc extension)
"""
# libfuse options composefs-fuse passes on that change nothing for this server.
IGNORED_FUSE_OPTIONS = frozenset(("ro", "default_permissions", "clone_fd", "allow_root", "auto_unmount",
                                  "max_idle_threads", "kernel_cache", "auto_cache", "noatime", "atime",
                                  "nosuid", "suid", "nodev", "dev", "exec", "noexec", "fsname", "subtype"))


def _fuse_options(text: str) -> list[tuple[str, str | None]]:
    """`-o a=b,c` as fuse_opt splits it (`\\,` keeps a comma, `\\\\` a backslash)."""
    out = []
    item = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            item.append(next(chars, ""))
        elif ch == ",":
            out.append("".join(item))
            item = []
        else:
            item.append(ch)
    out.append("".join(item))
    result = []
    for opt in out:
        if opt:
            key, eq, value = opt.partition("=")
            result.append((key, value if eq else None))
    return result


@command("composefs-fuse", context_settings={"ignore_unknown_options": True,
                                             "allow_extra_args": True, "help_option_names": []})
def composefs_fuse_cmd(ctx: typer.Context) -> None:
    """Drop-in for upstream `composefs-fuse -o source=IMAGE,basedir=DIR [-f] [-s] [-d] MOUNTPOINT`."""
    # start-up: as in `mount_cmd`
    from cfsc.fuse import MountOptions, mount
    from cfsc.store.backing import parse_basedirs

    where = "composefs-fuse"
    opts, operands = getopt_long(list(ctx.args), {"help": False, "version": False}, "hVdfso:", where)
    options = MountOptions(allow_other=False)
    source = None
    for name, value in opts:
        if name in ("help", "-h"):
            sys.stdout.write(COMPOSEFS_FUSE_HELP)
            return
        if name in ("version", "-V"):
            from importlib.metadata import version

            sys.stdout.write(f"cfsc {version('cfsc')} (composefs-fuse drop-in, FUSE protocol in pure Python)\n")
            return
        if name in ("-d", "-f"):
            options.foreground = True
            options.debug = options.debug or name == "-d"
        elif name == "-s":
            options.threads = 1
        elif name == "-o":
            for key, val in _fuse_options(value or ""):
                if key == "source" and val is not None:
                    source = val
                elif key == "basedir" and val is not None:
                    options.basedirs = parse_basedirs(val)
                elif key == "max_threads" and val is not None and val.isdigit() and int(val) > 0:
                    options.threads = min(int(val), 64)
                elif key == "allow_other" and val is None:
                    options.allow_other = True
                elif key == "debug" and val is None:
                    options.foreground = options.debug = True
                elif key == "verity" and val is not None:
                    options.verity = _verity(val)
                elif key == "digest" and val is not None:
                    options.digest = val
                elif key == "noacl" and val is None:
                    options.noacl = True
                elif key not in IGNORED_FUSE_OPTIONS:
                    raise UsageError(f"unknown option '{key}{'=' + val if val is not None else ''}'", where)
    if not operands:
        raise UsageError("no mountpoint specified (usage: composefs-fuse [options] <mountpoint>)", where)
    if len(operands) > 1:
        raise UsageError(f"invalid argument '{operands[1]}'", where)
    if source is None:
        raise UsageError("no image given: -o source=IMAGE is required", where)
    mount(source, operands[0], options)


@command("mount.composefs", context_settings={"ignore_unknown_options": True,
                                              "allow_extra_args": True, "help_option_names": []})
def mount_composefs_cmd(ctx: typer.Context) -> None:
    """Drop-in for upstream `mount.composefs IMAGE MOUNTPOINT -o basedir=DIR[:DIR…],…` (the mount(8) helper)."""
    from cfsc.mount_helper import run  # the console script `mount.composefs` runs it without typer

    raise typer.Exit(run(list(ctx.args), "cfsc mount.composefs"))
