"""Image references in containers/image's transport syntax → what to open.

    oci:DIR[:TAG | @sha256:HEX]                 an OCI image layout directory
    oci-archive:FILE[:TAG]                      the same, in a tar
    docker-archive:FILE[:NAME:TAG | :@N]        `docker save` / `podman save` output
    containers-storage:[DRIVER@ROOT+RUNROOT]IMAGE   an image in local containers storage
                                                (IMAGE: NAME[:TAG], NAME@sha256:HEX or an ID)

containers/image splits `oci:` and `oci-archive:` references at the first `:` after the
transport; a path with a `:` in it then cannot be named.  Here the split that names an
existing path wins (the whole text first, then each `:` from the right), which agrees with
containers/image on every reference it accepts.  `docker-archive:FILE:NAME:TAG` is split the
same way.  `@N` picks the N-th image (from 0) of a docker archive's `manifest.json`.
"""

from __future__ import annotations

import os
import re

from cfsc.base.errors import UsageError

TRANSPORTS = ("oci:", "oci-archive:", "docker-archive:", "containers-storage:")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_STORE_SPEC = re.compile(r"\[(?:([A-Za-z0-9_]+)@)?([^+\]]*)(?:\+([^\]]*))?\]")


class Reference:
    """A parsed reference: `transport` (without the colon), `path` (a directory, an archive, or
    the storage root), and what to pick there: `tag`, `digest`, `index` (docker archives) or
    `image` (containers-storage: a name or an id)."""

    __slots__ = ("digest", "image", "index", "path", "tag", "text", "transport")

    def __init__(self, text: str, transport: str, path: str, tag: str | None = None, digest: str | None = None,
                 index: int | None = None, image: str | None = None) -> None:
        self.text = text
        self.transport = transport
        self.path = path
        self.tag = tag
        self.digest = digest
        self.index = index
        self.image = image

    def __str__(self) -> str:
        return self.text


def is_reference(source) -> bool:
    return isinstance(source, str) and source.startswith(TRANSPORTS)


def parse(text: str, storage_root: str | None = None) -> Reference:
    transport, _, rest = text.partition(":")
    if not rest:
        raise UsageError(f"expected {transport}:PATH (nothing after the transport)", text)
    if transport == "oci":
        return _oci(text, rest)
    if transport == "oci-archive":
        path, tag = _split_existing(rest)
        return Reference(text, transport, path, tag=tag or None)
    if transport == "docker-archive":
        return _docker_archive(text, rest)
    if transport == "containers-storage":
        return _storage(text, rest, storage_root)
    raise UsageError(f"unknown transport {transport!r}: expected one of {', '.join(TRANSPORTS)}", text)


def _split_existing(rest: str, parts: int = 1) -> tuple[str, str]:
    """PATH and what follows it: the whole text if it exists (or has no `:`), else the longest
    prefix before a `:` that exists, else the split at the first `:` (what containers/image does)."""
    if os.path.lexists(rest) or ":" not in rest:
        return rest, ""
    at = len(rest)
    while True:
        at = rest.rfind(":", 0, at)
        if at < 0:
            break
        if os.path.lexists(rest[:at]):
            return rest[:at], rest[at + 1:]
    head, _, tail = rest.partition(":")
    return head, tail


def _oci(text: str, rest: str) -> Reference:
    # `DIR@sha256:HEX` names a manifest by digest (containers/image: the image's digest).
    at = rest.rfind("@")
    if at > 0 and _DIGEST.fullmatch(rest[at + 1:]) and not os.path.lexists(rest):
        return Reference(text, "oci", rest[:at], digest=rest[at + 1:])
    path, tag = _split_existing(rest)
    if tag.startswith("@"):
        if not _DIGEST.fullmatch(tag[1:]):
            raise UsageError(f"expected @sha256: and 64 lowercase hex digits, got {tag!r}", text)
        return Reference(text, "oci", path, digest=tag[1:])
    return Reference(text, "oci", path, tag=tag or None)


def _docker_archive(text: str, rest: str) -> Reference:
    path, ref = _split_existing(rest)
    if not ref:
        return Reference(text, "docker-archive", path)
    if ref.startswith("@"):
        if not ref[1:].isdigit():
            raise UsageError(f"expected @N (the image's position in manifest.json, from 0), got {ref!r}", text)
        return Reference(text, "docker-archive", path, index=int(ref[1:]))
    return Reference(text, "docker-archive", path, tag=ref)


def _storage(text: str, rest: str, storage_root: str | None) -> Reference:
    root = storage_root or "/var/lib/containers/storage"
    m = _STORE_SPEC.match(rest)
    if m is not None:
        driver, spec_root, _runroot = m.groups()
        if driver not in (None, "", "overlay"):
            raise UsageError(f"storage driver {driver!r}: only the overlay driver is read", text)
        if spec_root:
            root = spec_root
        rest = rest[m.end():]
    if not rest:
        raise UsageError("expected an image name or id after containers-storage:", text)
    return Reference(text, "containers-storage", root, image=rest)
