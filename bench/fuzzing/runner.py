"""Run fuzz targets in budgeted child processes, so a hang or a bomb is a finding, not a stuck run.

A target is a module in `bench/fuzzing/targets/` with `NAME`, `seeds()`, `mutate(data, rng)`
and `run(data, workdir)`; `run` may return or raise `cfsc.base.errors.CfscError` (bad input,
reported), anything else is a crash.  Case `i` of seed `S` is a pure function of `(S, i)`: the
first cases are the seeds themselves, the others a seed mutated one to four times by an rng
seeded with `S/i`.  So a finding is kept as its case number while the run goes on, and a
case can always be made again, in any process.

Children (forked, one per job) run cases in batches under `RLIMIT_AS` (`--mem-limit`) with a
per-case `ITIMER_REAL` alarm (`--time-limit`); a `MemoryError` is an over-budget allocation,
the alarm a hang.  Each child publishes the case it is in and when it started in shared
memory, so when a child dies (a segfault, the OOM killer) or stops answering (stuck in C
code, where the alarm cannot interrupt it) the parent knows the culprit case, kills and
replaces the child, runs the culprit again alone to classify it, and re-queues the rest of
the batch.  Every finding is saved to `tests/data/fuzz-regressions/<target>/<sha1>.bin`.
"""

from __future__ import annotations

import faulthandler
import gc
import hashlib
import importlib
import multiprocessing
import os
import pkgutil
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from cfsc.base.errors import CfscError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REGRESSIONS = os.path.join(ROOT, "tests", "data", "fuzz-regressions")
TARGETS_PACKAGE = "bench.fuzzing.targets"
MUTATIONS_MAX = 4  # mutations stacked on a seed per case
SAVE_PER_SIGNATURE = 100  # inputs saved per distinct finding (all are counted; a bug hit thousands of times
# needs no thousand files)
KINDS = ("crash", "hang", "memory")


class CaseTimeout(BaseException):
    """The per-case alarm (a BaseException: code under test catching Exception must not eat it)."""


@dataclass
class Finding:
    case: int
    kind: str  # crash | hang | memory
    signature: str  # what dedupes findings: exception type and innermost frame
    detail: str  # the traceback, or what the parent saw
    data: bytes = b""


@dataclass
class Stats:
    target: str
    cases: int = 0
    seconds: float = 0.0
    peak_rss_kib: int = 0
    findings: list[Finding] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    restarts: int = 0

    def count(self, kind: str) -> int:
        return sum(1 for f in self.findings if f.kind == kind)

    def report(self) -> str:
        rate = self.cases / self.seconds if self.seconds else 0.0
        sigs = {(f.kind, f.signature) for f in self.findings}
        lines = [f"{self.target}: {self.cases} cases in {self.seconds:.1f} s ({rate:.0f} cases/s), "
                 f"crashes {self.count('crash')}, hangs {self.count('hang')}, over-budget allocations "
                 f"{self.count('memory')}, distinct {len(sigs)}, peak RSS {self.peak_rss_kib / 1024:.0f} MiB, "
                 f"child restarts {self.restarts}"]
        for kind, sig in sorted(sigs):
            cases = [f.case for f in self.findings if (f.kind, f.signature) == (kind, sig)]
            lines.append(f"  {kind}: {sig} (cases {', '.join(map(str, cases[:5]))}{' …' if len(cases) > 5 else ''})")
        if self.saved:
            lines.append(f"  saved {len(self.saved)} input(s) to {os.path.dirname(self.saved[0])}/: "
                         + ", ".join(os.path.basename(p) for p in self.saved[:5]) + (" …" if len(self.saved) > 5 else ""))
        return "\n".join(lines)


# -- targets and cases ------------------------------------------------------------------------


def discover() -> dict[str, object]:
    """Every target module in bench/fuzzing/targets/, by NAME."""
    package = importlib.import_module(TARGETS_PACKAGE)
    found = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{TARGETS_PACKAGE}.{info.name}")
        found[module.NAME] = module
    return found


def case_input(target, seeds: list[bytes], seed: int, case: int) -> bytes:
    """The input of case `case`: a seed as is, or a seed mutated by an rng seeded with (seed, case)."""
    if case < len(seeds):
        return seeds[case]
    rng = random.Random(f"{seed}/{case}")
    data = seeds[rng.randrange(len(seeds))]
    for _ in range(rng.randint(1, MUTATIONS_MAX)):
        data = target.mutate(data, rng)
    return data


def _signature(exc: BaseException) -> str:
    """Exception type plus the innermost frame in our code (where a fix would go)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/site-packages/" not in f.filename and "/lib/python" not in f.filename]
    frame = (ours or frames or [None])[-1]
    where = f"{os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}" if frame else "?"
    return f"{type(exc).__name__} at {where}"


def run_one(target, data: bytes, workdir: str) -> Finding | None:
    """Run one input; None when it returned or raised a CfscError."""
    try:
        target.run(data, workdir)
    except CfscError:
        return None
    except CaseTimeout:
        return Finding(-1, "hang", "time limit", "the per-case alarm fired")
    except MemoryError as e:
        return Finding(-1, "memory", _signature(e), "".join(traceback.format_exception(e)))
    except BaseException as e:  # noqa: B036 (SystemExit and friends from a target are crashes too)
        if isinstance(e, KeyboardInterrupt):
            raise
        return Finding(-1, "crash", _signature(e), "".join(traceback.format_exception(e)))
    finally:
        _clear(workdir)
    return None


def _clear(workdir: str) -> None:
    try:
        names = os.listdir(workdir)
    except FileNotFoundError:
        os.makedirs(workdir, exist_ok=True)
        return
    for name in names:
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


def run_inprocess(target, seed: int, cases: int, workdir: str, start: int = 0) -> list[Finding]:
    """Cases `start`…`start+cases-1` in this process, no limits (for tests)."""
    seeds = list(target.seeds())
    findings = []
    for case in range(start, start + cases):
        try:
            data = case_input(target, seeds, seed, case)
        except Exception as e:  # the target's mutate failed (as in `_child`)
            findings.append(Finding(case, "crash", "making the input: " + _signature(e),
                                    "".join(traceback.format_exception(e))))
            continue
        found = run_one(target, data, workdir)
        if found is not None:
            found.case = case
            found.data = data
            findings.append(found)
    return findings


# -- children -----------------------------------------------------------------------------------


def _scratch() -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="cfsc-fuzz-", dir=base)


def _alarm(_signum, _frame):
    raise CaseTimeout


def _child(conn, target, seeds, seed: int, mem_limit: int, time_limit: float, current, started,
           workdir: str) -> None:
    """A child's loop: batches in, findings and counts out, until told to stop."""
    faulthandler.disable()  # (pytest's would print a dying child's stack: the parent reports it)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # targets that drive the CLI print; the report goes through `conn`
        os.dup2(devnull, fd)
    if mem_limit:
        resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C
    while True:
        msg = conn.recv()
        if msg is None:
            return
        first, count, announce = msg
        for case in range(first, first + count):
            current.value = case
            started.value = time.monotonic()
            data = b""
            try:
                signal.setitimer(signal.ITIMER_REAL, time_limit)
                data = case_input(target, seeds, seed, case)
                if announce:  # (isolating a case that killed a child: the parent keeps its input)
                    conn.send(("input", data))
                found = run_one(target, data, workdir)
            except CaseTimeout:  # in mutate, or between run_one's handlers
                found = Finding(case, "hang", "time limit", "the per-case alarm fired")
            except MemoryError as e:
                found = Finding(case, "memory", _signature(e), "".join(traceback.format_exception(e)))
            except Exception as e:  # the target's mutate failed: its bug, still a finding
                found = Finding(case, "crash", "making the input: " + _signature(e),
                                "".join(traceback.format_exception(e)))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if found is not None:
                found.case = case
                found.data = data  # (b"" if making the input is what failed)
                conn.send(("finding", found))  # at once: the child may not live to the batch's end
                if found.kind != "crash":
                    # The interpreter may be left anywhere: report, and let a fresh child go on.
                    started.value = 0.0
                    conn.send(("done", case - first + 1, _maxrss(), False))
                    return
        started.value = 0.0
        # Cyclic garbage (a failed case's exception and its frames, holding buffers) waits for
        # a full collection: in a child running thousands of cases under RLIMIT_AS it took
        # the address space to the cap (with it: 131 MB of address space, without: 260 MB and growing).
        gc.collect()
        conn.send(("done", count, _maxrss(), True))


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


class _Worker:
    def __init__(self, ctx, target, seeds, seed, mem_limit, time_limit) -> None:
        self.current = ctx.Value("q", -1, lock=False)
        self.started = ctx.Value("d", 0.0, lock=False)
        self.conn, child_conn = ctx.Pipe()
        # The parent makes and removes the child's work directory: a killed child leaves none.
        self.workdir = _scratch()
        self.proc = ctx.Process(target=_child, args=(child_conn, target, seeds, seed, mem_limit, time_limit,
                                                     self.current, self.started, self.workdir), daemon=True)
        self.proc.start()
        child_conn.close()
        self.batch: tuple[int, int] | None = None

    def give(self, batch: tuple[int, int], announce: bool = False) -> None:
        self.batch = batch
        self.conn.send((*batch, announce))

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(5)
        self.kill()

    def kill(self) -> None:
        """End the child (if it still runs), close the pipe, remove its work directory."""
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join()
        self.conn.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _drain(worker: _Worker, stats: Stats) -> tuple[tuple | None, bool]:
    """Read what a child has sent: findings go to `stats`; (its batch-done message or None,
    whether the pipe is closed)."""
    while True:
        try:
            if not worker.conn.poll():
                return None, False
            tag, *rest = worker.conn.recv()
        except (EOFError, OSError):
            return None, True
        if tag == "finding":
            stats.findings.append(rest[0])
        elif tag == "done":
            return tuple(rest), False


def _classify_death(proc) -> tuple[str, str]:
    code = proc.exitcode
    if code is not None and code < 0:
        sig = signal.Signals(-code).name
        if -code == signal.SIGKILL:
            return "memory", f"child killed by {sig} (the OOM killer?)"
        return "crash", f"child died of {sig}"
    return "crash", f"child exited with status {code}"


def fuzz(target, cases: int, seed: int = 0, time_limit: float = 10.0, mem_limit_mb: int = 1024,
         jobs: int = 1, batch: int = 200, save: bool = True, progress=None, grace: float | None = None) -> Stats:
    """Run `cases` cases of `target` in `jobs` budgeted children; see the module docstring.
    `grace`: how long a case may go unanswered before its child is killed (default: twice the
    time limit and 5 s: the alarm should fire first)."""
    ctx = multiprocessing.get_context("fork")
    seeds = list(target.seeds())
    mem_limit = mem_limit_mb << 20
    stats = Stats(target.NAME)
    queue: list[tuple[int, int]] = [(i, min(batch, cases - i)) for i in range(0, cases, batch)]
    queue.reverse()  # popped from the end: lowest cases first
    workers: list[_Worker] = []
    t0 = time.monotonic()
    last_report = t0
    if grace is None:
        grace = time_limit * 2 + 5  # the alarm should fire first; this catches code it cannot interrupt

    def spawn() -> _Worker:
        return _Worker(ctx, target, seeds, seed, mem_limit, time_limit)

    def lost(worker: _Worker, kind: str, detail: str) -> None:
        """A child died or hung in its current case: record it, re-queue the rest of its batch."""
        case = worker.current.value
        first, count = worker.batch  # type: ignore[misc]
        if not first <= case < first + count:
            case = first
        stats.cases += case - first + 1
        rest = first + count - (case + 1)
        if rest > 0:
            queue.append((case + 1, rest))
        # Its input is made again in a budgeted child, never here: making it may be what failed.
        confirmed, data = _isolate(ctx, target, seeds, seed, case, mem_limit, time_limit, grace)
        if confirmed is not None:
            kind, detail = confirmed.kind, confirmed.detail
            signature = confirmed.signature
        else:
            signature = f"{detail} (not reproduced alone)"
        stats.findings.append(Finding(case, kind, signature, detail, data))
        stats.restarts += 1

    try:
        while queue or any(w.batch is not None for w in workers):
            while len(workers) < jobs and queue:
                workers.append(spawn())
            for w in workers:
                if w.batch is None and queue:
                    w.give(queue.pop())
            busy = [w for w in workers if w.batch is not None]
            ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=0.5)
            now = time.monotonic()
            for w in list(busy):
                done, eof = _drain(w, stats) if w.conn in ready else (None, False)
                if done is not None:
                    count_done, rss, alive = done
                    stats.cases += count_done
                    stats.peak_rss_kib = max(stats.peak_rss_kib, rss)
                    first, count = w.batch  # type: ignore[misc]
                    w.batch = None
                    if count_done < count:
                        queue.append((first + count_done, count - count_done))
                    if not alive:  # the child stopped after a hang or MemoryError
                        w.stop()
                        workers.remove(w)
                        stats.restarts += 1
                    continue
                if eof or not w.proc.is_alive():
                    _drain(w, stats)  # what it said before it died
                    w.proc.join()
                    kind, detail = _classify_death(w.proc)
                    w.kill()
                    workers.remove(w)
                    lost(w, kind, detail)
                    continue
                started = w.started.value
                if started and now - started > grace:
                    w.kill()
                    workers.remove(w)
                    lost(w, "hang", f"no answer for {grace:.0f} s (stuck where the alarm cannot reach)")
            if progress is not None and now - last_report >= 30:
                last_report = now
                progress(f"{target.NAME}: {stats.cases}/{cases} cases, {stats.cases / (now - t0):.0f}/s, "
                         f"{len(stats.findings)} findings")
    finally:
        for w in workers:
            w.stop()
        stats.seconds = time.monotonic() - t0
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    stats.peak_rss_kib = max(stats.peak_rss_kib, children)
    stats.findings.sort(key=lambda f: f.case)
    if save:
        stats.saved = save_findings(target.NAME, stats.findings)
    return stats


def _isolate(ctx, target, seeds, seed, case, mem_limit, time_limit, grace) -> tuple[Finding | None, bytes]:
    """Run one case alone in a fresh child: what it does there (None: it passes alone), and
    its input (b"" if making it failed)."""
    worker = _Worker(ctx, target, seeds, seed, mem_limit, time_limit)
    worker.give((case, 1), announce=True)
    deadline = time.monotonic() + grace
    found = None
    data = b""
    while True:
        ready = wait([worker.conn, worker.proc.sentinel], timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            worker.kill()
            return Finding(case, "hang", "stuck where the alarm cannot reach",
                           f"no answer for {grace:.0f} s when run alone"), data
        if worker.conn in ready:
            try:
                tag, *rest = worker.conn.recv()
            except (EOFError, OSError):
                tag = None
            if tag == "input":
                data = rest[0]
                continue
            if tag == "finding":
                found = rest[0]
                continue
            if tag == "done":
                worker.stop()
                return found, data
        worker.proc.join()
        kind, detail = _classify_death(worker.proc)
        worker.kill()
        return Finding(case, kind, detail, detail + " when run alone"), data


def save_findings(name: str, findings: list[Finding]) -> list[str]:
    """Write findings' inputs as regression files (a few per distinct signature)."""
    directory = os.path.join(REGRESSIONS, name)
    per_sig: dict[tuple[str, str], int] = {}
    saved = []
    for f in findings:
        key = (f.kind, f.signature)
        per_sig[key] = per_sig.get(key, 0) + 1
        if per_sig[key] > SAVE_PER_SIGNATURE or f.signature.startswith("making the input"):
            continue  # (the input does not exist: mutate failed making it)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, hashlib.sha1(f.data).hexdigest() + ".bin")
        if os.path.relpath(path, ROOT) in saved:
            continue
        if not os.path.exists(path):
            with open(path + ".tmp", "wb") as out:
                out.write(f.data)
            os.replace(path + ".tmp", path)
        saved.append(os.path.relpath(path, ROOT))
    return saved


def regressions(name: str) -> list[str]:
    """The saved regression inputs of a target."""
    directory = os.path.join(REGRESSIONS, name)
    try:
        return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".bin"))
    except FileNotFoundError:
        return []


def replay(target, path: str, mem_limit_mb: int, time_limit: float) -> Finding | None:
    """One saved input under the same limits as a fuzz run, in a child (for `--replay`)."""
    with open(path, "rb") as f:
        data = f.read()
    ctx = multiprocessing.get_context("fork")
    return _isolate(ctx, target, [data], 0, 0, mem_limit_mb << 20, time_limit, time_limit * 2 + 5)[0]


def main_print(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
