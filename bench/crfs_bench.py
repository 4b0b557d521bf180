#!/usr/bin/env python3
"""CRFS TOC frontend vs dumpfile frontend on the same synthetic tree: time and peak RSS.

Generates a TOC in the shape eStargz writes (tab-indented, `digest` + `offset` +
`chunkDigest` on files, `userName`/`groupName`, chunk entries for big files, hard links,
symlinks, a few xattrs) and the dumpfile of the very same tree, checks once that both compile
to the same image, then times, each in a fresh process (so peak RSS is per run):

* `frontend`: `load()` of the source alone (the "JSON stage" vs the dumpfile stage);
* `compile`:  the whole `compile_image` to an image file.

    python bench/crfs_bench.py --entries 1000000 --repeat 3 --dir /tmp/crfs-bench

Prints one line per (stage, format) with the median and all runs, then the ratios.  The
machine is shared: repeat and read medians; CPU time (user + system) is the steadier figure
when other work competes for the cores.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import subprocess
import sys
import time

import orjson

MTIME_BASE = 1_690_000_000


def generate(n: int, seed: int = 1):
    """Yield (toc_entries_for_one_item, dump_line) for a tree of about `n` TOC entries."""
    rng = random.Random(seed)
    dirs = [""]
    files: list[str] = []
    count = 0
    yield ([{"name": "./", "type": "dir", "mode": 0o755, "modtime": _rfc3339(MTIME_BASE)}],
           b"/ 0 40755 2 0 0 0 %d.0 - - -" % MTIME_BASE)
    d_index = 0
    while count < n:
        parent = dirs[d_index % len(dirs)] if len(dirs) > 1 and rng.random() < 0.9 else ""
        d_index += 1
        base = f"{parent}/" if parent else ""
        for i in range(rng.randint(5, 40)):
            kind = rng.random()
            mtime = MTIME_BASE + rng.randint(0, 1000)
            uid = 0 if rng.random() < 0.9 else 1000
            owner = {"uid": uid, "gid": uid, "userName": "root" if uid == 0 else "user",
                     "groupName": "root" if uid == 0 else "user"} if rng.random() < 0.05 else {"uid": uid, "gid": uid}
            if kind < 0.06:
                name = f"{base}d{d_index:x}_{i}"
                dirs.append(name)
                e = {"name": name + "/", "type": "dir", "modtime": _rfc3339(mtime), "mode": 0o755, **owner}
                yield [e], b"/%s 0 40755 2 %d %d 0 %d.0 - - -" % (name.encode(), uid, uid, mtime)
                count += 1
            elif kind < 0.86:
                name = f"{base}file_{d_index:x}_{i}.so"
                r = rng.random()
                size = (0 if r < 0.1 else rng.randint(1, 100_000) if r < 0.9 else rng.randint(1, 5_000_000)
                        if r < 0.995 else rng.randint(10_000_000, 40_000_000))
                h = hashlib.sha256(name.encode()).hexdigest()
                e = {"name": name, "type": "reg", "size": size, "modtime": _rfc3339(mtime),
                     "mode": 0o644 if rng.random() < 0.8 else 0o755, **owner,
                     "digest": "sha256:" + h, "offset": count * 300, "chunkDigest": "sha256:" + h}
                xattrs = b""
                if rng.random() < 0.05:
                    e["xattrs"] = {"security.capability": "AQAAAgAgAAAAAAAAAAAAAAAAAAA="}
                    xattrs = b" security.capability=\\x01\\x00\\x00\\x02\\x00\\x20\\x00\\x00" + b"\\x00" * 12
                entries = [e]
                if size > 10_000_000:
                    e["chunkSize"] = 4_000_000
                    for off in range(4_000_000, size, 4_000_000):
                        entries.append({"name": name, "type": "chunk", "offset": count * 300 + off,
                                        "chunkOffset": off, "chunkSize": min(4_000_000, size - off),
                                        "chunkDigest": "sha256:" + h})
                payload = (h[:2] + "/" + h[2:]).encode() if size else b"-"
                yield entries, b"/%s %d %o 1 %d %d 0 %d.0 %s - -%s" % (
                    name.encode(), size, 0o100000 | e["mode"], uid, uid, mtime, payload, xattrs)
                files.append(name)
                count += len(entries)
            elif kind < 0.98 or not files:
                name = f"{base}link_{d_index:x}_{i}"
                target = f"../lib/target_{rng.randint(0, 99999)}.so"
                e = {"name": name, "type": "symlink", "linkName": target, "modtime": _rfc3339(mtime),
                     "mode": 0o777, **owner}
                yield [e], b"/%s %d 120777 1 %d %d 0 %d.0 %s - -" % (name.encode(), len(target), uid, uid, mtime,
                                                                    target.encode())
                count += 1
            else:
                name = f"{base}hard_{d_index:x}_{i}"
                target = rng.choice(files)
                e = {"name": name, "type": "hardlink", "linkName": target, "mode": 0o644, **owner}
                yield [e], b"/%s 0 @100644 0 0 0 0 0.0 /%s - -" % (name.encode(), target.encode())
                count += 1
            if count >= n:
                break


def _rfc3339(sec: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sec))


def write_inputs(directory: str, n: int) -> tuple[str, str]:
    os.makedirs(directory, exist_ok=True)
    toc = os.path.join(directory, f"toc-{n}.json")
    dump = os.path.join(directory, f"tree-{n}.dump")
    if os.path.exists(toc) and os.path.exists(dump):
        return toc, dump
    entries = []
    lines = []
    for es, line in generate(n):
        entries.extend(es)
        lines.append(line)
    # Hard links in a dumpfile need NLINK on the target; recount from the link lines.
    body = orjson.dumps({"version": 1, "entries": entries}, option=orjson.OPT_INDENT_2)
    with open(toc + ".tmp", "wb") as f:
        f.write(body.replace(b"  ", b"\t"))  # eStargz indents with tabs (no string here has two spaces)
    os.replace(toc + ".tmp", toc)
    with open(dump + ".tmp", "wb") as f:
        f.write(b"\n".join(_fix_nlinks(lines)) + b"\n")
    os.replace(dump + ".tmp", dump)
    return toc, dump


def _fix_nlinks(lines: list[bytes]) -> list[bytes]:
    counts: dict[bytes, int] = {}
    for line in lines:
        fields = line.split(b" ", 9)
        if fields[2].startswith(b"@"):
            counts[fields[8]] = counts.get(fields[8], 1) + 1
    if not counts:
        return lines
    out = []
    for line in lines:
        fields = line.split(b" ", 4)
        if fields[0] in counts:
            fields[3] = b"%d" % counts[fields[0]]
            line = b" ".join(fields)
        out.append(line)
    return out


CHILD = """
import sys, time
from cfsc import build
from cfsc.base.options import Options
fmt, stage, src, out = sys.argv[1:5]
t = time.perf_counter()
c = time.process_time()
if stage == "frontend":
    with build.batch_allocation():
        tree = build.load([src], Options(), fmt)
else:
    build.compile_image([src], out, Options(), fmt)
elapsed = time.perf_counter() - t
# VmHWM: this process image's own peak (ru_maxrss keeps the parent's peak across fork+exec).
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(elapsed, time.process_time() - c, hwm)
"""


def run_child(fmt: str, stage: str, src: str, out: str) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak RSS in KiB) of one run in a fresh process."""
    p = subprocess.run([sys.executable, "-c", CHILD, fmt, stage, src, out], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{fmt} {stage} failed: {p.stderr}")
    elapsed, cpu, rss = p.stdout.split()
    return float(elapsed), float(cpu), int(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/crfs-bench")
    ap.add_argument("--stages", default="frontend,compile")
    args = ap.parse_args()
    t = time.perf_counter()
    toc, dump = write_inputs(args.dir, args.entries)
    print(f"inputs: {toc} ({os.path.getsize(toc) / 1e6:.0f} MB), {dump} ({os.path.getsize(dump) / 1e6:.0f} MB)"
          f" [{time.perf_counter() - t:.1f} s]")
    images = {}
    for fmt, src in (("crfs", toc), ("dump", dump)):
        out = os.path.join(args.dir, f"{fmt}.cfs")
        run_child(fmt, "compile", src, out)
        with open(out, "rb") as f:
            images[fmt] = hashlib.sha256(f.read()).hexdigest()
    same = images["crfs"] == images["dump"]
    print(f"same image from both sources: {same} ({images['crfs'][:16]}…)")
    results: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    for stage in args.stages.split(","):
        for _ in range(args.repeat):
            for fmt, src in (("crfs", toc), ("dump", dump)):
                results.setdefault((stage, fmt), []).append(
                    run_child(fmt, stage, src, os.path.join(args.dir, f"{fmt}.cfs")))
    medians = {}
    for (stage, fmt), runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        rss = statistics.median(r[2] for r in runs) / 1024
        medians[(stage, fmt)] = (wall, cpu)
        print(f"{stage:8} {fmt:4}: median wall {wall:6.2f} s, CPU {cpu:6.2f} s, peak RSS {rss:6.0f} MiB"
              f"   (wall/CPU runs: {', '.join(f'{r[0]:.2f}/{r[1]:.2f}' for r in runs)})")
    for stage in args.stages.split(","):
        (w1, c1), (w2, c2) = medians[(stage, "crfs")], medians[(stage, "dump")]
        print(f"{stage}: crfs / dump = {w1 / w2:.2f} wall, {c1 / c2:.2f} CPU")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
