"""An OSTree repository, read directly (no libostree): config, refs, commit, dirtree, dirmeta
and content objects in every repository mode (inputs.md §3; ostree's `ostree-repo.c`,
`ostree-core.c`).

* `REPO/config` (GKeyFile): `[core] repo_version=1`, `mode=` bare | bare-user | bare-user-only
  | archive-z2 (also spelt archive), `parent=` another repository searched for objects and
  refs this one lacks (a relative path is taken from the current directory, as ostree does),
  `disable-xattrs=` (bare: object xattrs are not read).  `bare-split-xattrs` keeps xattrs in
  objects of its own; ostree 2022.7 cannot even write it, so it is refused rather than guessed.
* Objects live at `objects/XX/YYYY….EXT` (XX = the first two hex digits of the SHA-256).
  Metadata objects (`.commit`, `.dirtree`, `.dirmeta`) are GVariants, always checked against
  their name (SHA-256 of the bytes: cheap, and a wrong tree is worse than no tree) and decoded
  strictly (`gvariant`).  OSTree's own integers in them are big-endian.
* Content objects (`.file`, archive `.filez`) keep a file's uid/gid/mode/xattrs where the mode
  says: bare — the object's own inode (lstat, xattrs, real symlinks); bare-user — the
  `user.ostreemeta` xattr `(uuua(ayay))`, symlinks being regular files holding the target and a
  NUL; bare-user-only — nowhere: uid = gid = 0 and no xattrs by definition; archive — a header
  `BE u32 length, 4 zero bytes, (tuuuusa(ayay))` followed by the data as raw deflate.
  A content object's checksum covers `BE u32 length, 4 zero bytes, (uuuusa(ayay))` (xattrs
  sorted) and the data: `content_checksum` recomputes it for `--verify`.

Every problem is an `ObjectError` naming the object file and, where known, the tree path that
led to it.

Every file in a repository is opened with `cfsc.base.beneath.open_regular` relative to the
repository's directory: config, refs and objects alike, so nothing outside it is read (a
symlink on the way is refused; only refs may be symlinks that stay inside, ostree's ref
aliases), and a FIFO, socket or device is refused without being opened (a FIFO at a ref or the
config must not hang the compile).
"""

from __future__ import annotations

import configparser
import errno
import hashlib
import os
import re
import stat
import struct
import zlib
from collections.abc import Iterator

from cfsc.base import beneath
from cfsc.base.beneath import NotRegular
from cfsc.base.errors import InputError, shown_path
from cfsc.frontends.ostree import gvariant
from cfsc.frontends.ostree.gvariant import GVariantError

BARE, BARE_USER, BARE_USER_ONLY, ARCHIVE = "bare", "bare-user", "bare-user-only", "archive"
MODES = {"bare": BARE, "bare-user": BARE_USER, "bare-user-only": BARE_USER_ONLY,
         "archive-z2": ARCHIVE, "archive": ARCHIVE}

COMMIT = gvariant.parse("(metadata: a{sv}, parent: ay, related: a(name: s, checksum: ay), subject: s,"
                        " body: s, timestamp: t, tree: ay, meta: ay)")
DIRTREE = gvariant.parse("(files: a(name: s, checksum: ay), dirs: a(name: s, tree: ay, meta: ay))")
DIRMETA = gvariant.parse("(uid: u, gid: u, mode: u, xattrs: a(name: ay, value: ay))")
FILEMETA = DIRMETA  # bare-user's user.ostreemeta has the dirmeta's shape
FILE_HEADER = gvariant.parse("(uid: u, gid: u, mode: u, rdev: u, target: s, xattrs: a(name: ay, value: ay))")
ARCHIVE_HEADER = gvariant.parse("(size: t, uid: u, gid: u, mode: u, rdev: u, target: s,"
                                " xattrs: a(name: ay, value: ay))")

CHECKSUM = re.compile(r"[0-9a-f]{64}")
PARTIAL = re.compile(r"[0-9a-f]{1,63}")  # the start of a commit checksum, if one matches
MAX_METADATA = 128 << 20  # OSTREE_MAX_METADATA_SIZE
PATH_MAX = 4096
OSTREEMETA = "user.ostreemeta"
PERMS = 0o7777
READ_CHUNK = 1 << 20
INFLATE_CHUNK = 4 << 20  # inflated bytes per step: a small object cannot balloon in memory
_BE32 = struct.Struct(">I")
_LE32 = struct.Struct("<I")
_SIZE_PREFIX = struct.Struct(">I4x")


def swap32(v: int) -> int:
    """An OSTree big-endian u32 as GVariant (little-endian) decoded it, and back."""
    return _BE32.unpack(_LE32.pack(v))[0]


def swap64(v: int) -> int:
    return int.from_bytes(v.to_bytes(8, "little"), "big")


class ObjectError(InputError):
    """A repository object is missing, corrupt or malformed; `where` is the object's path."""


class Content:
    """A content object's metadata, and (regular files) an open descriptor on the object."""

    __slots__ = ("data_offset", "fd", "gid", "mode", "path", "repo", "size", "target", "uid", "xattrs")

    def __init__(self, repo: Repo, path: str) -> None:
        self.repo = repo
        self.path = path  # the object file, for messages
        self.fd = -1
        self.data_offset = 0  # archive: where the deflate stream starts
        self.mode = self.uid = self.gid = self.size = 0
        self.target: bytes | None = None
        self.xattrs: tuple[tuple[bytes, bytes], ...] = ()

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def chunks(self) -> Iterator[bytes]:
        """The file's data (nothing for symlinks), checked against its size; archive data inflated."""
        if self.repo.mode == ARCHIVE:
            yield from self._inflate()
            return
        if self.fd < 0:
            return
        total = 0
        while True:
            # One byte past the expected end, so growth shows; small reads for small files.
            chunk = os.pread(self.fd, min(READ_CHUNK, self.size - total + 1) if total <= self.size else 1, total)
            if not chunk:
                break
            total += len(chunk)
            yield chunk
        if total != self.size:
            raise ObjectError(f"changed while read: {total} bytes, {self.size} a moment before", self.path)

    def _inflate(self) -> Iterator[bytes]:
        # The rest of the file: nothing, or one raw-deflate stream ending at the file's end that
        # inflates to exactly `size` bytes (an empty file has the 2-byte empty stream; symlinks
        # have none).
        inflater = zlib.decompressobj(-15)
        pos = self.data_offset
        total = 0
        started = False
        try:
            while True:
                raw = os.pread(self.fd, READ_CHUNK, pos)
                if not raw:
                    break
                started = True
                pos += len(raw)
                data = inflater.decompress(raw, INFLATE_CHUNK)
                while True:
                    if data:
                        total += len(data)
                        if total > self.size:
                            raise ObjectError(f"compressed data inflates to more than the header's {self.size}"
                                              " bytes", self.path)
                        yield data
                    if not inflater.unconsumed_tail:
                        break
                    data = inflater.decompress(inflater.unconsumed_tail, INFLATE_CHUNK)
                if inflater.eof:
                    break
            if inflater.eof and (inflater.unused_data or os.pread(self.fd, 1, pos)):
                raise ObjectError("bytes after the end of the compressed data", self.path)
            data = inflater.flush()
            if data:
                total += len(data)
                yield data
        except zlib.error as e:
            raise ObjectError(f"corrupt compressed data ({e})", self.path) from None
        if started and not inflater.eof:
            raise ObjectError("compressed data ends early (truncated object)", self.path)
        if total != self.size:
            raise ObjectError(f"compressed data inflates to {total} bytes: the header says {self.size}", self.path)


class Repo:
    """One repository (and, through `parent`, the repositories it falls back to)."""

    def __init__(self, path: str, _children: tuple[str, ...] = ()) -> None:
        self.path = path
        self.objects = os.path.join(path, "objects")
        self._fd = -1
        self.parent: Repo | None = None
        try:
            self._configure(_children)
        except BaseException:
            self.close()
            raise

    def _configure(self, _children: tuple[str, ...]) -> None:
        path = self.path
        config_path = os.path.join(path, "config")
        config = configparser.ConfigParser(interpolation=None, strict=False, delimiters=("=",),
                                           comment_prefixes=("#",), inline_comment_prefixes=None)
        config.optionxform = str  # keys are case-sensitive, as GKeyFile has them
        try:
            fd, _st = beneath.open_regular(self.dirfd(), b"config")
        except (FileNotFoundError, NotADirectoryError):
            raise InputError("not an OSTree repository (no config file)", path) from None
        except OSError as e:
            raise InputError(f"cannot read the repository config: {beneath.describe(e)}", config_path) from None
        try:
            with os.fdopen(fd, encoding="utf-8") as f:
                config.read_file(f)
        except (OSError, UnicodeDecodeError, configparser.Error) as e:
            raise InputError(f"cannot read the repository config: {e}", config_path) from None
        core = config["core"] if config.has_section("core") else {}
        version = core.get("repo_version")
        if version != "1":
            raise InputError(f"repo_version {version!r}: expected 1", config_path + ":[core]")
        if _bool(core.get("archive", "false"), config_path):
            raise InputError("archive=true (pre-2017 archive repositories): expected mode=archive-z2", config_path)
        name = core.get("mode", "bare")
        if name == "bare-split-xattrs":
            raise InputError("mode bare-split-xattrs is not supported (its xattr objects are undocumented"
                             " and ostree 2022.7 cannot write them to test against)", config_path)
        mode = MODES.get(name)
        if mode is None:
            raise InputError(f"mode {name!r}: expected bare, bare-user, bare-user-only or archive-z2",
                             config_path + ":[core]")
        self.mode = mode
        self.disable_xattrs = _bool(core.get("disable-xattrs", "false"), config_path)
        self.hint = ""  # added to "missing object" errors (a partial commit)
        parent = core.get("parent", "")
        if parent:
            here = os.path.realpath(path)
            if here in _children:
                raise InputError(f"parent {parent!r} leads back to this repository", config_path)
            self.parent = Repo(parent, _children + (here,))

    def dirfd(self) -> int:
        """The repository's directory (opened at first use, again after `close`)."""
        if self._fd < 0:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except (FileNotFoundError, NotADirectoryError):
                raise InputError("not an OSTree repository (no such directory)", self.path) from None
            except OSError as e:
                raise InputError(f"cannot open the repository: {e.strerror}", self.path) from None
        return self._fd

    def close(self) -> None:
        for repo in self.chain():
            fd, repo._fd = repo._fd, -1
            if fd >= 0:
                os.close(fd)

    def chain(self) -> Iterator[Repo]:
        repo: Repo | None = self
        while repo is not None:
            yield repo
            repo = repo.parent

    def object_path(self, checksum: bytes, ext: str) -> str:
        h = checksum.hex()
        return os.path.join(self.objects, h[:2], h[2:] + ext)

    @staticmethod
    def object_name(checksum: bytes, ext: str) -> bytes:
        """The object's path inside the repository."""
        h = checksum.hex()
        return f"objects/{h[:2]}/{h[2:]}{ext}".encode()

    def found_path(self, checksum: bytes, ext: str) -> str:
        """Where an object is: in the first repository of the chain that has it (else this one)."""
        for repo in self.chain():
            path = repo.object_path(checksum, ext)
            if os.path.lexists(path):
                return path
        return self.object_path(checksum, ext)

    def missing(self, checksum: bytes, ext: str) -> ObjectError:
        where = self.object_path(checksum, ext)
        parents = " (nor in its parent repositories)" if self.parent else ""
        return ObjectError(f"missing: not in the repository{parents}{self.hint}", where)

    # -- refs -------------------------------------------------------------------------------

    def resolve(self, ref: str, where: str) -> bytes:
        """A ref (`BRANCH`, `REMOTE:BRANCH`, a checksum or the start of one; `^` suffixes for
        parents) → commit checksum.

        As `ostree rev-parse`: a REF of lowercase hex digits that starts exactly one commit
        object's checksum means that commit, even where a branch has the same name (ostree
        tries it first); two such commits make the REF ambiguous; none, and it is a branch.
        """
        base = ref.rstrip("^")
        if CHECKSUM.fullmatch(base):
            checksum = bytes.fromhex(base)
        else:
            matches = self._commits_starting_with(base) if PARTIAL.fullmatch(base) else []
            if len(matches) > 1:
                raise InputError(f"{base!r} starts {len(matches)} commit checksums "
                                 f"({', '.join(m[:16] + '…' for m in matches[:3])}): give more digits", where)
            checksum = bytes.fromhex(matches[0]) if matches else self._lookup_ref(base, where)
        for _ in range(len(ref) - len(base)):
            try:
                parent = self.commit(checksum)[2]
            except ObjectError as e:
                raise ObjectError(f"{e.what} (commit {checksum.hex()}, resolving {ref})", e.where) from None
            if not parent:
                raise InputError(f"commit {checksum.hex()} has no parent", where)
            checksum = parent
        return checksum

    def _commits_starting_with(self, prefix: str) -> list[str]:
        """Checksums of the commit objects (in this repository and its parents) with `prefix`."""
        found: set[str] = set()
        for repo in self.chain():
            try:
                objects = beneath.open_dir(repo.dirfd(), b"objects")
            except OSError:
                continue
            try:
                fanout = [prefix[:2]] if len(prefix) >= 2 else [d for d in os.listdir(objects) if d.startswith(prefix)]
                for d in fanout:
                    try:
                        fd = beneath.open_dir(objects, d.encode())
                    except OSError:
                        continue
                    try:
                        names = os.listdir(fd)
                    finally:
                        os.close(fd)
                    found.update(d + n[:-7] for n in names
                                 if n.endswith(".commit") and CHECKSUM.fullmatch(d + n[:-7]) and (d + n).startswith(prefix))
            except OSError:
                continue
            finally:
                os.close(objects)
        return sorted(found)

    def _lookup_ref(self, ref: str, where: str) -> bytes:
        remote, colon, branch = ref.rpartition(":")
        names = [f"refs/remotes/{remote}/{branch}"] if colon else [f"refs/heads/{branch}", f"refs/remotes/{branch}"]
        for repo in self.chain():
            for name in names:
                path = os.path.join(repo.path, name)
                try:
                    # symlinks: ostree's ref aliases are symlinks (inside the repository).
                    fd, _st = beneath.open_regular(repo.dirfd(), name.encode(), symlinks=True)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                except NotRegular as e:
                    if stat.S_ISDIR(e.st.st_mode):  # refs/heads/a when there are refs/heads/a/…
                        continue
                    raise InputError(f"cannot read the ref: {beneath.describe(e)}", path) from None
                except OSError as e:
                    raise InputError(f"cannot read the ref: {beneath.describe(e)}", path) from None
                try:
                    text = os.read(fd, 4096)
                except OSError as e:
                    raise InputError(f"cannot read the ref: {e.strerror}", path) from None
                finally:
                    os.close(fd)
                value = text.rstrip().decode("ascii", "replace")
                if not CHECKSUM.fullmatch(value):
                    raise InputError(f"{value[:80]!r}: expected a commit checksum (64 lowercase hex digits)", path)
                return bytes.fromhex(value)
        tried = ", ".join(os.path.join(self.path, n) for n in names)
        parents = " and in the parent repositories" if self.parent else ""
        raise InputError(f"no ref {ref!r} (looked for {tried}{parents})", where)

    # -- metadata objects -------------------------------------------------------------------

    def metadata(self, checksum: bytes, ext: str, type_):
        """Read a metadata object, check its SHA-256 against its name, decode it."""
        for repo in self.chain():
            path = repo.object_path(checksum, ext)
            try:
                fd, st = beneath.open_regular(repo.dirfd(), repo.object_name(checksum, ext))
            except FileNotFoundError:
                continue
            except OSError as e:
                raise ObjectError(f"cannot open: {beneath.describe(e)}", path) from None
            try:
                if st.st_size > MAX_METADATA:
                    raise ObjectError(f"{st.st_size} bytes: larger than OSTree's limit for metadata"
                                      f" ({MAX_METADATA} bytes)", path)
                data = _read_all(fd, st.st_size + 1)
            except OSError as e:
                raise ObjectError(f"cannot read: {e.strerror}", path) from None
            finally:
                os.close(fd)
            got = hashlib.sha256(data).digest()
            try:
                value = gvariant.decode(type_, data)
            except GVariantError as e:
                if got != checksum:  # say both: "truncated" shows in the second half
                    raise ObjectError(f"corrupt: its SHA-256 is {got.hex()}, not the checksum it is stored under;"
                                      f" and malformed: {e.where()}: {e.what}", path) from None
                raise ObjectError(f"malformed {ext[1:]}: {e.where()}: {e.what}", path) from None
            if got != checksum:
                raise ObjectError(f"corrupt: its SHA-256 is {got.hex()}, not the checksum it is stored under", path)
            return value
        raise self.missing(checksum, ext)

    def commit(self, checksum: bytes) -> tuple[bytes, bytes, bytes]:
        """(root dirtree, root dirmeta, parent or b"") of a commit."""
        value = self.metadata(checksum, ".commit", COMMIT)
        metadata, parent, _related, _subject, _body, _time, tree, meta = value
        path = self.object_path(checksum, ".commit")
        for key, _v in metadata:
            if not key:
                raise ObjectError("malformed commit: empty metadata key", path)
        for field, v in (("parent", parent), ("tree", tree), ("meta", meta)):
            if len(v) != 32 and (v or field != "parent"):
                raise ObjectError(f"malformed commit: {field} checksum of {len(v)} bytes, expected 32", path)
        return tree, meta, parent

    def dirmeta(self, checksum: bytes) -> tuple[int, int, int, tuple]:
        """(mode, uid, gid, xattrs) of a directory."""
        uid, gid, mode, xattrs = self.metadata(checksum, ".dirmeta", DIRMETA)
        mode = swap32(mode)
        path = self.object_path(checksum, ".dirmeta")
        if not stat.S_ISDIR(mode) or mode & ~(stat.S_IFMT(mode) | PERMS):
            raise ObjectError(f"malformed dirmeta: mode {mode:o} is not a directory's", path)
        return mode, swap32(uid), swap32(gid), _xattrs(xattrs, path)

    # -- content objects --------------------------------------------------------------------

    def content(self, checksum: bytes) -> Content:
        """Open a content object and read its metadata (the caller closes it)."""
        for repo in self.chain():
            ext = ".filez" if repo.mode == ARCHIVE else ".file"
            path = repo.object_path(checksum, ext)
            obj = Content(repo, path)
            name = repo.object_name(checksum, ext)
            try:
                try:
                    obj.fd, st = beneath.open_regular(repo.dirfd(), name)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if e.errno != errno.ELOOP or isinstance(e, NotRegular):
                        raise ObjectError(f"cannot open: {beneath.describe(e)}", path) from None
                    if repo.mode not in (BARE, BARE_USER_ONLY):
                        raise ObjectError(f"a symlink: {repo.mode} repositories keep every object in a regular"
                                          f" file", path) from None
                    repo._symlink(obj, name)  # bare and bare-user-only keep symlinks as symlinks
                    return obj
                repo._regular(obj, st)
                return obj
            except OSError as e:
                obj.close()
                raise ObjectError(f"cannot read: {e.strerror}", path) from None
            except BaseException:
                obj.close()
                raise
        raise self.missing(checksum, ".filez" if self.mode == ARCHIVE else ".file")

    def _symlink(self, obj: Content, name: bytes) -> None:
        """A symlink object, read through an O_PATH descriptor of the symlink itself (a
        symlinked directory on the way is still refused: ELOOP)."""
        try:
            pfd = beneath.open_path(self.dirfd(), name)
        except OSError as e:
            raise ObjectError(f"cannot open: {beneath.describe(e)}", obj.path) from None
        try:
            st = os.fstat(pfd)
            if not stat.S_ISLNK(st.st_mode):
                raise ObjectError("replaced while read", obj.path)
            obj.mode = st.st_mode
            obj.target = os.readlink(b"", dir_fd=pfd)
            obj.size = len(obj.target)
            if self.mode == BARE:
                obj.uid, obj.gid = st.st_uid, st.st_gid
                if not self.disable_xattrs:  # /proc/self/fd/N leads to the symlink itself
                    obj.xattrs = _fs_xattrs(f"/proc/self/fd/{pfd}".encode(), obj.path, follow=True)
        finally:
            os.close(pfd)

    def _regular(self, obj: Content, st: os.stat_result) -> None:
        mode = self.mode
        if mode == ARCHIVE:
            self._archive_header(obj, st.st_size)
        elif mode == BARE_USER:
            try:
                raw = os.getxattr(obj.fd, OSTREEMETA)
            except OSError as e:
                if e.errno == errno.ENODATA:
                    raise ObjectError(f"bare-user object without its {OSTREEMETA} xattr", obj.path) from None
                raise
            try:
                uid, gid, fmode, xattrs = gvariant.decode(FILEMETA, raw)
            except GVariantError as e:
                raise ObjectError(f"malformed {OSTREEMETA} xattr: {e.where()}: {e.what}", obj.path) from None
            obj.uid, obj.gid, obj.mode = swap32(uid), swap32(gid), swap32(fmode)
            obj.xattrs = _xattrs(xattrs, obj.path)
            obj.size = st.st_size
            if stat.S_ISLNK(obj.mode):
                # The target and a NUL (ostree writes strlen + 1 bytes).
                data = os.pread(obj.fd, PATH_MAX + 1, 0)
                if len(data) < 2 or data[-1] != 0 or data.find(0) != len(data) - 1 or len(data) > PATH_MAX:
                    raise ObjectError("bare-user symlink object: expected the target and one NUL", obj.path)
                obj.target = data[:-1]
                obj.size = len(obj.target)
                obj.close()
        else:
            obj.mode, obj.size = st.st_mode, st.st_size
            if mode == BARE:
                obj.uid, obj.gid = st.st_uid, st.st_gid
                if not self.disable_xattrs:
                    obj.xattrs = _fs_xattrs(obj.fd, obj.path)
        fmode = obj.mode
        if not (stat.S_ISREG(fmode) or stat.S_ISLNK(fmode)) or fmode & ~(stat.S_IFMT(fmode) | PERMS):
            raise ObjectError(f"mode {fmode:o}: expected a regular file or a symlink", obj.path)
        if stat.S_ISLNK(fmode) and not obj.target:
            raise ObjectError("symlink with an empty target", obj.path)

    def _archive_header(self, obj: Content, file_size: int) -> None:
        head = os.pread(obj.fd, 8, 0)
        if len(head) < 8:
            raise ObjectError(f"{len(head)} bytes: too short for the archive header", obj.path)
        length = _SIZE_PREFIX.unpack(head)[0]
        if head[4:] != bytes(4):
            raise ObjectError("non-zero padding after the header length", obj.path)
        if not length or length > file_size - 8:
            raise ObjectError(f"header of {length} bytes in a {file_size}-byte object", obj.path)
        raw = _pread_all(obj.fd, length, 8)
        try:
            size, uid, gid, mode, rdev, target, xattrs = gvariant.decode(ARCHIVE_HEADER, raw)
        except GVariantError as e:
            raise ObjectError(f"malformed archive header: byte 8 + {e.where()}: {e.what}", obj.path) from None
        if rdev:
            raise ObjectError(f"rdev {swap32(rdev)} in the archive header: expected 0", obj.path)
        obj.uid, obj.gid, obj.mode = swap32(uid), swap32(gid), swap32(mode)
        obj.size = swap64(size)
        obj.xattrs = _xattrs(xattrs, obj.path)
        obj.data_offset = 8 + length
        if stat.S_ISLNK(obj.mode):
            if obj.size:
                raise ObjectError(f"symlink with data size {obj.size}: expected 0", obj.path)
            obj.target = target
            obj.size = len(target)
        elif target:
            raise ObjectError("regular file with a symlink target", obj.path)


def checksum_header(obj: Content):
    """A sha256 fed the checksum header of `obj` (the size-prefixed `(uuuusa(ayay))`, xattrs
    sorted): feed it the data, and its digest is the object's OSTree checksum."""
    uid, gid, xattrs = obj.uid, obj.gid, obj.xattrs
    if obj.repo.mode == BARE_USER_ONLY:
        uid = gid = 0
        xattrs = ()
    target = obj.target if stat.S_ISLNK(obj.mode) else b""
    header = gvariant.encode(FILE_HEADER, (swap32(uid), swap32(gid), swap32(obj.mode), 0, target,
                                           [(k + b"\0", v) for k, v in xattrs]))
    h = hashlib.sha256(_SIZE_PREFIX.pack(len(header)))
    h.update(header)
    return h


def _xattrs(items: list, path: str) -> tuple[tuple[bytes, bytes], ...]:
    """An `a(ayay)` list → sorted `(name, value)` pairs, names without their NUL.  ostree sorts
    xattrs when it writes them but older versions did not always: order is not required."""
    out = []
    for i, (name, value) in enumerate(items):
        if len(name) < 2 or name[-1] != 0 or name.find(0) != len(name) - 1:
            raise ObjectError(f"xattr {i}: name {name!r} is not a non-empty NUL-terminated string", path)
        out.append((name[:-1], value))
    out.sort()
    for (a, _), (b, _) in zip(out, out[1:], strict=False):
        if a == b:
            raise ObjectError(f"xattr {shown_path(a)} is listed twice", path)
    return tuple(out)


def _fs_xattrs(target: int | bytes, path: str, follow: bool = False) -> tuple[tuple[bytes, bytes], ...]:
    """A bare object's own xattrs (all of them, as ostree reads them)."""
    follow = follow or isinstance(target, int)
    try:
        keys = os.listxattr(target) if follow else os.listxattr(target, follow_symlinks=False)
        items = [(os.fsencode(k), os.getxattr(target, k) if follow else os.getxattr(target, k, follow_symlinks=False))
                 for k in keys]
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            return ()
        raise ObjectError(f"cannot read xattrs: {e.strerror}", path) from None
    items.sort()
    return tuple(items)


def _bool(value: str, where: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1"):
        return True
    if v in ("false", "0"):
        return False
    raise InputError(f"{value!r}: expected true or false", where)


def _read_all(fd: int, limit: int) -> bytes:
    parts = []
    while limit > 0:
        part = os.read(fd, min(limit, READ_CHUNK))
        if not part:
            break
        parts.append(part)
        limit -= len(part)
    return b"".join(parts)


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data
