"""Fuzz target: a large dumpfile (several batches and read chunks) parsed with a
forked child running the column stage of most batches, against the parse in one process.

Both must give the same tree or the same one-line error (class and text).  Mutations go
where the handover can go wrong: at batch and chunk boundaries (grammar mutations of a
window there, byte-level ones, a NUL that sends a chunk down the line-by-line path, a line
longer than LINE_MAX, CRLF line ends), a truncated file, or the whole input compressed (the
child decompresses on its own) and then maybe corrupted.  Each case writes its input to a
file, since the child reads the file itself.
"""

from __future__ import annotations

import gzip
import os
import random

from cfsc.base.errors import CfscError
from cfsc.base.streams import CHUNK  # the dumpfile reader's read size

from bench.fuzzing import dumpgrammar
from bench.fuzzing.mutators import generic

NAME = "dumpfile_forked"
TEST_CASES = 4  # each case parses megabytes twice: tests/test_fuzz.py runs a few only


def big_dump(lines_wanted: int, seed: int) -> bytes:
    """Directories of external and inline files, symlinks, hard links, escapes and xattrs,
    so every batch has lines for the column stage and lines for the one-by-one parse."""
    rng = random.Random(seed)
    lines = [b"/ 4096 40755 2 0 0 0 1700000000.0 - - - user.root=1"]
    d = 0
    while len(lines) < lines_wanted:
        lines.append(b"/d%04d 4096 40755 2 0 0 0 1700000000.0 - - - security.selinux=a_t" % d)
        for i in range(300):
            path = b"/d%04d/f%03d" % (d, i)
            r = rng.randrange(100) if i != 1 else 99  # (f001 a plain file: the hard links' target)
            if r < 2:
                lines.append(b"/d%04d/\\x41%03d 3 100644 1 0 0 0 1.5 - abc - user.x=%d" % (d, i, i % 3))
            elif r < 4 and i > 1:
                lines.append(b"%s 0 @100644 0 0 0 0 0.0 /d%04d/f001 - -" % (path, d))
            elif r < 12:
                lines.append(b"%s 9 120777 1 0 0 0 1700000000.0 ../target - -" % path)
            else:
                digest = b"%064x" % rng.getrandbits(256)
                lines.append(b"%s %d 100644 1 %d 0 0 1700000000.%d %s/%s - %s security.selinux=%s" % (
                    path, 100 + i, i % 2, rng.randrange(3), digest[:2], digest[2:], digest, (b"a_t", b"b_t")[i % 2]))
        d += 1
    return b"\n".join(lines) + b"\n"


def seeds() -> list[bytes]:
    # ~2.3 MB (one read chunk, over the 2 MiB fork threshold) and ~5.5 MB (two chunks)
    return [big_dump(4 * 8192 + 100, 1), big_dump(9 * 8192 + 4321, 2)]


def _boundary(data: bytes, rng: random.Random) -> int:
    """A byte offset near where the handover cuts: a batch boundary (every 8192 lines), a
    read chunk boundary, or anywhere."""
    r = rng.random()
    if r < 0.4:
        k = rng.randint(1, max(1, data.count(b"\n") // 8192))
        at = -1
        for _ in range(k * 8192 + rng.randint(-3, 3)):  # (bounded: at most ~10 batches)
            at = data.find(b"\n", at + 1)
            if at < 0:
                return rng.randrange(len(data) + 1)
        return at + 1
    if r < 0.7 and len(data) > CHUNK:
        return min(len(data), CHUNK * rng.randint(1, len(data) // CHUNK) + rng.randint(-300, 300))
    return rng.randrange(len(data) + 1)


def mutate(data: bytes, rng: random.Random) -> bytes:
    if data[:2] == b"\x1f\x8b":  # compressed: corrupt the stream itself
        return generic(data[:1 << 20], rng) + data[1 << 20:] if rng.random() < 0.5 else data[:rng.randrange(len(data))]
    op = rng.randrange(8)
    at = _boundary(data, rng)
    start = data.rfind(b"\n", 0, max(0, at - 1)) + 1  # a window of whole lines around `at`
    end = at
    for _ in range(rng.randint(1, 40)):
        nxt = data.find(b"\n", end)
        if nxt < 0:
            end = len(data)
            break
        end = nxt + 1
    window = data[start:end]
    if op <= 2:
        window = dumpgrammar.mutate(window, rng, 4)
    elif op == 3:
        window = generic(window, rng)
    elif op == 4:  # a NUL: that chunk's lines go one by one, and the batch numbering shifts
        cut = rng.randint(0, len(window))
        window = window[:cut] + b"\0" + window[cut:]
    elif op == 5:  # a line past LINE_MAX (about 80 KiB), in some field
        field = rng.choice((b"/p" + b"x" * 70000, b"x" * 90000, b"user.a=" + b"v" * 90000))
        window = window + (field if rng.random() < 0.5 else b"/long 0 100644 1 0 0 0 0.0 - - - " + field) + b"\n"
    elif op == 6:
        return data[:at] if rng.random() < 0.7 else gzip.compress(data, 1, mtime=0)
    else:
        window = window.replace(b"\n", b"\r\n")
    return data[:start] + window + data[end:]


def outcome(path: str, strict: bool, forked: bool) -> tuple:
    """("ok", tree signature) or ("error", class name, message) of one parse of `path`."""
    from cfsc.base.streams import chunks
    from cfsc.frontends.dumpfile import LINE_MAX, _Parser
    from cfsc.frontends.dumpfile_stream import ForkedColumns

    parser = _Parser("x.dump", strict)
    helper = ForkedColumns.start(parser.batch_columns, path, LINE_MAX, min_bytes=0, busy=True) if forked else None
    if forked and helper is None:
        raise AssertionError("no child could be forked: nothing would be compared")
    try:
        tree = parser.parse(chunks(path), helper)
    except CfscError as e:
        return ("error", type(e).__name__, str(e))
    finally:
        if helper is not None:
            helper.close()
    return ("ok", dumpgrammar.signature(tree))


def run(data: bytes, workdir: str) -> None:
    from cfsc.base import fsverity

    fsverity.close_hash_pool()  # (its idle threads would stop the fork: then nothing is compared)
    path = os.path.join(workdir, "in.dump")
    with open(path, "wb") as f:
        f.write(data)
    for strict in (False, True):
        sequential = outcome(path, strict, False)
        with_child = outcome(path, strict, True)
        if with_child != sequential:
            raise AssertionError(f"forked parse {_short(with_child)} != sequential {_short(sequential)} (strict={strict})")


def _short(result: tuple) -> str:
    return "ok" if result[0] == "ok" else f"{result[1]}: {result[2]}"
