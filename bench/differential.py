#!/usr/bin/env python3
"""Differential check: cfsc vs an upstream `mkcomposefs` binary on random and mutated dumpfiles.

Upstream 1.0.8 is not packaged for Debian 12, so this is a developer tool, not a test: point
it at a mkcomposefs you built yourself.

    python bench/differential.py --mkcomposefs /path/to/mkcomposefs --count 20000 --jobs 2

Each seed makes one case: a random dumpfile (tests/randomdump.py), a random dumpfile after
1-3 grammar mutations, or a mutated small dumpfile / mixed column (bench/fuzzing/dumpgrammar.py),
lenient or strict (CFS_PARSE_STRICT) by the seed; each case is compiled at the three
version settings.  Where upstream writes an image cfsc must write the same bytes; where
upstream refuses, cfsc must refuse.  The differences README.md lists are classified by
name (see `deliberate`); anything else is a mismatch, printed with its seed (`--keep DIR`
saves the input), and makes the exit status 1.  cfsc runs in process; `--jobs` worker
processes each run their own upstream processes.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from cfsc.base.errors import CfscError, DumpfileError  # noqa: E402
from cfsc.base.options import Options  # noqa: E402

from bench.fuzzing import dumpgrammar  # noqa: E402
from tests.helpers.randomdump import random_dump  # noqa: E402

VARIANTS = {"default": [], "v0": ["--min-version=0", "--max-version=0"], "v1": ["--min-version=1", "--max-version=1"]}
OPTIONS = {"default": {}, "v0": {"max_version": 0}, "v1": {"min_version": 1}}
KINDS = ("random", "mutated-random", "mutated-small")


def make_case(seed: int, size: int) -> tuple[str, bytes, bool]:
    """(kind, dumpfile, strict) for one seed."""
    rng = random.Random(seed)
    kind = KINDS[seed % 3]
    strict = rng.random() < 0.5
    if kind == "random":
        # One in five at full size (dozens to hundreds of lines); the rest small and quick.
        data = random_dump(seed, size if rng.random() < 0.2 else rng.randint(3, 10),
                           lenient=not strict and rng.random() < 0.5)
    elif kind == "mutated-random":
        data = dumpgrammar.mutate(random_dump(seed, rng.choice((3, 5, size // 4 or 1))), rng, 3)
    else:
        base = rng.choice(dumpgrammar.seeds()) if rng.random() < 0.5 else \
            dumpgrammar.column_mix(rng.randrange, rng.randrange(12), rng.randint(2, 8))
        data = dumpgrammar.mutate(base, rng, 4)
    return kind, data, strict


def cfsc_image(data: bytes, variant: str, strict: bool) -> bytes | CfscError:
    try:
        return dumpgrammar.compile_bytes(data, Options(strict=strict, **OPTIONS[variant]))
    except CfscError as e:
        return e


def upstream_image(tool: str, tmp: str, variant: str, strict: bool) -> bytes | str:
    """The image bytes, or "error: …" / "signal N" text."""
    src, dst = os.path.join(tmp, "in.dump"), os.path.join(tmp, "out.cfs")
    env = dict(os.environ)
    env.pop("CFS_PARSE_STRICT", None)
    if strict:
        env["CFS_PARSE_STRICT"] = "1"
    if os.path.exists(dst):
        os.unlink(dst)
    p = subprocess.run([tool, "--from-file", *VARIANTS[variant], src, dst], env=env, capture_output=True)
    if p.returncode < 0:
        return f"signal {-p.returncode}"
    if p.returncode:
        return "error: " + p.stderr.decode(errors="replace").strip()[:200]
    with open(dst, "rb") as f:
        return f.read()


def deliberate(error: CfscError) -> str | None:
    """The README difference a refusal of input upstream accepts falls under, or None."""
    if not isinstance(error, DumpfileError):
        return None
    what = error.what
    if error.field == "DIGEST" and ("64 hex digits" in what or "missing field DIGEST" in what):
        return "DIGEST with fewer than 64 hex digits on a regular file (upstream reads uninitialised memory)"
    if "(a line longer than" in what or "xattr section of more than" in what:
        return "line longer than the longest record the limits allow"
    if error.field == "SIZE" and "2^53" in what:
        return "external file SIZE above 2^53"
    return None


def run_seed(args: tuple) -> list[tuple]:
    """Every (kind, strict, variant, class, detail) of one seed, in a worker process."""
    seed, tool, size, tmp = args
    kind, data, strict = make_case(seed, size)
    with open(os.path.join(tmp, "in.dump"), "wb") as f:
        f.write(data)
    rows = []
    for variant in VARIANTS:
        ours = cfsc_image(data, variant, strict)
        theirs = upstream_image(tool, tmp, variant, strict)
        if isinstance(theirs, bytes):
            if isinstance(ours, bytes):
                if ours == theirs:
                    cls, detail = "same bytes", ""
                elif upstream_image(tool, tmp, variant, strict) != theirs:
                    cls, detail = "MISMATCH", "bytes differ; upstream's differ between two runs"
                else:
                    cls, detail = "MISMATCH", "bytes differ"
            else:
                why = deliberate(ours)
                cls, detail = (f"deliberate: {why}", "") if why else ("MISMATCH", f"only cfsc refuses: {ours}")
        elif theirs.startswith("signal"):
            cls, detail = ("upstream crashes, cfsc refuses", theirs) if not isinstance(ours, bytes) else \
                ("MISMATCH", f"upstream crashes ({theirs}), cfsc accepts")
        else:
            cls, detail = ("both refuse", "") if not isinstance(ours, bytes) else ("MISMATCH", f"only upstream refuses: {theirs}")
        rows.append((seed, kind, strict, variant, cls, detail))
    return rows


_tmp = None


def _init() -> None:
    global _tmp
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    _tmp = tempfile.mkdtemp(prefix="cfsc-diff-", dir=base)


def _run(args: tuple) -> list[tuple]:
    return run_seed((*args, _tmp))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mkcomposefs", default=os.environ.get("MKCOMPOSEFS", "mkcomposefs"))
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--size", type=int, default=20, help="random_dump size of the larger random cases")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--keep", help="directory to keep mismatching inputs in")
    args = ap.parse_args()
    if shutil.which(args.mkcomposefs) is None:
        print(f"no mkcomposefs at {args.mkcomposefs!r}", file=sys.stderr)
        return 2
    start = time.monotonic()
    counts: collections.Counter = collections.Counter()
    mismatches = 0
    work = ((seed, args.mkcomposefs, args.size) for seed in range(args.start, args.start + args.count))
    with multiprocessing.Pool(args.jobs, initializer=_init) as pool:
        for done, rows in enumerate(pool.imap_unordered(_run, work, chunksize=8), 1):
            if done % 1000 == 0:
                print(f"... {done} dumpfiles, {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
            for seed, kind, strict, variant, cls, detail in rows:
                counts[(kind, cls)] += 1
                if cls == "MISMATCH":
                    mismatches += 1
                    print(f"MISMATCH seed={seed} {kind} strict={strict} {variant}: {detail}", flush=True)
                    if args.keep:
                        os.makedirs(args.keep, exist_ok=True)
                        with open(os.path.join(args.keep, f"seed{seed}.dump"), "wb") as f:
                            f.write(make_case(seed, args.size)[1])
    elapsed = time.monotonic() - start
    print(f"{args.count} dumpfiles (seeds {args.start}..{args.start + args.count - 1}) x {len(VARIANTS)} version "
          f"settings = {sum(counts.values())} comparisons in {elapsed:.0f} s:")
    for kind in KINDS:
        for (k, cls), n in sorted(counts.items()):
            if k == kind:
                print(f"  {kind:15} {cls}: {n}")
    print(f"{mismatches} unexplained differences")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
