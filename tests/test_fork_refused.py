"""When the system refuses a new process or thread (a process limit: `ulimit -u`, a cgroup's
pids.max; no memory to copy a large process under strict overcommit).

The forked paths are speed-ups with a reference path beside them: a child that cannot be
forked means the work is done in this process (the dumpfile parser's column stage, the
image writer's second half), and the directory frontend hashes in its thread pool instead
of worker processes.  When no thread can be started either, the run stops with one line
saying so (exit 1: the environment, not the input), not a traceback.

Real limits: RLIMIT_NPROC, run as nobody (root is exempt), refuses every fork and thread.
A fork refused while threads still start cannot be made here without changing the whole
machine's overcommit policy, so that case replaces `os.fork` (the system-call wrapper) in
the compiling process with one that fails as fork(2) does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.fuzzing.targets.dumpfile_forked import big_dump
from tests.helpers.nobody import AS_NOBODY, nobody_dir
from tests.helpers.data import run_cfsc

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                 reason="needs root and setpriv to run the compile as nobody under a process limit"),
              pytest.mark.skipif(not hasattr(os, "fork") or len(os.sched_getaffinity(0)) < 2,
                                 reason="the forked paths need fork and a second processor")]

NO_NEW_TASKS = "import resource; resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))"
# The forked paths are taken only when a processor is idle: here always (the machine may be busy).
ALWAYS_FORK = "from cfsc.base import forked; forked.worthwhile = forked.usable"
FORK_FAILS = """
import errno, os
def fork():
    raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
os.fork = fork
"""


def cfsc_with(hook: str, *args: str, run_as: tuple = ()) -> subprocess.CompletedProcess:
    code = textwrap.dedent(hook) + "\nimport sys\nfrom cfsc.cli import main\nmain(sys.argv[1:])\n"
    return subprocess.run([*run_as, sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_a_large_dumpfile_compiles_in_one_process_when_no_child_can_be_forked():
    """Past FORK_MIN_BYTES and SPLIT_MIN_INODES: the parser's column stage and the writer's
    second half would each go to a child; with none to be had, the same image is written."""
    with nobody_dir("cfsc-nproc-") as base:
        dump = base / "big.dump"
        dump.write_bytes(big_dump(4 * 8192 + 100, 1))
        dump.chmod(0o644)
        want = base / "want.cfs"
        run_cfsc("compile", str(dump), "-o", str(want), check=True)
        p = cfsc_with(f"{ALWAYS_FORK}\n{NO_NEW_TASKS}", "compile", str(dump), "-o", str(base / "x.cfs"),
                      run_as=AS_NOBODY)
        assert p.returncode == 0, p.stderr
        assert (base / "x.cfs").read_bytes() == want.read_bytes()


@pytest.fixture
def tree():
    with nobody_dir("cfsc-nproc-") as base:
        src = base / "src"
        src.mkdir()
        for i in range(200):
            (src / f"f{i:03d}").write_bytes(b"%d " % i * (100 + 37 * i))
        os.system(f"chmod -R a+rX {src}")
        yield base, src


def test_a_directory_is_hashed_in_threads_when_no_worker_process_can_be_forked(tree):
    base, src = tree
    want = base / "want.cfs"
    run_cfsc("compile", str(src), "-o", str(want), check=True)
    store = base / "store"
    p = cfsc_with(FORK_FAILS, "compile", str(src), "-o", str(base / "x.cfs"), "--digest-store", str(store))
    assert p.returncode == 0, p.stderr
    assert (base / "x.cfs").read_bytes() == want.read_bytes()
    assert not [n for n in os.listdir(store) if n.startswith(".cfsc-tmp-")]


def test_no_thread_either_is_one_line_not_a_traceback(tree):
    base, src = tree
    p = cfsc_with(NO_NEW_TASKS, "compile", str(src), "-o", str(base / "x.cfs"), run_as=AS_NOBODY)
    assert p.returncode == 1, p.stderr
    assert p.stderr == ("error: cannot start a thread: a limit on processes and threads (ulimit -u, a cgroup's"
                        " pids.max) or on memory is reached\n")
    assert not (base / "x.cfs").exists()
