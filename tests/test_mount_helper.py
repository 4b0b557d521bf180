"""`mount.composefs` (the mount(8) helper) and the upper/work, idmap and several-store mounts.

`mount -t composefs` runs `/sbin/mount.composefs`; nothing may be installed there for a
test, so each such test runs mount(8) in a private mount namespace (`unshare -m`) whose
/sbin (here /usr/sbin) is a temporary directory holding only the helper — the bind and the
mount die with the namespace, whatever happens, and parallel tests never see each other's.
What must be looked at under the mount is walked inside that namespace and handed back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cfsc.base.errors import UsageError
from cfsc.fuse.attach import MountError, unmount
from cfsc.mount_helper import EXIT_FAILED, EXIT_USAGE, parse, split_options

from tests.helpers.data import run_cfsc
from tests.helpers.procs import cmdline, exits, pids
from tests.helpers.fuse import walk

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parent.parent
HELPER = Path(sys.executable).with_name("mount.composefs")
SBIN = os.path.realpath("/sbin")
UPSTREAM = Path("/tmp/cfs-src/build/tools/mount.composefs")


def real_mount(test):
    """A test that makes kernel mounts (root; the parsing tests below need neither)."""
    test = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")(test)
    return pytest.mark.root(pytest.mark.kernel_mount(test))


# Walks a mount (argv[1]) as tests/test_fuse.py does and pickles it to argv[2].
WALK = "import pickle, sys; from tests.helpers.fuse import walk; open(sys.argv[2], 'wb').write(pickle.dumps(walk(sys.argv[1])))"


@pytest.fixture
def stores(tmp_path):
    """An image compiled into one store `all`, and the same objects split between `s1`, `s2`."""
    src = tmp_path / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    rng = random.Random(7)
    for i in range(12):
        (src / ("sub" if i % 3 else "sub/deep") / f"f{i}").write_bytes(rng.randbytes(100 + 5000 * i))
    (src / "small").write_bytes(b"inline\n")
    (src / "link").symlink_to("sub/f1")
    os.chmod(src / "sub" / "f2", 0o4711)
    os.setxattr(src / "sub" / "f4", "user.note", b"kept")
    image = tmp_path / "img.cfs"
    run_cfsc("compile", str(src), "-o", str(image), "--digest-store", str(tmp_path / "all"), check=True)
    objects = sorted(p.relative_to(tmp_path / "all") for p in (tmp_path / "all").rglob("*") if p.is_file())
    assert len(objects) >= 10
    for i, rel in enumerate(objects):
        dest = tmp_path / ("s1", "s2")[i % 2] / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tmp_path / "all" / rel, dest)
    for d in ("m", "k"):
        (tmp_path / d).mkdir()
    return tmp_path, image, src


def mount8(tmp: Path, *args: str, then: str = "") -> subprocess.CompletedProcess:
    """`mount ARGS` (mount(8), finding our helper as /sbin/mount.composefs) in a private mount
    namespace; `then` (shell) runs there after a successful mount."""
    sbin = tmp / "sbin"
    if not sbin.is_dir():
        sbin.mkdir()
        shutil.copy2(HELPER, sbin / "mount.composefs")
    script = 'mount --bind "$0" "$1" && shift && mount "$@" && { ' + (then or ":") + "; }"
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(sbin), SBIN, *args],
                          capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=tmp)


def walked_by_mount8(tmp: Path, image: Path, mnt: Path, options: str) -> list:
    out = tmp / "walk.pickle"
    p = mount8(tmp, "-t", "composefs", "-o", options, str(image), str(mnt),
               then=f'"{sys.executable}" -c "{WALK}" {mnt} {out}')
    assert p.returncode == 0, p.stderr
    return pickle.loads(out.read_bytes())


@contextlib.contextmanager
def mounted(*args: str):
    p = run_cfsc("mount", *args)
    assert p.returncode == 0, p.stderr
    try:
        yield
    finally:
        with contextlib.suppress(MountError):
            unmount(args[1])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(*dirs: Path) -> dict:
    """Every file below `dirs` with its bytes' hash: to show a mount changed nothing there."""
    return {str(p): sha(p) for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


# -- the helper through mount(8) ------------------------------------------------------------


@real_mount
def test_mount_t_composefs_two_stores_shows_what_the_kernel_mount_of_one_store_shows(stores):
    tmp, image, _src = stores
    assert listing(tmp / "s1").keys().isdisjoint(listing(tmp / "s2").keys())  # each store lacks some objects
    with mounted(str(image), str(tmp / "k"), "--kernel", "--verity", "none", "--store", str(tmp / "all")):
        want = walk(tmp / "k")
    got = walked_by_mount8(tmp, image, tmp / "m", f"basedir={tmp / 's1'}:{tmp / 's2'}")
    assert got == want
    assert any(isinstance(rec[-1], str) and len(rec[-1]) == 64 for rec in got), "file bytes were compared"
    assert not os.path.ismount(tmp / "m")  # it lived in the namespace only
    # A store missing from basedir= gives the kernel mount's ENOENT for its objects.
    got = walked_by_mount8(tmp, image, tmp / "m", f"basedir={tmp / 's1'}")
    assert got != want and any("ENOENT" in rec for rec in got)


@pytest.fixture
def userns():
    """A user namespace (its /proc path) mapping 0..65535 inside to 100000.. (uids), 200000.. (gids)."""
    ns = subprocess.Popen(["unshare", "--user", "sleep", "300"])
    try:
        while os.readlink(f"/proc/{ns.pid}/ns/user") == os.readlink("/proc/self/ns/user"):
            time.sleep(0.01)  # unshare(1) has not made the namespace yet
        for name, base in (("uid_map", 100000), ("gid_map", 200000)):  # from outside, as root may
            Path(f"/proc/{ns.pid}/{name}").write_text(f"0 {base} 65536\n")
        yield f"/proc/{ns.pid}/ns/user"
    finally:
        ns.kill()
        ns.wait()


@real_mount
@pytest.mark.skipif(not UPSTREAM.exists(), reason=f"upstream's helper is not built at {UPSTREAM}")
@pytest.mark.parametrize("idmap", [False, True])
def test_same_tree_as_upstreams_helper(stores, userns, idmap):
    tmp, image, _src = stores
    options = f"basedir={tmp / 's1'}:{tmp / 's2'}" + (f",idmap={userns}" if idmap else "")
    ours = walked_by_mount8(tmp, image, tmp / "m", options)
    out = tmp / "walk.pickle"
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        f'"$0" -o "$1" "$2" "$3" && "{sys.executable}" -c "{WALK}" "$3" {out}',
                        str(UPSTREAM), options, str(image), str(tmp / "k")],
                       capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr
    assert pickle.loads(out.read_bytes()) == ours


@real_mount
def test_upper_and_work_dirs_make_the_mount_writable(stores):
    tmp, image, src = stores
    (tmp / "up").mkdir()
    (tmp / "wk").mkdir()
    before = listing(tmp / "s1", tmp / "s2") | {"image": sha(image)}
    big = next(p for p in sorted((src / "sub").iterdir()) if p.is_file() and p.stat().st_size > 20000)
    rel = big.relative_to(src)
    m = tmp / "m"
    script = (f'echo written > {m}/new && cat {m}/new > {tmp}/new.read && printf more >> {m}/{rel} '
              f'&& cat {m}/{rel} > {tmp}/big.read && rm {m}/small && ls {m} > {tmp}/ls && findmnt -no OPTIONS {m} > {tmp}/opts')
    p = mount8(tmp, "-t", "composefs", "-o", f"basedir={tmp / 's1'}:{tmp / 's2'},upperdir={tmp / 'up'},"
               f"workdir={tmp / 'wk'}", str(image), str(m), then=script)
    assert p.returncode == 0, p.stderr
    assert (tmp / "new.read").read_bytes() == b"written\n"
    assert (tmp / "big.read").read_bytes() == big.read_bytes() + b"more"  # copied up from the store
    assert "small" not in (tmp / "ls").read_text().split()
    assert (tmp / "opts").read_text().startswith("rw,")
    assert (tmp / "up" / "new").read_bytes() == b"written\n"  # the writes are in the upper directory
    assert (tmp / "up" / rel).read_bytes() == big.read_bytes() + b"more"
    assert listing(tmp / "s1", tmp / "s2") | {"image": sha(image)} == before  # lower unchanged
    # `ro` keeps it read-only even with an upper directory.
    p = mount8(tmp, "-t", "composefs", "-o", f"ro,basedir={tmp / 'all'},upperdir={tmp / 'up'},"
               f"workdir={tmp / 'wk'}", str(image), str(m), then=f"echo x > {m}/other")
    assert p.returncode != 0 and b"Read-only file system" in p.stderr
    assert not (tmp / "up" / "other").exists()


@real_mount
def test_a_wrong_digest_refuses_to_mount(stores):
    tmp, image, _src = stores
    m = tmp / "m"
    wrong = "ab" * 32
    p = mount8(tmp, "-t", "composefs", "-o", f"basedir={tmp / 'all'},digest={wrong}", str(image), str(m),
               then=f"touch {tmp}/mounted")
    assert p.returncode == EXIT_FAILED
    line, = p.stderr.decode().splitlines()
    assert line.startswith(f"error: {image}: image fs-verity digest is ") and f"expected {wrong}: refused" in line
    assert not (tmp / "mounted").exists()
    # malformed: bad invocation
    p = run_cfsc("mount.composefs", "-o", f"basedir={tmp / 'all'},digest=xyz", str(image), str(m))
    assert p.returncode == EXIT_USAGE
    line, = p.stderr.decode().splitlines()
    assert line.startswith("error: digest=: expected ") and "'xyz'" in line
    # The right digest mounts.  It implies `verity` (as upstream), which this store cannot give.
    right = run_cfsc("measure", str(image), check=True).stdout.split()[0].decode().removeprefix("sha256:")
    p = run_cfsc("mount.composefs", "-o", f"basedir={tmp / 'all'},digest={right}", str(image), str(m))
    assert p.returncode == EXIT_FAILED and b"error: digest=: " in p.stderr and b"no fs-verity" in p.stderr
    p = mount8(tmp, "-t", "composefs", "-o", f"basedir={tmp / 'all'},digest={right},verity_check=0",
               str(image), str(m), then=f"cat {m}/small > {tmp}/small.read")
    assert p.returncode == 0, p.stderr
    assert (tmp / "small.read").read_bytes() == b"inline\n"


@real_mount
def test_verity_checks_on_a_store_without_fs_verity_are_refused(stores):
    tmp, image, _src = stores
    m = tmp / "m"
    for option in ("verity_check=2", "verity_check=1", "verity", "tryverity"):
        p = run_cfsc("mount.composefs", "-o", f"basedir={tmp / 's1'}:{tmp / 's2'},{option}", str(image), str(m))
        assert p.returncode == EXIT_FAILED, option
        line, = p.stderr.decode().splitlines()
        assert line.startswith(f"error: {option}: the store's ") and "no fs-verity" in line, line
        assert "mount with verity_check=0, or enable fs-verity" in line  # what to do about it
        assert not os.path.ismount(m)
    p = mount8(tmp, "-t", "composefs", "-o", f"basedir={tmp / 'all'},verity,verity_check=0", str(image), str(m))
    assert p.returncode == 0, p.stderr  # verity_check= decides


@real_mount
@pytest.mark.skipif(not UPSTREAM.exists(), reason=f"upstream's helper is not built at {UPSTREAM}")
def test_what_the_kernel_does_with_verity_over_a_store_without_it(stores):
    """Why the helper refuses such a mount: upstream's helper makes it, and then every read of
    a file with a digest fails with EIO."""
    tmp, image, _src = stores
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", '"$0" -o "$1" "$2" "$3" && cat "$3/sub/f1"',
                        str(UPSTREAM), f"basedir={tmp / 'all'},verity", str(image), str(tmp / "m")],
                       capture_output=True)
    assert p.returncode != 0 and b"Input/output error" in p.stderr, p.stderr


@real_mount
def test_generic_mount_options(stores):
    tmp, image, _src = stores
    m = tmp / "m"
    p = mount8(tmp, "-v", "-t", "composefs", "-o", f"basedir={tmp / 'all'},nosuid,nodev,noexec,noatime,strictatime,"
               "user,_netdev,nofail,comment=x", str(image), str(m), then=f"findmnt -no OPTIONS {m} > {tmp}/opts")
    assert p.returncode == 0, p.stderr
    opts = (tmp / "opts").read_text().strip().split(",")
    assert opts[0] == "ro" and {"nosuid", "nodev", "noexec"} <= set(opts) and "noatime" not in opts, opts
    assert b"mounted " in p.stdout and b"read-only" in p.stdout
    # unknown: refused by name, or ignored with -s
    p = mount8(tmp, "-t", "composefs", "-o", f"basedir={tmp / 'all'},bogus", str(image), str(m))
    assert p.returncode == EXIT_USAGE and b"error: bogus: unsupported option 'bogus'" in p.stderr
    p = mount8(tmp, "-s", "-t", "composefs", "-o", f"basedir={tmp / 'all'},bogus,sync", str(image), str(m),
               then=f"touch {tmp}/mounted")
    assert p.returncode == 0, p.stderr
    assert (tmp / "mounted").exists()
    # -f: everything checked, nothing mounted
    p = run_cfsc("mount.composefs", "-f", "-v", "-o", f"basedir={tmp / 'all'}", str(image), str(m))
    assert p.returncode == 0 and p.stdout.startswith(b"would mount ") and not os.path.ismount(m)
    p = run_cfsc("mount.composefs", "-f", "-o", f"basedir={tmp / 'all'},digest={'0' * 64}", str(image), str(m))
    assert p.returncode == EXIT_FAILED and b"refused" in p.stderr
    p = run_cfsc("mount.composefs", "-o", f"basedir={tmp / 'all'}:{tmp / 'gone'}", str(image), str(m))
    assert p.returncode == EXIT_FAILED
    assert p.stderr.decode() == f"error: {tmp / 'gone'}: cannot use as the store directory: No such file or directory\n"


@real_mount
def test_idmap_shows_the_tree_through_a_user_namespace(stores, userns):
    tmp, image, src = stores
    m = tmp / "m"
    p = run_cfsc("mount.composefs", "-o", f"basedir={tmp / 'all'},idmap={userns}", str(image), str(m))
    assert p.returncode == 0, p.stderr
    try:
        st = os.lstat(m / "sub" / "f1")
        assert (st.st_uid, st.st_gid) == (100000, 200000)
        assert (m / "sub" / "f1").read_bytes() == (src / "sub" / "f1").read_bytes()
    finally:
        unmount(str(m))
    p = run_cfsc("mount.composefs", "-o", f"basedir={tmp / 'all'},idmap={tmp / 'nothere'}", str(image), str(m))
    assert p.returncode == EXIT_FAILED and b"cannot open the user namespace for idmap" in p.stderr
    p = run_cfsc("mount", str(image), str(m), "--store", str(tmp / "all"), "--idmap", userns)
    assert p.returncode == 2 and b"error: idmap: the FUSE mount does not take this option" in p.stderr


@real_mount
def test_an_fstab_line(stores):
    """`mount MNT` with a composefs line in fstab (here `mount --fstab FILE`, not /etc/fstab)."""
    tmp, image, src = stores
    m = tmp / "m"
    (tmp / "fstab").write_text(f"{image} {m} composefs basedir={tmp / 's1'}:{tmp / 's2'},ro,nodev,nofail,x-note=1 0 0\n")
    p = mount8(tmp, "--fstab", str(tmp / "fstab"), str(m),
               then=f"findmnt -no FSTYPE,OPTIONS {m} > {tmp}/opts && cat {m}/sub/f4 > {tmp}/f4")
    assert p.returncode == 0, p.stderr
    fstype, opts = (tmp / "opts").read_text().split()
    assert fstype == "overlay" and opts.split(",")[:2] == ["ro", "nodev"]
    assert (tmp / "f4").read_bytes() == (src / "sub" / "f4").read_bytes()


# -- cfsc mount: several stores, upper/work ------------------------------------------------


@real_mount
@pytest.mark.fuse
@pytest.mark.parametrize("how", ["fuse", "kernel"])
def test_cfsc_mount_two_stores_and_an_upper_dir(stores, how):
    tmp, image, src = stores
    m = tmp / "m"
    (tmp / "up").mkdir()
    (tmp / "wk").mkdir()
    kernel = ["--kernel", "--verity", "none"] if how == "kernel" else []
    with mounted(str(image), str(tmp / "k"), "--kernel", "--verity", "none", "--store", str(tmp / "all")):
        want = walk(tmp / "k")
    with mounted(str(image), str(m), *kernel, "--store", f"{tmp / 's1'}:{tmp / 's2'}"):
        got = walk(m)
    assert got == want
    before = listing(tmp / "s1", tmp / "s2") | {"image": sha(image)}
    with mounted(str(image), str(m), *kernel, "--store", f"{tmp / 's1'}:{tmp / 's2'}",
                 "--upperdir", str(tmp / "up"), "--workdir", str(tmp / "wk")):
        (m / "new").write_bytes(b"written")
        with open(m / "sub" / "f1", "ab") as f:
            f.write(b"+")
        assert (m / "new").read_bytes() == b"written"
        assert (m / "sub" / "f1").read_bytes() == (src / "sub" / "f1").read_bytes() + b"+"
        servers = [pid for pid in pids() if cmdline(pid).endswith(
            os.fsencode(tmp / "wk") + b"\0")]
        assert len(servers) == (how == "fuse")
    for pid in servers:  # unmounting the overlay ends the FUSE server beneath it
        assert exits(int(pid)), "the FUSE server under the overlay is still running"
    assert (tmp / "up" / "sub" / "f1").read_bytes() == (src / "sub" / "f1").read_bytes() + b"+"
    assert listing(tmp / "s1", tmp / "s2") | {"image": sha(image)} == before
    p = run_cfsc("mount", str(image), str(m), *kernel, "--store", str(tmp / "all"), "--upperdir", str(tmp / "up"))
    assert p.returncode == 2 and b"needs a work directory" in p.stderr and not os.path.ismount(m)


@real_mount
def test_the_option_string_mounts_what_fsconfig_mounts(stores):
    """Kernels before 6.7 get overlayfs' option string (paths escaped) instead of fsconfig:
    both ways, on this kernel, give one tree from stores and upper directories whose paths
    hold `,` `:` and `\\`."""
    from cfsc.base import syscalls
    from cfsc.fuse import MountOptions
    from cfsc.fuse import kernel

    tmp, image, _src = stores
    odd = tmp / "a,b:c\\d"
    odd.mkdir()
    (tmp / "s1").rename(odd / "s1")
    lower, m = tmp / "lower", tmp / "m"
    lower.mkdir()
    syscalls.mount(str(image), str(lower), "erofs", syscalls.MS_RDONLY, None)
    walks = []
    try:
        for way in (kernel._mount_overlay_fsconfig, kernel._mount_overlay_legacy):
            up, wk = odd / f"up{len(walks)}", odd / f"wk{len(walks)}"
            up.mkdir()
            wk.mkdir()
            way(str(m), kernel._Plan(str(lower), [str(odd / "s1"), str(tmp / "s2")],
                                     MountOptions(verity="none", upperdir=str(up), workdir=str(wk))))
            try:
                root, *rest = walk(m)  # the root is merged with the upper's: its inode and times are that one's
                walks.append([root[-1], *rest])
                (m / "sub" / "new").write_bytes(b"n")
            finally:
                unmount(str(m))
            assert (up / "sub" / "new").read_bytes() == b"n"
    finally:
        syscalls.umount2(str(lower), syscalls.MNT_DETACH)
    assert walks[0] == walks[1]
    assert any(isinstance(rec[-1], str) and len(rec[-1]) == 64 for rec in walks[0]), "objects from both stores were read"


# -- parsing (no mounts) --------------------------------------------------------------------


def test_option_strings_split_as_upstream():
    assert split_options(r"basedir=/a\,b:/c,ro,,digest=") == [("basedir", "/a,b:/c"), ("ro", None), ("digest", "")]
    req = parse(["img", "mnt", "-o", "rw,basedir=/s1::/s2,noatime,atime,nosuid,suid,nodev,relatime,strictatime"])
    assert req.options.basedirs == ["/s1", "/s2"] and req.options.attrs == ("nodev", "strictatime")
    assert req.options.readonly is False and req.options.verity == "none" and req.options.kernel
    assert parse(["-o", "basedir=/s,verity", "i", "m"]).options.verity == "require"
    assert parse(["-o", "basedir=/s,digest=" + "a" * 64, "i", "m"]).options.verity == "require"
    assert parse(["-o", "basedir=/s,verity_check=1,verity", "i", "m"]).options.verity == "if-present"
    try_ = parse(["-nvo", "basedir=/s,tryverity", "i", "m"])
    assert try_.options.try_verity and try_.verbose and try_.asked_verity == "tryverity"
    both = parse(["-o", "basedir=/s,tryverity,digest=" + "a" * 64, "i", "m"])
    assert not both.options.try_verity and both.asked_verity == "digest="  # digest= requires, as upstream
    explicit = parse(["-o", "basedir=/s,verity_check=2,verity", "i", "m"])
    assert explicit.asked_verity == "verity_check=2"
    for argv, where in ((["i", "m"], "basedir="), (["-o", "basedir=/s,upperdir=/u", "i", "m"], "upperdir="),
                        (["-o", "basedir=/s,verity_check=3", "i", "m"], "verity_check="),
                        (["-o", "basedir=/s,ro=1", "i", "m"], "ro="), (["-t", "ext4", "i", "m"], "-t"),
                        (["-o", "basedir=/s", "i"], "mount.composefs"), (["-N", "1", "i", "m"], "-N")):
        with pytest.raises(UsageError) as e:
            parse(argv)
        assert e.value.where == where, argv


def test_the_helper_starts_without_the_cli():
    """A mount helper runs at boot once per fstab line: it must not load typer and every verb."""
    code = ("import sys; from cfsc.mount_helper import run; run(['-f', '-o', 'basedir=/nonexistent', '/nonexistent', '/']);"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('typer', 'click') or m.startswith('cfsc.cli')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.stdout.strip() == "[]", p.stdout + p.stderr
    p = subprocess.run([str(HELPER), "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "basedir=DIR[:DIR…]" in p.stdout
