"""fs-verity file digests (SHA-256 or SHA-512, 4 KiB blocks, no salt), as the kernel computes them.

composefs names store objects and fills `trusted.overlay.metacopy` with this digest, and
`--print-digest` is this digest over the image.  The Merkle tree is folded incrementally (a
level's full 4 KiB block is hashed into the next level as soon as it is complete), so a
streamed file of any size needs only a few KiB per level.

The empty file follows the kernel and the `fsverity` tool: its root hash is all zeros.
(composefs 1.0.8's `measure-file` hashes one zero block instead; see format note §10.)

SHA-256 is composefs' and the default; SHA-512 is composefs-rs' repository default.  The
algorithm is a parameter (`FsVerityAlgorithm`): the tree has 64-byte hashes, 64 per block,
and the descriptor says hash_algorithm 2.  A digest's length tells its algorithm
(`algorithm_of`), so images, dumpfiles and store names need no other marker.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cfsc.base.errors import UsageError

BLOCK_SIZE = 4096
DIGEST_SIZE = 32  # SHA-256's, the default
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_READ_CHUNK = 1 << 20

# struct fsverity_descriptor (include/uapi/linux/fsverity.h): version, hash_algorithm,
# log_blocksize, salt_size, sig_size (reserved), data_size, root_hash[64], salt[32],
# reserved[144].
FSVERITY_DESCRIPTOR = struct.Struct("<BBBBIQ64s32s144x")
assert FSVERITY_DESCRIPTOR.size == 256
FS_VERITY_HASH_ALG_SHA256 = 1
FS_VERITY_HASH_ALG_SHA512 = 2
# struct fsverity_digest (include/uapi/linux/fsverity.h): digest_algorithm, digest_size, then
# the digest; FS_IOC_MEASURE_VERITY = _IOWR('f', 134, struct fsverity_digest).
FSVERITY_DIGEST = struct.Struct("=HH")
FS_IOC_MEASURE_VERITY = 0xC0046686


@dataclass(frozen=True, slots=True)
class FsVerityAlgorithm:
    """A hash fs-verity can use: its name (`fsverity digest --hash-alg`), the id the
    descriptor and overlayfs' metacopy carry (FS_VERITY_HASH_ALG_*), its digest size."""

    name: str
    id: int
    size: int
    new: Callable  # the hashlib constructor
    fresh: Any  # a fresh hashlib context, copied per block (never updated)


SHA256 = FsVerityAlgorithm("sha256", FS_VERITY_HASH_ALG_SHA256, 32, hashlib.sha256, hashlib.sha256())
SHA512 = FsVerityAlgorithm("sha512", FS_VERITY_HASH_ALG_SHA512, 64, hashlib.sha512, hashlib.sha512())
ALGORITHMS = {a.name: a for a in (SHA256, SHA512)}
_BY_SIZE = {a.size: a for a in (SHA256, SHA512)}


def algorithm_named(name: str, where: str = "--hash") -> FsVerityAlgorithm:
    """The algorithm a user named (`--hash`, `Options.hash`)."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise UsageError(f"hash {name!r}: expected {' or '.join(ALGORITHMS)}", where) from None


def algorithm_of(digest: bytes) -> FsVerityAlgorithm | None:
    """The algorithm of a digest, told by its length (None: no fs-verity digest's length)."""
    return _BY_SIZE.get(len(digest))


class FsVerityHasher:
    """Incremental fs-verity digest: `update()` with any chunking, then `digest()`."""

    __slots__ = ("_alg", "_counts", "_levels", "_partial", "_size")

    def __init__(self, algorithm: FsVerityAlgorithm = SHA256) -> None:
        self._alg = algorithm
        self._size = 0
        self._partial = bytearray()  # data not yet forming a whole block
        self._levels: list[bytearray] = []  # per level: hashes not yet forming a block
        self._counts: list[int] = []  # per level: hashes produced so far

    def _add_hashes(self, level: int, hashes: bytes) -> None:
        """Append hashes to a level; every level block that fills is hashed into the next."""
        levels = self._levels
        new = self._alg.new
        size = self._alg.size
        while hashes:
            if level == len(levels):
                levels.append(bytearray())
                self._counts.append(0)
            buf = levels[level]
            buf += hashes
            self._counts[level] += len(hashes) // size
            full = len(buf) - len(buf) % BLOCK_SIZE
            if not full:
                return
            mv = memoryview(buf)
            hashes = b"".join([new(mv[off:off + BLOCK_SIZE]).digest() for off in range(0, full, BLOCK_SIZE)])
            mv.release()
            del buf[:full]
            level += 1

    def update(self, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data)
        n = len(mv)
        if not n:
            return
        self._size += n
        pos = 0
        partial = self._partial
        if partial:
            pos = min(BLOCK_SIZE - len(partial), n)
            partial += mv[:pos]
            if len(partial) < BLOCK_SIZE:
                return
            self._add_hashes(0, self._alg.new(partial).digest())
            partial.clear()
        end = pos + (n - pos) // BLOCK_SIZE * BLOCK_SIZE
        if end > pos:
            # One hashlib update per 4 KiB block (it releases the GIL, so digest threads
            # overlap), each on a copy of a fresh context: ~15% faster than constructing one
            # per block, which looks the algorithm up in OpenSSL 3 every time.
            fresh = self._alg.fresh
            hashes = []
            append = hashes.append
            for off in range(pos, end, BLOCK_SIZE):
                h = fresh.copy()
                h.update(mv[off:off + BLOCK_SIZE])
                append(h.digest())
            self._add_hashes(0, b"".join(hashes))
        if end < n:
            partial += mv[end:]

    def root_hash(self) -> bytes:
        levels = [bytearray(b) for b in self._levels]
        counts = list(self._counts)
        if self._partial:
            h = self._alg.new(bytes(self._partial) + bytes(BLOCK_SIZE - len(self._partial)))
            if not levels:
                levels.append(bytearray())
                counts.append(0)
            levels[0] += h.digest()
            counts[0] += 1
        if not counts:
            return bytes(self._alg.size)  # empty file: the kernel's all-zero root
        level = 0
        while True:
            if counts[level] == 1 and level == len(counts) - 1:
                return bytes(levels[level])
            buf = levels[level]
            if buf:
                buf += bytes(-len(buf) % BLOCK_SIZE)
                h = self._alg.new(buf).digest()
                if level + 1 == len(levels):
                    levels.append(bytearray())
                    counts.append(0)
                levels[level + 1] += h
                counts[level + 1] += 1
            level += 1

    def digest(self) -> bytes:
        return descriptor_digest(self.root_hash(), self._size, self._alg)


def descriptor_digest(root_hash: bytes, size: int, algorithm: FsVerityAlgorithm = SHA256) -> bytes:
    desc = FSVERITY_DESCRIPTOR.pack(1, algorithm.id, 12, 0, 0, size, root_hash, b"")
    return algorithm.new(desc).digest()


def digest_bytes(data: bytes | bytearray | memoryview, algorithm: FsVerityAlgorithm = SHA256) -> bytes:
    n = len(data)
    if 0 < n <= BLOCK_SIZE:  # the common small file: its one block is the root
        return descriptor_digest(algorithm.new(bytes(data) + _ZERO_BLOCK[n:]).digest(), n, algorithm)
    h = FsVerityHasher(algorithm)
    h.update(data)
    return h.digest()


def digest_fd(fd: int, algorithm: FsVerityAlgorithm = SHA256) -> bytes:
    """Digest of everything readable from `fd` from its current position (pipes work too)."""
    return hash_fd(fd, algorithm=algorithm)[0]


def hash_fd(fd: int, offset: int | None = None, out: int | None = None,
            algorithm: FsVerityAlgorithm = SHA256) -> tuple[bytes, int]:
    """Digest and length of what `fd` holds from `offset` (None: its current position) to
    its end; with `out`, every byte read is also written there (a copy hashed on the way)."""
    h = FsVerityHasher(algorithm)
    buf = bytearray(_READ_CHUNK)
    mv = memoryview(buf)
    total = 0
    while True:
        n = os.readv(fd, [buf]) if offset is None else os.preadv(fd, [buf], offset + total)
        if n == 0:
            return h.digest(), total
        chunk = mv[:n]
        h.update(chunk)
        total += n
        while out is not None and chunk:
            chunk = chunk[os.write(out, chunk):]


def digest_file(path: str | bytes | os.PathLike, algorithm: FsVerityAlgorithm = SHA256) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return digest_fd(fd, algorithm)
    finally:
        os.close(fd)


def payload_path(digest: bytes) -> bytes:
    """The store object name composefs uses for a digest: `ab/cdef…` (2 + 1 + 62 chars; a
    SHA-512 digest's, as composefs-rs names it: 2 + 1 + 126)."""
    h = digest.hex().encode()
    return h[:2] + b"/" + h[2:]


def kernel_digest(fd: int, algorithm: FsVerityAlgorithm = SHA256) -> bytes | None | bool:
    """The fs-verity digest the kernel keeps for a file; None if the file has none (or one
    of another algorithm), False if its file system cannot have one."""
    buf = bytearray(FSVERITY_DIGEST.pack(0, 64) + bytes(64))
    try:
        fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf)
    except OSError as e:
        return None if e.errno == errno.ENODATA else False  # ENOTTY, EOPNOTSUPP: no fs-verity here
    ident, size = FSVERITY_DIGEST.unpack_from(buf)
    if ident != algorithm.id or size != algorithm.size:
        return None
    return bytes(buf[4:4 + size])
