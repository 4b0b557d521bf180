"""Opening inputs: paths or `-` for stdin, with compression detected by magic bytes.

A pipe (stdin, a FIFO, `/dev/stdin`, `<(…)`) can be read only once, yet the format is detected
from its first bytes before a frontend reads it.  So a pipe is opened once per process, through
a `Replay`: `head(n)` reads until it has n bytes or the input ends (one read of a pipe returns
whatever one write put in: a few bytes, or a zstd stream without its first block), keeps them,
and the reader gets them again before the rest.  Only the head is ever held, never the input.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import sys
from collections.abc import Iterator

from cfsc.base.errors import InputError

TYPE_CHECKING = False  # typing's, without importing typing (start-up); type checkers read it as True
if TYPE_CHECKING:
    from typing import BinaryIO

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_SKIPPABLE = b"\x2a\x4d\x18"  # bytes 1-3 of a skippable frame, magic 0x184D2A50-0x184D2A5F
XZ_MAGIC = b"\xfd7zXZ\x00"
MAGIC_SIZE = 6
# What each format calls the unit a stream is a sequence of (for messages).
UNITS = {"gzip": "member", "zstd": "frame", "xz": "stream"}
# Sources named by a reference rather than a path: the frontend for each (`frontends.detect`).
REFERENCES = {"ostree:": "ostree", "oci:": "oci", "oci-archive:": "oci", "docker-archive:": "oci",
              "containers-storage:": "oci"}


def is_reference(source) -> bool:
    """`ostree:REPO:REF`, `oci:DIR:TAG` and the other transports: not a path to open."""
    return isinstance(source, str) and source.startswith(tuple(REFERENCES))


def source_name(source) -> str:
    if source == "-" or source is None:
        return "<stdin>"
    if isinstance(source, (str, bytes, os.PathLike)):
        return os.fsdecode(source)
    return getattr(source, "name", "<stream>")


def compression(head: bytes) -> str | None:
    """"gzip", "zstd" or "xz" from an input's first bytes (inputs.md §2.1), else None."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC) or (head[1:4] == ZSTD_SKIPPABLE and head[0] & 0xF0 == 0x50):
        return "zstd"
    if head.startswith(XZ_MAGIC):
        return "xz"
    return None


class Replay(io.RawIOBase):
    """A pipe whose first bytes can be looked at (`head`) and are then read again."""

    def __init__(self, raw: BinaryIO, name: str, owned: bool) -> None:
        super().__init__()
        self.raw = raw
        self.name = name
        self.owned = owned  # close `raw` with this stream (not stdin)
        self.started = False  # reading began: the start is gone
        self._kept = bytearray()
        self._at = 0  # bytes of `_kept` handed out
        self._pos = 0

    def readable(self) -> bool:
        return True

    def head(self, n: int) -> bytes:
        """The first `n` bytes (fewer only if the input is shorter); b"" once reading began."""
        if self.started:
            return b""
        read1 = getattr(self.raw, "read1", self.raw.read)
        kept = self._kept
        while len(kept) < n:
            more = read1(n - len(kept))
            if not more:
                break
            kept += more
        return bytes(kept[:n])

    def readinto(self, b) -> int:
        self.started = True
        kept = self._kept
        if self._at < len(kept):
            n = min(len(b), len(kept) - self._at)
            b[:n] = kept[self._at:self._at + n]
            self._at += n
            if self._at == len(kept):
                self._kept = bytearray()
                self._at = 0
        else:
            n = self.raw.readinto(b)
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed and self.owned:
            self.raw.close()
        super().close()


_stdin: tuple[object, Replay, BinaryIO] | None = None
_pipes: dict[str, tuple[Replay, BinaryIO]] = {}  # pipes opened by path, until a reader takes them
_spent: set[str] = set()  # pipes a reader took: read again, they are empty (as stdin is)


def _stdin_replay() -> tuple[Replay, BinaryIO]:
    """The one `Replay` of this process's stdin (renewed if `sys.stdin` was replaced)."""
    global _stdin
    raw = sys.stdin.buffer
    if _stdin is None or _stdin[0] is not raw:
        replay = Replay(raw, "<stdin>", owned=False)
        _stdin = (raw, replay, io.BufferedReader(replay))
    return _stdin[1], _stdin[2]


def _pipe_replay(path: str) -> tuple[Replay, BinaryIO] | None:
    """The `Replay` of a path that is a pipe (or another non-seekable file), opened once."""
    if path in _pipes:
        return _pipes[path]
    if path in _spent:
        replay = Replay(io.BytesIO(), path, owned=False)  # opening it again could wait forever
        return replay, io.BufferedReader(replay)
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return None
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise InputError(f"cannot open: {e.strerror}", path) from None
    replay = Replay(raw, path, owned=True)
    _pipes[path] = (replay, io.BufferedReader(replay))
    return _pipes[path]


def read_once(source) -> bool:
    """Whether a source can be read only once: stdin, a pipe or FIFO (by path), a socket."""
    if source == "-":
        return True
    if not isinstance(source, (str, bytes, os.PathLike)) or is_reference(source):
        return False
    try:
        mode = os.stat(source).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISBLK(mode))


def head(source, n: int) -> bytes:
    """The first `n` bytes of a path or `-` (fewer only if shorter), leaving the input unread."""
    if source == "-":
        return _stdin_replay()[0].head(n)
    path = os.fsdecode(source)
    pipe = _pipe_replay(path)
    if pipe is not None:
        return pipe[0].head(n)
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise InputError(f"cannot open: {e.strerror}", path) from None


def open_binary(source) -> BinaryIO:
    """A readable binary stream for a path, `-` (stdin) or an already open stream."""
    if source == "-":
        return _stdin_replay()[1]
    if isinstance(source, (str, bytes, os.PathLike)):
        path = os.fsdecode(source)
        pipe = _pipe_replay(path)
        if pipe is not None:
            _pipes.pop(path, None)  # the reader owns it now
            _spent.add(path)
            return pipe[1]
        try:
            return open(source, "rb")
        except OSError as e:
            raise InputError(f"cannot open: {e.strerror}", source_name(source)) from None
    return source


def _closes(source) -> bool:
    """Did `open_binary(source)` open a stream for the caller (who must close it)?"""
    return source != "-" and isinstance(source, (str, bytes, os.PathLike))


def _magic(stream: BinaryIO) -> bytes:
    raw = getattr(stream, "raw", None)
    if isinstance(raw, Replay) and not raw.started:
        return raw.head(MAGIC_SIZE)  # a pipe's first read may hold fewer bytes than a magic
    return stream.peek(MAGIC_SIZE)[:MAGIC_SIZE]  # type: ignore[attr-defined]


def decompressor(stream: BinaryIO) -> tuple[BinaryIO, str | None]:
    """`stream` wrapped in a decompressor if it starts with gzip, zstd or xz magic, and which."""
    buffered = stream if hasattr(stream, "peek") else io.BufferedReader(stream)  # type: ignore[arg-type]
    kind = compression(_magic(buffered))
    # The decompressors are imported for compressed input only (gzip and lzma: ~2 ms of start-up).
    if kind == "gzip":
        from cfsc.base.inflate import gzip_reader

        return gzip_reader(buffered), kind
    if kind == "zstd":
        import zstandard

        # python-zstandard skips skippable frames, also a leading one.
        return zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True), kind  # type: ignore[return-value]
    if kind == "xz":
        import lzma

        return lzma.LZMAFile(buffered, "rb"), kind  # type: ignore[return-value]
    return buffered, None


def decompressing(stream: BinaryIO) -> BinaryIO:
    """Wrap `stream` in a decompressor if it starts with gzip, zstd or xz magic."""
    return decompressor(stream)[0]


def decompress_head(data: bytes, limit: int) -> tuple[bytes, bool, str | None]:
    """Up to `limit` decompressed bytes from the first bytes of a compressed input; whether
    they stop short because `data` ends inside a member/frame (more input would give more);
    and what is wrong if the data is corrupt."""
    kind = compression(data)
    if kind is None:
        return data[:limit], False, None
    out = bytearray()
    try:
        while data and len(out) < limit:
            if kind == "zstd":
                import zstandard

                d = zstandard.ZstdDecompressor().decompressobj()
                # No output limit here: small pieces bound the output (a 4-byte RLE block
                # gives 128 KiB at most).
                rest = b""
                for i in range(0, len(data), 256):
                    out += d.decompress(data[i:i + 256])
                    if d.eof or len(out) >= limit:
                        rest = d.unused_data + data[i + 256:]
                        break
            else:
                import lzma
                import zlib

                d = zlib.decompressobj(16 + zlib.MAX_WBITS) if kind == "gzip" else lzma.LZMADecompressor()
                out += d.decompress(data, limit - len(out))
                rest = d.unused_data
            if len(out) >= limit:
                break
            if not d.eof:
                return bytes(out), True, None
            data = rest
            if kind == "gzip":
                data = data.lstrip(b"\0")  # zero padding after the last member, as gzip allows
            if data and compression(data) != kind:
                raise ValueError(f"trailing data after the {kind} {UNITS[kind]}")
    except MemoryError:
        raise  # not the input's fault: the CLI says so
    except Exception as e:  # zlib.error, lzma.LZMAError, zstandard.ZstdError, ValueError
        return bytes(out[:limit]), False, f"cannot decompress ({kind}): {e}"
    return bytes(out[:limit]), False, None


def _read_errors() -> tuple[type[Exception], ...]:
    """What reading a bad or truncated input raises (besides the zstd errors): lzma's error
    too once xz input was read, lzma being imported for that only."""
    lzma = sys.modules.get("lzma")
    return (OSError, EOFError) if lzma is None else (OSError, EOFError, lzma.LZMAError)


# A compressed input read whole may inflate this much, and beyond WHOLE_FLOOR only this many
# times the compressed bytes read so far: real dumpfiles and TOCs shrink 4-10× (digests do
# not compress), while a gigabyte of zeros or blank lines fits in a few hundred KiB.  Streamed
# inputs need no such bound (they hold one record), and images have an exact one (`read_declared`).
WHOLE_FLOOR = 64 << 20
WHOLE_RATIO = 100
READ_STEP = 1 << 22


def _consumed(stream) -> int | None:
    """Compressed bytes taken from `stream` so far (None if it cannot tell)."""
    try:
        return stream.tell()
    except (OSError, ValueError, AttributeError):
        return None


@contextlib.contextmanager
def _reading(source) -> Iterator[BinaryIO]:
    """The input opened, its read and decompression failures turned into one located error,
    closed again if it was opened here."""
    stream = open_binary(source)
    try:
        yield stream
    except InputError:
        raise
    except _read_errors() as e:
        raise InputError(f"cannot read: {e}", source_name(source)) from None
    except MemoryError:
        raise  # not the input's fault: the CLI says so
    except Exception as e:  # zstandard.ZstdError and friends
        raise InputError(f"cannot decompress: {e}", source_name(source)) from None
    finally:
        if _closes(source):
            stream.close()


def read_all(source) -> bytes:
    """The whole (decompressed) input as bytes, with a located error on failure.

    A compressed input that inflates past WHOLE_FLOOR bytes and WHOLE_RATIO times its
    compressed size is refused (a decompression bomb would otherwise be held whole)."""
    with _reading(source) as stream:
        reader, kind = decompressor(stream)
        if kind is None:
            return reader.read()
        parts = []
        total = 0
        while True:
            chunk = reader.read(READ_STEP)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
            total += len(chunk)
            if total > WHOLE_FLOOR:
                consumed = _consumed(stream)
                if consumed is not None and total > WHOLE_RATIO * consumed:
                    raise InputError(f"the {kind} data inflates to more than {WHOLE_RATIO} times its size ({total}"
                                     f" bytes from {consumed}): refused as a decompression bomb (decompress it"
                                     " first if it is real)", source_name(source))


def read_declared(source, head_size: int, declared) -> tuple[bytes, str | None, bool]:
    """The start of an input whose format says how long it is: its first `head_size`
    (decompressed) bytes, then the rest of the `declared(head)` bytes — never more, so what
    follows (a gigabyte of zeros in a 50 KiB zstd file) is never inflated or held.

    Returns the bytes (fewer if the input is shorter), the compression ("gzip", "zstd", "xz"
    or None) and, for a compressed input, whether data follows (one byte is read to know;
    an uncompressed file or device may be longer than what it holds, and is not read on)."""
    with _reading(source) as stream:
        reader, kind = decompressor(stream)
        parts = [_read_up_to(reader, head_size)]
        want = declared(parts[0]) - len(parts[0])
        while want > 0:
            chunk = _read_up_to(reader, min(want, READ_STEP))  # a hostile size is never allocated at once
            if not chunk:
                break
            parts.append(chunk)
            want -= len(chunk)
        more = kind is not None and want <= 0 and bool(reader.read(1))
        return b"".join(parts), kind, more


def _read_up_to(reader, n: int) -> bytes:
    """`n` bytes, fewer only at the end of the input (one read of a pipe or decompressor may
    return less)."""
    first = reader.read(n)
    if len(first) >= n or not first:
        return first
    parts = [first]
    n -= len(first)
    while n > 0:
        chunk = reader.read(n)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


# Reads of half a MiB: the allocator hands the same memory back read after read, where larger
# chunks land in fresh pages each time (a first touch costs ~3 µs a page here: 4 MiB reads of a
# dumpfile, the whole file over again in each process, were a tenth of a 64k-entry compile).
CHUNK = 512 << 10


def chunks(source, size: int = CHUNK) -> Iterator[bytes]:
    """The (decompressed) input in chunks of about `size` bytes, with a located error on failure."""
    stream = open_binary(source)
    try:
        reader = decompressing(stream)
        while True:
            try:
                chunk = reader.read(size)
            except _read_errors() as e:
                raise InputError(f"cannot read: {e}", source_name(source)) from None
            except MemoryError:
                raise
            except Exception as e:  # zstandard.ZstdError and friends
                raise InputError(f"cannot decompress: {e}", source_name(source)) from None
            if not chunk:
                return
            yield chunk
    finally:
        if _closes(source):
            stream.close()
