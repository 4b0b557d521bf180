"""fs-verity file digests (SHA-256 or SHA-512, 4 KiB blocks, no salt), as the kernel computes them.

composefs names store objects and fills `trusted.overlay.metacopy` with this digest, and
`--print-digest` is this digest over the image.  The Merkle tree is folded incrementally (a
level's full 4 KiB block is hashed into the next level as soon as it is complete), so a
streamed file of any size needs only a few KiB per level.

Speed: level 0 is nearly all the work; `block_hashes` does a chunk's in one comprehension, and
`hash_fd` with a pool (`hash_pool`) hashes a big file's chunks there while it reads the next
ones, on every core (hashlib releases the GIL per 4 KiB block).  `reference_digest` is the
plain level-by-level tree every fast path is tested against.

The empty file follows the kernel and the `fsverity` tool: its root hash is all zeros.
(composefs 1.0.8's `measure-file` hashes one zero block instead; see format note §10.)

SHA-256 is composefs' and the default; SHA-512 is composefs-rs' repository default.  The
algorithm is a parameter (`FsVerityAlgorithm`): the tree has 64-byte hashes, 64 per block,
and the descriptor says hash_algorithm 2.  A digest's length tells its algorithm
(`algorithm_of`), so images, dumpfiles and store names need no other marker.
"""

from __future__ import annotations

import _thread
import collections
import contextlib
import errno
import fcntl
import os
import stat
import struct
import sys
from collections.abc import Callable, Iterator

from cfsc.base.errors import UsageError
from cfsc.base.holes import data_extents, mostly_holes

TYPE_CHECKING = False  # typing's, without importing typing (start-up); type checkers read it as True
if TYPE_CHECKING:  # (concurrent.futures is ~8 ms of start-up: imported when a pool is made)
    from concurrent.futures import Executor, Future

BLOCK_SIZE = 4096
DIGEST_SIZE = 32  # SHA-256's, the default
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_READ_CHUNK = 1 << 20
_POOL_CHUNK = 4 << 20  # level 0 of this much per pool task: ~3 ms of hashing
_POOL_AHEAD = 4  # chunks read ahead of the one being folded
SWITCH_INTERVAL = 0.0005  # seconds: `short_gil_switches`
_pool: Executor | None = None
_spare_chunks: list[bytearray] = []  # chunk buffers of finished `_hash_fd_pooled` calls
_pool_lock = _thread.allocate_lock()  # threading.Lock itself: threading is ~1 ms of start-up

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


class FsVerityAlgorithm:
    """A hash fs-verity can use: its name (`fsverity digest --hash-alg`), the id the
    descriptor and overlayfs' metacopy carry (FS_VERITY_HASH_ALG_*), its digest size.
    (A plain class: a dataclass is made by `exec`, a few ms of every command's start-up.)"""

    __slots__ = ("name", "id", "size", "new")
    new: Callable  # the hashlib constructor: set on first use (`__getattr__`)

    def __init__(self, name: str, id: int, size: int) -> None:  # noqa: A002
        self.name, self.id, self.size = name, id, size

    def __getattr__(self, attr: str) -> Callable:
        # Only for `new`, only once: hashlib (with OpenSSL) is ~4 ms of start-up, which
        # `cfsc compile DUMP -o IMG` never hashes with; the hot loops then read a plain slot.
        if attr != "new":
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")
        import hashlib

        self.new = getattr(hashlib, self.name)
        return self.new

    def __repr__(self) -> str:
        return f"FsVerityAlgorithm({self.name})"


SHA256 = FsVerityAlgorithm("sha256", FS_VERITY_HASH_ALG_SHA256, 32)
SHA512 = FsVerityAlgorithm("sha512", FS_VERITY_HASH_ALG_SHA512, 64)
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


def block_hashes(data: bytes | bytearray | memoryview, algorithm: FsVerityAlgorithm = SHA256) -> bytes:
    """One Merkle level: the hash of every 4 KiB block of `data` (the last one zero-padded),
    concatenated.  Level 0 of a file is nearly all of its hashing work: one comprehension per
    chunk keeps the per-block Python work to a slice and a call, and hashlib hashes each block
    with the GIL released, so threads hashing different chunks run on different cores."""
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    n = len(mv)
    full = n - n % BLOCK_SIZE
    sha = algorithm.new
    hashes = [sha(mv[off:off + BLOCK_SIZE]).digest() for off in range(0, full, BLOCK_SIZE)]
    if full < n:
        hashes.append(sha(bytes(mv[full:]) + _ZERO_BLOCK[n - full:]).digest())
    return b"".join(hashes)


def root_of_level0(hashes: bytes | bytearray, algorithm: FsVerityAlgorithm = SHA256) -> bytes:
    """The root hash of a whole level 0 (the hashes of every data block, in order)."""
    if not hashes:
        return bytes(algorithm.size)  # empty file: the kernel's all-zero root
    while len(hashes) > algorithm.size:
        hashes = block_hashes(hashes, algorithm)
    return bytes(hashes)


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
        while hashes:
            if level == len(levels):
                levels.append(bytearray())
                self._counts.append(0)
            buf = levels[level]
            buf += hashes
            self._counts[level] += len(hashes) // self._alg.size
            full = len(buf) - len(buf) % BLOCK_SIZE
            if not full:
                return
            hashes = block_hashes(memoryview(buf)[:full], self._alg)
            del buf[:full]
            level += 1

    def update(self, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        n = len(mv)
        if not n:
            return
        pos = 0
        partial = self._partial
        if partial:
            pos = min(BLOCK_SIZE - len(partial), n)
            partial += mv[:pos]
            self._size += pos
            if len(partial) < BLOCK_SIZE:
                return
            self._add_hashes(0, self._alg.new(partial).digest())
            partial.clear()
        end = pos + (n - pos) // BLOCK_SIZE * BLOCK_SIZE
        if end > pos:
            self.update_hashes(block_hashes(mv[pos:end], self._alg), end - pos)
        if end < n:
            partial += mv[end:]
            self._size += n - end

    def update_hashes(self, hashes: bytes, size: int) -> None:
        """Add `size` bytes whose level-0 hashes a caller computed (`block_hashes`, maybe in
        another thread).  They must start on a block boundary (nothing partial pending) and
        `size` must be whole blocks, except for the file's very last update."""
        if self._partial:
            raise ValueError("update_hashes after an update that left a partial block")
        if size % BLOCK_SIZE:
            # the file's tail block: kept as partial so that root_hash() pads it, as update() does
            raise ValueError("update_hashes takes whole blocks; give the tail to update()")
        self._size += size
        self._add_hashes(0, hashes)

    def update_zeros(self, n: int) -> None:
        """`n` zero bytes: a file's hole.  Whole zero blocks all hash alike, and so do whole
        blocks of equal hashes one level up, so a run costs a few hashes per level whatever
        its length: a sparse file's terabyte of holes is hashed in microseconds."""
        if n <= 0:
            return
        if self._partial:
            take = min(BLOCK_SIZE - len(self._partial), n)
            self.update(_ZERO_BLOCK[:take])
            n -= take
        blocks, tail = divmod(n, BLOCK_SIZE)
        if blocks:
            self._size += blocks * BLOCK_SIZE
            self._add_repeated(0, self._alg.new(_ZERO_BLOCK).digest(), blocks)
        if tail:
            self.update(_ZERO_BLOCK[:tail])

    def _add_repeated(self, level: int, digest: bytes, times: int) -> None:
        """`_add_hashes(level, digest * times)` without the repetition: the level's pending
        block is filled first, then whole blocks of copies go up as one repeated hash."""
        per = BLOCK_SIZE // self._alg.size
        while times:
            if level == len(self._levels):
                self._levels.append(bytearray())
                self._counts.append(0)
            pending = len(self._levels[level]) // self._alg.size
            if pending or times < per:
                take = min(times, per - pending)
                self._add_hashes(level, digest * take)
                times -= take
                continue
            blocks = times // per
            self._counts[level] += blocks * per
            self._add_repeated(level + 1, self._alg.new(digest * per).digest(), blocks)
            times -= blocks * per  # (fewer than `per` left: they wait in this level's block)

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
    """The digest of content held whole in memory (level 0 in one pass, then the levels above)."""
    n = len(data)
    if 0 < n <= BLOCK_SIZE:  # the common small file: its one block is the root
        return descriptor_digest(algorithm.new(bytes(data) + _ZERO_BLOCK[n:]).digest(), n, algorithm)
    return descriptor_digest(root_of_level0(block_hashes(data, algorithm), algorithm), n, algorithm)


def reference_digest(data: bytes, algorithm: FsVerityAlgorithm = SHA256) -> bytes:
    """The plain sequential Merkle tree, level by level, as the kernel documents it: the
    yardstick the fast paths (`block_hashes`, `FsVerityHasher`, `hash_fd` with a pool) are
    tested against."""
    if not data:
        root = bytes(algorithm.size)
    else:
        level = data
        while True:
            padded = level + bytes(-len(level) % BLOCK_SIZE)
            level = b"".join(algorithm.new(padded[i:i + BLOCK_SIZE]).digest()
                             for i in range(0, len(padded), BLOCK_SIZE))
            if len(level) == algorithm.size:
                root = level
                break
    return descriptor_digest(root, len(data), algorithm)


def digest_fd(fd: int, algorithm: FsVerityAlgorithm = SHA256, pool: Executor | None = None) -> bytes:
    """Digest of everything readable from `fd` from its current position (pipes work too)."""
    return hash_fd(fd, algorithm=algorithm, pool=pool)[0]


def hash_fd(fd: int, offset: int | None = None, out: int | None = None,
            algorithm: FsVerityAlgorithm = SHA256, pool: Executor | None = None,
            poll: Callable[[], None] | None = None) -> tuple[bytes, int]:
    """Digest and length of what `fd` holds from `offset` (None: its current position) to
    its end; with `out`, every byte read is also written there (a copy hashed on the way).

    With `pool`, level 0 of each chunk is hashed there while the next chunks are read (and
    written to `out`): a big file's hashing spreads over the pool's threads.  A regular file
    that is mostly holes is read by its map instead (`holes`; `out` keeps the holes).
    `poll()` runs before each read (it may raise, to cancel; not with `pool`)."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and mostly_holes(st):
        try:
            start = offset if offset is not None else os.lseek(fd, 0, os.SEEK_CUR)
        except OSError as e:
            if e.errno != errno.ESPIPE:
                raise  # (ESPIPE: not seekable after all, read as it reads below)
        else:
            digest, total = hash_by_extents(fd, start, max(0, st.st_size - start), out, algorithm, poll)
            if offset is None:
                os.lseek(fd, start + total, os.SEEK_SET)  # (read to the end, as the loop below does)
            return digest, total
    if pool is not None:
        return _hash_fd_pooled(fd, offset, out, pool, algorithm)
    h = FsVerityHasher(algorithm)
    buf = bytearray(_READ_CHUNK)
    mv = memoryview(buf)
    total = 0
    while True:
        if poll is not None:
            poll()
        n = os.readv(fd, [buf]) if offset is None else os.preadv(fd, [buf], offset + total)
        if n == 0:
            return h.digest(), total
        chunk = mv[:n]
        h.update(chunk)
        total += n
        if out is not None:
            write_all(out, chunk)


def hash_by_extents(fd: int, start: int, size: int, out: int | None,
                    algorithm: FsVerityAlgorithm = SHA256,
                    poll: Callable[[], None] | None = None) -> tuple[bytes, int]:
    """`hash_fd` of the `size` bytes from `start`, reading only the data regions the file
    system maps (`holes.data_extents`), the holes between hashed by runs; with `out` (a new
    file, its position at 0) the data is written at its offsets there, the holes left holes.
    `poll()` runs before each read (it may raise, to cancel).  The map is found by seeking:
    `fd`'s position is put back.  A file that shrinks meanwhile gives a count short of `size`
    (callers compare it with the size they expect, as for a plain read)."""
    hasher = FsVerityHasher(algorithm)
    buf = bytearray(_READ_CHUNK)
    at = start  # hashed up to here
    end = start + size
    here = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        for offset, length in data_extents(fd, start, end):
            hasher.update_zeros(offset - at)
            at = offset
            if out is not None:
                os.lseek(out, offset - start, os.SEEK_SET)
            stop = offset + length
            while at < stop:
                if poll is not None:
                    poll()
                n = os.preadv(fd, [memoryview(buf)[:min(_READ_CHUNK, stop - at)]], at)
                if not n:  # it shrank: it ends here
                    end = stop = at
                    break
                chunk = memoryview(buf)[:n]
                hasher.update(chunk)
                if out is not None:
                    write_all(out, chunk)
                at += n
            if at == end:
                break
        hasher.update_zeros(end - at)
        end = min(end, max(start, os.fstat(fd).st_size))  # (cut inside a hole: the map did not show it)
    finally:
        os.lseek(fd, here, os.SEEK_SET)
    if out is not None:
        os.ftruncate(out, end - start)  # (a hole at the end: nothing written there)
    return hasher.digest(), end - start


def _hash_fd_pooled(fd: int, offset: int | None, out: int | None, pool: Executor,
                    algorithm: FsVerityAlgorithm) -> tuple[bytes, int]:
    """`hash_fd` with level 0 in `pool`: chunks of whole blocks (each read filled up, so that
    only the last is partial), at most `_POOL_AHEAD` in flight, folded in file order."""
    h = FsVerityHasher(algorithm)
    free = [_take_chunk()]  # more are taken as the file proves long
    made = 1
    inflight: collections.deque[tuple[Future, bytearray, int]] = collections.deque()
    total = 0
    end = False
    try:
        while not end:
            buf = free.pop()
            n = fill(fd, buf, None if offset is None else offset + total)
            end = n < len(buf)  # only the last chunk may end inside a block
            if end and not total:  # all in one chunk: not worth a trip to the pool
                free.append(buf)
                if out is not None:
                    write_all(out, memoryview(buf)[:n])
                return digest_bytes(memoryview(buf)[:n], algorithm), n
            if not free and made <= _POOL_AHEAD:
                free.append(_take_chunk())
                made += 1
            if n:
                chunk = memoryview(buf)[:n]
                inflight.append((pool.submit(block_hashes, chunk[:n - n % BLOCK_SIZE], algorithm), buf, n))
                if out is not None:
                    write_all(out, chunk)
                total += n
            else:
                free.append(buf)
            while inflight and (end or not free):
                future, done, size = inflight.popleft()
                whole = size - size % BLOCK_SIZE
                h.update_hashes(future.result(), whole)
                if whole < size:
                    h.update(memoryview(done)[whole:size])
                free.append(done)
        return h.digest(), total
    finally:
        for future, _buf, _size in inflight:
            future.cancel()
        for future, buf, _size in inflight:
            if not future.cancelled():
                future.exception()  # wait: the buffer must outlive the thread hashing it
            free.append(buf)
        _spare_chunks.extend(free[:_POOL_AHEAD + 1 - len(_spare_chunks)])


def _take_chunk() -> bytearray:
    """A chunk buffer, reused across files: a new one costs its page faults every time."""
    try:
        return _spare_chunks.pop()
    except IndexError:
        return bytearray(_POOL_CHUNK)


def fill(fd: int, buf: bytearray | memoryview, offset: int | None = None) -> int:
    """Read until `buf` is full or the end (from `offset`; None: the fd's position), the
    count read: a short read (a pipe) must not split a block, nor end a file early."""
    mv = memoryview(buf)
    got = 0
    while got < len(buf):
        part = mv[got:]
        n = os.readv(fd, [part]) if offset is None else os.preadv(fd, [part], offset + got)
        if n == 0:
            break
        got += n
    return got


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of `data` (os.write may write less)."""
    data = memoryview(data).cast("B")
    while data:
        data = data[os.write(fd, data):]


@contextlib.contextmanager
def short_gil_switches() -> Iterator[None]:
    """While threads hash in 4 KiB calls beside a thread busy in Python (a scan, a parser): a
    0.5 ms GIL switch interval instead of 5 ms.  A hashing thread needs the GIL back after
    every block, and waits up to the interval for it; at 5 ms the hashing hardly overlapped
    the Python work (a directory compile, a tar layer: 15-25% less wall time here)."""
    switch = sys.getswitchinterval()
    sys.setswitchinterval(min(switch, SWITCH_INTERVAL))
    try:
        yield
    finally:
        sys.setswitchinterval(switch)


def hash_pool() -> Executor:
    """The process's shared pool for level-0 chunks, one thread per usable core (made on first
    use).  Only leaf work goes there (`block_hashes`), so callers in any thread may wait on it."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                from concurrent.futures import ThreadPoolExecutor

                _pool = ThreadPoolExecutor(len(os.sched_getaffinity(0)) or 1, thread_name_prefix="cfsc-hash")
    return _pool


def close_hash_pool() -> None:
    """End the shared pool's threads (it is made again on next use): a long-lived process that
    is about to fork wants no idle threads (`cfsc.base.forked.usable`)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True)


def digest_file(path: str | bytes | os.PathLike, algorithm: FsVerityAlgorithm = SHA256,
                pool: Executor | None = None) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return digest_fd(fd, algorithm, pool)
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
