"""The OSTree frontend against real repositories made by Debian's `ostree` CLI (2022.7).

One source tree (xattrs incl. security.selinux and trusted.*, setuid, owners, symlinks, empty,
inline-sized and large files, shared objects, odd names) is committed into a repository of
each mode and checked out with `ostree checkout` (as root: owners and xattrs restored).  Then:

* with `--digest-store`, the image of `ostree:REPO:main` is byte-identical to the directory
  frontend's image of the checkout with every mtime 0 (`--use-epoch`), same store;
* without a store the two dumps differ only in the payload column, which names the
  repository's objects (whose fs-verity digests are the digest column);
* the image mounts (FUSE; the kernel too) with `--store REPO/objects` and shows the checkout;
* `--ostree-compat` reproduces the images and digests ostree's own test suite pins
  (`tests/test-composefs.sh`: Debian's 2022.7 has no composefs support to compare with);
* missing, corrupt and malformed objects give one-line errors naming the object.

ostree commit refuses devices, FIFOs and sockets, so repositories never hold any: the tree
has none (a test pins the refusal); its only device-like entry is an overlay whiteout marker
file (`.ostree-wh.NAME`), which ostree 2022.7 and cfsc both keep as a plain file.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cfsc.base.errors import InputError, UsageError
from cfsc.base.fsverity import digest_file
from cfsc.base.options import Options
from cfsc.frontends.ostree import commit as ostree
from cfsc.frontends.ostree import gvariant
from cfsc.frontends.ostree.gvariant import GVariantError, Variant
from cfsc.frontends.ostree.repo import COMMIT, DIRMETA, DIRTREE, ObjectError, Repo, swap32
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.data import run_cfsc
from tests.helpers.dirtrees import Entry, make

pytestmark = [pytest.mark.tools, pytest.mark.fuse, pytest.mark.kernel_mount, pytest.mark.root]

MODES = ("bare", "bare-user", "bare-user-only", "archive")


def spec() -> list[Entry]:
    rnd = random.Random(9)
    selinux = b"system_u:object_r:bin_t:s0"
    return [
        Entry(b"", "dir", mode=0o755, xattrs={b"user.root": b"r", b"security.selinux": b"system_u:object_r:root_t:s0"}),
        Entry(b"empty", data=b""),
        Entry(b"empty2", data=b""),  # the same object as `empty`
        Entry(b"one", data=b"1"),
        Entry(b"s64", data=b"b" * 64),
        Entry(b"s65", data=b"c" * 65),
        Entry(b"dup65", data=b"c" * 65),  # the same object as `s65`
        Entry(b"s4096", data=bytes(range(256)) * 16),
        Entry(b"big", data=rnd.randbytes(3 * 1024 * 1024 + 17), xattrs={b"trusted.big": b"1"}),
        Entry(b"big.hl", link=b"big"),
        Entry(b"suid", data=b"#!/bin/sh\n", mode=0o4755, xattrs={b"security.selinux": selinux}),
        Entry(b"sgid", data=b"g" * 100, mode=0o2711, gid=50),
        Entry(b"noperm", data=b"secret", mode=0o000),
        Entry(b"owned", data=b"o" * 200, mode=0o640, uid=1000, gid=2000),
        Entry(b"xattrs", data=b"x" * 70, xattrs={
            b"user.a": b"1", b"user.bin": b"\x00\xff= \n", b"trusted.overlay.foo": b"bar",
            b"security.selinux": selinux, b"trusted.empty": b""}),
        Entry(b"sticky", "dir", mode=0o1777),
        Entry(b"emptydir", "dir", mode=0o755),
        Entry(b"a", "dir", mode=0o750, uid=7, gid=8, xattrs={b"user.dir": b"d"}),
        Entry(b"a/b", "dir", mode=0o700),
        Entry(b"a/b/c", "dir", mode=0o755, xattrs={b"trusted.overlay.opaque": b"y"}),
        Entry(b"a/b/c/deep", data=b"deep"),
        Entry(b"rel", "symlink", data=b"s64"),
        Entry(b"abs", "symlink", data=b"/etc/passwd"),
        Entry(b"dangling", "symlink", data=b"nowhere/x", uid=5, gid=6),
        Entry(b"a/up", "symlink", data=b"../big", xattrs={b"trusted.sym": b"v"}),
        Entry(b"longlink", "symlink", data=b"t" * 1000),
        Entry(b"L" * 255, data=b"long name"),
        Entry("café ☃".encode(), data=b"utf-8 name"),
        Entry(b"sp ace\nnl\\", data=b"odd name"),
        Entry(b".ostree-wh.gone", data=b""),
    ]


def ostree_cli(*args: str) -> None:
    subprocess.run(["ostree", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ostree") / "src"
    make(root, spec())
    return root


@pytest.fixture(scope="module")
def repos(src, tmp_path_factory):
    """mode -> (repository, checkout); made when first asked for."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(mode: str) -> tuple[Path, Path]:
        if mode not in made:
            base = tmp_path_factory.mktemp(mode)
            repo, checkout = base / "repo", base / "co"
            ostree_cli("init", f"--repo={repo}", f"--mode={mode}")
            ostree_cli("commit", f"--repo={repo}", "-b", "main", f"--tree=dir={src}", "-s", "test")
            ostree_cli("checkout", f"--repo={repo}", "main", str(checkout))
            if mode == "bare-user-only":
                # ostree checks bare-user-only repositories out in user mode, which adds u+r to
                # unreadable files (ostree-repo-checkout.c, override_user_unreadable): the commit
                # records mode 0 and so does the image.
                os.chmod(checkout / "noperm", 0)
            made[mode] = (repo, checkout)
        return made[mode]

    return get


def compile_(*args) -> bytes:
    p = run_cfsc("compile", *map(str, args), "-o", "-")
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout


def dump(image: bytes) -> list[list[bytes]]:
    p = run_cfsc("dump", "-", input=image)
    assert p.returncode == 0, p.stderr.decode()
    return [line.split(b" ") for line in p.stdout.splitlines()]


# -- the image is the checkout's image ------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_image_with_a_store_is_the_checkout_image(mode, repos, tmp_path):
    repo, checkout = repos(mode)
    store = tmp_path / "store"
    ours = compile_(f"ostree:{repo}:main", "--digest-store", store, "--verify")
    theirs = compile_(checkout, "--use-epoch", "--digest-store", store)
    assert ours == theirs
    lines = {line[0]: line for line in dump(ours)}
    assert lines[b"/big"][3] == b"1" and lines[b"/big.hl"][3] == b"1"  # one inode per entry
    assert lines[b"/s64"][9] != b"-" and lines[b"/s65"][9] == b"-"  # 1..64 bytes inline


@pytest.mark.parametrize("mode", ["bare", "bare-user", "bare-user-only"])
def test_payloads_name_the_repository_objects(mode, repos):
    repo, checkout = repos(mode)
    ours = dump(compile_(f"ostree:{repo}:main"))
    theirs = dump(compile_(checkout, "--use-epoch"))
    assert [line[:8] + line[9:] for line in ours] == [line[:8] + line[9:] for line in theirs]
    external = [line for line in ours if stat.S_ISREG(int(line[2], 8)) and line[9] == b"-" and line[1] != b"0"]
    assert len(external) == 8
    for line in external:
        obj = repo / "objects" / line[8].decode()
        assert line[8].endswith(b".file") and digest_file(obj).hex().encode() == line[10]


def test_archive_repositories_need_a_store(repos, tmp_path):
    repo, _ = repos("archive")
    p = run_cfsc("compile", f"ostree:{repo}:main", "-o", str(tmp_path / "x.cfs"))
    assert p.returncode == 2 and b"--digest-store" in p.stderr and len(p.stderr.splitlines()) == 1
    assert not (tmp_path / "x.cfs").exists()


def test_hardlinks_as_a_hardlinked_checkout(repos, tmp_path):
    repo, checkout = repos("bare")  # bare checkouts hard-link every object except empty files
    store = tmp_path / "store"
    ours = compile_(f"ostree:{repo}:main", "--hardlinks", "--digest-store", store)
    assert ours == compile_(checkout, "--use-epoch", "--hardlinks", "--digest-store", store)
    lines = {line[0]: line for line in dump(ours)}
    assert lines[b"/big"][3] == b"2" and lines[b"/big.hl"][2].startswith(b"@")
    assert lines[b"/dup65"][3] == b"2" and lines[b"/empty"][3] == b"1"


def view(root: Path) -> list[tuple]:
    """What a program sees at and below `root`: type and mode, owner, size, symlink target,
    xattrs, content."""
    out = []
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        names = [b""] if dirpath == base else []
        for name in names + dirnames + filenames:
            path = os.path.join(dirpath, name) if name else dirpath
            st_ = os.lstat(path)
            xattrs = sorted((k, os.getxattr(path, k, follow_symlinks=False))
                            for k in os.listxattr(path, follow_symlinks=False))
            extra = os.readlink(path) if stat.S_ISLNK(st_.st_mode) else None
            if stat.S_ISREG(st_.st_mode):
                with open(path, "rb") as f:
                    extra = hashlib.sha256(f.read()).hexdigest()
            out.append((os.path.relpath(path, base), oct(st_.st_mode), st_.st_uid, st_.st_gid,
                        st_.st_size if not stat.S_ISDIR(st_.st_mode) else 0, extra, xattrs))
    return sorted(out)


@pytest.mark.parametrize("mode,kernel", [(m, False) for m in MODES] + [("bare-user", True)])
def test_mounted_image_shows_the_checkout(mode, kernel, repos, tmp_path):
    repo, checkout = repos(mode)
    if mode == "archive":
        basedir = tmp_path / "store"
        image = compile_(f"ostree:{repo}:main", "--digest-store", basedir)
    else:
        basedir = repo / "objects"
        image = compile_(f"ostree:{repo}:main")
    (tmp_path / "image.cfs").write_bytes(image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    extra = ["--kernel", "--verity=none"] if kernel else []  # no fs-verity on this file system
    p = run_cfsc("mount", str(tmp_path / "image.cfs"), str(mnt), "--store", str(basedir), *extra)
    assert p.returncode == 0, p.stderr.decode()
    try:
        seen = view(mnt)
    finally:
        run_cfsc("umount", str(mnt), check=True)
    assert seen == view(checkout)
    assert len(seen) == len(spec())  # the hard link's two names are two entries; the root is one


def test_ostree_refuses_devices(tmp_path):
    repo, src = tmp_path / "repo", tmp_path / "src"
    src.mkdir()
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    ostree_cli("init", f"--repo={repo}", "--mode=bare")
    p = subprocess.run(["ostree", "commit", f"--repo={repo}", "-b", "main", f"--tree=dir={src}"], capture_output=True)
    assert p.returncode != 0 and b"Not a regular file or symlink" in p.stderr


# -- ostree's own composefs image -------------------------------------------------------------

# tests/test-composefs.sh in ostreedev/ostree pins these for the tree libtest.sh's
# setup_test_repository builds, committed with the arguments below: the sha256 of the image
# `ostree checkout --composefs` writes, its fs-verity digest (what --generate-composefs-metadata
# stores as ostree.composefs.digest.v0), and the sha256 of the `--composefs-noverity` image.
OSTREE_IMAGE_SHA256 = "031fab2c7f390b752a820146dc89f6880e5739cba7490f64024e0c7d11aad7c9"
OSTREE_DIGEST = "be956966c70970ea23b1a8043bca58cfb0d011d490a35a7817b36d04c0210954"
OSTREE_NOVERITY_SHA256 = "78f873a76ccfea3ad7c86312ba0e06f8e0bca54ab4912b23871b31caafe59c24"
COMPAT_COMMIT_ARGS = ("--owner-uid=0", "--owner-gid=0", "--no-xattrs", "--canonical-permissions")


@pytest.fixture(scope="module")
def libtest_repos(tmp_path_factory):
    base = tmp_path_factory.mktemp("libtest")
    files = base / "files"
    text = {"firstfile": "first", "baz/cow": "moo", "baz/cowro": "mooro", "baz/saucer": "alien",
            "baz/deeper/ohyeah": "hi", "baz/deeper/ohyeahx": "hix", "baz/another/y": "x",
            "baz/sub1/duplicate_a": "SAME_CONTENT", "baz/sub1/duplicate_b": "SAME_CONTENT",
            "baz/sub2/duplicate_c": "SAME_CONTENT"}
    for name, content in text.items():
        (files / name).parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        (files / name).write_text(content + "\n")
        os.chmod(files / name, {"baz/cowro": 0o600, "baz/deeper/ohyeahx": 0o755}.get(name, 0o644))
    os.chmod(files, 0o755)
    os.symlink("nosuchfile", files / "somelink")
    os.symlink("nonexistent", files / "baz/alink")
    out = {}
    for mode in ("bare-user", "archive"):
        repo = base / mode
        ostree_cli("init", f"--repo={repo}", f"--mode={mode}")
        ostree_cli("commit", f"--repo={repo}", *COMPAT_COMMIT_ARGS, "-b", "test-composefs", f"--tree=dir={files}")
        out[mode] = repo
    return out


def test_ostree_compat_is_the_image_ostree_writes(libtest_repos, tmp_path):
    images = set()
    for mode, repo in libtest_repos.items():
        out = tmp_path / f"{mode}.cfs"
        p = run_cfsc("compile", f"ostree:{repo}:test-composefs", "--ostree-compat", "--print-digest", "-o", str(out))
        assert p.returncode == 0, p.stderr.decode()
        assert p.stdout.decode().strip() == OSTREE_DIGEST
        images.add(out.read_bytes())
    (image,) = images  # archive repositories give the same image: payloads are bare object names
    assert hashlib.sha256(image).hexdigest() == OSTREE_IMAGE_SHA256
    lines = {line[0]: line for line in dump(image)}
    assert lines[b"/baz/cow"][8:] == [b"f6/a517d53831a40cff3886a965c70d57aa50797a8e5ea965b2c49cc575a6ff51.file", b"-",
                                      b"ebaa23af194a798df610e5fe2bd10725c9c4a3a56a6b62d4d0ee551d4fc4be27"]
    assert all(lines[b"/" + d][2] == b"40755" for d in (b"usr", b"etc", b"boot", b"var", b"sysroot"))


def test_ostree_compat_without_digests_is_the_noverity_image(libtest_repos):
    from cfsc.build import compile_tree

    options = Options(ostree_compat=True)
    tree = ostree.load(f"ostree:{libtest_repos['bare-user']}:test-composefs", options)
    for node in tree.home_inodes():
        node.digest = None  # `ostree checkout --composefs-noverity`
    assert hashlib.sha256(compile_tree(tree, options)).hexdigest() == OSTREE_NOVERITY_SHA256


def test_ostree_compat_conflicts(libtest_repos, tmp_path):
    source = f"ostree:{libtest_repos['bare-user']}:test-composefs"
    for extra in (["--digest-store", str(tmp_path / "s")], ["--hardlinks"]):
        p = run_cfsc("compile", source, "--ostree-compat", *extra, "-o", str(tmp_path / "x"))
        assert p.returncode == 2 and b"--ostree-compat" in p.stderr


# -- refs and sources -------------------------------------------------------------------------


def test_refs_remote_refs_parents_and_colons(repos, tmp_path):
    repo, _ = repos("bare-user-only")
    main = (repo / "refs/heads/main").read_text().strip()
    (repo / "refs/remotes/origin").mkdir(parents=True, exist_ok=True)
    (repo / "refs/remotes/origin/main").write_text(main + "\n")
    reference = compile_(f"ostree:{repo}:main")
    assert compile_(f"ostree:{repo}:{main}") == reference
    assert compile_(f"ostree:{repo}:origin:main") == reference
    assert compile_(f"ostree:{repo}:origin/main") == reference  # refs/remotes fallback, as ostree
    colon = tmp_path / "a:origin"
    colon.symlink_to(repo)
    assert compile_(f"ostree:{colon}:main") == reference  # ':' in the repository path
    (tmp_path / "a").symlink_to(repo)
    p = run_cfsc("compile", f"ostree:{tmp_path}/a:origin:main", "-o", str(tmp_path / "x"))
    assert p.returncode == 2 and b"ambiguous" in p.stderr
    p = run_cfsc("compile", f"ostree:{repo}:main^", "-o", str(tmp_path / "x"))
    assert p.returncode == 2 and b"has no parent" in p.stderr


def test_partial_checksums_as_ostree_rev_parse(src, tmp_path):
    repo = tmp_path / "repo"  # its own: the test adds refs and objects
    ostree_cli("init", f"--repo={repo}", "--mode=bare")
    ostree_cli("commit", f"--repo={repo}", "-b", "main", f"--tree=dir={src}", "-s", "test")
    ostree_cli("commit", f"--repo={repo}", "-b", "other", f"--tree=dir={src}", "-s", "another commit", "--parent=none",
               "--add-metadata-string=x=y")
    main = (repo / "refs/heads/main").read_text().strip()
    other = (repo / "refs/heads/other").read_text().strip()
    short = next(main[:n] for n in range(4, 64) if not other.startswith(main[:n]))
    oracle = subprocess.run(["ostree", "rev-parse", f"--repo={repo}", short], check=True, capture_output=True)
    assert oracle.stdout.decode().strip() == main
    assert compile_(f"ostree:{repo}:{short}") == compile_(f"ostree:{repo}:main")
    (repo / "refs/heads" / short).write_text(other + "\n")  # a branch named like it: the commit wins
    assert compile_(f"ostree:{repo}:{short}") == compile_(f"ostree:{repo}:main")
    # Two commit objects starting alike (names only: the prefix is looked up before any is read)
    for tail in ("0" * 61, "1" * 61):
        (repo / "objects" / "fe").mkdir(exist_ok=True)
        (repo / "objects" / "fe" / f"d{tail}.commit").write_bytes(b"")
    p = run_cfsc("compile", f"ostree:{repo}:fed", "-o", str(tmp_path / "x"))
    assert p.returncode == 2 and b"'fed' starts 2 commit checksums" in p.stderr and b"give more digits" in p.stderr
    oracle = subprocess.run(["ostree", "rev-parse", f"--repo={repo}", "fed"], capture_output=True)
    assert oracle.returncode != 0 and b"not unique" in oracle.stderr  # ostree agrees


def test_parent_commits_and_parent_repositories(repos, src, tmp_path):
    repo, _ = repos("bare")
    child = tmp_path / "child"
    ostree_cli("init", f"--repo={child}", "--mode=bare")
    with open(child / "config", "a") as f:
        f.write(f"parent={repo}\n")
    # (not a hex name like "c": ostree reads one as the start of a commit checksum first)
    ostree_cli("commit", f"--repo={child}", "-b", "kid", "--tree=ref=main", "-s", "same tree")
    small = tmp_path / "small"
    small.mkdir()
    (small / "f").write_bytes(b"new" * 100)
    ostree_cli("commit", f"--repo={child}", "-b", "kid", f"--tree=dir={small}", "-s", "a child")
    assert {p.suffix for p in (child / "objects").rglob("*.*")} == {".commit", ".dirtree", ".dirmeta", ".file"}
    assert compile_(f"ostree:{child}:kid^", "--verify") == compile_(f"ostree:{repo}:main")
    assert dump(compile_(f"ostree:{child}:kid"))[-1][0] == b"/f"


@pytest.mark.parametrize("source,expected", [
    ("ostree:REPO", "expected ostree:REPO:REF"),
    ("ostree:REPO:", "expected ostree:REPO:REF"),
    ("ostree:REPO:../x", "ref '../x'"),
    ("ostree:REPO:a//b", "ref 'a//b'"),
    ("ostree:REPO:.hidden", "ref '.hidden'"),
    ("ostree:REPO:origin:-x", "ref 'origin:-x'"),
])
def test_bad_sources(source, expected, repos):
    repo, _ = repos("bare")
    with pytest.raises(UsageError, match=expected):
        ostree.parse_source(source.replace("REPO", str(repo)))


def test_missing_repository_and_ref(repos, tmp_path):
    repo, _ = repos("bare")
    with pytest.raises(InputError, match="no config file"):
        ostree.load(f"ostree:{tmp_path}:main")
    with pytest.raises(InputError, match="no ref 'nope'"):
        ostree.load(f"ostree:{repo}:nope")


# -- broken repositories ------------------------------------------------------------------------


def broken_copy(repos, mode: str, tmp_path: Path) -> Path:
    repo, _ = repos(mode)
    copy = tmp_path / "repo"
    subprocess.run(["cp", "-a", str(repo), str(copy)], check=True)  # owners and xattrs too
    return copy


def object_of(repo: Path, data: bytes) -> Path:
    """The content object holding exactly `data` (bare modes)."""
    (found,) = [p for p in (repo / "objects").rglob("*.file") if not p.is_symlink()
                and p.stat().st_size == len(data) and p.read_bytes() == data]
    return found


def fail(source: str, *extra: str) -> str:
    p = run_cfsc("compile", source, *extra, "-o", "-")
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stderr
    return p.stderr.decode()


@pytest.mark.parametrize("mode", ["bare", "bare-user"])
def test_flipped_byte_in_a_content_object(mode, repos, tmp_path):
    repo = broken_copy(repos, mode, tmp_path)
    obj = object_of(repo, b"c" * 65)
    data = bytearray(obj.read_bytes())
    data[10] ^= 1
    os.chmod(obj, 0o644)
    obj.write_bytes(data)
    assert run_cfsc("compile", f"ostree:{repo}:main", "-o", "-").returncode == 0  # not checked without --verify
    err = fail(f"ostree:{repo}:main", "--verify")
    assert f"{obj}: corrupt: its content checksum is" in err and "(file /dup65)" in err


def test_flipped_byte_in_an_archive_object(repos, tmp_path):
    repo = broken_copy(repos, "archive", tmp_path)
    obj = max((repo / "objects").rglob("*.filez"), key=lambda p: p.stat().st_size)  # `big`
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x40
    obj.write_bytes(data)
    err = fail(f"ostree:{repo}:main", "--digest-store", str(tmp_path / "s"), "--verify")
    assert f"{obj}: " in err and ("corrupt" in err or "inflates" in err) and "(file /big)" in err


def test_truncated_dirtree(repos, tmp_path):
    repo = broken_copy(repos, "bare", tmp_path)
    r = Repo(str(repo))
    _files, dirs = r.metadata(r.commit(r.resolve("main", "main"))[0], ".dirtree", DIRTREE)
    obj = Path(r.found_path(next(tree for name, tree, _meta in dirs if name == b"a"), ".dirtree"))
    obj.write_bytes(obj.read_bytes()[:-5])
    err = fail(f"ostree:{repo}:main")
    assert f"{obj}: corrupt: its SHA-256 is" in err and "and malformed" in err and "(directory /a)" in err


def test_missing_objects(repos, tmp_path):
    repo = broken_copy(repos, "bare-user-only", tmp_path)
    obj = object_of(repo, b"deep")
    obj.unlink()
    err = fail(f"ostree:{repo}:main")
    assert f"{obj}: missing: not in the repository (file /a/b/c/deep)" in err
    commit = repo / "refs/heads/main"
    hexsum = commit.read_text().strip()
    (repo / "state" / f"{hexsum}.commitpartial").touch()
    assert "the commit is partial" in fail(f"ostree:{repo}:main")
    (repo / "state" / f"{hexsum}.commitpartial").unlink()
    (repo / "objects" / hexsum[:2] / f"{hexsum[2:]}.commit").unlink()
    assert f"missing: not in the repository (commit {hexsum}, main)" in fail(f"ostree:{repo}:main")


class Crafted:
    """A hand-made bare-user repository: objects written with our encoder under their own
    checksums, so that only the rule under test is broken."""

    def __init__(self, root: Path) -> None:
        self.root = root
        ostree_cli("init", f"--repo={root}", "--mode=bare-user")

    def put(self, data: bytes, ext: str) -> bytes:
        checksum = hashlib.sha256(data).digest()
        path = self.root / "objects" / checksum.hex()[:2] / (checksum.hex()[2:] + ext)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        return checksum

    def file(self, data: bytes, mode: int = 0o100644) -> bytes:
        """A content object (its checksum is not checked without --verify: any name does)."""
        checksum = hashlib.sha256(b"file" + data).digest()
        path = self.root / "objects" / checksum.hex()[:2] / (checksum.hex()[2:] + ".file")
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        os.setxattr(path, "user.ostreemeta", gvariant.encode(DIRMETA, (0, 0, swap32(mode), [])))
        return checksum

    def dirmeta(self, mode: int = 0o40755, xattrs=()) -> bytes:
        return self.put(gvariant.encode(DIRMETA, (0, 0, swap32(mode), list(xattrs))), ".dirmeta")

    def commit(self, dirtree: bytes, meta: bytes) -> str:
        tree = self.put(dirtree, ".dirtree")
        hexsum = self.put(gvariant.encode(COMMIT, ([], b"", [], b"s", b"", 0, tree, meta)), ".commit").hex()
        (self.root / "refs/heads/main").write_text(hexsum + "\n")
        return f"ostree:{self.root}:main"


def dirtree(files=(), dirs=()) -> bytes:
    return gvariant.encode(DIRTREE, (list(files), list(dirs)))


@pytest.mark.parametrize("case,expected", [
    ("good", None),
    ("framing", "malformed dirtree: byte 0x0: member files spans 0..5, outside the 3 bytes before the offset table"),
    ("dotdot", "files[0]: name '..': expected a file name"),
    ("slash", "dirs[0]: name 'a/b': expected a file name"),
    ("unsorted", "files[1]: 'a' after 'b': entries must be sorted"),
    ("both", "'x' is both a file and a directory"),
    ("short", "files[0] (f): checksum of 31 bytes, expected 32"),
    ("dirmode", "malformed dirmeta: mode 100644 is not a directory's (directory /)"),
    ("xattrdup", "xattr user.a is listed twice (directory /)"),
    ("nonul", "xattr 0: name b'user.a' is not a non-empty NUL-terminated string"),
    ("filemode", "mode 20644: expected a regular file or a symlink (file /f)"),
    ("symlinkfile", "bare-user symlink object: expected the target and one NUL (file /f)"),
])
def test_malformed_objects_with_good_checksums(case, expected, tmp_path):
    repo = Crafted(tmp_path / "repo")
    empty = repo.put(dirtree(), ".dirtree")
    meta = repo.dirmeta()
    mode = {"filemode": 0o20644, "symlinkfile": 0o120777}.get(case, 0o100644)
    file = repo.file(b"data", mode)
    trees = {
        "good": dirtree([(b"f", file)], [(b"d", empty, meta)]),
        "framing": b"\x00\x00\x6f\x05",  # the files array's one element "ends" past the array
        "dotdot": dirtree([(b"..", file)]),
        "slash": dirtree([], [(b"a/b", empty, meta)]),
        "unsorted": dirtree([(b"b", file), (b"a", file)]),
        "both": dirtree([(b"x", file)], [(b"x", empty, meta)]),
        "short": dirtree([(b"f", file[:31])]),
    }
    root_meta = {"dirmode": repo.dirmeta(0o100644),
                 "xattrdup": repo.dirmeta(xattrs=[(b"user.a\0", b"1"), (b"user.a\0", b"2")]),
                 "nonul": repo.dirmeta(xattrs=[(b"user.a", b"1")])}.get(case, meta)
    source = repo.commit(trees.get(case, trees["good"]), root_meta)
    if expected is None:
        tree = ostree.load(source)
        assert tree.lookup(b"/f").content == b"data" and tree.lookup(b"/d").is_dir()
        return
    with pytest.raises(ObjectError) as info:
        ostree.load(source)
    assert expected in str(info.value)
    assert str(info.value).startswith(str(repo.root / "objects")), str(info.value)


def test_shared_dirtrees_that_expand_exponentially_are_refused(tmp_path):
    """40 levels of two subdirectories naming the next level's one dirtree: 82 small objects
    standing for 2^40 directories (it ran until memory ran out).  Refused, located, once the
    expansion passes its bound; nothing written."""
    repo = Crafted(tmp_path / "repo")
    meta = repo.dirmeta()
    level = repo.put(dirtree([(b"f", repo.file(b"data"))]), ".dirtree")
    for _ in range(40):
        level = repo.put(dirtree([], [(b"a", level, meta), (b"b", level, meta)]), ".dirtree")
    source = repo.commit(dirtree([], [(b"top", level, meta)]), meta)
    out = tmp_path / "out" / "bomb.cfs"
    out.parent.mkdir()
    p = run_cfsc("compile", source, "-o", str(out))
    assert p.returncode == 2, p.stderr
    message = p.stderr.decode()
    assert message.count("\n") == 1 and message.startswith(f"error: {repo.root / 'objects'}"), message
    assert ".dirtree: the commit's directories expand to more than 1048575 entries from 82 distinct ones" in message
    assert list(out.parent.iterdir()) == []


def test_shared_dirtrees_are_read_once_more_and_kept(tmp_path, monkeypatch):
    """Identical subtrees (one dirtree named by many directories) within the bound: the tree
    has every copy, and each dirtree object is read at most twice (checked once more when
    named again, then kept), not once per directory that names it."""
    reads: dict[bytes, int] = {}
    real_entries = ostree._Loader._entries

    def counting(self, tree_sum, path):
        reads[tree_sum] = reads.get(tree_sum, 0) + 1
        return real_entries(self, tree_sum, path)

    monkeypatch.setattr(ostree._Loader, "_entries", counting)
    repo = Crafted(tmp_path / "repo")
    meta = repo.dirmeta()
    level = repo.put(dirtree([(b"f", repo.file(b"data"))]), ".dirtree")
    for _ in range(9):
        level = repo.put(dirtree([], [(b"a", level, meta), (b"b", level, meta)]), ".dirtree")
    tree = ostree.load(repo.commit(dirtree([], [(b"a", level, meta), (b"b", level, meta)]), meta))
    assert sum(1 for _ in tree.walk()) == 2 ** 11 - 1 + 2 ** 10
    assert tree.lookup(b"/a/b/a/b/a/b/a/b/a/b/f").content == b"data"
    assert len(reads) == 11 and max(reads.values()) == 2


# -- the GVariant codec ---------------------------------------------------------------------------


def test_gvariant_round_trips_every_object_ostree_wrote(repos):
    types = {".commit": COMMIT, ".dirtree": DIRTREE, ".dirmeta": DIRMETA}
    count = 0
    for mode in MODES:
        repo, _ = repos(mode)
        for path in (repo / "objects").rglob("*"):
            if path.suffix in types:
                data = path.read_bytes()
                assert gvariant.encode(types[path.suffix], gvariant.decode(types[path.suffix], data)) == data
                count += 1
    assert count > 40


values = st.recursive(
    st.one_of(st.integers(0, 2**32 - 1).map(lambda v: Variant("u", v)), st.binary().map(lambda v: Variant("ay", v)),
              st.text().map(lambda v: Variant("s", v.replace("\0", "").encode())),
              st.booleans().map(lambda v: Variant("b", v)), st.integers(-2**63, 2**63 - 1).map(lambda v: Variant("x", v))),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda vs: Variant("(" + "".join(v.type for v in vs) + ")", tuple(v.value for v in vs))),
        inner.map(lambda v: Variant("a" + v.type, [v.value] * 3)),
        inner.map(lambda v: Variant("m" + v.type, v.value)),
        inner.map(lambda v: Variant("v", v)),
        st.lists(st.tuples(st.text(max_size=300).map(lambda k: k.replace("\0", "").encode()), inner), max_size=3).map(
            lambda kvs: Variant("a{sv}", list(kvs)))),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(values)
def test_gvariant_round_trip(v):
    data = gvariant.encode(v.type, v.value)
    assert gvariant.decode(v.type, data) == v.value
    assert gvariant.encode(v.type, gvariant.decode(v.type, data)) == data
    big = gvariant.encode("(ayv)", (bytes(70000), v))  # 4-byte framing offsets
    assert gvariant.decode("(ayv)", big) == (bytes(70000), v)


TWO_FILES = gvariant.encode("a(say)", [(b"ab", bytes(32)), (b"c", bytes(32))])


@pytest.mark.parametrize("type_,data,expected", [
    ("s", b"abc", "string without its terminating NUL"),
    ("s", b"a\0c\0", "NUL inside a string"),
    ("s", b"\xff\0", "not UTF-8"),
    ("b", b"\x02", "boolean byte 2"),
    ("u", b"\1\2\3", "3 bytes for a 'u'"),
    ("au", b"\1\2\3\4\5", "not a whole number of 4-byte elements"),
    ("(yu)", b"\1\1\0\0\2\0\0\0", "non-zero padding"),
    ("(yy)", b"\1", "1 bytes for a fixed-size (yy): expected 2"),
    ("(sy)", b"a\0\1\x09", "member [0] spans 0..9"),
    ("(sy)", b"a\0\1\0\2", "1 stray bytes after the last member"),
    ("as", b"a\0b\0\4\2", "array element 0 ends at 98, outside 0..2"),
    ("as", b"a\0b\0\2\7", "array offset table: last element ends at 7 of 6 bytes"),
    ("as", b"a\0b\0\2\4", None),
    ("ms", b"a\0\1", "followed by one zero byte"),
    ("v", b"\1\0(u", "not one complete type"),
    ("v", b"\1\0a: u", "not one complete type"),
    ("o", b"/a//b\0", "not a D-Bus object path"),
    ("g", b"a{\0", "not a D-Bus type signature"),
    ("()", b"\1", "the unit value () is one zero byte"),
    ("(a(say))", b"\0\0\x6f\x05", "[0] at byte 0x3: array offset table"),
    ("a(say)", TWO_FILES, None),
    # a tuple whose offset table has no room (0 bytes) is not `00`, the normal form of ([], [])
    ("(a(say)a(sayay))", b"", "0 bytes cannot hold the offset table"),
    ("(a(say)a(sayay))", b"\0", None),
    ("a(ayay)", b"\0", "[0] at byte 0x0: 0 bytes cannot hold the offset table"),
    ("a(say)", TWO_FILES.replace(b"c\0", b"\xff\0"), "[1][0] at byte 0x24: string is not UTF-8"),
])
def test_gvariant_strictness(type_, data, expected):
    if expected is None:  # the well-formed twin of a broken case
        assert gvariant.encode(type_, gvariant.decode(type_, data)) == data
        return
    with pytest.raises(GVariantError) as info:
        gvariant.decode(type_, data)
    assert expected in str(info.value)


def test_gvariant_nesting_is_capped():
    data = b"\1\0" + b"v" * 100  # not real nesting, but a type string cannot hold it either
    with pytest.raises(GVariantError):
        gvariant.decode("v", data)
    deep = Variant("u", 1)
    for _ in range(70):
        deep = Variant("v", deep)
    with pytest.raises(GVariantError, match="nested too deeply"):
        gvariant.decode("v", gvariant.encode("v", deep))


def test_gvariant_nesting_counts_every_container():
    """Arrays count as well as variants and tuples: 40 variants each at the bottom of 60
    arrays (a type string allows 64) once made the decoder recurse past Python's limit."""
    deep = Variant("u", 1)
    for _ in range(40):
        value = [deep]
        for _ in range(59):
            value = [value]
        deep = Variant("a" * 60 + "v", value)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # only the encoder, building the input, needs it
    try:
        data = gvariant.encode("v", deep)
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(GVariantError, match="nested too deeply"):
        gvariant.decode("v", data)


def test_errors_found_by_passes_name_the_dirtree(tmp_path):
    repo = Crafted(tmp_path / "repo")
    source = repo.commit(dirtree([(b"n" * 300, repo.file(b"data"))]), repo.dirmeta())
    err = fail(source)
    (tree,) = (repo.root / "objects").rglob("*.dirtree")
    assert err.startswith(f"error: {tree}:/{'n' * 300}: ") and "255" in err
