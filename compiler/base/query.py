"""A small language for selecting entries, shared by `ls --where`, `compile --exclude` and `diff`.

    path ~ "/usr/lib/**" and type == reg and size > 1M
    name ~ "*.pyc" or (type == whiteout and not path ~ "/etc/**")
    xattr["security.selinux"] ~ "*:bin_t:*" and mode == 755 and mtime > "2024-01-01"
    xattr["user.origin"]                      # the xattr is present

Fields (any `Inode` or image `Entry` has them): `path` (absolute), `name`, `type` (reg, dir,
symlink, block, char, fifo, socket, whiteout — a character device 0:0 is a whiteout), `mode`
(permission bits; literals are octal: `mode == 644`), `uid`, `gid`, `size` (suffixes K, M, G, T
are powers of 1024: `1M`, `1MiB`; `kB`, `MB`, `GB`, `TB` powers of 1000), `mtime` (seconds, or an
RFC 3339 string: `"2024-01-01"` or `"2024-01-01T12:00:00Z"`), `nlink`, `rdev`, `target` (of a
symlink), `payload` (backing file of a regular file), `digest` (64 hex digits), `content` (inline
data), `xattr["KEY"]` (value).

Operators: `==`, `!=`, `<`, `<=`, `>`, `>=` on numbers; `==`, `!=`, `~` (glob match), `!~` on
strings; `and`, `or`, `not`, parentheses.  Globs match the whole value: `*` and `?` stay within
one path component, `**` crosses components (`/usr/**` is everything below /usr, `**/*.so`
every `.so`), `[abc]` / `[!abc]` are classes; matching takes time linear in the value
(`cfsc.base.globs`: paths come from the source, which may be hostile).  A value the entry lacks (no xattr of that key,
the target of a regular file, an nlink not known yet) makes every comparison false.

Strings are double-quoted with `\\"`, `\\\\`, `\\n`, `\\t` and `\\xHH` escapes, so any byte string
can be written.  The parsed query compiles to nested closures (`Query.__call__(path, node)`),
so testing a million entries costs a few function calls each, not a walk over a parse tree.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable, Iterable

from cfsc.base import rfc3339
from cfsc.base.errors import UsageError
from cfsc.base.globs import Glob
from cfsc.base.tree import FILE_TYPE_BITS, S_IFCHR, S_IFLNK, S_IFMT, S_IFREG, WHITEOUT
from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

GRAMMAR = r"""
?start: disj
?disj: conj ("or" conj)*
?conj: neg ("and" neg)*
?neg: "not" neg -> negate
    | atom
?atom: "(" disj ")"
     | field OP value -> compare
     | xattr -> present
field: NAME | xattr
xattr: "xattr" "[" STRING "]"
value: STRING | NUMBER | NAME
OP: "==" | "!=" | "<=" | ">=" | "<" | ">" | "!~" | "~"
NAME: /[a-z_][a-z0-9_]*/
NUMBER: /[0-9][0-9a-zA-Z_]*/
STRING: /"(\\.|[^"\\])*"/
%ignore /[ \t\r\n]+/
"""

TYPES = {**FILE_TYPE_BITS, WHITEOUT: -1}
NUMERIC = ("mode", "uid", "gid", "size", "mtime", "nlink", "rdev")
STRINGS = ("path", "name", "target", "payload", "digest", "content")
FIELDS = ("path", "name", "type", *NUMERIC, "target", "payload", "digest", "content")
SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
              "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
              "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
           ">": operator.gt, ">=": operator.ge}
_STRING_ESCAPE = re.compile(rb'\\(?:x([0-9a-fA-F]{2})|(["\\nt])|(.?))', re.DOTALL)
_SIMPLE = {b'"': b'"', b"\\": b"\\", b"n": b"\n", b"t": b"\t"}

Predicate = Callable[[bytes, object], bool]


class QueryError(UsageError):
    """A query that does not parse or does not make sense; `where` is `OPTION:COLUMN`."""


class Query:
    """A compiled query: call it with `(path, node)`; `fields` names what it looks at."""

    __slots__ = ("text", "fields", "_test")

    def __init__(self, text: str, test: Predicate, fields: frozenset[str]) -> None:
        self.text = text
        self._test = test
        self.fields = fields

    def __call__(self, path: bytes, node) -> bool:
        return self._test(path, node)

    def __repr__(self) -> str:
        return f"Query({self.text!r})"


# -- getters: (path, node) -> value or None ------------------------------------------------

def _name(path: bytes, node) -> bytes:
    return path.rpartition(b"/")[2] or b"/"


def _type(path: bytes, node) -> int:
    ftype = node.mode & S_IFMT
    return -1 if ftype == S_IFCHR and node.rdev == 0 else ftype


def _target(path: bytes, node) -> bytes | None:
    return node.payload if node.mode & S_IFMT == S_IFLNK else None


def _payload(path: bytes, node) -> bytes | None:
    return node.payload if node.mode & S_IFMT == S_IFREG else None


def _digest(path: bytes, node) -> bytes | None:
    digest = node.digest
    return digest.hex().encode() if digest is not None else None


GETTERS: dict[str, Callable] = {
    "path": lambda path, node: path,
    "name": _name,
    "type": _type,
    "mode": lambda path, node: node.mode & 0o7777,
    "uid": lambda path, node: node.uid,
    "gid": lambda path, node: node.gid,
    "size": lambda path, node: node.size,
    "mtime": lambda path, node: node.mtime,
    "nlink": lambda path, node: node.nlink,
    "rdev": lambda path, node: node.rdev,
    "target": _target,
    "payload": _payload,
    "digest": _digest,
    "content": lambda path, node: node.content,
}


def _xattr_getter(key: bytes) -> Callable:
    def get(path: bytes, node) -> bytes | None:
        for k, v in node.xattrs:
            if k == key:
                return v
        return None

    return get


# -- literals ---------------------------------------------------------------------------------

def _unquote(token: Token, where: str) -> bytes:
    raw = token[1:-1].encode("utf-8")

    def repl(m: re.Match) -> bytes:
        if m.group(1) is not None:
            return bytes((int(m.group(1), 16),))
        if m.group(2) is not None:
            return _SIMPLE[m.group(2)]
        raise QueryError(f"invalid escape \\{m.group(3).decode('utf-8', 'replace')} in {token}: expected "
                         '\\", \\\\, \\n, \\t or \\xHH', _at(where, token))

    return _STRING_ESCAPE.sub(repl, raw) if b"\\" in raw else raw


def _at(where: str, token) -> str:
    column = getattr(token, "column", None)
    return f"{where}:{column}" if column else where


def parse_size(text: str) -> int | None:
    m = re.fullmatch(r"([0-9]+)([a-zA-Z]*)", text)
    if m is None or m.group(2).lower() not in SIZE_UNITS:
        return None
    return int(m.group(1)) * SIZE_UNITS[m.group(2).lower()]


def parse_time(text: str) -> int | None:
    """Seconds since the epoch: an integer, an RFC 3339 time, or a date (midnight UTC)."""
    if text.isdigit():
        return int(text)
    if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
        text += "T00:00:00Z"
    parsed = rfc3339.parse(text)
    return parsed[0] if parsed is not None else None


class _Compiler(Transformer):
    """Parse tree → closures.  Type errors are found here, so a bad query fails before any walk."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.fields: set[str] = set()

    def xattr(self, items):
        (token,) = items
        return ("xattr", _unquote(token, self.where), token)

    def field(self, items):
        (item,) = items
        if isinstance(item, tuple):
            return item
        if item not in GETTERS:
            raise QueryError(f"unknown field {str(item)!r}: expected one of {', '.join(FIELDS)} or xattr[\"KEY\"]",
                             _at(self.where, item))
        return (str(item), None, item)

    def value(self, items):
        (token,) = items
        return token

    @v_args(inline=True)
    def present(self, xattr):
        self.fields.add("xattr")
        get = _xattr_getter(xattr[1])
        return lambda path, node: get(path, node) is not None

    @v_args(inline=True)
    def compare(self, field, op, value):
        name, key, token = field
        self.fields.add(name)
        get = _xattr_getter(key) if name == "xattr" else GETTERS[name]
        op = str(op)
        if name in ("path", "name", "target", "payload", "content", "digest", "xattr"):
            literal = self.string(name, value)
            if op in ("~", "!~"):
                try:
                    match = Glob(literal)
                except ValueError as e:
                    raise QueryError(f"glob {value}: {e}", _at(self.where, value)) from None
                want = op == "~"

                def glob(path, node):
                    v = get(path, node)
                    return v is not None and match(v) is want

                return glob
            if op not in ("==", "!="):
                raise QueryError(f"{op} does not apply to {name}: expected ==, !=, ~ or !~", _at(self.where, value))
        elif name == "type":
            if op not in ("==", "!="):
                raise QueryError(f"{op} does not apply to type: expected == or !=", _at(self.where, value))
            literal = TYPES.get(str(value).strip('"'))
            if literal is None:
                raise QueryError(f"unknown type {value}: expected one of {', '.join(TYPES)}", _at(self.where, value))
        else:
            if op in ("~", "!~"):
                raise QueryError(f"{op} does not apply to {name}: expected ==, !=, <, <=, > or >=",
                                 _at(self.where, value))
            literal = self.number(name, value)
        test = COMPARE[op]

        def compare(path, node):
            v = get(path, node)
            return v is not None and test(v, literal)

        return compare

    def string(self, name: str, token: Token) -> bytes:
        if token.type != "STRING":
            raise QueryError(f"{name} compares with a string: expected \"…\", got {token}", _at(self.where, token))
        literal = _unquote(token, self.where)
        if name == "digest":
            literal = literal.lower()
        return literal

    def number(self, name: str, token: Token) -> int:
        text = str(token)
        if token.type == "STRING":
            text = _unquote(token, self.where).decode("utf-8", "replace")
            if name != "mtime":
                raise QueryError(f"{name} compares with a number, got {token}", _at(self.where, token))
        value: int | None
        if name == "mode":
            digits = text[2:] if text[:2] in ("0o", "0O") else text
            value = int(digits, 8) if re.fullmatch(r"[0-7]+", digits) else None
            expected = "an octal number such as 644 or 0o4755"
        elif name == "size":
            value = parse_size(text)
            expected = "a number with an optional unit (K, M, G, T, KiB, kB …)"
        elif name == "mtime":
            value = parse_time(text)
            expected = "seconds since the epoch or an RFC 3339 time (\"2024-01-01\", \"2024-01-01T12:00:00Z\")"
        else:
            value = int(text, 0) if re.fullmatch(r"[0-9]+|0[xX][0-9a-fA-F]+", text) else None
            expected = "an integer"
        if value is None:
            raise QueryError(f"{name}: expected {expected}, got {token}", _at(self.where, token))
        return value

    @v_args(inline=True)
    def negate(self, test):
        return lambda path, node: not test(path, node)

    def conj(self, tests):
        return lambda path, node: all(t(path, node) for t in tests)

    def disj(self, tests):
        return lambda path, node: any(t(path, node) for t in tests)


@functools.cache
def _parser() -> Lark:
    return Lark(GRAMMAR, parser="lalr", maybe_placeholders=False)


_TOKEN_NAMES = {"NAME": "a field name", "OP": "an operator (==, !=, <, <=, >, >=, ~, !~)",
                "STRING": "a \"string\"", "NUMBER": "a number", "LPAR": "(", "RPAR": ")",
                "AND": "and", "OR": "or", "NOT": "not", "XATTR": "xattr", "LSQB": "[", "RSQB": "]",
                "$END": "the end"}


def _expected(names: Iterable[str]) -> str:
    names = set(names)
    if {"STRING", "NUMBER"} <= names:
        return "a value (a number, a \"string\" or a type name)"
    shown = sorted({_TOKEN_NAMES.get(n, n.lower()) for n in names})
    return " or ".join(shown) if shown else "something else"


@functools.lru_cache(maxsize=64)
def parse(text: str, where: str = "query") -> Query:
    """Compile a query; errors are `QueryError`s naming `where` and the column."""
    try:
        tree = _parser().parse(text)
    except UnexpectedEOF as e:
        raise QueryError(f"incomplete query: expected {_expected(e.expected)}", f"{where}:{len(text) + 1}") from None
    except UnexpectedToken as e:
        if e.token.type == "$END":
            raise QueryError(f"incomplete query: expected {_expected(e.expected)}", f"{where}:{len(text) + 1}") from None
        got = repr(str(e.token))
        raise QueryError(f"unexpected {got}: expected {_expected(e.expected)}", f"{where}:{e.column}") from None
    except UnexpectedCharacters as e:
        raise QueryError(f"unexpected character {text[e.pos_in_stream]!r}", f"{where}:{e.column}") from None
    except UnexpectedInput as e:  # pragma: no cover - other lark input errors
        raise QueryError(str(e).splitlines()[0], where) from None
    compiler = _Compiler(where)
    try:
        test = compiler.transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, QueryError):
            raise e.orig_exc from None
        raise
    return Query(text, test, frozenset(compiler.fields))


def any_of(texts: Iterable[str], where: str = "query") -> Query | None:
    """One query matching what any of `texts` matches (None if there are none)."""
    queries = [parse(t, where) for t in texts]
    if not queries:
        return None
    if len(queries) == 1:
        return queries[0]
    tests = tuple(q._test for q in queries)
    return Query(" or ".join(f"({q.text})" for q in queries),
                 lambda path, node: any(t(path, node) for t in tests),
                 frozenset().union(*(q.fields for q in queries)))
