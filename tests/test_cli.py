"""The command line: compile options, atomic outputs, and the mkcomposefs drop-in syntax."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from cfsc.store.locks import LOCK_NAME

from tests.helpers.data import CONFORMANCE, image_of, read_input

SPECIAL = read_input("special.dump")
SPECIAL_V0 = (CONFORMANCE / "upstream" / "special.dump.sha256").read_text().split()[0]


def test_print_digest_and_digest_only(cfsc, tmp_path):
    src = tmp_path / "special.dump"
    src.write_bytes(SPECIAL)
    out = tmp_path / "x.cfs"
    p = cfsc("compile", str(src), "-o", str(out), "--max-version", "0", "--print-digest", check=True)
    digest = p.stdout.decode().strip()
    assert len(digest) == 64
    assert hashlib.sha256(out.read_bytes()).hexdigest() == SPECIAL_V0
    p = cfsc("compile", str(src), "--max-version", "0", "--print-digest-only", check=True)
    assert p.stdout.decode().strip() == digest
    p = cfsc("measure", str(out), check=True)
    assert p.stdout.decode().split()[0] == "sha256:" + digest


def test_failed_compile_keeps_an_existing_output(cfsc, tmp_path):
    out = tmp_path / "x.cfs"
    out.write_bytes(b"previous")
    bad = tmp_path / "bad.dump"
    bad.write_bytes(b"/ 0 40755 2 0 0 0 0.0 - - -\n/x 0 0 1 0 0 0 0.0 - - -\n")
    p = cfsc("compile", str(bad), "-o", str(out))
    assert p.returncode == 2
    assert out.read_bytes() == b"previous"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["bad.dump", "x.cfs"]


def test_traceback_flag(cfsc, tmp_path):
    bad = tmp_path / "bad.dump"
    bad.write_bytes(b"nonsense\n")
    p = cfsc("compile", "--from", "dump", str(bad), "-o", str(tmp_path / "x"))
    assert p.returncode == 2 and "Traceback" not in p.stderr.decode()
    p = cfsc("--traceback", "compile", "--from", "dump", str(bad), "-o", str(tmp_path / "x"))
    assert p.returncode == 2 and "Traceback" in p.stderr.decode()


def test_undetectable_source(cfsc, tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00\x01junk")
    p = cfsc("compile", str(junk), "-o", str(tmp_path / "x"))
    assert p.returncode == 2 and "--from" in p.stderr.decode()


def test_mkcomposefs_dropin_syntax(cfsc, tmp_path):
    src = tmp_path / "special.dump"
    src.write_bytes(SPECIAL)
    expected = image_of(SPECIAL, max_version=0, strict=True)
    variants = [
        ["--from-file", "--min-version=0", "--max-version=0", str(src), "OUT"],
        ["--from-file", "--min-version", "0", "--max-version", "0", str(src), "OUT"],
        ["--from", "--max-v=0", str(src), "OUT"],        # unambiguous prefixes
        [str(src), "--from-file", "OUT", "--max-version=0"],  # options after operands
        ["--max-version=0", "--from-file", "--", str(src), "OUT"],
    ]
    for i, args in enumerate(variants):
        out = tmp_path / f"out{i}.cfs"
        args = [str(out) if a == "OUT" else a for a in args]
        cfsc("mkcomposefs", *args, env={"CFS_PARSE_STRICT": "1"}, check=True)
        assert out.read_bytes() == expected, args


def test_mkcomposefs_dropin_errors(cfsc, tmp_path):
    src = tmp_path / "special.dump"
    src.write_bytes(SPECIAL)
    for args, word in [
        (["--from-file", str(src)], "destination"),
        (["--from-file", "--print-digest-only", str(src), "x"], "--print-digest-only"),
        (["--print", str(src), "x"], "ambiguous"),
        (["--bogus", str(src), "x"], "unrecognized"),
        (["--min-version=x", str(src), "x"], "min version"),
        (["--threads=0", str(src), "x"], "threads"),
        (["--from-file", "--max-version=2", str(src), str(tmp_path / "y")], "version"),
    ]:
        p = cfsc("mkcomposefs", *args)
        assert p.returncode == 2, (args, p.stderr)
        assert word in p.stderr.decode(), (args, p.stderr)
    assert not (tmp_path / "y").exists()


def test_dropin_print_digest_only_and_stdout(cfsc, tmp_path):
    src = tmp_path / "special.dump"
    src.write_bytes(SPECIAL)
    p = cfsc("mkcomposefs", "--from-file", "--print-digest-only", "--max-version=0", str(src), check=True)
    digest = p.stdout.decode().strip()
    p = cfsc("mkcomposefs", "--from-file", "--max-version=0", "-", "-", input=SPECIAL, check=True)
    assert hashlib.sha256(p.stdout).hexdigest() == SPECIAL_V0
    p2 = cfsc("measure", "/dev/stdin", input=p.stdout, check=True)
    assert p2.stdout.decode().split()[0] == "sha256:" + digest


def test_version_errors_name_the_option_and_its_value(cfsc, tmp_path):
    src = tmp_path / "special.dump"
    src.write_bytes(SPECIAL)
    for args, expected in [(["--min-version", "-3", "--max-version", "1"], "--min-version: format version -3"),
                           (["--max-version", "2"], "--max-version: format version 2")]:
        p = cfsc("compile", str(src), "-o", str(tmp_path / "x.cfs"), *args)
        assert p.returncode == 2 and expected in p.stderr.decode(), (args, p.stderr)
    assert not (tmp_path / "x.cfs").exists()


def test_sigterm_mid_import_leaves_no_store_object_and_no_output(tmp_path):
    """SIGTERM unwinds like Ctrl-C: temporary store objects and the image are removed."""
    import io
    import signal
    import subprocess
    import tarfile
    import time

    from cfsc.store.objects import TEMP_PREFIX

    from tests.helpers.data import CFSC

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("big")
        info.size = 16 << 20  # streamed (larger than the frontend holds in memory)
        tar.addfile(info, io.BytesIO(b"x" * info.size))
    data = buf.getvalue()
    store, out = tmp_path / "store", tmp_path / "out.cfs"
    p = subprocess.Popen([CFSC, "compile", "--from", "tar", "-", "-o", str(out), "--digest-store", str(store)],
                         stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        p.stdin.write(data[:8 << 20])  # half of the member: the importer now waits for more
        p.stdin.flush()
        deadline = time.monotonic() + 30
        while not (store.is_dir() and any(f.name.startswith(TEMP_PREFIX) for f in store.iterdir())):
            assert time.monotonic() < deadline, "no temporary object appeared"
            time.sleep(0.02)
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err
    assert err.decode().strip() == "error: terminated by SIGTERM"
    assert [f.name for f in store.rglob("*") if f.is_file()] == [LOCK_NAME]  # the lock file stays with the store
    assert sorted(f.name for f in tmp_path.iterdir()) == ["store"]


def test_tree_paths_in_errors_stay_one_readable_line():
    from cfsc.base.errors import TreeError

    err = TreeError("too long", b"/a\nb\x00c\xffd\x1b[31m\xe2\x80\xa8", "x.tar")
    assert str(err) == "x.tar:/a\\nb\\x00c\\xffd\\x1b[31m\\u2028: too long"


def _both_routes(args: list[str], cwd, script: bool = False, closed: tuple[int, ...] = ()) -> list[tuple]:
    """(exit code, stdout, stderr, files written, stores' files) of `cfsc ARGS` run directly and
    through typer; `script`: directly as the `cfsc` console script (`main()` reading sys.argv);
    `closed`: standard descriptors closed before Python starts."""
    import shutil
    import subprocess
    import sys

    from tests.helpers.data import CFSC

    def close():
        for fd in closed:
            os.close(fd)

    results = []
    for direct in (True, False):
        for f in cwd.glob("out*"):
            f.unlink()
        for d in cwd.glob("st*"):
            shutil.rmtree(d)
        command = ([CFSC, *args] if script and direct else
                   [sys.executable, "-c", f"from cfsc.cli import main; main({args!r}, direct={direct})"])
        p = subprocess.run(command, capture_output=True, cwd=cwd, preexec_fn=close if closed else None)
        written = {f.name: f.read_bytes() for f in sorted(cwd.glob("out*"))}
        stores = {str(f.relative_to(cwd)): f.read_bytes() for f in sorted(cwd.glob("st*/**/*")) if f.is_file()}
        results.append((p.returncode, p.stdout, p.stderr, written, stores))
    return results


def test_direct_verbs_equal_typer_verbs(tmp_path):
    """`cfsc.cli.direct` runs `compile` and `mkcomposefs` without typer when it knows every
    argument; `main(direct=False)`, all through typer, is the reference: same exit code,
    output, messages and files, for plain arguments, errors, and arguments it hands on."""
    (tmp_path / "special.dump").write_bytes(SPECIAL)
    (tmp_path / "bad.dump").write_bytes(b"/ 0 40755 2 0 0 0 0.0 - - -\n/x 0 0 1 0 0 0 0.0 - - -\n")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "f").write_bytes(b"data")
    cases = [
        ["compile", "special.dump", "-o", "out.cfs"],
        ["compile", "-o", "out.cfs", "special.dump", "--print-digest"],
        ["compile", "special.dump", "--output", "out.cfs", "--print-digest-only"],
        ["compile", "special.dump", "--print-digest-only"],
        ["compile", "special.dump", "--out", "-"],
        ["compile", "special.dump"],
        ["compile", "special.dump", "-o"],
        ["compile", "special.dump", "-o", "out1.cfs", "-o", "out2.cfs"],
        ["compile", "bad.dump", "-o", "out.cfs"],
        ["compile", "missing.dump", "-o", "out.cfs"],
        ["compile", "special.dump", "tree", "-o", "out.cfs"],
        ["compile", "tree", "-o", "out.cfs", "--max-version", "0"],
        ["compile", "-o", "out.cfs"],
        ["compile", "--bogus", "special.dump", "-o", "out.cfs"],
        ["compile", "tree", "-o", "out.cfs", "--digest-store", "st"],
        ["compile", "--digest-store=st", "tree", "--threads", "1", "-o", "out.cfs", "--print-digest"],
        ["compile", "tree", "--hash", "sha512", "--digest-store", "st512", "-o", "out.cfs", "--threads=2"],
        ["compile", "tree", "-o", "out.cfs", "--digest-store", "st", "--digest-store", "st2"],
        ["compile", "tree", "-o", "out.cfs", "--digest-store"],
        ["compile", "tree", "-o", "out.cfs", "--digest-store", "-o"],
        ["compile", "tree", "-o", "out.cfs", "--threads", "0"],
        ["compile", "tree", "-o", "out.cfs", "--threads", "x"],
        ["compile", "tree", "-o", "out.cfs", "--hash", "md5"],
        ["mkcomposefs", "--from-file", "special.dump", "out.cfs"],
        ["mkcomposefs", "--print-digest", "--min-version=1", "tree", "out.cfs"],
        ["mkcomposefs", "--from", "special.dump", "--print-digest-only"],
        ["mkcomposefs", "--threads", "0", "tree", "out.cfs"],
        ["mkcomposefs", "tree"],
        ["mkcomposefs", "--bogus", "tree", "out.cfs"],
        ["mkcomposefs", "--from-file", "bad.dump", "out.cfs"],
        ["mkcomposefs"],
    ]
    for args in cases:
        direct, reference = _both_routes(args, tmp_path)
        assert direct == reference, args
        # the console script ends its process without the interpreter's teardown
        # (`cli._leave`): the same output, images on stdout and digests included
        script, reference = _both_routes(args, tmp_path, script=True)
        assert script == reference, args


@pytest.mark.parametrize("closed", [(1,), (2,), (1, 2)], ids=["stdout", "stderr", "both"])
def test_the_console_script_with_standard_streams_closed(tmp_path, closed):
    """A process started with fd 1 or 2 closed (a daemon's child, `>&-`) has no sys.stdout or
    sys.stderr: the console script's quick exit still says success for a compile, and a digest
    it cannot print is a one-line error, as through typer."""
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "f").write_bytes(b"data")
    for args in (["compile", "tree", "-o", "out.cfs"], ["compile", "tree", "-o", "out.cfs", "--print-digest"]):
        script, reference = _both_routes(args, tmp_path, script=True, closed=closed)
        assert script == reference, args
        assert script[3], args  # the image is written either way
        if "--print-digest" not in args or 1 not in closed:
            assert script[0] == 0, script


@pytest.mark.parametrize("args", [["compile", "tree", "-o", "-"], ["dump", "image.cfs"], ["info", "image.cfs"],
                                  ["diff", "image.cfs", "image.cfs"], ["ls", "image.cfs"]],
                         ids=lambda a: "-".join(a[:1] + a[-1:]))
def test_a_verb_writing_to_a_closed_stdout_says_so_in_one_line(tmp_path, args):
    """fd 1 closed when the process started (`>&-`): what a verb writes to stdout ends in one
    located line, exit 1, no traceback (Python leaves `sys.stdout` None then)."""
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "f").write_bytes(b"data")
    subprocess.run([sys.executable, "-m", "cfsc", "compile", "tree", "-o", "image.cfs"], cwd=tmp_path, check=True)
    p = subprocess.run(["sh", "-c", '"$@" >&-', "sh", sys.executable, "-m", "cfsc", *args], cwd=tmp_path,
                       capture_output=True)
    assert p.returncode == 1
    assert p.stderr == b"error: -: cannot write the output: standard output is closed\n"
