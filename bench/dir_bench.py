#!/usr/bin/env python3
"""Time `cfsc compile DIR` on a real OS tree, with and without a content store.

    python bench/dir_bench.py /work/ext/minbase --create --mkcomposefs /work/ext/bin/mkcomposefs

The tree is a Debian minbase root (`debootstrap --variant=minbase bookworm DIR
http://deb.debian.org/debian`; `--create` makes it if DIR is missing: needs root, debootstrap
and the network; keep it outside the repository).  Three cases per tool, each repeated
(`--repeat`, default 5) with the runs of the tools (and of each `--threads` value)
interleaved so that load from other processes hits all alike; the median is reported:

    nostore   DIR -o IMAGE
    cold      DIR -o IMAGE --digest-store EMPTY   (every object copied)
    warm      DIR -o IMAGE --digest-store FULL    (every object already there)

Prints wall time and peak RSS per run and the medians, and checks that both tools wrote the
same image and the same store.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from compile_bench import timed  # wall time and peak RSS of one child (bench/ is on sys.path)

CASES = ("nostore", "cold", "warm")


def create_tree(path: Path) -> None:
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap is missing: apt-get install debootstrap")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(tmp), "http://deb.debian.org/debian"],
                   check=True)
    tmp.rename(path)


def command(tool: str, exe: str, tree: str, image: str, store: str | None, threads: int | None) -> list[str]:
    if tool == "cfsc":
        cmd = [exe, "compile", tree, "-o", image]
        if store:
            cmd += ["--digest-store", store]
        if threads:
            cmd += ["--threads", str(threads)]
        return cmd
    cmd = [exe]
    if store:
        cmd.append(f"--digest-store={store}")
    if threads:
        cmd.append(f"--threads={threads}")
    return cmd + [tree, image]


def listing(store: str) -> list[tuple[str, int, int]]:
    """The store's objects (name, size, mode); cfsc's lock file (`cfsc gc`) is no object."""
    out = []
    for dirpath, _dirs, files in os.walk(store):
        for name in files:
            if dirpath == store and name == ".cfsc-lock":
                continue
            st = os.lstat(os.path.join(dirpath, name))
            out.append((os.path.relpath(os.path.join(dirpath, name), store), st.st_size, st.st_mode))
    return sorted(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tree", type=Path, help="the OS tree (e.g. /work/ext/minbase)")
    ap.add_argument("--create", action="store_true", help="debootstrap the tree if it is missing")
    ap.add_argument("--mkcomposefs", help="upstream mkcomposefs to compare with")
    ap.add_argument("--cfsc", default=str(Path(sys.executable).with_name("cfsc")), help="the cfsc command")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[None],
                    help="--threads for both tools; several values: one run of each per repeat (default: theirs)")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--scratch", default=None, help="where images and stores go (default: a temp dir)")
    args = ap.parse_args()

    if not args.tree.is_dir():
        if not args.create:
            raise SystemExit(f"{args.tree} is missing: pass --create to debootstrap it")
        create_tree(args.tree)
    files = sum(len(f) for _d, _s, f in os.walk(args.tree))
    print(f"tree {args.tree}: {files} files; cpus {len(os.sched_getaffinity(0))}; load {os.getloadavg()[0]:.2f}")

    tools = {"cfsc": args.cfsc}
    if args.mkcomposefs:
        tools["mkcomposefs"] = args.mkcomposefs
    # (label, tool, executable, threads); every variant must write the same image and store
    variants = [(tool + (f"-t{t}" if t else ""), tool, exe, t) for t in args.threads for tool, exe in tools.items()]
    scratch = tempfile.mkdtemp(prefix="dir-bench-", dir=args.scratch)
    results: dict[tuple[str, str], list[tuple[float, int]]] = {}
    try:
        for case in args.cases:
            for _ in range(args.repeat):
                for label, tool, exe, threads in variants:
                    image = os.path.join(scratch, f"{label}.cfs")
                    store = os.path.join(scratch, f"{label}-store") if case != "nostore" else None
                    cmd = command(tool, exe, str(args.tree), image, store, threads)
                    if case == "cold":
                        shutil.rmtree(store, ignore_errors=True)  # type: ignore[arg-type]
                    elif case == "warm" and not os.path.isdir(store):  # type: ignore[arg-type]
                        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                    subprocess.run(["sync"], check=True)
                    wall, rss = timed(cmd)
                    results.setdefault((case, label), []).append((wall, rss))
                    print(f"  {case:8} {label:16} {wall:7.3f} s {rss / 1024:7.1f} MiB", flush=True)
            if len(variants) > 1:
                images = {Path(scratch, f"{v[0]}.cfs").read_bytes() for v in variants}
                same = "identical" if len(images) == 1 else "DIFFERENT"
                if case != "nostore":
                    stores = {tuple(listing(os.path.join(scratch, f"{v[0]}-store"))) for v in variants}
                    same += ", stores " + ("identical" if len(stores) == 1 else "DIFFERENT")
                print(f"  {case}: images {same}")
        print("medians:")
        for (case, tool), runs in results.items():
            wall = statistics.median(r[0] for r in runs)
            rss = statistics.median(r[1] for r in runs)
            print(f"  {case:8} {tool:16} {wall:7.3f} s {rss / 1024:7.1f} MiB  (runs: {len(runs)})")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
