"""Container images → tree: `oci:`, `oci-archive:`, `docker-archive:`, `containers-storage:`.

`cfsc compile oci:DIR:TAG -o IMAGE` (and every verb that takes a source) finds the image's
layers (`reference`, `layout`, `storage`) and merges them exactly as `cfsc compile l1.tar
l2.tar …` does (`cfsc.frontends.tar.layers`: whiteouts, opaque directories, type changes, hard
links), each layer read in one streaming pass:

* OCI layouts and archives: the layer blob is decompressed by its media type (tar, tar+gzip,
  tar+zstd — multi-member gzip and multi-frame zstd with skippable frames, so eStargz and
  zstd:chunked too); the blob's digest and the config's `diff_id` are checked when it was read
  to its end (`blobs.LayerStream`), before anything is written;
* containers-storage: the layers' overlay `diff` directories are read in place (`storage`);
* `--toc-only`: zstd:chunked and eStargz layers are built from their TOC (`chunked`).

Directories that no layer lists — the root included (buildah's layers have no `./` entry) —
are the tar frontend's implied directories: mode 040755, owner 0:0, mtime 0, no xattrs, on
every machine at any time.  A directory any layer lists gets that entry's metadata (the
topmost listing wins).
"""

from __future__ import annotations

from cfsc.base.errors import UsageError
from cfsc.base.options import Options
from cfsc.base.tree import Tree
from cfsc.frontends.tar.stream import TarReader

from . import chunked
from .blobs import LayerStream
from .reference import TRANSPORTS, Reference, is_reference, parse

__all__ = ["TRANSPORTS", "is_reference", "load", "open_layers"]


class _FullReader:
    """A layer's tar stream with its digests checked at the end and eStargz metadata dropped."""

    def __init__(self, stream: LayerStream, drop_metadata: bool) -> None:
        self.stream = stream
        self.tar = TarReader(stream)
        self.drop = drop_metadata

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stream.close()

    @property
    def offset(self) -> int:
        return self.tar.offset

    def error(self, what, member=None, offset=None):
        return self.tar.error(what, member, offset)

    def read(self, n: int) -> bytes:
        return self.tar.read(n)

    def extents(self, n: int):
        return self.tar.extents(n)

    @property
    def has_holes(self) -> bool:
        return self.tar.has_holes

    def members(self):
        drop = self.drop
        for m in self.tar.members():
            if drop and m.path.strip(b"/").removeprefix(b"./") in chunked.METADATA_NAMES:
                continue
            yield m
        self.stream.check()


class LayerSource:
    """One layer as the layer merge takes it: `open_reader()` gives its members."""

    __slots__ = ("layer", "toc_only", "where")

    def __init__(self, layer, where: str, toc_only: bool) -> None:
        self.layer = layer
        self.where = where
        self.toc_only = toc_only

    def __str__(self) -> str:
        return self.where

    def open_reader(self):
        layer = self.layer
        kind = chunked.kind_of(layer.blob, layer.kind, layer.annotations)
        if self.toc_only:
            if kind is None:
                raise UsageError(f"--toc-only: the layer ({layer.media_type}) has no TOC: only zstd:chunked and"
                                 " eStargz layers have one", layer.blob.name)
            return chunked.TocReader(layer.blob, kind, layer.annotations)
        return _FullReader(LayerStream(layer.blob, layer.kind, layer.digest, layer.diff_id), kind == "estargz")


def open_layers(source: str, options: Options) -> tuple[Reference, list]:
    """The reference and the layer sources of an image, bottom first."""
    ref = parse(source, options.storage_root)
    if ref.transport == "containers-storage":
        from . import storage

        if options.toc_only:
            raise UsageError("--toc-only reads layer blobs: containers-storage keeps unpacked layers", source)
        return ref, storage.layers(ref)
    from . import layout

    if ref.transport == "docker-archive":
        image = layout.docker_archive(ref)
    else:
        image = layout.OciLayout(ref, options.platform).open()
    return ref, [LayerSource(layer, layer.blob.name, options.toc_only) for layer in image.layers]


def load(source, options: Options | None = None) -> Tree:
    # start-up: the layer merger ~5+ ms; parsing a reference or listing transports needs it not
    from cfsc.frontends.tar import layers as tar

    options = options or Options()
    if options.toc_only and options.digest_store:
        raise UsageError("--toc-only reads no file data, so there is nothing to import: drop --digest-store",
                         "--toc-only")
    ref, layers = open_layers(str(source), options)
    tree = tar.merge_layers(layers, options, ref.text)
    return tree
