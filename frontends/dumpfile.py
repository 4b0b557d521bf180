"""composefs dumpfile → tree, exactly as `mkcomposefs --from-file` 1.0.8 reads it.

Format note §7.  One record per `\\n`-terminated line:

    PATH SIZE MODE NLINK UID GID RDEV SEC.NSEC PAYLOAD CONTENT DIGEST [KEY=VALUE ...]

Lenient by default, like upstream; `Options.strict` adds upstream's `CFS_PARSE_STRICT`
rules (final newline, no rdev on non-devices, symlink SIZE = target length, no symlink
content).  Every rejection names `file:line:FIELD` and the rule; the checks run in upstream's
order so the first error reported is the one upstream would hit.

Speed: a line costs one `split`, `isdigit` fast paths for the integers, unescaping only when
a field holds a backslash, and a cache from the raw xattr section to its (interned) xattr
tuple, since real trees repeat a few xattr sets many times.
"""

from __future__ import annotations

import re

from cfsc import limits
from cfsc.errors import DumpfileError
from cfsc.options import Options
from cfsc.streams import read_all, source_name
from cfsc.tree import S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Inode, Tree

FIELDS = ("PATH", "SIZE", "MODE", "NLINK", "UID", "GID", "RDEV", "MTIME", "PAYLOAD", "CONTENT", "DIGEST")
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1

# strtoull(): optional leading white space and sign, then digits up to the end of the field.
_DEC = re.compile(rb"[ \t\n\v\f\r]*([+-]?)([0-9]+)\Z")
_OCT = re.compile(rb"[ \t\n\v\f\r]*([+-]?)([0-7]+)\Z")
_ESCAPE = re.compile(rb"\\(?:x([0-9a-fA-F]{2})|([\\nrt])|(.?.?))", re.DOTALL)
_SIMPLE_ESCAPES = {b"\\": b"\\", b"n": b"\n", b"r": b"\r", b"t": b"\t"}
_HEX = re.compile(rb"(?:[0-9a-fA-F]{2})*")


def sniff(head: bytes) -> bool:
    """A dumpfile starts with its root record: `/ ` then a number."""
    return re.match(rb"/ [ \t+-]*[0-9]+ [ \t+-]*[0-7]+ ", head) is not None


class _BadEscape(Exception):
    pass


def _escape_repl(m: re.Match) -> bytes:
    if m.group(1) is not None:
        return bytes((int(m.group(1), 16),))
    if m.group(2) is not None:
        return _SIMPLE_ESCAPES[m.group(2)]
    raise _BadEscape(m.group(0).decode("latin-1"))


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


def _digest(text: bytes) -> bytes:
    """Upstream's lenient hex: whole pairs until the first bad digit, zero-filled to 32."""
    if len(text) == 64 and _HEX.fullmatch(text):
        return bytes.fromhex(text.decode())
    good = _HEX.match(text).group(0)[:64]  # type: ignore[union-attr]
    return bytes.fromhex(good.decode()).ljust(32, b"\0")


class _Parser:
    """State of one parse.  Kept as a class so the hot loop reads locals, not globals."""

    def __init__(self, name: str, strict: bool) -> None:
        self.name = name
        self.strict = strict
        self.root: Inode | None = None
        self.dirs: dict[bytes, Inode] = {}  # canonical path (no leading '/') → directory
        self.fixups: list[tuple[Inode, str, bytes | None, int]] = []  # (parent, name, target, line)
        self.placeholders: dict[int, Inode] = {}  # id(placeholder) → placeholder
        self.link_to: dict[int, Inode] = {}  # id(placeholder) → what it was linked to
        self.xattr_cache: dict[bytes, tuple] = {}

    def fail(self, line: int, field: str, what: str) -> DumpfileError:
        return DumpfileError(what, self.name, line, field)

    def unescape(self, text: bytes, line: int, field: str) -> bytes:
        if b"\\" not in text:
            return text
        try:
            return _ESCAPE.sub(_escape_repl, text)
        except _BadEscape as e:
            raise self.fail(line, field, f"invalid escape {e.args[0]!r}: expected \\\\, \\n, \\r, \\t or \\xHH") from None

    def integer(self, text: bytes, line: int, field: str) -> int:
        if text.isdigit():
            value = int(text)
            return min(value, U64)
        value = _strtoull(text, _DEC)
        if value is None:
            raise self.fail(line, field, f"invalid integer {text.decode('latin-1')!r}: expected a base-10 number")
        return value

    def lookup_parent(self, path: bytes, line: int) -> tuple[Inode, bytes]:
        parts = path.split(b"/")
        name = parts.pop()
        key = b"/".join(p for p in parts if p)
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

    def parse(self, data: bytes) -> Tree:
        lines = data.split(b"\n")
        tail = lines.pop()  # text after the last newline
        line_no = 0
        for line_no, line in enumerate(lines, 1):
            self.parse_line(line, line_no)
        if tail:
            if self.strict:
                raise self.fail(line_no + 1, "", "missing trailing newline (strict mode)")
            self.parse_line(tail, line_no + 1)
        if self.root is None:
            raise DumpfileError("no files in dump file: expected a root record `/ …`", self.name, 1)
        self.resolve_hardlinks()
        return Tree(self.root, self.name)

    def parse_line(self, line: bytes, n: int) -> None:
        if b"\0" in line:
            column = line.index(b"\0") + 1
            raise self.fail(n, "", f"embedded NUL at column {column}: escape it as \\x00")
        f = line.split(b" ", 11)
        if len(f) < 11:
            f += [b""] * (11 - len(f))
        path = self.unescape(f[0], n, "PATH")
        nul = path.find(b"\0")
        if nul >= 0:
            path = path[:nul]  # upstream uses the path as a C string
        if not path:
            raise self.fail(n, "PATH", "empty path")

        mode_text = f[2]
        is_link = mode_text[:1] == b"@"
        if is_link:
            mode_text = mode_text[1:]
        mode = _strtoull(mode_text, _OCT)
        if mode is None:
            raise self.fail(n, "MODE", f"invalid integer {mode_text.decode('latin-1')!r}: expected an octal mode")
        mode &= U32
        problem = limits.check_mode(mode)
        if problem:
            raise self.fail(n, "MODE", problem)
        ftype = mode & S_IFMT

        # Add the entry to the tree (upstream does this before parsing the other fields).
        if path == b"/":
            if ftype != S_IFDIR:
                raise self.fail(n, "MODE", "the root must be a directory")
            if self.root is not None:
                raise self.fail(n, "PATH", "a second root record: expected exactly one `/` line")
            node = self.root = Inode(mode)
            self.dirs[b""] = node
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
            if len(name) > limits.NAME_MAX:
                raise self.fail(n, "PATH", f"file name of {len(name)} bytes: expected at most {limits.NAME_MAX}")
            children = parent.children
            assert children is not None
            if name in children:
                raise self.fail(n, "PATH", "path already exists on an earlier line")
            node = Inode(mode)
            children[name] = node

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
            self.placeholders[id(node)] = node
            self.fixups.append((parent, name, target_path, n))  # type: ignore[arg-type]
            return

        if ftype == S_IFDIR and parent is not None:
            key = path.strip(b"/")
            if b"//" in key:
                key = b"/".join(p for p in key.split(b"/") if p)
            self.dirs[key] = node

        size = self.integer(f[1], n, "SIZE")
        nlink = self.integer(f[3], n, "NLINK")
        uid = self.integer(f[4], n, "UID")
        # Upstream quirk (§7.3): a bad GID or RDEV only counts when UID is 0; else it reads 0.
        gid_text, rdev_text = f[5], f[6]
        if gid_text.isdigit():
            gid = int(gid_text)
        else:
            gid = _strtoull(gid_text, _DEC)
            if gid is None:
                if uid == 0:
                    raise self.fail(n, "GID", f"invalid integer {gid_text.decode('latin-1')!r}: expected a base-10 number")
                gid = 0
        if rdev_text.isdigit():
            rdev = int(rdev_text)
        else:
            rdev = _strtoull(rdev_text, _DEC)
            if rdev is None:
                if uid == 0:
                    raise self.fail(n, "RDEV", f"invalid integer {rdev_text.decode('latin-1')!r}: expected a base-10 number")
                rdev = 0

        sec_text, dot, nsec_text = f[7].partition(b".")
        sec = self.integer(sec_text, n, "MTIME")
        nsec = self.integer(nsec_text, n, "MTIME")
        if sec > 0x7FFFFFFFFFFFFFFF:
            sec -= 1 << 64  # time_t is signed

        payload_text = f[8]
        payload = None if payload_text == b"-" else self.unescape(payload_text, n, "PAYLOAD")
        if payload is not None:
            nul = payload.find(b"\0")
            if nul >= 0:
                payload = payload[:nul]
        content_text = f[9]
        content = None if content_text == b"-" else self.unescape(content_text, n, "CONTENT")
        if content is not None and len(content) != size:
            raise self.fail(n, "CONTENT", f"content of {len(content)} bytes: must match SIZE {size}")
        digest_text = f[10]
        digest = None if digest_text == b"-" else self.unescape(digest_text, n, "DIGEST")

        node.nlink = nlink & U32
        node.uid = uid & U32
        node.gid = gid & U32
        node.mtime = sec
        node.mtime_nsec = nsec & U32
        if ftype == S_IFCHR or ftype == S_IFBLK:
            node.rdev = rdev & U32
        elif self.strict and rdev != 0:
            raise self.fail(n, "RDEV", "non-zero device number on a non-device (strict mode)")

        if ftype == S_IFLNK:
            problem = limits.check_symlink(payload)
            if problem:
                raise self.fail(n, "PAYLOAD", problem)
            assert payload is not None
            if self.strict:
                if size != len(payload):
                    raise self.fail(n, "SIZE", f"symlink SIZE {size}: must equal the target length {len(payload)} (strict mode)")
                if content:
                    raise self.fail(n, "CONTENT", "a symlink cannot have content (strict mode)")
            node.payload = payload
            node.size = len(payload)
        else:
            node.size = size
            if payload is not None:
                if len(payload) >= limits.PATH_MAX:
                    raise self.fail(n, "PAYLOAD", f"payload of {len(payload)} bytes: expected at most {limits.PATH_MAX - 1}")
                if ftype == S_IFREG:
                    node.payload = payload
            if content is not None:
                if len(content) > limits.INLINE_CONTENT_MAX:
                    raise self.fail(n, "CONTENT", f"inline content of {len(content)} bytes: expected at most {limits.INLINE_CONTENT_MAX}")
                # Upstream stores content on any type but only regular files use it; an
                # empty content means "no content" (and size 0, which was checked above).
                if ftype == S_IFREG and content:
                    node.content = content
        if digest is not None and ftype == S_IFREG:
            node.digest = _digest(digest)

        if len(f) == 12 and f[11]:
            section = f[11]
            cached = self.xattr_cache.get(section)
            if cached is None:
                cached = self.parse_xattrs(section, n)
                self.xattr_cache[section] = cached
            node.xattrs = cached

        if ftype == S_IFREG and content is None and size > limits.MAX_EXTERNAL_SIZE:
            raise self.fail(n, "SIZE", f"external file of {size} bytes: expected at most 2^53 (1024 chunks)")

    def parse_xattrs(self, section: bytes, n: int) -> tuple:
        if len(section) > 65535:
            raise self.fail(n, "XATTRS", f"xattr section of {len(section)} bytes: expected at most 65535 (too many xattrs)")
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
        return tuple(sorted(items.items()))

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
        for parent, name, _target, n in self.fixups:
            node = parent.children[name]  # type: ignore[index]
            seen = {id(node)}
            final = link_to[id(node)]
            while id(final) in placeholders:
                if id(final) in seen:
                    raise self.fail(n, "PAYLOAD", "hardlink cycle: the chain of @ targets comes back to this line")
                seen.add(id(final))
                final = link_to[id(final)]
            parent.add_child(name, final, link=True)


def load(source, options: Options | None = None) -> Tree:
    options = options or Options()
    name = source_name(source)
    data = read_all(source)
    return _Parser(name, options.strict).parse(data)


def loads(data: bytes, options: Options | None = None, name: str = "<string>") -> Tree:
    options = options or Options()
    return _Parser(name, options.strict).parse(data)
