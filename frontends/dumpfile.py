"""composefs dumpfile → tree, exactly as `mkcomposefs --from-file` 1.0.8 reads it.

Format note §7.  One record per `\\n`-terminated line:

    PATH SIZE MODE NLINK UID GID RDEV SEC.NSEC PAYLOAD CONTENT DIGEST [KEY=VALUE ...]

Lenient by default, like upstream; `Options.strict` adds upstream's `CFS_PARSE_STRICT`
rules (final newline, no rdev on non-devices, symlink SIZE = target length, no symlink
content).  Every rejection names `file:line:FIELD` and the rule; the checks run in upstream's
order so the first error reported is the one upstream would hit.  Two inputs upstream
accepts are refused (README, "Differences"): a DIGEST of fewer than 64 hex digits on a
regular file, a missing one included (upstream fills the rest from uninitialised memory), and
a line longer than any record within the limits (LINE_MAX), refused before it is read whole.
One extension: a DIGEST of exactly 128 hex digits is a SHA-512 fs-verity digest (composefs-rs'
algorithm); upstream would read its first 64 digits as a SHA-256 one.

Speed: a line costs one `split`, `isdigit` fast paths for the integers, unescaping only when
a field holds a backslash, and a cache from the raw xattr section to its (interned) xattr
tuple, since real trees repeat a few xattr sets many times.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from itertools import chain, compress, repeat, zip_longest

from cfsc.backends.dumptext import BadEscape, unescape
from cfsc.base import limits
from cfsc.base.errors import DumpfileError
from cfsc.base.options import Options
from cfsc.base.streams import chunks, source_name
from cfsc.base.tree import NO_XATTRS as EMPTY
from cfsc.base.tree import S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Inode, Tree
from cfsc.frontends.dumpfile_stream import ForkedColumns, Lines, batches

FIELDS = ("PATH", "SIZE", "MODE", "NLINK", "UID", "GID", "RDEV", "MTIME", "PAYLOAD", "CONTENT", "DIGEST")
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1

# strtoull(): optional leading white space and sign, then digits up to the end of the field.
_DEC = re.compile(rb"[ \t\n\v\f\r]*([+-]?)([0-9]+)\Z")
_OCT = re.compile(rb"[ \t\n\v\f\r]*([+-]?)([0-7]+)\Z")
_HEX = re.compile(rb"(?:[0-9a-fA-F]{2})*")
_MTIMES = re.compile(rb"(?:[0-9]{1,18}\.[0-9]{1,18}\n)*")  # a column of plain SEC.NSEC, one per line


def sniff(head: bytes) -> bool:
    """A dumpfile starts with its root record: `/ ` then a number.  Text whose first line is
    some other record (a path starting with `/`, or any path then SIZE and MODE) is taken too:
    the parser's located error on it says more than "cannot tell the format".  Nothing else
    starts so (tar headers and images hold NULs, JSON starts with `{`)."""
    if re.match(rb"/ [ \t+-]*[0-9]+ [ \t+-]*[0-7]+ ", head) is not None:
        return True
    line = head.split(b"\n", 1)[0]
    if not line or re.search(rb"[\x00-\x08\x0e-\x1f\x7f]", line):
        return False
    return line.startswith(b"/") or re.match(rb"\S+[ \t]+[0-9]+[ \t]+@?[0-7]+(?:[ \t]|\Z)", line) is not None


CACHE_LIMIT = 1 << 16
MAX_EXTERNAL_SIZE = limits.MAX_EXTERNAL_SIZE

# The longest text each field of a record within the composefs limits needs, every byte of a
# string written as `\xHH` at worst: paths up to PATH_MAX bytes (a deeper path cannot be
# used through the kernel in one call), payloads below PATH_MAX, inline content up to its
# limit, a digest of 128 hex digits (SHA-512), integers with sign and a few leading zeros, and
# upstream's own cap on the xattr section ("Too many xattrs").  A longer line is refused
# as soon as its first LINE_MAX + 1 bytes are read, so a hostile line is never held whole.
INTEGER_TEXT_MAX = 32
XATTR_SECTION_MAX = 65535
FIELD_TEXT_MAX = (
    4 * limits.PATH_MAX,                       # PATH
    INTEGER_TEXT_MAX,                          # SIZE
    INTEGER_TEXT_MAX + 1,                      # MODE (with '@')
    INTEGER_TEXT_MAX,                          # NLINK
    INTEGER_TEXT_MAX,                          # UID
    INTEGER_TEXT_MAX,                          # GID
    INTEGER_TEXT_MAX,                          # RDEV
    2 * INTEGER_TEXT_MAX + 1,                  # MTIME
    4 * (limits.PATH_MAX - 1),                 # PAYLOAD
    4 * limits.INLINE_CONTENT_MAX,             # CONTENT
    4 * 128,                                   # DIGEST
    XATTR_SECTION_MAX,                         # XATTRS
)
LINE_MAX = sum(FIELD_TEXT_MAX) + len(FIELDS)  # + the separators


def dir_key(path: bytes) -> bytes:
    """A directory's key in the parser's table: its names joined by single '/'s.  Upstream
    skips every run of '/' between names, so `d`, `/d/`, `//d` and `/a//b` are all fine; the
    one normalisation here serves parent lookups and directory records alike."""
    key = path[1:] if path[:1] == b"/" else path
    if b"//" in path or key[:1] == b"/" or key[-1:] == b"/":
        key = b"/".join(p for p in path.split(b"/") if p)
    return key


def _mark(slow: bytearray, i: int) -> int:
    slow[i] = 1
    return 0


def _decimal_column(column: tuple, slow: bytearray) -> list[int]:
    """Plain base-10 fields as ints; odd ones (signs, white space, huge) flagged slow.

    A column of few distinct values (ids, link counts; its head tells) converts each once."""
    distinct = set(column) if len(set(column[:64])) * 4 <= min(64, len(column)) else column
    if len(distinct) * 4 <= len(column):
        if all(map(bytes.isdigit, distinct)) and max(map(len, distinct)) < 20:
            return list(map({t: int(t) for t in distinct}.__getitem__, column))
    elif all(map(bytes.isdigit, column)) and max(map(len, column)) < 20:
        return list(map(int, column))
    return [int(t) if t.isdigit() and len(t) < 20 else _mark(slow, i) for i, t in enumerate(column)]


def _strtoull(text: bytes, pattern: re.Pattern) -> int | None:
    m = pattern.match(text)
    if m is None:
        return None
    value = int(m.group(2), 8 if pattern is _OCT else 10)
    if value > U64:
        return U64  # ERANGE: strtoull saturates, and upstream does not look at errno
    if m.group(1) == b"-":
        value = -value & U64
    return value


def _digest(text: bytes) -> bytes | None:
    """The digest upstream reads from DIGEST: its first 64 hex digits (what follows is
    ignored), or None when there are fewer -- upstream then leaves the rest of the digest
    uninitialised, so such a line has no defined meaning and is refused.  Exactly 128 hex
    digits are a SHA-512 digest (cfsc's extension; upstream takes their first half)."""
    if len(text) == 128 and not text.translate(None, b"0123456789abcdefABCDEF"):
        return bytes.fromhex(text.decode("ascii"))
    if len(text) == 64:
        try:
            digest = bytes.fromhex(text.decode("ascii"))
        except ValueError:
            digest = b""
        if len(digest) == 32:  # (fromhex skips white space, which upstream stops at)
            return digest
    good = _HEX.match(text).group(0)  # type: ignore[union-attr]
    return bytes.fromhex(good[:64].decode()) if len(good) >= 64 else None


class _Parser:
    """State of one parse.  Kept as a class so the hot loop reads locals, not globals."""

    def __init__(self, name: str, strict: bool, fast: bool = True) -> None:
        self.name = name
        self.strict = strict
        self.fast = fast  # False: every line through parse_line (tests compare both paths)
        self.root: Inode | None = None
        self.dirs: dict[bytes, Inode] = {}  # canonical path (no leading '/') → directory
        self.fixups: list[tuple[Inode, str, bytes | None, int]] = []  # (parent, name, target, line)
        self.placeholders: dict[int, Inode] = {}  # id(placeholder) → placeholder
        self.link_to: dict[int, Inode] = {}  # id(placeholder) → what it was linked to
        # Raw xattr section -> its tuple, and (key, value) -> the one pair object: real trees
        # repeat a few sets and labels many times.  Both are bounded (cleared when full) so a
        # tree of unique xattrs does not pay for a huge cache.
        self.xattr_cache: dict[bytes, tuple] = {}
        self.have = len(FIELDS)  # how many fields the line in parse_line has
        self.pairs: dict[tuple[bytes, bytes], tuple[bytes, bytes]] = {}

    def fail(self, line: int, field: str, what: str) -> DumpfileError:
        return DumpfileError(what, self.name, line, field)

    def bad_field(self, line: int, field: str, text: bytes, what: str) -> DumpfileError:
        """The error for a field's value, or "missing field" when the line ended before the
        field (upstream reads a missing field as empty, so the same rules refuse it)."""
        if text or FIELDS.index(field) < self.have:
            return self.fail(line, field, what)
        return self.fail(line, field, f"missing field {field}: the line has {self.have} of the "
                                      f"{len(FIELDS)} fields {' '.join(FIELDS)}")

    def unescape(self, text: bytes, line: int, field: str) -> bytes:
        if b"\\" not in text:
            return text
        try:
            return unescape(text)
        except BadEscape as e:
            raise self.fail(line, field, f"invalid escape {e.args[0]!r}: expected \\\\, \\n, \\r, \\t or \\xHH") from None

    def integer(self, text: bytes, line: int, field: str) -> int:
        if text.isdigit():
            value = int(text)
            return min(value, U64)
        value = _strtoull(text, _DEC)
        if value is None:
            raise self.bad_integer(text, line, field)
        return value

    def lookup_parent(self, path: bytes, line: int) -> tuple[Inode, bytes]:
        head, _slash, name = path.rpartition(b"/")
        key = dir_key(head)
        parent = self.dirs.get(key)
        if parent is None:
            parent = self._walk_parent(key, path, line)
        return parent, name

    def _walk_parent(self, key: bytes, path: bytes, line: int) -> Inode:
        """Slow path: find why the parent is not a known directory (upstream's messages)."""
        assert self.root is not None
        node = self.root
        parts = [p for p in key.split(b"/") if p]
        for i, part in enumerate(parts):
            child = node.children.get(part) if node.children is not None else None
            if child is None:
                where = "/" + b"/".join(parts[: i + 1]).decode("utf-8", "backslashreplace")
                raise self.fail(line, "PATH", f"parent directory {where} missing: expected its record on an earlier line")
            node = child
        raise self.fail(line, "PATH", "parent is not a directory")

    def parse(self, chunks: Iterable[bytes], helper: ForkedColumns | None = None) -> Tree:
        """Parse a dumpfile given as chunks of any size (so big inputs are never held whole);
        `helper` hands over the column stage of some batches, computed by a forked child."""
        line_no = 0
        lines_of = Lines(chunks, LINE_MAX)
        for job, batch, first in batches(lines_of, self.fast):
            if job is None:  # lines to take one by one
                for n, line in enumerate(batch, first):
                    self.parse_line(line, n)
            elif helper is not None and (columns := helper.columns(job, first, len(batch))) is not helper.NONE:
                self.insert_batch(batch, first, columns)
            else:
                self.parse_batch(batch, first)
            line_no = first + len(batch) - 1
        if lines_of.long is not None:
            raise self.too_long(lines_of.long, line_no + 1)
        carry = lines_of.tail
        if carry:
            if self.strict:
                raise self.fail(line_no + 1, "", "missing trailing newline (strict mode)")
            self.parse_line(carry, line_no + 1)
        if self.root is None:
            raise DumpfileError("no files in dump file: expected a root record `/ …`", self.name, 1)
        self.resolve_hardlinks()
        tree = Tree(self.root, self.name)
        tree.checked = True  # every limit of cfsc.base.limits was enforced line by line above
        return tree

    def too_long(self, head: bytes, n: int) -> DumpfileError:
        """The error for a line longer than LINE_MAX, from its first LINE_MAX + 1 bytes: the
        first field longer than any record within the limits needs.  When the xattr section
        is to blame the fixed fields are checked first, as upstream does before its
        "Too many xattrs"."""
        fields = head.split(b" ", len(FIELDS))
        for i, text in enumerate(fields):
            if len(text) > FIELD_TEXT_MAX[i]:
                break
        if i == len(FIELDS):
            self.parse_line(b" ".join(fields[:i]), n)  # raises the record's own error, if any
            return self.fail(n, "XATTRS", f"xattr section of more than {XATTR_SECTION_MAX} bytes: "
                                          f"expected at most {XATTR_SECTION_MAX} (too many xattrs)")
        return self.fail(n, FIELDS[i], f"field of more than {FIELD_TEXT_MAX[i]} bytes (a line longer than "
                                       f"{LINE_MAX}): expected at most {FIELD_TEXT_MAX[i]}, the most composefs limits allow")

    def parse_batch(self, batch: list[bytes], first: int) -> None:
        """Fast path for a run of lines, column by column.

        Each field is checked and converted for the whole batch at once (C-level `map`,
        `join`, `translate`), so the per-line Python work is only the tree insertion.  A
        line takes this path only when every field is plain (no escapes, no quirks) and it
        is a regular file, directory or symlink that breaks no rule; any other line goes
        through `parse_line`, the reference for semantics and error messages (a test
        compares both paths on many inputs).  The two stages are apart so that a forked
        child can run the first (`dumpfile_stream`).
        """
        self.insert_batch(batch, first, self.batch_columns(batch))

    def batch_columns(self, batch: list[bytes]) -> tuple | None:
        """The column stage of `parse_batch`: the converted fields and the lines that must
        go through `parse_line` (`slow`), or None when the whole batch must.  It reads no
        state of the parse but `strict`."""
        rows = [line.split(b" ", 11) for line in batch]
        n = len(rows)
        if n == 0 or min(map(len, rows)) < 11:
            return None
        # (rows have 11 or 12 fields: a missing xattr section reads as empty)
        columns = list(zip_longest(*rows, fillvalue=b""))
        if len(columns) == 11:
            columns.append((b"",) * n)
        paths, sizes, modes, nlinks, uids, gids, rdevs, mtimes, payloads, contents, digests, sections = columns
        slow = bytearray(n)

        def mark(indices) -> None:
            for i in indices:
                slow[i] = 1

        sizes_, nlinks_, uids_, gids_ = (_decimal_column(c, slow) for c in (sizes, nlinks, uids, gids))
        if b"".join(rdevs).translate(None, b"0") or min(map(len, rdevs)) == 0:
            mark(i for i, r in enumerate(rdevs) if r != b"0")
        distinct = set(modes)  # a handful: each converted once
        if b"".join(distinct).translate(None, b"01234567") or min(map(len, distinct)) == 0:
            modes_ = [int(m, 8) if m and not m.translate(None, b"01234567") else _mark(slow, i)
                      for i, m in enumerate(modes)]
        else:
            modes_ = list(map({m: int(m, 8) for m in distinct}.__getitem__, modes))
        if max(modes_) > 0o177777:  # bits above st_mode: the reference cuts them to 32
            mark(i for i, m in enumerate(modes_) if m > 0o177777)
        # One regex pass checks that each line's MTIME alone is DIGITS.DIGITS; only then is
        # the joined column split at its '.'s (a count of them over the whole column would
        # let a line without a '.' and a line with two trade halves).
        distinct = set(mtimes)
        if len(distinct) * 4 <= n and _MTIMES.fullmatch(b"\n".join(distinct) + b"\n") is not None:
            # few distinct times (images made with one epoch): each converted once
            secs = list(map({m: int(m.partition(b".")[0]) for m in distinct}.__getitem__, mtimes))
            nsecs = list(map({m: int(m.partition(b".")[2]) for m in distinct}.__getitem__, mtimes))
        elif _MTIMES.fullmatch(b"\n".join(mtimes) + b"\n") is not None:
            parts = b".".join(mtimes).split(b".")
            secs = list(map(int, parts[0::2]))
            nsecs = list(map(int, parts[1::2]))
        else:
            secs = [0] * n
            nsecs = [0] * n
            for i, m in enumerate(mtimes):
                a, _dot, b = m.partition(b".")
                if a.isdigit() and b.isdigit() and len(a) < 19 and len(b) < 19:
                    secs[i] = int(a)
                    nsecs[i] = int(b)
                else:
                    slow[i] = 1
        if max(uids_) > U32 or max(gids_) > U32 or max(nlinks_) > U32 or max(nsecs) > U32:
            uids_, gids_, nlinks_ = ([v & U32 for v in c] for c in (uids_, gids_, nlinks_))
            nsecs = [v & U32 for v in nsecs]

        # File types: only a handful of distinct modes occur, so classify those.
        kinds = {m: m & S_IFMT for m in set(modes_)}
        odd = {m for m, t in kinds.items() if t != S_IFREG and t != S_IFDIR and t != S_IFLNK}
        if odd:
            mark(i for i, m in enumerate(modes_) if m in odd)
        dir_modes = {m for m, t in kinds.items() if t == S_IFDIR}
        link_modes = {m for m, t in kinds.items() if t == S_IFLNK}
        if b"\\" in b"".join(paths) or b"/" in paths:
            mark(i for i, p in enumerate(paths) if b"\\" in p or p == b"/")
        if contents.count(b"-") != n:  # inline content: escapes and size rules, rare
            mark(i for i, c in enumerate(contents) if c != b"-")
        if b"\\" in b"".join(payloads) or max(map(len, payloads)) >= limits.PATH_MAX:
            mark(i for i, p in enumerate(payloads) if b"\\" in p or len(p) >= limits.PATH_MAX)
        if max(sizes_) > MAX_EXTERNAL_SIZE:
            mark(i for i, size in enumerate(sizes_) if size > MAX_EXTERNAL_SIZE)
        payloads_ = [None if p == b"-" else p for p in payloads]
        dashes = digests.count(b"-")
        if dashes == n:
            digests_: list = [None] * n
        else:
            # All digests of the batch decoded by one fromhex; sliced back by C-level map.
            hexes = [d for d in digests if d != b"-"] if dashes else digests
            try:
                blob = bytes.fromhex(b"".join(hexes).decode("ascii"))
            except ValueError:
                blob = b""
            if len(blob) == 32 * len(hexes) and max(map(len, hexes)) == min(map(len, hexes)) == 64:
                size = len(blob)
                decoded = list(map(blob.__getitem__, map(slice, range(0, size, 32), range(32, size + 32, 32))))
                if dashes:
                    it = iter(decoded)
                    digests_ = [None if d == b"-" else next(it) for d in digests]
                else:
                    digests_ = decoded
            else:
                digests_ = [None] * n
                for i, d in enumerate(digests):
                    if d != b"-":
                        if len(d) == 64 and not d.translate(None, b"0123456789abcdefABCDEF"):
                            digests_[i] = bytes.fromhex(d.decode("ascii"))
                        else:
                            slow[i] = 1
        # Only the lines of directories and symlinks are visited (their indices picked in C).
        if dir_modes:
            for i in compress(range(n), map(dir_modes.__contains__, modes_)):
                if payloads_[i] is not None or digests_[i] is not None:
                    slow[i] = 1
        if link_modes:
            strict = self.strict
            for i in compress(range(n), map(link_modes.__contains__, modes_)):
                payload = payloads_[i]
                if (not payload or digests_[i] is not None
                        or (strict and sizes_[i] != len(payload))):
                    slow[i] = 1  # no target (`-` or empty), a digest, a SIZE strict refuses
                else:
                    sizes_[i] = len(payload)
        return (paths, modes_, uids_, gids_, secs, nsecs, sizes_, nlinks_, payloads_, digests_, sections, slow,
                dir_modes)

    def insert_batch(self, batch: list[bytes], first: int, columns: tuple | None) -> None:
        """The tree stage of `parse_batch`: xattrs, inodes, insertion, `parse_line` for the
        lines the column stage set aside (in line order, so errors come in upstream's)."""
        if columns is None:
            for i, line in enumerate(batch):
                self.parse_line(line, first + i)
            return
        (paths, modes_, uids_, gids_, secs, nsecs, sizes_, nlinks_, payloads_, digests_, sections, slow,
         dir_modes) = columns
        n = len(batch)
        cache = self.xattr_cache
        xattrs_ = list(map(cache.get, sections, repeat(EMPTY if sections.count(b"") == n else None)))
        if None in xattrs_:
            for i, xattrs in enumerate(xattrs_):
                if xattrs is None:
                    section = sections[i]
                    if not section:
                        xattrs_[i] = EMPTY
                    elif not slow[i]:
                        try:
                            xattrs_[i] = cache.get(section) or self.parse_xattrs(section, first + i)
                            cache[section] = xattrs_[i]
                        except DumpfileError:
                            slow[i] = 1  # the reference raises it in line order, after earlier lines

        nodes = list(map(Inode, modes_, uids_, gids_, secs, nsecs, sizes_, repeat(0), nlinks_,
                         payloads_, repeat(None), digests_, xattrs_))
        dirs = self.dirs
        parse_line = self.parse_line
        last_head = None
        parent = None
        children: dict = {}
        key = b""
        for i, path in enumerate(paths):
            if slow[i]:
                parse_line(batch[i], first + i)
                last_head = None
                continue
            head, _slash, name = path.rpartition(b"/")
            if head != last_head:
                last_head = head
                key = dir_key(head)
                parent = dirs.get(key)
                if parent is not None:
                    children = parent.children  # type: ignore[assignment]
            if (parent is None or not name or len(name) > 255 or name == b"." or name == b".."
                    or name in children):
                parse_line(batch[i], first + i)
                last_head = None
                continue
            node = nodes[i]
            children[name] = node
            if modes_[i] in dir_modes:
                dirs[key + b"/" + name if key else name] = node

    def bad_integer(self, text: bytes, n: int, field: str, base: str = "a base-10") -> DumpfileError:
        return self.bad_field(n, field, text, f"invalid integer {text.decode('latin-1')!r}: expected {base} number")

    def parse_line(self, line: bytes, n: int) -> None:
        """One record, checked in upstream's order (so the first error is upstream's)."""
        if b"\0" in line:
            column = line.index(b"\0") + 1
            raise self.fail(n, "", f"embedded NUL at column {column}: escape it as \\x00")
        f = line.split(b" ", 11)
        self.have = len(f)
        if len(f) < 11:
            # Upstream reads missing fields as empty ones; each rule below that refuses an
            # empty value says "missing field" for them, and DIGEST, which upstream would
            # fill from uninitialised memory, is refused on regular files.
            f += [b""] * (11 - len(f))
        path = f[0]
        if b"\\" in path:
            path = self.unescape(path, n, "PATH")
            nul = path.find(b"\0")
            if nul >= 0:
                path = path[:nul]  # upstream uses the path as a C string
        if not path:
            raise self.fail(n, "PATH", "empty path")

        mode_text = f[2]
        is_link = mode_text[:1] == b"@"
        if is_link:
            mode_text = mode_text[1:]
        if mode_text and not mode_text.translate(None, b"01234567"):
            mode = int(mode_text, 8)
        else:
            mode = _strtoull(mode_text, _OCT)
            if mode is None:
                raise self.bad_integer(mode_text, n, "MODE", "an octal")
        mode &= U32
        ftype = mode & S_IFMT
        if ftype not in limits.VALID_TYPES:
            raise self.fail(n, "MODE", limits.check_mode(mode))  # type: ignore[arg-type]

        # Upstream adds the entry to the tree before it parses the other fields; the name
        # checks happen here, the insertion once the inode is complete.
        if path == b"/":
            if ftype != S_IFDIR:
                raise self.fail(n, "MODE", "the root must be a directory")
            if self.root is not None:
                raise self.fail(n, "PATH", "a second root record: expected exactly one `/` line")
            parent = None
            name = b""
        else:
            if self.root is None:
                raise self.fail(n, "PATH", "the first record must be the root `/`")
            parent, name = self.lookup_parent(path, n)
            if name == b"." or name == b"..":
                raise self.fail(n, "PATH", "'.' and '..' are not allowed as names")
            if not name:
                raise self.fail(n, "PATH", "empty file name (path ends in '/')")
            if len(name) > 255:
                raise self.fail(n, "PATH", f"file name of {len(name)} bytes: expected at most {limits.NAME_MAX}")
            if name in parent.children:  # type: ignore[operator]
                raise self.fail(n, "PATH", "path already exists on an earlier line")

        if is_link:
            if ftype == S_IFDIR:
                raise self.fail(n, "MODE", "directories can't be hardlinked")
            target = f[8]
            if target == b"-":
                target_path = None
            else:
                target_path = self.unescape(target, n, "PAYLOAD")
                nul = target_path.find(b"\0")
                if nul >= 0:
                    target_path = target_path[:nul]
            node = Inode(mode)
            if parent is None:
                self.root = node
            else:
                parent.children[name] = node  # type: ignore[index]
            self.placeholders[id(node)] = node
            self.fixups.append((parent, name, target_path, n))  # type: ignore[arg-type]
            return

        t = f[1]
        size = int(t) if t.isdigit() else self.integer(t, n, "SIZE")
        t = f[3]
        nlink = int(t) if t.isdigit() else self.integer(t, n, "NLINK")
        t = f[4]
        uid = int(t) if t.isdigit() else self.integer(t, n, "UID")
        # Upstream quirk (§7.3): a bad GID or RDEV only counts when UID is 0; else it reads 0.
        t = f[5]
        if t.isdigit():
            gid = int(t)
        else:
            gid = _strtoull(t, _DEC)
            if gid is None:
                if uid == 0:
                    raise self.bad_integer(t, n, "GID")
                gid = 0
        t = f[6]
        if t.isdigit():
            rdev = int(t)
        else:
            rdev = _strtoull(t, _DEC)
            if rdev is None:
                if uid == 0:
                    raise self.bad_integer(t, n, "RDEV")
                rdev = 0
        t, dot, t2 = f[7].partition(b".")
        sec = int(t) if t.isdigit() else self.integer(t, n, "MTIME")
        if not dot:
            raise self.fail(n, "MTIME", f"time {f[7].decode('latin-1')!r} without '.': expected SECONDS.NANOSECONDS")
        nsec = int(t2) if t2.isdigit() else self.integer(t2, n, "MTIME")
        if size > U64 or nlink > U64 or uid > U64 or gid > U64 or rdev > U64 or sec > U64 or nsec > U64:
            # strtoull saturates at 2^64-1 (upstream does not look at errno)
            size, nlink, uid, gid, rdev, sec, nsec = (min(v, U64) for v in (size, nlink, uid, gid, rdev, sec, nsec))
        if sec > 0x7FFFFFFFFFFFFFFF:
            sec -= 1 << 64  # time_t is signed

        payload = f[8]
        if payload == b"-":
            payload = None
        elif b"\\" in payload:
            payload = self.unescape(payload, n, "PAYLOAD")
            nul = payload.find(b"\0")
            if nul >= 0:
                payload = payload[:nul]
        content = f[9]
        if content == b"-":
            content = None
        else:
            if b"\\" in content:
                content = self.unescape(content, n, "CONTENT")
            if len(content) != size:
                raise self.bad_field(n, "CONTENT", content, f"content of {len(content)} bytes: must match SIZE {size}")
        digest = f[10]
        if digest == b"-":
            digest = None
        elif b"\\" in digest:
            digest = self.unescape(digest, n, "DIGEST")

        if ftype == S_IFCHR or ftype == S_IFBLK:
            rdev &= U32
        elif rdev:
            if self.strict:
                raise self.fail(n, "RDEV", "non-zero device number on a non-device (strict mode)")
            rdev = 0

        if ftype == S_IFLNK:
            problem = limits.check_symlink(payload)
            if problem:
                raise self.bad_field(n, "PAYLOAD", payload or b"", problem)
            assert payload is not None
            if self.strict:
                if size != len(payload):
                    raise self.fail(n, "SIZE", f"symlink SIZE {size}: must equal the target length {len(payload)} (strict mode)")
                if content:
                    raise self.fail(n, "CONTENT", "a symlink cannot have content (strict mode)")
            size = len(payload)
            content = None
        else:
            if payload is not None:
                if len(payload) >= limits.PATH_MAX:
                    raise self.fail(n, "PAYLOAD", f"payload of {len(payload)} bytes: expected at most {limits.PATH_MAX - 1}")
                if ftype != S_IFREG:
                    payload = None
            if content is not None:
                if len(content) > limits.INLINE_CONTENT_MAX:
                    raise self.fail(n, "CONTENT", f"inline content of {len(content)} bytes: expected at most {limits.INLINE_CONTENT_MAX}")
                # Upstream stores content on any type but only regular files use it; an
                # empty content means "no content" (and size 0, checked above).
                if ftype != S_IFREG or not content:
                    content = None
        if digest is not None:
            if ftype == S_IFREG:
                text = digest
                digest = _digest(text)
                if digest is None:
                    raise self.bad_field(n, "DIGEST", text, f"invalid digest {text[:80].decode('latin-1')!r}: "
                                                            "expected 64 hex digits (an fs-verity SHA-256 digest), 128 (SHA-512) or '-'")
            else:
                digest = None  # upstream stores it but only regular files use it

        xattrs: tuple = ()
        if len(f) == 12 and f[11]:
            section = f[11]
            xattrs = self.xattr_cache.get(section)  # type: ignore[assignment]
            if xattrs is None:
                xattrs = self.xattr_cache[section] = self.parse_xattrs(section, n)

        if ftype == S_IFREG and content is None and size > limits.MAX_EXTERNAL_SIZE:
            raise self.fail(n, "SIZE", f"external file of {size} bytes: expected at most 2^53 (1024 chunks)")

        node = Inode(mode, uid & U32, gid & U32, sec, nsec & U32, size, rdev, nlink & U32,
                     payload, content, digest, xattrs)
        if parent is None:
            self.root = node
            self.dirs[b""] = node
        else:
            parent.children[name] = node  # type: ignore[index]
            if ftype == S_IFDIR:
                self.dirs[dir_key(path)] = node

    def parse_xattrs(self, section: bytes, n: int) -> tuple:
        if len(section) > XATTR_SECTION_MAX:
            raise self.fail(n, "XATTRS", f"xattr section of {len(section)} bytes: expected at most {XATTR_SECTION_MAX} (too many xattrs)")
        pieces = section.split(b" ")
        if section.endswith(b" "):
            pieces.pop()  # upstream stops at the end of the line, not after a trailing space
        items: dict[bytes, bytes] = {}
        budget = 0
        for piece in pieces:
            key, eq, value = piece.partition(b"=")
            if not eq:
                raise self.fail(n, "XATTRS", f"xattr {piece.decode('latin-1')!r} without '=': expected KEY=VALUE")
            key = self.unescape(key, n, "XATTRS")
            nul = key.find(b"\0")
            if nul >= 0:
                key = key[:nul]
            value = self.unescape(value, n, "XATTRS")
            problem = limits.check_xattr(key, value)
            if problem:
                raise self.fail(n, "XATTRS", problem)
            # libcomposefs' per-inode accounting, including its replace-an-existing-key path.
            old = items.pop(key, None)
            if old is not None:
                budget = budget - limits.xattr_cost(key, old) if items else 0
            cost = limits.xattr_cost(key, value) + (0 if items else limits.XATTR_HEADER_SIZE)
            if budget + cost > limits.XATTR_ACCOUNTING_MAX:
                raise self.fail(n, "XATTRS", f"xattrs exceed the per-inode budget of {limits.XATTR_ACCOUNTING_MAX} bytes at key {key.decode('utf-8', 'backslashreplace')!r}")
            budget += cost
            items[key] = value
        pairs = self.pairs
        if len(pairs) > CACHE_LIMIT:
            pairs.clear()
        if len(self.xattr_cache) > CACHE_LIMIT:
            self.xattr_cache.clear()
        return tuple(pairs.setdefault(pair, pair) for pair in sorted(items.items()))

    def lookup_node(self, path: bytes) -> Inode | None:
        """Upstream's lookup_path: literal components, no following of hardlink entries."""
        node = self.root
        assert node is not None
        for part in path.split(b"/"):
            if not part:
                continue
            children = node.children
            if children is None:
                return None
            node = children.get(part)
            if node is None:
                return None
        return node

    def resolve_hardlinks(self) -> None:
        # Upstream resolves in reverse line order; chains resolve to their final target.
        placeholders = self.placeholders
        link_to = self.link_to
        for parent, name, target_path, n in reversed(self.fixups):
            if target_path is None:
                raise self.fail(n, "PAYLOAD", "hardlink without a target path")
            target = self.lookup_node(target_path)
            if target is None:
                raise self.fail(n, "PAYLOAD", f"hardlink target {target_path.decode('utf-8', 'backslashreplace')} does not exist")
            node = parent.children[name]  # type: ignore[index]
            if target is node:
                raise self.fail(n, "PAYLOAD", "hardlink to itself")
            link_to[id(node)] = target
        # Each chain is followed once: every placeholder on it learns its final target, so
        # a chain of n links costs O(n), not O(n^2).
        final_of: dict[int, Inode] = {}
        for parent, name, _target, n in self.fixups:
            node = parent.children[name]  # type: ignore[index]
            final = final_of.get(id(node))
            if final is None:
                chain = [node]
                on_chain = {id(node)}
                final = link_to[id(node)]
                while id(final) in placeholders and id(final) not in final_of:
                    if id(final) in on_chain:
                        raise self.fail(n, "PAYLOAD", "hardlink cycle: the chain of @ targets comes back to this line")
                    on_chain.add(id(final))
                    chain.append(final)
                    final = link_to[id(final)]
                final = final_of.get(id(final), final)
                for link in chain:
                    final_of[id(link)] = final
            parent.add_child(name, final, link=True)


def load(source, options: Options | None = None) -> Tree:
    options = options or Options()
    parser = _Parser(source_name(source), options.strict)
    helper = ForkedColumns.start(parser.batch_columns, source, LINE_MAX)  # None: not worth a child, or none can run
    try:
        tree = parser.parse(chunks(source), helper)
    finally:
        if helper is not None:
            helper.close()
    if source != "-":
        tree.locate = lambda path: locate(source_name(source), chunks(source), path)
    return tree


def locate(name: str, pieces: Iterable[bytes], path: bytes) -> str | None:
    """`name:line` of the record that defines `path` in the text `pieces` make up (a second
    read of the input: only for error messages)."""
    want = [p for p in path.split(b"/") if p]
    lines_of = Lines(pieces, LINE_MAX)  # linear however long a line is (and bounded: LINE_MAX)
    n = 0
    for n, line in enumerate(chain.from_iterable(lines_of), 1):
        if _defines(line, want):
            return f"{name}:{n}"
    # (the unterminated last line is known only once the rest is read)
    return f"{name}:{n + 1}" if lines_of.tail and _defines(lines_of.tail, want) else None


def _defines(line: bytes, want: list[bytes]) -> bool:
    field = line.split(b" ", 1)[0]
    if b"\\" in field:
        try:
            field = unescape(field).split(b"\0", 1)[0]
        except BadEscape:
            return False
    return [p for p in field.split(b"/") if p] == want


def loads(data: bytes | Iterable[bytes], options: Options | None = None, name: str = "<string>") -> Tree:
    """The tree of dumpfile text: bytes, or pieces of it read once (never held whole; errors
    found after parsing then name the path without a line)."""
    options = options or Options()
    whole = isinstance(data, bytes)
    tree = _Parser(name, options.strict).parse([data] if whole else data)  # type: ignore[list-item]
    if whole:
        tree.locate = lambda path: locate(name, [data], path)  # type: ignore[list-item]
    return tree
