"""Start-up: the verbs `cfsc.cli.direct` runs (`compile SRC -o IMAGE`, the `mkcomposefs`
drop-in) import only what they use.

An everyday image compiles in a quarter of a second with the C tool, so tens of ms of imports
matter.  Each case runs the verb in a fresh interpreter and lists the modules it loaded: the
CLI framework (typer, click), `dataclasses` and `inspect`, `typing`, `concurrent.futures` and
`logging`, `threading`, hashlib (nothing is hashed without --print-digest), the decompressors
(the input is not compressed) and ctypes must not be among them.  No timings: the machine's
speed is not asserted, the work that costs it is.
"""

from __future__ import annotations

import lzma
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.data import CFSC

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "examples" / "demo.dump")

# Loaded by no direct verb (the directory frontend's thread pool and openat2 aside, below).
NEVER = ("typer", "click", "dataclasses", "inspect", "typing", "signal")  # (`_signal` serves)
# Loaded only when the source or the flags need them.
FOR_DUMPFILES = NEVER + ("ast", "tokenize", "concurrent.futures", "logging", "threading", "hashlib", "_hashlib", "gzip", "lzma",
                         "zlib", "ctypes", "cfsc.store.objects", "cfsc.backends.erofs.reader")


def loaded_by(args: list[str]) -> tuple[int, set[str], str]:
    """(exit code, modules loaded, stderr) of `cfsc ARGS` run in a fresh interpreter."""
    code = ("import sys\nfrom cfsc.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    code = e.code\nelse:\n    code = 0\nprint(' '.join(sorted(sys.modules)))\nsys.exit(code)")
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    return p.returncode, set(p.stdout.split()), p.stderr


def unwanted(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if m in names or m.split(".")[0] in names or m.startswith(names))


@pytest.mark.parametrize("args", [
    ["compile", DEMO, "-o", "{out}"],
    ["mkcomposefs", "--from-file", DEMO, "{out}"],
    ["mkcomposefs", "--from-file", "--max-version=0", DEMO, "{out}"],
], ids=["compile", "mkcomposefs", "mkcomposefs-v0"])
def test_compiling_a_dumpfile_imports_only_what_it_uses(tmp_path, args):
    out = str(tmp_path / "demo.cfs")
    code, modules, stderr = loaded_by([a.format(out=out) for a in args])
    assert code == 0, stderr
    assert Path(out).stat().st_size > 0
    assert unwanted(modules, FOR_DUMPFILES) == []
    assert "cfsc.frontends.dumpfile" in modules and "cfsc.backends.erofs.writer" in modules


def test_print_digest_imports_hashlib_and_no_more(tmp_path):
    code, modules, stderr = loaded_by(["compile", DEMO, "--print-digest-only"])
    assert code == 0, stderr
    assert "hashlib" in modules
    assert unwanted(modules, tuple(m for m in FOR_DUMPFILES if m not in ("hashlib", "_hashlib"))) == []


@pytest.mark.parametrize("store", [[], ["--digest-store", "{store}", "--threads", "2", "--hash=sha256"]],
                         ids=["no-store", "store"])
def test_compiling_a_directory_loads_no_cli_framework_nor_dataclasses(tmp_path, store):
    """Hashing in worker processes (the default in a process without other threads), it loads
    no thread pool either (concurrent.futures brings logging and with it tokenize), nor the
    `socket` module (its enums and `selectors`: the workers use `_socket` alone), nor `re`.  Into a
    store too: `--digest-store`, `--threads` and `--hash` need no typer."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "file").write_bytes(b"x" * 100)
    args = ["compile", str(tmp_path / "src"), "-o", str(tmp_path / "d.cfs")]
    code, modules, stderr = loaded_by(args + [a.format(store=tmp_path / "store") for a in store])
    assert code == 0, stderr
    assert unwanted(modules, NEVER + ("concurrent.futures", "logging", "tokenize", "socket", "selectors")) == []
    assert {"re", "enum"} & modules == set()  # no pattern on this path: `re` and its enums are ~4 ms


def test_the_installed_command_adds_no_import(tmp_path):
    """The `cfsc` command itself (the script installed beside this Python) imports nothing
    before `cfsc.cli`: an entry point's generated wrapper imported `re` and its enums on every
    run, which the case above never saw."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "file").write_bytes(b"x" * 100)
    p = subprocess.run([sys.executable, "-X", "importtime", CFSC, "compile", str(tmp_path / "src"),
                        "-o", str(tmp_path / "d.cfs")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    imports = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    assert "cfsc.cli" in imports
    assert {"re", "enum"} & imports == set()


def test_directory_workers_inherit_hashlib_from_the_main_process(tmp_path):
    """hashlib (and OpenSSL's set-up) is imported once, before the workers are forked, not
    again in each of them before its first digest.  `-X importtime` lines come from every
    process: the workers write to the same stderr."""
    (tmp_path / "src").mkdir()
    for i in range(40):
        (tmp_path / "src" / f"f{i}").write_bytes(b"x" * (100 + i))
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "cfsc", "compile", str(tmp_path / "src"),
                        "--threads", "2", "-o", str(tmp_path / "d.cfs")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    imports = [line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")]
    assert imports.count("_hashlib") == 1


def test_xz_errors_are_read_errors_with_lzma_imported_late(tmp_path):
    """lzma is imported for xz input only; a corrupt stream past the head is still a read
    error of that input (`streams._read_errors`), not a failure of the compiler."""
    text = b"/ 4096 40755 2 0 0 0 0.0 - - -\n" + b"".join(b"/f%d 10 100644 1 0 0 0 0.0 - - -\n" % i
                                                         for i in range(60000))
    data = bytearray(lzma.compress(text))
    data[-200] ^= 0xFF  # inside the last block: the head (format detection) decompresses fine
    bad = tmp_path / "bad.dump.xz"
    bad.write_bytes(data)
    code, modules, stderr = loaded_by(["compile", str(bad), "-o", str(tmp_path / "bad.cfs")])
    assert (code, stderr) == (2, f"error: {bad}: cannot read: Corrupt input data\n")
    assert "lzma" in modules and not (tmp_path / "bad.cfs").exists()


def test_fs_verity_algorithms_get_their_hashlib_constructor_on_first_use():
    import hashlib

    from cfsc.base.fsverity import ALGORITHMS

    for name, algorithm in ALGORITHMS.items():
        assert algorithm.new is getattr(hashlib, name)
        with pytest.raises(AttributeError):
            algorithm.nwe  # noqa: B018 (only `new` is made on first use)
