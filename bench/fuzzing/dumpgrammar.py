"""Dumpfile grammar mutations, and the oracle that compares the parser's two paths.

Parsers of `PATH SIZE MODE NLINK UID GID RDEV SEC.NSEC PAYLOAD CONTENT DIGEST [XATTRS]` lines
go wrong on the grammar, not on random bytes: a field missing or one too many, empty, signed,
padded, a '.' too many or too few, an escape cut short, a number past 2^64, '//' in a path, a
line split, joined, repeated or moved, and -- for a parser that works column by column --
good and bad lines side by side.  Every mutation is a few choices made through
`choose(n) -> 0..n-1`, so one code path serves a seeded `random.Random` (the fuzz target,
`bench/differential.py`) and Hypothesis (tests/test_dumpfile_fastpath.py), which shrinks the
choices: choice 0 is always the mildest.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable

from cfsc.base.errors import DumpfileError
from cfsc.base.options import Options
from cfsc.base.tree import Tree
from cfsc.build import compile_tree
from cfsc.frontends.dumpfile import _Parser
from cfsc.passes.validate_limits import validate_limits

Choose = Callable[[int], int]

ROOT = b"/ 0 40755 2 0 0 0 0.0 - - -"
DIGEST = b"0123456789abcdef" * 4
INTEGERS = (b"0", b"1", b"", b"+1", b"-1", b"\t1", b"00", b"1x", b"x", b"1.0", b"0x10", b"4294967295",
            b"4294967296", b"18446744073709551615", b"18446744073709551616", b"99999999999999999999999",
            b"9223372036854775808", b"0" * 40 + b"1")
# Per field (XATTRS last): a valid text first, then odd, borderline and wrong ones.
VARIANTS: tuple[tuple[bytes, ...], ...] = (
    (b"/n", b"", b"/", b"//", b"n", b"/n/", b"//n", b"/d//n", b"/d///n", b"/d/n", b"d/n", b"/d/./n", b"/.",
     b"/..", b"/d/..", b"/n\\x20m", b"/\\x2f", b"/n\\x00m", b"/\\q", b"/n\\x4", b"/n\\", b"/" + b"n" * 255,
     b"/" + b"n" * 256, b"/\\xff", b"/d/\\x2e"),
    INTEGERS + (b"3", b"5000", b"5001", b"9007199254740992", b"9007199254740993"),
    (b"100644", b"40755", b"120777", b"20644", b"60644", b"10644", b"140644", b"@100644", b"@40755",
     b"@120777", b"", b"@", b"644", b"0100644", b"+100644", b"-100644", b"\t100644", b"170644", b"100648",
     b"1777777100644", b"77777777777777777777777", b"@@100644"),
    INTEGERS,
    INTEGERS,
    INTEGERS,
    INTEGERS + (b"259", b"4294967296259"),
    (b"0.0", b"1", b"1.2.3", b"", b".", b"1.", b".5", b"1..2", b"-1.0", b"+1.+1", b"1.-1", b"\t1.\t2",
     b"1.4294967296", b"1.999999999", b"9223372036854775807.0", b"9223372036854775808.0",
     b"18446744073709551615.0", b"18446744073709551616.0", b"-9223372036854775808.0", b"1.0.", b"1 .0"),
    (b"-", b"", b"ab/cdef", b"/abs/x", b"t", b"\\x2d", b"\\x00", b"a\\x00b", b"\\q", b"\\x4", b"\\", b"/d",
     b"/d/f0", b"//d/f0", b"/d/f0/", b"p" * 4095, b"p" * 4096, b"\\x70" * 1024),
    (b"-", b"", b"a", b"abc", b"\\n\\t", b"\\x00", b"\\q", b"x" * 5000, b"x" * 5001, b"\\x2d"),
    (b"-", DIGEST, b"", DIGEST + b"zz", DIGEST[:62], b"abcd", DIGEST.upper(), b"zz" * 32, b"\\x30" + DIGEST[1:],
     b"\\x00" + DIGEST[1:], DIGEST[:63] + b"\t", DIGEST + DIGEST, b"\\q"),
    (b"user.a=1", b"", b"user.a=1 user.a=2", b"noeq", b"=v", b"user.a=1  user.b=2", b"user.a=1 ",
     b"trusted.overlay.x=1", b"user.\\x00=1", b"user.a=\\q", b"k" * 256 + b"=1", b"user.a=" + b"v" * 32760,
     b"user.a=" + b"v" * 65535, b"user.b=\\x3d\\x20", b"security.selinux=x user.a="),
)
# Valid records of every kind, as field lists (PATH filled in by the caller).
TEMPLATES = (
    [b"", b"3", b"100644", b"1", b"0", b"0", b"0", b"1633950376.5", b"-", b"abc", b"-"],
    [b"", b"10", b"100644", b"1", b"0", b"0", b"0", b"1633950376.123456789", b"ab/cdef", b"-", DIGEST],
    [b"", b"1", b"120777", b"1", b"0", b"0", b"0", b"1700000000.0", b"t", b"-", b"-"],
    [b"", b"0", b"40755", b"2", b"0", b"0", b"0", b"4.0", b"-", b"-", b"-"],
    [b"", b"0", b"20644", b"1", b"0", b"0", b"259", b"55.55", b"-", b"-", b"-"],
    [b"", b"0", b"@100644", b"1", b"0", b"0", b"0", b"0.0", b"/d/f0", b"-", b"-"],
    [b"", b"0", b"10644", b"1", b"1000", b"100", b"0", b"6.7", b"-", b"-", b"-", b"user.a=1"],
)


def seeds() -> list[bytes]:
    """Small valid dumpfiles: every file type, hard links, xattrs, escapes, inline and
    external files, nested directories; one with many same-shaped lines (one batch)."""
    small = b"\n".join([
        ROOT,
        b"/d 0 40755 2 0 0 0 1633950376.0 - - - user.a=1",
        b"/d/f0 3 100644 1 0 0 0 1.5 - abc -",
        b"/d/ext 4096 100644 1 1000 100 0 0.0 ab/cdef - " + DIGEST + b" security.selinux=x",
        b"/d/l 6 120777 1 0 0 0 0.0 target - -",
        b"/d/h 0 @100644 1 0 0 0 0.0 /d/f0 - -",
        b"/c 0 20644 1 0 0 259 0.0 - - -",
        b"/b 0 60600 1 0 0 1 0.0 - - -",
        b"/p 0 10644 1 0 0 0 0.0 - - -",
        b"/s 0 140755 1 0 0 0 0.0 - - -",
        b"/e\\x20sc\\\\ 2 100644 1 0 0 0 0.0 - \\n\\x00 - user.k\\x3d=v\\x20w trusted.overlay.opaque=y",
        b"/d/sub 0 40700 2 0 0 0 2.1 - - -",
        b"/d/sub/deep 0 100644 1 0 0 0 0.0 - - -",
    ]) + b"\n"
    many = b"\n".join([ROOT, b"/d 0 40755 2 0 0 0 0.0 - - -"]
                      + [b"/d/f%d 3 100644 1 0 0 0 %d.%d - abc -" % (i, i, i * 7) for i in range(30)]) + b"\n"
    return [small, many, ROOT + b"\n", small.rstrip(b"\n")]


def _fields(line: bytes) -> list[bytes]:
    return line.split(b" ", 11)


def _pick(lines: list[bytes], choose: Choose) -> int:
    return choose(len(lines))


def replace_field(lines: list[bytes], choose: Choose) -> None:
    i = _pick(lines, choose)
    f = _fields(lines[i])
    k = choose(len(VARIANTS))
    text = VARIANTS[k][choose(len(VARIANTS[k]))]
    while len(f) < k:
        f.append(b"-")
    if k == len(f):
        f.append(text)
    else:
        f[k] = text
    lines[i] = b" ".join(f)


def drop_fields(lines: list[bytes], choose: Choose) -> None:
    i = _pick(lines, choose)
    f = _fields(lines[i])
    lines[i] = b" ".join(f[:len(f) - 1 - choose(len(f))])


def extra_field(lines: list[bytes], choose: Choose) -> None:
    i = _pick(lines, choose)
    lines[i] += (b" ", b"  ", b" -", b" user.a=1", b" x")[choose(5)]


def pad_number(lines: list[bytes], choose: Choose) -> None:
    i = _pick(lines, choose)
    f = _fields(lines[i])
    k = 1 + choose(7)
    if k >= len(f):
        return
    pads = (b"+", b"-", b"\t", b"0", b"0" * 24, b"\v", b"9" * 20)
    if choose(2):
        f[k] = f[k] + (b".", b"x", b"0" * 20, b"\t", b".0")[choose(5)]
    else:
        f[k] = pads[choose(len(pads))] + f[k]
    lines[i] = b" ".join(f)


ESCAPES = (b"\\x41", b"\\\\", b"\\n", b"\\t", b"\\r", b"\\x00", b"\\x2f", b"\\x20", b"\\q", b"\\x4", b"\\", b"\\xzz")


def escape(lines: list[bytes], choose: Choose) -> None:
    i = _pick(lines, choose)
    f = _fields(lines[i])
    k = (0, 8, 9, 10, 11)[choose(5)]
    if k >= len(f):
        return
    at = choose(len(f[k]) + 1)
    f[k] = f[k][:at] + ESCAPES[choose(len(ESCAPES))] + f[k][at:]
    lines[i] = b" ".join(f)


def path_shape(lines: list[bytes], choose: Choose) -> None:
    i = _pick(lines, choose)
    f = _fields(lines[i])
    path = f[0]
    slashes = [j for j, c in enumerate(path) if c == 0x2F]
    op = choose(7)
    if op == 0 and slashes:  # double a '/'
        j = slashes[choose(len(slashes))]
        path = path[:j] + b"/" + path[j:]
    elif op == 1:
        path = b"/" + path
    elif op == 2:
        path = path.lstrip(b"/")
    elif op == 3:
        path += b"/"
    elif op == 4:
        head = path.rpartition(b"/")[0]
        path = head + b"/" + (b".", b"..", b"", b"x" * 256)[choose(4)]
    elif op == 5 and slashes:  # a '/' escaped
        j = slashes[choose(len(slashes))]
        path = path[:j] + b"\\x2f" + path[j + 1:]
    else:  # a name from another line
        path = _fields(lines[_pick(lines, choose)])[0]
    f[0] = path
    lines[i] = b" ".join(f)


def make_hardlink(lines: list[bytes], choose: Choose) -> None:
    i = _pick(lines, choose)
    f = _fields(lines[i])
    if len(f) < 9:
        return
    f[2] = b"@" + f[2].lstrip(b"@")
    f[8] = _fields(lines[_pick(lines, choose)])[0] or b"-"
    lines[i] = b" ".join(f)


def retype(lines: list[bytes], choose: Choose) -> None:
    i = _pick(lines, choose)
    f = _fields(lines[i])
    if len(f) < 3:
        return
    types = (b"10", b"4", b"12", b"2", b"6", b"1", b"14", b"0", b"17", b"3")
    f[2] = types[choose(len(types))] + f[2][-4:]
    lines[i] = b" ".join(f)


def cross_field(lines: list[bytes], choose: Choose) -> None:
    """One field copied from another line (a good value where it does not fit)."""
    i, j = _pick(lines, choose), _pick(lines, choose)
    a, b = _fields(lines[i]), _fields(lines[j])
    k = choose(12)
    if k < len(a) and k < len(b):
        a[k] = b[k]
        lines[i] = b" ".join(a)


def delete_line(lines: list[bytes], choose: Choose) -> None:
    if len(lines) > 1:
        del lines[_pick(lines, choose)]


def duplicate_line(lines: list[bytes], choose: Choose) -> None:
    line = lines[_pick(lines, choose)]
    lines.insert(choose(len(lines) + 1), line)


def move_line(lines: list[bytes], choose: Choose) -> None:
    line = lines.pop(_pick(lines, choose))
    lines.insert(choose(len(lines) + 1), line)


def join_lines(lines: list[bytes], choose: Choose) -> None:
    if len(lines) > 1:
        i = choose(len(lines) - 1)
        lines[i:i + 2] = [lines[i] + (b"", b" ")[choose(2)] + lines[i + 1]]


def split_line(lines: list[bytes], choose: Choose) -> None:
    i = _pick(lines, choose)
    at = choose(len(lines[i]) + 1)
    lines[i:i + 1] = [lines[i][:at], lines[i][at:]]


def blank_line(lines: list[bytes], choose: Choose) -> None:
    lines.insert(choose(len(lines) + 1), (b"", b" ", b"\r", b"-")[choose(4)])


def final_newline(lines: list[bytes], choose: Choose) -> None:
    if lines[-1] == b"":
        lines.pop()
    else:
        lines.append(b"")


def insert_nul(lines: list[bytes], choose: Choose) -> None:
    i = _pick(lines, choose)
    at = choose(len(lines[i]) + 1)
    lines[i] = lines[i][:at] + b"\0" + lines[i][at:]


OPS = (replace_field, drop_fields, extra_field, pad_number, escape, path_shape, make_hardlink, retype,
       cross_field, delete_line, duplicate_line, move_line, join_lines, split_line, blank_line,
       final_newline, insert_nul)


def apply(data: bytes, choose: Choose, count: int) -> bytes:
    """`count` grammar mutations of a dumpfile (its lines split on '\\n'; the empty last
    element is the final newline)."""
    lines = data.split(b"\n")
    for _ in range(count):
        OPS[choose(len(OPS))](lines, choose)
        if not lines:
            lines.append(b"")
    return b"\n".join(lines)


def _token(text: bytes, choose: Choose, k: int) -> bytes | None:
    """One field's text, kept (most often) or changed by a small grammar step; None: the
    line ends before it."""
    op = choose(16) - 6
    if op < 0:
        return text
    if op == 0:  # one '.' fewer
        return text.replace(b".", b"", 1) if b"." in text else text
    if op == 1:  # one '.' more
        at = choose(len(text) + 1)
        return text[:at] + b"." + text[at:]
    if op == 2:
        return b""
    if op == 3:
        return None
    if op == 4:
        return (b"+", b"-")[choose(2)] + text
    if op == 5:
        return (b"\t", b"\v", b"\r")[choose(3)] + text
    if op == 6:
        return (b"0" * 24 + text, text + b"9" * 20)[choose(2)]
    if op == 7:
        at = choose(len(text) + 1)
        return text[:at] + ESCAPES[choose(len(ESCAPES))] + text[at:]
    variants = VARIANTS[k]
    return variants[choose(len(variants))]


SEPARATORS = b"./= \\"


def _transfer(a: bytes, b: bytes, choose: Choose) -> tuple[bytes, bytes]:
    """One character (a separator, more often than not) moved from one field to another:
    each line changes, the column's total does not -- what joining a column and splitting
    it again cannot see."""
    if not a:
        return a, b
    marks = [i for i, c in enumerate(a) if c in SEPARATORS]
    p = marks[choose(len(marks))] if marks and choose(3) else choose(len(a))
    q = choose(len(b) + 1)
    return a[:p] + a[p + 1:], b[:q] + a[p:p + 1] + b[q:]


def column_mix(choose: Choose, field: int, count: int = 4) -> bytes:
    """A root, a directory and `count` records of assorted kinds in it whose field number
    `field` (11: the xattrs) each keep or change by one grammar step -- or else one
    character moves from one record's field to another's: valid and odd lines side by side,
    what a column-by-column fast path must keep apart."""
    rows = []
    for i in range(count):
        f = list(TEMPLATES[choose(len(TEMPLATES))])
        f[0] = b"/d/f%d" % i
        while len(f) <= field:
            f.append(b"")
        rows.append(f)
    transfer = count > 1 and choose(2)
    if transfer:
        i, j = choose(count), choose(count - 1)
        j += j >= i
        rows[i][field], rows[j][field] = _transfer(rows[i][field], rows[j][field], choose)
    lines = [ROOT, b"/d 0 40755 2 0 0 0 0.0 - - -"]
    for f in rows:
        text = f[field] if transfer else _token(f[field], choose, field)
        if text is None:
            f = f[:max(field, 1)]
        else:
            f[field] = text
        lines.append(b" ".join(f).rstrip(b" ") if field == 11 and not text else b" ".join(f))
    return b"\n".join(lines) + b"\n"


def mutate(data: bytes, rng: random.Random, most: int = 3) -> bytes:
    """1 to `most` random grammar mutations of a dumpfile."""
    return apply(data, rng.randrange, 1 + rng.randrange(most))


# -- the oracle -------------------------------------------------------------------------------

def signature(tree: Tree) -> list[tuple]:
    """Everything the parser put in the tree, hard links as first-seen inode numbers, in a
    comparable form (walked with an explicit stack, names sorted)."""
    seen: dict[int, int] = {}
    out = []
    stack = [(b"/", tree.root)]
    while stack:
        path, node = stack.pop()
        first = id(node) not in seen  # a directory hard-linked into itself is walked once
        number = seen.setdefault(id(node), len(seen))
        out.append((path, number, node.mode, node.uid, node.gid, node.mtime, node.mtime_nsec, node.size,
                    node.rdev, node.nlink, node.payload, node.content, node.digest, node.xattrs,
                    sorted(node.links or ())))
        if node.children is not None and first:
            for name in sorted(node.children, reverse=True):
                stack.append((path.rstrip(b"/") + b"/" + name, node.children[name]))
    return out


def outcome(data: bytes, fast: bool, strict: bool, chunk: int | None = None) -> tuple:
    """("ok", signature) or ("error", line, field, message) of one parse; `chunk` feeds the
    input in pieces of that size.  An accepted tree must also meet every limit the
    validation pass checks (the frontend marks it checked, so the pipeline skips that)."""
    pieces = [data] if not chunk else [data[i:i + chunk] for i in range(0, len(data), chunk)]
    try:
        tree = _Parser("x.dump", strict, fast).parse(pieces)
    except DumpfileError as e:
        return ("error", e.line, e.field, str(e))
    result = ("ok", signature(tree))
    tree.checked = False
    validate_limits(tree, Options())
    return result


def compile_bytes(data: bytes, options: Options) -> bytes:
    """The image a dumpfile compiles to, in process (CfscError when it is refused)."""
    tree = _Parser("x.dump", options.strict).parse([data])
    out = io.BytesIO()
    compile_tree(tree, options, out)
    return out.getvalue()

