"""SHA-512 fs-verity (composefs-rs' repository default) wherever digests appear: compile
`--hash sha512` (metacopy xattrs, store names, `--print-digest`), the dumpfile and CRFS
frontends' 128-hex digests, the reader and `dump`, `info`, `fsck-store`, `check`, and mounts
(FUSE verification, the kernel mount).  The references are the `fsverity` tool and the
kernel; SHA-256 stays the default and mkcomposefs' bytes (`test_default_stays_sha256_and_upstreams_bytes`)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from cfsc.backends.erofs.overlay import METACOPY, REDIRECT
from cfsc.backends.erofs.reader import Image
from cfsc.base.fsverity import SHA256, SHA512, digest_bytes, kernel_digest, payload_path
from cfsc.base.options import Options
from cfsc.frontends import dumpfile
from cfsc.store.objects import Store

from tests.helpers.checks import MKCOMPOSEFS, fsverity_tool
from tests.helpers.data import run_cfsc

FILES = {"big": os.urandom(300_000), "same": None, "sub/mid": os.urandom(5000), "sub/tiny": b"hi\n",
         "sub/empty": b"", "multi": os.urandom((64 * 64 + 3) * 4096)}  # a 3-level SHA-512 tree
FILES["same"] = FILES["big"]  # two names, one object


def make_source(tmp: Path) -> Path:
    src = tmp / "src"
    for name, data in FILES.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    for path in [src, *src.rglob("*")]:
        os.utime(path, (1700000000, 1700000000), follow_symlinks=False)
    return src


def compiled(tmp: Path, *extra: str) -> tuple[Path, Path, str]:
    """(image, store, printed digest) of the source compiled with --hash sha512."""
    image, store = tmp / "img.cfs", tmp / "store"
    p = run_cfsc("compile", str(make_source(tmp)), "-o", str(image), "--digest-store", str(store),
                 "--hash", "sha512", "--print-digest", *extra, check=True)
    return image, store, p.stdout.decode().strip()


def raw_xattrs(image: Image, path: bytes) -> dict[bytes, bytes]:
    ino = image.inode(image.root_nid)
    for name in path.split(b"/"):
        ino = image.inode(image.lookup(ino, name))
    return dict(image.xattrs(ino))


def objects(store: Path) -> dict[str, Path]:
    return {f"{p.parent.name}/{p.name}": p for p in store.glob("??/*")}


@pytest.mark.tools
def test_compile_sha512_names_objects_and_writes_metacopy_as_composefs_rs(tmp_path):
    image, store, printed = compiled(tmp_path)
    assert printed == fsverity_tool(image, "sha512")  # --print-digest follows --hash
    found = objects(store)
    assert len(found) == 3  # big (= same), sub/mid, multi; tiny is inline, empty has no data
    for name, path in found.items():
        assert len(name) == 2 + 1 + 126
        assert fsverity_tool(path, "sha512") == name.replace("/", "")
    img = Image(image.read_bytes(), "img.cfs")
    for name in ("big", "same", "sub/mid", "multi"):
        digest = digest_bytes(FILES[name], SHA512)
        xattrs = raw_xattrs(img, name.encode())
        # struct ovl_metacopy: version 0, length 68, flags 0, FS_VERITY_HASH_ALG_SHA512 (2), digest
        assert xattrs[METACOPY] == bytes((0, 68, 0, 2)) + digest, name
        assert xattrs[REDIRECT] == b"/" + payload_path(digest)
    dump = run_cfsc("dump", str(image), check=True).stdout
    line = next(x for x in dump.splitlines() if x.startswith(b"/sub/mid "))
    assert line.split()[10] == digest_bytes(FILES["sub/mid"], SHA512).hex().encode()  # 128 hex
    # The dump compiles back to the same image: the dumpfile frontend reads 128 hex as SHA-512.
    again = tmp_path / "again.cfs"
    run_cfsc("compile", "--from", "dump", "-", "-o", str(again), input=dump, check=True)
    assert again.read_bytes() == image.read_bytes()
    # … and so does its CRFS TOC (x-fsverity-digest "sha512:…").
    toc = run_cfsc("dump", str(image), "--format", "crfs", check=True).stdout
    assert b'"sha512:' + digest_bytes(FILES["sub/mid"], SHA512).hex().encode() + b'"' in toc
    run_cfsc("compile", "--from", "crfs", "-", "-o", str(again), input=toc, check=True)
    assert run_cfsc("dump", str(again), check=True).stdout == dump


@pytest.mark.tools
def test_default_stays_sha256_and_upstreams_bytes(tmp_path):
    src = make_source(tmp_path)
    a, b = tmp_path / "a.cfs", tmp_path / "b.cfs"
    run_cfsc("compile", str(src), "-o", str(a), "--digest-store", str(tmp_path / "s1"), check=True)
    run_cfsc("compile", str(src), "-o", str(b), "--digest-store", str(tmp_path / "s2"), "--hash", "sha256", check=True)
    assert a.read_bytes() == b.read_bytes()
    assert all(len(n) == 2 + 1 + 62 for n in objects(tmp_path / "s1"))
    if not os.access(MKCOMPOSEFS, os.X_OK):
        pytest.skip(f"no upstream mkcomposefs at {MKCOMPOSEFS} to compare bytes with")
    c = tmp_path / "c.cfs"
    subprocess.run([MKCOMPOSEFS, f"--digest-store={tmp_path / 's3'}", str(src), str(c)], check=True)
    assert a.read_bytes() == c.read_bytes()
    assert objects(tmp_path / "s1").keys() == objects(tmp_path / "s3").keys()


def test_dumpfile_128_hex_digits_are_sha512_others_keep_upstreams_rule():
    h = os.urandom(64).hex()
    line = "/ 4096 40755 2 0 0 0 0.0 - - -\n/f 10000 100644 1 0 0 0 0.0 ab/cd - %s\n"
    assert dumpfile.loads((line % h).encode(), Options()).lookup(b"f").digest == bytes.fromhex(h)
    for cut in (64, 100, 127):  # upstream reads the first 64 digits, ignores the rest
        got = dumpfile.loads((line % h[:cut]).encode(), Options()).lookup(b"f").digest
        assert got == bytes.fromhex(h[:64]), cut
    bad = run_cfsc("compile", "--from", "dump", "-", "-o", "/dev/null", input=(line % h[:63]).encode())
    assert bad.returncode == 2 and b"128 (SHA-512)" in bad.stderr


def test_store_and_info_and_check(tmp_path):
    data = os.urandom(70_000)
    with Store(tmp_path / "store", SHA512) as store:
        assert store.import_fd(_fd_of(tmp_path, data)) == digest_bytes(data, SHA512)
    assert list(objects(tmp_path / "store")) == [payload_path(digest_bytes(data, SHA512)).decode()]
    src = make_source(tmp_path)
    image = tmp_path / "i.cfs"
    run_cfsc("compile", str(src), "-o", str(image), "--hash", "sha512", check=True)
    facts = json.loads(run_cfsc("info", "--json", str(image), check=True).stdout)
    assert facts["files"]["digest_hashes"] == ["sha512"]
    assert facts["fsverity_digest"] == digest_bytes(image.read_bytes(), SHA256).hex()
    assert facts["fsverity_digest_sha512"] == digest_bytes(image.read_bytes(), SHA512).hex()
    want = digest_bytes(image.read_bytes(), SHA512).hex()
    p = run_cfsc("check", str(src), "--hash", "sha512", "--expect-digest", f"sha512:{want}")
    assert p.returncode == 0 and f"sha512:{want}" in p.stdout.decode(), p.stderr
    p = run_cfsc("check", str(src), "--expect-digest", f"sha256:{want}")
    assert p.returncode == 2 and b"--expect-digest" in p.stderr


def _fd_of(tmp: Path, data: bytes) -> int:
    path = tmp / "data"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def test_tar_layer_sha512(tmp_path):
    layer = tmp_path / "l.tar"
    data = os.urandom(9000)
    (tmp_path / "f").write_bytes(data)
    with tarfile.open(layer, "w") as t:
        t.add(tmp_path / "f", "f")
    run_cfsc("compile", str(layer), "-o", str(tmp_path / "i.cfs"), "--hash", "sha512",
             "--digest-store", str(tmp_path / "store"), check=True)
    name = payload_path(digest_bytes(data, SHA512)).decode()
    assert list(objects(tmp_path / "store")) == [name]
    assert (tmp_path / "store" / name).read_bytes() == data


def test_fsck_store_recomputes_sha512(tmp_path):
    image, store, _ = compiled(tmp_path)
    sha256_image = tmp_path / "old.cfs"
    run_cfsc("compile", str(tmp_path / "src"), "-o", str(sha256_image), "--digest-store", str(store), check=True)
    p = run_cfsc("fsck-store", str(image), str(sha256_image), "--store", str(store))
    assert p.returncode == 0, p.stdout + p.stderr
    obj = store / payload_path(digest_bytes(FILES["sub/mid"], SHA512)).decode()
    raw = bytearray(obj.read_bytes())
    raw[100] ^= 1
    obj.write_bytes(raw)
    p = run_cfsc("fsck-store", str(image), "--store", str(store))
    out = p.stdout.decode()
    assert p.returncode == 1 and digest_bytes(bytes(raw), SHA512).hex() in out and "img.cfs:/sub/mid" in out, out


# -- mounts ---------------------------------------------------------------------------------


def _read(path: Path):
    try:
        return path.read_bytes()
    except OSError as e:
        return errno.errorcode[e.errno]


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.tools
@pytest.mark.timeout(120)
def test_fuse_mount_verifies_sha512_and_a_tampered_object_is_eio(tmp_path):
    image, store, printed = compiled(tmp_path)
    mnt = tmp_path / "m"
    mnt.mkdir()
    obj = store / payload_path(digest_bytes(FILES["sub/mid"], SHA512)).decode()
    good = obj.read_bytes()
    for tampered in (False, True):
        if tampered:
            obj.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        log = tmp_path / f"{tampered}.log"
        run_cfsc("mount", str(image), str(mnt), "--store", str(store), "--verity", "require",
                 "--digest", printed, "--log", str(log), check=True)
        try:
            got = {name: _read(mnt / name) for name in FILES}
        finally:
            run_cfsc("umount", str(mnt), check=True)
        for name, data in FILES.items():
            assert got[name] == ("EIO" if tampered and name == "sub/mid" else data), name
        if tampered:
            text = log.read_text()
            assert obj.name in text and digest_bytes(FILES["sub/mid"], SHA512).hex() in text
    wrong = run_cfsc("mount", str(image), str(mnt), "--store", str(store), "--digest", "0" * 128)
    assert wrong.returncode != 0 and b"expected 0000" in wrong.stderr and not os.path.ismount(mnt)


@pytest.mark.root
@pytest.mark.kernel_mount
@pytest.mark.timeout(120)
def test_kernel_mount_of_a_sha512_image(tmp_path):
    """overlayfs takes the 68-byte metacopy; with --verity none it shows the tree and data.  A
    verity mount needs the objects' own (SHA-512) fs-verity: where the store's file system has
    none, cfsc refuses it up front (the kernel would fail every open)."""
    image, store, _ = compiled(tmp_path)
    mnt = tmp_path / "k"
    mnt.mkdir()
    run_cfsc("mount", "--kernel", str(image), str(mnt), "--store", str(store), "--verity", "none", check=True)
    try:
        assert {name: _read(mnt / name) for name in FILES} == FILES
    finally:
        run_cfsc("umount", str(mnt), check=True)
    obj = next(iter(objects(store).values()))
    fd = os.open(obj, os.O_RDONLY)
    try:
        has_verity = bool(kernel_digest(fd, SHA512))
    finally:
        os.close(fd)
    p = run_cfsc("mount", "--kernel", str(image), str(mnt), "--store", str(store), "--verity", "require")
    if has_verity:
        try:
            assert p.returncode == 0 and (mnt / "multi").read_bytes() == FILES["multi"]
        finally:
            run_cfsc("umount", str(mnt), check=True)
    else:
        assert p.returncode == 2 and b"no fs-verity" in p.stderr and not os.path.ismount(mnt)


@pytest.mark.tools
@pytest.mark.parametrize("mode", ["bare-user", "archive"])
def test_ostree_commit_sha512(tmp_path, mode):
    src = make_source(tmp_path)
    repo = tmp_path / "repo"
    subprocess.run(["ostree", "init", f"--repo={repo}", f"--mode={mode}"], check=True)
    subprocess.run(["ostree", "commit", f"--repo={repo}", "-b", "main", f"--tree=dir={src}", "--no-xattrs"],
                   check=True, capture_output=True)
    image, store = tmp_path / "o.cfs", tmp_path / "store"
    run_cfsc("compile", f"ostree:{repo}:main", "-o", str(image), "--hash", "sha512", "--digest-store", str(store),
             check=True)
    dump = {line.split()[0]: line.split() for line in run_cfsc("dump", str(image), check=True).stdout.splitlines()}
    for name in ("big", "sub/mid", "multi"):
        digest = digest_bytes(FILES[name], SHA512)
        assert dump[b"/" + name.encode()][10] == digest.hex().encode(), name
        assert (store / payload_path(digest).decode()).read_bytes() == FILES[name]
