"""Container image references and layouts built in code (no container tools needed):
reference syntax, platform choice in nested indexes, digests, docker archives with legacy
layer symlinks, and the unlisted-directory rule.  tests/test_oci.py checks real tools' images.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from cfsc import frontends
from cfsc.base.errors import InputError, UsageError
from cfsc.base.options import Options
from cfsc.frontends.oci import reference

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def layer(files: dict[str, bytes | None]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o700
                tf.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Layout:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs/sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def blob(self, data: bytes) -> dict:
        (self.root / "blobs/sha256" / sha(data)[7:]).write_bytes(data)
        return {"digest": sha(data), "size": len(data)}

    def image(self, layers: list[bytes], gz: bool = True) -> dict:
        config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layers]}}).encode()
        descs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gz else ""),
                  **self.blob(gzip.compress(t, mtime=0) if gz else t)} for t in layers]
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST,
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **self.blob(config)},
                    "layers": descs}
        return {"mediaType": MANIFEST, **self.blob(json.dumps(manifest).encode())}

    def index(self, manifests: list[dict]) -> dict:
        doc = {"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests}
        return {"mediaType": INDEX, **self.blob(json.dumps(doc).encode())}

    def top(self, manifests: list[dict]) -> None:
        (self.root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))


def tag(d: dict, name: str) -> dict:
    return {**d, "annotations": {"org.opencontainers.image.ref.name": name}}


def plat(d: dict, os_: str, arch: str, variant: str = "") -> dict:
    p = {"os": os_, "architecture": arch}
    if variant:
        p["variant"] = variant
    return {**d, "platform": p}


def names(source: str, **options) -> list[bytes]:
    tree = frontends.load([source], Options(**options))
    return [p for p, *_ in tree.walk()]


@pytest.fixture
def multi(tmp_path):
    lay = Layout(tmp_path / "lay:out")  # a `:` in the path: the split that names a directory wins
    amd = lay.image([layer({"amd": b"1"})])
    arm = lay.image([layer({"arm": b"1"})])
    armv7 = lay.image([layer({"armv7": b"1"})])
    nested = lay.index([plat(amd, "linux", "amd64"), plat(arm, "linux", "arm64", "v8"),
                        plat(armv7, "linux", "arm", "v7")])
    lay.top([tag(nested, "multi"), tag(amd, "one"), tag(arm, "dup"), tag(armv7, "dup")])
    return lay, {"amd": amd, "arm": arm, "armv7": armv7}


def test_platforms_in_a_nested_index(multi):
    lay, _ = multi
    ref = f"oci:{lay.root}:multi"
    assert b"/arm" in names(ref, platform="linux/arm64")  # v8 is arm64's only variant
    assert b"/armv7" in names(ref, platform="linux/arm/v7")
    assert b"/amd" in names(ref, platform="linux/amd64")
    with pytest.raises(InputError, match=r"no manifest for platform linux/riscv64 .*linux/amd64, linux/arm/v7,"
                                         r" linux/arm64/v8"):
        names(ref, platform="linux/riscv64")
    with pytest.raises(UsageError, match="os/arch"):
        frontends.load([ref], Options(platform="linux"))


def test_tags_digests_and_ambiguity(multi):
    lay, images = multi
    assert b"/amd" in names(f"oci:{lay.root}:one")
    assert b"/arm" in names(f"oci:{lay.root}@{images['arm']['digest']}")  # found inside the nested index
    with pytest.raises(InputError, match="ambiguous: 2 manifests match tag 'dup'"):
        names(f"oci:{lay.root}:dup")
    with pytest.raises(InputError, match="ambiguous: 4 manifests"):
        names(f"oci:{lay.root}")
    with pytest.raises(InputError, match=r"tag 'nope' not found: index.json has 'dup', 'multi', 'one'"):
        names(f"oci:{lay.root}:nope")


def test_unlisted_directories_are_fixed(tmp_path):
    """No `./`, no `a/` or `a/b/`: 040755 0:0 mtime 0 wherever and whenever compiled; a
    directory a layer lists keeps its metadata, and the topmost listing wins."""
    lay = Layout(tmp_path / "l")
    img = lay.image([layer({"a/b/f": b"x", "c": None}), layer({"c": None, "c/g": b"y"})], gz=False)
    lay.top([img])
    tree = frontends.load([f"oci:{lay.root}"], Options())
    got = {p: (n.mode, n.uid, n.gid, n.mtime) for p, n, *_ in tree.walk() if n.children is not None}
    assert got == {b"/": (0o40755, 0, 0, 0), b"/a": (0o40755, 0, 0, 0), b"/a/b": (0o40755, 0, 0, 0),
                   b"/c": (0o40700, 0, 0, 1_700_000_000)}


def test_docker_archive_with_legacy_symlinks(tmp_path):
    base, top = layer({"etc": None, "etc/x": b"1"}), layer({"etc/.wh.x": b"", "etc/y": b"2"})
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [sha(base), sha(top)]}}).encode()
    files = {"c.json": config, "aaa/layer.tar": base, "bbb/layer.tar": gzip.compress(top, mtime=0),
             "manifest.json": json.dumps([{"Config": "c.json", "RepoTags": ["x/y:1"],
                                           "Layers": ["aaa/layer.tar", "ccc/layer.tar"]}]).encode()}
    archive = tmp_path / "save.tar"
    with tarfile.open(archive, "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("ccc/layer.tar")  # legacy: a layer seen before is a symlink to it
        link.type, link.linkname = tarfile.SYMTYPE, "../bbb/layer.tar"
        tf.addfile(link)
    for ref in (f"docker-archive:{archive}", f"docker-archive:{archive}:x/y:1", f"docker-archive:{archive}:@0"):
        assert names(ref) == [b"/", b"/etc", b"/etc/y"]
    with pytest.raises(InputError, match=r"@1: the archive has 1 image"):
        names(f"docker-archive:{archive}:@1")


def test_reference_syntax(tmp_path):
    r = reference.parse("oci:/no/such:tag")
    assert (r.path, r.tag) == ("/no/such", "tag")
    r = reference.parse("oci:/x@sha256:" + "a" * 64)
    assert (r.path, r.digest) == ("/x", "sha256:" + "a" * 64)
    r = reference.parse("containers-storage:[overlay@/s+/r]name:tag")
    assert (r.path, r.image) == ("/s", "name:tag")
    r = reference.parse("containers-storage:abc", storage_root="/elsewhere")
    assert r.path == "/elsewhere"
    with pytest.raises(UsageError, match="only the overlay driver"):
        reference.parse("containers-storage:[vfs@/s]x")
    with pytest.raises(UsageError):
        reference.parse("docker-archive:/x:@first")


def test_toc_only_inline_file_over_a_zstd_bomb(tmp_path):
    """A TOC entry of 10 bytes whose data range holds a zstd frame of 1 GiB of zeros: --toc-only
    decompresses at most 11 bytes of it (it decompressed the whole frame into memory), and
    the digest mismatch is a located error."""
    import resource

    import zstandard

    from bench.fuzzing.targets import oci_archive

    out = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(out, closefd=False) as w:
        for _ in range(64):
            w.write(bytes(16 << 20))
    bomb = out.getvalue()
    top = layer({"small": b"0123456789"})
    entries = [{"type": "reg", "name": "small", "size": 10, "digest": sha(b"0123456789"), "offset": 0,
                "endOffset": len(bomb), "mode": 0o100644}]
    chunked, notes = oci_archive._zstd_chunked(top, entries)
    blob = bomb + chunked  # the TOC's offsets count from the blob's start: the bomb comes first there
    position = notes["io.github.containers.zstd-chunked.manifest-position"].split(":")
    notes["io.github.containers.zstd-chunked.manifest-position"] = ":".join(
        [str(int(position[0]) + len(bomb)), *position[1:]])
    notes.pop("io.github.containers.zstd-chunked.manifest-checksum")
    path = tmp_path / "image.tar"
    path.write_bytes(oci_archive._image([(blob, top, "application/vnd.oci.image.layer.v1.tar+zstd", notes)]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InputError, match=r"TOC entries\[0\]: digest: the 10 bytes at byte 0 do not hash"):
        frontends.load([f"oci-archive:{path}:{oci_archive.TAG}"], Options(toc_only=True))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 << 10  # KiB: far below the GiB


@pytest.mark.parametrize("gz", [True, False])
def test_every_layer_file_is_closed_when_read_and_when_refused(tmp_path, gz):
    """A gzip reader does not close the file it is given: each layer's blob stayed open until
    the cyclic garbage collector ran (never during a compile, which holds it off), one
    descriptor per layer.  Read or refused (a bad diff_id), none is left open, and no thread
    that hashed a layer's digests (`blobs.Behind`) is left running (a later fork wants none)."""
    import gc
    import os
    import threading

    lay = Layout(tmp_path / "l")
    lay.top([tag(lay.image([layer({f"f{i}": b"%d" % i}) for i in range(5)], gz=gz), "good")])
    bad = Layout(tmp_path / "b")
    bad.top([tag(bad.image([layer({"x": b"1"})], gz=gz), "bad")])
    blob = gzip.compress(layer({"x": b"1"}), mtime=0) if gz else layer({"x": b"1"})
    (bad.root / "blobs/sha256" / sha(blob)[7:]).write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))  # its digest fails
    gc.disable()
    try:
        before, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
        assert b"/f4" in names(f"oci:{lay.root}:good")
        assert threading.active_count() == threads
        with pytest.raises(InputError):
            names(f"oci:{bad.root}:bad")
        assert len(os.listdir("/proc/self/fd")) == before and threading.active_count() == threads
        if gz:  # failing mid-stream: a corrupt byte halfway through the deflate data
            big = layer({f"f{i}": os.urandom(100000) for i in range(8)})
            mid = Layout(tmp_path / "m")
            mid.top([tag(mid.image([big], gz=True), "mid")])
            blob = bytearray(gzip.compress(big, mtime=0))
            blob[len(blob) // 2] ^= 0x55
            (mid.root / "blobs/sha256" / sha(gzip.compress(big, mtime=0))[7:]).write_bytes(bytes(blob))
            with pytest.raises(InputError):
                names(f"oci:{mid.root}:mid")
            assert len(os.listdir("/proc/self/fd")) == before and threading.active_count() == threads
    finally:
        gc.enable()


def test_digests_hashed_behind_are_hashlibs():
    import os

    from cfsc.frontends.oci.blobs import Behind

    chunks = [os.urandom(n) for n in (0, 1, 4096, 1 << 20, 12345)] * 9
    behind = Behind()
    for chunk in chunks:
        behind.update(chunk)
    expected = hashlib.sha256(b"".join(chunks)).hexdigest()
    assert behind.hexdigest() == expected and behind.hexdigest() == expected and behind.thread is None
    assert Behind().hexdigest() == hashlib.sha256().hexdigest()


def test_a_gzip_layer_cut_short_is_one_located_line_and_no_image(tmp_path, cfsc):
    """A layer blob that ends inside its gzip stream (its digest and size as the manifest says:
    the blob itself was made short): exit 2, one line naming the blob, and no image."""
    tar = layer({f"f{i}": bytes([i]) * 50000 for i in range(6)})
    cut = gzip.compress(tar, mtime=0)[:-40]
    lay = Layout(tmp_path / "l")
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [sha(tar)]}}).encode()
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **lay.blob(config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **lay.blob(cut)}]}
    lay.top([tag({"mediaType": MANIFEST, **lay.blob(json.dumps(manifest).encode())}, "cut")])
    out = tmp_path / "x.cfs"
    p = cfsc("compile", f"oci:{lay.root}:cut", "-o", str(out))
    err = p.stderr.decode()
    assert p.returncode == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert f"blob {sha(cut)}" in err and "gzip" in err, err
    assert not out.exists() and not list(tmp_path.glob("x.cfs*"))
