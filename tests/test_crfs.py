"""CRFS / stargz TOC JSON: the frontend, the `crfs` backend and the published schemas.

Golden TOCs in `tests/data/crfs/` come with a hand-written dumpfile of the tree they mean;
the TOC and the dumpfile must compile to the same image bytes.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json

import jsonschema
import orjson
import pytest
import zstandard
from cfsc import schemas
from cfsc.base.errors import InputError, InputErrors
from cfsc.base.fsverity import digest_file
from cfsc.base.options import Options
from cfsc.build import compile_tree, write
from cfsc.frontends import dumpfile
from cfsc.frontends.crfs import slices as jsonslices
from cfsc.frontends.crfs import toc as crfs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.data import CONFORMANCE, DATA, cases, image_of, read_input
from tests.helpers.strategies import trees

GOLDEN = DATA / "crfs"
LEGACY = CONFORMANCE / "crfs-legacy"
SPECIAL_SHA256 = (LEGACY / "special.json.sha256").read_text().split()[0]
GOOD_DUMPS = [c["input"] for c in cases() if c.get("expect") != "error"]
HEX = "7c9bbe5ec9b3fb774e8fa0f54247e93c34ddf8e5d16fe3073420de0ae81a262d"


def image(tree, **options) -> bytes:
    return compile_tree(tree, Options(**options))


def toc_of(tree) -> bytes:
    out = io.BytesIO()
    write(tree, "crfs", out)
    return out.getvalue()


def toc(*entries, **top) -> bytes:
    return json.dumps({"version": 1, "entries": list(entries), **top}, ensure_ascii=False).encode()


def _one_by_one(self, entries, source, first):
    for i, entry in enumerate(entries):
        self.one(entry, source, first + i)


@contextlib.contextmanager
def reference_path():
    """Every entry through `apply` (the reference) instead of the column-checked batches."""
    saved = crfs._Builder.batch
    crfs._Builder.batch = _one_by_one
    try:
        yield
    finally:
        crfs._Builder.batch = saved


def errors_of(data: bytes) -> list[str]:
    with pytest.raises(InputError) as info:
        crfs.loads(data, Options(), "t.json")
    return str(info.value).splitlines()


# -- what the legacy tool made ---------------------------------------------------------------

def test_special_json_compiles_to_the_legacy_digest(cfsc, tmp_path):
    """The old `composefs-from-json --out IMAGE FILE` shape, from a file and from stdin."""
    out = tmp_path / "special.cfs"
    cfsc("compile", "--from", "crfs", "--out", str(out), "--max-version", "0", str(LEGACY / "special.json"), check=True)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == SPECIAL_SHA256
    p = cfsc("compile", "--out", "-", "--max-version", "0", "-", input=(LEGACY / "special.json").read_bytes(), check=True)
    assert hashlib.sha256(p.stdout).hexdigest() == SPECIAL_SHA256  # detected without --from


def test_special_json_means_special_dump():
    tree = crfs.load(str(LEGACY / "special.json"))
    for version in (0, 1):
        assert image(tree.copy(), min_version=version, max_version=version) == \
            image_of(read_input("special.dump"), min_version=version, max_version=version)


# -- golden TOCs -----------------------------------------------------------------------------

GOLDENS = [("basic.dump", ["basic.json"]), ("links.dump", ["links.json"]), ("bytes.dump", ["bytes.json"]),
           ("layers.dump", ["layer-1.json", "layer-2.json"])]


@pytest.mark.parametrize("dump, tocs", GOLDENS, ids=[g[0] for g in GOLDENS])
def test_golden_toc_means_its_dumpfile(dump, tocs):
    expected = image_of((GOLDEN / dump).read_bytes())
    sources = [str(GOLDEN / t) for t in tocs]
    assert image(crfs.load_many(sources)) == expected
    with reference_path():
        assert image(crfs.load_many(sources)) == expected
    for name in tocs:  # every golden TOC is valid against the published schema
        assert schemas.problems("crfs-toc", json.loads((GOLDEN / name).read_text())) == []


def test_several_tocs_on_the_command_line(cfsc, tmp_path):
    out = tmp_path / "layers.cfs"
    cfsc("compile", "--from", "crfs", "--out", str(out), str(GOLDEN / "layer-1.json"), str(GOLDEN / "layer-2.json"),
         check=True)
    assert out.read_bytes() == image_of((GOLDEN / "layers.dump").read_bytes())


def test_modtime_keeps_nanoseconds_and_offsets():
    tree = crfs.loads(toc({"type": "dir", "name": "/", "modtime": "2023-01-02T04:04:05.5+01:00"},
                          {"type": "reg", "name": "a", "modtime": "1969-12-31T23:59:59.999999999Z"},
                          {"type": "reg", "name": "b", "modtime": "0001-01-01T00:00:00Z"},
                          {"type": "reg", "name": "c", "x-mtime": [-(2**40), 7]}))
    assert (tree.root.mtime, tree.root.mtime_nsec) == (1672628645, 500_000_000)
    assert [(n.mtime, n.mtime_nsec) for n in (tree.lookup(b"a"), tree.lookup(b"b"), tree.lookup(b"c"))] == \
        [(-1, 999_999_999), (0, 0), (-(2**40), 7)]


def test_payload_dir_gives_fs_verity_digests(cfsc, tmp_path):
    store = tmp_path / "store"
    (store / "ab").mkdir(parents=True)
    data = b"x" * 10000
    (store / "ab" / "cdef").write_bytes(data)
    source = tmp_path / "t.json"
    source.write_bytes(toc({"type": "reg", "name": "present", "size": len(data), "x-payload": "ab/cdef"},
                           {"type": "reg", "name": "missing", "size": 5, "x-payload": "ab/none"}))
    out = tmp_path / "out.cfs"
    cfsc("compile", "--payload-dir", str(store), str(source), "-o", str(out), check=True)
    digest = digest_file(store / "ab" / "cdef").hex().encode()
    assert out.read_bytes() == image_of(b"/ 0 40755 2 0 0 0 0.0 - - -\n"
                                        b"/missing 5 100000 1 0 0 0 0.0 ab/none - -\n"
                                        b"/present 10000 100000 1 0 0 0 0.0 ab/cdef - " + digest + b"\n")
    source.write_bytes(toc({"type": "reg", "name": "present", "size": 3, "x-payload": "ab/cdef"}))
    p = cfsc("compile", "--payload-dir", str(store), str(source), "-o", str(out))
    assert p.returncode == 2 and b"has 10000 bytes but the TOC says 3" in p.stderr


def test_payload_dir_payloads_stay_beneath_it(cfsc, tmp_path):
    """Payloads are opened confined to --payload-dir, as the FUSE server opens them: a directory,
    `..`, an absolute path out or a symlink is a one-line error naming the file in the tree."""
    store = tmp_path / "store"
    (store / "ab").mkdir(parents=True)
    (store / "ab" / "cdef").write_bytes(b"0123456789")
    (store / "dd" / "x").mkdir(parents=True)
    (tmp_path / "outside.bin").write_bytes(b"0123456789")
    (store / "ln").symlink_to("ab/cdef")
    source = tmp_path / "t.json"
    out = tmp_path / "out.cfs"
    for payload, message in [("dd/x", "object dd/x is not a regular file"),
                             ("../outside.bin", "object ../outside.bin leads outside the store"),
                             ("ab/../../outside.bin", "object ab/../../outside.bin leads outside the store"),
                             ("ln", "object ln leads outside the store")]:
        source.write_bytes(toc({"type": "reg", "name": "d/f", "size": 10, "x-payload": payload}))
        p = cfsc("compile", "--payload-dir", str(store), str(source), "-o", str(out))
        lines = p.stderr.decode().splitlines()
        assert p.returncode == 2 and not out.exists() and len(lines) == 1, p.stderr
        assert lines[0].startswith(f"error: {source}:/d/f: {message}"), lines
    # An absolute payload is relative to the store (overlayfs' redirect is absolute in it).
    source.write_bytes(toc({"type": "reg", "name": "f", "size": 10, "x-payload": "/ab/cdef"}))
    cfsc("compile", "--payload-dir", str(store), str(source), "-o", str(out), check=True)
    assert crfs.load(str(source), Options(payload_dir=str(store))).lookup(b"f").digest == digest_file(store / "ab" / "cdef")


def test_new_data_drops_an_earlier_fs_verity_digest(cfsc, tmp_path):
    """A later entry (here in a later TOC) that changes the payload, size or inline content
    drops the fs-verity digest an earlier one gave, so --payload-dir measures the new payload;
    repeating the same data keeps it, and a digest given with the new data wins."""
    store = tmp_path / "store"
    (store / "12").mkdir(parents=True)
    (store / "12" / "34abcd").write_bytes(b"y" * 20)
    first = {"type": "reg", "name": "f", "size": 10, "x-payload": "ab/cdef", "x-fsverity-digest": "sha256:" + HEX}
    (tmp_path / "a.json").write_bytes(toc(first))
    later = {
        "payload": ({"type": "reg", "name": "f", "size": 10, "x-payload": "ab/other"}, None),
        "digest": ({"type": "reg", "name": "f", "digest": "sha256:1234abcd", "size": 20}, None),
        "size": ({"type": "reg", "name": "f", "size": 11}, None),
        "content": ({"type": "reg", "name": "f", "x-content": "aGk="}, None),
        "chunk": ({"type": "chunk", "name": "f", "chunkOffset": 10, "chunkSize": 5}, None),
        "same": ({"type": "reg", "name": "f", "size": 10, "x-payload": "ab/cdef", "mode": 0o600}, HEX),
        "given": ({"type": "reg", "name": "f", "size": 11, "x-fsverity-digest": "sha256:" + "0" * 64}, "0" * 64),
    }
    for what, (entry, kept) in later.items():
        (tmp_path / "b.json").write_bytes(toc(entry))
        tree = crfs.load_many([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
        digest = tree.lookup(b"f").digest
        assert (digest.hex() if digest else None) == kept, what
    (tmp_path / "b.json").write_bytes(toc(later["digest"][0]))
    out = tmp_path / "out.cfs"
    cfsc("compile", "--from", "crfs", "--payload-dir", str(store), str(tmp_path / "a.json"), str(tmp_path / "b.json"),
         "-o", str(out), check=True)
    digest = digest_file(store / "12" / "34abcd").hex().encode()
    assert out.read_bytes() == image_of(b"/ 0 40755 2 0 0 0 0.0 - - -\n/f 20 100000 1 0 0 0 0.0 12/34abcd - " + digest + b"\n")


def test_a_later_entry_replaces_a_hard_link_name():
    """`b` made by a hardlink entry, then given by a `reg` entry: `b` gets an inode of its own
    (as tar extraction does) and `a` keeps its data.  An update under `a`, the target's own
    name, still shows under both names (the legacy rule)."""
    a = {"type": "reg", "name": "a", "size": 5, "x-payload": "ab/cdef", "mode": 0o644}
    link = {"type": "hardlink", "name": "b", "linkName": "a"}
    expected = image_of(b"/ 0 40755 2 0 0 0 0.0 - - -\n/a 5 100644 1 0 0 0 0.0 ab/cdef - -\n"
                        b"/b 20 100000 1 0 0 0 0.0 - - -\n")
    for entries in ([a, link, {"type": "reg", "name": "b", "size": 20}],
                    [a, link, {"type": "hardlink", "name": "b", "linkName": "a"}, {"type": "reg", "name": "./b", "size": 20}]):
        for context in (contextlib.nullcontext, reference_path):
            with context():
                assert image(crfs.loads(toc(*entries))) == expected
    shared = image_of(b"/ 0 40755 2 0 0 0 0.0 - - -\n/a 20 100600 2 0 0 0 0.0 ab/cdef - -\n/b 20 @100600 - - - - 0.0 /a - -\n")
    assert image(crfs.loads(toc(a, link, {"type": "reg", "name": "a", "size": 20, "mode": 0o600}))) == shared


def test_payload_dir_reaches_an_inode_only_links_name(tmp_path):
    """`a` then `hardlink b→a`, then `a` becomes a symlink: the file lives on under `b` alone,
    and --payload-dir still measures it."""
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "cdef").write_bytes(b"0123456789")
    tree = crfs.loads(toc({"type": "reg", "name": "a", "size": 10, "x-payload": "ab/cdef"},
                          {"type": "hardlink", "name": "b", "linkName": "a"},
                          {"type": "symlink", "name": "a", "linkName": "t"}), Options(payload_dir=str(tmp_path)))
    assert tree.lookup(b"b").digest == digest_file(tmp_path / "ab" / "cdef")


def test_errors_before_invalid_json_in_a_later_file_are_kept(tmp_path):
    (tmp_path / "a.json").write_bytes(toc({"type": "reg", "name": "a", "mode": "644"},
                                          {"type": "reg", "name": "b", "uid": -1}))
    (tmp_path / "b.json").write_bytes(b'{"entries": [\n{"type": ')
    (tmp_path / "c.json").write_bytes(toc({"type": "reg", "name": "c", "gid": -1}))
    with pytest.raises(InputErrors) as info:
        crfs.load_many([str(tmp_path / n) for n in ("a.json", "b.json", "c.json")])
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert [line.split(": ", 2)[:2] for line in info.value.lines] == \
        [[f"{a}", "entries[0].mode"], [f"{a}", "entries[1].uid"], [f"{b}:2:10", "invalid JSON"]]
    # Past the limit, the line that stopped the reading is still shown.
    (tmp_path / "a.json").write_bytes(toc(*[{"type": "reg", "name": f"f{i}", "uid": -1} for i in range(30)]))
    with pytest.raises(InputErrors) as info:
        crfs.load_many([str(a), str(b)])
    assert len(info.value.lines) == crfs.MAX_ERRORS + 1 and info.value.total == 31
    assert info.value.lines[-1].startswith(f"{b}:2:10: invalid JSON")
    assert str(info.value).endswith("\n… and 10 more")


# -- round trips through the crfs backend ------------------------------------------------------

@pytest.mark.parametrize("name", GOOD_DUMPS)
def test_dumpfile_to_toc_to_image(name):
    """dump → TOC → image is dump → image, in both format versions."""
    data = read_input(name)
    text = toc_of(dumpfile.loads(data, Options()))
    assert schemas.problems("crfs-toc", orjson.loads(text)) == []
    for version in (0, 1):
        assert image(crfs.loads(text), min_version=version, max_version=version) == \
            image_of(data, min_version=version, max_version=version)


@pytest.mark.parametrize("name", ["special.dump", "config-with-hard-link.dump.gz", "longlink.dump"])
def test_dump_format_crfs_command(name, cfsc, tmp_path):
    source = tmp_path / name
    source.write_bytes((CONFORMANCE / "upstream" / name).read_bytes())
    p = cfsc("dump", "--format", "crfs", str(source), check=True)
    (tmp_path / "toc.json").write_bytes(p.stdout)
    cfsc("compile", str(tmp_path / "toc.json"), "-o", str(tmp_path / "again.cfs"), check=True)
    cfsc("compile", str(source), "-o", str(tmp_path / "direct.cfs"), check=True)
    assert (tmp_path / "again.cfs").read_bytes() == (tmp_path / "direct.cfs").read_bytes()


def test_image_to_toc_to_the_same_image(cfsc, tmp_path):
    """An image libcomposefs wrote, through `cfsc dump --format crfs`, compiles back to itself."""
    original = gzip.decompress((CONFORMANCE / "upstream-images" / "config-with-hard-link.v1.cfs.gz").read_bytes())
    (tmp_path / "in.cfs").write_bytes(original)
    cfsc("dump", "--format", "crfs", str(tmp_path / "in.cfs"), "-o", str(tmp_path / "toc.json"), check=True)
    cfsc("compile", "--min-version", "1", str(tmp_path / "toc.json"), "-o", str(tmp_path / "out.cfs"), check=True)
    assert (tmp_path / "out.cfs").read_bytes() == original


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(trees())
def test_any_tree_round_trips(tree):
    try:
        expected = image(tree.copy())
    except InputError:
        return  # a tree the compiler rejects (xattr budget): nothing to compare
    text = toc_of(tree.copy())
    assert image(crfs.loads(text)) == expected
    with reference_path():
        assert image(crfs.loads(text)) == expected


# -- schemas -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", schemas.names())
def test_every_schema_is_a_valid_schema(name):
    schema = schemas.load(name)
    jsonschema.validators.validator_for(schema).check_schema(schema)
    assert schema["$id"] == schemas.ID_PREFIX + name and schema.get("title")


def test_the_entry_types_are_the_schemas():
    """Reader and writer take entry types from `cfsc.backends.crfs_format`; the schema lists them."""
    from cfsc.backends.crfs_format import TYPE_NAMES, TYPES

    enum = schemas.load("crfs-toc")["$defs"]["entry"]["properties"]["type"]["enum"]
    assert sorted(TYPES) == sorted(enum)
    assert all(TYPES[name] == bits for bits, name in TYPE_NAMES.items())


def test_schema_command(cfsc):
    listed = cfsc("schema", "--list", check=True).stdout.decode()
    assert [line.split("\t")[0] for line in listed.splitlines()] == schemas.names()
    assert cfsc("schema", "crfs-toc", check=True).stdout == schemas.text("crfs-toc").encode()
    p = cfsc("schema", "no-such-schema")
    assert p.returncode == 2 and b"crfs-toc" in p.stderr


# -- errors ------------------------------------------------------------------------------------

BAD_ENTRIES = [
    ("mode-string", [{"type": "reg", "name": "a", "mode": "644"}], "entries[0].mode: expected an integer"),
    ("missing-name", [{"type": "reg"}], "entries[0].name: missing: required for type reg"),
    ("bad-base64-xattr", [{"type": "reg", "name": "a", "xattrs": {"user.a": "!!"}}],
     'entries[0].xattrs["user.a"]: expected standard base64'),
    ("bad-base64-content", [{"type": "reg", "name": "a", "x-content": "a"}], "entries[0].x-content: expected standard base64"),
    ("bad-base64-twin", [{"type": "reg", "name": "a", "x-name-b64": "###"}], "entries[0].x-name-b64: expected standard base64"),
    ("unknown-type", [{"type": "bogus", "name": "a"}], "entries[0].type: expected one of dir, reg"),
    ("hardlink-missing", [{"type": "reg", "name": "a"}, {"type": "hardlink", "name": "b", "linkName": "nope"}],
     "entries[1].linkName: hard link target 'nope' does not exist"),
    ("hardlink-later", [{"type": "hardlink", "name": "b", "linkName": "a"}, {"type": "reg", "name": "a"}],
     "entries[0].linkName: hard link target 'a' does not exist"),
    ("hardlink-dir", [{"type": "dir", "name": "d"}, {"type": "hardlink", "name": "b", "linkName": "d"}],
     "entries[1].linkName: hard link target 'd' is a directory"),
    ("mode-type-bits", [{"type": "reg", "name": "a", "mode": 0o40755}], "entries[0].mode: file type bits 040000 contradict"),
    ("dotdot", [{"type": "reg", "name": "a/../../etc"}], "entries[0].name: '..' is not allowed"),
    ("dotdot-link", [{"type": "reg", "name": "a"}, {"type": "hardlink", "name": "b", "linkName": "../a"}],
     "entries[1].linkName: '..' is not allowed"),
    ("unknown-extension", [{"type": "reg", "name": "a", "x-paylod": "x"}], "entries[0].x-paylod: unknown key"),
    ("symlink-target", [{"type": "symlink", "name": "a"}], "entries[0].linkName: missing: required for type symlink"),
    ("bad-date", [{"type": "reg", "name": "a", "modtime": "2021-02-30T00:00:00Z"}], "entries[0].modtime: expected an RFC 3339"),
    ("null", [{"type": "reg", "name": "a", "uid": None}], "entries[0].uid: expected an integer from 0 to 4294967295, got null"),
    ("not-an-object", ["foo"], 'entries[0]: expected object, got a string "foo"'),
    ("long-name", [{"type": "reg", "name": "x" * 300}], "entries[0].name: file name of 300 bytes"),
    ("below-a-file", [{"type": "reg", "name": "f"}, {"type": "reg", "name": "f/x"}], "entries[1].name: 'f' is not a directory"),
    ("busy-dir", [{"type": "reg", "name": "d/x"}, {"type": "reg", "name": "d"}], "entries[1].type: the path is a directory with entries"),
    ("root-type", [{"type": "reg", "name": "./"}], "entries[0].type: the root must be a directory"),
    ("lost-chunk", [{"type": "chunk", "name": "nope"}], "entries[0].name: a chunk must belong to an earlier regular file"),
    ("empty-xattr-key", [{"type": "reg", "name": "a", "xattrs": {"": "YQ=="}}], 'entries[0].xattrs[""]: xattr key of 0 bytes'),
    ("content-on-dir", [{"type": "dir", "name": "a", "x-content": "YQ=="}], "entries[0].x-content: only regular files"),
    ("content-too-big", [{"type": "reg", "name": "a", "x-content": "YWFh" * 1667}], "entries[0].x-content: inline content of 5001 bytes"),
    ("device-number", [{"type": "char", "name": "a", "devMajor": 4096}], "entries[0].devMajor: expected an integer from 0 to 4095"),
    ("digest", [{"type": "reg", "name": "a", "digest": "sha256:ABCD"}], "entries[0].digest: expected a content digest"),
    ("fraction", [{"type": "reg", "name": "a", "size": 1.5}], "entries[0].size: expected an integer"),
    # A base64 twin holds the bytes, but the readable stand-in is typed all the same.
    ("twin-name-type", [{"type": "reg", "name": 5, "x-name-b64": "YQ=="}], "entries[0].name: expected string, got 5"),
    ("twin-payload-type", [{"type": "reg", "name": "a", "x-payload": 5, "x-payload-b64": "YQ=="}],
     "entries[0].x-payload: expected string, got 5"),
    ("twin-link-alone", [{"type": "reg", "name": "a", "x-linkName-b64": "YQ=="}],
     "entries[0].linkName: missing: required with x-linkName-b64"),
]


@pytest.mark.parametrize("entries, message", [b[1:] for b in BAD_ENTRIES], ids=[b[0] for b in BAD_ENTRIES])
def test_invalid_entry_is_located(entries, message):
    lines = errors_of(toc(*entries))
    assert len(lines) == 1 and lines[0].startswith(f"t.json: {message}"), lines
    with reference_path():
        assert errors_of(toc(*entries)) == lines


@pytest.mark.parametrize("data, message", [
    (b"[]", 't.json: expected a JSON object with "entries", got an array'),
    (b'{"version": 2, "entries": []}', "t.json: version: expected 1, got 2"),
    (b'{"entries": 5}', "t.json: entries: expected array, got 5"),
    (b'{"version": 1}', "t.json: entries: missing: required"),
    (b'{"entries": [\n  {"type": "dir", "name": "/"},\n  {"type": ', "t.json:3:12: invalid JSON: unexpected end of data"),
])
def test_invalid_document_is_located(data, message):
    lines = errors_of(data)
    assert len(lines) == 1 and lines[0].startswith(message), lines


def test_every_bad_entry_is_reported_up_to_a_limit(cfsc, tmp_path):
    entries = [{"type": "reg", "name": f"f{i}", "mode": -i - 1} for i in range(25)]
    entries.insert(3, {"type": "reg", "name": "fine"})
    source = tmp_path / "t.json"
    source.write_bytes(toc(*entries))
    out = tmp_path / "out.cfs"
    p = cfsc("compile", "--from", "crfs", str(source), "-o", str(out))
    lines = p.stderr.decode().splitlines()
    assert p.returncode == 2 and not out.exists() and list(tmp_path.iterdir()) == [source]
    assert len(lines) == crfs.MAX_ERRORS + 1 and all(line.startswith("error: ") for line in lines)
    assert lines[0] == f"error: {source}: entries[0].mode: expected an integer from 0 to 65535 (permission bits," \
                       " optionally with file-type bits), got -1"
    assert lines[3].startswith(f"error: {source}: entries[4].mode")  # entries[3] is fine
    assert lines[-1] == "error: … and 5 more"


# -- code and schema agree -------------------------------------------------------------------

ints = st.one_of(st.integers(-3, 70000), st.integers(2**31, 2**65), st.floats(-10, 10, allow_nan=False))
texts = st.one_of(st.sampled_from(["", "a", "./d/", "x/../y", "é"]), st.integers(0, 3))
VALUES = {
    "type": st.sampled_from(["dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "socket", "chunk", "sock", 5]),
    "name": texts,
    "linkName": texts,
    "mode": st.one_of(ints, st.sampled_from([0o100644, 0o40755, 0o120777, 0o20000])),
    "uid": st.one_of(ints, st.none()),
    "gid": ints,
    "size": ints,
    "devMajor": ints,
    "devMinor": ints,
    "modtime": st.sampled_from(["2021-10-11T13:06:16+02:00", "2021-10-11T13:06:16.123456789Z", "2021-10-11 13:06:16Z",
                                "2021-10-11T13:06:16.1234567891Z", "2021-13-11T13:06:16Z", "", 0]),
    "xattrs": st.one_of(st.dictionaries(st.sampled_from(["user.a", "trusted.overlay.x", "", "user.b"]),
                                        st.sampled_from(["YQ==", "YQ", "YQ=", "Y", "!!", "", 1])), st.just([])),
    "digest": st.sampled_from(["sha256:" + HEX, "sha512:00ff", "sha256:" + HEX.upper(), "sha256:", HEX, 7]),
    "x-payload": texts,
    "x-content": st.sampled_from(["aGk=", "aGk", "a", "", "YWFh" * 1667, 3]),
    "x-fsverity-digest": st.sampled_from(["sha256:" + HEX, HEX, "sha256:" + HEX[:-1], None]),
    "x-mtime": st.sampled_from([[1, 2], [1], [-5, 0], [1, -1], [2**63, 0], "1.2"]),
    "x-nlink": ints,
    "x-name-b64": st.sampled_from(["YQ==", "####", 4]),
    "x-linkName-b64": st.sampled_from(["YQ==", "####", 4]),
    "x-payload-b64": st.sampled_from(["YWIvY2Q=", "####", 4]),
    "x-xattrs-b64": st.sampled_from([{"dXNlci7/": "dg=="}, {"###": "dg=="}, {"dXNlci7/": "#"}, []]),
    "chunkOffset": ints,
    "chunkSize": ints,
    "offset": st.one_of(st.integers(), st.text(max_size=3)),
    "userName": st.one_of(st.text(max_size=3), st.integers()),
    "x-unknown": st.just(1),
    "other": st.just({"any": "thing"}),
}
entries = st.fixed_dictionaries({}, optional=VALUES)
# Valid entries that the code accepts after `base` and `d` (test_bases_are_valid): with one key
# changed, a schema error can only come from that key, so the code must find it alone.
BASES = [
    {"type": "reg", "name": "f", "size": 3, "digest": "sha256:" + HEX, "mode": 0o644, "uid": 1, "gid": 2,
     "modtime": "2021-10-11T13:06:16Z", "xattrs": {"user.a": "YQ=="}},
    {"type": "reg", "name": "g", "x-name-b64": "Zw==", "x-payload": "ab/cd", "x-payload-b64": "YWIvY2Q=", "size": 2,
     "x-fsverity-digest": "sha256:" + HEX, "x-mtime": [1, 2], "x-nlink": 1},
    {"type": "reg", "name": "i", "x-content": "aGk="},
    {"type": "symlink", "name": "s", "linkName": "t", "x-linkName-b64": "dA=="},
    {"type": "hardlink", "name": "h", "linkName": "base"},
    {"type": "char", "name": "c", "devMajor": 1, "devMinor": 3},
    {"type": "chunk", "name": "base", "chunkOffset": 0, "chunkSize": 5},
    {"type": "dir", "name": "e", "xattrs": {"user.b": "YQ=="}, "x-xattrs-b64": {"dXNlci7/": "dg=="}},
]
one_key_changed = st.tuples(st.sampled_from(BASES), st.sampled_from(sorted(VALUES))).flatmap(
    lambda base_key: VALUES[base_key[1]].map(lambda value: {**base_key[0], base_key[1]: value}))


def test_bases_are_valid():
    data = toc({"type": "reg", "name": "base"}, {"type": "dir", "name": "d"}, *BASES)
    assert schemas.problems("crfs-toc", orjson.loads(data)) == []
    for context in (contextlib.nullcontext, reference_path):
        with context():
            image(crfs.loads(data, Options(), "t.json"))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(entries, one_key_changed), min_size=1, max_size=4))
def test_code_rejects_what_the_schema_rejects(items):
    """The checks in code (fast batches and the reference) refuse everything the schema
    refuses, and both paths give the same verdict and the same tree.  Entries are random
    key sets, or a valid entry with one key changed: that key alone must be found."""
    data = toc({"type": "reg", "name": "base"}, {"type": "dir", "name": "d"}, *items)
    invalid = [i for i, e in enumerate(items) if schemas.problems("crfs-toc", e, definition="entry")]
    results = []
    for context in (contextlib.nullcontext, reference_path):
        with context():
            try:
                results.append(image(crfs.loads(data, Options(), "t.json")))
            except InputErrors as e:
                results.append(e.lines)
                for i in invalid:
                    if e.total == len(e.lines):  # not cut at MAX_ERRORS
                        assert any(line.startswith(f"t.json: entries[{i + 2}]") for line in e.lines), (i, e.lines)
            except InputError as e:  # a tree the compiler refuses (e.g. an xattr budget)
                results.append(str(e))
        if invalid:
            assert not isinstance(results[-1], bytes)
    assert results[0] == results[1]


# -- reading the JSON in slices --------------------------------------------------------------

def test_slices_agree_with_one_parse(monkeypatch):
    """Cuts at `},{` that fall inside strings, odd layouts and keys after the entries array
    all give what parsing the whole document gives."""
    tricky = ['a"},{"b', "},{", 'x\\"},{\\"', "}}, {{", "entries\": ["]
    entries = [{"type": "dir", "name": "/"}] + [
        {"type": "reg", "name": f"f{i}-{tricky[i % len(tricky)]}", "mode": 420, "xattrs": {"user.v": "fSx7"}}
        for i in range(60)]
    layouts = [
        toc(*entries),
        json.dumps({"version": 1, "entries": entries}, indent="\t").encode(),
        json.dumps({"entries": entries, "tarSplitDigest": "sha256:x", "extra": [{"a": 1}, {"b": 2}]}).encode(),
        json.dumps({"notes": {"entries": [{"x": 1}]}, "entries": entries}).encode(),
        json.dumps({"entries": entries, "entries2": []}).encode(),
    ]
    expected = image(crfs.loads(layouts[0]))
    monkeypatch.setattr(jsonslices, "SLICE_BYTES", 64)
    for data in layouts:
        assert image(crfs.loads(data)) == expected
    bad = layouts[0][:-200] + b"]]]"
    assert errors_of(bad)[0].startswith("t.json:1:")
    for junk in (b"\v", b"\f"):  # white space to a regex, not to JSON: refused at any slice size
        for bad in (layouts[0].replace(b"}, {", b"}," + junk + b"{", 1),
                    layouts[0].replace(b'"entries": [', b'"entries":' + junk + b"[", 1)):
            assert bad != layouts[0]
            assert "invalid JSON" in errors_of(bad)[0], junk


def test_sniff_claims_tocs_only():
    assert crfs.sniff((LEGACY / "special.json").read_bytes()[:4096])
    assert crfs.sniff(toc_of(dumpfile.loads(read_input("special.dump")))[:4096])
    for other in [b'{"entries": 5}', b'{"a": {"entries": [{"type": "reg"}]}}', b'[{"type": "reg"}]',
                  b'{"version": 1, "entries": [{"path": "/a", "kind": "file"}]}',
                  b'{"path":"/","type":"dir","mode":16877}\n', schemas.text("crfs-toc").encode()[:4096]]:
        assert not crfs.sniff(other), other


# -- hostile documents (issue #13) -------------------------------------------------------------

DUPLICATES = [
    # orjson keeps the last value, other readers the first: every one is an error, with its path.
    (b'{"entries":[{"type":"dir","name":"/"},{"type":"reg","name":"a","name":"b"}]}', ["entries[1].name"]),
    (b'{"entries":[{"type":"reg","name":"a","xattrs":{"user.a":"YQ==","user.a":"Yg=="}}]}',
     ['entries[0].xattrs["user.a"]']),
    (b'{"entries":[{"type":"reg","na\\u006de":"a","name":"b"}]}', ["entries[0].name"]),  # one key, two spellings
    (b'{"version":1,"version":1,"entries":[{"type":"reg","name":"a"}]}', ["version"]),
    (b'{"entries":[{"type":"reg","name":"a"}],"x":{"y":[{"z":1,"z":1}]}}', ["x.y[0].z"]),
    (b'{"entries":[{"type":"reg","name":"a"}],"entries":[]}', ["entries"]),
    (b'{"entries":[],"entries":[{"type":"reg","name":"a"}]}', ["entries"]),
    (b'{"entries":[{"type":"reg","name":"a","mode":"x"},{"type":"reg","name":"a","type":"dir"}],"v":1,"v":2}',
     ["entries[0].mode", "entries[1].type", "v"]),
]


def located(lines: list[str]) -> list[str]:
    return [line.split(": ")[1] for line in lines]


@pytest.mark.parametrize("data, paths", DUPLICATES)
def test_duplicate_keys_are_errors_with_their_path(data, paths, monkeypatch):
    """Small or sliced (the finding: a 16 MB TOC with `entries` twice took its first slices
    from the first array and the rest from the second), the same lines."""
    lines = errors_of(data)
    assert located(lines) == paths, lines
    assert all("duplicate key: a JSON object may give a key once" in line for line in lines if "mode" not in line)
    monkeypatch.setattr(jsonslices, "SLICE_BYTES", 16)
    assert errors_of(data) == lines


def test_entries_twice_in_a_big_toc(tmp_path):
    entries = [{"type": "reg", "name": f"{p}{i}", "size": 0, "pad": "p" * 2000} for p in "ab" for i in range(4000)]
    first, second = (json.dumps(entries[k * 4000:(k + 1) * 4000]) for k in range(2))
    path = tmp_path / "t.json"
    path.write_text(f'{{"version":1,"entries":{first},"entries":{second}}}')
    assert path.stat().st_size > 3 * jsonslices.SLICE_BYTES
    with pytest.raises(InputErrors) as info:
        crfs.load(str(path))
    assert info.value.lines == [f"{path}: entries: duplicate key: a JSON object may give a key once (readers"
                                " disagree on which value counts)"]


def test_escaped_colons_are_not_duplicates():
    """A colon inside a string written as an escape does not fool the colon count."""
    tree = crfs.loads(b'{"entries":[{"type":"reg","name":"a\\u003ab\\u003A","x-content":"eA=="}]}')
    assert tree.lookup(b"a:b:").content == b"x"


class CountingSearch:
    """`_BOUNDARY` with the bytes each search starts before the end of the buffer counted."""

    def __init__(self, pattern) -> None:
        self.pattern = pattern
        self.scanned = 0

    def search(self, data, start):
        self.scanned += max(len(data) - start, 0)
        return self.pattern.search(data, start)


def test_white_space_inside_entries_is_read_in_linear_time_and_bounded(monkeypatch, tmp_path):
    """The finding: 38 KB of .json.zst (white space inside `entries`) took 256 s and 3.7 GB,
    joining and searching all that was read on every 4 MiB step.  Now each byte is searched a
    bounded number of times, and no more than ENTRY_MAX is held: an input that never ends is
    refused, and so is the compressed file."""
    counting = CountingSearch(jsonslices._BOUNDARY)
    monkeypatch.setattr(jsonslices, "_BOUNDARY", counting)
    read = 0

    def endless():
        nonlocal read
        yield b'{"version":1,"entries":[{"type":"dir","name":"/"},'
        while True:
            read += 1 << 20
            yield b" " * (1 << 20)

    slicer = jsonslices.EntrySlices(endless())
    with pytest.raises(jsonslices.Oversized) as info:
        list(slicer)
    assert info.value.index == 0
    assert read <= jsonslices.ENTRY_MAX + 3 * jsonslices.SLICE_BYTES
    assert counting.scanned <= 3 * read

    path = tmp_path / "ws.json.zst"
    with open(path, "wb") as f, zstandard.ZstdCompressor(level=19).stream_writer(f) as w:
        w.write(b'{"version":1,"entries":[')
        for _ in range(1200):
            w.write(b" " * (1 << 20))
        w.write(b'{"type":"dir","name":"/"}]}')
    assert path.stat().st_size < 64 << 10
    with pytest.raises(InputErrors) as e:
        crfs.load(str(path))
    assert str(e.value) == (f"{path}: entries[0]: no end of the entry within 16 MiB of JSON text: refused (an entry,"
                            " white space included, is never that long)")


def test_white_space_below_the_limit_is_fine(monkeypatch):
    entries = [{"type": "reg", "name": f"f{i}", "mode": 0o644} for i in range(50)]
    compact = toc(*entries)
    spaced = b'{"entries": [' + (b" " * 3000 + b",\n").join(json.dumps(e).encode() for e in entries) + b"]}"
    expected = image(crfs.loads(compact))
    monkeypatch.setattr(jsonslices, "SLICE_BYTES", 64)
    assert image(crfs.loads(spaced)) == expected


# -- the fast path and the reference, on malformed documents -----------------------------------

class Raw(str):
    """JSON text written as is (numbers in other spellings)."""


ODD_NUMBERS = [Raw(t) for t in ("1.0", "1e2", "-0", "0.5E1", "18446744073709551615", "18446744073709551616",
                                "4294967296", "-1", "1E400")]
MALFORMED = {**VALUES, "mode": st.one_of(VALUES["mode"], st.sampled_from(ODD_NUMBERS)),
             "uid": st.one_of(VALUES["uid"], st.sampled_from(ODD_NUMBERS)),
             "size": st.one_of(VALUES["size"], st.sampled_from(ODD_NUMBERS)),
             "x-content": st.one_of(VALUES["x-content"], st.sampled_from(["YW=", "Y===", "YQ==\n", " YQ=="]))}


def _text(value) -> str:
    if isinstance(value, Raw):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


@st.composite
def raw_entry(draw) -> str:
    """An entry as JSON text: a base or random keys, maybe with a key given twice."""
    pairs = list(draw(st.one_of(st.sampled_from(BASES), entries, one_key_changed)).items())
    if pairs and draw(st.integers(0, 3)) == 0:
        key = draw(st.sampled_from([k for k, _ in pairs]))
        value = draw(MALFORMED[key]) if key in MALFORMED else draw(st.integers())
        pairs.insert(draw(st.integers(0, len(pairs))), (key, value))
    for i, (key, _value) in enumerate(pairs):
        if key in MALFORMED and draw(st.integers(0, 7)) == 0:
            pairs[i] = (key, draw(MALFORMED[key]))
    return "{" + ",".join(f"{_text(k)}:{_text(v)}" for k, v in pairs) + "}"


@st.composite
def raw_document(draw) -> bytes:
    items = draw(st.lists(raw_entry(), max_size=6))
    sep = draw(st.sampled_from([",", ", ", ",\n  "]))
    body = sep.join(['{"type":"reg","name":"base"}', '{"type":"dir","name":"d"}', *items])
    top = [f'"entries":[{body}]']
    extra = draw(st.sampled_from(['', '"version":1', '"version":1,"version":1', '"entries":[]', '"x":{"a":1,"a":2}']))
    if extra:
        top.insert(draw(st.integers(0, 1)), extra)
    return ("{" + ",".join(top) + "}").encode()


def outcome(data: bytes):
    try:
        return image(crfs.loads(data, Options(), "t.json"))
    except InputErrors as e:
        return e.lines
    except InputError as e:  # a tree the compiler refuses
        return str(e)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_document())
def test_fast_and_reference_agree_on_malformed_documents(data):
    """`batch` and `apply`, slices of any size or none: the same tree or the same error lines
    (JSON paths included), for missing, extra and wrong-typed fields, keys given twice, numbers
    in odd spellings or out of range, bad base64."""
    results = []
    for slice_bytes in (jsonslices.SLICE_BYTES, 48):
        saved = jsonslices.SLICE_BYTES
        jsonslices.SLICE_BYTES = slice_bytes
        try:
            for context in (contextlib.nullcontext, reference_path):
                with context():
                    results.append(outcome(data))
        finally:
            jsonslices.SLICE_BYTES = saved
    assert all(r == results[0] for r in results), (data, results)


def test_finding_entries_twice_on_the_command_line(cfsc, tmp_path):
    source = tmp_path / "t.json"
    source.write_bytes(b'{"version":1,"entries":[{"type":"reg","name":"a"}],"entries":[{"type":"reg","name":"b"}]}')
    p = cfsc("compile", "--from", "crfs", str(source), "-o", str(tmp_path / "out.cfs"))
    assert p.returncode == 2 and not (tmp_path / "out.cfs").exists()
    assert p.stderr.decode().splitlines() == [f"error: {source}: entries: duplicate key: a JSON object may give a"
                                              " key once (readers disagree on which value counts)"]


def test_finding_deep_name_is_refused_in_bounded_memory(cfsc, tmp_path):
    """A 1 MB name of 500,000 components (its parents implied) took 24 GB and was killed: every
    prefix was kept as a key.  An entry's path is at most PATH_MAX bytes as an absolute path,
    the tar frontend's rule for the layer's members (`limits.check_archive_path`)."""
    source = tmp_path / "t.json"
    source.write_text(json.dumps({"version": 1, "entries": [{"type": "reg", "name": "a/" * 500_000 + "f"}]}))
    p = cfsc("compile", "--from", "crfs", str(source), "-o", str(tmp_path / "out.cfs"))
    assert p.returncode == 2 and not (tmp_path / "out.cfs").exists()
    assert p.stderr.decode().splitlines() == [f"error: {source}: entries[0].name: a path of 1000002 bytes:"
                                              " at most 4096, as an extracted layer can have"]
    longest = "/".join(["d" * 254] * 16) + "/" + "f" * 15  # 4095 bytes: 4096 with its leading `/`
    for name, code in ((longest, 0), (longest + "f", 2)):
        source.write_text(json.dumps({"version": 1, "entries": [{"type": "reg", "name": name}]}))
        assert cfsc("compile", "--from", "crfs", str(source), "-o", str(tmp_path / "out.cfs")).returncode == code
