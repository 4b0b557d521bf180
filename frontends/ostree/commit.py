"""OSTree commits → tree, read straight from the repository (no libostree, no checkout).

Source: `ostree:REPO:REF`.  REF is a commit checksum (64 hex digits, or fewer that start
exactly one commit's checksum, as `ostree rev-parse` takes them), a branch (`refs/heads/
BRANCH`, falling back to `refs/remotes/BRANCH` so `origin/main` works) or `REMOTE:BRANCH`
(`refs/remotes/REMOTE/BRANCH`), each optionally followed by `^` (the parent commit; repeat for
grandparents).  Ref names never contain `:` (ostree's grammar: fragments of `[-._A-Za-z0-9]`
starting with a letter, digit or `_`, joined by `/`), so the source splits at its last `:`, or for a remote ref at the one before;
REPO itself may contain `:` too, so cfsc takes the split whose REPO is an OSTree repository (a
directory with a `config` file), and calls the source ambiguous if both are.  Refs and objects
missing in REPO are looked up in its `[core] parent=` repositories, as ostree does.

The tree is the commit as `ostree checkout` writes it: the root and every directory from its
dirmeta (uid, gid, mode, xattrs), every file and symlink from its content object, with the
metadata wherever the repository mode keeps it (`ostreerepo`), every mtime 0 (OSTree stores
none).  Every dirtree entry is its own inode (OSTree records no hard links; objects shared by
several entries are read once).  `--hardlinks` instead makes the entries of one content object
one inode, as a hard-linked checkout of a bare repository has them, except empty files (ostree
always copies those).  So `cfsc compile ostree:REPO:REF --digest-store S` gives, byte for byte,
the image `cfsc compile --use-epoch --digest-store S` gives for the checkout.  Regular files:

* 1..64 bytes: inline, as the directory frontend and mkcomposefs do;
* larger, `--digest-store STORE`: the data is imported into the store (copied or reflinked
  from bare objects, inflated from archive ones) and the payload names it there (`xx/yyyy…`);
* larger, no store (bare, bare-user, bare-user-only repositories): the payload is the object
  itself, `xx/yyyy….file` relative to `REPO/objects`, so the image mounts with
  `cfsc mount --store REPO/objects` (plus the parents' objects, if any are used).  Archive objects are
  compressed, so archive repositories need a store.

The fs-verity digest comes from the kernel when the object has fs-verity enabled (as ostree
takes it), else it is computed from the data, in a thread pool (`--threads`).

`--ostree-compat` builds the image `ostree checkout --composefs` (ostree ≥ 2023.4,
`ostree-repo-composefs.c`) writes, whose digest `ostree commit --generate-composefs-metadata`
records as `ostree.composefs.digest.v0`: no inline data, every non-empty file's payload is its
bare object name `xx/yyyy….file` (archive repositories included: that is the name it has once
pulled into a deployment's bare repository), and `usr etc boot var sysroot` are added to the
root when missing (040755, 0:0).  It takes no store and no `--hardlinks`.

Checks: metadata objects are always checked against their names (SHA-256 of their bytes);
`--verify` also recomputes every content object's OSTree checksum (header and data, inputs.md
§3.6) while reading it.  Any missing, corrupt or malformed object is an error naming the object
file and the tree path that reached it; so are names ostree would refuse (empty, `.`, `..`,
containing `/`), unsorted or duplicate entries, and modes that are not a directory's (dirmeta)
or a regular file's or symlink's (content).

A dirtree may be named by many directories (identical subtrees share one object), so a few
objects can stand for an exponential tree: thirty levels of two subdirectories each naming
the next level's one dirtree are 2^30 directories.  The entries a walk expands are bounded by
`EXPANSION` times the distinct dirtree entries read (real commits expand about 1-2 times),
or `EXPANSION_FLOOR`; past that the commit is refused, naming the dirtree reached last.
"""

from __future__ import annotations

import collections
import os
import re
import stat
from concurrent.futures import Future, ThreadPoolExecutor

from cfsc.base.errors import UsageError, shown_path
from cfsc.base.fsverity import FsVerityHasher, algorithm_named, digest_bytes, kernel_digest, payload_path
from cfsc.base.limits import INLINE_MAX
from cfsc.base.options import Options
from cfsc.base.progress import Progress, mib
from cfsc.base.tree import S_IFDIR, S_IFMT, S_IFREG, Inode, Tree
from cfsc.frontends.ostree.repo import ARCHIVE, DIRTREE, Content, ObjectError, Repo, checksum_header
from cfsc.store.objects import Store, loaded, open_store

PREFIX = "ostree:"
WHOLE_MAX = 1 << 20  # objects up to this size are read with one call
BATCH = 32  # objects per pool task
COMPAT_DIRS = (b"usr", b"etc", b"boot", b"var", b"sysroot")
_FRAGMENT = r"[A-Za-z0-9_][-._A-Za-z0-9]*"  # OSTREE_REF_FRAGMENT_REGEXP (so no `.`, `..`)
REF = re.compile(rf"(?:(?P<remote>{_FRAGMENT}):)?{_FRAGMENT}(?:/{_FRAGMENT})*\^*")


def parse_source(source: str) -> tuple[str, str]:
    """`ostree:REPO:REF` → (REPO, REF); see the module docstring for the rules."""
    body = source[len(PREFIX):] if source.startswith(PREFIX) else source
    repo, colon, ref = body.rpartition(":")
    if not colon or not repo or not ref:
        raise UsageError("expected ostree:REPO:REF (REF: a branch, REMOTE:BRANCH or a commit checksum)", source)
    candidates = [(repo, ref)]
    outer, colon, remote = repo.rpartition(":")
    if colon and outer and re.fullmatch(_FRAGMENT, remote):
        candidates.append((outer, f"{remote}:{ref}"))
    found = [(r, f) for r, f in candidates if os.path.isfile(os.path.join(r, "config"))]
    if len(found) > 1:
        raise UsageError(f"ambiguous: both {found[0][0]!r} and {found[1][0]!r} are OSTree repositories"
                         " (name the repository by another path)", source)
    repo, ref = found[0] if found else candidates[0]
    if not REF.fullmatch(ref):
        raise UsageError(f"ref {ref!r}: expected a branch, REMOTE:BRANCH or a commit checksum (parts of"
                         " [-._A-Za-z0-9] starting with a letter, digit or '_', joined by '/'; '^' for parents)", source)
    return repo, ref


def load(source, options: Options | None = None) -> Tree:
    options = options or Options()
    return _Loader(os.fsdecode(source), options).run()


EXPANSION = 64
EXPANSION_FLOOR = 1 << 20


class _Loader:
    def __init__(self, source: str, options: Options) -> None:
        self.source = source
        self.options = options
        self.compat = options.ostree_compat
        self.verify = options.verify
        self.algorithm = algorithm_named(options.hash)
        if self.compat and options.digest_store:
            raise UsageError("--ostree-compat names payloads by repository object: drop --digest-store",
                             "--ostree-compat")
        if self.compat and options.hardlinks:
            raise UsageError("--ostree-compat makes one inode per entry, as ostree does: drop --hardlinks",
                             "--ostree-compat")
        repo_path, self.ref = parse_source(source)
        self.repo = Repo(repo_path)
        archive = next((r for r in self.repo.chain() if r.mode == ARCHIVE), None)
        if archive is not None and not options.digest_store and not self.compat:
            raise UsageError(f"archive repository {archive.path!r} keeps file data compressed: give"
                             " --digest-store DIR to import it (or --ostree-compat)", source)
        self.tree: Tree | None = None
        self.groups: dict[bytes, list[Inode]] = {}  # content checksum -> its entries, walk order
        self.names: dict[bytes, list[tuple[Inode, bytes]]] | None = {} if options.hardlinks else None
        self.dir_trees: dict[int, bytes] = {}  # id(directory inode) -> its dirtree checksum
        self.metas: dict[bytes, tuple] = {}  # dirmeta checksum -> (mode, uid, gid, xattrs)
        self.xattr_cache: dict[tuple, tuple] = {}
        self.store: Store | None = None
        self.failed = False
        self.progress = Progress(options.progress)
        self.done = self.bytes_done = 0
        self.trees_read: set[bytes] = set()  # dirtree checksums expanded so far
        self.distinct = 0  # entries of those dirtrees, each counted once
        self.expanded = 0  # entries expanded, counted per directory that names a dirtree
        self.shared_trees: dict[bytes, list[tuple]] = {}  # dirtrees named more than once: their entries

    # -- the walk over dirtrees -------------------------------------------------------------

    def run(self) -> Tree:
        try:
            return self._run()
        finally:
            self.repo.close()

    def _run(self) -> Tree:
        repo = self.repo
        commit = repo.resolve(self.ref, self.source)
        hexsum = commit.hex()
        for r in repo.chain():
            marker = os.path.join(r.path, "state", hexsum + ".commitpartial")
            if os.path.exists(marker):
                repo.hint = f"; the commit is partial ({marker}): only some of its objects were pulled"
        try:
            tree_sum, meta_sum, _parent = repo.commit(commit)
        except ObjectError as e:
            raise ObjectError(f"{e.what} (commit {hexsum}, {self.ref})", e.where) from None
        root = self.directory(meta_sum, b"/")
        self.tree = tree = Tree(root, self.source)
        self.dir_trees[id(root)] = tree_sum
        self.walk(root, tree_sum)
        try:
            self.read_contents()
        finally:
            self.progress.close()
        if self.names is not None:
            self.link()
        if self.compat:
            children = root.children
            assert children is not None
            for name in COMPAT_DIRS:
                if name not in children:
                    children[name] = Inode(S_IFDIR | 0o755)
        tree.locate = self.locate
        return tree

    def directory(self, meta_sum: bytes, path: bytes) -> Inode:
        meta = self.metas.get(meta_sum)
        if meta is None:
            try:
                mode, uid, gid, xattrs = self.repo.dirmeta(meta_sum)
            except ObjectError as e:
                raise ObjectError(f"{e.what} (directory {shown_path(path)})", e.where) from None
            meta = self.metas[meta_sum] = (mode, uid, gid, self.filtered(xattrs))
        return Inode(meta[0], meta[1], meta[2], xattrs=meta[3])

    def entries(self, tree_sum: bytes, path: bytes) -> list[tuple]:
        """A dirtree's entries in name order: (name, checksum) files, (name, tree, meta) dirs.
        A dirtree named a second time is kept (read and checked once more, then not again)."""
        hit = self.shared_trees.get(tree_sum)
        if hit is not None:
            self.count(tree_sum, len(hit), path)
            return hit
        found = self._entries(tree_sum, path)
        if tree_sum in self.trees_read:
            self.shared_trees[tree_sum] = found
        self.count(tree_sum, len(found), path)
        return found

    def count(self, tree_sum: bytes, count: int, path: bytes) -> None:
        """Charge a dirtree's entries to the expansion bound."""
        if tree_sum not in self.trees_read:
            self.trees_read.add(tree_sum)
            self.distinct += count
        self.expanded += count
        if self.expanded > max(EXPANSION_FLOOR, EXPANSION * self.distinct):
            raise ObjectError(f"the commit's directories expand to more than {self.expanded - count} entries from "
                              f"{self.distinct} distinct ones, each named over {EXPANSION} times on average (a "
                              f"tree bomb; directory {shown_path(path)})", self.repo.found_path(tree_sum, ".dirtree"))

    def _entries(self, tree_sum: bytes, path: bytes) -> list[tuple]:
        try:
            files, dirs = self.repo.metadata(tree_sum, ".dirtree", DIRTREE)
        except ObjectError as e:
            raise ObjectError(f"{e.what} (directory {shown_path(path)})", e.where) from None

        def where() -> str:
            return self.repo.found_path(tree_sum, ".dirtree")

        for kind, items in (("files", files), ("dirs", dirs)):
            prev = None
            for i, item in enumerate(items):
                name = item[0]
                if not name or name == b"." or name == b".." or b"/" in name:
                    raise ObjectError(f"{kind}[{i}]: name {shown_path(name)!r}: expected a file name (not empty, '.', '..'"
                                      f" or containing '/') (directory {shown_path(path)})", where())
                if prev is not None and name <= prev:
                    raise ObjectError(f"{kind}[{i}]: {shown_path(name)!r} after {shown_path(prev)!r}: entries must be sorted by"
                                      f" name, each once (directory {shown_path(path)})", where())
                prev = name
                if any(len(c) != 32 for c in item[1:]):
                    raise ObjectError(f"{kind}[{i}] ({shown_path(name)}): checksum of {len(item[1])} bytes, expected 32"
                                      f" (directory {shown_path(path)})", where())
        if not dirs:
            return files
        if not files:
            return dirs
        if not {f[0] for f in files}.isdisjoint(d[0] for d in dirs):
            name = min({f[0] for f in files} & {d[0] for d in dirs})
            raise ObjectError(f"{shown_path(name)!r} is both a file and a directory (directory {shown_path(path)})", where())
        return sorted(files + dirs, key=_name)

    def walk(self, root: Inode, tree_sum: bytes) -> None:
        """Depth first, children in name order: the first entry of an object seen is the one a
        hard-linked checkout's name order makes home (the directory frontend's rule)."""
        groups = self.groups
        names = self.names
        # Only the current directory's path is held: a chain of 100k dirtrees (100k small
        # objects) has paths adding up to 10 GB.
        prefix = b""
        stack = [(iter(self.entries(tree_sum, b"/")), root, 0)]
        while stack:
            items, node, _length = stack[-1]
            children = node.children
            assert children is not None
            for item in items:
                name = item[0]
                if len(item) == 2:
                    child = children[name] = Inode(S_IFREG)
                    checksum = item[1]
                    group = groups.get(checksum)
                    if group is None:
                        groups[checksum] = [child]
                    else:
                        group.append(child)
                    if names is not None:
                        names.setdefault(checksum, []).append((node, name))
                    continue
                path = prefix + b"/" + name
                child = children[name] = self.directory(item[2], path)
                self.dir_trees[id(child)] = item[1]
                stack.append((iter(self.entries(item[1], path)), child, len(path)))
                prefix = path
                break
            else:
                stack.pop()
                if stack:
                    prefix = prefix[:stack[-1][2]]

    def filtered(self, xattrs: tuple) -> tuple:
        options = self.options
        if options.skip_xattrs:
            return ()
        if options.user_xattrs:
            xattrs = tuple(kv for kv in xattrs if kv[0].startswith(b"user."))
        return self.xattr_cache.setdefault(xattrs, xattrs)

    def link(self) -> None:
        """`--hardlinks`: the entries of one object share its first entry's inode."""
        assert self.names is not None
        for checksum, group in self.groups.items():
            home = group[0]
            if len(group) < 2 or (home.mode & S_IFMT == S_IFREG and not home.size):
                continue
            for parent, name in self.names[checksum][1:]:
                parent.add_child(name, home, link=True)

    def locate(self, path: bytes) -> str | None:
        """The dirtree object listing `path` (for errors found by the passes)."""
        assert self.tree is not None
        parent = self.tree.lookup(path.rpartition(b"/")[0])
        checksum = self.dir_trees.get(id(parent)) if parent is not None else None
        return self.repo.found_path(checksum, ".dirtree") if checksum is not None else None

    # -- content objects, in the pool -------------------------------------------------------

    def read_contents(self) -> None:
        if not self.groups:
            return
        if self.options.digest_store:
            self.store = open_store(self.options)
        threads = max(1, self.options.threads)
        pool = ThreadPoolExecutor(threads, thread_name_prefix="cfsc-ostree")
        inflight: collections.deque[tuple[Future, int]] = collections.deque()
        items = list(self.groups.items())
        self.total = len(items)
        try:
            for start in range(0, len(items), BATCH):
                batch = items[start:start + BATCH]
                inflight.append((pool.submit(self.read_batch, batch), len(batch)))
                while inflight and (inflight[0][0].done() or len(inflight) > 2 * threads):
                    self.reap(inflight)
            while inflight:
                self.reap(inflight)
            if self.store is not None:
                loaded(self.store, self.options)
        except BaseException:
            self.failed = True
            pool.shutdown(wait=True, cancel_futures=True)
            if self.store is not None:
                self.store.close()
            raise
        pool.shutdown(wait=True)

    def reap(self, inflight: collections.deque) -> None:
        future, count = inflight.popleft()
        future.result()  # re-raises the worker's error
        self.done += count
        self.progress.update(self.status)

    def status(self) -> str:
        return f"read {self.done}/{self.total} objects, {mib(self.bytes_done)}"

    def read_batch(self, batch: list[tuple[bytes, list[Inode]]]) -> None:
        for checksum, nodes in batch:
            if self.failed:
                return
            try:
                self.read_object(checksum, nodes)
            except ObjectError as e:
                assert self.tree is not None
                what = f"{e.what} (file {shown_path(self.tree.path_of(nodes[0]))})"
                raise ObjectError(what, e.where) from None

    def read_object(self, checksum: bytes, nodes: list[Inode]) -> None:
        obj = self.repo.content(checksum)
        try:
            payload, content, digest = self.data(obj, checksum)
        finally:
            obj.close()
        mode, uid, gid, size = obj.mode, obj.uid, obj.gid, obj.size
        xattrs = self.filtered(obj.xattrs)
        self.bytes_done += size
        for node in nodes:
            node.mode = mode
            node.uid = uid
            node.gid = gid
            node.size = size
            node.payload = payload
            node.content = content
            node.digest = digest
            node.xattrs = xattrs

    def data(self, obj: Content, checksum: bytes) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(payload, inline content, fs-verity digest) of an object; checks it with `--verify`."""
        sha = checksum_header(obj) if self.verify else None
        size = obj.size
        payload = content = digest = None
        if stat.S_ISLNK(obj.mode):
            payload = obj.target
        elif size <= INLINE_MAX and not (self.compat and size):
            data = b"".join(obj.chunks())
            if sha is not None:
                sha.update(data)
            if size:
                content = data
                digest = digest_bytes(data, self.algorithm)
                payload = payload_path(digest)
        elif self.store is not None:
            store = self.store
            if obj.repo.mode == ARCHIVE:
                digest = store.import_chunks(_tee(obj.chunks(), sha))[0]
            elif sha is None and store.expects_new():
                digest = store.import_fd(obj.fd, None, obj.path)  # copy first, hash the copy
            else:
                digest = self.digest(obj, sha)
                store.import_fd(obj.fd, digest, obj.path)
            payload = payload_path(digest)
        else:
            digest = self.digest(obj, sha)
            h = checksum.hex()
            payload = f"{h[:2]}/{h[2:]}.file".encode()
        if sha is not None:
            got = sha.digest()
            if got != checksum:
                raise ObjectError(f"corrupt: its content checksum is {got.hex()}, not the checksum it is stored"
                                  " under", obj.path)
        return payload, content, digest

    def digest(self, obj: Content, sha) -> bytes:
        if sha is None and obj.fd >= 0 and obj.repo.mode != ARCHIVE:
            known = kernel_digest(obj.fd, self.algorithm)
            if known:  # None: no fs-verity on this file; False: none on its file system
                return known
        if obj.size <= WHOLE_MAX:
            data = b"".join(obj.chunks())
            if sha is not None:
                sha.update(data)
            return digest_bytes(data, self.algorithm)
        hasher = FsVerityHasher(self.algorithm)
        for chunk in _tee(obj.chunks(), sha):
            hasher.update(chunk)
        return hasher.digest()


def _name(item: tuple) -> bytes:
    return item[0]


def _tee(chunks, sha):
    if sha is None:
        yield from chunks
        return
    for chunk in chunks:
        sha.update(chunk)
        yield chunk
