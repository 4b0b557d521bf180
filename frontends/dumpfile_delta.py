"""Two dumpfiles cut down to the lines they do not share, for a fast diff of large dumps.

A dumpfile means the same tree whatever the order of its lines (parents first), so it is, in
effect, a set of lines, and two versions of a big one share nearly all of them.  Which lines
differ is found at memory speed when the files run alike (blocks compared, resynchronised
on a whole line after each difference), else with sets of lines.  `reduce` keeps, on each
side, the lines the other side lacks plus what they need to mean exactly what they mean in
the whole file:

* the root line and every ancestor directory's line (so each line has its parent);
* every character-device line and its ancestors: whiteouts choose the format version and
  give their directories version 1's opaque markers, so all of them must be there.

The ordinary diff (`cfsc.tools.diff`) of the two small dumpfiles then reports exactly what a diff of
the whole files reports: a line both files share is the same entry in both, and nothing it
contributes to another entry's record is missing from either side.  That holds only under
these conditions; when one fails `reduce` returns None and the caller diffs the whole files:

* no differing line is a hard link (`@`) and none is a hard link's target on either side (a
  record lists every path of its inode, and link lines are not kept);
* paths are compared as the frontend reads them (escapes undone, `//` collapsed);
* nothing would be orphaned: a differing path that is not a directory on one side has no
  lines below it on that side;
* every line's mode is plain octal, both files end with a newline (or: no empty or repeated
  line), not `--strict` (whose rules look at the whole file), no `--exclude` (a query may
  depend on ancestors), and at most a tenth of the text differs (else the whole diff costs
  about the same).

Lines both files share are never parsed, so a problem in them (a bad escape, an over-long
name, a line before its parent's) is not reported: `cfsc compile` reports it.
"""

from __future__ import annotations

import re

from cfsc.backends.dumptext import BadEscape, unescape
from cfsc.base.options import Options
from cfsc.base.tree import S_IFCHR, S_IFDIR, S_IFMT

MAX_SHARE = 10  # at most 1/MAX_SHARE of the lines may differ
# Lines whose MODE is not 1 + 4 or 5 octal digits (regular files, symlinks, fifos, sockets):
# directories, devices, hard links, and anything written oddly.  One C-level scan finds them.
_NOTABLE = re.compile(rb"\n[^ \n]+ [^ \n]* (?!1[0-7]{4,5} )[^\n]*")


class _NotApplicable(Exception):
    pass


class _Side:
    """What the conditions and the kept context need from one dumpfile, found in one scan."""

    def __init__(self, text: bytes) -> None:
        self.text = text
        end = text.find(b"\n")
        root = text[:end if end >= 0 else len(text)]
        if not root.startswith(b"/ "):
            raise _NotApplicable
        self.root = root
        self.dirs: dict[bytes, bytes] = {b"/": root}  # canonical path -> line
        self.chars: list[bytes] = []
        self.targets: set[bytes] = set()
        for m in _NOTABLE.finditer(text):
            line = m.group()[1:]
            fields = line.split(b" ", 9)
            mode = _mode(fields[2].lstrip(b"@"))
            if fields[2][:1] == b"@":
                if len(fields) < 9:
                    raise _NotApplicable
                self.targets.add(path_of(fields[8]))
            elif mode & S_IFMT == S_IFDIR:
                self.dirs[path_of(fields[0])] = line
            elif mode & S_IFMT == S_IFCHR:
                self.chars.append(line)

    def has_below(self, path: bytes, text_form: bytes) -> bool:
        """Whether a line hangs below `path` (written as `text_form`), as far as its text shows.
        (Only an invalid file has one: a child written another way escapes this check, and
        the whole-file parse would report that file anyway.)"""
        return self.text.find(b"\n" + text_form + b"/") >= 0

    def kept(self, lines, context: set[bytes]) -> bytes:
        """`lines` with the root, every character device and the directories at `context`
        (those this side has), parents first."""
        keep = {self.root, *lines, *self.chars}
        keep.update(self.dirs[path] for path in context if path in self.dirs)
        return b"".join(line + b"\n" for line in sorted(keep, key=_depth))


def _ancestors(paths) -> set[bytes]:
    out: set[bytes] = set()
    for path in paths:
        while True:
            path = path.rpartition(b"/")[0]
            if not path or path in out:
                break
            out.add(path)
    return out


def _mode(text: bytes) -> int:
    if not text or text.translate(None, b"01234567"):
        raise _NotApplicable  # a sign, spaces … : leave such files to the parser
    return int(text, 8)


def path_of(text: bytes) -> bytes:
    """The path a PATH (or hard-link target) field means: unescaped like the dumpfile frontend
    does, cut at a NUL, empty components dropped."""
    if b"\\" in text:
        try:
            text = unescape(text)
        except BadEscape:
            raise _NotApplicable from None
        text = text.partition(b"\0")[0]
    if b"//" in text or text.endswith(b"/") and text != b"/" or text[:1] != b"/":
        text = b"/" + b"/".join(p for p in text.split(b"/") if p)
    return text


def _path(line: bytes) -> bytes:
    return path_of(line.split(b" ", 1)[0])


def _depth(line: bytes) -> tuple[bool, int, bytes]:
    path = _path(line)
    return path != b"/", path.count(b"/"), line


def _lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    if not lines or b"" in lines:
        raise _NotApplicable
    return lines


# -- the differing lines ---------------------------------------------------------------------

CHUNK = 1 << 16  # bytes compared at a time while the files run alike
WINDOW = 1 << 22  # how far ahead a resynchronising line is looked for
TRIES = 64  # lines tried on each side to resynchronise


def _common_run(a: bytes, b: bytes, i: int, j: int) -> tuple[int, int]:
    """Advance over what a[i:] and b[j:] have in common, back to the start of a line."""
    while True:
        n = min(CHUNK, len(a) - i, len(b) - j)
        if n <= 0:
            break
        if b.startswith(a[i:i + n], j):
            i += n
            j += n
            continue
        lo, hi = 0, n  # the first difference is in [lo, hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if b.startswith(a[i:i + mid], j):
                lo = mid
            else:
                hi = mid
        i += lo
        j += lo
        break
    start = a.rfind(b"\n", 0, i) + 1
    return start, j - (i - start)


def _find_line(text: bytes, line: bytes, start: int, limit: int) -> int:
    """Where `line` is a whole line of `text` in [start, start + limit) (start: a line start); -1 if not."""
    if text.startswith(line + b"\n", start):
        return start
    pos = text.find(b"\n" + line + b"\n", start, start + limit + len(line) + 2)
    return pos + 1 if pos >= 0 else -1


def _resync(a: bytes, b: bytes, i: int, j: int) -> tuple[int, int] | None:
    """Line starts (k, m) from which a and b run alike again, skipping as little as possible:
    each of the next lines on either side is looked for on the other."""
    best: tuple[int, int] | None = None
    cost = WINDOW
    ka, kb = i, j
    for _ in range(TRIES):
        if (ka - i) + (kb - j) >= cost:
            break  # every later candidate skips more than the best one
        if ka < len(a):
            line = a[ka:a.index(b"\n", ka)]
            m = _find_line(b, line, j, cost - (ka - i))
            if m >= 0 and (ka - i) + (m - j) < cost:
                best, cost = (ka, m), (ka - i) + (m - j)
            ka += len(line) + 1
        if kb < len(b):
            line = b[kb:b.index(b"\n", kb)]
            k = _find_line(a, line, i, cost - (kb - j))
            if k >= 0 and (k - i) + (kb - j) < cost:
                best, cost = (k, kb), (k - i) + (kb - j)
            kb += len(line) + 1
        if ka >= len(a) and kb >= len(b) and (ka - i) + (kb - j) < cost:
            best, cost = (len(a), len(b)), (ka - i) + (kb - j)
    return best


def differing_lines(a: bytes, b: bytes) -> tuple[set[bytes], set[bytes]]:
    """(lines only in a, lines only in b).  Files that mostly run alike are compared block by
    block at memory speed; where they do not (another order), every line goes into a set.
    More than a tenth differing is `_NotApplicable`."""
    if a.endswith(b"\n") and b.endswith(b"\n"):
        found = _aligned(a, b)
        if found is not None:
            return found
    la, lb = _lines(a), _lines(b)
    only_a = set(la)
    if len(only_a) != len(la):
        raise _NotApplicable  # a line twice: the parser's error to report
    only_b = set(lb).difference(only_a)
    only_a.difference_update(lb)
    if (len(only_a) + len(only_b)) * MAX_SHARE > len(la) + len(lb):
        raise _NotApplicable  # too much differs: diffing the whole files costs about the same
    return only_a, only_b


def _aligned(a: bytes, b: bytes) -> tuple[set[bytes], set[bytes]] | None:
    only_a: set[bytes] = set()
    only_b: set[bytes] = set()
    budget = (len(a) + len(b)) // MAX_SHARE
    i = j = 0
    while True:
        i, j = _common_run(a, b, i, j)
        if i >= len(a) and j >= len(b):
            break
        sync = _resync(a, b, i, j)
        if sync is None:
            return None
        k, m = sync
        only_a.update(a[i:k].split(b"\n")[:-1] if k > i else ())
        only_b.update(b[j:m].split(b"\n")[:-1] if m > j else ())
        budget -= (k - i) + (m - j)
        if budget < 0:
            raise _NotApplicable  # too much differs
        i, j = k, m
    both = only_a & only_b  # lines that moved
    return only_a - both, only_b - both


def reduce(a: bytes, b: bytes, options: Options) -> tuple[bytes, bytes] | None:
    """The two dumpfiles cut down to their differences (see the module docstring), or None."""
    if options.strict or options.exclude:
        return None
    try:
        only_a, only_b = differing_lines(a, b)
        side_a, side_b = _Side(a), _Side(b)
        written: dict[bytes, bytes] = {}  # path -> as a differing line writes it
        for line in (*only_a, *only_b):
            fields = line.split(b" ", 3)
            if len(fields) < 4 or fields[2][:1] == b"@":
                raise _NotApplicable
            _mode(fields[2])
            written[path_of(fields[0])] = fields[0]
        paths = set(written)
        if not paths.isdisjoint(side_a.targets) or not paths.isdisjoint(side_b.targets):
            raise _NotApplicable
        for path in paths:
            # a directory on one side only: no lines may hang below it on the other
            in_a, in_b = path in side_a.dirs, path in side_b.dirs
            if in_a != in_b and (side_b if in_a else side_a).has_below(path, written[path]):
                raise _NotApplicable
        # The same context on both sides (else a directory kept on one side only would look
        # added or removed): every ancestor of every line kept on either side.
        context = _ancestors(paths.union(_path(line) for line in side_a.chars + side_b.chars))
        return side_a.kept(only_a, context), side_b.kept(only_b, context)
    except _NotApplicable:
        return None
