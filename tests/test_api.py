"""The public Python API (`cfsc.open`, `diff`, `check`, `compile`, `cfsc.errors`).

Its reports are the CLI's own: `diff(a, b).to_dict()` must equal, as data, what `cfsc diff
--json` prints for the same pair (several kinds of pair), and likewise for `check`.  Entries
must say what `cfsc dump --json` says, in its order.  The README's examples run as written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cfsc
from cfsc.base.jsonbytes import put

from tests.helpers.data import run_cfsc
from tests.helpers.randomdump import random_dump

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo.dump"


def _cli_json(*args: str) -> tuple[int, object]:
    p = run_cfsc(*args)
    assert p.returncode in (0, 1), p.stderr.decode()
    return p.returncode, json.loads(p.stdout)


@pytest.fixture
def pair_sources(tmp_path: Path) -> dict[str, Path]:
    """Sources of several kinds, some equal, some not: dumpfiles, the images compiled from
    them, and a directory."""
    a = tmp_path / "a.dump"
    a.write_bytes(DEMO.read_bytes())
    b = tmp_path / "b.dump"
    b.write_bytes(DEMO.read_bytes().replace(b"demo\\n", b"prod\\n").replace(b" 100755 1 0 0 ", b" 100750 1 7 0 "))
    r1, r2 = tmp_path / "r1.dump", tmp_path / "r2.dump"
    r1.write_bytes(random_dump(11))
    r2.write_bytes(random_dump(12))
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc/hostname").write_bytes(b"demo\n")
    os.utime(rootfs / "etc/hostname", (0, 0))
    os.utime(rootfs / "etc", (0, 0))
    os.utime(rootfs, (0, 0))
    out = {"a": a, "b": b, "r1": r1, "r2": r2, "rootfs": rootfs}
    for name in ("a", "b", "r1"):
        image = tmp_path / f"{name}.cfs"
        cfsc.compile(out[name], image)
        out[f"{name}.cfs"] = image
    return out


PAIRS = [("a", "b"), ("a", "a.cfs"), ("a.cfs", "b.cfs"), ("a.cfs", "b"), ("r1", "r2"), ("r1.cfs", "r2"),
         ("a", "rootfs"), ("r1.cfs", "a.cfs")]


@pytest.mark.parametrize(("left", "right"), PAIRS)
def test_diff_dict_equals_cli_json(pair_sources, left, right):
    a, b = pair_sources[left], pair_sources[right]
    code, printed = _cli_json("diff", "--json", str(a), str(b))
    report = cfsc.diff(a, b)
    assert report.to_dict() == printed
    assert report.identical == (code == 0)
    assert report.summary == printed["summary"]
    assert [c.path for c in report.changes] == [os.fsencode(c["path"]) for c in printed["changes"]]


def test_diff_options_ignore_where_stat_equal_cli_json(pair_sources):
    a, b = str(pair_sources["a"]), str(pair_sources["b"])
    _code, printed = _cli_json("diff", "--json", "--stat", "--ignore", "mode,owner", "--max-version", "0", a, b)
    assert cfsc.diff(a, b, ignore=["mode", "owner"], max_version=0).to_dict(changes=False) == printed
    _code, printed = _cli_json("diff", "--json", "--where", 'path ~ "/usr/**"', a, b)
    report = cfsc.diff(a, b, where='path ~ "/usr/**"')
    assert report.to_dict() == printed
    (change,) = report.changes
    assert (change.kind, change.path) == ("changed", b"/usr/bin/dash")
    assert change.a["mode"] == 0o755 and change.b["mode"] == 0o750
    kinds = {c.path: [name for name, _key, _va, _vb in c.attributes] for c in cfsc.diff(a, b).changes}
    assert kinds == {b"/etc/hostname": ["content"], b"/usr/bin/dash": ["mode", "uid"]}


def test_diff_layers_are_a_list(tmp_path):
    """A side may be tar layers, bottom first: a list in the API, `l1+l2` on the command line."""
    import io
    import tarfile

    layers = []
    for i, (name, data) in enumerate([("a", b"one\n"), ("b", b"two\n")]):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        path = tmp_path / f"l{i}.tar"
        path.write_bytes(buf.getvalue())
        layers.append(path)
    merged = tmp_path / "merged.cfs"
    cfsc.compile(layers, merged)
    _code, printed = _cli_json("diff", "--json", f"{layers[0]}+{layers[1]}", str(merged))
    report = cfsc.diff(layers, merged)
    assert report.to_dict() == printed
    with cfsc.open(layers) as image:
        assert [e.path for e in image] == [b"/", b"/a", b"/b"]


def test_check_dict_equals_cli_json(pair_sources):
    a, ref = str(pair_sources["a"]), str(pair_sources["b.cfs"])
    digest = cfsc.compile(a, None)
    for cli, kwargs in [
        (["--expect-digest", f"sha256:{digest.hex()}"], {"expect_digest": f"sha256:{digest.hex()}"}),
        (["--expect-digest", "0" * 64], {"expect_digest": bytes(32)}),
        (["--reference", ref], {"reference": ref}),
        (["--reproducible", "--ways", "shuffled,reversed,dump,image"],
         {"reproducible": True, "ways": ["shuffled", "reversed", "dump", "image"]}),
    ]:
        code, printed = _cli_json("check", "--json", *cli, a)
        report = cfsc.check(a, **kwargs)
        assert report.to_dict() == printed, cli
        assert report.ok == (code == 0)
        assert report.digest == digest


def test_check_refuses_a_digest_of_no_algorithm_s_length():
    with pytest.raises(cfsc.errors.UsageError, match="expected sha256"):
        cfsc.check(DEMO, expect_digest=bytes(20))
    with pytest.raises(cfsc.errors.UsageError, match="expected sha256"):
        cfsc.check(DEMO, expect_digest="sha512:" + "0" * 64)


def test_open_digest_follows_the_hash_option(tmp_path):
    """`open(..., hash="sha512").digest` is the digest `compile(..., hash="sha512")` gives."""
    digest = cfsc.compile(DEMO, tmp_path / "demo.cfs", hash="sha512")
    assert len(digest) == 64
    with cfsc.open(DEMO, hash="sha512") as image:
        assert image.digest == digest
    with cfsc.open(tmp_path / "demo.cfs", hash="sha512") as image:
        assert image.digest == digest


def test_check_needs_something_to_check():
    with pytest.raises(cfsc.errors.UsageError, match="nothing to check"):
        cfsc.check(DEMO)


def test_entries_say_what_dump_json_says(tmp_path):
    """Every attribute of every entry, in walk order, against `cfsc dump --json` — on the demo
    and on random dumpfiles (hard links, devices, xattrs, odd names)."""
    sources = [DEMO]
    for seed in range(3):
        path = tmp_path / f"r{seed}.dump"
        path.write_bytes(random_dump(seed, size=80))
        sources.append(path)
    for source in sources:
        p = run_cfsc("dump", "--json", str(source), check=True)
        printed = [json.loads(line) for line in p.stdout.splitlines()]
        with cfsc.open(source) as image:
            mine = [_as_dump_json(e) for e in image.walk()]
        assert mine == printed, source


def _as_dump_json(e: cfsc.Entry) -> dict:
    """An API entry in `cfsc dump --json`'s shape (`backends/jsonlines.py`)."""
    obj: dict = {}
    put(obj, "path", e.path)
    if e.hardlink is not None:
        put(obj, "hardlink", e.hardlink)
    obj["type"] = "char" if e.type == "whiteout" else e.type
    for name in ("mode", "size", "nlink", "uid", "gid"):
        obj[name] = getattr(e, name)
    if e.type in ("char", "block", "whiteout"):
        obj["rdev"] = e.rdev
    obj["mtime"] = e.mtime
    obj["mtime_nsec"] = e.mtime_nsec
    payload = e.target if e.target is not None else e.payload
    if payload is not None:
        put(obj, "payload", payload)
    if e.content is not None:
        put(obj, "content", e.content)
    if e.digest is not None:
        obj["digest"] = e.digest.hex()
    if e.xattrs:
        items = []
        for key, value in e.xattrs.items():
            item: dict = {}
            put(item, "key", key)
            put(item, "value", value)
            items.append(item)
        obj["xattrs"] = items
    return obj


def test_open_image_and_source_agree(tmp_path):
    """An image and the dumpfile it was compiled from open to the same entries and digest."""
    image_path = tmp_path / "demo.cfs"
    digest = cfsc.compile(DEMO, image_path)
    with cfsc.open(image_path) as a, cfsc.open(DEMO) as b:
        assert a.digest == b.digest == digest
        assert a.data == image_path.read_bytes()
        assert [repr(e) for e in a] == [repr(e) for e in b]
    assert cfsc.open(DEMO, max_version=0).version == 0
    assert cfsc.open(image_path, format="image").version == 1


def test_lookup_and_listdir(tmp_path):
    with cfsc.open(DEMO) as image:
        assert image.lookup("/usr/bin/sh").target == b"dash"
        assert image.lookup(b"usr//bin/sh").path == b"/usr/bin/sh"
        assert image.lookup("/").type == "dir" and image.lookup("/").name == b""
        assert image.lookup(Path("/etc/hostname")).content == b"demo\n"
        assert image.lookup("/removed").type == "whiteout"
        assert "/etc/motd.link" in image and "/etc/nope" not in image and 42 not in image
        with pytest.raises(cfsc.errors.LookupFailed) as info:
            image.lookup("/etc/nope")
        assert str(info.value) == f"{DEMO}:/etc/nope: no such file or directory"
        assert isinstance(info.value, OSError) and info.value.errno == 2
        with pytest.raises(cfsc.errors.LookupFailed, match="not a directory"):
            image.lookup("/etc/hostname/x")
        with pytest.raises(cfsc.errors.LookupFailed, match="not a directory"):
            image.listdir("/etc/hostname")
        assert [e.path for e in image.listdir()] == [b"/dev", b"/etc", b"/removed", b"/usr"]
        assert [e.path for e in image.walk("/usr")] == [b"/usr", b"/usr/bin", b"/usr/bin/dash", b"/usr/bin/sh"]
        assert [e.path for e in image.walk(where='name ~ "motd*"')] == [b"/etc/motd", b"/etc/motd.link"]
        assert image.lookup("/etc").xattr("security.selinux") == b"system_u:object_r:etc_t:s0"
        assert image.lookup("/etc").xattr(b"user.nope") is None
    with pytest.raises(ValueError, match="closed"):
        image.lookup("/")


def test_errors_are_cfsc_errors(tmp_path):
    bad = tmp_path / "bad.dump"
    bad.write_bytes(b"/ 4096 40755 2 0 0 0 0.0 - - -\n/x 1 100644 1 0 0 0 0.0 - - - oops\n")
    with pytest.raises(cfsc.errors.DumpfileError) as info:
        cfsc.compile(bad, tmp_path / "bad.cfs")
    assert str(info.value).startswith(f"{bad}:2:") and "\n" not in str(info.value)
    assert not (tmp_path / "bad.cfs").exists()
    with pytest.raises(cfsc.errors.InputError):
        cfsc.open(tmp_path / "missing.dump")
    with pytest.raises(cfsc.errors.UsageError):
        cfsc.diff(DEMO, DEMO, ignore=["colour"])
    with pytest.raises(TypeError, match="unknown option 'max_verison'"):
        cfsc.open(DEMO, max_verison=0)
    assert issubclass(cfsc.errors.InputError, cfsc.CfscError)
    assert set(cfsc.errors.__all__) >= {"CfscError", "InputError", "DumpfileError", "TreeError", "ImageError",
                                        "LookupFailed", "IntegrityError", "OutputError", "UsageError"}


def test_compile_returns_digest_and_takes_options(tmp_path):
    store = tmp_path / "store"
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    (rootfs / "big").write_bytes(b"x" * 10000)
    out = tmp_path / "out.cfs"
    digest = cfsc.compile(rootfs, out, digest_store=str(store), exclude='name == "nothing"')
    p = run_cfsc("info", "--json", str(out), check=True)
    assert json.loads(p.stdout)["fsverity_digest"] == digest.hex()
    assert cfsc.compile(rootfs, None, options=cfsc.Options(digest_store=str(store))) == digest
    objects = [p for p in store.rglob("*") if p.is_file() and p.name != ".cfsc-lock"]  # (gc's lock file)
    assert len(objects) == 1
    with cfsc.open(out) as image:
        assert image.lookup("/big").payload == os.fsencode(objects[0].relative_to(store))


def test_public_names_are_stable_and_typed():
    assert sorted(cfsc.__all__) == sorted([
        "PASSES", "CfscError", "Change", "CheckReport", "DiffReport", "Entry", "Image", "Inode", "Options", "Tree",
        "check", "compile", "compile_image", "diff", "errors", "load", "open", "run_passes"])
    for name in cfsc.__all__:
        assert getattr(cfsc, name) is not None, name
    assert (Path(cfsc.__file__).parent / "py.typed").is_file()
    import inspect

    for name in ("open", "diff", "check", "compile"):
        sig = inspect.signature(getattr(cfsc, name))
        assert sig.return_annotation != inspect.Signature.empty, name
        assert getattr(cfsc, name).__doc__, name


def test_import_cfsc_stays_lazy():
    """`import cfsc` loads neither the CLI (typer), nor the reader, frontends, backends or compiler."""
    code = ("import sys, cfsc; print('\\n'.join(sorted(sys.modules)))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = p.stdout.split()
    heavy = [m for m in loaded if m.split(".")[0] in ("typer", "click", "lark", "orjson")
             or m.startswith(("cfsc.backends", "cfsc.frontends", "cfsc.build", "cfsc.api", "cfsc.tools",
                              "cfsc.passes", "cfsc.cli", "cfsc.store"))]
    assert heavy == []
    assert "cfsc.errors" in loaded


def _readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_readme_has_python_examples():
    assert len(_readme_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(_readme_blocks())))
def test_readme_python_example_runs(tmp_path, index):
    """Each ```python block of README.md, run on its own in a fresh interpreter from a temp
    directory holding a copy of examples/."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    block = _readme_blocks()[index]
    p = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, f"README example {index + 1} failed:\n{block}\n{p.stderr}"
