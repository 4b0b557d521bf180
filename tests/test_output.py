"""Outputs: devices and FIFOs are written in place, never replaced by the atomic rename."""

from __future__ import annotations

import os
import stat
import threading

from tests.helpers.data import run_cfsc

DUMP = b"/ 0 40755 2 0 0 0 0.0 - - -\n/f 3 100644 1 0 0 0 0.0 - abc -\n"


def test_a_device_stays_a_device(tmp_path):
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of our own
    p = run_cfsc("compile", "-", "-o", str(null), input=DUMP)
    assert p.returncode == 0, p.stderr
    assert stat.S_ISCHR(os.lstat(null).st_mode) and os.listdir(tmp_path) == ["null"]


def test_a_fifo_gets_the_image(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    p = run_cfsc("compile", "-", "-o", str(fifo), input=DUMP)
    reader.join(10)
    assert p.returncode == 0, p.stderr
    assert got == [run_cfsc("compile", "-", "-o", "-", input=DUMP).stdout]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_temp_names_are_recognised_as_such(tmp_path):
    """`is_temp_name` (what `cfsc gc --keep-dir` skips) knows the name `atomic_output` writes."""
    from cfsc.base.output import atomic_output, is_temp_name

    with atomic_output(str(tmp_path / "x.cfs")) as out:
        out.write(b"data")
        (temp,) = os.listdir(tmp_path)
        assert is_temp_name(temp)
    assert os.listdir(tmp_path) == ["x.cfs"] and not is_temp_name("x.cfs")
    assert not is_temp_name(".x.cfs.0123456789AB.tmp") and not is_temp_name(".0123456789ab.tmp")


def test_a_write_that_fails_at_the_last_flush_leaves_no_temp_file(tmp_path):
    """The image's last bytes sit in the stream's buffer until the final flush; when that
    flush fails (a file size limit ten bytes short), closing the stream fails the same way,
    and the temporary file must still go."""
    import resource
    import signal
    import subprocess

    from tests.helpers.data import CFSC

    src = tmp_path / "in.dump"
    src.write_bytes(DUMP)
    size = len(run_cfsc("compile", str(src), "-o", "-", check=True).stdout)
    out = tmp_path / "out"
    out.mkdir()

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (size - 10, size - 10))

    p = subprocess.run([CFSC, "compile", str(src), "-o", str(out / "img.cfs")], preexec_fn=limit, capture_output=True)
    assert p.returncode != 0
    assert p.stderr.decode().strip().splitlines() == ["error: [Errno 27] File too large"]
    assert os.listdir(out) == []
