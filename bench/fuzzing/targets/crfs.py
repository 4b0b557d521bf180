"""CRFS / stargz TOC JSON (frontends/crfs.py, jsonslices.py), compiled in-process to image bytes.

Mutations follow the grammar: the document is parsed into a tree that keeps what JSON
readers disagree on (keys given twice, numbers as written), an entry or the top level is
changed — a key set to a value of the wrong type or out of range (huge, negative, fractional,
odd spellings), dropped, added or given twice; entries repeated, dropped or moved; names with
`..`, empty and long components; bad base64, times and digests — and written back with some
white space.  A document that is not JSON gets byte-level mutations.

The oracle is more than "no crash": every case is also read with every entry through the
reference path (`_Builder.apply`) and with tiny slices (`jsonslices.SLICE_BYTES`), and all
must give the same image bytes or the same error lines.  Some bits of the input's CRC choose
reading it from a zstd-compressed file instead of memory.
"""

from __future__ import annotations

import io
import json
import os
import random
import zlib

import zstandard
from cfsc.base.errors import InputError, InputErrors
from cfsc.base.options import Options
from cfsc.build import compile_tree
from cfsc.frontends.crfs import slices as jsonslices
from cfsc.frontends.crfs import toc as crfs

from bench.fuzzing.mutators import generic

NAME = "crfs"
HEX = "7c9bbe5ec9b3fb774e8fa0f54247e93c34ddf8e5d16fe3073420de0ae81a262d"


class Raw(str):
    """A scalar written as it was (a number's spelling, true, null)."""


class Obj(list):
    """An object as its (key, value) pairs, duplicates kept."""


class _Punct(str):
    """JSON punctuation (and the white space around it) on the writer's stack."""


def _parse(data: bytes):
    return json.loads(data, object_pairs_hook=Obj, parse_float=Raw, parse_int=Raw, parse_constant=Raw)


def _write(value, rng: random.Random, out: list) -> None:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, Raw):
            out.append(str(v))
        elif isinstance(v, _Punct):
            out.append(v)
        elif isinstance(v, str):
            out.append(json.dumps(v, ensure_ascii=rng.random() < 0.1))
        elif isinstance(v, Obj):
            parts = [_Punct("}")]
            for i, (k, item) in enumerate(reversed(v)):
                parts.append(item)
                parts.append(_Punct(json.dumps(k) + rng.choice((":", ": ", " :"))))
                if i != len(v) - 1:
                    parts.append(_Punct(rng.choice((",", ", ", ",\n  "))))
            parts.append(_Punct("{"))
            stack.extend(parts)
        elif isinstance(v, list):
            parts = [_Punct("]")]
            for i, item in enumerate(reversed(v)):
                parts.append(item)
                if i != len(v) - 1:
                    parts.append(_Punct(rng.choice((",", ", ", ",\n"))))
            parts.append(_Punct("["))
            stack.extend(parts)
        else:
            out.append(json.dumps(v))


def _dump(value, rng: random.Random) -> bytes:
    out: list = []
    _write(value, rng, out)
    return "".join(out).encode("utf-8", "surrogatepass")


# -- values ----------------------------------------------------------------------------------------

NUMBERS = [Raw(t) for t in ("0", "1", "-1", "1.0", "1e2", "-0", "0.5", "4294967295", "4294967296", "65535",
                            "65536", "4095", "1048575", "9007199254740993", "18446744073709551615",
                            "18446744073709551616", "9223372036854775808", "-9223372036854775809", "1E400",
                            "123456789012345678901234567890")]
TEXTS = ["", "a", "/", "./", "./a/b/", "a/../b", "..", "a//b", "/abs", "x" * 256, "d/" + "y" * 300, "a\x00b",
         "é", "d/e", "f", "d", "s", "base", "usr/lib", "\n", "a/./b"]
VALUES = {
    "type": ["dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk", "socket", "sock", "REG", ""],
    "name": TEXTS,
    "linkName": TEXTS,
    "mode": NUMBERS + [Raw(str(m)) for m in (0o100644, 0o40755, 0o120777, 0o20644, 0o60644, 0o10644, 0o140755)],
    "uid": NUMBERS, "gid": NUMBERS, "size": NUMBERS, "devMajor": NUMBERS, "devMinor": NUMBERS,
    "chunkOffset": NUMBERS, "chunkSize": NUMBERS, "x-nlink": NUMBERS,
    "modtime": ["2021-10-11T13:06:16Z", "2021-10-11T13:06:16.123456789+02:00", "0001-01-01T00:00:00Z",
                "9999-12-31T23:59:59.999999999-23:59", "0000-01-01T00:00:00Z", "2021-02-29T00:00:00Z",
                "2021-10-11T13:06:16.1234567891Z", "2021-10-11 13:06:16Z", "1970-01-01T00:00:00+24:00", ""],
    "digest": ["sha256:" + HEX, "sha512:00ff", "sha256:" + HEX.upper(), "sha256:", HEX, "md5:" + "0" * 4000],
    "x-payload": TEXTS + ["ab/cd", "p" * 5000],
    "x-content": ["aGk=", "aGk", "a", "", "YWFh" * 1667, "YQ==\n", " YQ==", "Y===", "////"],
    "x-fsverity-digest": ["sha256:" + HEX, HEX, "sha256:" + HEX[:-1], "sha512:" + HEX],
    "x-name-b64": ["YQ==", "####", "Lw==", "Li4=", "YQBi", ""],
    "x-linkName-b64": ["YQ==", "####", "Zg=="],
    "x-payload-b64": ["YWIvY2Q=", "####", "AA=="],
}
EXTRA_KEYS = ["offset", "userName", "chunkDigest", "x-unknown", "x-", "other", "entries", "version"]


def _value(key: str, rng: random.Random):
    if key == "xattrs" or key == "x-xattrs-b64":
        pairs = Obj()
        for _ in range(rng.randint(0, 3)):
            name = rng.choice(["user.a", "user.b", "", "trusted.overlay.opaque", "security.selinux", "k" * 256,
                               "dXNlci7/", "###"])
            pairs.append((name, rng.choice(["YQ==", "YQ", "!!", "", "eA" * 40000, "AAAA"] + NUMBERS[:2])))
        return pairs
    if key == "x-mtime":
        return rng.choice([[Raw("1"), Raw("2")], [Raw("9223372036854775808"), Raw("0")],
                           [Raw("-9223372036854775808"), Raw("4294967295")], [Raw("1")], [Raw("1"), Raw("-1")], "1.2"])
    choices = VALUES.get(key)
    if choices is None or rng.random() < 0.1:  # any key may get a value of any type
        return rng.choice([Raw("null"), Raw("true"), Obj([("a", Raw("1"))]), [], "text", *NUMBERS[:4]])
    return rng.choice(choices)


# -- seeds ----------------------------------------------------------------------------------------

BASES = [
    {"type": "dir", "name": "./", "mode": 0o755, "modtime": "2021-10-11T13:06:16Z"},
    {"type": "reg", "name": "f", "size": 3, "digest": "sha256:" + HEX, "mode": 0o644, "uid": 1, "gid": 2,
     "modtime": "2021-10-11T13:06:16.5+01:00", "xattrs": {"user.a": "YQ=="}},
    {"type": "reg", "name": "g", "x-name-b64": "Zw==", "x-payload": "ab/cd", "x-payload-b64": "YWIvY2Q=", "size": 2,
     "x-fsverity-digest": "sha256:" + HEX, "x-mtime": [1, 2], "x-nlink": 1},
    {"type": "reg", "name": "i", "x-content": "aGk="},
    {"type": "symlink", "name": "s", "linkName": "t", "x-linkName-b64": "dA=="},
    {"type": "hardlink", "name": "h", "linkName": "f"},
    {"type": "char", "name": "c", "devMajor": 1, "devMinor": 3},
    {"type": "block", "name": "b", "devMajor": 7, "devMinor": 0},
    {"type": "fifo", "name": "p"},
    {"type": "socket", "name": "sock"},
    {"type": "reg", "name": "big", "size": 20000, "digest": "sha256:" + HEX, "chunkDigest": "sha256:" + HEX},
    {"type": "chunk", "name": "big", "chunkOffset": 20000, "chunkSize": 5000},
    {"type": "chunk", "chunkOffset": 25000, "chunkSize": 1},
    {"type": "dir", "name": "d/e/", "xattrs": {"user.b": "YQ=="}, "x-xattrs-b64": {"dXNlci7/": "dg=="}},
    {"type": "reg", "name": "d/e/f", "size": 0},
    {"type": "reg", "name": "f", "uid": 5},  # an update of an earlier entry
]


def seeds() -> list[bytes]:
    docs = [{"version": 1, "entries": BASES}, {"version": 1, "entries": BASES[:1]},
            {"entries": BASES[1:7]}, {"version": 1, "entries": BASES[:4] + BASES[6:10], "tarSplitDigest": "sha256:x"}]
    out = [json.dumps(d).encode() for d in docs]
    out.append(json.dumps({"version": 1, "entries": BASES}, indent="\t").encode())
    return out


# -- mutations ----------------------------------------------------------------------------------------

def _entries(doc) -> list | None:
    if isinstance(doc, Obj):
        for key, value in doc:
            if key == "entries" and isinstance(value, list) and not isinstance(value, Obj):
                return value
    return None


def _mutate_object(obj: Obj, rng: random.Random) -> None:
    op = rng.randrange(6)
    keys = [k for k, _ in obj]
    if op == 0 or not keys:  # add a key
        key = rng.choice(list(VALUES) + ["xattrs", "x-xattrs-b64", "x-mtime"] + EXTRA_KEYS)
        obj.insert(rng.randint(0, len(obj)), (key, _value(key, rng)))
    elif op == 1:  # drop one
        del obj[rng.randrange(len(obj))]
    elif op == 2:  # give one twice
        key = rng.choice(keys)
        obj.insert(rng.randint(0, len(obj)), (key, _value(key, rng)))
    elif op == 3 and any(isinstance(v, Obj) for _, v in obj):  # inside a nested object
        _mutate_object(rng.choice([v for _, v in obj if isinstance(v, Obj)]), rng)
    else:  # change a value
        i = rng.randrange(len(obj))
        obj[i] = (obj[i][0], _value(obj[i][0], rng))


def _mutate_doc(doc, rng: random.Random) -> None:
    entries = _entries(doc)
    op = rng.randrange(10)
    if entries is None or op == 0:
        if isinstance(doc, Obj):
            _mutate_object(doc, rng)
        return
    if op == 1 and entries:
        entries.insert(rng.randint(0, len(entries)), entries[rng.randrange(len(entries))])
    elif op == 2 and entries:
        del entries[rng.randrange(len(entries))]
    elif op == 3 and entries:
        entries.insert(rng.randint(0, len(entries)), entries.pop(rng.randrange(len(entries))))
    elif op == 4:
        entries.insert(rng.randint(0, len(entries)), _parse(json.dumps(rng.choice(BASES)).encode()))
    elif op == 5 and entries:
        entries[rng.randrange(len(entries))] = rng.choice([Raw("null"), "x", [], Raw("3"), Obj()])
    else:
        objects = [e for e in entries if isinstance(e, Obj)]
        if objects:
            _mutate_object(rng.choice(objects), rng)


def mutate(data: bytes, rng: random.Random) -> bytes:
    try:
        doc = _parse(data)
    except (ValueError, RecursionError):
        doc = None
    if doc is None or rng.random() < 0.08:
        if rng.random() < 0.5:
            return generic(data, rng)
        at = rng.randint(0, len(data))
        piece = rng.choice([b"},{", b"}, {", b'"entries":[', b"]", b" " * 1000, b"\\", b'"', b"\\u003a", b"{", b","])
        return data[:at] + piece + data[at:]
    for _ in range(rng.choice((1, 1, 2, 4))):
        _mutate_doc(doc, rng)
    return _dump(doc, rng)


# -- running ----------------------------------------------------------------------------------------

def _one_by_one(self, entries, source, first):
    for i, entry in enumerate(entries):
        self.one(entry, source, first + i)


def _outcome(read):
    try:
        tree = read()
    except InputErrors as e:
        return e.lines
    out = io.BytesIO()
    try:
        compile_tree(tree, Options(), out)
    except InputError as e:  # a tree the compiler refuses
        return str(e)
    return out.getvalue()


class Disagree(AssertionError):
    """The fast path, the reference path and tiny slices read the document differently."""


def run(data: bytes, workdir: str) -> None:
    if zlib.crc32(data) & 3 == 0:  # read from a compressed file, block by block
        source = os.path.join(workdir, "toc.json.zst")
        with open(source, "wb") as f:
            f.write(zstandard.ZstdCompressor().compress(data))

        def read():
            return crfs.load(source, Options())
    else:
        def read():
            return crfs.loads(data, Options(), "toc.json")
    results = []
    saved_batch, saved_slice = crfs._Builder.batch, jsonslices.SLICE_BYTES
    try:
        for batch, slice_bytes in ((saved_batch, saved_slice), (_one_by_one, saved_slice), (saved_batch, 64)):
            crfs._Builder.batch, jsonslices.SLICE_BYTES = batch, slice_bytes
            results.append(_outcome(read))
    finally:
        crfs._Builder.batch, jsonslices.SLICE_BYTES = saved_batch, saved_slice
    if not all(r == results[0] for r in results):
        shown = [len(r) if isinstance(r, bytes) else r for r in results]
        raise Disagree(f"fast / reference / 64-byte slices: {shown}")
    if isinstance(results[0], list):
        raise InputErrors(results[0])
