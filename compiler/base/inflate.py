"""gzip streams inflated by ISA-L (python-isal): layers, dumpfiles, TOCs and tar-split files.

Why not the standard library: its `gzip.GzipFile` reads through a Python-level loop of 8 KiB
reads, and zlib inflates at 240-380 MB/s on this machine against 590-650 MB/s here.  Measured
against zlib's reader (interleaved runs, medians): a minbase layer (93 MB of gzip, 206 MB of
files) compiles in 0.68x the time, or 0.88x into a new store (which the disk bounds); a
three-layer OCI image (`bench/oci_bench.py`'s) into a new store in 0.89x.  ISA-L holds the
GIL while it inflates (zlib lets go of it), but inflating ~2.5x as fast more than makes up.

python-isal's own `igzip.GzipFile` is not used: it reads on into the next member's header
within the call that ends a member, and a failure there (trailing garbage, a bad header)
takes that call's good data with it, so the tar reader would locate the failure too early.
`_Members` hands out data as `gzip.GzipFile` does, which stays the reference (`reference=True`,
tests/test_inflate.py compares the two).  Small one-shot inflates (eStargz chunks, OSTree's
.filez objects, a compressed input's first bytes) keep zlib: ISA-L's `decompressobj` may hold
output back with no input left in `unconsumed_tail`, which zlib-style loops take for the end.
"""

from __future__ import annotations

import io

from cfsc.base.streams import GZIP_MAGIC

TYPE_CHECKING = False  # typing's, without importing typing (start-up)
if TYPE_CHECKING:
    from typing import BinaryIO

GZIP_WBITS = 31  # a gzip wrapper, 32 KiB window
READ = 1 << 16  # compressed bytes read at a time
READ1_DEFAULT = 1 << 18  # decompressed bytes `read1()` gives at most when not told


def gzip_reader(fileobj: BinaryIO, reference: bool = False) -> BinaryIO:
    """The decompressed bytes of a gzip stream (all its members), read from `fileobj`, which
    stays open when the reader is closed.  Unbuffered, for `read`/`read1` of large pieces:
    wrap it in an `io.BufferedReader` to read lines (as `open_gzip` does).  `reference`: the
    standard library's `GzipFile`."""
    if reference:
        import gzip

        return gzip.GzipFile(fileobj=fileobj, mode="rb")  # type: ignore[return-value]
    return _Members(fileobj)  # type: ignore[return-value]


def open_gzip(path: str, reference: bool = False) -> BinaryIO:
    """`gzip_reader` of a file it opens, and closes with itself; buffered, for `readline`
    (which would otherwise inflate a byte at a time)."""
    if reference:
        import gzip

        return gzip.open(path, "rb")  # type: ignore[return-value]
    return io.BufferedReader(_Members(open(path, "rb"), owned=True), READ)  # type: ignore[arg-type]


class _Members(io.BufferedIOBase):
    """A gzip stream's members inflated by ISA-L, handed out as `gzip.GzipFile` hands them out:
    all a member holds before anything after it is looked at.  Zero padding may follow a
    member; anything else after one must be a member.  Errors: the standard library's for the
    framing (`BadGzipFile`; `EOFError` for a stream cut short), `BadGzipFile` naming the member
    for ISA-L's findings in the deflate data and the CRC/size trailer.  A member whose trailer
    fails, or is cut, may keep the data of its end back (ISA-L checks before it lets go).  One
    difference on purpose: a header with a wrong header CRC (FHCRC) is refused, as Go's gzip
    (containers/image's) refuses it, where `GzipFile` skips the check.  `read(size)` hands out
    what it gathered before a failure and raises it on the next call, as `read1` does."""

    def __init__(self, fileobj: BinaryIO, owned: bool = False) -> None:
        super().__init__()
        self._fp = fileobj
        self._owned = owned
        self._member = None  # the current member's decompressor
        self._input = b""  # compressed bytes read and not yet given to a decompressor
        self._held = False  # the last call stopped at its output limit: ISA-L may hold more
        self._members = 0
        self._failure: Exception | None = None  # met by `read` after data, raised next

    def readable(self) -> bool:
        return True

    def read1(self, size: int = -1) -> bytes:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        if size == 0:
            return b""
        if size < 0:
            size = READ1_DEFAULT
        while True:
            member = self._member
            if member is None:
                member = self._next_member()
                if member is None:
                    return b""
            if member.eof:
                self._input = member.unused_data
                self._member = None
                continue
            tail = member.unconsumed_tail
            if not tail and not self._held:
                tail = self._input or self._fp.read(READ)
                self._input = b""
                if not tail:
                    raise EOFError("Compressed file ended before the end-of-stream marker was reached")
            try:
                data = member.decompress(tail, size)
            except _isal_error() as e:
                import gzip

                raise gzip.BadGzipFile(f"member {self._members}: {e}") from None
            self._held = len(data) == size
            if data:
                return data

    def read(self, size: int | None = -1) -> bytes:
        parts: list[bytes] = []
        left = -1 if size is None or size < 0 else size
        try:
            while left:
                piece = self.read1(left if left > 0 else -1)
                if not piece:
                    break
                parts.append(piece)
                if left > 0:
                    left -= len(piece)
        except (OSError, EOFError) as e:  # (BadGzipFile is an OSError)
            if not parts:
                raise
            self._failure = e
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readinto(self, b) -> int:
        data = self.read1(len(b))  # (a short read is a read: `open_gzip`'s buffer asks again)
        b[:len(data)] = data
        return len(data)

    def _next_member(self):
        data = self._input
        while True:
            if self._members:  # zero padding may follow a member
                data = data.lstrip(b"\0")
            if len(data) >= len(GZIP_MAGIC):
                break
            more = self._fp.read(READ)
            if not more:
                if not data:
                    self._input = b""
                    return None  # the end, between members (or an empty stream, as GzipFile)
                break
            data += more
        if data[:len(GZIP_MAGIC)] != GZIP_MAGIC:
            import gzip

            raise gzip.BadGzipFile(f"Not a gzipped file ({data[:len(GZIP_MAGIC)]!r})")
        from isal import isal_zlib

        self._input = data
        self._member = isal_zlib.decompressobj(GZIP_WBITS)
        self._held = False
        self._members += 1
        return self._member

    def close(self) -> None:
        if not self.closed and self._owned:
            self._fp.close()
        super().close()


def _isal_error() -> type[Exception]:
    from isal import isal_zlib

    return isal_zlib.error
