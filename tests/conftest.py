"""Shared fixtures: the conformance data, and running the installed `cfsc` command."""

from __future__ import annotations

import filecmp
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
DATA = TESTS / "data"
CONFORMANCE = DATA / "conformance"
SHARED = TESTS.parent.parent / "shared" / "conformance"
CFSC = str(Path(sys.executable).with_name("cfsc"))

sys.path.insert(0, str(TESTS))


def pytest_sessionstart(session):
    # The copy in tests/data must stay identical to ../shared/conformance when that exists.
    if SHARED.is_dir():
        cmp = filecmp.dircmp(SHARED, CONFORMANCE)
        stack = [cmp]
        while stack:
            c = stack.pop()
            bad = c.left_only + c.diff_files
            if bad:
                raise pytest.UsageError(f"tests/data/conformance differs from ../shared/conformance: {bad}")
            stack.extend(c.subdirs.values())


def read_input(name: str) -> bytes:
    data = (CONFORMANCE / "upstream" / name).read_bytes()
    return gzip.decompress(data) if name.endswith(".gz") else data


def cases() -> list[dict]:
    return json.loads((CONFORMANCE / "upstream" / "cases.json").read_text())["cases"]


def run_cfsc(*args: str, input: bytes | None = None, env: dict | None = None, cwd=None,
             check: bool = False) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.pop("CFS_PARSE_STRICT", None)
    if env:
        full_env.update(env)
    p = subprocess.run([CFSC, *args], input=input, capture_output=True, env=full_env, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"cfsc {' '.join(args)} failed ({p.returncode}): {p.stderr.decode()}")
    return p


@pytest.fixture
def cfsc():
    return run_cfsc


def image_of(dump: bytes, **options) -> bytes:
    """Compile dumpfile text in-process; keyword arguments are `Options` fields."""
    from cfsc.base.options import Options
    from cfsc.build import compile_tree
    from cfsc.frontends import dumpfile

    opts = Options(**options)
    return compile_tree(dumpfile.loads(dump, opts), opts)


def tree_of(dump: bytes, **options):
    from cfsc.base.options import Options
    from cfsc.frontends import dumpfile

    return dumpfile.loads(dump, Options(**options), "test.dump")
