#!/usr/bin/env python3
"""Time `cfsc compile ostree:REPO:REF` against `ostree checkout` + `cfsc compile CHECKOUT`.

    python bench/ostree_bench.py /work/ext/minbase [--repo /work/ext/ostree-bench/bare] [--repeat 5]

TREE is a real OS tree, e.g. the Debian minbase root that `bench/dir_bench.py --create` makes
(debootstrap).  The first run commits it (`ostree commit`, the `--mode` given, default bare)
into REPO as branch `bench`, leaving out devices, FIFOs and sockets, which OSTree refuses; later
runs reuse REPO.  Cases, each run as a fresh process, interleaved per repeat so that load from
other processes hits all alike; medians of wall time, CPU time (user + system: the steadier
figure on a shared machine) and peak RSS are printed:

    direct          cfsc compile ostree:REPO:bench -o IMAGE            (payloads: REPO objects)
    direct-verify   the same with --verify (every content checksum recomputed)
    direct-store    cfsc compile ostree:REPO:bench --digest-store EMPTY -o IMAGE
    checkout        ostree checkout REPO bench CO, then cfsc compile CO --use-epoch -o IMAGE
    checkout-store  the same with --digest-store EMPTY

A checkout case's figures are the sums of its two commands; removing the checkout and emptying
stores is not timed.  Also checks that `direct-store` and `checkout-store` wrote the same
image (the frontend's promise).  Archive repositories have no `direct`/`direct-verify` case
(their objects are compressed: a store is required).
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

from dump_bench import run  # (wall, peak RSS KiB, CPU) of one process (bench/ is on sys.path)

REF = "bench"


def make_repo(tree: Path, repo: Path, mode: str) -> None:
    """Commit TREE into a fresh REPO; a hard-linked copy without devices is what gets committed."""
    if shutil.which("ostree") is None:
        raise SystemExit("the ostree CLI is missing: apt-get install ostree")
    src = repo.with_name(repo.name + ".src")
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(repo, ignore_errors=True)
    subprocess.run(["cp", "-al", str(tree), str(src)], check=True)
    subprocess.run(["find", str(src), "!", "-type", "f", "!", "-type", "d", "!", "-type", "l", "-delete"], check=True)
    subprocess.run(["ostree", "init", f"--repo={repo}", f"--mode={mode}"], check=True)
    subprocess.run(["ostree", "commit", f"--repo={repo}", "-b", REF, f"--tree=dir={src}", "-s", "bench",
                    "--timestamp=2024-01-01T00:00:00Z"], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(src)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tree", type=Path, help="the OS tree to commit (e.g. /work/ext/minbase)")
    ap.add_argument("--repo", type=Path, default=Path("/work/ext/ostree-bench/bare"), help="the repository (made if missing)")
    ap.add_argument("--mode", default="bare", choices=("bare", "bare-user", "bare-user-only", "archive"))
    ap.add_argument("--cfsc", default=str(Path(sys.executable).with_name("cfsc")))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--scratch", default=None, help="where images, stores and checkouts go (default: a temp dir)")
    args = ap.parse_args()

    if not (args.repo / "config").is_file():
        if not args.tree.is_dir():
            raise SystemExit(f"{args.tree} is missing (bench/dir_bench.py --create makes a minbase tree)")
        args.repo.parent.mkdir(parents=True, exist_ok=True)
        make_repo(args.tree, args.repo, args.mode)
    mode = next(line.split("=", 1)[1].strip() for line in (args.repo / "config").read_text().splitlines()
                if line.startswith("mode="))
    objects = sum(1 for _d, _s, files in os.walk(args.repo / "objects") for f in files if f.endswith((".file", ".filez")))
    print(f"repo {args.repo} ({mode}): {objects} content objects; cpus {len(os.sched_getaffinity(0))};"
          f" load {os.getloadavg()[0]:.2f}")

    scratch = tempfile.mkdtemp(prefix="ostree-bench-", dir=args.scratch)
    source = f"ostree:{args.repo}:{REF}"
    checkout = os.path.join(scratch, "co")

    def image(case: str) -> str:
        return os.path.join(scratch, case + ".cfs")

    def store(case: str) -> str:
        return os.path.join(scratch, case + "-store")

    cases: dict[str, list[list[str]]] = {}
    if not mode.startswith("archive"):
        cases["direct"] = [[args.cfsc, "compile", source, "-o", image("direct")]]
        cases["direct-verify"] = [[args.cfsc, "compile", source, "--verify", "-o", image("direct-verify")]]
    cases["direct-store"] = [[args.cfsc, "compile", source, "--digest-store", store("direct-store"),
                              "-o", image("direct-store")]]
    co = ["ostree", "checkout", f"--repo={args.repo}", REF, checkout]
    cases["checkout"] = [co, [args.cfsc, "compile", checkout, "--use-epoch", "-o", image("checkout")]]
    cases["checkout-store"] = [co, [args.cfsc, "compile", checkout, "--use-epoch", "--digest-store",
                                    store("checkout-store"), "-o", image("checkout-store")]]
    results: dict[str, list[tuple[float, int, float]]] = {case: [] for case in cases}
    try:
        for _ in range(args.repeat):
            for case, commands in cases.items():
                shutil.rmtree(store(case), ignore_errors=True)
                shutil.rmtree(checkout, ignore_errors=True)
                subprocess.run(["sync"], check=True)
                runs = [run(argv) for argv in commands]
                total = (sum(r[0] for r in runs), max(r[1] for r in runs), sum(r[2] for r in runs))
                results[case].append(total)
                print(f"  {case:15} {total[0]:7.3f} s wall {total[2]:7.3f} s CPU {total[1] / 1024:7.1f} MiB", flush=True)
        same = Path(image("direct-store")).read_bytes() == Path(image("checkout-store")).read_bytes()
        print("medians:")
        for case, runs in results.items():
            wall = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[2] for r in runs)
            rss = statistics.median(r[1] for r in runs)
            print(f"  {case:15} {wall:7.3f} s wall {cpu:7.3f} s CPU {rss / 1024:7.1f} MiB  (runs: {len(runs)})")
        print(f"direct-store image identical to checkout-store image: {same}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
