"""`tryverity` (and `--verity if-present`) on overlayfs' option string, the way kernels before
6.7 are mounted (no `lowerdir+`/`datadir+` for fsconfig).  overlayfs took data-only layers
(`::`) in 6.5 and `verity=` only in 6.6; a 6.5 kernel refuses the whole option string for it
(EINVAL).  Checks asked for only where the kernel can make them then go without; `verity`
(require) still fails.

This kernel is newer: the option-string mount with `verity=` is tested for real, and an older
overlayfs is emulated by refusing the options it lacks in the two system-call wrappers the
mount goes through (`syscalls.mount`, `syscalls.fsconfig`) — there is no older kernel here.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from cfsc.base import syscalls
from cfsc.fuse import MountOptions, kernel
from cfsc.fuse.attach import MountError, unmount
from cfsc.store.backing import NO_VERITY, VERITY_IF_PRESENT, VERITY_REQUIRED

from tests.helpers.data import run_cfsc

pytestmark = [pytest.mark.root, pytest.mark.kernel_mount,
              pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")]


@pytest.fixture
def layers(tmp_path):
    """An image mounted as EROFS (the lower layer), its store, and an empty mount point."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f" * 9000)
    image = tmp_path / "img.cfs"
    run_cfsc("compile", str(src), "-o", str(image), "--digest-store", str(tmp_path / "store"), check=True)
    lower, m = tmp_path / "lower", tmp_path / "m"
    lower.mkdir()
    m.mkdir()
    syscalls.mount(str(image), str(lower), "erofs", syscalls.MS_RDONLY, None)
    try:
        yield lower, tmp_path / "store", m
    finally:
        syscalls.umount2(str(lower), syscalls.MNT_DETACH)


def plan(layers, verity: str, try_verity: bool = False) -> kernel._Plan:
    lower, store, _m = layers
    return kernel._Plan(str(lower), [str(store)], MountOptions(verity=verity, try_verity=try_verity))


def super_options(m: Path) -> list[str] | None:
    """The overlayfs superblock options of the mount on `m` (None: nothing mounted there)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(m):
                return fields[fields.index("-") + 3].split(",")
    return None


def older_overlayfs(monkeypatch, has_verity: bool) -> list[str]:
    """From here on the wrappers refuse what overlayfs 6.5 (or 6.6, `has_verity`) lacks, as
    those kernels do (EINVAL); returns the option strings mount(2) was given."""
    real_mount, real_fsconfig = syscalls.mount, syscalls.fsconfig
    given = []

    def mount(source, target, fstype, flags, data):
        if fstype == "overlay":
            given.append(data)
            if not has_verity and "verity=" in data:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_mount(source, target, fstype, flags, data)

    def fsconfig(fsfd, cmd, key=None, value=None):
        if key in ("lowerdir+", "datadir+") or (key == "verity" and not has_verity):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_fsconfig(fsfd, cmd, key, value)

    monkeypatch.setattr(syscalls, "mount", mount)
    monkeypatch.setattr(syscalls, "fsconfig", fsconfig)
    return given


def test_the_option_string_asks_this_kernel_for_verity(layers):
    m = layers[2]
    for verity, try_verity, want in ((VERITY_REQUIRED, True, "verity=require"), (VERITY_IF_PRESENT, False, "verity=on"),
                                     (NO_VERITY, False, None)):
        kernel._mount_overlay_legacy(str(m), plan(layers, verity, try_verity))
        try:
            got = [o for o in super_options(m) if o.startswith("verity=")]
        finally:
            unmount(str(m))
        assert got == ([want] if want else []), (verity, try_verity)


@pytest.mark.parametrize("verity,try_verity", [(VERITY_REQUIRED, True), (VERITY_IF_PRESENT, False)],
                         ids=["tryverity", "if-present"])
def test_without_verity_in_overlayfs_the_checks_go_where_only_asked_for_if_possible(layers, monkeypatch, verity,
                                                                                       try_verity):
    m = layers[2]
    given = older_overlayfs(monkeypatch, has_verity=False)
    kernel._mount_overlay(str(m), plan(layers, verity, try_verity))  # fsconfig first, then the option string
    try:
        assert [o for o in super_options(m) if o.startswith("verity=")] == []
        assert (m / "f").read_bytes() == b"f" * 9000
    finally:
        unmount(str(m))
    assert len(given) == 2 and "verity=" in given[0] and "verity=" not in given[1]


def test_without_verity_in_overlayfs_required_checks_fail_the_mount(layers, monkeypatch):
    m = layers[2]
    given = older_overlayfs(monkeypatch, has_verity=False)
    with pytest.raises(MountError) as e:
        kernel._mount_overlay(str(m), plan(layers, VERITY_REQUIRED))
    assert str(e.value) == f"{m}: this kernel's overlayfs cannot require fs-verity: Invalid argument"
    with pytest.raises(MountError) as e:  # (before 6.5 no fsconfig for overlayfs: the option string only)
        kernel._mount_overlay_legacy(str(m), plan(layers, VERITY_REQUIRED))
    assert str(e.value) == f"{m}: this kernel's overlayfs cannot require fs-verity: Invalid argument"  # (as fsconfig's)
    assert super_options(m) is None and given == [given[0]] and "verity=require" in given[0]


def test_overlayfs_6_6_checks_through_the_option_string(layers, monkeypatch):
    """verity= but no lowerdir+ (6.6): tryverity gets its checks on the option string."""
    m = layers[2]
    given = older_overlayfs(monkeypatch, has_verity=True)
    kernel._mount_overlay(str(m), plan(layers, VERITY_REQUIRED, True))
    try:
        assert "verity=require" in super_options(m)
    finally:
        unmount(str(m))
    assert len(given) == 1


def test_overlayfs_6_6_refusing_the_mount_is_not_blamed_on_verity(layers, monkeypatch, tmp_path):
    """On 6.6 fsconfig takes `verity` (so overlayfs has it) and the option string is refused
    for another reason (here upperdir and workdir the same directory): the error says what
    overlayfs wants of them, not that it cannot require fs-verity."""
    lower, store, m = layers
    upper = tmp_path / "upper"
    upper.mkdir()
    given = older_overlayfs(monkeypatch, has_verity=True)
    options = MountOptions(verity=VERITY_REQUIRED, upperdir=str(upper), workdir=str(upper))
    with pytest.raises(MountError) as e:
        kernel._mount_overlay(str(m), kernel._Plan(str(lower), [str(store)], options))
    assert str(e.value).startswith(f"{m}: cannot mount overlayfs: ") and "upperdir and workdir must be" in str(e.value)
    assert super_options(m) is None and len(given) == 1 and "verity=require" in given[0]
