"""Every fuzz target, briefly: a seeded run in this process, and every saved regression input.

The run is a fixed number of cases (a target may set `TEST_CASES`; a few seconds' worth), so
it is deterministic; `bench/fuzz.py` runs the long campaigns with time and memory limits.
A regression file is an input that once crashed, hung or blew the memory budget: it must now
return or raise a `CfscError`.
"""

from __future__ import annotations

import os

import pytest

from bench.fuzzing import runner
from bench.fuzzing.mutators import generic

TARGETS = runner.discover()
DEFAULT_CASES = 300
SEED = 20261207


def _show(findings) -> str:
    return "\n\n".join(f"case {f.case}: {f.kind}: {f.signature}\n{f.detail}" for f in findings[:3])


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeded_run(name, tmp_path):
    target = TARGETS[name]
    findings = runner.run_inprocess(target, SEED, getattr(target, "TEST_CASES", DEFAULT_CASES), str(tmp_path))
    assert not findings, _show(findings)


REPLAYS = [(name, path) for name in sorted(TARGETS) for path in runner.regressions(name)]


@pytest.mark.parametrize("name,path", REPLAYS, ids=[f"{n}/{os.path.basename(p)[:12]}" for n, p in REPLAYS])
def test_regression(name, path, tmp_path):
    with open(path, "rb") as f:
        data = f.read()
    found = runner.run_one(TARGETS[name], data, str(tmp_path))
    assert found is None, f"{found.kind}: {found.signature}\n{found.detail}"


def test_cases_are_a_function_of_seed_and_number():
    """A finding is kept as its case number: making the case again gives the same input."""
    for target in TARGETS.values():
        seeds = list(target.seeds())
        assert seeds, f"{target.NAME}: no seeds"
        for case in (0, len(seeds), len(seeds) + 17):
            assert runner.case_input(target, seeds, 5, case) == runner.case_input(target, seeds, 5, case)


def test_generic_mutations_stay_bytes_and_small():
    import random

    rng = random.Random(3)
    data = bytes(range(256)) * 4
    for _ in range(2000):
        data = generic(data, rng) or b"\0"
        assert isinstance(data, bytes) and len(data) <= 1 << 20


def test_runner_reports_crashes_hangs_and_bombs(tmp_path):
    """The runner's own machinery, on a target made to fail each way: a Python crash, a hang
    the alarm interrupts, an allocation over the budget, a hard death (SIGSEGV-like), and a
    hang where the alarm cannot reach; the run finishes and says which case did what."""
    import signal
    import types

    def run(data, workdir):
        kind = data[:1]
        if kind == b"c":
            raise ValueError("crash")
        if kind == b"h":
            while True:
                pass
        if kind == b"m":
            bytearray(1 << 34)
        if kind == b"k":
            os.kill(os.getpid(), signal.SIGSEGV)
        if kind == b"b":  # blocked alarm, then stuck: only the parent's watchdog ends it
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
            while True:
                pass

    target = types.SimpleNamespace(NAME="selftest", seeds=lambda: [b"ok", b"c", b"h", b"m", b"k", b"b", b"ok"],
                                   mutate=lambda data, rng: data, run=run)
    stats = runner.fuzz(target, 7, time_limit=0.5, mem_limit_mb=1024, jobs=1, batch=10, save=False, grace=2)
    kinds = {f.case: f.kind for f in stats.findings}
    assert stats.cases == 7
    assert kinds == {1: "crash", 2: "hang", 3: "memory", 4: "crash", 5: "hang"}, stats.report()
    assert "SIGSEGV" in next(f.signature for f in stats.findings if f.case == 4)
