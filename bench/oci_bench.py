#!/usr/bin/env python3
"""Time `cfsc compile oci:…` against `umoci unpack` + `mkcomposefs --digest-store`, and TOC-only.

    python bench/oci_bench.py /var/tmp/oci-bench --create [--mkcomposefs PATH] [--repeat 3]

The image: three layers built with buildah from this machine's own files (a Debian-minbase-like
root without debootstrap, which needs the network and takes minutes): a base layer (/etc,
/usr/sbin, the top-level libraries of /usr/lib/x86_64-linux-gnu under 3 MB, perl-base, gconv,
zoneinfo, i18n, perl5: ~190 MB, ~5k entries), an application layer (/usr/lib/python3.11) and
an update layer (changed /etc files, /usr/share/i18n deleted: whiteouts).  `--create` builds it
in a private containers-storage under WORK and writes it as an OCI layout with gzip layers
(`WORK/gzip`) and one with zstd:chunked layers (`WORK/chunked`) with skopeo.

Per repetition, each into a fresh, empty store on the same file system:

    cfsc         cfsc compile oci:WORK/gzip:latest -o IMAGE --digest-store STORE
    umoci+C      umoci unpack --image WORK/gzip:latest BUNDLE, then
                 mkcomposefs --digest-store=STORE BUNDLE/rootfs IMAGE
    toc-only     cfsc compile --toc-only oci:WORK/chunked:latest -o IMAGE  (no store: no data read)
    chunked      cfsc compile oci:WORK/chunked:latest -o IMAGE --digest-store STORE

Prints wall and CPU seconds and peak RSS (of each child, from /usr/bin/time; for umoci+C the larger of
the two) per run and their medians.  The cfsc and umoci+C stores must hold the same objects
(the images differ only where the unlisted-directory rule and hard links differ: mkcomposefs
makes every name its own inode).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from tar_bench import run, same_trees  # (bench/ is on sys.path)

CFSC = str(Path(sys.executable).with_name("cfsc"))
LIB = "/usr/lib/x86_64-linux-gnu"


def sh(*cmd: str) -> None:
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode:
        raise SystemExit(f"{cmd[0]} {cmd[1]} … failed: {p.stderr.strip()[-500:]}")


def copy(paths: list[str], dest: str) -> None:
    """`cp -a --parents`; files this machine will not let us copy (sockets, …) are left out."""
    subprocess.run(["cp", "-a", "--parents", *paths, dest], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def create(work: Path) -> None:
    s = ["--root", str(work / "root"), "--runroot", str(work / "run"), "--storage-driver", "overlay"]
    ctr = subprocess.run(["buildah", *s, "from", "scratch"], check=True, capture_output=True, text=True).stdout.strip()
    mnt = subprocess.run(["buildah", *s, "mount", ctr], check=True, capture_output=True, text=True).stdout.strip()
    libs = [str(p) for p in Path(LIB).iterdir() if p.is_file() and not p.is_symlink() and p.stat().st_size < 3 << 20]
    libs += [str(p) for p in Path(LIB).iterdir() if p.is_symlink()]
    base = ["/etc", "/usr/sbin", f"{LIB}/perl-base", f"{LIB}/gconv", "/usr/share/zoneinfo", "/usr/share/i18n",
            "/usr/share/perl5", *libs]
    copy(base, mnt)
    sh("buildah", *s, "commit", "-q", ctr, "bench:base")
    copy(["/usr/lib/python3.11"], mnt)
    sh("buildah", *s, "commit", "-q", ctr, "bench:app")
    shutil.rmtree(Path(mnt, "usr/share/i18n"))
    for name in ("etc/hostname", "etc/os-release", "etc/passwd"):
        p = Path(mnt, name)
        if p.exists() or p.is_symlink():
            p.unlink()
            p.write_text(f"updated {name}\n")
    sh("buildah", *s, "commit", "-q", ctr, "bench:latest")
    sh("buildah", *s, "rm", ctr)
    src = f"containers-storage:[overlay@{work}/root+{work}/run]localhost/bench:latest"
    sh("skopeo", "copy", "-q", "--dest-compress-format", "gzip", src, f"oci:{work}/gzip:latest")
    sh("skopeo", "copy", "-q", "--dest-compress-format", "zstd:chunked", src, f"oci:{work}/chunked:latest")




def clean(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()
    os.sync()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--create", action="store_true", help="build the images if they are missing")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mkcomposefs", default="/tmp/cfs-src/build/tools/mkcomposefs")
    args = ap.parse_args()
    work = args.work.resolve()
    if not (work / "gzip" / "index.json").exists():
        if not args.create:
            raise SystemExit(f"{work}/gzip is missing: give --create to build the images")
        work.mkdir(parents=True, exist_ok=True)
        create(work)
    size = sum(p.stat().st_size for p in (work / "gzip" / "blobs").rglob("*") if p.is_file())
    print(f"images in {work}: gzip layout {size / 1e6:.0f} MB; cfsc {CFSC}; {os.cpu_count()} CPUs;"
          f" load {os.getloadavg()[0]:.1f}")
    out, store_c, store_u, bundle = (work / n for n in ("out.cfs", "store-cfsc", "store-umoci", "bundle"))
    results: dict[str, list[tuple[float, float, int]]] = {k: [] for k in ("cfsc", "umoci+C", "toc-only", "chunked")}
    for i in range(args.repeat):
        clean(store_c, out)
        results["cfsc"].append(run([CFSC, "compile", f"oci:{work}/gzip:latest", "-o", str(out),
                                    "--digest-store", str(store_c)]))
        clean(store_u, bundle, out)
        a = run(["umoci", "unpack", "--image", f"{work}/gzip:latest", str(bundle)])
        b = run([args.mkcomposefs, f"--digest-store={store_u}", str(bundle / "rootfs"), str(out)])
        results["umoci+C"].append((a[0] + b[0], a[1] + b[1], max(a[2], b[2])))
        clean(out)
        results["toc-only"].append(run([CFSC, "compile", "--toc-only", f"oci:{work}/chunked:latest", "-o", str(out)]))
        clean(store_c, out)
        results["chunked"].append(run([CFSC, "compile", f"oci:{work}/chunked:latest", "-o", str(out),
                                       "--digest-store", str(store_c)]))
        print(f"run {i + 1}: " + " | ".join(f"{k} {v[-1][0]:.2f} s wall {v[-1][1]:.2f} s cpu {v[-1][2] / 1024:.0f} MiB"
                                           for k, v in results.items()), flush=True)
    if not same_trees(store_c, store_u):
        raise SystemExit("cfsc and umoci+mkcomposefs stored different objects")
    for k, v in results.items():
        wall, cpu, rss = (statistics.median(x) for x in zip(*v, strict=True))
        print(f"median {k:9}: {wall:6.2f} s wall, {cpu:6.2f} s cpu, peak {rss / 1024:5.0f} MiB")
    print("stores identical (cfsc, umoci+C)")
    clean(store_c, store_u, bundle, out)


if __name__ == "__main__":
    main()
