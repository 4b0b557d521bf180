#!/usr/bin/env python3
"""Time `cfsc dump IMAGE` against `cfsc compile DUMP` (issue 3: dump ≤ 2× compile).

    bench/dump_bench.py DUMPFILE IMAGE [--repeat N] [--cfsc PATH]

DUMPFILE is a dumpfile and IMAGE its compiled image (e.g. the 64,760-entry OS tree:
/work/ext/os64.dump and /work/ext/os64.cfs).  Each command runs N times as a fresh process
(so start-up counts, as it does for users); the medians of wall time, CPU time and peak
RSS (`wait4` rusage of that process alone) are printed.  CPU time is the steadier figure on
a shared machine.  Also checks that the dump printed is
byte-identical to DUMPFILE when that is the image's `composefs-info dump`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(argv: list[str]) -> tuple[float, int, float]:
    """(wall seconds, peak RSS in KiB, CPU seconds) of one process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(argv)}")
    return wall, usage.ru_maxrss, usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dumpfile")
    parser.add_argument("image")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cfsc", default=str(Path(sys.executable).with_name("cfsc")))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out_image = os.path.join(tmp, "out.cfs")
        out_dump = os.path.join(tmp, "out.dump")
        commands = {
            "compile": [args.cfsc, "compile", args.dumpfile, "-o", out_image],
            "dump": [args.cfsc, "dump", args.image, "-o", out_dump],
            "dump --json": [args.cfsc, "dump", "--json", args.image, "-o", out_dump + ".json"],
        }
        results: dict[str, list[tuple[float, int, float]]] = {name: [] for name in commands}
        for _ in range(args.repeat):  # interleaved, so load changes hit every command alike
            for name, argv in commands.items():
                results[name].append(run(argv))
        same = Path(out_dump).read_bytes() == Path(args.dumpfile).read_bytes()
    medians = {}
    for name, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        rss = statistics.median(r[1] for r in runs)
        cpu = statistics.median(r[2] for r in runs)
        medians[name] = (wall, cpu)
        spread = f"{min(r[0] for r in runs):.2f}..{max(r[0] for r in runs):.2f}"
        print(f"{name:12} median {wall:6.2f} s wall ({spread} over {len(runs)} runs), {cpu:5.2f} s CPU, "
              f"peak RSS {rss / 1024:6.1f} MiB")
    print(f"dump / compile = {medians['dump'][0] / medians['compile'][0]:.2f} wall, "
          f"{medians['dump'][1] / medians['compile'][1]:.2f} CPU (target <= 2)")
    print(f"dump identical to {args.dumpfile}: {same}")


if __name__ == "__main__":
    main()
