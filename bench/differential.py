#!/usr/bin/env python3
"""Differential check: cfsc vs an upstream `mkcomposefs` binary on random dumpfiles.

Upstream 1.0.8 is not packaged for Debian 12, so this is a developer tool, not a test: point
it at a mkcomposefs you built yourself.

    python bench/differential.py --mkcomposefs /path/to/mkcomposefs --count 300

Prints one line per mismatch (seed, version options) and a summary; exit 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from cfsc.base.errors import CfscError
from cfsc.base.options import Options
from cfsc.build import compile_tree
from cfsc.frontends import dumpfile
from randomdump import random_dump

VARIANTS = {"default": [], "v0": ["--min-version=0", "--max-version=0"], "v1": ["--min-version=1", "--max-version=1"]}


def cfsc_image(data: bytes, variant: str, strict: bool) -> bytes | str:
    opts = {"default": Options(), "v0": Options(max_version=0), "v1": Options(min_version=1)}[variant]
    opts.strict = strict
    try:
        return compile_tree(dumpfile.loads(data, opts), opts)
    except CfscError as e:
        return f"error: {e}"


def upstream_image(tool: str, data: bytes, variant: str, strict: bool) -> bytes | str:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.dump"), os.path.join(tmp, "out.cfs")
        with open(src, "wb") as f:
            f.write(data)
        env = dict(os.environ)
        if strict:
            env["CFS_PARSE_STRICT"] = "1"
        p = subprocess.run([tool, "--from-file", *VARIANTS[variant], src, dst], env=env, capture_output=True)
        if p.returncode:
            return "error: " + p.stderr.decode(errors="replace").strip()
        with open(dst, "rb") as f:
            return f.read()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mkcomposefs", default=os.environ.get("MKCOMPOSEFS", "mkcomposefs"))
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--size", type=int, default=60)
    ap.add_argument("--keep", help="directory to keep mismatching inputs in")
    args = ap.parse_args()
    bad = 0
    both_rejected = 0
    for seed in range(args.start, args.start + args.count):
        data = random_dump(seed, args.size)
        for variant in VARIANTS:
            for strict in (True, False):
                ours = cfsc_image(data, variant, strict)
                theirs = upstream_image(args.mkcomposefs, data, variant, strict)
                if isinstance(ours, str) and isinstance(theirs, str):
                    both_rejected += 1
                    continue
                if ours != theirs:
                    bad += 1
                    what = ours if isinstance(ours, str) else theirs if isinstance(theirs, str) else "bytes differ"
                    print(f"MISMATCH seed={seed} {variant} strict={strict}: {what}")
                    if args.keep:
                        os.makedirs(args.keep, exist_ok=True)
                        with open(os.path.join(args.keep, f"seed{seed}.dump"), "wb") as f:
                            f.write(data)
    print(f"{args.count} dumps x {len(VARIANTS)} versions x 2 modes: {bad} mismatches, {both_rejected} rejected by both")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
