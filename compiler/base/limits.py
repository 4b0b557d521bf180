"""The limits composefs enforces, stated once.

Frontends call these while they still know the input position (a dumpfile line, a tar
member), and the validation pass calls them again on the finished tree so that every source,
including trees built in code, meets them.  Each check returns None or the rule it broke.
Values follow libcomposefs 1.0.8 (format note §3.6, §6.1, §7.3).
"""

from __future__ import annotations

from cfsc.base.tree import FILE_TYPES, S_IFMT

NAME_MAX = 255  # (also the kernel's EROFS_NAME_LEN)
PATH_MAX = 4096  # payloads and symlink targets must be shorter (C strings + NUL)
INLINE_CONTENT_MAX = 5000
# LCFS_RECOMMENDED_INLINE_CONTENT_MAX: sources that choose (directories, tar, OSTree) keep a
# regular file of 1..64 bytes in the image and store larger ones, as mkcomposefs does.
INLINE_MAX = 64
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 65535
XATTR_ACCOUNTING_MAX = 32767  # LCFS_INODE_EXTERNAL_XATTR_MAX: per-inode budget
XATTR_HEADER_SIZE = 12
XATTR_ENTRY_OVERHEAD = 7  # 2 * 4-byte entry header - 1 (worst-case alignment)
MAX_EXTERNAL_SIZE = 1 << 53  # 1024 chunks of 2^43 bytes
MTIME_MIN, MTIME_MAX = -(1 << 63), (1 << 63) - 1  # i_mtime is a signed 64-bit field
MTIME_NSEC_MAX = (1 << 32) - 1  # i_mtime_nsec: unsigned 32 bits (upstream stores what it is given)
VALID_TYPES = frozenset(FILE_TYPES)


def check_mode(mode: int) -> str | None:
    if mode & S_IFMT not in VALID_TYPES:
        return f"invalid mode {mode:o}: expected a file type (0100000 regular, 040000 directory, …)"
    return None


def check_name(name: bytes) -> str | None:
    if not name:
        return "empty file name"
    if len(name) > NAME_MAX:
        return f"file name of {len(name)} bytes: expected at most {NAME_MAX}"
    if name in (b".", b".."):
        return f"file name {name.decode()!r} is reserved"
    if b"/" in name or b"\0" in name:
        return "file name contains '/' or NUL"
    return None


def check_symlink(target: bytes | None) -> str | None:
    if not target:
        return "symlink without a target: expected 1 to 4095 bytes"
    if len(target) >= PATH_MAX:
        return f"symlink target of {len(target)} bytes: expected at most {PATH_MAX - 1}"
    if b"\0" in target:
        return "symlink target contains NUL"
    return None


def check_payload(payload: bytes) -> str | None:
    if len(payload) >= PATH_MAX:
        return f"payload of {len(payload)} bytes: expected at most {PATH_MAX - 1}"
    if b"\0" in payload:
        return "payload contains NUL"
    return None


def check_content(content: bytes) -> str | None:
    if len(content) > INLINE_CONTENT_MAX:
        return f"inline content of {len(content)} bytes: expected at most {INLINE_CONTENT_MAX}"
    return None


def check_external_size(size: int) -> str | None:
    if size > MAX_EXTERNAL_SIZE:
        return f"external file of {size} bytes: expected at most 2^53 (1024 chunks)"
    return None


def check_mtime(sec: int, nsec: int) -> str | None:
    if not MTIME_MIN <= sec <= MTIME_MAX:
        return f"mtime {sec} is out of range {MTIME_MIN}..{MTIME_MAX} (a 64-bit time)"
    if not 0 <= nsec <= MTIME_NSEC_MAX:
        return f"mtime nanoseconds {nsec} are out of range 0..{MTIME_NSEC_MAX}"
    return None


def check_xattr(key: bytes, value: bytes) -> str | None:
    if not key or len(key) > XATTR_NAME_MAX:
        return f"xattr key of {len(key)} bytes: expected 1 to {XATTR_NAME_MAX}"
    if b"\0" in key:
        return "xattr key contains NUL"
    if len(value) > XATTR_VALUE_MAX:
        return f"xattr value of {len(value)} bytes: expected at most {XATTR_VALUE_MAX}"
    return None


def xattr_cost(key: bytes, value: bytes) -> int:
    """What one xattr counts against the per-inode budget (libcomposefs' accounting)."""
    return XATTR_ENTRY_OVERHEAD + len(key) + len(value)


def check_xattr_budget(xattrs) -> str | None:
    """The per-inode xattr budget for a set of distinct keys."""
    if not xattrs:
        return None
    total = XATTR_HEADER_SIZE + sum(XATTR_ENTRY_OVERHEAD + len(k) + len(v) for k, v in xattrs)
    if total > XATTR_ACCOUNTING_MAX:
        return f"xattrs need {total} bytes of the per-inode budget: expected at most {XATTR_ACCOUNTING_MAX}"
    return None


def xattrs_problem(xattrs) -> str | None:
    """What is wrong with an inode's set of xattrs: a pair's own limits, then the budget."""
    for key, value in xattrs:
        problem = check_xattr(key, value)
        if problem:
            return problem
    return check_xattr_budget(xattrs)


def check_archive_path(length: int) -> str | None:
    """An archive member's path (a tar layer's, its TOC's), `length` bytes as an absolute
    path: no extractor can create one longer than PATH_MAX (GNU tar, umoci and
    containers/storage fail), and each component would be a directory in memory.  (A source
    directory can be deeper: it exists.)"""
    if length > PATH_MAX:
        return f"a path of {length} bytes: at most {PATH_MAX}, as an extracted layer can have"
    return None
