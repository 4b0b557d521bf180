#!/usr/bin/env python3
"""Time `cfsc compile LAYER.tar` against "extract with GNU tar, then `cfsc compile DIR`".

    python bench/tar_bench.py /work/ext/tar-bench/layer.tar --create

The layer is one large tar (default: / with /usr/share and /usr/lib/python3.11, GNU tar
`--format=posix --xattrs`; on Debian 12 about 600 MB and 55k members).  `--create` makes it
if it is missing; keep it outside the repository.  Per repetition (`--repeat`, default 5), the
two pipelines run interleaved, each into a fresh, empty content store on the same file system:

    stream    cfsc compile LAYER -o IMAGE --digest-store STORE
    extract   tar -xf LAYER -C DIR (as root: -p --same-owner --numeric-owner --xattrs
              --delay-directory-restore), then cfsc compile --hardlinks DIR -o IMAGE
              --digest-store STORE

(`--no-store` compares both without a store.)  Dirty pages are flushed (`sync`) and old trees
and stores removed before each run, outside the timing.  Prints wall and CPU seconds (user +
sys of the child processes) per run and their medians, and checks that both pipelines wrote the
same image and the same store.  The machine may be shared: compare the medians, and the CPU
figures, which other processes disturb less than wall time.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CFSC = str(Path(sys.executable).with_name("cfsc"))
EXTRACT = ["tar", "--xattrs", "--xattrs-include=*", "--same-owner", "-p", "--numeric-owner",
           "--delay-directory-restore"]


def create_layer(path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    # The root and the parents are listed so that extraction sets their metadata too.
    subprocess.run(["tar", "-C", "/", "--format=posix", "--xattrs", "--xattrs-include=*", "-cf", str(tmp),
                    "--no-recursion", ".", "usr", "usr/lib", "--recursion", "usr/share", "usr/lib/python3.11"],
                   check=True)
    tmp.rename(path)


def run(cmd: list[str]) -> tuple[float, float, int]:
    """Wall and CPU (user + sys) seconds and peak RSS (KiB) of one command.  The peak comes
    from /usr/bin/time: a child forked by this (larger) Python process would report this
    process's RSS as its own high-water mark."""
    with tempfile.NamedTemporaryFile("r") as report:
        start = time.perf_counter()
        proc = subprocess.Popen(["/usr/bin/time", "-q", "-f", "%M", "-o", report.name, *cmd],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        err = proc.stderr.read().decode()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
        if status != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {err}")
        return wall, usage.ru_utime + usage.ru_stime, int(report.read().split()[-1])


def clean(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
    os.sync()


def same_trees(a: Path, b: Path) -> bool:
    stack = [filecmp.dircmp(a, b)]
    while stack:
        c = stack.pop()
        if c.left_only or c.right_only or c.diff_files or c.funny_files:
            return False
        stack.extend(c.subdirs.values())
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("layer", type=Path)
    ap.add_argument("--create", action="store_true", help="create the layer if it is missing")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="--threads for both cfsc runs")
    ap.add_argument("--no-store", action="store_true", help="compile without --digest-store")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: beside the layer)")
    args = ap.parse_args()
    if not args.layer.exists():
        if not args.create:
            raise SystemExit(f"{args.layer} is missing: give --create to make it")
        create_layer(args.layer)
    work = args.work or args.layer.parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    tree, img_s, img_x, store_s, store_x = (work / n for n in ("tree", "stream.cfs", "extract.cfs", "store-s", "store-x"))
    threads = ["--threads", str(args.threads)] if args.threads else []
    size = args.layer.stat().st_size
    print(f"layer {args.layer}: {size / 1e6:.0f} MB; cfsc {CFSC}; {os.cpu_count()} CPUs; "
          f"load {os.getloadavg()[0]:.1f}")
    results: dict[str, list[tuple[float, float]]] = {"stream": [], "extract": []}
    for i in range(args.repeat):
        clean(store_s)
        cmd = [CFSC, "compile", str(args.layer), "-o", str(img_s), *threads]
        if not args.no_store:
            cmd += ["--digest-store", str(store_s)]
        results["stream"].append(run(cmd)[:2])
        clean(tree, store_x)
        tree.mkdir()
        w1, c1, _peak = run([*EXTRACT, "-xf", str(args.layer), "-C", str(tree)])
        cmd = [CFSC, "compile", "--hardlinks", str(tree), "-o", str(img_x), *threads]
        if not args.no_store:
            cmd += ["--digest-store", str(store_x)]
        w2, c2, _peak = run(cmd)
        results["extract"].append((w1 + w2, c1 + c2))
        s, x = results["stream"][-1], results["extract"][-1]
        print(f"run {i + 1}: stream {s[0]:6.2f} s wall {s[1]:6.2f} s cpu | extract+compile {x[0]:6.2f} s wall"
              f" ({w1:.2f} + {w2:.2f}) {x[1]:6.2f} s cpu | load {os.getloadavg()[0]:.1f}", flush=True)
    if img_s.read_bytes() != img_x.read_bytes():
        raise SystemExit("the two pipelines wrote different images")
    if not args.no_store and not same_trees(store_s, store_x):
        raise SystemExit("the two pipelines wrote different stores")
    sw, sc = (statistics.median(v) for v in zip(*results["stream"], strict=True))
    xw, xc = (statistics.median(v) for v in zip(*results["extract"], strict=True))
    print(f"median: stream {sw:.2f} s wall, {sc:.2f} s cpu; extract+compile {xw:.2f} s wall, {xc:.2f} s cpu")
    print(f"speed-up: {xw / sw:.2f}x wall, {xc / sc:.2f}x cpu; images and stores identical")
    clean(tree, store_s, store_x)


if __name__ == "__main__":
    main()
