#!/usr/bin/env python3
"""The FUSE server's Python cost per node and per LOOKUP, in process (no kernel, no mount).

    bench/fuse_node_bench.py IMAGE [--repeat N]

A request-bound mount test (`fuse_bench.py`'s stat, find) mixes this cost with the
/dev/fuse round trips and where the scheduler puts the server; this measures only the part
the server's Python decides: CPU microseconds to make one node (`ImageView._make`, and its
reference path `_make_reference` for comparison), and to answer one LOOKUP on a fresh view
(node made and encoded) and on a view that has the node already.  Every entry of IMAGE
reached from its root counts once; the best of N rounds is printed (CPU time, one thread).
"""

from __future__ import annotations

import argparse
import time

from cfsc.fuse import open_view
from cfsc.fuse.server import Server
from cfsc.store.backing import Store


def entries(view) -> list[tuple[int, bytes, int]]:
    """`(parent nodeid, name + NUL, nid)` of every entry under the root."""
    out = []
    stack = [(view.root_nid, 1)]
    while stack:
        dir_nid, nodeid = stack.pop()
        for name, nid in view.children(dir_nid):
            out.append((nodeid, name + b"\0", nid))
            node = view.node(nid)
            if node is not None and node.mode & 0o170000 == 0o040000:
                stack.append((nid, nid + 2))
    return out


def best(rounds: int, setup, run) -> float:
    """The least CPU seconds of `run(setup())` over `rounds`."""
    least = float("inf")
    for _ in range(rounds):
        state = setup()
        start = time.process_time()
        run(state)
        least = min(least, time.process_time() - start)
    return least


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("image")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    todo = entries(open_view(args.image))
    n = len(todo)

    def fresh_view():
        view = open_view(args.image)
        for nodeid, _name, _nid in todo:  # listings read beforehand: nodes alone are timed
            view.listing(view.root_nid if nodeid == 1 else nodeid - 2)
        return view

    def server(view):
        s = Server(-1, view, Store([]), threads=1)
        s._send = [].append  # replies kept, not written: no fd
        return s

    def make(method):
        def run(view):
            make = getattr(view, method)
            for _nodeid, _name, nid in todo:
                make(nid)
        return run

    def lookups(s):
        lookup = s._lookup
        for i, (nodeid, name, _nid) in enumerate(todo):
            lookup(i, nodeid, memoryview(name), 0)

    def warmed():
        s = server(fresh_view())
        lookups(s)
        return s

    print(f"{args.image}: {n} entries; CPU µs each, best of {args.repeat}")
    for label, setup, run in (("node (fast path)", fresh_view, make("_make")),
                              ("node (reference path)", fresh_view, make("_make_reference")),
                              ("LOOKUP, node made", lambda: server(fresh_view()), lookups),
                              ("LOOKUP, node cached", warmed, lookups)):
        print(f"  {label:24} {best(args.repeat, setup, run) / n * 1e6:6.2f}")


if __name__ == "__main__":
    main()
