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
