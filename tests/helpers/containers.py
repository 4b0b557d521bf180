"""Container tools for the tests: running them, a containerd of the test's own for eStargz,
and comparing a cfsc dump with the dump of an unpacked rootfs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path


def sh(*args: str, **kw) -> subprocess.CompletedProcess:
    """Run a tool; on failure the error shows what it printed."""
    p = subprocess.run(args, capture_output=True, **kw)
    if p.returncode:
        raise AssertionError(f"{' '.join(args)}: exit {p.returncode}: {p.stderr.decode(errors='replace')[-2000:]}")
    return p


def containerd_estargz(work: Path, archive: Path, name: str = "localhost/img", tag: str = "2") -> Path | None:
    """The image converted to eStargz by ctr-remote, through a containerd of our own
    (temporary root, state and socket; stopped before returning).  None if it cannot run."""
    if shutil.which("containerd") is None or shutil.which("ctr-remote") is None:
        return None
    base = Path(tempfile.mkdtemp(prefix="cd", dir="/tmp"))  # a socket path must stay short
    config = base / "config.toml"
    config.write_text(f"""version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.opt"]
[grpc]
  address = "{base}/sock"
[ttrpc]
  address = "{base}/sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
""")
    daemon = subprocess.Popen(["containerd", "--config", str(config)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        sock = base / "sock"
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        ctr = ["-a", str(sock), "-n", "cfsc"]
        sh("ctr", *ctr, "images", "import", "--base-name", name, str(archive))
        sh("ctr-remote", *ctr, "images", "convert", "--estargz", "--oci", f"{name}:{tag}", f"{name}:esgz")
        out = work / "esgz.tar"
        sh("ctr", *ctr, "images", "export", "--platform", "linux/amd64", str(out), f"{name}:esgz")
        layout = work / "esgz"
        layout.mkdir()
        sh("tar", "-xf", str(out), "-C", str(layout))
        return layout
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def unmount_below(top: Path) -> None:
    """containers-storage leaves its overlay directory bind-mounted on itself: undo that (and
    any other mount below `top`), deepest first, so the temporary directory can go."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(str(top) + "/")), reverse=True):
        subprocess.run(["umount", point], capture_output=True)


def expand_links(dump: bytes) -> list[bytes]:
    """Dump lines with hard links undone (each name its own inode, nlink 1: what mkcomposefs
    makes of a directory) and the root line left out."""
    lines = dump.splitlines()
    by_path = {line.split(b" ", 1)[0]: line for line in lines}
    out = []
    for line in lines[1:]:
        f = line.split(b" ")
        if f[2].startswith(b"@"):
            target = by_path[f[8]].split(b" ")
            f = [f[0], *target[1:]]
        if f[2].startswith(b"10"):
            f[3] = b"1"
        out.append(b" ".join(f))
    return out
