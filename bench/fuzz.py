#!/usr/bin/env python3
"""Fuzz cfsc's parsers: `bench/fuzz.py TARGET|all --cases N --seed S --time-limit SEC --mem-limit MB`.

Targets are the modules in bench/fuzzing/targets/ (`--list`).  Cases run in child processes
under an address-space limit and a per-case alarm (bench/fuzzing/runner.py); crashes, hangs
and over-budget allocations are printed and their inputs saved to
tests/data/fuzz-regressions/<target>/<sha1>.bin.  `--replay FILE…` runs saved inputs under the
same limits and prints what each does.  Exit status 1 if anything was found.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.fuzzing import runner  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", help="a target's NAME, or 'all'")
    parser.add_argument("--cases", type=int, default=10000, help="cases per target (default 10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=10.0, help="seconds per case (default 10)")
    parser.add_argument("--mem-limit", type=int, default=1024, help="MiB of address space per child (default 1024)")
    parser.add_argument("--jobs", type=int, default=1, help="child processes (default 1)")
    parser.add_argument("--batch", type=int, default=200, help="cases per message to a child (default 200)")
    parser.add_argument("--no-save", action="store_true", help="do not write regression files")
    parser.add_argument("--list", action="store_true", help="list the targets")
    parser.add_argument("--replay", nargs="+", metavar="FILE", help="run saved inputs of TARGET")
    args = parser.parse_args(argv)
    targets = runner.discover()
    if args.list:
        for name, module in targets.items():
            print(f"{name}\t{(module.__doc__ or '').strip().splitlines()[0] if module.__doc__ else ''}")
        return 0
    if args.target is None:
        parser.error("give a TARGET (or 'all', or --list)")
    if args.target != "all" and args.target not in targets:
        parser.error(f"unknown target {args.target!r}: expected one of {', '.join(targets)} or all")
    chosen = list(targets.values()) if args.target == "all" else [targets[args.target]]
    if args.replay:
        if len(chosen) != 1:
            parser.error("--replay needs one TARGET")
        bad = 0
        for path in args.replay:
            found = runner.replay(chosen[0], path, args.mem_limit, args.time_limit)
            if found is None:
                print(f"{path}: ok")
            else:
                bad += 1
                print(f"{path}: {found.kind}: {found.signature}\n{found.detail}")
        return 1 if bad else 0
    status = 0
    for module in chosen:
        stats = runner.fuzz(module, args.cases, args.seed, args.time_limit, args.mem_limit, args.jobs,
                            args.batch, save=not args.no_save, progress=runner.main_print)
        print(stats.report(), flush=True)
        if stats.findings:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
