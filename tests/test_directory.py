"""The directory frontend: real trees on disk against the dumpfile that describes them.

Each test builds a tree with known content and metadata (`dirtrees`), compiles it with
`cfsc compile DIR` and compiles the dumpfile written from the same spec: the two images must
be byte-identical (the dumpfile frontend is itself byte-identical with mkcomposefs), and the
two trees must agree entry by entry.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from cfsc.base import limits
from cfsc.base.errors import InputError, TreeError, UsageError
from cfsc.base.options import Options
from cfsc.base.tree import S_IFDIR, S_IFREG, Inode, Tree
from cfsc.frontends import directory, directory_workers
from cfsc.frontends import dumpfile as dumpfile_frontend
from cfsc.passes.validate_limits import validate_limits
from cfsc.store.locks import LOCK_NAME
from cfsc.store.objects import Store

from tests.helpers.data import image_of
from tests.helpers.dirtrees import Entry, describe, dumpfile, full_spec, make

pytestmark = [pytest.mark.root]




@pytest.fixture(scope="module")
def full_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("dir") / "src"
    spec = full_spec()
    make(root, spec)
    return root, spec


OPTION_SETS = [
    ([], {}),
    (["--hardlinks"], {"hardlinks": True}),
    (["--use-epoch"], {"use_epoch": True}),
    (["--skip-devices"], {"skip_devices": True}),
    (["--skip-xattrs"], {"skip_xattrs": True}),
    (["--user-xattrs"], {"user_xattrs": True}),
    (["--threads", "1", "--max-version", "0"], {}),
]


@pytest.mark.parametrize("args,flags", OPTION_SETS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_image_equals_the_dumpfiles(full_tree, tmp_path, cfsc, args, flags):
    root, spec = full_tree
    dump = dumpfile(spec, **flags)
    out = tmp_path / "dir.cfs"
    cfsc("compile", str(root), "-o", str(out), *args, check=True)
    max_version = 0 if "--max-version" in args else 1
    assert out.read_bytes() == image_of(dump, max_version=max_version)


@pytest.mark.parametrize("flags", [f for _a, f in OPTION_SETS[:6]], ids=lambda f: ",".join(f) or "default")
def test_tree_equals_the_dumpfiles_tree(full_tree, flags):
    root, spec = full_tree
    got = describe(directory.load(str(root), Options(**flags)))
    want = describe(dumpfile_frontend.loads(dumpfile(spec, **flags), Options()))
    assert got == want


def test_mkcomposefs_dropin_takes_every_option(full_tree, tmp_path, cfsc):
    root, spec = full_tree
    out = tmp_path / "x.cfs"
    store = tmp_path / "store"
    p = cfsc("mkcomposefs", "--use-epoch", "--skip-devices", "--user-xattrs", "--threads=2",
             f"--digest-store={store}", "--min-version=0", "--max-version=1", "--print-digest",
             str(root), str(out), check=True)
    dump = dumpfile(spec, use_epoch=True, skip_devices=True, user_xattrs=True)
    assert out.read_bytes() == image_of(dump)
    assert len(p.stdout.split()) == 1 and len(p.stdout.strip()) == 64
    assert any(store.iterdir())
    p = cfsc("mkcomposefs", "--skip-xattrs", "--print-digest-only", str(root), check=True)
    assert len(p.stdout.strip()) == 64
    p = cfsc("mkcomposefs", "--skip-xattrs", "--user-xattrs", str(root), str(out))
    assert p.returncode == 2 and p.stderr.count(b"\n") == 1 and b"conflict" in p.stderr


def test_symlinks_are_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not part of the tree")
    make(tmp_path / "src", [Entry(b"", "dir"), Entry(b"out", "symlink", data=os.fsencode(outside)),
                            Entry(b"d", "dir")])
    tree = directory.load(str(tmp_path / "src"), Options())
    node = tree.lookup(b"out")
    assert node.mode & 0o170000 == 0o120000 and node.payload == os.fsencode(outside)
    # The root itself may not be a symlink either (mkcomposefs: "Not a directory").
    (tmp_path / "link").symlink_to(tmp_path / "src")
    with pytest.raises(InputError, match="not a directory"):
        directory.load(str(tmp_path / "link"), Options())


def test_deeper_than_the_recursion_limit(tmp_path):
    depth = 1200
    fd = os.open(tmp_path, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        new = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = new
    os.close(fd)
    try:
        tree = directory.load(str(tmp_path), Options())
        assert tree.lookup(b"/".join([b"d"] * depth)) is not None
    finally:  # pytest's own clean-up (shutil.rmtree) recurses, and would fail on this tree
        subprocess.run(["rm", "-rf", str(tmp_path / "d")], check=True)


def test_bad_sources(tmp_path, cfsc):
    (tmp_path / "file").write_bytes(b"x")
    p = cfsc("compile", "--from", "dir", str(tmp_path / "file"), "-o", str(tmp_path / "o.cfs"))
    assert p.returncode == 2 and b"not a directory" in p.stderr and p.stderr.count(b"\n") == 1
    p = cfsc("compile", str(tmp_path / "missing"), "-o", str(tmp_path / "o.cfs"))
    assert p.returncode == 2 and p.stderr.count(b"\n") == 1
    with pytest.raises(UsageError):
        directory.load(str(tmp_path), Options(skip_xattrs=True, user_xattrs=True))
    assert sorted(os.listdir(tmp_path)) == ["file"]


# -- a tree that changes while it is scanned: a located error, never a wrong image ----------


@pytest.fixture(params=["threads", "processes"])
def hashing(request, monkeypatch):
    """Where regular files are read and hashed: the thread pool (the reference) or the forked
    worker processes.  (Hooks a test sets before the load are inherited by the workers.)"""
    monkeypatch.setattr(directory, "WORKERS", request.param)
    return request.param


@pytest.fixture
def small_tree(tmp_path):
    root = tmp_path / "src"
    make(root, [Entry(b"", "dir"), Entry(b"d", "dir"), Entry(b"d/f", data=b"x" * 5000),
                Entry(b"g", data=b"y" * 100), Entry(b"big", data=b"z" * (2 << 20))])
    return root


def _patch_listing(monkeypatch, listed_dir: str, action):
    """Run `action` right after the scanner listed `listed_dir` (between readdir and stat)."""
    real = os.scandir

    def scandir(fd):
        entries = list(real(fd))
        if os.readlink(f"/proc/self/fd/{fd}").endswith(listed_dir):
            action()
        return iter(entries)

    monkeypatch.setattr(directory.os, "scandir", scandir)


def test_file_vanishing_after_readdir(small_tree, monkeypatch, hashing):
    _patch_listing(monkeypatch, "/src/d", lambda: os.unlink(small_tree / "d" / "f"))
    with pytest.raises(InputError, match="vanished during the scan") as e:
        directory.load(str(small_tree), Options())
    assert e.value.where == f"{small_tree}/d/f"


@pytest.mark.parametrize("victim", ["d", "g"])
def test_entry_swapped_for_a_symlink(small_tree, tmp_path, monkeypatch, victim, hashing):
    """Between readdir/lstat and open: the open must not follow the new symlink."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "f").write_bytes(b"outside")
    real = os.open

    def swapping_open(path, flags, *args, dir_fd=None, **kw):
        if path == victim.encode() and dir_fd is not None and not (small_tree / victim).is_symlink():
            os.rename(small_tree / victim, tmp_path / "moved")
            os.symlink(elsewhere, small_tree / victim)
        return real(path, flags, *args, dir_fd=dir_fd, **kw)

    monkeypatch.setattr(directory.os, "open", swapping_open)
    with pytest.raises(InputError, match="replaced by a symlink") as e:
        directory.load(str(small_tree), Options())
    assert e.value.where == f"{small_tree}/{victim}"


@pytest.mark.parametrize("victim,hook,whole_read", [("g", "digest_bytes", None), ("big", "digest_bytes", None),
                                                     ("big", "hash_fd", 1 << 20)])
def test_file_modified_while_it_is_read(small_tree, monkeypatch, victim, hook, whole_read, hashing):
    """Read whole into the reader's buffer, or (bigger than it) streamed in chunks."""
    if whole_read:
        monkeypatch.setattr(directory, "WHOLE_READ", whole_read)
    real = getattr(directory_workers, hook)

    def hooked(*args, **kwargs):
        result = real(*args, **kwargs)
        with open(small_tree / victim, "ab") as f:
            f.write(b"more")
        return result

    monkeypatch.setattr(directory_workers, hook, hooked)
    with pytest.raises(InputError, match="modified during the scan") as e:
        directory.load(str(small_tree), Options(threads=1))
    assert e.value.where == f"{small_tree}/{victim}"


@pytest.mark.parametrize("change", ["grows", "shrinks"])
@pytest.mark.parametrize("victim", ["g", "big"])
def test_file_changing_size_just_before_it_is_read(small_tree, monkeypatch, victim, change, hashing):
    """Between the `fstat` that sizes the read and the read itself (the one read path,
    `FileReader`, on both routes): a file that grew or shrank there is named, never hashed
    as it was or as it is."""
    real = directory_workers.fill
    path = small_tree / victim

    def changing_fill(fd, buf, offset=None):
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            if change == "grows":
                with open(path, "ab") as f:
                    f.write(b"more")
            else:
                os.truncate(path, os.stat(path).st_size - 7)
        return real(fd, buf, offset)

    monkeypatch.setattr(directory_workers, "fill", changing_fill)
    with pytest.raises(InputError) as e:
        directory.load(str(small_tree), Options(threads=1))
    assert e.value.where == f"{small_tree}/{victim}"
    # Grown: the read takes the size the `fstat` said, the `fstat` after the read sees more.
    how = "modified" if change == "grows" else "modified (its size changed)"
    assert e.value.what == f"{how} during the scan: the tree must not change while it is compiled"


def test_a_file_shorter_than_its_size_is_refused(tmp_path, hashing):
    """A real file whose reads end before its stated size (a sysfs attribute, bind-mounted into
    the tree: size 4096, a few bytes of text) is refused the same way on both routes."""
    attribute = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not os.path.exists(attribute) or os.stat(attribute).st_size <= len(open(attribute, "rb").read()):
        pytest.skip(f"needs a sysfs attribute whose size exceeds its content ({attribute})")
    root = tmp_path / "src"
    root.mkdir()
    (root / "attr").write_bytes(b"")
    subprocess.run(["mount", "--bind", attribute, str(root / "attr")], check=True)
    try:
        with pytest.raises(InputError, match="modified \\(its size changed\\) during the scan") as e:
            directory.load(str(root), Options())
        assert e.value.where == f"{root}/attr"
    finally:
        subprocess.run(["umount", str(root / "attr")], check=True)


def test_file_modified_between_hashing_and_copying(small_tree, tmp_path, monkeypatch, hashing):
    """Same size, mtime put back: only the store's check of the copy against the digest can
    see it.  (Copying first and hashing the copy, the store's other mode, has no window here;
    nor has a file read whole into memory, whose buffer is both hashed and copied.)"""
    monkeypatch.setattr(directory, "WHOLE_READ", 1 << 20)  # "big" (2 MiB) is streamed
    real, real_stage = Store.import_fd, Store.stage_fd

    def modify_big():
        path = small_tree / "big"
        st = os.stat(path)
        with open(path, "r+b") as f:
            f.write(b"Z")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    def import_fd(self, fd, digest=None, where=""):
        if where.endswith("/big"):
            modify_big()
        return real(self, fd, digest, where)

    def stage_fd(self, fd, digest, where, wanted=None):  # the workers' copy (`where` is the file's name)
        if where == "big":
            modify_big()
        return real_stage(self, fd, digest, where, wanted)

    monkeypatch.setattr(Store, "import_fd", import_fd)
    monkeypatch.setattr(Store, "stage_fd", stage_fd)
    monkeypatch.setattr(Store, "expects_new", lambda self: False)  # hash first, then copy
    store = tmp_path / "store"
    with pytest.raises(InputError, match="changed while being copied into the store"):
        directory.load(str(small_tree), Options(digest_store=str(store), threads=1))
    assert [p.name for p in store.rglob("*")] == [LOCK_NAME]  # nothing published, no temp file left


# -- the limits a directory can break: enforced while it is read, as the validation pass would ----


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs: xattr values up to 65536 bytes and files of any (sparse) size, which ext4 refuses."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "cfsc-test", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def _pass_error(source: str, name: bytes, node: Inode) -> str:
    """What the validation pass (the reference) says of a tree whose root holds `node` as `name`."""
    root = Inode(S_IFDIR | 0o755)
    root.add_child(name, node)
    with pytest.raises(TreeError) as e:
        validate_limits(Tree(root, source), Options())
    return str(e.value)


@pytest.mark.parametrize("kind,case", [("file", "value"), ("file", "budget"), ("file", "size"),
                                       ("dir", "value"), ("dir", "budget")])
def test_limits_are_enforced_while_reading_as_the_pass_would(tmpfs, case, kind, hashing):
    """A file (read by a `FileReader`) or a directory (by the scan) over an xattr limit, or a
    file bigger than composefs allows (sparse: refused before a byte is read): the error the
    validation pass gives for the same tree, which then need not walk it again (`checked`).
    (Names over 255 bytes and symlink targets of 4096 are checked too; no local file system
    here can make them.)"""
    src = tmpfs / "src"
    src.mkdir()
    target = src / "x"
    node = Inode((S_IFREG | 0o644) if kind == "file" else (S_IFDIR | 0o755))
    if kind == "file":
        target.write_bytes(b"")
    else:
        target.mkdir()
    if case == "value":
        os.setxattr(target, "trusted.big", b"v" * 65536)
        node.xattrs = ((b"trusted.big", b"v" * 65536),)
    elif case == "budget":
        for i in range(3):
            os.setxattr(target, f"trusted.x{i}", b"%d" % i * 12000)
        node.xattrs = tuple((b"trusted.x%d" % i, b"%d" % i * 12000) for i in range(3))
    else:
        os.truncate(target, limits.MAX_EXTERNAL_SIZE + 1)
        node.size = limits.MAX_EXTERNAL_SIZE + 1
    with pytest.raises(TreeError) as e:
        directory.load(str(src), Options())
    assert str(e.value) == _pass_error(str(src), b"x", node)
    assert e.value.raw_path == b"/x"


def test_a_directory_tree_comes_checked(small_tree):
    assert directory.load(str(small_tree), Options()).checked


def test_an_unreadable_empty_file_whose_name_is_not_utf8_compiles_without_proc():
    """Without /proc (a tmpfs over it, in a mount namespace) an unreadable empty file's
    xattrs are read by its path under the source: that path is built from the name's bytes
    (it was built from the message spelling, `\\xff` escaped, and so named no file)."""
    import sys

    from tests.helpers.nobody import AS_NOBODY, nobody_dir

    with nobody_dir("cfsc-noproc-") as base:
        src = base / "src"
        src.mkdir()
        name = os.path.join(os.fsencode(src), b"\xff")
        open(name, "wb").close()
        os.chmod(name, 0)
        src.chmod(0o755)
        out = base / "out.cfs"
        script = f"import sys; sys.argv = ['cfsc', 'compile', {str(src)!r}, '-o', {str(out)!r}]; " \
                 "from cfsc.cli import main; sys.exit(main())"
        inner = " ".join([*AS_NOBODY, sys.executable, "-c", f'"{script}"'])
        p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs none /proc && {inner}"], capture_output=True)
        assert p.returncode == 0, p.stderr
        assert p.stderr == b""
        dump = subprocess.run([sys.executable, "-m", "cfsc", "dump", str(out)], capture_output=True, check=True)
        assert b"\n/\\xff 0 100000 1 " in dump.stdout
