"""Encoding an inode's xattrs: the inline body (header, shared ids, entries), as libcomposefs.

Format note §3: each key maps to a prefix index and a stored name; the body is a 12-byte
header with the name filter (a bloom filter of xxh32 bits) and the shared-reference count,
then shared ids (while fewer than 128 are used), then the other entries, all in key order.

Speed: real trees repeat a few xattr tuples (SELinux labels…), so a tuple's layout is worked
out once (`_Layout`, cached by tuple identity).  An external file's implied metacopy and
redirect (`overlay.implied_xattrs`) are mostly unique per file: what is not shared
is spliced into a cached layout instead of building a merged tuple per file.  The layout is
that of the file's own tuple when neither is shared (nearly always), or of its tuple plus the
metacopy when that is shared (files without a digest all carry the same empty metacopy; files
of equal content the same digest), then only the redirect is spliced.  A shared redirect
(files naming one object: a real OS holds many copies of a file) comes with a shared metacopy
nearly always (equal content, or no digest): the whole body is then references plus the
tuple's own entries, cached per (tuple, digest, payload), one entry per shared payload.
Anything else (a shared redirect with a metacopy of its own) takes the generic path over
`image_xattrs(node)`, the reference, never cached.
"""

from __future__ import annotations

from bisect import bisect_left
from struct import Struct

import xxhash
from cfsc.backends.erofs.layout import (
    ACL_KEYS,
    EROFS_XATTR_ALIGN,
    EROFS_XATTR_ENTRY,
    EROFS_XATTR_FILTER_BITS,
    EROFS_XATTR_FILTER_SEED,
    EROFS_XATTR_IBODY_HEADER,
    EROFS_XATTR_LONG_PREFIX,
    WRITER_PREFIXES,
)
from cfsc.backends.erofs.overlay import (
    METACOPY,
    METACOPY_EMPTY,
    METACOPY_HEADERS,
    REDIRECT,
    image_xattrs,
    metacopy_digest,
    metacopy_xattr,
    redirect_xattr,
)
from cfsc.base.fsverity import DIGEST_SIZE
from cfsc.base.tree import Inode

_pack_entry = EROFS_XATTR_ENTRY.pack
_IBODY = EROFS_XATTR_IBODY_HEADER.size
_pack_ibody = EROFS_XATTR_IBODY_HEADER.pack
_U32S = [Struct(f"<{n}I") for n in range(EROFS_XATTR_LONG_PREFIX + 1)]
PADS = (b"", b"\0\0\0", b"\0\0", b"\0")  # zeros to the next multiple of 4, by length % 4


def key_info(key: bytes) -> tuple[int, bytes, int]:
    """(prefix index, stored name, name-filter bit) of a key (the writer's prefix table)."""
    index, name = 0, key
    for prefix, i in WRITER_PREFIXES:
        if key.startswith(prefix):
            index, name = i, key[len(prefix):]
            break
    return index, name, 1 << (xxhash.xxh32_intdigest(name, EROFS_XATTR_FILTER_SEED + index) & (EROFS_XATTR_FILTER_BITS - 1))


def entry(index: int, name: bytes, value: bytes) -> bytes:
    """One xattr entry: header, name, value, zero padding to 4 bytes."""
    return _pack_entry(len(name), index, len(value)) + name + value + PADS[(len(name) + len(value)) & 3]


_META_INDEX, _META_NAME, _META_BIT = key_info(METACOPY)
_REDIR_INDEX, _REDIR_NAME, _REDIR_BIT = key_info(REDIRECT)
# By digest size (SHA-256, SHA-512): the metacopy entry up to the digest.
_META_PREFIXES = {n: _pack_entry(len(_META_NAME), _META_INDEX, len(h) + n) + _META_NAME + h
                  for n, h in METACOPY_HEADERS.items()}
_META_EMPTY_ENTRY = entry(_META_INDEX, _META_NAME, b"")
# `external_size` spells the implied entries' sizes out (the hot path): a metacopy entry is 24
# bytes + the digest (56 for SHA-256; 20 empty), a redirect entry `(24 + len(payload)) & ~3`
# (header, name, "/", payload, padding to 4).
assert all(len(p) == 24 for p in _META_PREFIXES.values()) and len(_META_EMPTY_ENTRY) == 20
assert len(_META_PREFIXES[DIGEST_SIZE]) + DIGEST_SIZE == 56
assert EROFS_XATTR_ENTRY.size + len(_REDIR_NAME) + len(b"/") + 3 == 24
REDIRECT_AROUND: dict[int, tuple[bytes, bytes]] = {}  # payload length -> `redirect_around`


def _redirect_entry(payload: bytes) -> bytes:
    """The inline entry of `trusted.overlay.redirect` = `/` + payload."""
    prefix, pad = redirect_around(len(payload))
    return b"".join((prefix, payload, pad))


def redirect_around(length: int) -> tuple[bytes, bytes]:
    """What goes before and after a payload of `length` bytes in its redirect entry: header,
    name and "/"; padding to 4 bytes."""
    around = REDIRECT_AROUND.get(length)
    if around is None:
        around = REDIRECT_AROUND[length] = (
            _pack_entry(len(_REDIR_NAME), _REDIR_INDEX, length + 1) + _REDIR_NAME + b"/",
            PADS[(len(_REDIR_NAME) + 1 + length) & 3])
    return around


class _Layout:
    """A tuple's share of an inode body: refs and entries, plus where the implied ones go."""

    __slots__ = ("size", "bits", "ids", "inline", "meta_at", "redirect_at", "ids_bytes", "heads",
                 "redirect_head", "body")

    def __init__(self, size: int, bits: int, ids: list[int], inline: list[bytes],
                 meta_at: int, redirect_at: int) -> None:
        self.size = size  # header + refs + entries
        self.bits = bits  # name filter bits (not yet inverted)
        self.ids = ids  # shared offsets / 4, relative to the shared area
        self.inline = inline
        self.meta_at = meta_at  # inline entries before metacopy's key
        self.redirect_at = redirect_at  # … before redirect's key
        self.ids_bytes = b""  # packed ids once the shared area's position is known
        # Body starts (header and ids) of a file's own tuple with its implied pairs spliced in:
        # the metacopy / metacopy and redirect.  And of a tuple holding a shared metacopy,
        # with the redirect spliced in.
        self.heads: tuple[bytes, bytes] | None = None
        self.redirect_head: bytes | None = None
        self.body: bytes | None = None  # the whole body when the tuple is all an inode has


class XattrEncoder:
    """Sizes (for the layout plan) and bodies (for emitting) of inode xattrs."""

    def __init__(self, shared: list[tuple[bytes, bytes]]) -> None:
        self.has_acl = False
        self.keys: dict[bytes, tuple[int, bytes, int]] = {}
        self.shared_ids: dict[tuple[bytes, bytes], int] = {}
        offset = 0
        for pair in shared:
            self.shared_ids[pair] = offset // EROFS_XATTR_ALIGN
            index, name, _bit = self.key(pair[0])
            offset += len(entry(index, name, pair[1]))
        self.shared_size = offset
        # Implied pairs that are shared: a metacopy (no digest, or files of equal content)
        # goes into a cached layout; a redirect (two files naming one object, rare) makes
        # that file take the generic path.
        self.shared_digests = {metacopy_digest(v) for k, v in shared if k == METACOPY} - {None}
        self.empty_metacopy_shared = METACOPY_EMPTY in self.shared_ids
        self.metacopies_shared = bool(self.shared_digests or self.empty_metacopy_shared)
        self.shared_payloads = {v[1:] for k, v in shared if k == REDIRECT}  # v = redirect_xattr(payload)[1]
        self.layouts: dict[int, tuple[tuple, _Layout]] = {}
        # (id(own tuple), digest) -> (own tuple, layout of it plus its shared metacopy); and
        # id(own tuple) -> the same for the empty metacopy (no digest)
        self.with_metacopy: dict[tuple[int, bytes], tuple[tuple, _Layout]] = {}
        self.with_empty_metacopy: dict[int, tuple[tuple, _Layout]] = {}
        # (id(own tuple), digest or None, payload) -> (own tuple, layout with both implied shared)
        self.with_redirect: dict[tuple[int, bytes | None, bytes], tuple[tuple, _Layout]] = {}
        self.base = 0  # (inodes_end % block) / 4, set before bodies are built

    def key(self, key: bytes) -> tuple[int, bytes, int]:
        info = self.keys.get(key)
        if info is None:
            info = self.keys[key] = key_info(key)
            if key in ACL_KEYS:
                self.has_acl = True
        return info

    def layout(self, xattrs: tuple) -> _Layout:
        """The layout of a tuple many inodes share (cached by its identity)."""
        hit = self.layouts.get(id(xattrs))
        if hit is not None:
            return hit[1]
        layout = self._layout(xattrs)
        self.layouts[id(xattrs)] = (xattrs, layout)  # the tuple is kept so its id stays unique
        return layout

    def _layout(self, xattrs: tuple) -> _Layout:
        bits = 0
        ids: list[int] = []
        inline: list[bytes] = []
        keys = []
        shared_ids = self.shared_ids
        for pair in xattrs:
            key, value = pair
            index, name, bit = self.key(key)
            bits |= bit
            rel = shared_ids.get(pair)
            if rel is not None and len(ids) < EROFS_XATTR_LONG_PREFIX:
                ids.append(rel)
            else:
                inline.append(entry(index, name, value))
                keys.append(key)
        return _Layout(_IBODY + EROFS_XATTR_ALIGN * len(ids) + sum(map(len, inline)), bits, ids, inline,
                       bisect_left(keys, METACOPY), bisect_left(keys, REDIRECT))

    def _meta_layout(self, node: Inode) -> _Layout | None:
        """The layout holding a file's shared metacopy (None: its metacopy is not shared)."""
        digest = node.digest
        if digest is None:  # (most files of a tree without digests: looked up by the tuple alone)
            return self._empty_meta_layout(node.xattrs) if self.empty_metacopy_shared else None
        if digest not in self.shared_digests:
            return None
        key = (id(node.xattrs), digest)
        hit = self.with_metacopy.get(key)
        if hit is None:
            merged = tuple(sorted(node.xattrs + (metacopy_xattr(digest),)))
            hit = self.with_metacopy[key] = (node.xattrs, self.layout(merged))
        return hit[1]

    def _empty_meta_layout(self, xattrs: tuple) -> _Layout:
        """The layout of a tuple plus the shared empty metacopy (a file without a digest)."""
        hit = self.with_empty_metacopy.get(id(xattrs))
        if hit is None:
            merged = tuple(sorted(xattrs + (METACOPY_EMPTY,)))
            hit = self.with_empty_metacopy[id(xattrs)] = (xattrs, self.layout(merged))
        return hit[1]

    def _redirect_layout(self, node: Inode) -> _Layout | None:
        """The layout of a file whose redirect is shared, when its metacopy is shared too
        (None: it is not): no implied entry is inline, so the whole body is cached."""
        digest = node.digest
        if not (self.empty_metacopy_shared if digest is None else digest in self.shared_digests):
            return None
        payload = node.payload
        key = (id(node.xattrs), digest, payload)
        hit = self.with_redirect.get(key)
        if hit is None:
            merged = tuple(sorted(node.xattrs + (metacopy_xattr(digest), redirect_xattr(payload))))  # type: ignore[arg-type]
            hit = self.with_redirect[key] = (node.xattrs, self.layout(merged))
        return hit[1]

    def external_size(self, node: Inode) -> int:
        """`size(node, True)`, through the cached layouts (the hot path)."""
        payload = node.payload
        if payload in self.shared_payloads:
            layout = self._redirect_layout(node)
            return (layout or self._layout(image_xattrs(node))).size
        layout = self._meta_layout(node) if self.metacopies_shared else None
        if layout is not None:
            size = layout.size
        else:
            hit = self.layouts.get(id(node.xattrs))
            size = (hit[1] if hit is not None else self.layout(node.xattrs)).size
            size += 24 + len(node.digest) if node.digest is not None else 20
        return size + ((24 + len(payload)) & ~3) if payload else size

    def external_body(self, node: Inode) -> bytes:
        """`body(node, True)`, spliced into or taken from the cached layouts (the hot path)."""
        if node.payload in self.shared_payloads:
            layout = self._redirect_layout(node)
            if layout is None:
                return self._generic_body(node)
            return self._whole_body(layout)
        if self.metacopies_shared:
            layout = self._meta_layout(node)
            if layout is not None:
                return self._redirect_spliced(node, layout)
        hit = self.layouts.get(id(node.xattrs))
        layout = hit[1] if hit is not None else self.layout(node.xattrs)
        heads = layout.heads or self._heads(layout)
        digest = node.digest
        payload = node.payload
        inline = layout.inline
        if payload and not inline:  # (nearly every file: no inline xattr of its own)
            prefix, pad = redirect_around(len(payload))
            if digest is None:
                return b"".join((heads[1], _META_EMPTY_ENTRY, prefix, payload, pad))
            return b"".join((heads[1], _META_PREFIXES[len(digest)], digest, prefix, payload, pad))
        meta = _META_PREFIXES[len(digest)] + digest if digest is not None else _META_EMPTY_ENTRY
        if payload:
            redirect = _redirect_entry(payload)
            m, r = layout.meta_at, layout.redirect_at
            return b"".join((heads[1], *inline[:m], meta, *inline[m:r], redirect, *inline[r:]))
        if not inline:
            return heads[0] + meta
        m = layout.meta_at
        return b"".join((heads[0], *inline[:m], meta, *inline[m:]))

    def _heads(self, layout: _Layout) -> tuple[bytes, bytes]:
        """`layout.heads`, made once `base` is set."""
        ids = self._ids_bytes(layout)
        n_ids = len(layout.ids)
        layout.heads = (_pack_ibody(~(layout.bits | _META_BIT) & 0xFFFFFFFF, n_ids) + ids,
                        _pack_ibody(~(layout.bits | _META_BIT | _REDIR_BIT) & 0xFFFFFFFF, n_ids) + ids)
        return layout.heads

    def _redirect_head(self, layout: _Layout) -> bytes:
        """`layout.redirect_head`, made once `base` is set."""
        layout.redirect_head = (_pack_ibody(~(layout.bits | _REDIR_BIT) & 0xFFFFFFFF, len(layout.ids))
                                + self._ids_bytes(layout))
        return layout.redirect_head

    # The writer's loops take most external files without a call per file: a file whose
    # payload (non-empty) and digest are not shared -- nearly all -- has a body that depends
    # on its xattr tuple only up to the digest and the redirect.  These give that part once
    # per tuple; `external_size` and `external_body` are the reference (tests hold them equal).

    def external_fixed(self, xattrs: tuple) -> tuple[int, int]:
        """Body sizes of an external file with these xattrs whose payload and digest are not
        shared, the redirect entry left out: (without a digest, with one: add 24 + its length)."""
        own = self.layout(xattrs).size
        none = self._empty_meta_layout(xattrs).size if self.empty_metacopy_shared else own + 20
        return none, own

    def external_heads(self, xattrs: tuple) -> tuple[bytes | None, bytes | None]:
        """What precedes the redirect entry of an external file with these xattrs and no
        digest, and what precedes the digest of one with an unshared SHA-256 digest, its
        payload not shared; None where an inline entry of the tuple would come between
        (`external_body` then).  Call after `base` is set."""
        own = self.layout(xattrs)
        digest = None
        if not own.inline:
            digest = (own.heads or self._heads(own))[1] + _META_PREFIXES[DIGEST_SIZE]
        if self.empty_metacopy_shared:
            meta = self._empty_meta_layout(xattrs)
            none = None if meta.inline else meta.redirect_head or self._redirect_head(meta)
        else:
            none = None if own.inline else (own.heads or self._heads(own))[1] + _META_EMPTY_ENTRY
        return none, digest

    def size(self, node: Inode, external: bool) -> int:
        """Bytes of the inode's xattr body (0: none), `external` as `is_external(node)`."""
        if not external:
            xattrs = node.xattrs
            if not xattrs:
                return 0
            hit = self.layouts.get(id(xattrs))
            return (hit[1] if hit is not None else self.layout(xattrs)).size
        return self.external_size(node)

    def _ids_bytes(self, layout: _Layout) -> bytes:
        if layout.ids and not layout.ids_bytes:
            base = self.base
            layout.ids_bytes = _U32S[len(layout.ids)].pack(*[base + r for r in layout.ids])
        return layout.ids_bytes

    def body(self, node: Inode, external: bool) -> bytes:
        """The inode's xattr body (b"" if none); call after `base` is set."""
        if external:
            return self.external_body(node)
        xattrs = node.xattrs
        if not xattrs:
            return b""
        hit = self.layouts.get(id(xattrs))
        return self._whole_body(hit[1] if hit is not None else self.layout(xattrs))

    def _whole_body(self, layout: _Layout) -> bytes:
        """The body of a layout with nothing spliced in (cached on it)."""
        body = layout.body
        if body is None:
            body = layout.body = b"".join((_pack_ibody(~layout.bits & 0xFFFFFFFF, len(layout.ids)),
                                           self._ids_bytes(layout), *layout.inline))
        return body

    def _generic_body(self, node: Inode) -> bytes:
        """The reference: the body of `image_xattrs(node)`, laid out afresh (not cached: the
        merged tuple is the file's own)."""
        layout = self._layout(image_xattrs(node))
        return b"".join((_pack_ibody(~layout.bits & 0xFFFFFFFF, len(layout.ids)),
                         self._ids_bytes(layout), *layout.inline))

    def _redirect_spliced(self, node: Inode, layout: _Layout) -> bytes:
        """The body of `layout` (which holds the metacopy) with the file's redirect spliced in."""
        payload = node.payload
        if not payload:
            return self._whole_body(layout)
        head = layout.redirect_head or self._redirect_head(layout)
        inline = layout.inline
        if not inline:
            prefix, pad = redirect_around(len(payload))
            return b"".join((head, prefix, payload, pad))
        r = layout.redirect_at
        return b"".join((head, *inline[:r], _redirect_entry(payload), *inline[r:]))

    def shared_area(self, shared: list[tuple[bytes, bytes]]) -> bytes:
        out = []
        for key, value in shared:
            index, name, _bit = self.key(key)
            out.append(entry(index, name, value))
        return b"".join(out)
