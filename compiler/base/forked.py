"""A part of a job run by a forked child on the machine's second core.

C mkcomposefs reads a dumpfile on one core; cfsc gives a forked child a part of the work.
The child sees the parent's memory copy-on-write, so nothing is handed over on the way in,
and only bytes come back, through pipes: `Feeder` sends a stream of messages the parent
takes in turn (the dumpfile parser's column stage), and `Partner` trades messages both ways
while the two work side by side (the image writer: each process sizes half of the inodes,
they exchange where the second half starts and their nids, then each writes its half in
place).  An error in a `Partner` is raised again in the
parent, the same class with the same message (a located one-line error stays one), so
callers see what the sequential path would have raised; a `Feeder`'s parent does the rest
itself.

A fork is only safe in a process that has no other threads (a lock held by one of them would
stay locked in the child forever); `usable()` says when it is, `worthwhile()` when it also
pays, and callers take their sequential path otherwise.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Callable

from cfsc.base.fsverity import write_all
from cfsc.base.output import flush_standard_streams

# (pickle and fcntl are imported where they are used: only a large input
# gets this far, and `cfsc compile` of a small one should not pay for them at start-up)
SIGKILL = 9  # signal.SIGKILL, without importing signal (start-up)
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, Linux
PIPE_SIZE = 4 << 20


def safe() -> bool:
    """True when this process can fork and no other thread runs (a lock another thread holds
    would stay held in the child forever)."""
    # Threads are made with `threading`: if it was never imported there are none, and
    # importing it only to count them would cost every small compile its import.
    threading = sys.modules.get("threading")
    return hasattr(os, "fork") and (threading is None or threading.active_count() == 1)


def usable() -> bool:
    """True when a forked child is possible, safe, and could have a processor of its own."""
    return safe() and _processors() > 1


def worthwhile() -> bool:
    """`usable()`, and a processor is idle right now: on a busy machine the child would only
    take turns with this process and add its own costs (the fork, copy-on-write faults,
    the handover), so the sequential path is then the faster one."""
    if not usable():
        return False
    try:
        with open("/proc/loadavg", "rb") as f:
            runnable = int(f.read().split()[3].split(b"/")[0])  # this process included
    except (OSError, ValueError, IndexError):
        return True
    return runnable < _processors()


def _processors() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _rebuild(cls: type, args: tuple, state: dict) -> BaseException:
    # Exceptions whose __init__ takes other arguments than their `args` (DumpfileError's
    # source, line and field) cannot go through `cls(*args)`, which is what pickle does.
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


def _pickled(error: BaseException) -> bytes:
    import pickle

    try:
        return pickle.dumps((type(error), error.args, dict(getattr(error, "__dict__", {}))))
    except Exception:  # noqa: BLE001 -- an unpicklable detail: keep the class's name and message
        return pickle.dumps((RuntimeError, (f"{type(error).__name__}: {error}",), {}))


class Partner:
    """`work(line)` running in a forked child that trades messages with this process while
    both work: the child's `line.receive()` takes what the parent `send`s, the parent's
    `receive()` what the child's `line.send()` sent; `join()` returns what `work` returned.
    An error in the child is raised by the parent's next `receive()` or `join()` (or `send()`,
    the child being gone), a child that died without one is a `ChildProcessError`.

    The talk takes turns: a side sends a message larger than a pipe holds only when the other
    has nothing unread to send it (both writing at once would wait for each other forever).
    Once the child has ended (its error raised, its result taken), every later call raises
    that same ending again.

    Use as a context manager (leaving early kills and reaps the child).  No fallback to doing
    the work here: it needs the parent's side of the talk, so a fork refused raises OSError
    and the caller takes its sequential path.
    """

    __slots__ = ("pid", "to_child", "from_child", "ended")

    def __init__(self, work: Callable[[Line], bytes | None]) -> None:
        flush_standard_streams()
        down_read, down_write = os.pipe()
        try:
            up_read, up_write = os.pipe()
        except OSError:
            os.close(down_read)
            os.close(down_write)
            raise
        _larger_pipe(down_write)
        _larger_pipe(up_write)
        try:
            pid = os.fork()
        except OSError:
            for fd in (down_read, down_write, up_read, up_write):
                os.close(fd)
            raise
        if pid == 0:
            status = 1
            try:
                os.close(down_write)
                os.close(up_read)
                try:
                    result = work(Line(down_read, up_write))
                    _send_frame(up_write, b"\0", result or b"")
                    status = 0
                except BaseException as e:  # noqa: BLE001 -- every error goes to the parent
                    _send_frame(up_write, b"\1", _pickled(e))
            finally:
                os._exit(status)
        os.close(down_read)
        os.close(up_write)
        self.pid = pid
        self.to_child = down_write
        self.from_child: io.BufferedReader | None = open(up_read, "rb")
        self.ended: BaseException | None = None  # how the child ended, once it has

    def send(self, message: bytes) -> None:
        if self.ended is not None:
            raise self.ended
        try:
            _send_frame(self.to_child, b"\0", message)
        except BrokenPipeError:  # the child is gone: its error (or its death) says why
            self.receive()
            raise ChildProcessError(f"worker process {self.pid} stopped reading before its result") from None

    def receive(self) -> bytes:
        """The child's next message; its error raised here if it failed instead."""
        if self.ended is not None:
            raise self.ended
        assert self.from_child is not None
        frame = _read_frame(self.from_child)
        if frame is None:
            pid, code = self.pid, self._reap()
            raise self._end(ChildProcessError(f"worker process {pid} ended with status {code} before its result"))
        tag, message = frame
        if tag == b"\1":
            import pickle

            self._reap()
            cls, args, state = pickle.loads(message)
            raise self._end(_rebuild(cls, args, state))
        return message

    def join(self) -> bytes:
        """The child's last message (what `work` returned), once it has ended well."""
        result = self.receive()
        pid, code = self.pid, self._reap()
        if code != 0:
            raise self._end(ChildProcessError(f"worker process {pid} ended with status {code} after its result"))
        self._end(ChildProcessError(f"worker process {pid} has ended: its result was taken"))
        return result

    def _reap(self) -> int:
        assert self.pid > 0  # (waitpid(0) would reap any child of this process group)
        _pid, status = os.waitpid(self.pid, 0)
        self.pid = 0
        return os.waitstatus_to_exitcode(status)

    def _end(self, error: BaseException) -> BaseException:
        self.ended = error
        return error

    def __enter__(self) -> Partner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pid:
            os.kill(self.pid, SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0
        if self.to_child >= 0:
            os.close(self.to_child)
            self.to_child = -1
        if self.from_child is not None:
            self.from_child.close()
            self.from_child = None


class Line:
    """The child's side of a `Partner`."""

    __slots__ = ("inbox", "outbox")

    def __init__(self, inbox: int, outbox: int) -> None:
        self.inbox = open(inbox, "rb")
        self.outbox = outbox

    def receive(self) -> bytes:
        frame = _read_frame(self.inbox)
        if frame is None:
            raise EOFError("the parent process stopped before its message")
        return frame[1]

    def send(self, message: bytes) -> None:
        _send_frame(self.outbox, b"\0", message)


def _larger_pipe(fd: int) -> None:
    """A larger pipe, so that a writer goes on at once, not after the reader was scheduled
    again for each 64 KiB (what a busy machine makes slow): 4 MiB where allowed (root; it
    holds a 1M-inode tree's nids whole), else the 1 MiB of the default pipe-max-size."""
    import fcntl

    for size in (PIPE_SIZE, 1 << 20):  # (above /proc/sys/fs/pipe-max-size only root may go)
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, F_SETPIPE_SZ, size)
            return


def _send_frame(fd: int, tag: bytes, message: bytes) -> None:
    """A tag byte, the length (8 bytes), the message (not joined to them: it may be megabytes)."""
    write_all(fd, tag + len(message).to_bytes(8, "little"))
    write_all(fd, message)


def _read_frame(stream) -> tuple[bytes, bytes] | None:
    """(tag, message) of the next `_send_frame`; None when the writer ended before it whole."""
    head = stream.read(9)
    if len(head) < 9:
        return None
    size = int.from_bytes(head[1:], "little")
    message = stream.read(size)
    return (head[:1], message) if len(message) == size else None


class Feeder:
    """`work(send)` running in a forked child, each `send(message)` taken in turn by the
    parent's `next()`; None once the child has ended (done, or failed: the parent is to do
    the rest itself, so the child's error is not carried over).  `close()` kills and reaps it.
    """

    __slots__ = ("pid", "stream")

    def __init__(self, work: Callable[[Callable[[bytes], None]], None]) -> None:
        flush_standard_streams()
        read_end, write_end = os.pipe()
        _larger_pipe(write_end)  # (the child runs a few messages ahead)
        try:
            pid = os.fork()
        except OSError:  # no child to be had: as one that ended at once (the parent does it all)
            os.close(read_end)
            os.close(write_end)
            self.pid, self.stream = 0, None
            return
        if pid == 0:
            status = 1
            try:
                os.close(read_end)

                work(lambda message: _send_frame(write_end, b"\0", message))
                status = 0
            except BaseException:  # noqa: BLE001 -- the parent does the rest itself
                pass
            finally:
                os._exit(status)
        os.close(write_end)
        self.pid = pid
        self.stream: io.BufferedReader | None = open(read_end, "rb", buffering=PIPE_SIZE)

    def next(self) -> bytes | None:
        if self.stream is None:
            return None
        frame = _read_frame(self.stream)
        if frame is not None:
            return frame[1]
        self.close()
        return None

    def close(self) -> None:
        if self.pid:
            os.kill(self.pid, SIGKILL)  # (an unreaped child is still there to kill)
            os.waitpid(self.pid, 0)
            self.pid = 0
        if self.stream is not None:
            self.stream.close()
            self.stream = None
