"""`cfsc gc`: remove the store objects no kept image refers to, and what killed runs left.

A digest store only grows: every compile adds objects and nothing takes away the ones no image
needs any more.  gc is given the images to keep (`--keep IMAGE`, `--keep-dir DIR`), reads every
one of them *before* it removes anything, and then removes:

* every object (`xx/` + 62 hex digits, a sha256 digest; or `xx/` + 126, sha512) that none of
  them refers to — by its payload, the overlay redirect xattr, as the kernel looks it up;
* temp files (`.cfsc-tmp-` + 16 hex digits) and commit journals (`.cfsc-tmp-commit-` + 16):
  runs killed mid-import or mid-commit leave them (`cfsc.store.objects`).  A journal's names
  are not taken back as the next commit would: they are complete objects (synced before they
  were named), kept if an image refers to them and removed like any other if none does.

Anything else in the store (another name, a symlink or directory under an object's name, a
fan-out that is a symlink) is left alone and reported, never removed or followed.  An image
that cannot be read (missing, not an image, corrupt anywhere in its metadata) stops the run
with its located error before anything is removed: a kept image that is not understood could
refer to anything.  (Under `--keep-dir`, a file removed between the listing and its reading is
no image to keep; one *moved* within DIR meanwhile by another process may be missed.)

`--keep-dir DIR` keeps every file under DIR, recursively (directory symlinks are not followed,
file symlinks are): each must read as a composefs image (a gzip/zstd/xz-compressed one too),
so a stray file there is an error rather than silently not protecting anything.  Only the
temp files `cfsc compile -o` writes beside its output (`.NAME.` + 12 hex digits + `.tmp`,
`cfsc.base.output`) are skipped: an image being written (or one a killed compile left).

Beside concurrent compiles: gc holds the store's lease exclusively (`cfsc.store.locks`) from
before it reads the kept images until it has removed what goes, and the commit lock with it.
Every run using the store holds the lease shared from its first lookup until its image has
been renamed into place, so gc either runs before such a run starts using the store (which
then finds none of what gc removed) or after its image exists (and is read if it is kept).
An object a compile in flight has found or written therefore never vanishes before that
compile's image exists, and every temp file gc sees belongs to a run that is over.  gc waits
for runs in flight up to `wait` seconds (then `StoreBusy`); a run starting meanwhile waits
for gc.  For writers that take no lease (mkcomposefs, older cfsc, composefs-rs), `grace` spares
objects and temp files changed (ctime: when an object was named) less than that long ago.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

from cfsc.backends.erofs.reader import Image
from cfsc.base import beneath
from cfsc.base.errors import InputError, OutputError, StoreError
from cfsc.base.output import is_temp_name
from cfsc.store import locks
from cfsc.store.objects import JOURNAL_PREFIX, TEMP_PREFIX
from cfsc.tools.images import objects

# A payload naming a store object (sha256: 2 + 62 hex digits; sha512: 2 + 126), leading `/`
# allowed (overlayfs' redirect is absolute in the store).
PAYLOAD = re.compile(rb"/*([0-9a-f]{2})/([0-9a-f]{62}|[0-9a-f]{126})\Z")
FANOUT = re.compile(r"[0-9a-f]{2}\Z")
OBJECT = re.compile(r"[0-9a-f]{62}\Z|[0-9a-f]{126}\Z")
TEMP = re.compile(re.escape(TEMP_PREFIX) + r"[0-9a-f]{16}\Z")
JOURNAL = re.compile(re.escape(JOURNAL_PREFIX) + r"[0-9a-f]{16}\Z")


@dataclass
class Tally:
    count: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.count += 1
        self.bytes += size


@dataclass
class Report:
    store: str
    dry_run: bool
    grace: float
    images: list[tuple[str, int]] = field(default_factory=list)  # (path, objects it refers to)
    referenced: int = 0  # distinct objects the kept images refer to
    kept: Tally = field(default_factory=Tally)  # objects referenced and present
    removed: Tally = field(default_factory=Tally)  # objects removed (dry run: that would be)
    young: Tally = field(default_factory=Tally)  # unreferenced objects spared by `grace`
    temp_files: Tally = field(default_factory=Tally)  # removed
    journals: Tally = field(default_factory=Tally)  # removed
    young_temps: Tally = field(default_factory=Tally)  # temp files and journals spared by `grace`
    other: list[tuple[bytes, str]] = field(default_factory=list)  # (path in the store, what it is): left alone
    names: list[str] | None = None  # with `names=True`: what was removed, relative to the store

    @property
    def missing(self) -> int:
        """Objects the kept images refer to that are not in the store (`fsck-store` says which)."""
        return self.referenced - self.kept.count

    @property
    def freed(self) -> int:
        return self.removed.bytes + self.temp_files.bytes + self.journals.bytes


def collect(store: str, keep: Sequence[str] = (), keep_dirs: Sequence[str] = (), *, dry_run: bool = False,
            grace: float = 0.0, now: float = 0.0, wait: float = 60.0, names: bool = False) -> Report:
    """Remove from `store` what none of the kept images needs (nothing with `dry_run`); see
    the module docstring.  `grace` (seconds, counted back from `now`, the wall clock) spares
    what changed more recently; `wait` bounds the wait for runs in flight."""
    root = _open_store(store)
    lock = -1
    try:
        lock = locks.open_lock(root, store)
        if lock < 0 and not dry_run:
            raise OutputError("cannot create the store's lock file (read-only, or no permission): gc needs it to"
                              " exclude compiles", os.path.join(store, locks.LOCK_NAME))
        if lock >= 0:
            locks.exclusive(lock, store, wait, "compiles (or other runs) using the store")
            locks.exclusive(root, store, wait, "a commit")
        report = Report(store, dry_run, grace, names=[] if names else None)
        referenced = _referenced(keep, keep_dirs, report)
        _sweep(root, store, referenced, now - grace if grace > 0 else None, report)
        return report
    finally:
        os.close(root)  # the commit lock goes with it
        if lock >= 0:
            os.close(lock)


def image_files(directory: str) -> list[str]:
    """Every file under `directory` that `--keep-dir` keeps (see the module docstring), sorted."""
    found = []
    stack = [directory]
    while stack:
        path = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError as e:
            raise InputError(f"cannot read the directory: {e.strerror}", path) from None
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            elif not is_temp_name(entry.name):
                found.append(entry.path)
    return sorted(found)


def _open_store(store: str) -> int:
    try:
        return os.open(store, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise StoreError("not a directory: expected the content store's directory", store) from None
    except OSError as e:
        raise OutputError(f"cannot open the store: {e.strerror}", store) from None


def _referenced(keep: Sequence[str], keep_dirs: Sequence[str], report: Report) -> set[bytes]:
    """The digests of the objects the kept images refer to; any image that cannot be read
    fails the run here, before anything is removed."""
    digests: set[bytes] = set()
    for path in keep:
        _read_kept(path, None, digests, report)
    for directory in keep_dirs:
        for path in image_files(directory):
            _read_kept(path, directory, digests, report)
    report.referenced = len(digests)
    return digests


def _read_kept(path: str, directory: str | None, digests: set[bytes], report: Report) -> None:
    """Add the objects of the image at `path` (found under `directory`, or given by name)."""
    why = "" if directory is None else f" (every file under --keep-dir {directory} must be an image to keep)"
    try:  # O_NONBLOCK: a FIFO must not hang gc
        f = open(path, "rb", opener=_nonblocking)
    except FileNotFoundError as e:
        if directory is not None and not os.path.lexists(path):
            return  # removed since the directory was listed: not an image to keep any more
        raise InputError(f"cannot open: {e.strerror}{why}", path) from None
    except OSError as e:
        raise InputError(f"cannot open: {e.strerror}{why}", path) from None
    with f:
        try:
            mode = os.fstat(f.fileno()).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise InputError(f"{beneath.kind(mode)}: expected a composefs image", path)
            count = _add_objects(Image.open(f), digests)
        except InputError as e:
            raise InputError(e.what + why, e.where) from None
    report.images.append((path, count))


def _nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK)


def _add_objects(image: Image, into: set[bytes]) -> int:
    """Add the digests of the store objects `image` refers to; return how many it has."""
    count = 0
    for payload in objects([image]):
        m = PAYLOAD.match(payload) or PAYLOAD.match(posixpath.normpath(payload))
        if m is not None:  # another payload cannot name anything gc would remove
            into.add(bytes.fromhex((m.group(1) + m.group(2)).decode()))
            count += 1
    return count


def _sweep(root: int, store: str, referenced: set[bytes], cutoff: float | None, report: Report) -> None:
    """Walk the store: objects first, fan-out by fan-out; then temp files, then journals (a
    journal left without its temp files makes the next commit leave its names alone: they are
    complete objects, for the next gc to judge)."""
    temps = []
    journals = []
    with os.scandir(root) as it:
        top = sorted(it, key=lambda e: e.name)
    for entry in top:
        name = entry.name
        if name == locks.LOCK_NAME:
            continue
        st = _lstat(entry, store)
        if st is None:
            continue
        if FANOUT.match(name) and stat.S_ISDIR(st.st_mode):
            _sweep_fanout(root, store, name, referenced, cutoff, report)
        elif JOURNAL.match(name) and stat.S_ISREG(st.st_mode):
            journals.append((name, st))
        elif TEMP.match(name) and stat.S_ISREG(st.st_mode):
            temps.append((name, st))
        else:
            report.other.append((os.fsencode(name), beneath.kind(st.st_mode)))
    for group, tally in ((temps, report.temp_files), (journals, report.journals)):
        for name, st in group:
            if cutoff is not None and st.st_ctime > cutoff:
                report.young_temps.add(st.st_size)
            elif _remove(root, name, store, report):
                tally.add(st.st_size)


def _sweep_fanout(root: int, store: str, fan: str, referenced: set[bytes], cutoff: float | None,
                  report: Report) -> None:
    where = os.path.join(store, fan)
    try:
        fd = beneath.open_dir(root, fan)
    except OSError as e:
        raise OutputError(f"cannot open a store directory: {e.strerror}", where) from None
    try:
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            name = entry.name
            st = _lstat(entry, where)
            if st is None:
                continue
            if not (OBJECT.match(name) and stat.S_ISREG(st.st_mode)):
                report.other.append((os.fsencode(f"{fan}/{name}"), beneath.kind(st.st_mode)))
            elif bytes.fromhex(fan + name) in referenced:
                report.kept.add(st.st_size)
            elif cutoff is not None and st.st_ctime > cutoff:
                report.young.add(st.st_size)
            elif _remove(fd, name, where, report, f"{fan}/{name}"):
                report.removed.add(st.st_size)
    finally:
        os.close(fd)


def _lstat(entry: os.DirEntry, where: str) -> os.stat_result | None:
    try:
        return entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None  # gone meanwhile (a writer without a lease): nothing to do
    except OSError as e:
        raise OutputError(f"cannot stat: {e.strerror}", os.path.join(where, entry.name)) from None


def _remove(dirfd: int, name: str, where: str, report: Report, shown: str | None = None) -> bool:
    """Unlink `name` (not in a dry run); False if it was gone already."""
    if not report.dry_run:
        try:
            os.unlink(name, dir_fd=dirfd)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise OutputError(f"cannot remove: {e.strerror}", os.path.join(where, name)) from None
    if report.names is not None:
        report.names.append(shown or name)
    return True
