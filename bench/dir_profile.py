#!/usr/bin/env python3
"""Where a directory compile's time goes, and the floor that fs-verity hashing from Python sets.

    python bench/dir_profile.py /usr [--repeat 3]

Each run compiles the tree in this process (no store, the image thrown away in memory), as
`cfsc compile DIR -o IMAGE` does, and prints its phases: the walk (wall time; CPU of the main
process, which lists, stats and takes in results; CPU of the hashing workers, which open,
stat, read and hash every regular file), then the passes and the image writer, which run
after the walk, on one core.  (Into a file, with a processor idle, `cfsc compile` shares
the writer with a forked child: its wall time is then about half of the writer's CPU here.)
Then the floor, from this machine's own hashing speed:

    calls      the SHA-256 calls fs-verity needs for the tree: one per 4 KiB block of every
               Merkle level of every non-empty file, and its descriptor
    per call   one `sha256(block).digest()` of 4 KiB, as the workers make it (each level-0
               block is its own hash, so it is one call each from Python), and the same
               4 KiB inside one long `update` (OpenSSL alone: what a native multi-block
               hasher would pay)
    floor      calls x per call: the CPU no worker layout can save; over the cores, plus the
               serial tail, the best wall time this design allows

Run it on a quiet machine, twice (the first warms the page cache).  Figures for issue 16
(2 cores, 118k files / 5.9 GB of `/usr`) are in the module docstring of
`cfsc.frontends.directory` ("Where the time goes").
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import time

from cfsc.backends.erofs.writer import write_image
from cfsc.base.options import Options
from cfsc.base.tree import S_IFMT, S_IFREG
from cfsc.build import batch_allocation, load
from cfsc.build.pipeline import run_passes

BLOCK = 4096
HASHES_PER_BLOCK = BLOCK // 32  # SHA-256


def cpu(times: os.times_result) -> tuple[float, float]:
    """(this process's, its reaped children's) user + system seconds."""
    return times.user + times.system, times.children_user + times.children_system


def compile_once(tree_path: str) -> tuple[dict[str, float], object]:
    options = Options()
    t0, c0 = time.perf_counter(), cpu(os.times())
    tree = load([tree_path], options)
    t1, c1 = time.perf_counter(), cpu(os.times())
    with batch_allocation():
        tree = run_passes(tree, options)
        c2 = cpu(os.times())
        write_image(tree, io.BytesIO())
    t3, c3 = time.perf_counter(), cpu(os.times())
    return {
        "walk wall": t1 - t0, "walk main cpu": c1[0] - c0[0], "workers cpu": c1[1] - c0[1],
        "passes cpu": c2[0] - c1[0], "writer cpu": c3[0] - c2[0], "total wall": t3 - t0,
    }, tree


def hash_calls(tree) -> tuple[int, int, int]:
    """(non-empty regular files, their bytes, SHA-256 calls of 4 KiB their digests need)."""
    files = size = calls = 0
    seen: set[int] = set()
    stack = [tree.root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.children is not None:
            stack.extend(node.children.values())
        elif node.mode & S_IFMT == S_IFREG and node.size:
            files += 1
            size += node.size
            n = -(-node.size // BLOCK)
            calls += n
            while n > 1:  # the levels above: 128 hashes per block
                n = -(-n // HASHES_PER_BLOCK)
                calls += n
    return files, size, calls


def per_call() -> tuple[float, float, float]:
    """Seconds per 4 KiB SHA-256 call from Python, per 4 KiB streamed, per 256-byte
    descriptor call: the best of several rounds (the least disturbed by other load)."""
    data = memoryview(os.urandom(1 << 20))
    sha = hashlib.sha256
    offsets = range(0, len(data), BLOCK)
    desc = bytes(256)

    def best(fn, per: int) -> float:
        out = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(20):
                fn()
            out.append((time.perf_counter() - t) / 20 / per)
        return min(out)

    one = best(lambda: [sha(data[o:o + BLOCK]).digest() for o in offsets], len(offsets))
    stream = best(lambda: sha(data).digest(), len(offsets))
    small = best(lambda: [sha(desc).digest() for _ in range(256)], 256)
    return one, stream, small


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tree", help="the directory to compile (e.g. /usr)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"{args.tree}; cpus {cores}; load {os.getloadavg()[0]:.2f}")
    runs = []
    tree = None
    for _ in range(args.repeat):
        figures, tree = compile_once(args.tree)
        runs.append(figures)
        print("  " + "  ".join(f"{k} {v:.2f}s" for k, v in figures.items()), flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print("medians: " + "  ".join(f"{k} {v:.2f}s" for k, v in med.items()))

    files, size, calls = hash_calls(tree)
    one, stream, small = per_call()
    floor = calls * one + files * small
    native = calls * stream + files * small
    tail = med["passes cpu"] + med["writer cpu"]
    print(f"hashing: {files} files, {size / 1e9:.2f} GB, {calls} calls of 4 KiB;"
          f" {one * 1e6:.2f} us a call from Python, {stream * 1e6:.2f} us streamed,"
          f" {small * 1e6:.2f} us a descriptor")
    print(f"  floor from Python {floor:.2f}s cpu ({floor / cores:.2f}s on {cores} cores);"
          f" with a native multi-block hasher {native:.2f}s ({native / cores:.2f}s)")
    print(f"  workers' cpu above the floor (open, stat, xattrs, read, IPC, Python per file):"
          f" {med['workers cpu'] - floor:.2f}s")
    print(f"  best wall of this design: (floor + main walk cpu) / cores + serial tail"
          f" = {(floor + med['walk main cpu']) / cores + tail:.2f}s (tail: passes + writer {tail:.2f}s)")


if __name__ == "__main__":
    main()
