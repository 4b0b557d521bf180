"""Tricky container content through every transport, checked against umoci's rootfs.

Two images.  One is built with buildah (from scratch, `buildah mount`, `buildah commit`) in
four layers: devices, a FIFO, a socket (the store's tar writer skips it), security.capability
and user.* xattrs, setuid/setgid/sticky bits, names over 100 bytes, ids over 2^21, a time
before 1970, absolute symlinks, a 10 MiB file that is mostly a hole; then deletions and
opaque directories across the layers, a file replaced by a directory and back (and the
reverse), hard links whose target a later layer deletes or replaces, and an empty last layer.
It is written in every form the tools write (skopeo: gzip, zstd, zstd:chunked layouts and an
oci-archive; podman save; containers-storage; eStargz through containerd).

The other is made by `umoci raw add-layer` from layers the tools users run write: GNU tar
(PAX sparse files in formats 0.0, 0.1 and 1.0, base-256 ids and a negative base-256 mtime in
`--format=gnu`, non-UTF-8 names, nanosecond times) and crafted members (a child listed before
its parent directory, duplicates, `./` prefixes, a root `./` entry, whiteouts of the lower
layers' content); skopeo copies it to zstd and into containers-storage.

The oracle is `umoci unpack` compiled by upstream C mkcomposefs; the root line is left out
(umoci gives the root the unpack time; cfsc the listed or implied root's).
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

from tests.helpers.containers import containerd_estargz, expand_links, sh, unmount_below
from tests.helpers.checks import MKCOMPOSEFS
from tests.helpers.data import run_cfsc

TOOLS = ("buildah", "podman", "skopeo", "umoci")
missing = [t for t in TOOLS if shutil.which(t) is None]
pytestmark = [pytest.mark.tools, pytest.mark.root,
              pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (`.ci/setup --test` installs them)")]

BUILD = r"""
set -e
W=$1; S="--root $W/root --runroot $2 --storage-driver overlay"
mkdir -p $W/t1; cd $W/t1
mkdir -p d/sub opq/inner rep hl ns
echo a > d/sub/f; echo b > opq/inner/g; echo c > opq/h
echo file > rep/x; mkdir rep/y; echo in > rep/y/z
echo target > hl/t; ln hl/t hl/l1; ln hl/t hl/l2; echo t2 > hl/u; ln hl/u hl/m
mknod dev-c c 4 5; mknod dev-b b 8 1; mkfifo fifo
python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind("sock")'
echo cap > capfile; setfattr -n security.capability -v 0x0100000200200000000000000000000000000000 capfile
setfattr -n user.a -v 1 capfile; setfattr -n user.bin -v 0x00ff capfile
echo s > suid; chmod 4755 suid; echo g > sgid; chmod 2750 sgid; mkdir sticky; chmod 1777 sticky
L=$(printf 'n%.0s' $(seq 150)); D=$(printf 'd%.0s' $(seq 120)); E=$(printf 'e%.0s' $(seq 120))
echo long > ns/$L; mkdir -p ns/$D/$E; echo deep > ns/$D/$E/f
echo big > bigid; chown 3000000:4000000 bigid
echo old > old; touch -d '1960-01-01 00:00:00.5' old
ln -s /etc/passwd abs; ln -s ../../x rel
truncate -s 10M sparse; echo tail >> sparse
cd $W
c=$(buildah $S from scratch); m=$(buildah $S mount $c); cp -a t1/. $m/; buildah $S commit -q $c tr:1 >/dev/null
buildah $S rm $c >/dev/null
c=$(buildah $S from tr:1); m=$(buildah $S mount $c)
rm -rf $m/d/sub $m/opq; mkdir $m/opq; echo new > $m/opq/n
rm $m/rep/x; mkdir $m/rep/x; echo xx > $m/rep/x/in; rm -rf $m/rep/y; echo yfile > $m/rep/y
rm $m/hl/t; echo replaced > $m/hl/u
buildah $S commit -q $c tr:2 >/dev/null; buildah $S rm $c >/dev/null
c=$(buildah $S from tr:2); m=$(buildah $S mount $c)
rm -rf $m/rep/x; echo back > $m/rep/x; rm $m/rep/y; mkdir $m/rep/y; echo again > $m/rep/y/w
rm -rf $m/opq; mkdir $m/opq; echo third > $m/opq/t; echo d3 > $m/d/new; rm $m/hl/l1
buildah $S commit -q $c tr:3 >/dev/null; buildah $S rm $c >/dev/null
c=$(buildah $S from tr:3); buildah $S commit -q $c tr:4 >/dev/null; buildah $S rm $c >/dev/null
c=$(buildah $S from scratch); m=$(buildah $S mount $c); echo x > $m/$(printf 'caf\xe9')
buildah $S commit -q $c lost:1 >/dev/null; buildah $S rm $c >/dev/null
"""


def _gnu_tar_layers(w: Path) -> list[Path]:
    """Layers GNU tar writes: sparse files in each PAX format, `--format=gnu` base-256
    numbers, non-UTF-8 names and nanosecond times (`--format=posix`)."""
    src = w / "g"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"middle")
        f.truncate(3 << 20)
    (src / "sparse-head").write_bytes(b"head")
    os.truncate(src / "sparse-head", 2 << 20)
    (src / "caf\xe9".encode("latin-1").decode("utf-8", "surrogateescape")).write_bytes(b"latin-1 name")
    (src / "\udcff\udcfe").write_bytes(b"not UTF-8")
    (src / "big").write_bytes(b"big ids")
    os.chown(src / "big", 3000000, 70000)
    (src / "past").write_bytes(b"before 1970")
    os.utime(src / "past", ns=(0, -315619200_250000000))
    (src / "nano").write_bytes(b"nanoseconds")
    os.utime(src / "nano", ns=(0, 1_600_000_000_123456789))
    layers = []
    for i, (fmt, extra, names) in enumerate((
            ("posix", ["--sparse", "--sparse-version=0.0"], ["sparse"]),
            ("posix", ["--sparse", "--sparse-version=0.1"], ["sparse-head"]),
            ("posix", ["--sparse", "--sparse-version=1.0"], ["sparse", "nano", "caf\xe9".encode("latin-1").decode(
                "utf-8", "surrogateescape"), "\udcff\udcfe"]),
            ("gnu", [], ["big", "past"]))):
        layer = w / f"gnu{i}.tar"
        sh("tar", f"--format={fmt}", *extra, "--numeric-owner", "-C", str(src), "-cf", str(layer), *names)
        layers.append(layer)
    return layers


CRAFTED = [("./", tarfile.DIRTYPE, {"mode": 0o750, "uid": 5, "gid": 6}),
           ("./kid/f", tarfile.REGTYPE, {"data": b"child first"}),
           ("./kid", tarfile.DIRTYPE, {"mode": 0o700, "uid": 7, "mtime": 5}),
           (".wh.sparse-head", tarfile.REGTYPE, {}), ("./.wh.nothing-there", tarfile.REGTYPE, {})]
# containers/storage refuses a layer that names a path twice ("duplicates of file paths not
# supported"); umoci extracts it, the last member winning.
DUPLICATES = [("dup", tarfile.REGTYPE, {"data": b"one"}), ("dup", tarfile.REGTYPE, {"data": b"two", "mode": 0o600}),
              ("g", tarfile.DIRTYPE, {}), ("g/in", tarfile.REGTYPE, {"data": b"i"}),
              ("g", tarfile.REGTYPE, {"data": b"a file now"}),
              ("h", tarfile.REGTYPE, {"data": b"file"}), ("h", tarfile.DIRTYPE, {"mode": 0o711}),
              ("h/x", tarfile.REGTYPE, {"data": b"x"}),
              ("sparse", tarfile.REGTYPE, {"data": b"a file over"}), ("sparse", tarfile.REGTYPE, {"data": b"the last"})]


def _crafted_layer(path: Path, members: list) -> Path:
    """Members in the orders and spellings tar writers produce: a child before its parent
    directory, `./` prefixes, the root `./`, whiteouts; duplicates (the last wins)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, attrs in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            data = attrs.get("data", b"")
            info.size = len(data)
            info.mtime = attrs.get("mtime", 1_700_000_000)
            info.mode = attrs.get("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
            info.uid, info.gid = attrs.get("uid", 0), attrs.get("gid", 0)
            t.addfile(info, io.BytesIO(data) if data else None)
    return path


def _oracle(w: Path, layout: str, name: str) -> list[bytes]:
    bundle = w / f"bundle-{name}"
    sh("umoci", "unpack", "--image", layout, str(bundle))
    out = w / f"oracle-{name}.cfs"
    if os.access(MKCOMPOSEFS, os.X_OK):
        sh(MKCOMPOSEFS, str(bundle / "rootfs"), str(out))
    else:
        cfsc_ok("compile", str(bundle / "rootfs"), "-o", str(out))
    return expand_links(cfsc_ok("dump", str(out)))


@pytest.fixture(scope="module")
def tricky(tmp_path_factory):
    w = tmp_path_factory.mktemp("tricky")
    run = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))  # podman refuses a runroot of more than 50 characters
    try:
        yield _build(w, run)
    finally:
        unmount_below(w)
        unmount_below(run)
        shutil.rmtree(run, ignore_errors=True)


def _build(w: Path, run: Path) -> dict:
    sh("bash", "-c", BUILD, "build", str(w), str(run))
    store = f"containers-storage:[overlay@{w}/root+{run}]"
    src = store + "localhost/tr:4"
    forms = {}
    for name, fmt in (("gzip", "gzip"), ("zstd", "zstd"), ("zstd-chunked", "zstd:chunked")):
        sh("skopeo", "copy", "-q", "--dest-compress", "--dest-compress-format", fmt, src, f"oci:{w}/{name}:4")
        forms[name] = [f"oci:{w}/{name}:4"]
    sh("skopeo", "copy", "-q", src, f"oci-archive:{w}/img.tar:4")
    forms["oci-archive"] = [f"oci-archive:{w}/img.tar:4"]
    sh("podman", "--root", f"{w}/root", "--runroot", str(run), "--storage-driver", "overlay", "save", "-q", "-o",
       f"{w}/podman.tar", "localhost/tr:4")
    forms["docker-archive"] = [f"docker-archive:{w}/podman.tar"]
    forms["containers-storage"] = ["containers-storage:localhost/tr:4", "--storage-root", f"{w}/root"]
    esgz = containerd_estargz(w, w / "img.tar", "localhost/tr", "4")
    if esgz is not None:
        forms["estargz"] = [f"oci:{esgz}:esgz"]
    sh("skopeo", "copy", "-q", "--dest-compress", "--dest-compress-format", "zstd:chunked", store + "localhost/lost:1",
       f"oci:{w}/lost:1")
    # the image of layers GNU tar and a crafting writer made, through umoci
    sh("umoci", "init", "--layout", f"{w}/raw")
    sh("umoci", "new", "--image", f"{w}/raw:r")
    layers = [*_gnu_tar_layers(w), _crafted_layer(w / "crafted.tar", CRAFTED)]
    for layer in layers:
        sh("umoci", "raw", "add-layer", "--image", f"{w}/raw:r", str(layer))
    sh("umoci", "tag", "--image", f"{w}/raw:r", "s")  # without the duplicates: containers-storage takes it
    layers.append(_crafted_layer(w / "duplicates.tar", DUPLICATES))
    sh("umoci", "raw", "add-layer", "--image", f"{w}/raw:r", str(layers[-1]))
    raw = {"umoci": [f"oci:{w}/raw:r"], "layers": [str(p) for p in layers]}
    sh("skopeo", "copy", "-q", "--dest-compress", "--dest-compress-format", "zstd", f"oci:{w}/raw:r",
       f"oci:{w}/raw-zstd:r")
    raw["zstd"] = [f"oci:{w}/raw-zstd:r"]
    sh("skopeo", "copy", "-q", f"oci:{w}/raw:s", store + "localhost/raw:s")
    raw["containers-storage"] = ["containers-storage:localhost/raw:s", "--storage-root", f"{w}/root"]
    return {"dir": w, "forms": forms, "raw": raw, "oracle": _oracle(w, f"{w}/gzip:4", "built"),
            "raw-oracle": _oracle(w, f"{w}/raw:r", "raw"), "raw-s-oracle": _oracle(w, f"{w}/raw:s", "raw-s")}


def cfsc_ok(*args: str) -> bytes:
    p = run_cfsc(*args)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout


FORMS = ["gzip", "zstd", "zstd-chunked", "oci-archive", "docker-archive", "containers-storage", "estargz"]


@pytest.mark.parametrize("form", FORMS)
def test_built_image_dumps_as_the_umoci_rootfs(tricky, form, tmp_path):
    """Every form of the buildah image (containers-storage too: an mtime before 1970, which
    the store sets to the epoch on its files, comes from the layer's tar-split headers)."""
    args = tricky["forms"].get(form)
    if args is None:
        pytest.skip(f"no {form} image: containerd or ctr-remote is missing or did not start")
    image, store = tmp_path / "a.cfs", tmp_path / "s"
    cfsc_ok("compile", *args, "-o", str(image), "--digest-store", str(store))
    got = cfsc_ok("dump", str(image))
    assert expand_links(got) == tricky["oracle"]
    assert b"/old 4 100644 1 0 0 0 -315619200.0 " in got  # before 1970, and nanoseconds Go's writer cut
    assert b"/hl/l2 7 100644 1 " in got and b"/hl/m 3 @100644 1 " not in got  # the link outlived its target


@pytest.mark.parametrize("form", ["zstd-chunked", "estargz"])
def test_toc_only_of_the_built_image(tricky, form):
    """The TOC gives the tree the full read gives (the empty last layer's zstd:chunked TOC
    says `"entries":null`, which was refused); only the payload names differ by design."""
    args = tricky["forms"].get(form)
    if args is None:
        pytest.skip(f"no {form} image: containerd or ctr-remote is missing or did not start")

    def without_payload(dump: bytes) -> list[bytes]:
        out = []
        for line in dump.splitlines():
            f = line.split(b" ")
            if f[2].lstrip(b"@").startswith(b"10") and f[9] == b"-":
                f[10] = b"*"
                if not f[2].startswith(b"@"):
                    f[8] = b"*"
            out.append(b" ".join(f))
        return out

    assert without_payload(cfsc_ok("dump", "--toc-only", *args)) == without_payload(cfsc_ok("dump", *args))


def test_toc_only_refuses_a_name_the_toc_lost(tricky):
    """Go's JSON writer spells a name that is not UTF-8 with U+FFFD: the TOC cannot give the
    name, so --toc-only says so (the full read gives it, from the tar header)."""
    ref = f"oci:{tricky['dir']}/lost:1"
    p = run_cfsc("dump", "--toc-only", ref)
    err = p.stderr.decode()
    assert p.returncode == 2 and err.count("\n") == 1 and "name: 'caf\\ufffd' holds U+FFFD" in err, err
    assert b"/caf\\xe9 " in cfsc_ok("dump", ref)


@pytest.mark.parametrize("form", ["umoci", "layers", "zstd", "containers-storage"])
def test_tool_written_layers_dump_as_the_umoci_rootfs(tricky, form, tmp_path):
    """GNU tar's sparse formats, base-256 numbers, odd names and crafted member orders, as an
    image (and as bare layers given to compile): what umoci (Go's archive/tar) unpacks."""
    args = tricky["raw"][form]
    image = tmp_path / "a.cfs"
    cfsc_ok("compile", *args, "-o", str(image), "--digest-store", str(tmp_path / "s"))
    got = cfsc_ok("dump", str(image))
    whole = form != "containers-storage"  # the layer of duplicates is left out there
    assert expand_links(got) == tricky["raw-oracle" if whole else "raw-s-oracle"]
    assert got.startswith(b"/ 4096 40750 ")  # the root `./` member's metadata
    assert b"\n/ 4096 40750 " not in got and b" 5 6 0 " in got.split(b"\n", 1)[0]
    lines = [b"/kid 40 40700 2 7 0 0 5.0 ", b"/big 7 100644 1 3000000 70000 0 ",
             b"/nano 11 100644 1 0 0 0 1600000000.123456789 ", b"/caf\\xe9 12 ", b"/\\xff\\xfe 9 "]
    lines += [b"/dup 3 100600 1 ", b"/sparse 8 100644 "] if whole else [b"/sparse 3145728 100644 "]
    for line in lines:
        assert line in got, line
    assert b"/sparse-head " not in got  # whited out by the crafted layer
    # before 1970 in GNU base-256 (whole seconds): containers-storage's files have the epoch
    assert b"/past 11 100644 1 0 0 0 -315619201.0 " in got
