"""`mount.composefs`: the mount(8) helper, with upstream's options and mount(8)'s exit codes.

    mount -t composefs IMAGE MNT -o basedir=/a:/b[,digest=HEX][,verity|tryverity|verity_check=N]
                                    [,upperdir=U,workdir=W][,idmap=/proc/PID/ns/user][,ro|rw]

mount(8) runs `/sbin/mount.composefs IMAGE MNT [-sfnv] [-N NS] -o OPTIONS`; the console
script `mount.composefs` and `cfsc mount.composefs` are this program.  It makes the kernel
composefs mount (`cfsc.fuse.kernel`: EROFS + overlayfs), as upstream's helper does.  It lives
outside `cfsc.cli` so that it starts without loading typer and every verb (a mount helper runs
at boot, once per fstab line).

The options, beyond upstream's: `verity_check=0|1|2` (the original composefs kernel module's:
none, if-present, require; given, it decides whatever `verity`, `tryverity` or `digest=`
imply), `noacl`, and the generic ones mount(8) passes (`rw` always, unless `ro`): the
per-mount flags (`nosuid`, `nodev`, `noexec`, the atime family and their opposites) go on the
overlayfs mount; mount(8)'s own (`defaults`, `user`, `_netdev`, `nofail`, `x-*` …) are its
business and ignored here; anything else is refused by name (ignored with `-s`).

Exit codes are mount(8)'s, which passes them on: 0 mounted, 1 incorrect invocation or
permissions (an unknown or malformed option, a missing operand, not root), 32 mount failure
(the image unreadable or corrupt, a wrong `digest=`, a store the kernel cannot check, the
kernel refusing), 8 interrupted.  Every error is one line naming where.
"""

from __future__ import annotations

import sys

from cfsc.base.errors import CfscError, UsageError
from cfsc.fuse import MountOptions, parse_digest
from cfsc.store.backing import VERITY_MODES, parse_basedirs

EXIT_USAGE = 1
EXIT_INTERRUPTED = 8
EXIT_FAILED = 32

USAGE = """\
usage: {prog} [-t composefs] [-o OPTION[,OPTION…]] [-fnsv] IMAGE MOUNTPOINT
  or:  mount -t composefs -o basedir=DIR[:DIR…][,…] IMAGE MOUNTPOINT

  basedir=DIR[:DIR…]   the store(s) holding the image's objects, searched in order (required)
  digest=HEX           refuse the image unless its fs-verity digest is HEX (implies verity)
  verity               the kernel checks every file against the image's digests (fs-verity)
  tryverity            as verity where this kernel's overlayfs can check, else no checks
  verity_check=0|1|2   checks: none, where the image has a digest, every file
  upperdir=DIR         overlayfs upper directory: the mount is writable (with workdir=)
  workdir=DIR          overlayfs work directory (empty, on the upper directory's file system)
  idmap=PATH           a user namespace (/proc/PID/ns/user) whose ID mapping the image gets
  ro | rw              read-only | read-write (rw is the default; without upperdir nothing is writable)
  noacl                ignore the image's POSIX ACLs
  nosuid nodev noexec noatime nodiratime relatime strictatime (and suid dev exec atime diratime):
                       flags of the mount
  -f  check the image, digest and store, mount nothing    -v  say what is mounted
  -s  ignore unknown options                              -n  (accepted: there is no mtab to write)

Exit status: 0 mounted, 1 bad invocation or not root, 32 mount failed (as mount(8)).
"""

# Per-mount flags, and what undoes each.  The atime modes exclude each other.
FLAGS = ("nosuid", "nodev", "noexec", "noatime", "nodiratime", "relatime", "strictatime")
UNDO = {"suid": ("nosuid",), "dev": ("nodev",), "exec": ("noexec",), "diratime": ("nodiratime",),
        "atime": ("noatime", "relatime", "strictatime"), "norelatime": ("relatime",),
        "nostrictatime": ("strictatime",)}
ATIME = ("noatime", "relatime", "strictatime")
# mount(8)'s own options (fstab and policy): it acted on them before running us.
MOUNT8 = frozenset(("defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "_netdev",
                    "nofail", "silent", "loud", "async", "nosymfollow", "symfollow"))
VERITY_CHECK = dict(zip("012", VERITY_MODES, strict=True))  # the kernel module's verity_check=0|1|2
WITH_VALUE = ("basedir", "digest", "upperdir", "workdir", "idmap", "verity_check")


class Request:
    """One invocation: what to mount where, how, and the helper's own flags."""

    __slots__ = ("image", "mountpoint", "options", "fake", "verbose", "help", "version", "asked_verity")

    def __init__(self) -> None:
        self.image = self.mountpoint = None
        self.options = MountOptions(kernel=True, verity="none")  # upstream: no checks unless asked
        self.fake = self.verbose = self.help = self.version = False
        self.asked_verity = ""  # the option that asked for checks, for error messages


def split_options(text: str) -> list[tuple[str, str | None]]:
    """`-o a=b,c` as upstream splits it: `\\` keeps the next character (a `,` too)."""
    out = []
    key: list[str] = []
    value: list[str] | None = None
    chars = iter(text + ",")
    for ch in chars:
        if ch == "\\":
            (key if value is None else value).append(next(chars, ""))
        elif ch == ",":
            if key or value is not None:
                out.append(("".join(key), None if value is None else "".join(value)))
            key, value = [], None
        elif ch == "=" and value is None:
            value = []
        else:
            (key if value is None else value).append(ch)
    return out


def parse(argv: list[str]) -> Request:
    """The command line, as mount(8) gives it to a helper (options before or after operands)."""
    req = Request()
    texts: list[str] = []
    operands: list[str] = []
    sloppy = False
    args = iter(argv)
    for arg in args:
        if arg == "--":
            operands.extend(args)
            break
        if arg in ("--help", "--version"):
            setattr(req, arg[2:], True)
            continue
        if not arg.startswith("-") or arg == "-" or arg.startswith("--"):
            if arg.startswith("--"):
                raise UsageError(f"unknown option {arg!r}", "mount.composefs")
            operands.append(arg)
            continue
        i = 1
        while i < len(arg):
            flag = arg[i]
            i += 1
            if flag in "otN":
                value = arg[i:] or next(args, None)
                if value is None:
                    raise UsageError(f"option -{flag} needs a value", "mount.composefs")
                if flag == "o":
                    texts.append(value)
                elif flag == "t" and value not in ("composefs", "composefs.composefs"):
                    raise UsageError(f"this helper mounts type composefs, not {value!r}", "-t")
                elif flag == "N":
                    raise UsageError("entering another mount namespace is not supported: run the helper in it",
                                     "-N")
                break
            if flag == "h":
                req.help = True
            elif flag == "V":
                req.version = True
            elif flag == "f":
                req.fake = True
            elif flag == "v":
                req.verbose = True
            elif flag == "s":
                sloppy = True
            elif flag != "n":
                raise UsageError(f"unknown option -{flag}", "mount.composefs")
    if req.help or req.version:
        return req
    if len(operands) != 2:
        raise UsageError("expected IMAGE and MOUNTPOINT" if len(operands) < 2
                         else f"unexpected argument {operands[2]!r}", "mount.composefs")
    req.image, req.mountpoint = operands
    _apply(req, [kv for text in texts for kv in split_options(text)], sloppy)
    return req


def _apply(req: Request, options: list[tuple[str, str | None]], sloppy: bool) -> None:
    o = req.options
    asked: set[str] = set()  # of verity, tryverity, digest=
    explicit = None  # (mode, option) of verity_check=, which decides
    attrs: list[str] = []
    for key, value in options:
        where = f"{key}=" if value is not None else key
        if key in WITH_VALUE:
            if not value:
                raise UsageError(f"{key}= needs a value", where)
        elif value is not None and key not in ("comment",) and not key.startswith("x-"):
            if sloppy:
                continue
            raise UsageError(f"option {key} takes no value (got {key}={value})", where)
        if key == "basedir":
            o.basedirs = parse_basedirs(value)
            if not o.basedirs:
                raise UsageError(f"names no directory: {value!r}", where)
        elif key == "digest":
            try:
                parse_digest(value)
            except UsageError as e:
                raise UsageError(e.what, where) from None
            o.digest = value
            asked.add("digest=")
        elif key in ("verity", "tryverity"):
            asked.add(key)
        elif key == "verity_check":
            if value not in VERITY_CHECK:
                raise UsageError(f"expected 0 (none), 1 (if-present) or 2 (require), got {value!r}", where)
            explicit = (VERITY_CHECK[value], f"verity_check={value}")
        elif key in ("upperdir", "workdir", "idmap"):
            setattr(o, key, value)
        elif key in ("ro", "rw"):
            o.readonly = key == "ro"
        elif key == "noacl":
            o.noacl = True
        elif key in FLAGS:
            attrs = [a for a in attrs if a != key and not (key in ATIME and a in ATIME)] + [key]
        elif key in UNDO:
            attrs = [a for a in attrs if a not in UNDO[key]]
        elif key in MOUNT8 or key == "comment" or key.startswith("x-"):
            pass
        elif not sloppy:
            raise UsageError(f"unsupported option {key!r} (see --help)", where)
    # As upstream: `verity` or `digest=` require the checks; `tryverity` alone asks for them
    # where the kernel can.
    if explicit is not None:
        o.verity, req.asked_verity = explicit
    elif asked:
        o.verity, o.try_verity = "require", asked == {"tryverity"}
        req.asked_verity = next(k for k in ("verity", "digest=", "tryverity") if k in asked)
    o.attrs = tuple(attrs)
    if not o.basedirs:
        raise UsageError("no store given: basedir=DIR[:DIR…] is required", "basedir=")
    if (o.upperdir is None) != (o.workdir is None):
        raise UsageError("upperdir= and workdir= go together", "upperdir=" if o.workdir is None else "workdir=")


def describe(req: Request) -> str:
    o = req.options
    verity = o.verity + (" (if this kernel can)" if o.try_verity else "")
    parts = [f"data layers {':'.join(o.basedirs)}", f"verity {verity}"]
    if o.upperdir:
        parts.append(f"upper {o.upperdir} (work {o.workdir})")
    if o.idmap:
        parts.append(f"ID-mapped by {o.idmap}")
    parts.append("read-only" if o.read_only() else "read-write")
    parts.extend(o.attrs)
    return f"{req.image} on {req.mountpoint}: composefs (EROFS + overlayfs), {', '.join(parts)}"


def run(argv: list[str], prog: str = "mount.composefs") -> int:
    """The whole program; returns its exit status (errors are printed)."""
    try:
        req = parse(argv)
    except UsageError as e:
        _say_error(e)
        return EXIT_USAGE
    if req.help:
        sys.stdout.write(USAGE.format(prog=prog))
        return 0
    if req.version:
        from importlib.metadata import version

        sys.stdout.write(f"cfsc {version('cfsc')} (mount.composefs drop-in)\n")
        return 0
    from cfsc.fuse.attach import privileged

    if not privileged():
        _say_error(UsageError("mounting needs root (CAP_SYS_ADMIN)", req.mountpoint))
        return EXIT_USAGE
    try:
        if req.fake:
            from cfsc.fuse import open_view

            open_view(req.image, req.options.digest, req.options.noacl)
        else:
            from cfsc.fuse import mount

            mount(req.image, req.mountpoint, req.options)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except CfscError as e:
        from cfsc.fuse.kernel import NoStoreVerity

        if isinstance(e, NoStoreVerity):
            e = UsageError(f"{e.fact}: mount with verity_check=0, or enable fs-verity on the store's objects "
                           "(fsverity enable)", req.asked_verity)
        _say_error(e)
        return EXIT_FAILED
    except OSError as e:
        _say_error(e)
        return EXIT_FAILED
    if req.verbose:
        print(("would mount " if req.fake else "mounted ") + describe(req))
    return 0


def _say_error(e: BaseException) -> None:
    for line in str(e).splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr)


def main() -> None:
    """The `mount.composefs` console script."""
    sys.exit(run(sys.argv[1:]))
