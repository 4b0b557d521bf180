"""A dumpfile cut into lines and batches, and the column stage of most batches run by a
forked child while the parser builds the tree.

The parser's fast path has two stages (`_Parser.parse_batch`): the column stage splits a
batch of lines and checks and converts its fields; the tree stage makes the inodes and
inserts them.  On a large file the child reads the same file on its own and runs the column
stage of three batches in four, sending each batch's columns (pickled) through a pipe; the
parser takes them in turn and runs only the tree stage of those, and both stages of the rest.
Three in four: the tree stage plus the handover costs about 40% of a batch, so that share
keeps both processes busy about equally.

The child only saves work: the parser reads every line itself, so the errors (and their
order) are those of the sequential parse, and when the child stops early -- an error of its
own, a file that changed under it -- the parser runs the column stage itself from there on.

Where a compile's time goes (issue 16; `bench/dump_profile.py` on the 64k-entry cs9 dump,
2 cores, medians of 9, C = mkcomposefs 1.0.8 at 301 ms that hour): start-up 34 ms; the load
132 ms (the column child's 93 ms of CPU beside it); the passes 70 ms on one core (hard links
18, version 10, overlay xattrs 11, order 11, shared xattrs 20); the writer 172 ms, its half
137 ms of CPU, the rest waiting for the child's half.  The second core idles for 104 ms, 26%
of the path.  Fresh pages cost ~3 µs each at first touch here: 9.2k of them in the load (the
tree itself, ~35 MB), 7.8k in the writer (copy-on-write after its fork, as the refcounts of
the tree's objects change): about 50 ms of the path.  Reading in half-MiB chunks without
joining them whole cut the load's from 14k (`streams.CHUNK`).  With both cores busy throughout
(557 ms of CPU in all) the command would take ~313 ms, under 1.25x C (376 ms): the target
needs the passes off the one-core path, and they walk one tree in one address space (a
forked helper pays copy-on-write for every page it reads), or that much less CPU per entry
(a native tree and writer).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator

from cfsc.base import forked
from cfsc.base.streams import chunks

BATCH = 8192
# Below this size the child's start and the handover cost more than they save.
FORK_MIN_BYTES = 2 << 20


class Lines:
    """The complete lines of chunked input, one list per chunk, in linear time and memory.

    A line is collected from its pieces once its newline arrives.  Iteration stops at a line
    longer than `limit`: its first `limit + 1` bytes are then in `long` (the same whatever
    the chunk sizes), after the lines before it were handed out.  `tail` is the unterminated
    last line once iteration ends.  `nul` says whether the latest list may hold a NUL.
    """

    __slots__ = ("chunks", "limit", "long", "tail", "nul")

    def __init__(self, chunks: Iterable[bytes], limit: int) -> None:
        self.chunks = chunks
        self.limit = limit
        self.long: bytes | None = None
        self.tail = b""
        self.nul = False

    def __iter__(self):
        limit = self.limit
        pending: list[bytes] = []  # pieces of the unfinished line
        size = 0
        for chunk in self.chunks:
            if b"\n" not in chunk:
                pending.append(chunk)
                size += len(chunk)
                if size > limit:
                    self.long = b"".join(pending)[:limit + 1]
                    return
                continue
            # Split the chunk as it is and join only the line that began before it: joining
            # the whole chunk would copy megabytes into fresh pages (~3 µs a page here).
            lines = chunk.split(b"\n")
            nul = b"\0" in chunk
            if pending:
                pending.append(lines[0])
                lines[0] = b"".join(pending)
                nul = nul or b"\0" in lines[0]
            last = lines.pop()
            self.nul = nul
            if size + len(chunk) > limit and max(map(len, lines), default=0) > limit:
                for i, line in enumerate(lines):
                    if len(line) > limit:
                        if i:
                            yield lines[:i]
                        self.long = line[:limit + 1]
                        return
            if len(last) > limit:
                yield lines
                self.long = last[:limit + 1]
                return
            pending = [last] if last else []
            size = len(last)
            yield lines
        self.tail = b"".join(pending)


def batches(lines_of: Lines, fast: bool) -> Iterator[tuple[int | None, list[bytes], int]]:
    """`(job, lines, first line number)`: runs of at most BATCH lines for the fast path,
    numbered 0, 1, 2 …, or (job None) a chunk's lines to parse one by one (a NUL in them)."""
    line_no = 0
    job = 0
    for lines in lines_of:
        if lines_of.nul or not fast:
            yield None, lines, line_no + 1
        else:
            for start in range(0, len(lines), BATCH):
                yield job, lines[start:start + BATCH], line_no + start + 1
                job += 1
        line_no += len(lines)


def _childs(job: int) -> bool:
    return job % 4 != 0


class ForkedColumns:
    """The child's side of the handover, as the parser sees it: `columns(job, …)` is the
    column stage of that batch, or `NONE` when the parser is to run it itself."""

    NONE = object()
    __slots__ = ("feeder",)

    def __init__(self, feeder: forked.Feeder) -> None:
        self.feeder: forked.Feeder | None = feeder

    @classmethod
    def start(cls, column_stage: Callable[[list[bytes]], tuple | None], source, line_max: int,
              min_bytes: int = FORK_MIN_BYTES, busy: bool = False) -> ForkedColumns | None:
        """A child running `column_stage` over the batches of `source`, when it is a regular
        file of `min_bytes` or more, and a child can run (`busy`: even when no processor
        is idle; tests)."""
        if not isinstance(source, (str, bytes, os.PathLike)) or source in ("-", b"-"):
            return None
        try:
            st = os.stat(source)
        except OSError:
            return None  # (the parser's own open reports it)
        if not stat.S_ISREG(st.st_mode) or st.st_size < min_bytes:
            return None
        if not (forked.usable() if busy else forked.worthwhile()):
            return None

        import pickle  # (start-up: only a large input gets here)

        def work(send: Callable[[bytes], None]) -> None:
            for job, lines, first in batches(Lines(chunks(source), line_max), True):
                if job is not None and _childs(job):
                    send(pickle.dumps((job, first, len(lines), column_stage(lines)), pickle.HIGHEST_PROTOCOL))

        return cls(forked.Feeder(work))

    def columns(self, job: int, first: int, n: int) -> object:
        if self.feeder is None or not _childs(job):
            return self.NONE
        message = self.feeder.next()
        if message is not None:
            import pickle

            got_job, got_first, got_n, columns = pickle.loads(message)
            if (got_job, got_first, got_n) == (job, first, n):
                return columns
        self.close()  # the child ended, or read other lines than the parser: no more from it
        return self.NONE

    def close(self) -> None:
        if self.feeder is not None:
            self.feeder.close()
            self.feeder = None
