"""Opening inputs: paths or `-` for stdin, with compression detected by magic bytes."""

from __future__ import annotations

import gzip
import io
import lzma
import os
import sys
from collections.abc import Iterator
from typing import BinaryIO

from .errors import InputError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"


def source_name(source) -> str:
    if source == "-" or source is None:
        return "<stdin>"
    if isinstance(source, (str, bytes, os.PathLike)):
        return os.fsdecode(source)
    return getattr(source, "name", "<stream>")


def open_binary(source) -> BinaryIO:
    """A readable binary stream for a path, `-` (stdin) or an already open stream."""
    if source == "-":
        return sys.stdin.buffer
    if isinstance(source, (str, bytes, os.PathLike)):
        try:
            return open(source, "rb")
        except OSError as e:
            raise InputError(f"cannot open: {e.strerror}", source_name(source)) from None
    return source


def decompressing(stream: BinaryIO) -> BinaryIO:
    """Wrap `stream` in a decompressor if it starts with gzip, zstd or xz magic."""
    buffered = stream if hasattr(stream, "peek") else io.BufferedReader(stream)  # type: ignore[arg-type]
    head = buffered.peek(6)[:6]
    if head.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
    if head.startswith(ZSTD_MAGIC):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)  # type: ignore[return-value]
    if head.startswith(XZ_MAGIC):
        return lzma.LZMAFile(buffered, "rb")  # type: ignore[return-value]
    return buffered


def read_all(source) -> bytes:
    """The whole (decompressed) input as bytes, with a located error on failure."""
    stream = open_binary(source)
    try:
        return decompressing(stream).read()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise InputError(f"cannot read: {e}", source_name(source)) from None
    except Exception as e:  # zstandard.ZstdError and friends
        raise InputError(f"cannot decompress: {e}", source_name(source)) from None
    finally:
        if stream is not sys.stdin.buffer and isinstance(source, (str, bytes, os.PathLike)):
            stream.close()


def chunks(source, size: int = 1 << 22) -> Iterator[bytes]:
    """The (decompressed) input in chunks of about `size` bytes, with a located error on failure."""
    stream = open_binary(source)
    try:
        reader = decompressing(stream)
        while True:
            try:
                chunk = reader.read(size)
            except (OSError, EOFError, lzma.LZMAError) as e:
                raise InputError(f"cannot read: {e}", source_name(source)) from None
            except Exception as e:  # zstandard.ZstdError and friends
                raise InputError(f"cannot decompress: {e}", source_name(source)) from None
            if not chunk:
                return
            yield chunk
    finally:
        if stream is not sys.stdin.buffer and isinstance(source, (str, bytes, os.PathLike)):
            stream.close()
