#!/usr/bin/env python3
"""Time `cfsc diff` on two large dumpfiles that differ in 10 files; compare with `cfsc compile`.

    python bench/diff_bench.py                      # 1M entries, 3 runs each
    python bench/diff_bench.py --entries 250000 --repeat 5

The trees are `compile_bench`'s synthetic ones (directories of 1000 external files with SELinux
labels); B is A with 10 files changed, spread over the tree (mode, digest, an added xattr).
Runs, each repeated: `cfsc compile A --print-digest-only` (the yardstick); `cfsc diff A B
--stat` on the two dumpfiles (the lines they do not share: `cfsc.frontends.dumpfile_delta`); `cfsc diff A
B.cfs` (a dumpfile against the image of B: both trees loaded and fingerprinted, B in a worker
process), the same with `--threads 1` (one process), and two images (`A.cfs B.cfs`, with the
reasons their bytes differ).  Wall time, CPU time (children included) and peak RSS of the
whole process tree (sampled from /proc every 20 ms: the worker is a child of `cfsc`) per run,
then medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compile_bench import synthetic_dump  # noqa: E402


def changed_copy(src: str, dst: str, changes: int = 10) -> list[bytes]:
    """Copy a synthetic dump with `changes` regular files altered; returns their paths."""
    with open(src, "rb") as f:
        lines = f.read().split(b"\n")
    files = [i for i, line in enumerate(lines) if line.split(b" ", 3)[2:3] == [b"100644"]]
    step = len(files) // changes
    paths = []
    for k in range(changes):
        i = files[k * step + step // 2]
        fields = lines[i].split(b" ")
        if k % 3 == 0:
            fields[2] = b"100600"
        elif k % 3 == 1:
            fields[10] = b"%064x" % k
        else:
            fields.append(b"user.changed=%d" % k)
        lines[i] = b" ".join(fields)
        paths.append(fields[0])
    with open(dst, "wb") as f:
        f.write(b"\n".join(lines))
    return paths


def _tree_rss(pid: int) -> int:
    """KiB resident in `pid` and its descendants."""
    total = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


def timed(cmd: list[str], ok: tuple[int, ...] = (0,)) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (process and children) and peak RSS (KiB) of a process tree."""
    peak = [0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], _tree_rss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    code = os.waitstatus_to_exitcode(status)
    if code not in ok:
        raise SystemExit(f"{' '.join(cmd)} exited {code}: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
    # wait4 reports the child's usage plus that of the children it reaped (the diff's worker)
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, max(peak[0], usage.ru_maxrss)


def run(label: str, cmd: list[str], repeat: int, ok: tuple[int, ...] = (0,)) -> float:
    walls = []
    for _ in range(repeat):
        wall, cpu, rss = timed(cmd, ok)
        walls.append(wall)
        print(f"  {label:18s} {wall:7.2f} s wall {cpu:7.2f} s cpu {rss / 1024:8.0f} MiB peak RSS", flush=True)
    median = statistics.median(walls)
    print(f"  {label:18s} median {median:.2f} s")
    return median


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cfsc", default=shutil.which("cfsc") or os.path.join(os.path.dirname(sys.executable), "cfsc"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cfsc-diff-bench-") as tmp:
        a, b = os.path.join(tmp, "a.dump"), os.path.join(tmp, "b.dump")
        synthetic_dump(a, args.entries)
        changed = changed_copy(a, b)
        print(f"{args.entries} entries, {os.path.getsize(a) / 1e6:.0f} MB of dumpfile each, {len(changed)} files differ; "
              f"{len(os.sched_getaffinity(0))} CPUs, load average {os.getloadavg()[0]:.1f}")
        out = subprocess.run([args.cfsc, "diff", a, b], capture_output=True)
        reported = [line for line in out.stdout.splitlines() if line.startswith(b"~ ")]
        assert out.returncode == 1 and [line[2:] for line in reported] == sorted(changed), out.stdout[-2000:]
        a_image, b_image = a + ".cfs", b + ".cfs"
        for dump, image in ((a, a_image), (b, b_image)):
            subprocess.run([args.cfsc, "compile", dump, "-o", image], check=True)
        times = {}
        times["compile"] = run("compile A", [args.cfsc, "compile", a, "--print-digest-only"], args.repeat)
        times["dumps"] = run("diff A B", [args.cfsc, "diff", a, b, "--stat"], args.repeat, ok=(1,))
        times["same"] = run("diff A A", [args.cfsc, "diff", a, a, "--stat"], args.repeat)
        times["mixed"] = run("diff A B.cfs", [args.cfsc, "diff", a, b_image, "--stat"], args.repeat, ok=(1,))
        times["mixed1"] = run("diff A B.cfs -j1", [args.cfsc, "diff", "--threads", "1", a, b_image, "--stat"],
                              args.repeat, ok=(1,))
        times["images"] = run("diff A.cfs B.cfs", [args.cfsc, "diff", a_image, b_image, "--stat"], args.repeat, ok=(1,))
        base = times.pop("compile")
        print("  relative to compile: " + ", ".join(f"{k} {v / base:.2f}" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
