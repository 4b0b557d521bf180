"""The inspection verbs and the composefs-info / composefs-dump drop-ins, through `cfsc`.

Expected drop-in outputs in `tests/data/dropins/` were printed by upstream composefs-info
1.0.8 (see its README); the tests never run upstream binaries.
"""

from __future__ import annotations

import gzip
import hashlib
import os

import orjson
import pytest
from cfsc.base.fsverity import digest_bytes, payload_path
from cfsc.base.jsonbytes import get

from tests.helpers.data import CONFORMANCE, DATA, image_of, read_input

DROPINS = DATA / "dropins"
IMAGES = CONFORMANCE / "upstream-images"
SAMPLE_DUMP = (DROPINS / "sample.dump").read_bytes()


def expected(name: str) -> bytes:
    data = (DROPINS / name).read_bytes()
    return gzip.decompress(data) if name.endswith(".gz") else data


@pytest.fixture
def files(tmp_path):
    """The images the expected outputs were made from, as upstream saw them."""
    (tmp_path / "sample.cfs").write_bytes(image_of(SAMPLE_DUMP, strict=True))
    (tmp_path / "special.v1.cfs").write_bytes((IMAGES / "special.v1.cfs").read_bytes())
    (tmp_path / "longlink.v0.cfs").write_bytes((IMAGES / "longlink.v0.cfs").read_bytes())
    (tmp_path / "cwhl.cfs").write_bytes(gzip.decompress((IMAGES / "config-with-hard-link.v1.cfs.gz").read_bytes()))
    return tmp_path


# -- drop-ins ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, output", [
    (["ls", "sample.cfs"], "ls.sample.out"),
    (["dump", "sample.cfs"], "dump.sample.out"),
    (["--filter=dir", "--filter", "zz", "dump", "sample.cfs"], "dump-filter.sample.out"),
    (["objects", "sample.cfs"], "objects.sample.out"),
    (["ls", "special.v1.cfs", "longlink.v0.cfs"], "ls.special-longlink.out"),
    (["--filter=var", "--filter=home", "--filter", "etc", "dump", "cwhl.cfs"], "dump-filter.config-with-hard-link.out.gz"),
    (["dump", "--filter=zz", "sample.cfs"], None),  # options after the command (getopt permutes)
])
def test_composefs_info_matches_upstream(args, output, files, cfsc):
    p = cfsc("composefs-info", *args, cwd=files, check=True)
    if output is not None:
        assert p.stdout == expected(output)
    else:
        assert p.stdout.startswith(b"/ 4096 40755 5 ") and b"/zz/w " in p.stdout and b"/dir" not in p.stdout


def test_composefs_info_objects_across_images(files, cfsc):
    p = cfsc("composefs-info", "objects", "sample.cfs", "special.v1.cfs", "cwhl.cfs", cwd=files, check=True)
    assert hashlib.sha256(p.stdout).hexdigest() == expected("objects.sample-special-config.sha256").decode().strip()


def test_composefs_info_missing_objects(files, cfsc):
    store = files / "store"
    (store / "ab").mkdir(parents=True)
    (store / "ab" / "cdef x").write_bytes(b"")
    p = cfsc("composefs-info", "missing-objects", "--basedir", str(store), "sample.cfs", cwd=files, check=True)
    assert p.stdout == expected("missing-objects.sample.out")


def test_composefs_info_filter_applies_to_objects_and_missing_objects(files, cfsc):
    # Upstream filters the root's children when it loads the image, for every command; the
    # expected values were printed by composefs-info 1.0.8 (4590 of cwhl's 4616 objects).
    p = cfsc("composefs-info", "--filter", "etc", "--filter=usr", "objects", "cwhl.cfs", cwd=files, check=True)
    assert hashlib.sha256(p.stdout).hexdigest() == "3199bc46df700c2e9a8a63f26ec2c78d49dad0e25620fa99d5dc98967c4252a3"
    assert cfsc("composefs-info", "--filter=dir", "objects", "sample.cfs", cwd=files, check=True).stdout == b"ab/cdef x\n"
    store = files / "store"
    (store / "ab").mkdir(parents=True)
    (store / "ab" / "cdef x").write_bytes(b"")
    for name, out in [("zz", b"-\n"), ("dir", b"")]:
        p = cfsc("composefs-info", f"--filter={name}", "--basedir", str(store), "missing-objects", "sample.cfs",
                 cwd=files, check=True)
        assert p.stdout == out, name


def test_composefs_info_measure_file(files, cfsc):
    (files / "m4097").write_bytes(bytes(range(256)) * 16 + b"x")
    (files / "m1").write_bytes(b"a")
    p = cfsc("composefs-info", "measure-file", "m4097", "m1", "special.v1.cfs", cwd=files, check=True)
    assert p.stdout == expected("measure-file.out")
    # The empty file: the kernel's digest (what `fsverity digest` prints), not 1.0.8's.
    (files / "empty").write_bytes(b"")
    p = cfsc("composefs-info", "measure-file", "empty", cwd=files, check=True)
    assert p.stdout.decode().startswith("3d248ca5")


@pytest.mark.parametrize("args, words", [
    ([], "no command"),
    (["frobnicate", "x.cfs"], "unknown command"),
    (["ls"], "no image path"),
    (["measure-file"], "no files"),
    (["--filter=a/b", "ls", "sample.cfs"], "single name"),
    (["--basedir=/nonexistent", "missing-objects", "sample.cfs"], "store directory"),
    (["--bogus", "ls", "sample.cfs"], "unrecognized"),
    (["ls", "sample.dump"], "not a composefs image"),
])
def test_composefs_info_errors(args, words, files, cfsc):
    (files / "sample.dump").write_bytes(SAMPLE_DUMP)
    p = cfsc("composefs-info", *args, cwd=files)
    assert p.returncode == 2, p.stderr
    assert p.stderr.decode().count("\n") == 1 and words in p.stderr.decode(), p.stderr


def test_composefs_dump_reencodes_at_the_image_version(files, cfsc):
    for name in ("special.v1.cfs", "longlink.v0.cfs", "cwhl.cfs"):
        cfsc("composefs-dump", name, "out.cfs", cwd=files, check=True)
        assert (files / "out.cfs").read_bytes() == (files / name).read_bytes(), name
    assert cfsc("composefs-dump", cwd=files).returncode == 2
    p = cfsc("composefs-dump", "special.v1.cfs", cwd=files)
    assert p.returncode == 2 and "destination" in p.stderr.decode()


def test_composefs_dump_homes_links_like_upstream(files, cfsc):
    """Upstream's reader homes /aa/l (first depth-first), not /zz/f: the layout changes,
    while `cfsc compile IMAGE` reproduces the original."""
    cfsc("composefs-dump", "sample.cfs", "up.cfs", cwd=files, check=True)
    cfsc("compile", "sample.cfs", "-o", "same.cfs", cwd=files, check=True)
    original = (files / "sample.cfs").read_bytes()
    assert (files / "same.cfs").read_bytes() == original
    assert (files / "up.cfs").read_bytes() != original
    p = cfsc("composefs-info", "dump", "up.cfs", cwd=files, check=True)
    assert p.stdout == expected("dump.sample.out")  # same contents, other inode order


# -- cfsc dump ----------------------------------------------------------------------------

def test_dump_of_any_source_is_the_dump_of_its_image(files, cfsc):
    (files / "sample.dump").write_bytes(SAMPLE_DUMP)
    a = cfsc("dump", "sample.dump", "--strict", cwd=files, check=True).stdout
    b = cfsc("dump", "sample.cfs", cwd=files, check=True).stdout
    assert a == b == expected("dump.sample.out")
    cfsc("dump", "sample.cfs", "-o", "out.dump", "--filter", "zz", cwd=files, check=True)
    assert (files / "out.dump").read_bytes() == cfsc("composefs-info", "--filter=zz", "dump", "sample.cfs",
                                                     cwd=files, check=True).stdout


def test_dump_compresses_and_reads_gzipped_images(tmp_path, cfsc):
    p = cfsc("dump", str(IMAGES / "config-with-hard-link.v0.cfs.gz"), check=True)
    assert p.stdout == gzip.decompress((CONFORMANCE / "upstream-dumps" / "config-with-hard-link.v0.dump.gz").read_bytes())


def test_dump_json_lines_keep_bytes_reversibly(files, cfsc):
    p = cfsc("dump", "--json", "sample.cfs", cwd=files, check=True)
    rows = [orjson.loads(line) for line in p.stdout.splitlines()]
    paths = [get(r, "path", "row") for r in rows]
    assert b"/x\xff" in paths and b"/dir/sub/tab\tname" in paths
    by_path = dict(zip(paths, rows, strict=True))
    x = by_path[b"/x\xff"]
    assert x["path_b64"] and get(x, "content", "x") == b"a=b"
    assert [(get(a, "key", "k"), get(a, "value", "v")) for a in x["xattrs"]] == [(b"user.bin", b"\xff\x00")]
    assert get(by_path[b"/zz/f"], "hardlink", "f") == b"/aa/l"
    assert by_path[b"/dir/ext"]["digest"] == "0123456789abcdef" * 4
    assert by_path[b"/zz/w"]["type"] == "char" and by_path[b"/zz/w"]["rdev"] == 0
    assert p.stdout == cfsc("dump", "--format", "json", "sample.cfs", cwd=files, check=True).stdout


def test_dump_unknown_format(files, cfsc):
    p = cfsc("dump", "--format", "nope", "sample.cfs", cwd=files)
    assert p.returncode == 2 and "dump, json" in p.stderr.decode()


def test_compile_reencodes_an_image(files, cfsc):
    cfsc("compile", "longlink.v0.cfs", "-o", "again.cfs", "--max-version", "0", cwd=files, check=True)
    assert (files / "again.cfs").read_bytes() == (files / "longlink.v0.cfs").read_bytes()
    cfsc("compile", "special.v1.cfs", "-o", "again.cfs", cwd=files, check=True)
    assert (files / "again.cfs").read_bytes() == (files / "special.v1.cfs").read_bytes()


# -- ls, objects, info ----------------------------------------------------------------------

def test_ls(files, cfsc):
    out = cfsc("ls", "sample.cfs", cwd=files, check=True).stdout.decode("utf-8", "replace")
    lines = out.splitlines()
    assert [line.split()[-1] for line in lines if line.startswith("d")] == ["aa", "dir", "zz"]
    assert any(line.startswith("lrwxrwxrwx") and line.endswith("s -> /a\\\\b") for line in lines)
    assert not any(line.endswith(" 00") for line in lines), "the root whiteouts are hidden"
    sub = cfsc("ls", "sample.cfs", "/dir", cwd=files, check=True).stdout.decode()
    assert "drwxr-xr-x   3  1000  1000" not in sub and "ext @ ab/cdef\\x20x" in sub and "1970-01-01 00:00 sub" in sub
    one = cfsc("ls", "sample.cfs", "/zz/w", cwd=files, check=True).stdout.decode()
    assert one.startswith("crw-r--r--") and "0, 0" in one
    rec = cfsc("ls", "-R", "--json", "sample.cfs", "/zz", cwd=files, check=True).stdout.splitlines()
    assert [orjson.loads(r)["path"] for r in rec] == ["/zz/f", "/zz/p", "/zz/w"]
    p = cfsc("ls", "sample.cfs", "/dir/nope", cwd=files)
    assert p.returncode == 2 and "/dir/nope: no such file" in p.stderr.decode()


def test_objects_and_missing_objects(files, cfsc):
    p = cfsc("objects", "sample.cfs", "special.v1.cfs", cwd=files, check=True)
    assert p.stdout == b"-\nab/cdef x\n"
    rows = [orjson.loads(r) for r in cfsc("objects", "--json", "sample.cfs", cwd=files, check=True).stdout.splitlines()]
    assert rows == [{"object": "-", "size": 42}, {"object": "ab/cdef x", "size": 123, "digest": "0123456789abcdef" * 4}]
    (files / "store" / "ab").mkdir(parents=True)
    (files / "store" / "ab" / "cdef x").write_bytes(b"")
    p = cfsc("missing-objects", "sample.cfs", "--store", "store", cwd=files, check=True)
    assert p.stdout == b"-\n"
    assert cfsc("missing-objects", "sample.cfs", cwd=files).returncode == 2  # --store is required


def test_info(files, cfsc):
    facts = orjson.loads(cfsc("info", "--json", "sample.cfs", cwd=files, check=True).stdout)
    data = (files / "sample.cfs").read_bytes()
    assert facts["fsverity_digest"] == digest_bytes(data).hex()
    assert facts["size"] == len(data) and facts["format_version"] == 1
    assert facts["entries"] == {"reg": 11, "dir": 5, "symlink": 1, "block": 0, "char": 0, "fifo": 0,
                                "socket": 0, "whiteout": 1, "hardlink": 1}
    assert facts["hidden_whiteouts"] == 255 and facts["inodes"] == 255 + 18  # "aa" takes a whiteout's name
    assert (facts["files"]["external"], facts["files"]["inline"], facts["files"]["empty"]) == (6, 3, 2)
    text = cfsc("info", "sample.cfs", cwd=files, check=True).stdout.decode()
    assert f"fs-verity digest: {facts['fsverity_digest']}" in text and "format version: 1" in text


# -- fsck-store ----------------------------------------------------------------------------

def _store_and_images(tmp_path):
    """Two images over one store; objects are real fs-verity-named files."""
    contents = {name: bytes([i]) * size for i, (name, size) in
                enumerate([("trunc", 10000), ("flip", 5000), ("gone", 300), ("fine", 70000), ("nodigest", 99)])}
    store = tmp_path / "store"
    lines = [b"/ 4096 40755 2 0 0 0 0.0 - - -\n", b"/d 0 40755 2 0 0 0 0.0 - - -\n"]
    for name, data in contents.items():
        digest = digest_bytes(data)
        payload = payload_path(digest)
        obj = store / os.fsdecode(payload)
        obj.parent.mkdir(parents=True, exist_ok=True)
        obj.write_bytes(data)
        if name == "nodigest":
            payload, digest_text = b"plain/object", b"-"
            (store / "plain").mkdir()
            (store / "plain" / "object").write_bytes(data)
        else:
            digest_text = digest.hex().encode()
        lines.append(b"/d/%s %d 100644 2 0 0 0 0.0 %s - %s\n" % (name.encode(), len(data), payload, digest_text))
        contents[name] = store / os.fsdecode(payload)
    lines.append(b"/link 0 @100644 0 0 0 0 0.0 /d/flip - -\n")
    (tmp_path / "a.cfs").write_bytes(image_of(b"".join(lines)))
    (tmp_path / "b.cfs").write_bytes(image_of(lines[0] + b"/x 300 100644 1 0 0 0 0.0 " + lines[4].split(b" ")[8]
                                              + b" - " + lines[4].split(b" ")[10]))
    return store, contents


def test_fsck_store_finds_truncated_flipped_and_missing_objects(tmp_path, cfsc):
    store, objects = _store_and_images(tmp_path)
    p = cfsc("fsck-store", "a.cfs", "b.cfs", "--store", str(store), cwd=tmp_path)
    assert p.returncode == 0 and b"0 missing, 0 corrupt" in p.stdout, p.stdout
    assert b"(1 without a digest: size checked only)" in p.stdout  # /d/nodigest
    with open(objects["trunc"], "r+b") as f:
        f.truncate(4096)
    data = bytearray(objects["flip"].read_bytes())
    data[1234] ^= 0x01
    objects["flip"].write_bytes(bytes(data))
    objects["gone"].unlink()
    p = cfsc("fsck-store", "a.cfs", "b.cfs", "--store", str(store), cwd=tmp_path)
    assert p.returncode == 1, p.stderr
    out = p.stdout.decode()
    assert "size 4096, expected 10000" in out and "fs-verity digest" in out and "missing" in out
    assert "used by a.cfs:/d/trunc" in out
    assert "used by a.cfs:/d/flip" in out and "used by a.cfs:/link" in out
    assert "used by a.cfs:/d/gone" in out and "used by b.cfs:/x" in out
    assert "5 objects checked" in out and "1 missing, 2 corrupt" in out
    report = orjson.loads(cfsc("fsck-store", "--json", "a.cfs", "b.cfs", "--store", str(store), cwd=tmp_path).stdout)
    assert (report["objects"], report["missing"], report["corrupt"], report["unverified"]) == (5, 1, 2, 1)
    kinds = {p["problem"] for p in report["problems"]}
    assert kinds == {"missing", "corrupt"}
    gone = next(p for p in report["problems"] if p["problem"] == "missing")
    assert {(u["image"], u["path"]) for u in gone["users"]} == {("a.cfs", "/d/gone"), ("b.cfs", "/x")}


def test_fsck_store_bad_input(tmp_path, cfsc):
    store, _objects = _store_and_images(tmp_path)
    assert cfsc("fsck-store", "a.cfs", "--store", str(tmp_path / "nope"), cwd=tmp_path).returncode == 2
    (tmp_path / "junk.cfs").write_bytes(b"junk" * 2000)
    assert cfsc("fsck-store", "junk.cfs", "--store", str(store), cwd=tmp_path).returncode == 2
    evil = image_of(b"/ 4096 40755 2 0 0 0 0.0 - - -\n/e 5 100644 1 0 0 0 0.0 ../../etc/passwd - -\n")
    (tmp_path / "evil.cfs").write_bytes(evil)
    p = cfsc("fsck-store", "evil.cfs", "--store", str(store), cwd=tmp_path)
    assert p.returncode == 1 and b"invalid ../../etc/passwd: the path leaves the store" in p.stdout
    # A fan-out directory that is a symlink out of the store: refused, the outside never read.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "obj").write_bytes(b"secret")
    (store / "zz").symlink_to(outside)
    sneaky = image_of(b"/ 4096 40755 2 0 0 0 0.0 - - -\n/e 6 100644 1 0 0 0 0.0 zz/obj - " + b"00" * 32 + b"\n")
    (tmp_path / "sneaky.cfs").write_bytes(sneaky)
    p = cfsc("fsck-store", "sneaky.cfs", "--store", str(store), cwd=tmp_path)
    assert p.returncode == 1 and b"invalid zz/obj: the path leaves the store" in p.stdout, p.stdout
    assert b"fs-verity digest" not in p.stdout
    (store / "yy").write_bytes(b"a file where a fan-out directory belongs")
    (tmp_path / "file.cfs").write_bytes(image_of(b"/ 4096 40755 2 0 0 0 0.0 - - -\n/e 6 100644 1 0 0 0 0.0 yy/obj - -\n"))
    p = cfsc("fsck-store", "file.cfs", "--store", str(store), cwd=tmp_path)
    assert p.returncode == 1 and b"missing yy/obj: a parent is not a directory" in p.stdout, p.stdout


def test_dump_of_special_conformance_input(cfsc, tmp_path):
    src = tmp_path / "special.dump"
    src.write_bytes(read_input("special.dump"))
    p = cfsc("dump", str(src), "--max-version", "0", check=True)
    assert p.stdout == (CONFORMANCE / "upstream-dumps" / "special.v0.dump").read_bytes()
