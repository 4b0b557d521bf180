"""composefs' overlay convention, declared once: the xattrs an image carries for overlayfs.

A composefs image is the upper layer of an overlayfs mount whose data-only lower layer is the
store (format note §4, §8).  What overlayfs reads from it is spelled in xattrs:

* `trusted.overlay.*` is overlayfs' own namespace; a user's `trusted.overlay.X` is stored
  escaped as `trusted.overlay.overlay.X`, which the kernel shows back as `trusted.overlay.X`
  (`escape_key`, `unescape_key`).  `user.overlay.*` is not escaped.
* An external regular file (`is_external`: size > 0, no inline content) carries
  `trusted.overlay.metacopy` (empty, or a header + its fs-verity digest: `METACOPY_HEADER`
  for SHA-256, as mkcomposefs writes, or the SHA-512 one composefs-rs writes) and
  `trusted.overlay.redirect` = `/` + payload (`implied_xattrs`).
* A whiteout (character device 0:0) is stored as an empty regular file marked with the
  escaped and the `user.` whiteout keys; its directory gets the `…whiteouts` markers and, in
  format 1, `…opaque=x`.  The root is `opaque=y` and holds `ROOT_WHITEOUT_NAMES`.

The rewrite into this form is `cfsc.passes.add_overlay_xattrs`; the EROFS writer, the sharing
pass, the reader (`entries`), the image frontend, the tools and the FUSE view read these
declarations, so every side agrees on one spelling.
"""

from __future__ import annotations

from cfsc.base.fsverity import ALGORITHMS, DIGEST_SIZE
from cfsc.base.tree import S_IFCHR, S_IFMT, S_IFREG, Inode

TRUSTED_OVERLAY = b"trusted.overlay."
ESCAPED = b"trusted.overlay.overlay."  # a user's trusted.overlay.X, stored
METACOPY = b"trusted.overlay.metacopy"
REDIRECT = b"trusted.overlay.redirect"
OPAQUE = b"trusted.overlay.opaque"
ESCAPED_WHITEOUT = b"trusted.overlay.overlay.whiteout"
ESCAPED_WHITEOUTS = b"trusted.overlay.overlay.whiteouts"
ESCAPED_OPAQUE = b"trusted.overlay.overlay.opaque"
USER_WHITEOUT = b"user.overlay.whiteout"
USER_WHITEOUTS = b"user.overlay.whiteouts"
USER_OPAQUE = b"user.overlay.opaque"
OPAQUE_DIR = b"y"  # opaque: the directory hides what lower layers have below it
OPAQUE_WHITEOUTS = b"x"  # format 1: the directory holds whiteouts (overlayfs looks for them)
OPAQUE_DIR_XATTR = (OPAQUE, OPAQUE_DIR)
USER_MARKERS = (USER_WHITEOUT, USER_WHITEOUTS, USER_OPAQUE)
# Markers a reader drops (libcomposefs' reader): they only tell overlayfs where to look.
READER_DROPPED = frozenset((ESCAPED_WHITEOUTS, USER_WHITEOUT, USER_WHITEOUTS))

# overlayfs' struct ovl_metacopy: version 0, length (header + digest), flags 0, digest algorithm
# (FS_VERITY_HASH_ALG_*); one header per digest size, which tells the algorithm.
METACOPY_HEADERS = {a.size: bytes((0, 4 + a.size, 0, a.id)) for a in ALGORITHMS.values()}
METACOPY_HEADER = METACOPY_HEADERS[DIGEST_SIZE]  # SHA-256's: what mkcomposefs writes
METACOPY_DIGEST_SIZE = len(METACOPY_HEADER) + DIGEST_SIZE  # a metacopy value holding a SHA-256 digest
METACOPY_DIGEST_SIZES = frozenset(len(h) + n for n, h in METACOPY_HEADERS.items())
METACOPY_EMPTY = (METACOPY, b"")

ROOT_WHITEOUT_MODE = S_IFCHR | 0o644
ROOT_WHITEOUT_NAMES = tuple(f"{i:02x}".encode() for i in range(256))  # the store's fan-out


def escape_key(key: bytes) -> bytes:
    """The stored key of a user's xattr: `trusted.overlay.X` → `trusted.overlay.overlay.X`."""
    return ESCAPED + key[len(TRUSTED_OVERLAY):] if key.startswith(TRUSTED_OVERLAY) else key


def unescape_key(key: bytes) -> bytes:
    """A stored escaped key as the user had it: `trusted.overlay.overlay.X` → `trusted.overlay.X`."""
    return TRUSTED_OVERLAY + key[len(ESCAPED):] if key.startswith(ESCAPED) else key


def escaped_xattrs(xattrs: tuple) -> tuple:
    """A user's xattrs as stored, sorted (the escaped keys sort elsewhere)."""
    return tuple(sorted((escape_key(k), v) for k, v in xattrs))


def is_external(node: Inode) -> bool:
    """A regular file whose data lives in the store (it gets metacopy and redirect).

    Hot loops that already know the node is a regular file write `size > 0 and content is
    None` out; each such place names this function, and tests/test_overlay.py holds them equal."""
    return node.mode & S_IFMT == S_IFREG and node.size > 0 and node.content is None


def metacopy_value(digest: bytes | None) -> bytes:
    return METACOPY_HEADERS[len(digest)] + digest if digest is not None else b""


def metacopy_xattr(digest: bytes | None) -> tuple[bytes, bytes]:
    return METACOPY, metacopy_value(digest)


def redirect_xattr(payload: bytes) -> tuple[bytes, bytes]:
    return REDIRECT, b"/" + payload


def metacopy_digest(value: bytes) -> bytes | None:
    """The fs-verity digest a metacopy value holds, or None (an empty or other-sized value).
    The size alone decides, as libcomposefs' reader does for SHA-256 (36 bytes)."""
    return value[len(METACOPY_HEADER):] if len(value) in METACOPY_DIGEST_SIZES else None


def redirect_payload(value: bytes) -> bytes:
    """The store path a redirect value names: one leading `/` removed, cut at a NUL (libcomposefs
    keeps it as a C string)."""
    value = value[1:] if len(value) > 1 and value[:1] == b"/" else value
    return value.partition(b"\0")[0]


def implied_xattrs(node: Inode) -> tuple:
    """metacopy and redirect of an external regular file (sorted), else ().

    They are implied, not stored on the lowered tree: a pure function of the file's payload
    and digest, unique per file, and a million-file tree would otherwise hold two million
    extra tuples only for the writer to take them apart again."""
    if not is_external(node):
        return ()
    metacopy = metacopy_xattr(node.digest)
    payload = node.payload
    return (metacopy, (REDIRECT, b"/" + payload)) if payload else (metacopy,)


def image_xattrs(node: Inode) -> tuple:
    """All xattrs an inode of a lowered tree carries on disk, sorted by key."""
    implied = implied_xattrs(node)
    return tuple(sorted(node.xattrs + implied)) if implied else node.xattrs
