"""OCI image layouts and docker archives → the image's config and its layers, bottom first.

OCI layout (image-spec `image-layout.md`; a directory, or the same in a tar for
`oci-archive:`): `index.json` lists descriptors; a TAG picks those whose
`org.opencontainers.image.ref.name` is TAG, `@sha256:…` the one with that digest (looked for
in nested indexes too), nothing picks every one.  One candidate is followed; several are a
choice by platform if every one says its platform, else the reference is ambiguous.  An image
index (nested at any depth) is a choice by platform: the host's, or `--platform
os/arch[/variant]`; no match is an error listing the platforms there are.  Docker's schema 2
manifest and manifest list are read as their OCI twins.

Docker archive (`docker save`, `podman save`): `manifest.json` lists images as `Config`,
`RepoTags` and `Layers` (archive paths, often `ID/layer.tar`, symlinks to other layers' files
in legacy archives); a layer file may be compressed (detected from its first bytes) and its
digest is known only through the config's `diff_ids`.

Everything found is checked before a layer is read: JSON that does not parse or has the wrong
shape is an error naming the file and the JSON path; a blob that is missing, a symlink leading
outside the layout, or whose size differs from its descriptor's is an error naming the digest.
"""

from __future__ import annotations

import os
import platform as _platform
import re
import tarfile

import orjson
from cfsc.base.errors import InputError, UsageError

from .blobs import LAYER_TYPES, Blob
from .reference import Reference

JSON_MAX = 64 << 20
REF_NAME = "org.opencontainers.image.ref.name"
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_MACHINES = {"x86_64": ("amd64", ""), "amd64": ("amd64", ""), "aarch64": ("arm64", ""), "arm64": ("arm64", ""),
             "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "i686": ("386", ""), "i386": ("386", ""),
             "ppc64le": ("ppc64le", ""), "s390x": ("s390x", ""), "riscv64": ("riscv64", "")}


class Layer:
    """One layer: its blob, compression, and the digests to check it against."""

    __slots__ = ("annotations", "blob", "diff_id", "digest", "kind", "media_type")

    def __init__(self, blob: Blob, kind: str | None, media_type: str, digest: str | None, diff_id: str | None,
                 annotations: dict) -> None:
        self.blob = blob
        self.kind = kind
        self.media_type = media_type
        self.digest = digest
        self.diff_id = diff_id
        self.annotations = annotations


class Image:
    __slots__ = ("config", "layers", "name")

    def __init__(self, name: str, config: dict, layers: list[Layer]) -> None:
        self.name = name
        self.config = config
        self.layers = layers


# -- platforms ------------------------------------------------------------------------------

def host_platform() -> tuple[str, str, str]:
    arch, variant = _MACHINES.get(_platform.machine(), (_platform.machine(), ""))
    return "linux", arch, variant


def parse_platform(text: str | None) -> tuple[str, str, str]:
    if text is None:
        return host_platform()
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UsageError(f"expected os/arch or os/arch/variant, got {text!r}", "--platform")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else ""


def _shown(p: dict) -> str:
    text = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
    return text + (f"/{p['variant']}" if p.get("variant") else "")


def _matches(p: dict, want: tuple[str, str, str], host: bool) -> bool:
    os_, arch, variant = want
    if p.get("os") != os_ or p.get("architecture") != arch:
        return False
    have = p.get("variant") or ""
    if variant == have:
        return True
    # arm64's only variant is v8: an unspecified one means it (containerd's normalisation);
    # for the host, whose variant is not known, any variant of its architecture will do.
    return (arch == "arm64" and {variant, have} <= {"", "v8"}) or (host and not variant)


# -- files: a directory, or the members of an (uncompressed) tar ----------------------------

class Files:
    """The files of a layout directory or of an archive, by relative path, as `Blob`s."""

    def __init__(self, path: str, archive: bool) -> None:
        self.path = path
        self.archive = archive
        self.members: dict[str, tarfile.TarInfo] = {}
        if archive:
            self._index()
        else:
            if not os.path.isdir(path):
                raise InputError("no such directory (an OCI image layout is a directory with index.json)"
                                 if not os.path.lexists(path) else "not a directory: expected an OCI image layout",
                                 path)
            self.real = os.path.realpath(path)

    def _index(self) -> None:
        try:
            with tarfile.open(self.path, "r:") as tf:
                for info in tf:
                    self.members[os.path.normpath(info.name).lstrip("/")] = info
        except FileNotFoundError:
            raise InputError("no such file", self.path) from None
        except (OSError, tarfile.TarError) as e:
            raise InputError(f"cannot read the archive (expected an uncompressed tar): {e}", self.path) from None

    def get(self, rel: str, what: str) -> Blob | None:
        """The file at `rel`, or None if there is none.  `what` names it in messages."""
        name = f"{self.path}: {what}"
        if self.archive:
            rel = os.path.normpath(rel).lstrip("/")
            for _ in range(16):
                info = self.members.get(rel)
                if info is None:
                    return None
                if info.issym() or info.islnk():
                    target = info.linkname if info.islnk() else os.path.join(os.path.dirname(rel), info.linkname)
                    target = os.path.normpath(target)
                    if target.startswith("../") or target == ".." or target.startswith("/"):
                        raise InputError(f"is a link to {info.linkname!r}, which leads outside the archive", name)
                    rel = target
                    continue
                if not info.isfile():
                    raise InputError("is not a regular file in the archive", name)
                return Blob(self.path, info.offset_data, info.size, name)
            raise InputError("too many levels of links in the archive", name)
        full = os.path.join(self.path, rel)
        if not os.path.lexists(full):
            return None
        real = os.path.realpath(full)
        if not real.startswith(self.real + os.sep):
            raise InputError(f"leads outside the layout (to {real}): refused", name)
        try:
            st = os.stat(real)
        except OSError as e:
            raise InputError(f"cannot open: {e.strerror}", name) from None
        if not os.path.isfile(real):
            raise InputError("is not a regular file", name)
        return Blob(real, 0, st.st_size, name)


def _json(blob: Blob, shape=dict):
    try:
        doc = orjson.loads(blob.read_all(JSON_MAX))
    except orjson.JSONDecodeError as e:
        raise InputError(f"not valid JSON: {e}", blob.name) from None
    if not isinstance(doc, shape):
        raise InputError(f"expected a JSON {'object' if shape is dict else 'array'} at the top", blob.name)
    return doc


def _field(doc: dict, key: str, kind, where: str, path: str, required: bool = True):
    value = doc.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        expected = {str: "a string", int: "an integer", list: "an array", dict: "an object"}[kind]
        raise InputError(f"{path}{key}: expected {expected}" + (" (missing)" if value is None else ""), where)
    return value


# -- OCI layouts ----------------------------------------------------------------------------

class _Descriptor:
    __slots__ = ("annotations", "digest", "media_type", "path", "platform", "size", "where")

    def __init__(self, d, where: str, path: str) -> None:
        if not isinstance(d, dict):
            raise InputError(f"{path}: expected a descriptor object", where)
        self.where = where
        self.path = path
        self.media_type = _field(d, "mediaType", str, where, path + ".")
        self.digest = _field(d, "digest", str, where, path + ".")
        if not _DIGEST.fullmatch(self.digest):
            raise InputError(f"{path}.digest: expected sha256: and 64 lowercase hex digits, got {self.digest!r}",
                             where)
        self.size = _field(d, "size", int, where, path + ".")
        if self.size < 0:
            raise InputError(f"{path}.size: expected a size, got {self.size}", where)
        self.annotations = _field(d, "annotations", dict, where, path + ".", required=False) or {}
        self.platform = _field(d, "platform", dict, where, path + ".", required=False)


class OciLayout:
    def __init__(self, ref: Reference, platform: str | None) -> None:
        self.ref = ref
        self.files = Files(ref.path, archive=ref.transport == "oci-archive")
        self.want = parse_platform(platform)
        self.host = platform is None

    def blob(self, d: _Descriptor) -> Blob:
        blob = self.files.get("blobs/sha256/" + d.digest[7:], f"blob {d.digest}")
        if blob is None:
            raise InputError(f"blob {d.digest} is missing (expected blobs/sha256/{d.digest[7:]}; named by "
                             f"{d.path})", f"{self.ref.path}")
        if blob.size != d.size:
            raise InputError(f"is {blob.size} bytes, {d.path}.size says {d.size}"
                             + (" (truncated)" if blob.size < d.size else ""), blob.name)
        return blob

    def document(self, d: _Descriptor) -> dict:
        blob = self.blob(d)
        data = blob.read_all(JSON_MAX)
        import hashlib

        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got != d.digest:
            raise InputError(f"digest mismatch: its bytes hash to {got}", blob.name)
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise InputError(f"not valid JSON: {e}", blob.name) from None
        if not isinstance(doc, dict):
            raise InputError("expected a JSON object at the top", blob.name)
        return doc

    def descriptors(self, doc: dict, where: str, key: str = "manifests") -> list[_Descriptor]:
        items = _field(doc, key, list, where, "")
        return [_Descriptor(d, where, f"{key}[{i}]") for i, d in enumerate(items)]

    def open(self) -> Image:
        index_blob = self.files.get("index.json", "index.json")
        if index_blob is None:
            raise InputError("no index.json: not an OCI image layout (expected index.json at its top)", self.ref.path)
        where = index_blob.name
        manifests = self.descriptors(_json(index_blob), where)
        ref = self.ref
        if ref.digest is not None:
            chosen = self.find_digest(manifests, ref.digest)
            if chosen is None:
                raise InputError(f"no manifest {ref.digest} in index.json (nor in the indexes it lists)", where)
            candidates = [chosen]
        elif ref.tag is not None:
            candidates = [d for d in manifests if d.annotations.get(REF_NAME) == ref.tag]
            if not candidates:
                tags = sorted({d.annotations[REF_NAME] for d in manifests if isinstance(d.annotations.get(REF_NAME), str)})
                raise InputError(f"tag {ref.tag!r} not found: index.json has "
                                 + (", ".join(repr(t) for t in tags) if tags else "no tags"), where)
        else:
            candidates = manifests
            if not candidates:
                raise InputError("manifests: expected at least one image, the layout has none", where)
        if len(candidates) > 1:
            if not all(d.platform for d in candidates):
                names = sorted({str(d.annotations.get(REF_NAME, d.digest)) for d in candidates})
                raise InputError(f"ambiguous: {len(candidates)} manifests match"
                                 + (f" tag {ref.tag!r}" if ref.tag else "")
                                 + f" ({', '.join(names)}): name one with :TAG or @sha256:…", where)
            d = self.pick_platform(candidates, where)
        else:
            d = candidates[0]
        return self.image(d)

    def find_digest(self, manifests: list[_Descriptor], digest: str) -> _Descriptor | None:
        stack = list(manifests)
        seen = 0
        while stack and seen < 1000:
            seen += 1
            d = stack.pop(0)
            if d.digest == digest:
                return d
            if d.media_type in INDEX_TYPES:
                stack.extend(self.descriptors(self.document(d), self.blob(d).name))
        return None

    def pick_platform(self, candidates: list[_Descriptor], where: str) -> _Descriptor:
        # An exact match first (amd64 over amd64/v3 for an amd64 host), then a looser one.
        for loose in (False, True):
            for d in candidates:
                if d.platform is not None and _matches(d.platform, self.want, self.host and loose):
                    return d
        os_, arch, variant = self.want
        have = ", ".join(sorted({_shown(d.platform) for d in candidates if d.platform})) or "none"
        raise InputError(f"no manifest for platform {os_}/{arch}{'/' + variant if variant else ''}"
                         f" (give --platform): the index has {have}", where)

    def image(self, d: _Descriptor) -> Image:
        for _depth in range(16):
            if d.media_type in INDEX_TYPES:
                where = self.blob(d).name
                manifests = self.descriptors(self.document(d), where)
                if not manifests:
                    raise InputError("manifests: expected at least one manifest, the index has none", where)
                d = manifests[0] if len(manifests) == 1 and not manifests[0].platform else \
                    self.pick_platform(manifests, where)
                continue
            if d.media_type not in MANIFEST_TYPES:
                raise InputError(f"{d.path}.mediaType: {d.media_type!r} is not an image manifest or index"
                                 f" (expected one of {', '.join(MANIFEST_TYPES + INDEX_TYPES)})", d.where)
            return self.manifest(d)
        raise InputError("image indexes nested more than 16 deep", d.where)

    def manifest(self, d: _Descriptor) -> Image:
        doc = self.document(d)
        where = self.blob(d).name
        config_d = _Descriptor(_field(doc, "config", dict, where, ""), where, "config")
        config = self.document(config_d)
        config_where = self.blob(config_d).name
        layers_d = self.descriptors(doc, where, "layers")
        diff_ids = _diff_ids(config, config_where, len(layers_d))
        layers = []
        for i, ld in enumerate(layers_d):
            if ld.media_type not in LAYER_TYPES:
                raise InputError(f"layers[{i}].mediaType: unknown layer media type {ld.media_type!r} (expected"
                                 f" one of {', '.join(sorted(LAYER_TYPES))})", where)
            blob = self.blob(ld)
            layers.append(Layer(blob, LAYER_TYPES[ld.media_type], ld.media_type, ld.digest, diff_ids[i],
                                ld.annotations))
        return Image(self.ref.text, config, layers)


def _diff_ids(config: dict, where: str, count: int) -> list[str]:
    rootfs = _field(config, "rootfs", dict, where, "")
    ids = _field(rootfs, "diff_ids", list, where, "rootfs.")
    for i, v in enumerate(ids):
        if not isinstance(v, str) or not _DIGEST.fullmatch(v):
            raise InputError(f"rootfs.diff_ids[{i}]: expected sha256: and 64 lowercase hex digits", where)
    if len(ids) != count:
        raise InputError(f"rootfs.diff_ids: {len(ids)} entries, the manifest has {count} layers", where)
    return ids


# -- docker archives ------------------------------------------------------------------------

def docker_archive(ref: Reference) -> Image:
    from .blobs import sniff_compression

    files = Files(ref.path, archive=True)
    mblob = files.get("manifest.json", "manifest.json")
    if mblob is None:
        raise InputError("no manifest.json: not a docker archive (`docker save` / `podman save` output)", ref.path)
    where = mblob.name
    entries = _json(mblob, list)
    if not entries:
        raise InputError("expected at least one image, the array is empty", where)
    if ref.index is not None:
        if ref.index >= len(entries):
            raise InputError(f"@{ref.index}: the archive has {len(entries)} image(s), @0..@{len(entries) - 1}", where)
        at = ref.index
    elif ref.tag is not None:
        hits = [i for i, e in enumerate(entries) if isinstance(e, dict) and ref.tag in (e.get("RepoTags") or ())]
        if not hits:
            tags = sorted(t for e in entries if isinstance(e, dict) for t in (e.get("RepoTags") or ()) if isinstance(t, str))
            raise InputError(f"tag {ref.tag!r} not found: the archive has "
                             + (", ".join(repr(t) for t in tags) if tags else "no tags"), where)
        if len(hits) > 1:
            raise InputError(f"ambiguous: images {', '.join(f'@{i}' for i in hits)} have tag {ref.tag!r}:"
                             " pick one with :@N", where)
        at = hits[0]
    else:
        if len(entries) > 1:
            raise InputError(f"ambiguous: the archive has {len(entries)} images: name one with :NAME:TAG or :@N",
                             where)
        at = 0
    entry = entries[at]
    path = f"[{at}]."
    if not isinstance(entry, dict):
        raise InputError(f"[{at}]: expected an object", where)
    config_path = _field(entry, "Config", str, where, path)
    cblob = files.get(config_path, config_path)
    if cblob is None:
        raise InputError(f"{path}Config: {config_path!r} is not in the archive", where)
    config = _json(cblob)
    names = _field(entry, "Layers", list, where, path)
    diff_ids = _diff_ids(config, cblob.name, len(names))
    layers = []
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise InputError(f"{path}Layers[{i}]: expected a string", where)
        blob = files.get(name, f"layer {name}")
        if blob is None:
            raise InputError(f"{path}Layers[{i}]: {name!r} is not in the archive", where)
        kind = sniff_compression(blob.pread(0, min(6, blob.size)))
        media = {None: "application/vnd.docker.image.rootfs.diff.tar", "gzip": "application/vnd.docker.image"
                 ".rootfs.diff.tar.gzip", "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}[kind]
        layers.append(Layer(blob, kind, media, None, diff_ids[i], {}))
    return Image(ref.text, config, layers)
