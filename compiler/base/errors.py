"""The one error hierarchy.

Every error a user sees is one line: *where* (file:line:field, tree path, image byte offset,
tar member, JSON path) and *what was expected*.  The CLI prints `error: <str(e)>` and exits
with `e.exit_code`; nothing below the CLI prints.

Errors about looking things up in a tree double as `OSError`s with an errno, so the FUSE
server can map any of them to a reply code without knowing the format.
"""

from __future__ import annotations

import errno as _errno


class CfscError(Exception):
    """Base class.  `where` locates the problem, `what` says what was expected."""

    exit_code = 2

    def __init__(self, what: str, where: str = "") -> None:
        super().__init__(what, where)
        self.what = what
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {self.what}" if self.where else self.what


class InputError(CfscError):
    """The input (a dumpfile, an image, a directory, options …) is not acceptable."""


class InputErrors(InputError):
    """Several independent problems in one input, all reported (one line each, up to a limit).

    Formats whose records do not depend on each other (JSON entries) report every bad record
    at once, so a user fixes a file in one round instead of one error per run.
    """

    def __init__(self, lines: list[str], total: int | None = None) -> None:
        total = len(lines) if total is None else total
        text = "\n".join(lines)
        if total > len(lines):
            text += f"\n… and {total - len(lines)} more"
        super().__init__(text)
        self.lines = lines
        self.total = total


class UsageError(InputError):
    """Bad command-line options or option combinations."""


class DumpfileError(InputError):
    """A dumpfile line breaks a rule; `where` is `file:line:FIELD`."""

    def __init__(self, what: str, source: str, line: int, field: str = "") -> None:
        where = f"{source}:{line}" + (f":{field}" if field else "")
        super().__init__(what, where)
        self.line = line
        self.field = field


def shown_path(raw: bytes) -> str:
    """A name or path for a message: UTF-8 where it is, escapes for other bytes and for
    control characters (a newline must not break the one-line error, nor a NUL or an escape
    sequence reach the terminal raw)."""
    text = raw.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def shown_cut(raw: bytes, limit: int, keep: int | None = None) -> str:
    """`shown_path` of a value that may be megabytes (a PAX record, a name in hostile input):
    whole up to `limit` bytes, beyond that its first `keep` (default `limit`) and its length."""
    if len(raw) > limit:
        return f"{shown_path(raw[:limit if keep is None else keep])}… ({len(raw)} bytes)"
    return shown_path(raw)


class TreeError(InputError):
    """The tree violates a composefs limit; `where` is the path in the tree."""

    def __init__(self, what: str, path: bytes | str, source: str = "") -> None:
        raw = path if isinstance(path, bytes) else path.encode("utf-8", "surrogateescape")
        text = shown_path(raw)
        where = f"{source}:{text}" if source else text
        super().__init__(what, where)
        self.path = text
        self.raw_path = raw


class ImageError(InputError, OSError):
    """A composefs image is truncated, corrupt or hostile; `where` has the byte offset."""

    def __init__(self, what: str, where: str = "") -> None:
        InputError.__init__(self, what, where)
        self.errno = _errno.EIO


class LookupFailed(CfscError, OSError):
    """A path or object does not exist (maps to ENOENT at the FUSE edge)."""

    def __init__(self, what: str, where: str = "", code: int = _errno.ENOENT) -> None:
        CfscError.__init__(self, what, where)
        self.errno = code


class IntegrityError(CfscError, OSError):
    """Data does not match the digest the image records, or cannot be checked (EIO at the
    FUSE edge)."""

    def __init__(self, what: str, where: str = "") -> None:
        CfscError.__init__(self, what, where)
        self.errno = _errno.EIO


class StoreError(InputError):
    """A content store is not laid out as one (something other than a directory where a
    fan-out directory belongs, other than a regular file under an object's name): bad input,
    as a malformed source is; `where` is the path in the store."""


class OutputError(CfscError):
    """Writing an output (image, store object) failed; nothing partial was left behind."""

    exit_code = 1
