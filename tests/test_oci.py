"""Container images as sources, checked against the container tools themselves.

One module fixture builds a two-layer image with buildah (from scratch; `buildah mount`, a
small tree copied in, `buildah commit`; the second layer deletes a file and a directory,
recreates a directory (opaque) and turns a file into a directory), then writes it in every
form the tools write: OCI layouts with gzip, zstd and zstd:chunked layers (`skopeo copy`), an
oci-archive, a docker-archive (`podman save`), a multi-platform index (`buildah manifest`),
eStargz (`ctr-remote image convert --estargz`, against a containerd started for the fixture
with its own root, state and socket), and the containers-storage the images were built in.

The oracle is `umoci unpack` of the image: its rootfs compiled by upstream C mkcomposefs
must dump exactly as `cfsc dump SOURCE` for every form, except for hard links (mkcomposefs
makes each name its own inode; cfsc keeps them, as the tar frontend does) and the root
directory (no layer lists it: cfsc's rule gives 040755 0:0 mtime 0, umoci whatever it made).
Everything is built from local trees: no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cfsc.store.locks import LOCK_NAME
from cfsc.errors import InputError

from tests.helpers.containers import containerd_estargz, expand_links, sh, unmount_below
from tests.helpers.checks import MKCOMPOSEFS
from tests.helpers.data import run_cfsc

TOOLS = ("buildah", "podman", "skopeo", "umoci", "containerd", "ctr", "ctr-remote")
missing = [t for t in TOOLS[:4] if shutil.which(t) is None]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (`.ci/setup --test` installs them)")

BUILD = r"""
set -e
W=$1; S="--root $W/root --runroot $W/run --storage-driver overlay"
mkdir -p $W/t1/etc/skel $W/t1/usr/bin $W/t1/usr/lib/mod $W/t1/var/empty $W/t1/opt/gone/deep
cd $W/t1
echo hello > etc/hostname; : > etc/empty; head -c 100000 /dev/urandom > usr/bin/tool; cp usr/bin/tool usr/bin/tool-copy
ln usr/bin/tool usr/bin/tool-link; ln -s ../bin/tool usr/lib/tool-sym; chmod 4755 usr/bin/tool
echo data > opt/gone/deep/f; echo x > usr/lib/mod/a; echo y > usr/lib/mod/b; mkfifo var/fifo; mknod var/null c 1 3
head -c 70000 /dev/urandom > usr/lib/mod/big
setfattr -n user.note -v hi etc/hostname; setfattr -n user.bin -v 0x00ff01 usr/lib/mod/a
chown 1000:1000 etc/skel; chmod 0700 etc/skel; touch -h -d @1600000000 usr/lib/tool-sym; touch -d @1600000001 etc/hostname
cd $W
c=$(buildah $S from scratch); m=$(buildah $S mount $c); cp -a t1/. $m/; buildah $S commit -q $c img:1 >/dev/null
buildah $S rm $c >/dev/null
c=$(buildah $S from img:1); m=$(buildah $S mount $c)
rm -rf $m/opt/gone $m/etc/empty $m/usr/lib/mod; mkdir $m/usr/lib/mod; echo z > $m/usr/lib/mod/c
rm $m/usr/bin/tool-copy; mkdir $m/usr/bin/tool-copy; echo new > $m/usr/bin/tool-copy/inside
head -c 3000 /dev/urandom > $m/etc/added
buildah $S commit -q $c img:2 >/dev/null; buildah $S rm $c >/dev/null
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    w = tmp_path_factory.mktemp("oci")
    try:
        yield _build_images(w)
    finally:
        unmount_below(w)


def _build_images(w: Path) -> dict:
    sh("bash", "-c", BUILD, "build", str(w))
    store = f"containers-storage:[overlay@{w}/root+{w}/run]"
    src = store + "localhost/img:2"
    refs = {}
    for name, fmt in (("gzip", "gzip"), ("zstd", "zstd"), ("zstd-chunked", "zstd:chunked")):
        sh("skopeo", "copy", "-q", "--dest-compress", "--dest-compress-format", fmt, src, f"oci:{w}/{name}:2")
        refs[name] = f"oci:{w}/{name}:2"
    sh("skopeo", "copy", "-q", src, f"oci-archive:{w}/img.tar:2")
    refs["oci-archive"] = f"oci-archive:{w}/img.tar:2"
    sh("podman", "--root", f"{w}/root", "--runroot", f"{w}/run", "--storage-driver", "overlay", "save", "-q", "-o",
       f"{w}/podman.tar", "localhost/img:2")
    refs["docker-archive"] = f"docker-archive:{w}/podman.tar"
    s = ["--root", f"{w}/root", "--runroot", f"{w}/run", "--storage-driver", "overlay"]
    sh("buildah", *s, "manifest", "create", "multi")
    sh("buildah", *s, "manifest", "add", "--arch", "arm64", "--variant", "v8", "multi", store + "localhost/img:1")
    sh("buildah", *s, "manifest", "add", "--arch", "amd64", "multi", src)
    sh("buildah", *s, "manifest", "push", "-q", "--all", "multi", f"oci:{w}/multi:latest")
    refs["multi-arch"] = f"oci:{w}/multi:latest"
    refs["containers-storage"] = "containers-storage:localhost/img:2"
    esgz = containerd_estargz(w, w / "img.tar")
    if esgz is not None:
        refs["estargz"] = f"oci:{esgz}:esgz"
    sh("umoci", "unpack", "--image", f"{w}/gzip:2", str(w / "bundle"))
    # umoci's own image: its layer lists `./` (the root's metadata travels)
    sh("umoci", "init", "--layout", f"{w}/umoci")
    sh("umoci", "new", "--image", f"{w}/umoci:u")
    sh("umoci", "unpack", "--image", f"{w}/umoci:u", str(w / "ub"))
    sh("cp", "-a", f"{w}/t1/.", f"{w}/ub/rootfs/")
    os.chmod(w / "ub/rootfs", 0o750)
    sh("umoci", "repack", "--image", f"{w}/umoci:u", str(w / "ub"))
    sh("skopeo", "copy", "-q", f"oci:{w}/umoci:u", store + "localhost/umoci:u")
    refs["umoci"] = f"oci:{w}/umoci:u"
    return {"dir": w, "refs": refs, "storage_root": str(w / "root"), "rootfs": w / "bundle" / "rootfs"}


def cfsc_ok(*args: str) -> bytes:
    p = run_cfsc(*args)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout


def source_args(images, name: str) -> list[str]:
    ref = images["refs"].get(name)
    if ref is None:
        pytest.skip(f"no {name} image: containerd or ctr-remote is missing or did not start")
    return [ref, "--storage-root", images["storage_root"]] if name == "containers-storage" else [ref]


@pytest.fixture(scope="module")
def oracle(images):
    """The dump of the umoci rootfs compiled by C mkcomposefs (cfsc's directory frontend
    when that binary is not here)."""
    out = images["dir"] / "oracle.cfs"
    if os.access(MKCOMPOSEFS, os.X_OK):
        sh(MKCOMPOSEFS, str(images["rootfs"]), str(out))
    else:
        cfsc_ok("compile", str(images["rootfs"]), "-o", str(out))
    return expand_links(cfsc_ok("dump", str(out)))


FORMS = ["gzip", "zstd", "zstd-chunked", "oci-archive", "docker-archive", "multi-arch", "containers-storage",
         "estargz"]


@pytest.mark.parametrize("form", FORMS)
def test_every_form_dumps_as_the_umoci_rootfs(images, oracle, form, tmp_path):
    """Compiled with --digest-store: the image dumps as the oracle, and the store holds
    exactly the objects it names."""
    image, store = tmp_path / "a.cfs", tmp_path / "s"
    cfsc_ok("compile", *source_args(images, form), "-o", str(image), "--digest-store", str(store))
    got = cfsc_ok("dump", str(image))
    assert expand_links(got) == oracle
    # the root no layer lists: the implied directory, the same everywhere
    assert got.splitlines()[0] == b"/ 4096 40755 6 0 0 0 0.0 - - -"
    # hard links stay one inode
    assert b"/usr/bin/tool-link 100000 @104755 2 " in got
    objects = sorted(str(p.relative_to(store)) for p in store.glob("*/*") if p.is_file())
    assert objects == sorted(cfsc_ok("objects", str(image)).decode().split())
    assert len(objects) == 2  # /etc/added and the tool binary


@pytest.mark.parametrize("form", ["zstd-chunked", "estargz"])
def test_toc_only_gives_the_same_tree_but_payloads(images, form):
    args = source_args(images, form)
    full = cfsc_ok("dump", *args).splitlines()
    toc = cfsc_ok("dump", "--toc-only", *args).splitlines()

    def without_payload(lines):
        out = []
        for line in lines:
            f = line.split(b" ")
            if f[2].lstrip(b"@").startswith(b"10") and f[9] == b"-":
                f[10] = b"*"  # external file: the digest (and payload) differ by design
                if not f[2].startswith(b"@"):
                    f[8] = b"*"
            out.append(b" ".join(f))
        return out

    assert without_payload(toc) == without_payload(full)
    # payloads are the content's SHA-256, as containers/storage names them
    tool = next(line for line in toc if line.startswith(b"/usr/bin/tool "))
    import hashlib

    # the tool binary's content digest names its payload
    data = Path(images["rootfs"], "usr/bin/tool").read_bytes()
    h = hashlib.sha256(data).hexdigest().encode()
    assert tool.split(b" ")[8] == h[:2] + b"/" + h[2:]


def test_a_listed_root_travels_through_every_form(images):
    """umoci's layer lists `./`: its metadata is the root's, read from containers-storage too
    (from the tar-split headers: the store does not apply it to the diff directory)."""
    oci = cfsc_ok("dump", images["refs"]["umoci"])
    assert oci.startswith(b"/ 4096 40750 ")
    stored = cfsc_ok("dump", "containers-storage:localhost/umoci:u", "--storage-root", images["storage_root"])
    assert stored == oci


def test_estargz_metadata_never_in_the_tree(images):
    args = source_args(images, "estargz")
    for extra in ([], ["--toc-only"]):
        got = cfsc_ok("dump", *extra, *args)
        assert b"stargz.index.json" not in got and b"landmark" not in got


def test_platforms(images):
    ref = images["refs"]["multi-arch"]
    arm = cfsc_ok("dump", ref, "--platform", "linux/arm64")
    assert b"/opt/gone/deep/f " in arm and b"/etc/added" not in arm  # the first image
    p = run_cfsc("dump", ref, "--platform", "linux/s390x")
    assert p.returncode == 2
    err = p.stderr.decode()
    assert err.count("\n") == 1 and "linux/s390x" in err and "linux/amd64, linux/arm64/v8" in err


def test_export_round_trip_real_image(images, tmp_path):
    for form in ("gzip", "containers-storage"):
        args = source_args(images, form)
        first = tmp_path / f"{form}.cfs"
        cfsc_ok("compile", *args, "-o", str(first), "--digest-store", str(tmp_path / "s"))
        layer = tmp_path / f"{form}.tar"
        cfsc_ok("export", str(first), "--store", str(tmp_path / "s"), "-o", str(layer))
        again = tmp_path / f"{form}-again.cfs"
        cfsc_ok("compile", str(layer), "-o", str(again))
        assert again.read_bytes() == first.read_bytes()
        # GNU tar reads it too, and finds what umoci unpacked
        listing = sh("tar", "-tvf", str(layer)).stdout
        assert b"usr/bin/tool-link link to usr/bin/tool" in listing


# -- errors: one line, exit 2, nothing written ------------------------------------------------

def _copy(images, name: str, tmp_path: Path) -> Path:
    dest = tmp_path / name
    shutil.copytree(images["dir"] / name, dest, symlinks=True)
    return dest


def _index(layout: Path) -> dict:
    import json

    return json.loads((layout / "index.json").read_text())


def _manifest(layout: Path) -> tuple[Path, dict]:
    import json

    digest = _index(layout)["manifests"][0]["digest"][7:]
    path = layout / "blobs/sha256" / digest
    return path, json.loads(path.read_text())


def _rewrite_manifest(layout: Path, edit) -> None:
    """Edit the manifest and re-link it (new digest in index.json), so only `edit` is wrong."""
    import hashlib
    import json

    path, doc = _manifest(layout)
    edit(doc)
    data = json.dumps(doc).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / digest).write_bytes(data)
    index = _index(layout)
    index["manifests"][0].update(digest="sha256:" + digest, size=len(data))
    (layout / "index.json").write_text(json.dumps(index))


def _layer(layout: Path, i: int = -1) -> Path:
    return layout / "blobs/sha256" / _manifest(layout)[1]["layers"][i]["digest"][7:]


def _break(kind: str, layout: Path) -> str:
    """Break a copy of the gzip layout one way; returns text the error must contain."""
    import json

    if kind == "no-index":
        (layout / "index.json").unlink()
        return "index.json"
    if kind == "corrupt-index":
        (layout / "index.json").write_text('{"manifests": [')
        return "index.json: not valid JSON"
    if kind == "index-shape":
        (layout / "index.json").write_text('{"manifests": [{"mediaType": "x", "digest": 5}]}')
        return "manifests[0].digest: expected a string"
    if kind == "missing-manifest":
        _manifest(layout)[0].unlink()
        return "is missing"
    if kind == "corrupt-config":
        def edit(doc):
            config = layout / "blobs/sha256" / doc["config"]["digest"][7:]
            config.write_text("{}")
            import hashlib
            data = config.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            (layout / "blobs/sha256" / digest).write_bytes(data)
            doc["config"].update(digest="sha256:" + digest, size=len(data))
        _rewrite_manifest(layout, edit)
        return "rootfs: expected an object"
    if kind == "missing-layer":
        _layer(layout).unlink()
        return "is missing"
    if kind == "truncated-layer":
        blob = _layer(layout)
        blob.write_bytes(blob.read_bytes()[:-100])
        return "(truncated)"
    if kind == "corrupt-layer":
        blob = _layer(layout)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF  # the deflate stream breaks, or yields bytes that are no tar
        blob.write_bytes(bytes(data))
        return f"blob sha256:{blob.name}: "  # either way the error names the blob (and a byte offset)
    if kind == "wrong-digest":  # a valid gzip stream of the same tar, other bytes: only the digest tells
        import gzip

        blob = _layer(layout)
        name = blob.name
        data = gzip.compress(gzip.decompress(blob.read_bytes()), compresslevel=1, mtime=0)
        blob.write_bytes(data)
        _rewrite_manifest(layout, lambda doc: [d.update(size=len(data)) for d in doc["layers"]
                                               if d["digest"] == "sha256:" + name])
        return "digest mismatch: the blob's"
    if kind == "wrong-diff-id":
        def edit(doc):
            doc["layers"][-1]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip"
        config_path = layout / "blobs/sha256" / _manifest(layout)[1]["config"]["digest"][7:]
        config = json.loads(config_path.read_text())
        config["rootfs"]["diff_ids"][-1] = "sha256:" + "0" * 64
        data = json.dumps(config).encode()
        import hashlib
        digest = hashlib.sha256(data).hexdigest()
        (layout / "blobs/sha256" / digest).write_bytes(data)
        _rewrite_manifest(layout, lambda doc: (edit(doc), doc["config"].update(digest="sha256:" + digest,
                                                                             size=len(data))))
        return "diff_id mismatch"
    if kind == "escaping-blob":
        blob = _layer(layout, 0)
        outside = layout.parent / "outside"
        shutil.copy(blob, outside)
        blob.unlink()
        blob.symlink_to(outside)
        return "leads outside the layout"
    if kind == "unknown-media-type":
        _rewrite_manifest(layout, lambda doc: doc["layers"][0].update(mediaType="application/x-weird"))
        return "unknown layer media type 'application/x-weird'"
    if kind == "tag-not-found":
        return "tag 'nope' not found"
    if kind == "ambiguous-tag":
        index = _index(layout)
        index["manifests"].append(dict(index["manifests"][0]))
        (layout / "index.json").write_text(json.dumps(index))
        return "ambiguous"
    raise AssertionError(kind)


BREAKS = ["no-index", "corrupt-index", "index-shape", "missing-manifest", "corrupt-config", "missing-layer",
          "truncated-layer", "corrupt-layer", "wrong-digest", "wrong-diff-id", "escaping-blob", "unknown-media-type",
          "tag-not-found", "ambiguous-tag"]


@pytest.mark.parametrize("kind", BREAKS)
def test_broken_layouts(images, tmp_path, kind):
    layout = _copy(images, "gzip", tmp_path)
    expect = _break(kind, layout)
    ref = f"oci:{layout}:{'nope' if kind == 'tag-not-found' else '2'}"
    out = tmp_path / "out.cfs"
    store = tmp_path / "store"
    p = run_cfsc("compile", ref, "-o", str(out), "--digest-store", str(store))
    err = p.stderr.decode()
    assert p.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err
    assert "Traceback" not in err
    assert not out.exists()
    assert not store.exists() or not any(p.is_file() and p.name != LOCK_NAME for p in store.rglob("*"))


@pytest.mark.parametrize("kind", ["footer", "toc", "position"])
def test_broken_toc(images, tmp_path, kind):
    """A zstd:chunked layer whose footer, TOC or position annotation is corrupt: --toc-only
    reads them, and says which."""
    layout = _copy(images, "zstd-chunked", tmp_path)
    blob = _layer(layout)
    data = bytearray(blob.read_bytes())
    if kind == "footer":  # no annotation to go by, and the footer's TOC offset points past the end
        size = 40 if data[-44:-40] == (40).to_bytes(4, "little") else 64  # older writers: 40 bytes
        data[-size:-size + 8] = (len(data) + 1).to_bytes(8, "little")
        _rewrite_manifest(layout, lambda doc: [doc["layers"][-1].get("annotations", {}).clear()])
        expect = "the footer: the TOC at bytes"
    elif kind == "toc":
        ann = _manifest(layout)[1]["layers"][-1]["annotations"]
        pos = next(v for k, v in ann.items() if k.endswith("manifest-position"))
        offset = int(pos.split(":")[0])
        data[offset + 20] ^= 0xFF
        expect = "TOC"
    else:
        _rewrite_manifest(layout, lambda doc: doc["layers"][-1]["annotations"].update(
            {k: "1:2:3" for k in doc["layers"][-1]["annotations"] if k.endswith("manifest-position")}))
        expect = "manifest-position"
    blob.write_bytes(bytes(data))
    # the blob's digest changed with it: give the manifest the new one, so the TOC is what fails
    import hashlib

    digest = hashlib.sha256(bytes(data)).hexdigest()
    new = blob.with_name(digest)
    blob.rename(new)
    old = blob.name
    _rewrite_manifest(layout, lambda doc: [layer.update(digest="sha256:" + digest) for layer in doc["layers"]
                                           if layer["digest"] == "sha256:" + old])
    p = run_cfsc("dump", "--toc-only", f"oci:{layout}:2")
    err = p.stderr.decode()
    assert p.returncode == 2 and err.count("\n") == 1 and expect in err and "Traceback" not in err, err


def test_toc_only_refuses_plain_layers_and_a_store(images, tmp_path):
    p = run_cfsc("dump", "--toc-only", images["refs"]["gzip"])
    assert p.returncode == 2 and b"has no TOC" in p.stderr
    p = run_cfsc("compile", "--toc-only", images["refs"]["zstd-chunked"], "-o", str(tmp_path / "x"),
                 "--digest-store", str(tmp_path / "s"))
    assert p.returncode == 2 and b"--digest-store" in p.stderr


def test_mounted_image_reads_as_the_rootfs(images, tmp_path):
    """`cfsc mount` of a compiled container image (FUSE, over the store compile filled) shows
    the files umoci unpacked, byte for byte."""
    image, store, mnt = tmp_path / "a.cfs", tmp_path / "s", tmp_path / "mnt"
    mnt.mkdir()
    cfsc_ok("compile", images["refs"]["zstd"], "-o", str(image), "--digest-store", str(store))
    cfsc_ok("mount", str(image), str(mnt), "--store", str(store))
    try:
        p = subprocess.run(["diff", "-r", "--no-dereference", str(mnt), str(images["rootfs"])], capture_output=True)
        # diff cannot compare special files; it only says both are one (of the same type)
        import re

        odd = [line for line in p.stdout.decode().splitlines()
               if not re.fullmatch(r"File \S+ is a (.+) while file \S+ is a \1", line)]
        assert p.returncode in (0, 1) and not odd, odd
    finally:
        run_cfsc("umount", str(mnt))


@pytest.mark.parametrize("text, entries", [(b'{"version":1,"entries":null}', []), (b'{"entries":[]}', []),
                                           (b'{"version":1}', None), (b'{"entries":{}}', None), (b"[]", None)])
def test_a_toc_is_an_object_with_entries_null_only_for_an_empty_layer(text, entries):
    """`"entries":null` is Go's empty slice (an empty layer); a TOC without the key, or with
    anything but an array there, is refused, not read as an empty layer."""
    from cfsc.frontends.oci.chunked import toc_document

    if entries is not None:
        assert toc_document(text, "blob")["entries"] == entries
    else:
        with pytest.raises(InputError, match="^blob: the TOC: expected an object with an `entries` array$"):
            toc_document(text, "blob")
