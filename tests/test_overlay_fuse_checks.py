"""`cfsc mount` with an upper directory over the FUSE mount (`cfsc.fuse.kernel.overlay_fuse`):
what it refuses before mounting anything, and what a failure half-way leaves (nothing).

Each refusal is one line naming the option or path and what was expected, exit 2 for a bad
invocation or input (1 where the kernel refused the mount); afterwards nothing is mounted,
no FUSE server runs, and the private temporary directory the FUSE mount would have used is
gone (TMPDIR points into the test's directory to see that).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.nobody import AS_NOBODY, nobody_dir
from tests.helpers.data import CFSC, run_cfsc
from tests.helpers.procs import cmdline, pids

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.kernel_mount,
              pytest.mark.skipif(os.geteuid() != 0, reason="overlayfs mounts need root"),
              pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")]


@pytest.fixture
def setup(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "big").write_bytes(b"x" * 10000)
    (src / "small").write_bytes(b"s")
    image = tmp_path / "img.cfs"
    run_cfsc("compile", str(src), "-o", str(image), "--digest-store", str(tmp_path / "store"), check=True)
    for d in ("m", "up", "wk", "tmp"):
        (tmp_path / d).mkdir()
    (tmp_path / "file").write_bytes(b"")
    return tmp_path, image


def servers(tmp: Path) -> list[int]:
    """Processes whose command line names something under `tmp` (a FUSE server left running)."""
    mine = os.fsencode(tmp)
    return [pid for pid in pids() if mine in cmdline(pid)]


def mount(tmp: Path, image: Path, *args: str, run_as: tuple = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*run_as, CFSC, "mount", str(image), *args], capture_output=True, text=True,
                          env=dict(os.environ, TMPDIR=str(tmp / "tmp")))


def nothing_left(tmp: Path) -> None:
    assert not os.path.ismount(tmp / "m")
    assert os.listdir(tmp / "tmp") == []  # the FUSE mount's private directory went too
    deadline = time.monotonic() + 30  # a bound against hanging, not a timing assert
    while servers(tmp):
        assert time.monotonic() < deadline, f"a FUSE server still runs: {servers(tmp)}"
        time.sleep(0.05)
    with open("/proc/self/mountinfo") as f:
        assert str(tmp) not in f.read()


@pytest.mark.parametrize("case", ["foreground", "mountpoint missing", "mountpoint a file", "upperdir missing",
                                  "upperdir a file", "workdir missing", "workdir a file", "workdir only"])
def test_refused_before_anything_is_mounted(setup, case):
    tmp, image = setup
    m, up, wk = str(tmp / "m"), str(tmp / "up"), str(tmp / "wk")
    missing, file = str(tmp / "missing"), str(tmp / "file")
    args, want = {
        "foreground": ([m, "--upperdir", up, "--workdir", wk, "--foreground"],
                       "--foreground: an upper directory over the FUSE mount needs the server in the background"),
        "mountpoint missing": ([missing, "--upperdir", up, "--workdir", wk],
                               f"{missing}: cannot use as a mount point: No such file or directory"),
        "mountpoint a file": ([file, "--upperdir", up, "--workdir", wk], f"{file}: the mount point is not a directory"),
        "upperdir missing": ([m, "--upperdir", missing, "--workdir", wk],
                             f"{missing}: cannot use as the upperdir: No such file or directory"),
        "upperdir a file": ([m, "--upperdir", file, "--workdir", wk], f"{file}: the upperdir is not a directory"),
        "workdir missing": ([m, "--upperdir", up, "--workdir", missing],
                            f"{missing}: cannot use as the workdir: No such file or directory"),
        "workdir a file": ([m, "--upperdir", up, "--workdir", file], f"{file}: the workdir is not a directory"),
        "workdir only": ([m, "--workdir", wk], "workdir: an upper directory needs a work directory and the other way"
                         " round (overlayfs takes both or neither)"),
    }[case]
    p = mount(tmp, image, *args, "--store", str(tmp / "store"))
    assert p.returncode == 2, p.stderr
    assert p.stderr == f"error: {want}\n"
    nothing_left(tmp)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv to run the mount as nobody")
def test_refused_without_root(setup):
    tmp, image = setup
    with nobody_dir("cfsc-ovl-", 0o755) as base:
        shutil.copy(image, base / "img.cfs")
        (base / "img.cfs").chmod(0o644)
        p = subprocess.run([*AS_NOBODY, CFSC, "mount", str(base / "img.cfs"), "/tmp", "--store", "/tmp",
                            "--upperdir", "/tmp", "--workdir", "/tmp"], capture_output=True, text=True)
        assert p.returncode == 2, p.stderr
        assert p.stderr == ("error: --upperdir: an upper directory takes an overlayfs mount, which needs root"
                            " (CAP_SYS_ADMIN)\n")


def test_a_corrupt_image_is_refused_before_the_overlay(setup):
    """The FUSE mount beneath fails (a located image error): no server, no temporary mount."""
    tmp, image = setup
    bad = tmp / "bad.cfs"
    data = bytearray(image.read_bytes())
    data[1024:1028] = b"\0\0\0\0"  # the EROFS superblock's magic
    bad.write_bytes(bytes(data))
    p = mount(tmp, bad, str(tmp / "m"), "--store", str(tmp / "store"), "--upperdir", str(tmp / "up"),
              "--workdir", str(tmp / "wk"))
    assert p.returncode == 2, p.stderr
    (line,) = p.stderr.splitlines()
    assert line.startswith(f"error: {bad}") and "Traceback" not in p.stderr
    nothing_left(tmp)


def test_an_overlay_the_kernel_refuses_unmounts_the_fuse_mount_beneath(setup):
    """upperdir and workdir the same directory: the FUSE mount is made, then overlayfs refuses
    (EINVAL) — one line with what overlayfs wants, exit 1, and the FUSE mount and its server
    are gone again."""
    tmp, image = setup
    p = mount(tmp, image, str(tmp / "m"), "--store", str(tmp / "store"), "--upperdir", str(tmp / "up"),
              "--workdir", str(tmp / "up"))
    assert p.returncode == 1, p.stderr
    (line,) = p.stderr.splitlines()
    assert line.startswith(f"error: {tmp / 'm'}: cannot mount overlayfs: Invalid argument (upperdir and workdir must")
    nothing_left(tmp)
    # and with proper directories it mounts, and unmounts cleanly
    p = mount(tmp, image, str(tmp / "m"), "--store", str(tmp / "store"), "--upperdir", str(tmp / "up"),
              "--workdir", str(tmp / "wk"))
    assert p.returncode == 0, p.stderr
    try:
        assert (tmp / "m" / "d" / "big").read_bytes() == b"x" * 10000
    finally:
        run_cfsc("umount", str(tmp / "m"), check=True)
    nothing_left(tmp)
