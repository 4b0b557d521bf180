#!/usr/bin/env python3
"""cfsc against upstream `mkcomposefs`, side by side, on the workloads images come from.

    python bench/vs_mkcomposefs.py --mkcomposefs /path/to/mkcomposefs [--repeat 7] [--only dump64 usr]

Each workload runs both tools on the same input, interleaved run by run (so that load from
other processes hits both alike), and prints per run and then per workload the medians of wall
time, CPU time (user + sys of the process and its children) and peak RSS, and the ratio
cfsc / C of each.  After the runs it checks that both wrote the same image (and the same store).

    dump64       a real OS dumpfile of about 64k entries → image (`--dump FILE`, e.g. upstream's
                 cs9-x86_64-developer.dump test asset; without it one is made from this machine's
                 /usr: bin, include, sbin and share, with their fs-verity digests)
    dump250k     a synthetic 250,000-entry dumpfile → image (as bench/compile_bench.py makes it)
    dump1m       the same with 1,000,000 entries
    minbase-*    a Debian minbase directory → image (`--minbase DIR`; `--create` debootstraps it):
                 nostore; cold (into an empty `--digest-store`); warm (every object already there)
    usr          this machine's /usr → image, no store, page cache warm
    tar          a tar layer of the minbase tree → image and a new store: `cfsc compile LAYER`
                 against what C users run, `tar -x` into a directory and then mkcomposefs on it
                 (the images differ in hard links alone: a layer's links stay one inode in cfsc,
                 while mkcomposefs 1.0.8 makes each link of a directory its own inode; the stores
                 must be identical)

Inputs are made once under `--inputs` (default /var/tmp/cfsc-vs-mkcomposefs) and reused; keep
them out of the repository.  The C tool reads the directory with one thread per core
(`--threads`, its default); cfsc uses its defaults as well.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from compile_bench import synthetic_dump  # bench/ is on sys.path
from dir_bench import create_tree, listing
from tar_bench import EXTRACT, run

CFSC = str(Path(sys.executable).with_name("cfsc"))
WORKLOADS = ("dump64", "dump250k", "dump1m", "minbase-nostore", "minbase-cold", "minbase-warm", "usr", "tar")


@dataclass
class Workload:
    name: str
    cfsc: list[str]
    c: list[str]
    store: dict[str, str] = field(default_factory=dict)  # tool -> store dir (cold/warm/tar)
    warm: bool = False  # stores filled before timing, and kept
    scratch_dirs: list[str] = field(default_factory=list)  # emptied before every run


def make_inputs(args: argparse.Namespace) -> dict[str, str]:
    inputs = Path(args.inputs)
    inputs.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    wanted = set(args.only)
    if "dump64" in wanted:
        dump = args.dump or str(inputs / "usr64k.dump")
        if not os.path.exists(dump):
            print(f"making {dump} from /usr (bin, include, sbin, share)", flush=True)
            filters = [a for d in ("bin", "include", "sbin", "share") for a in ("--filter", d)]
            subprocess.run([args.cfsc, "dump", "/usr", *filters, "-o", dump], check=True)
        paths["dump64"] = dump
    for name, entries in (("dump250k", 250_000), ("dump1m", 1_000_000)):
        if name in wanted:
            dump = str(inputs / f"synthetic-{entries}.dump")
            if not os.path.exists(dump):
                synthetic_dump(dump, entries)
            paths[name] = dump
    if wanted & {"minbase-nostore", "minbase-cold", "minbase-warm", "tar"}:
        tree = Path(args.minbase)
        if not tree.is_dir():
            if not args.create:
                raise SystemExit(f"{tree} is missing: pass --create to debootstrap it (or --minbase DIR)")
            create_tree(tree)
        paths["minbase"] = str(tree)
        if "tar" in wanted:
            layer = inputs / "minbase.tar"
            if not layer.exists():
                subprocess.run(["tar", "-C", str(tree), "--format=posix", "--xattrs", "--xattrs-include=*",
                                "-cf", f"{layer}.tmp", "."], check=True)
                os.rename(f"{layer}.tmp", layer)
            paths["tar"] = str(layer)
    return paths


def workloads(args: argparse.Namespace, paths: dict[str, str], scratch: str) -> list[Workload]:
    out = []

    def image(tool: str) -> str:
        return os.path.join(scratch, f"{tool}.cfs")

    def store(tool: str) -> str:
        return os.path.join(scratch, f"{tool}-store")

    for name in args.only:
        if name.startswith("dump"):
            dump = paths[name]
            out.append(Workload(name, [args.cfsc, "compile", dump, "-o", image("cfsc")],
                                [args.mkcomposefs, "--from-file", dump, image("c")]))
        elif name.startswith("minbase-") or name == "usr":
            tree = paths["minbase"] if name != "usr" else args.usr
            w = Workload(name, [args.cfsc, "compile", tree, "-o", image("cfsc")], [args.mkcomposefs, tree, image("c")])
            if name in ("minbase-cold", "minbase-warm"):
                w.cfsc += ["--digest-store", store("cfsc")]
                w.c[1:1] = [f"--digest-store={store('c')}"]
                w.store = {"cfsc": store("cfsc"), "c": store("c")}
                w.warm = name == "minbase-warm"
            out.append(w)
        elif name == "tar":
            extracted = os.path.join(scratch, "extracted")
            c_pipeline = (f"mkdir {extracted} && {' '.join(EXTRACT)} -xf {paths['tar']} -C {extracted} && "
                          f"{args.mkcomposefs} --digest-store={store('c')} {extracted} {image('c')}")
            out.append(Workload(name, [args.cfsc, "compile", paths["tar"], "-o", image("cfsc"),
                                       "--digest-store", store("cfsc")],
                                ["sh", "-c", c_pipeline], store={"cfsc": store("cfsc"), "c": store("c")},
                                scratch_dirs=[extracted]))
    return out


def measure(w: Workload, repeat: int, scratch: str) -> dict[str, list[tuple[float, float, int]]]:
    results: dict[str, list[tuple[float, float, int]]] = {"cfsc": [], "c": []}
    if w.warm:  # each tool fills its own store once, untimed
        for tool, cmd in (("cfsc", w.cfsc), ("c", w.c)):
            shutil.rmtree(w.store[tool], ignore_errors=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    for _ in range(repeat):
        for tool, cmd in (("cfsc", w.cfsc), ("c", w.c)):
            Path(scratch, f"{tool}.cfs").unlink(missing_ok=True)
            if not w.warm and tool in w.store:
                shutil.rmtree(w.store[tool], ignore_errors=True)
            for d in w.scratch_dirs:
                shutil.rmtree(d, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            wall, cpu, rss = run(cmd)
            results[tool].append((wall, cpu, rss))
            print(f"  {w.name:16} {tool:5} {wall:8.3f} s wall {cpu:8.3f} s cpu {rss / 1024:8.1f} MiB", flush=True)
    return results


def same_output(w: Workload, scratch: str) -> str:
    a, b = Path(scratch, "cfsc.cfs").read_bytes(), Path(scratch, "c.cfs").read_bytes()
    verdict = "images identical" if a == b else "images DIFFERENT"
    if w.name == "tar" and a != b:  # only hard links may differ: ask `cfsc diff`
        report = json.loads(subprocess.run([w.cfsc[0], "diff", "--json", f"{scratch}/cfsc.cfs", f"{scratch}/c.cfs"],
                                           capture_output=True, check=False).stdout)
        if set(report["summary"]["attributes"]) <= {"hardlinks", "nlink"} and report["summary"]["changed"] \
                == len(report["changes"]) and not report["summary"]["added"] + report["summary"]["removed"]:
            verdict = "images differ in hard links alone (see the docstring)"
    if w.store:
        same = listing(w.store["cfsc"]) == listing(w.store["c"])
        verdict += ", stores " + ("identical" if same else "DIFFERENT")
    return verdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mkcomposefs", required=True, help="the upstream mkcomposefs binary")
    ap.add_argument("--cfsc", default=CFSC, help="the cfsc command (default: the one beside this Python)")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each tool per workload (default 5)")
    ap.add_argument("--only", nargs="+", choices=WORKLOADS, default=list(WORKLOADS), metavar="WORKLOAD",
                    help=f"workloads to run (default: all of {', '.join(WORKLOADS)})")
    ap.add_argument("--dump", help="the ~64k-entry OS dumpfile (default: made from /usr)")
    ap.add_argument("--minbase", default="/var/tmp/minbase", help="the Debian minbase tree")
    ap.add_argument("--create", action="store_true", help="debootstrap the minbase tree if it is missing")
    ap.add_argument("--usr", default="/usr", help="the tree of the `usr` workload")
    ap.add_argument("--inputs", default="/var/tmp/cfsc-vs-mkcomposefs", help="where made inputs are kept")
    ap.add_argument("--scratch", help="where images and stores go (default: a temp dir under /var/tmp)")
    args = ap.parse_args()
    args.only = [w for w in WORKLOADS if w in args.only]

    paths = make_inputs(args)
    scratch = tempfile.mkdtemp(prefix="vs-mkcomposefs-", dir=args.scratch or "/var/tmp")
    print(f"cpus {len(os.sched_getaffinity(0))}; load {os.getloadavg()[0]:.2f}; repeat {args.repeat}", flush=True)
    summary = []
    try:
        for w in workloads(args, paths, scratch):
            results = measure(w, args.repeat, scratch)
            med = {tool: [statistics.median(r[i] for r in runs) for i in range(3)] for tool, runs in results.items()}
            summary.append((w.name, med, same_output(w, scratch)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nmedians of {args.repeat} interleaved runs (ratio = cfsc / C):")
    print(f"  {'workload':16} {'cfsc wall':>10} {'C wall':>9} {'ratio':>6}  {'cfsc cpu':>9} {'C cpu':>8} {'ratio':>6}"
          f"  {'cfsc RSS':>9} {'C RSS':>9} {'ratio':>6}")
    for name, med, verdict in summary:
        (aw, ac, ar), (bw, bc, br) = med["cfsc"], med["c"]
        print(f"  {name:16} {aw:9.3f}s {bw:8.3f}s {aw / bw:6.2f}  {ac:8.3f}s {bc:7.3f}s {ac / bc:6.2f}"
              f"  {ar / 1024:7.1f}Mi {br / 1024:7.1f}Mi {ar / br:6.2f}  {verdict}")


if __name__ == "__main__":
    main()
