"""Decompression in its own thread, a few chunks ahead of the tar parser.

lzma and zstandard release the GIL while they decode, so a layer's decompression runs on one
core while the parser (and the hashing pool) use the others.  ISA-L, which inflates gzip here
(`cfsc.base.inflate`), holds the GIL (but inflates 2.5x as fast as zlib, which let go of it):
a thread would only take turns with the parser, so gzip is decoded inline (`AHEAD`: a minbase
layer compiles in 0.93x the time that way, 0.92x into a new store).  Chunks come out exactly
as the parser would have gathered them itself (`gather`): the data decoded before a failure
first, then the failure, so its location does not change.

The thread never outlives its use for long: `stop()` empties the queue and asks it to quit at
its next chunk; a thread blocked reading a silent pipe is a daemon and closes the input itself
when it wakes (the reader must not close it under the thread).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

DEPTH = 4  # chunks decoded ahead (about 4 MiB)
AHEAD = frozenset({"zstd", "xz"})  # the compressions (`streams.compression`) decoded in a thread
# At most this much is asked of the gzip decompressor at a time: ISA-L checks a member's CRC in
# the call that inflates the member's end, and a failure there takes that call's data with it
# (`cfsc.base.inflate`): the failure is then located at most this much before the end.
GZIP_PIECE = 64 << 10


def gather(read1: Callable[[int], bytes], size: int, piece_max: int | None = None) -> tuple[bytes, BaseException | None]:
    """About `size` bytes from the decompressor's own pieces (of at most `piece_max` bytes),
    and the error that stopped it (after the data, which is good, that it decoded first)."""
    parts = []
    have = 0
    limit = piece_max or size
    while have < size:
        try:
            piece = read1(min(size - have, limit))
        except Exception as e:  # OSError (gzip.BadGzipFile), EOFError, lzma.LZMAError, zstandard.ZstdError
            return b"".join(parts), e
        if not piece:
            break
        parts.append(piece)
        have += len(piece)
    return (parts[0] if len(parts) == 1 else b"".join(parts)), None


class ReadAhead:
    """`get()` returns what `gather(read1, size)` would, decoded in a thread ahead of time."""

    def __init__(self, read1: Callable[[int], bytes], size: int, closer: Callable[[], None] | None) -> None:
        self._read1 = read1
        self._size = size
        self._closer = closer  # closes the input once the thread is done with it
        self._queue: queue.Queue = queue.Queue(DEPTH)
        self._stopped = False
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="cfsc-decompress", daemon=True)
        self._thread.start()

    def get(self) -> tuple[bytes, BaseException | None]:
        return self._queue.get()

    def _run(self) -> None:
        try:
            while not self._stopped:
                item = gather(self._read1, self._size)
                while not self._stopped:
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if item[1] is not None or not item[0]:
                    return
        finally:
            with self._lock:
                self._running = False
                close = self._closer if self._stopped else None
            if close is not None:
                close()

    def stop(self) -> None:
        """No more chunks are wanted: the thread quits, and closes the input (now, if it is
        done already, else as it quits)."""
        with self._lock:
            self._stopped = True
            close = self._closer if not self._running else None
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        if close is not None:
            close()
