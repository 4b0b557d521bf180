"""Blobs: byte ranges of a file (a layout's `blobs/sha256/HEX`, or a member of an archive),
read as streams whose digests are checked once read whole.

A layer is read in one pass: the compressed bytes are hashed (the descriptor's `digest`), then
decompressed and hashed again (the config's `diff_id`), and the tar stream goes on to the layer
merge.  The comparison happens when the stream has been read to its end, before the compile
writes anything: a mismatch is an error naming the blob, and no image or store object is left.
A blob's size is checked against its descriptor before it is read, so a truncated blob is
reported as such at once.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import threading

from cfsc.base.errors import InputError
from cfsc.base.inflate import gzip_reader
from cfsc.base.streams import compression

CHUNK = 1 << 20

# Layer media types (OCI image-spec `media-types.md`, Docker's schema 2) → compression.
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": None,
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": None,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": None,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}


class Blob:
    """`size` bytes at `offset` of the file `path`; `name` says which blob, for messages
    (`LAYOUT: blob sha256:…`)."""

    __slots__ = ("name", "offset", "path", "size")

    def __init__(self, path: str, offset: int, size: int, name: str) -> None:
        self.path = path
        self.offset = offset
        self.size = size
        self.name = name

    def open(self) -> Window:
        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise InputError(f"cannot open: {e.strerror}", self.name) from None
        return Window(f, self.offset, self.size)

    def pread(self, offset: int, n: int) -> bytes:
        """`n` bytes at `offset` within the blob (random access: TOC readers)."""
        if offset < 0 or offset + n > self.size:
            raise InputError(f"bytes {offset}..{offset + n} lie outside the blob ({self.size} bytes)", self.name)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.pread(fd, n, self.offset + offset)
            finally:
                os.close(fd)
        except OSError as e:
            raise InputError(f"cannot read: {e.strerror}", self.name) from None
        if len(data) < n:
            raise InputError(f"truncated: {len(data)} of {n} bytes at byte {offset}", self.name)
        return data

    def read_all(self, limit: int) -> bytes:
        if self.size > limit:
            raise InputError(f"is {self.size} bytes: a JSON document of more than {limit} bytes is refused", self.name)
        return self.pread(0, self.size)


class Window(io.RawIOBase):
    """A byte range of an open file, read sequentially."""

    def __init__(self, f, offset: int, size: int) -> None:
        super().__init__()
        self.f = f
        self.left = size
        f.seek(offset)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        if n <= 0:
            return 0
        got = self.f.readinto(memoryview(b)[:n])
        self.left -= got
        return got

    def close(self) -> None:
        if not self.closed:
            self.f.close()
        super().close()


class Behind:
    """A SHA-256 fed from another thread.  hashlib lets go of the GIL while it hashes, so a
    layer's two digests (~0.3 s for a 200 MB gzip layer) run on the other core beside the
    decoder and the tar parser, not between them.  The thread ends at `hexdigest()` and at
    `stop()`: none outlives its layer (a later fork wants none, `forked.safe`)."""

    DEPTH = 16  # chunks queued at most (about 16 MiB)

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.queue: queue.Queue | None = None
        self.thread: threading.Thread | None = None

    def update(self, data: bytes) -> None:
        if self.thread is None:
            self.queue = queue.Queue(self.DEPTH)
            self.thread = threading.Thread(target=self._run, args=(self.queue,), name="cfsc-layer-digest",
                                           daemon=True)
            self.thread.start()
        self.queue.put(data)  # type: ignore[union-attr]

    def _run(self, chunks: queue.Queue) -> None:
        update = self.hash.update
        while (data := chunks.get()) is not None:
            update(data)

    def hexdigest(self) -> str:
        self.stop()
        return self.hash.hexdigest()

    def stop(self) -> None:
        if self.thread is not None:
            self.queue.put(None)  # type: ignore[union-attr]
            self.thread.join()
            self.thread = self.queue = None


class Hashing(io.RawIOBase):
    """Reads `inner` through, hashing (SHA-256, on another thread: `Behind`) and counting
    what passes."""

    def __init__(self, inner, name: str) -> None:
        super().__init__()
        self.inner = inner
        self.name = name
        self.hash = Behind()
        self.count = 0
        self.eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.inner.read(len(b))
        if not data:
            self.eof = True
            return 0
        n = len(data)
        b[:n] = data
        self.hash.update(data)
        self.count += n
        return n

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()

    def close(self) -> None:
        if not self.closed:
            self.hash.stop()
            self.inner.close()
        super().close()


def decompressed(raw, kind: str | None):
    """A reader of `raw` decompressed as `kind` (None: as it is).  gzip reads every member
    (eStargz is a sequence of them); zstd every frame, skipping skippable frames (zstd:chunked
    keeps its TOC in them)."""
    if kind is None:
        return raw
    buffered = io.BufferedReader(raw, CHUNK)
    if kind == "gzip":
        return gzip_reader(buffered)
    import zstandard

    return zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)


def sniff_compression(head: bytes) -> str | None:
    kind = compression(head)
    return kind if kind in ("gzip", "zstd") else None


class LayerStream(io.RawIOBase):
    """A layer blob decompressed, both digests checked at its end (`check`).  `expect_blob`
    and `expect_diff` may be None (nothing recorded to check against, e.g. docker archives
    name no blob digest)."""

    def __init__(self, blob: Blob, kind: str | None, expect_blob: str | None, expect_diff: str | None) -> None:
        super().__init__()
        self.blob = blob
        self.name = blob.name
        self.expect_blob = expect_blob
        self.expect_diff = expect_diff
        self.outer = Hashing(blob.open(), blob.name)
        self.inner = Hashing(decompressed(self.outer, kind), blob.name)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self.inner.readinto(b)

    def check(self) -> None:
        """After the tar reader took everything: read any rest, compare the digests."""
        while self.inner.read(CHUNK):
            pass
        outer = self.outer
        while outer.read(CHUNK):  # bytes after the compressed stream's end count in the digest
            pass
        if self.expect_blob is not None and outer.digest() != self.expect_blob:
            raise InputError(f"digest mismatch: the blob's {outer.count} bytes hash to {outer.digest()}, the"
                             f" manifest says {self.expect_blob}", self.name)
        if self.expect_diff is not None and self.inner.digest() != self.expect_diff:
            raise InputError(f"diff_id mismatch: the uncompressed layer ({self.inner.count} bytes) hashes to"
                             f" {self.inner.digest()}, the config's rootfs.diff_ids says {self.expect_diff}",
                             self.name)

    def close(self) -> None:
        if not self.closed:
            try:
                self.inner.close()
            finally:
                self.outer.close()  # (a gzip reader does not close the file it was given)
        super().close()
