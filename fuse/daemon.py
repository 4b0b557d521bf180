"""The life of a FUSE mount: check the image, mount, serve, daemonise, stop.

Everything that can be checked before mounting is (the image opens, its digest matches,
the root is a readable directory), so a bad image never leaves a mount behind.  In the
background case the process forks *before* any thread exists; the child mounts, answers the
kernel's INIT and only then tells the waiting parent "ok" through a pipe — so the command
returns when the mount works, or fails with the child's reason (as the child raised it:
one location, its exit status).  The child leaves the caller's working directory for `/` at
once and, when the mount works, detaches from the terminal and logs to `--log FILE`, else
syslog, else nowhere.

SIGINT, SIGTERM and SIGHUP unmount (lazily: a busy mount goes away when its last user
does) and end the server; an unmount from outside ends it too (the device read fails with
ENODEV).  Either way the process exits 0.
"""

from __future__ import annotations

import gc
import logging
import logging.handlers
import os
import resource
import signal
import sys
import threading

from cfsc.base.errors import CfscError
from cfsc.base.fsverity import SHA256
from cfsc.fuse.attach import MountError, mount_fuse, unmount
from cfsc.fuse.server import Server
from cfsc.store.backing import NO_VERITY

log = logging.getLogger("cfsc.fuse")
INIT_TIMEOUT = 30.0  # seconds to wait for the kernel's INIT after mounting
STOP_GRACE = 2.0  # seconds to let workers see the unmount before exiting anyway
GC_THRESHOLD = 50_000  # allocations between young-generation collections while serving


def serve_foreground(view, store, mountpoint: str, options) -> None:
    """Mount and serve until unmounted or signalled; errors before serving are raised."""
    _log_to(options, sys.stderr)
    _serve(view, store, mountpoint, options, None)


def serve_background(view, store, mountpoint: str, options) -> None:
    """Fork a server that mounts and serves; return once the mount answers.

    The server leaves the caller's working directory (it may run for months, and must not
    keep a directory busy), so every path it uses must be absolute: `mount` sees to that."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the server
        os.close(r)
        os.setsid()
        os.chdir("/")
        _close_inherited(keep=w)
        parent = _Parent(w)
        code = 0
        try:
            _serve(view, store, mountpoint, options, parent)
        except BaseException as e:  # everything: the parent is waiting for a word
            if isinstance(e, CfscError):
                what, where, code = e.what, e.where, e.exit_code
            else:
                what, where, code = str(e) or type(e).__name__, mountpoint, MountError.exit_code
            if parent.fd is not None:
                parent.say(b"error\0%d\0%s\0%s" % (code, _wire(where), _wire(what)))
            else:
                log.error("%s", f"{where}: {what}" if where else what)
        os._exit(code)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    said = b"".join(chunks)
    if said.startswith(b"ok"):
        return
    os.waitpid(pid, 0)
    if said.startswith(b"error\0"):
        _word, code, where, what = said.split(b"\0", 3)
        raise ServerFailed(_unwire(what), _unwire(where), int(code))
    raise MountError("the mount server died before the mount worked", mountpoint)


def _close_inherited(keep: int) -> None:
    """Close what the caller let us inherit beyond stdio (a pipe it waits on, say): the server
    outlives the command, and must not hold the caller's descriptors open.  Everything cfsc
    opens itself is close-on-exec (PEP 446), so the inheritable ones are exactly those."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != keep:
            try:
                if os.get_inheritable(fd):
                    os.close(fd)
            except OSError:
                pass  # the listing's own descriptor, closed by now


class ServerFailed(MountError):
    """The background server's error, passed on as it was raised: its own text, location
    and exit status (a second location would repeat the first)."""

    def __init__(self, what: str, where: str, exit_code: int) -> None:
        super().__init__(what, where)
        self.exit_code = exit_code


def _wire(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _unwire(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


class _Parent:
    """The pipe to the waiting `cfsc mount`: one word ("ok" or "error …"), then closed."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def say(self, word: bytes) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                os.write(fd, word)
            finally:
                os.close(fd)


def _serve(view, store, mountpoint: str, options, parent: _Parent | None) -> None:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    fd = None
    server = None
    _raise_fd_limit()
    try:
        fd = mount_fuse(mountpoint, view.image.name, allow_other=options.allow_other)
        server = Server(fd, view, store, threads=options.threads, passthrough=options.passthrough,
                        debug=options.debug)
        if store.verity != NO_VERITY:
            _ = SHA256.new  # hashlib loaded now (~10 ms), not by the first file checked
        _quiet_collector()
        server.start()
        if not _wait_any(server.ready, server.done, stop, INIT_TIMEOUT):
            raise MountError("the kernel did not start the FUSE session", mountpoint)
        if not server.ready.is_set():
            raise MountError("the mount went away before it was used", mountpoint)
        if parent is not None:
            _detach(options)
            parent.say(b"ok")
        log.info("serving %s on %s (passthrough %s)", view.image.name, mountpoint,
                 "on" if server.passthrough else "off")
        _wait_any(server.done, stop, None)
    except BaseException:
        stop.set()
        raise
    finally:
        if server is not None and stop.is_set() and not server.done.is_set():
            try:
                unmount(mountpoint, lazy=True)
            except MountError as e:
                log.error("%s", e)
            server.wait(STOP_GRACE)
        if server is not None:
            server.close()
        if fd is not None:
            os.close(fd)
        store.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _quiet_collector() -> None:
    """Keep the cycle collector off the request path.  The image and everything loaded
    before serving live as long as the process (frozen: never scanned again), and a fresh
    mount's first walk makes a node per entry, several objects each: at the default gen-0
    threshold a young collection ran every hundred or so new nodes, and the older ones
    re-scanned the growing caches — a sixth of a cold LOOKUP's time (in-process, 8.9 →
    7.4 µs).  Requests make almost no cycles, and the caches are bounded."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


def _raise_fd_limit() -> None:
    """Open files up to the hard limit: backing files stay open between uses."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _wait_any(*events_and_timeout) -> bool:
    """Wait until one of the events is set (True) or the timeout passes (False)."""
    *events, timeout = events_and_timeout
    waited = 0.0
    step = 0.1
    while not any(e.is_set() for e in events):
        if timeout is not None and waited >= timeout:
            return False
        events[0].wait(step)
        waited += step
    return True


def _detach(options) -> None:
    """Leave the terminal: stdio to /dev/null, logging to a file or syslog."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    _log_to(options, None)


def _log_to(options, stream) -> None:
    """Log to `--log FILE`, else `stream`, else syslog, else nowhere."""
    root = logging.getLogger("cfsc")
    for h in list(root.handlers):
        root.removeHandler(h)
    if options.log_file:
        handler: logging.Handler = logging.FileHandler(options.log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s cfsc[%(process)d]: %(message)s"))
    elif stream is not None:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("cfsc: %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log", logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter("cfsc[%(process)d]: %(message)s"))
    else:
        handler = logging.NullHandler()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if options.debug else logging.INFO if stream is None else logging.WARNING)
    if stream is not None and options.debug:
        handler.setFormatter(logging.Formatter("cfsc %(threadName)s: %(message)s"))
