"""Test data and the ways tests run cfsc: the conformance vectors, the installed command,
and in-process compiles of dumpfile text."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
DATA = TESTS / "data"
CONFORMANCE = DATA / "conformance"
SHARED = TESTS.parent.parent / "shared" / "conformance"
CFSC = str(Path(sys.executable).with_name("cfsc"))


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
