"""Atomic outputs: write to a temporary file beside the target, rename on success.

A failed or interrupted run (an error, Ctrl-C, SIGTERM) leaves the target untouched and no
temporary file behind (except after SIGKILL, when a `.NAME.*.tmp` file may remain; it never
has the final name).
Devices and FIFOs (`/dev/null`, a pipe) are written in place.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Iterator

from cfsc.base.errors import OutputError, UsageError
from cfsc.base.fsverity import SHA256, FsVerityAlgorithm, FsVerityHasher

TYPE_CHECKING = False  # typing's, without importing typing (start-up); type checkers read it as True
if TYPE_CHECKING:
    from typing import BinaryIO


class ClosedStdout:
    """Stands for stdout when its descriptor was closed before Python started (`sys.stdout`
    is None then): whatever a verb writes there ends in one located line, not in an
    AttributeError; flushing is nothing, and it is no terminal."""

    __slots__ = ()

    @staticmethod
    def error() -> OutputError:
        return OutputError("cannot write the output: standard output is closed", "-")

    @property
    def buffer(self):
        raise self.error()

    def write(self, _data) -> int:
        raise self.error()

    def fileno(self) -> int:
        raise self.error()

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def stand_in_for_closed_stdout() -> None:
    """(At the start of a command.)"""
    if sys.stdout is None:
        sys.stdout = ClosedStdout()  # type: ignore[assignment]


def flush_standard_streams() -> None:
    """Write out what Python buffers for stdout and stderr (None: the descriptor was closed when
    Python started): before a fork (the child must not write it again) or an `os._exit`."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _special(path: str) -> bool:
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


_TEMP_RANDOM = 6  # bytes of the random part of a temp name (12 hex digits)


def is_temp_name(name: str) -> bool:
    """Whether `name` is one `atomic_output` gives its temp files (`.NAME.XXXXXXXXXXXX.tmp`):
    what a directory of outputs may hold while a run writes (`cfsc gc --keep-dir` skips them)."""
    core = name[1:-4] if name.startswith(".") and name.endswith(".tmp") else ""
    stem, _, hexpart = core.rpartition(".")
    return bool(stem) and len(hexpart) == 2 * _TEMP_RANDOM and all(c in "0123456789abcdef" for c in hexpart)


def _create_temp(directory: str, name: str) -> tuple[int, str]:
    """A new `.NAME.XXXXXXXXXXXX.tmp` beside the target (mkstemp without importing tempfile,
    which costs a CLI start ~5 ms)."""
    for _attempt in range(100):
        tmp = os.path.join(directory, f".{name}.{os.urandom(_TEMP_RANDOM).hex()}.tmp")
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {directory}")


@contextlib.contextmanager
def atomic_output(path: str, mode: int = 0o666) -> Iterator[BinaryIO]:
    """Yield a binary file for `path` (`-` = stdout) that appears only if the block succeeds."""
    if path == "-":
        out = sys.stdout.buffer  # (`ClosedStdout`'s one-line error if fd 1 was closed)
        if out.isatty():
            raise UsageError("refusing to write binary output to a terminal", "-")
        yield out
        out.flush()
        return
    if os.path.isdir(path):
        raise UsageError("is a directory: expected a file name", path)
    if _special(path):
        # A device or FIFO (`-o /dev/null`, a named pipe) is written in place: renaming over
        # it would replace the node itself with a regular file.
        try:
            out = open(path, "wb")
        except OSError as e:
            raise OutputError(f"cannot open: {e.strerror}", path) from None
        with out:
            yield out
        return
    directory = os.path.dirname(path) or "."
    try:
        fd, tmp = _create_temp(directory, os.path.basename(path))
    except OSError as e:
        raise OutputError(f"cannot create a file here: {e.strerror}", path) from None
    f = os.fdopen(fd, "wb")
    try:
        yield f
        f.flush()
        os.fchmod(fd, mode & ~_umask())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            f.close()  # (flushes what is buffered: after a failed write it fails again)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class DigestingWriter:
    """A write-only stream that forwards to `out` (if any) and computes the fs-verity digest."""

    def __init__(self, out: BinaryIO | None, algorithm: FsVerityAlgorithm = SHA256) -> None:
        self.out = out
        self.hasher = FsVerityHasher(algorithm)

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        if self.out is not None:
            self.out.write(data)
        return len(data)

    def digest(self) -> bytes:
        return self.hasher.digest()
