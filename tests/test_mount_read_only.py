"""Whether a kernel composefs mount is read-only is one rule (`MountOptions.read_only`): what
`mount.composefs -v` says, the mount's own flag in the mount table (VFS-OPTIONS: overlayfs
without an upper directory makes its superblock read-only anyway), and whether a write gets
through agree, for `ro`, `rw` or neither, with and without an upper directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cfsc.fuse import MountOptions
from cfsc.mount_helper import describe, parse

from tests.helpers.data import run_cfsc

HELPER = Path(sys.executable).with_name("mount.composefs")
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("upper", [False, True], ids=["no-upper", "upper"])
@pytest.mark.parametrize("ro", ["", "ro", "rw"], ids=["neither", "ro", "rw"])
def test_the_rule(ro, upper):
    options = MountOptions(readonly={"": None, "ro": True, "rw": False}[ro], upperdir="/u" if upper else None,
                           workdir="/w" if upper else None)
    assert options.read_only() == (ro == "ro" or not upper)


@pytest.mark.root
@pytest.mark.kernel_mount
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")
@pytest.mark.parametrize("upper", [False, True], ids=["no-upper", "upper"])
@pytest.mark.parametrize("ro", ["", "ro", "rw"], ids=["neither", "ro", "rw"])
def test_what_the_helper_says_is_what_the_mount_is(tmp_path, ro, upper):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 5000)
    image = tmp_path / "img.cfs"
    run_cfsc("compile", str(src), "-o", str(image), "--digest-store", str(tmp_path / "store"), check=True)
    m = tmp_path / "m"
    m.mkdir()
    options = [f"basedir={tmp_path / 'store'}"] + ([ro] if ro else [])
    if upper:
        (tmp_path / "up").mkdir()
        (tmp_path / "wk").mkdir()
        options += [f"upperdir={tmp_path / 'up'}", f"workdir={tmp_path / 'wk'}"]
    argv = ["-v", "-o", ",".join(options), str(image), str(m)]
    # (in a private mount namespace: the mount dies with it, whatever happens)
    script = ('"$0" "$@" && findmnt -no VFS-OPTIONS "$M" | cut -d, -f1 && '
              '{ echo y > "$M/new" 2>/dev/null && echo writable || echo not-writable; }')
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(HELPER), *argv],
                       capture_output=True, text=True, env=dict(os.environ, M=str(m), PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr
    said, flag, behaviour = p.stdout.splitlines()
    read_only = parse(argv).options.read_only()
    assert said == "mounted " + describe(parse(argv))
    assert said.endswith("read-only" if read_only else "read-write")
    assert flag == ("ro" if read_only else "rw")
    assert behaviour == ("not-writable" if read_only else "writable")
