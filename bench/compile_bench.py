#!/usr/bin/env python3
"""Time `cfsc compile` on large dumpfiles: wall time and peak RSS per run.

    python bench/compile_bench.py --entries 64000 250000 1000000
    python bench/compile_bench.py --dump /path/to/real-os.dump --mkcomposefs /path/to/mkcomposefs

Synthetic trees: directories of 1000 external files each (payload + fs-verity digest), every
file with a SELinux label from a small pool and one file in 50 with an xattr of its own —
the shape of an OS image's /usr.  With `--mkcomposefs`, the upstream C tool runs on the same input and
the two images are compared byte for byte.  Prints one line per run and the median.

Where the time of a dumpfile compile goes (issue 16; cs9-x86_64-developer, 64,246 entries,
CPU seconds in-process, after the work below): start-up 0.05 (0.011 of it the interpreter,
~0.012 `dataclasses`/`inspect` for `cfsc.base.options`; typer and click are no longer loaded
by `cfsc compile SRC -o IMG` or `cfsc mkcomposefs`, see `cfsc.cli.direct`), parsing 0.16
(~0.065 of it only making the field objects: lines, `split`, transposing), passes 0.07,
the EROFS writer 0.23 (its placement loop ~1.3 us and its emitting loop ~2.2 us per inode).
Done: a shared redirect (copies of one file: a fifth of a real OS's files) takes the cached
xattr layout instead of the generic merge; the parser converts columns of few distinct values
once per value and visits only directory and symlink lines for their checks; the writer skips
the per-inode compactness test when every inode fits and looks own xattr bodies up by tuple
identity; `select_version` rules whiteouts out from the children's modes; `order_inodes`
rebuilds only unsorted directories.  Tried and dropped: a column-wise writer (C-level
`map`/`zip` per field, one `struct` pack per slice) took 0.36 s against 0.25 s -- under
CPython 3.11 a `map` stage costs about what a bytecode does (~20 ns an element) and the
format's per-inode conditions need more stages than the loop has steps; a column-wise tree
insertion in the parser saved nothing and left the tree's objects scattered, so every later
walk got slower.  What would move the floor: compiling the two writer loops and
`parse_batch` (mypyc or a small C module), or fusing the passes' five walks over the tree.

The second core (C mkcomposefs uses one for a dumpfile), taken only when a processor is idle
(`cfsc.base.forked.worthwhile`): a forked child reads the dumpfile too and runs the column
stage of three batches in four, handing them over pickled (`frontends/dumpfile_stream.py`);
after placement a forked child emits the second half of the inode records into the output
file (`write_image(split=)`, trees of 20k inodes or more; the copy-on-write faults -- both
processes write the reference counts of objects on about half the heap's pages each -- make
the child cost more CPU than it saves the parent).  CPU seconds of the parent, the critical
path, sequential -> forked (the child's CPU), in process, medians of 5 / 3 / 1-2 runs,
the machine at load 4-12 (so the figures are rough):

    dumpfile          parse                       writer (plan + emit)
    cs9 (64k)         0.20 -> 0.16  (0.13)        0.25-0.375 -> 0.20-0.26  (0.12)
    synthetic 250k    0.95 -> 0.59  (0.54)        0.91 -> 0.68  (0.37)
    synthetic 1M      3.78 -> 2.58  (2.53)        3.08-4.21 -> 2.62-2.67  (1.5-1.65)

Measured side by side with the C tool (whole process, medians of 7-9 runs, 3 for 1M, in
turn with it; images identical; cfsc's modules compiled from source on every run, as under
PYTHONDONTWRITEBYTECODE, unless said):

    dumpfile                    before            after             C        peak MiB after / C
    cs9 developer (64k)         0.70 s  (2.60x)   0.55 s  (2.21x)   0.25 s   62 / 70
      with .pyc files                             0.57 s  (1.95x)   0.29 s
    synthetic 250k              after/before 0.91 (CPU)   1.88 s  (0.87x)   2.14 s   176 / 349
    synthetic 1M                after/before 0.93 (CPU)   8.24 s  (0.72x)   11.41 s  630 / 1388 (0.45x)

Then (second round of issue 16), whole process pinned to one processor (so the forked paths
stay off), CPU seconds, medians of 11 / 5 interleaved runs before -> after: cs9 64k 0.574 ->
0.525, synthetic 250k 2.17 -> 1.94; 1M, not pinned, busy machine: 8.52 -> 7.98.  The cs9
compile went from 4395M to 4215M instructions (callgrind, one processor).  Side by side with
the C tool (`bench/vs_mkcomposefs.py`, load ~1.9, wall ratio before -> after): 64k 1.92 ->
1.86, 250k 0.86 -> 0.70, 1M 0.67 -> 0.66 (peak RSS 0.48x).  Three costs were outside the
per-inode loops: the young collection that the first allocation after `batch_allocation`
started over the whole tree (64k: 15-50 ms, 250k: 0.17 s; what a batch made now goes straight
to the oldest generation); the teardown of the tree and the modules at exit (1M: 0.3 s; the
console script now ends with `os._exit` once its output is in place); `resolve_hardlinks`
walking entry by entry (250k: 0.09 -> 0.05 s; a directory without links is taken whole).  Tried
and dropped, each measured slower: an external file's xattr body as a cached frame around its
digest and payload, found per file by a key tuple (the tuple and its hash cost more than the
splicing they save); dirents packed a directory at a time by one `struct` (C-level `map`s over
columns: 0.043 -> 0.06 s for 82k entries, the set-up per directory outweighs a 9-entry loop);
the parser inserting runs of one directory's lines whole (splitting every path into columns
costs what the loop saves); C-level `map`s for the writer's compactness test (more
instructions, not fewer).  Instruction counts were the steady yardstick on the busy machine:
the writer on the cs9 dump went from 1995M to 1907M.

Then (third round): the writer's plan is split too.  It is now `_size` (per inode, independent)
and `_place` (offsets, serial but cheap); a child forked before sizing sizes the second half
while the parent sizes and places the first, places its half once told where it starts, and
the two trade nids (`forked.Partner`, a pipe each way) before each encodes its half.  What
stays serial: the tree-wide time and id checks (5 ms at 64k), the split point (2 ms), the
fork, and the placement of the child's half, which the parent waits for (~6 ms at 64k, ~20 ms
at 250k).  The machine was at load 3-6 on 2 processors throughout, so wall times were not
comparable; CPU seconds of the parent (the critical path) in process, `write_image` only,
medians, before -> after (the child's CPU):

    dumpfile          parent CPU                      child CPU
    cs9 (64k)         0.21-0.31 -> 0.16-0.21          0.10-0.14 -> 0.14-0.19
    synthetic 250k    0.61-0.66 -> 0.47-0.52          0.36-0.40 -> 0.48-0.54
    synthetic 1M      2.59 -> 2.32 (one run)          1.53 -> 2.56

Instructions (callgrind, cs9, whole process, one run): with the forked paths, the parent
process 3231M -> 2890M; the sequential path (one processor) 4222M -> 4240M (+0.4%: sizing and
placement are two loops now, not one).  Two passes lost a loop each: `add_overlay_xattrs`
walks the directories in its loop over their entries (64k: 13-15 -> 8 ms), `order_inodes`
iterates the list it grows (15-16 -> 9 ms); with them the parent 2779M, the sequential path
4126M (-2.3%).  The parent's page faults rise with the earlier fork
(64k: ~10k minor faults in `write_image`, 1.8k sequential), the copy-on-write of the pages
its half touches.  Images identical to mkcomposefs' (cs9, 250k, 1M).  Next: the child's placement on
the critical path.  Placed from a guessed offset while the parent still works, it would need
correcting only up to the first inode both placements put at the same offset within a
block (from there on they agree, shifted by whole blocks): on cs9 that is 1-3k of the
half's 34k inodes, but never on the synthetic trees (their 4-byte chunk-index tails hardly
ever pad), so it helps real trees only.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

LABELS = [b"system_u:object_r:%s_t:s0" % t for t in (b"bin", b"lib", b"usr", b"etc", b"share")]


def synthetic_dump(path: str, entries: int, per_dir: int = 1000) -> None:
    n_dirs = max(1, entries // per_dir)
    with open(path, "wb") as f:
        f.write(b"/ 4096 40755 %d 0 0 0 1700000000.0 - - - security.selinux=%s\n" % (n_dirs + 2, LABELS[0]))
        for d in range(n_dirs):
            f.write(b"/d%04d 4096 40755 2 0 0 0 1700000000.0 - - - security.selinux=%s\n" % (d, LABELS[2]))
            lines = []
            for i in range(per_dir):
                digest = hashlib.sha256(b"%d/%d" % (d, i)).hexdigest().encode()
                size = 65 + (d * per_dir + i) * 7919 % 1_000_000
                own = b" user.origin=pkg%d" % (d * per_dir + i) if i % 50 == 0 else b""
                lines.append(b"/d%04d/f%05d %d 100644 1 0 0 0 1700000000.%d %s/%s - %s security.selinux=%s%s\n" % (
                    d, i, size, i % 3, digest[:2], digest[2:], digest, LABELS[i % len(LABELS)], own))
            f.write(b"".join(lines))


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
    return wall, usage.ru_maxrss


def run(label: str, cmd: list[str], repeat: int) -> float:
    walls = []
    for _ in range(repeat):
        wall, rss = timed(cmd)
        walls.append(wall)
        print(f"  {label:10s} {wall:7.2f} s  {rss / 1024:8.0f} MiB", flush=True)
    median = statistics.median(walls)
    print(f"  {label:10s} median {median:.2f} s")
    return median


def bench(dump: str, name: str, args: argparse.Namespace, tmp: str) -> None:
    lines = sum(1 for _ in open(dump, "rb"))
    print(f"{name}: {lines} entries, {os.path.getsize(dump) / 1e6:.0f} MB of dumpfile")
    ours_img = os.path.join(tmp, "cfsc.cfs")
    ours = run("cfsc", [args.cfsc, "compile", dump, "-o", ours_img], args.repeat)
    if args.mkcomposefs:
        theirs_img = os.path.join(tmp, "c.cfs")
        theirs = run("mkcomposefs", [args.mkcomposefs, "--from-file", dump, theirs_img], args.repeat)
        same = open(ours_img, "rb").read() == open(theirs_img, "rb").read()
        print(f"  ratio cfsc/C = {ours / theirs:.2f}; images {'identical' if same else 'DIFFER'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, nargs="*", default=[64000, 250000, 1000000])
    ap.add_argument("--dump", action="append", default=[], help="a real dumpfile to time as well")
    ap.add_argument("--mkcomposefs", help="upstream mkcomposefs to compare with")
    ap.add_argument("--cfsc", default=shutil.which("cfsc") or os.path.join(os.path.dirname(sys.executable), "cfsc"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cfsc-bench-") as tmp:
        for dump in args.dump:
            bench(dump, os.path.basename(dump), args, tmp)
        for n in args.entries:
            path = os.path.join(tmp, f"synthetic-{n}.dump")
            synthetic_dump(path, n)
            bench(path, f"synthetic {n}", args, tmp)
            os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
