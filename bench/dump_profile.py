#!/usr/bin/env python3
"""Where a dumpfile compile's time goes: the main process's critical path, phase by phase.

    python bench/dump_profile.py DUMPFILE [--repeat 7] [--mkcomposefs PATH]

Each run is a fresh process that compiles DUMPFILE into a file as `cfsc compile DUMP -o
IMAGE` does (the same load, passes and writer, forked helpers included) and reports, per
phase, its wall time, the main process's CPU, its helpers' CPU (the forked column stage of
the load, the forked half of the writer) and the main process's minor page faults:

    start-up   interpreter and imports of a `cfsc compile` (a separate process that only imports)
    load       the dumpfile into a tree (a forked child runs most batches' column stage)
    passes     each pass of the pipeline, on one core: the other one idles meanwhile
    writer     the image, half of it by a forked child (`write_image`, into a file)
    cli        the whole command, from outside (with C's beside it, given `--mkcomposefs`)

Then what that says: the share of each phase, the time the second core idles, what the page
faults cost at this machine's price of a first touch (measured here), and how far the
command is from 1.25x C.  Medians of `--repeat` runs; run it on a quiet machine.  Figures
for issue 16 are in the module docstring of `cfsc.frontends.dumpfile_stream` ("Where a
compile's time goes").
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CFSC = str(Path(sys.executable).with_name("cfsc"))
IMPORTS = "import cfsc.cli.direct, cfsc.frontends.dumpfile, cfsc.backends.erofs.writer, pickle"


def sample() -> tuple[float, float, float, int]:
    """(wall, this process's cpu, its reaped children's cpu, its minor faults) now."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (time.perf_counter(), me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime,
            me.ru_minflt)


def one_run(dump: str, image: str) -> dict[str, list[float]]:
    """The phases of one compile in this process: name -> [wall, cpu, helpers' cpu, faults]."""
    from cfsc.backends.erofs.writer import write_image
    from cfsc.base.options import Options
    from cfsc.build import batch_allocation, load
    from cfsc.build.pipeline import PASSES

    phases: dict[str, list[float]] = {}

    def mark(name: str, start: tuple) -> tuple:
        now = sample()
        phases[name] = [b - a for a, b in zip(start, now, strict=True)]
        return now

    options = Options()
    keep = []  # (the tree outlives the run, as in `cfsc compile`: freed by the exit)
    with batch_allocation():
        at = sample()
        tree = load([dump], options)
        at = mark("load", at)
        for compiler_pass in PASSES:
            tree = compiler_pass(tree, options)
            at = mark(f"  {compiler_pass.__name__}", at)
        with open(image, "wb") as out:
            write_image(tree, out, keep=keep)
        mark("writer", at)
    keep.append(tree)
    return phases


def startup() -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORTS], check=True)
    return time.perf_counter() - t


def whole(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def first_touch_us() -> float:
    """Microseconds a first touch of a fresh page costs here (the best of a few rounds)."""
    size = 64 << 20
    best = float("inf")
    for _ in range(3):
        m = mmap.mmap(-1, size)
        t = time.perf_counter()
        for i in range(0, size, mmap.PAGESIZE):
            m[i] = 1
        best = min(best, (time.perf_counter() - t) / (size // mmap.PAGESIZE) * 1e6)
        m.close()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dump", help="the dumpfile to compile")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--mkcomposefs", help="upstream mkcomposefs, timed beside `cfsc compile`")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # (a run's own process: its image path)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_run(args.dump, args.one)))
        return
    cores = len(os.sched_getaffinity(0))
    print(f"{args.dump}; cpus {cores}; load {os.getloadavg()[0]:.2f}")
    runs: list[dict] = []
    rows: dict[str, list[float]] = {"start-up": [], "cli": [], "C": []}
    with tempfile.TemporaryDirectory() as scratch:
        image = os.path.join(scratch, "image.cfs")
        for _ in range(args.repeat):  # interleaved, so that other load hits all alike
            out = subprocess.run([sys.executable, __file__, args.dump, "--one", image],
                                 check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out))
            rows["start-up"].append(startup())
            rows["cli"].append(whole([CFSC, "compile", args.dump, "-o", image]))
            if args.mkcomposefs:
                rows["C"].append(whole([args.mkcomposefs, "--from-file", args.dump, image]))
    med = {name: [statistics.median(r[name][k] for r in runs) for k in range(4)] for name in runs[0]}
    wall = {name: statistics.median(v) for name, v in rows.items() if v}
    touch = first_touch_us()

    print(f"\nmedians of {args.repeat} runs       wall      cpu  helpers   faults  (faults x {touch:.1f} us)")
    print(f"  {'start-up':22} {wall['start-up'] * 1e3:6.1f} ms")
    for name, (w, c, h, f) in med.items():
        print(f"  {name:22} {w * 1e3:6.1f} ms {c * 1e3:6.1f} {h * 1e3:7.1f} {f:8.0f}  ({f * touch / 1e3:5.1f} ms)")
    passes = sum(v[0] for n, v in med.items() if n.startswith("  "))
    path = wall["start-up"] + med["load"][0] + passes + med["writer"][0]
    cpu = sum(v[1] + v[2] for v in med.values())
    print(f"\n  main process's path: start-up + load + passes + writer = {path * 1e3:.0f} ms"
          f" (the command took {wall['cli'] * 1e3:.0f} ms: the rest is exit and what varies)")
    print(f"  the second core idles through start-up and the passes: {(wall['start-up'] + passes) * 1e3:.0f} ms"
          f" ({(wall['start-up'] + passes) / path:.0%} of the path)")
    print(f"  all processes' cpu {cpu * 1e3:.0f} ms: on {cores} cores at best {cpu / cores * 1e3:.0f} ms"
          f" + start-up {wall['start-up'] * 1e3:.0f} ms")
    if rows["C"]:
        c = wall["C"]
        print(f"  C {c * 1e3:.0f} ms: cfsc / C = {wall['cli'] / c:.2f}; 1.25x C = {1.25 * c * 1e3:.0f} ms,"
              f" {(wall['cli'] - 1.25 * c) * 1e3:+.0f} ms from here")


if __name__ == "__main__":
    main()
