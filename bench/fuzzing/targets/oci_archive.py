"""Fuzz target: container images (`frontends.oci`) read from an oci-archive, fully and TOC-only.

Seeds are built here: a gzip layer; a zstd:chunked layer (TOC in a skippable frame, footer)
over an uncompressed one; the zstd:chunked layer alone (so TOC-only reads get past layer 1).  Mutations are format-aware: one file of the archive is changed
(bytes, or a JSON value), and then usually every digest and size that names a changed blob is
fixed up, bottom to top, so the mutation reaches the parsers behind the digest checks instead of
always stopping at the first mismatch.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import struct
import tarfile

NAME = "oci_archive"
TAG = "t"


def _tar(files: list[tuple[str, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tf.addfile(info)
            else:
                info.size = len(data)
                info.mode = 0o644
                tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _zstd_chunked(layer_tar: bytes, entries: list[dict] | None) -> tuple[bytes, dict]:
    import zstandard

    body = zstandard.ZstdCompressor().compress(layer_tar)
    toc = json.dumps({"version": 1, "entries": entries}).encode()
    ctoc = zstandard.ZstdCompressor().compress(toc)
    offset = len(body) + 8
    frame = struct.pack("<II", 0x184D2A50, len(ctoc)) + ctoc
    footer_data = struct.pack("<QQQQ", offset, len(ctoc), len(toc), 1) + b"GnUlInUx"
    footer = struct.pack("<II", 0x184D2A50, len(footer_data)) + footer_data
    annotations = {"io.github.containers.zstd-chunked.manifest-position": f"{offset}:{len(ctoc)}:{len(toc)}:1",
                   "io.github.containers.zstd-chunked.manifest-checksum": _sha(ctoc)}
    return body + frame + footer, annotations


def _image(layers: list[tuple[bytes, bytes, str, dict]]) -> bytes:
    """An oci-archive: layers as (blob, uncompressed tar, media type, annotations)."""
    blobs: dict[str, bytes] = {}
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [_sha(t) for _b, t, _m, _a in layers]}}).encode()
    blobs[_sha(config)] = config
    descriptors = []
    for blob, _tar_bytes, media, notes in layers:
        blobs[_sha(blob)] = blob
        d = {"mediaType": media, "digest": _sha(blob), "size": len(blob)}
        if notes:
            d["annotations"] = notes
        descriptors.append(d)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": _sha(config), "size": len(config)},
                           "layers": descriptors}).encode()
    blobs[_sha(manifest)] = manifest
    index = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _sha(manifest), "size": len(manifest),
         "annotations": {"org.opencontainers.image.ref.name": TAG}}]}).encode()
    files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index}
    files.update({f"blobs/sha256/{d[7:]}": b for d, b in blobs.items()})
    return _pack(files)


def _pack(files: dict[str, bytes]) -> bytes:
    return _tar(sorted(files.items()))


def _unpack(data: bytes) -> dict[str, bytes] | None:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError):
        return None


def seeds() -> list[bytes]:
    base = _tar([("etc", None), ("etc/hostname", b"fuzz\n"), ("usr", None), ("usr/big", bytes(range(256)) * 8)])
    top_files = [("etc", None), ("etc/.wh.hostname", b""), ("opt", None), ("opt/data", b"x" * 300)]
    top = _tar(top_files)
    entries = [{"type": "dir", "name": "etc/", "mode": 0o40755}, {"type": "reg", "name": "etc/.wh.hostname"},
               {"type": "dir", "name": "opt/", "mode": 0o40755},
               {"type": "reg", "name": "opt/data", "size": 300, "digest": _sha(b"x" * 300), "offset": 0,
                "endOffset": 10, "mode": 0o100644, "modtime": "2023-11-14T22:13:20Z"}]
    chunked, annotations = _zstd_chunked(top, entries)
    empty, empty_notes = _zstd_chunked(bytes(1024), None)
    gz = gzip.compress(base, mtime=0)
    return [
        _image([(gz, base, "application/vnd.oci.image.layer.v1.tar+gzip", {})]),
        _image([(base, base, "application/vnd.oci.image.layer.v1.tar", {}),
                (chunked, top, "application/vnd.oci.image.layer.v1.tar+zstd", annotations)]),
        _image([(chunked, top, "application/vnd.oci.image.layer.v1.tar+zstd", annotations)]),  # all TOC-only
        # an empty zstd:chunked layer: containers/storage writes its TOC as `"entries":null`
        _image([(chunked, top, "application/vnd.oci.image.layer.v1.tar+zstd", annotations),
                (empty, bytes(1024), "application/vnd.oci.image.layer.v1.tar+zstd", empty_notes)]),
    ]


def _mutate_json(data: bytes, rng: random.Random) -> bytes:
    try:
        doc = json.loads(data)
    except ValueError:
        return data
    paths = []
    stack = [((), doc)]
    while stack:
        path, node = stack.pop()
        paths.append(path)
        if isinstance(node, dict):
            stack.extend((path + (k,), v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((path + (i,), v) for i, v in enumerate(node))
    path = rng.choice(paths)
    if not path:
        return data
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    choice = rng.randrange(4)
    if choice == 0:
        del parent[path[-1]]
    else:
        parent[path[-1]] = rng.choice([None, -1, 0, 2 ** 64, "", "x", [], {}, True, "sha256:" + "0" * 64])
    return json.dumps(doc).encode()


def _fix_digests(files: dict[str, bytes]) -> dict[str, bytes]:
    """Rename blobs whose name no longer is their digest, and update every descriptor naming
    them (digest and size), until nothing changes (leaves first, index.json last)."""
    for _ in range(4):
        renamed = {}
        for name, data in list(files.items()):
            if name.startswith("blobs/sha256/") and name[13:] != hashlib.sha256(data).hexdigest():
                new = hashlib.sha256(data).hexdigest()
                renamed["sha256:" + name[13:]] = ("sha256:" + new, len(data))
                del files[name]
                files["blobs/sha256/" + new] = data
        if not renamed:
            break
        for name, data in list(files.items()):
            if b'"digest"' not in data:
                continue
            try:
                doc = json.loads(data)
            except ValueError:
                continue
            stack = [doc]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    digest = node.get("digest")
                    hit = renamed.get(digest) if isinstance(digest, str) else None
                    if hit is not None:
                        node["digest"], node["size"] = hit
                    stack.extend(node.values())
                elif isinstance(node, list):
                    stack.extend(node)
            files[name] = json.dumps(doc).encode()
    return files


def mutate(data: bytes, rng: random.Random) -> bytes:
    from bench.fuzzing.mutators import generic

    files = _unpack(data)
    if not files or rng.random() < 0.1:
        return generic(data, rng)
    name = rng.choice(sorted(files))
    if files[name][:1] == b"{" and rng.random() < 0.6:
        files[name] = _mutate_json(files[name], rng)
    else:
        files[name] = generic(files[name], rng)
    if rng.random() < 0.8:
        files = _fix_digests(files)
    return _pack(files)


def run(data: bytes, workdir: str) -> None:
    from cfsc import frontends
    from cfsc.base.errors import CfscError
    from cfsc.base.options import Options

    path = os.path.join(workdir, "image.tar")
    with open(path, "wb") as f:
        f.write(data)
    for toc_only in (False, True):
        try:
            frontends.load([f"oci-archive:{path}:{TAG}"], Options(toc_only=toc_only, threads=1))
        except CfscError:
            pass
