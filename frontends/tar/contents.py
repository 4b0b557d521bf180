"""File data arriving from a stream (tar members) → inline content, digest, payload, store object.

The rules are the directory frontend's (and mkcomposefs'): a regular file of 1..64 bytes is
inlined; every non-empty regular file gets its fs-verity digest and the payload `xx/yyyy…`
naming it; with a content store, the files that are not inlined are written into it.  Without
a store the digests are still computed (the image needs them) and nothing is written.

Store objects go through the store's temp files, linked into place all at once by `finish()`
when every layer was read (or, when the compile holds them, once the image is written): an object never appears with partial content, and a run that fails
leaves no object at all (`abort()` removes the temp files; a truncated archive's complete
members, or the data of a gzip member whose CRC fails at its end, never reach the store).  A
file held in memory is hashed first and written only if the store lacks it
(`Store.import_bytes`); a large file is hashed while it is written (`Store.import_chunks`),
and its temp copy is dropped if the object was there already.

Threads: with `threads > 1` the hashing and writing run in a pool while the caller keeps
decompressing and parsing.  Files taken whole (up to `WHOLE_MAX` bytes) go to the pool in
batches; larger files are piped to one worker through a bounded queue of chunks, so memory
stays bounded whatever a member's size.  Bytes in flight are capped (`INFLIGHT_MAX`).
"""

from __future__ import annotations

import collections
import queue
from concurrent.futures import Future, ThreadPoolExecutor

from cfsc.base.fsverity import FsVerityHasher, algorithm_named, digest_bytes, payload_path
from cfsc.base.options import Options
from cfsc.base.tree import Inode
from cfsc.store.objects import loaded, open_store

WHOLE_MAX = 4 << 20  # files up to this size are read into memory whole
BATCH_FILES = 64
BATCH_BYTES = 16 << 20
INFLIGHT_MAX = 96 << 20
PIPE_DEPTH = 16  # chunks queued for a piped file (about 16 MiB)
_END = object()


class _Aborted(Exception):
    """The reader failed while a file was being piped: its temp object must go."""


class Contents:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.algorithm = algorithm_named(options.hash)
        self.store = open_store(options) if options.digest_store else None
        self.threads = max(1, options.threads)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cfsc-hash") if self.threads > 1 else None
        self.batch: list[tuple[Inode, bytes]] = []
        self.batch_bytes = 0
        self.inflight: collections.deque[tuple[Future, int, int, int]] = collections.deque()
        self.inflight_bytes = 0
        self.failed = False
        self.files = self.files_done = 0
        self.bytes = self.bytes_done = 0

    # -- what the reader calls ------------------------------------------------------------

    def inline(self, node: Inode, data: bytes) -> None:
        """A file of 1..`limits.INLINE_MAX` bytes: its data goes into the image."""
        digest = digest_bytes(data, self.algorithm)
        node.content = data
        node.digest = digest
        node.payload = payload_path(digest)

    def whole(self, node: Inode, data: bytes) -> None:
        """A file held in memory, larger than `limits.INLINE_MAX`."""
        self.files += 1
        self.bytes += len(data)
        if self.pool is None:
            self._external(node, data)
            self.files_done += 1
            self.bytes_done += len(data)
            return
        self.batch.append((node, data))
        self.batch_bytes += len(data)
        if len(self.batch) >= BATCH_FILES or self.batch_bytes >= BATCH_BYTES:
            self._flush()

    def stream(self, node: Inode, size: int, chunks) -> None:
        """A large (or sparse) file arriving as chunks (an iterator that may raise when the
        input ends early); a hole comes as its length, an int."""
        self.files += 1
        self.bytes += size
        if self.pool is None:
            self._piped(node, chunks)
            self.files_done += 1
            self.bytes_done += size
            return
        self._flush()
        pipe: queue.Queue = queue.Queue(PIPE_DEPTH)
        future = self.pool.submit(self._piped, node, self._pipe_reader(pipe))
        try:
            for chunk in chunks:
                self._put(pipe, chunk, future)
        except BaseException:
            self._put(pipe, _Aborted(), future, check=False)
            future.cancel()
            raise
        self._put(pipe, _END, future)
        # Tracked only now: waiting for it earlier would wait for chunks not yet queued.  The
        # queue bounds its memory, so it adds nothing to the in-flight bytes.
        self._track(future, 1, 0, size)

    def finish(self) -> None:
        """Wait for every file; commit the store (the run succeeded)."""
        self._flush()
        while self.inflight:
            self._reap()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        if self.store is not None:
            loaded(self.store, self.options)

    def abort(self) -> None:
        """After an error: stop the workers and remove every temp object (nothing was committed)."""
        self.failed = True
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.store is not None:
            self.store.close()

    # -- the work -------------------------------------------------------------------------

    def _external(self, node: Inode, data: bytes) -> None:
        digest = digest_bytes(data, self.algorithm)
        if self.store is not None:
            self.store.import_bytes(data, digest)
        node.digest = digest
        node.payload = payload_path(digest)

    def _piped(self, node: Inode, chunks) -> None:
        if self.store is not None:
            digest, _size = self.store.import_chunks(chunks)
        else:
            hasher = FsVerityHasher(self.algorithm)
            for chunk in chunks:
                if chunk.__class__ is int:  # a hole's length
                    hasher.update_zeros(chunk)
                else:
                    hasher.update(chunk)
            digest = hasher.digest()
        node.digest = digest
        node.payload = payload_path(digest)

    def _batch(self, batch: list[tuple[Inode, bytes]]) -> None:
        for node, data in batch:
            if self.failed:
                return
            self._external(node, data)

    @staticmethod
    def _pipe_reader(pipe: queue.Queue):
        while True:
            item = pipe.get()
            if item is _END:
                return
            if isinstance(item, _Aborted):
                raise item
            yield item

    @staticmethod
    def _put(pipe: queue.Queue, item, future: Future, check: bool = True) -> None:
        """Queue a chunk; if the worker is gone, surface its error (or give up when aborting)."""
        while True:
            try:
                pipe.put(item, timeout=0.05)
                return
            except queue.Full:
                if future.done():
                    if check:
                        future.result()
                    return

    def _flush(self) -> None:
        if self.batch:
            assert self.pool is not None
            self._track(self.pool.submit(self._batch, self.batch), len(self.batch), self.batch_bytes,
                        self.batch_bytes)
            self.batch = []
            self.batch_bytes = 0

    def _track(self, future: Future, files: int, held: int, size: int) -> None:
        """Follow a submitted job: `held` bytes of memory until it is done, `size` bytes of data."""
        self.inflight.append((future, files, held, size))
        self.inflight_bytes += held
        while self.inflight and (self.inflight[0][0].done() or len(self.inflight) > 2 * self.threads
                                 or self.inflight_bytes > INFLIGHT_MAX):
            self._reap()

    def _reap(self) -> None:
        future, files, held, size = self.inflight.popleft()
        future.result()  # re-raises the worker's error
        self.inflight_bytes -= held
        self.files_done += files
        self.bytes_done += size
