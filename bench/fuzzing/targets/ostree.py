"""OSTree repositories (frontends/ostreerepo.py, ostree.py): commit, dirtree, dirmeta, content objects.

An input describes a repository: a flags byte (repository mode, `--verify`, `--hardlinks`) and
records `kind, u32 length, bytes`: record 0 is the commit, the others dirtrees, dirmetas and
content objects in the mode's format (archive `.filez`: header and deflate; bare-user: the
`user.ostreemeta` value and the data; bare-user-only: the data, or a symlink's target).
`run` writes them as a repository in the work directory — every object under the checksum
its bytes have, so hashing never hides a mutation: a 32-byte placeholder `REF(j)` inside a
record stands for record j's name (records only refer to later ones, so names are computed
from the last record back; with `--verify`, content objects get their real OSTree checksum).
Then the commit is read with `cfsc.frontends.ostree.commit.load` and compiled in memory.

Mutations decode a record with its GVariant type, change one value (the gvariant target's
tweaks: longer names, more entries, nested variants …) or one reference (to another record,
or dangling), and encode it again; or change the flags, or mutate a record's bytes.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import struct
import zlib

from cfsc.base.errors import CfscError
from cfsc.base.options import Options
from cfsc.frontends.ostree import gvariant
from cfsc.frontends.ostree.gvariant import GVariantError, Variant
from cfsc.frontends.ostree.repo import (
    ARCHIVE_HEADER,
    COMMIT,
    DIRMETA,
    DIRTREE,
    FILEMETA,
    Content,
    Repo,
    checksum_header,
    swap32,
)

from bench.fuzzing.mutators import generic
from bench.fuzzing.targets.gvariant import _tweak

NAME = "ostree"
TEST_CASES = 150
COMMIT_KIND, DIRTREE_KIND, DIRMETA_KIND, FILE_KIND, SYMLINK_KIND = range(5)
TYPES = {COMMIT_KIND: COMMIT, DIRTREE_KIND: DIRTREE, DIRMETA_KIND: DIRMETA}
EXT = {COMMIT_KIND: ".commit", DIRTREE_KIND: ".dirtree", DIRMETA_KIND: ".dirmeta"}
MODES = ("archive-z2", "bare-user-only", "bare-user", "archive-z2")  # flags & 3; the second archive uses a store
VERIFY, HARDLINKS = 4, 8
RECORDS_MAX = 64
_RECORD = struct.Struct("<BI")
_SIZE_PREFIX = struct.Struct(">I4x")


def REF(j: int) -> bytes:
    return b"\xee" * 30 + struct.pack("<H", j)


def _swap64(v: int) -> int:
    return int.from_bytes(v.to_bytes(8, "little"), "big")


# -- the container ----------------------------------------------------------------------------


def pack(flags: int, records: list[tuple[int, bytes]]) -> bytes:
    return bytes([flags]) + b"".join(_RECORD.pack(k, len(r)) + r for k, r in records)


def unpack(data: bytes) -> tuple[int, list[tuple[int, bytes]]]:
    """The flags and records (a cut-off record ends the list)."""
    flags = data[0] if data else 0
    records = []
    pos = 1
    while pos + _RECORD.size <= len(data) and len(records) < RECORDS_MAX:
        kind, size = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        records.append((kind % 5, data[pos:pos + size]))
        pos += size
    return flags, records


# -- seeds ------------------------------------------------------------------------------------


def _archive(uid: int, gid: int, mode: int, data: bytes = b"", target: bytes = b"", xattrs=()) -> bytes:
    header = gvariant.encode(ARCHIVE_HEADER, (_swap64(0 if target else len(data)), swap32(uid), swap32(gid),
                                              swap32(mode), 0, target, list(xattrs)))
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = deflate.compress(data) + deflate.flush() if not target else b""
    return _SIZE_PREFIX.pack(len(header)) + header + body


def _content(mode_name: str, uid: int, gid: int, mode: int, data: bytes = b"", target: bytes = b"",
             xattrs=()) -> tuple[int, bytes]:
    if mode_name == "archive-z2":
        return FILE_KIND, _archive(uid, gid, mode, data, target, xattrs)
    if mode_name == "bare-user":
        meta = gvariant.encode(FILEMETA, (swap32(uid), swap32(gid), swap32(mode), list(xattrs)))
        return FILE_KIND, struct.pack("<H", len(meta)) + meta + (target + b"\0" if target else data)
    if target:
        return SYMLINK_KIND, target
    return FILE_KIND, data


def _repo_seed(flags: int) -> bytes:
    mode_name = MODES[flags & 3]
    xattrs = [(b"user.origin\0", b"fuzz"), (b"security.selinux\0", b"system_u:object_r:bin_t:s0\0")]
    dirmeta = gvariant.encode(DIRMETA, (0, 0, swap32(0o40755), xattrs[:1]))
    subdirmeta = gvariant.encode(DIRMETA, (swap32(1000), swap32(1000), swap32(0o40700), []))
    # records: 0 commit, 1 root dirtree, 2 root dirmeta, 3 /d dirtree, 4 /d dirmeta, 5-7 files
    files = [_content(mode_name, 0, 0, 0o100644, b"small\n", xattrs=xattrs if mode_name != "bare-user-only" else ()),
             _content(mode_name, 0, 0, 0o100755, bytes(range(256)) * 40),
             _content(mode_name, 0, 0, 0o120777, target=b"../usr/bin/sh")]
    root = gvariant.encode(DIRTREE, ([(b"a", REF(5)), (b"big", REF(6)), (b"link", REF(7))],
                                     [(b"d", REF(3), REF(4))]))
    sub = gvariant.encode(DIRTREE, ([(b"e", REF(5)), (b"empty", REF(8))], []))
    commit = gvariant.encode(COMMIT, ([(b"version", Variant("s", b"1.0")), (b"ostree.ref-binding", Variant("as", [b"main"]))],
                                      b"", [], b"subject", b"", _swap64(1700000000), REF(1), REF(2)))
    records = [(COMMIT_KIND, commit), (DIRTREE_KIND, root), (DIRMETA_KIND, dirmeta), (DIRTREE_KIND, sub),
               (DIRMETA_KIND, subdirmeta), *files, _content(mode_name, 0, 0, 0o100644, b"")]
    return pack(flags, records)


def seeds() -> list[bytes]:
    return [_repo_seed(flags) for flags in (0, 1, 2, 3, 1 | VERIFY, 0 | VERIFY, 2 | HARDLINKS, 3 | VERIFY | HARDLINKS)]


# -- running ----------------------------------------------------------------------------------


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _place(repo: Repo, mode_name: str, kind: int, record: bytes, path: str) -> None:
    """Write one record as the object file at `path`, in the repository's format."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == SYMLINK_KIND:
        if mode_name == "bare-user-only" and record and b"\0" not in record and len(record) < 4096:
            os.symlink(record, path)
        else:
            _write(path, record)
        return
    if kind == FILE_KIND and mode_name == "bare-user":
        (meta_len,) = struct.unpack_from("<H", record.ljust(2, b"\0"))
        _write(path, record[2 + meta_len:])
        try:
            os.setxattr(path, "user.ostreemeta", record[2:2 + meta_len] or b"\0")
        except OSError:
            pass  # (an empty or oversized value: the object simply lacks it)
        return
    _write(path, record)


def _content_checksum(repo: Repo, path: str) -> bytes | None:
    """The OSTree checksum of the content object at `path`, as `--verify` computes it (None
    if it does not read)."""
    obj = Content(repo, path)
    try:
        if os.path.islink(path):
            repo._symlink(obj, os.path.relpath(path, repo.path).encode())
        else:
            obj.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)  # a file this harness wrote
            repo._regular(obj, os.fstat(obj.fd))
        sha = checksum_header(obj)
        if not stat.S_ISLNK(obj.mode):  # (a symlink's checksum is its header's)
            for chunk in obj.chunks():
                sha.update(chunk)
        return sha.digest()
    except (CfscError, OSError):
        return None
    finally:
        obj.close()


def run(data: bytes, workdir: str) -> None:
    flags, records = unpack(data)
    if not records:
        return
    mode_name = MODES[flags & 3]
    root = os.path.join(workdir, "repo")
    os.makedirs(os.path.join(root, "objects"))
    os.makedirs(os.path.join(root, "refs", "heads"))
    with open(os.path.join(root, "config"), "w") as f:
        f.write(f"[core]\nrepo_version=1\nmode={mode_name}\n")
    repo = Repo(root)  # (for object paths and checksums; closed: its directory fd leaked once a case)
    try:
        ext_content = ".filez" if mode_name == "archive-z2" else ".file"
        names: list[bytes] = [b""] * len(records)
        for j in range(len(records) - 1, -1, -1):
            kind, record = records[j]
            for k in range(j + 1, len(records)):
                if REF(k) in record:
                    record = record.replace(REF(k), names[k])
            if kind in EXT:
                names[j] = hashlib.sha256(record).digest()
                _place(repo, mode_name, kind, record, repo.object_path(names[j], EXT[kind]))
                continue
            scratch = os.path.join(root, "objects", f"tmp-{j}")
            _place(repo, mode_name, kind, record, scratch)
            names[j] = (_content_checksum(repo, scratch) if flags & VERIFY else None) or hashlib.sha256(record).digest()
            final = repo.object_path(names[j], ext_content)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            if os.path.lexists(final):
                os.unlink(scratch)
            else:
                os.rename(scratch, final)
    finally:
        repo.close()
    with open(os.path.join(root, "refs", "heads", "main"), "w") as f:
        f.write(names[0].hex() + "\n")
    archive = mode_name == "archive-z2"
    store = archive and flags & 3 == 3
    options = Options(verify=bool(flags & VERIFY), threads=1,
                      hardlinks=bool(flags & HARDLINKS) and (store or not archive),
                      ostree_compat=archive and not store,
                      digest_store=os.path.join(workdir, "store") if store else None)
    from cfsc.build import compile_in_memory
    from cfsc.frontends.ostree import commit as ostree

    try:
        compile_in_memory(ostree.load(f"ostree:{root}:main", options), options)
    except CfscError as e:
        if "\n" in str(e):
            raise AssertionError(f"a {type(e).__name__} of several lines: {str(e)!r}") from e
        raise


# -- mutations --------------------------------------------------------------------------------


def _retarget(record: bytes, count: int, rng: random.Random) -> bytes:
    """One reference in `record` pointed at another record, at nothing, or at itself."""
    refs = [k for k in range(count) if REF(k) in record]
    if not refs:
        return record
    old = REF(rng.choice(refs))
    roll = rng.random()
    new = REF(rng.randrange(count)) if roll < 0.6 else rng.randbytes(32) if roll < 0.8 else \
        rng.choice((bytes(32), REF(0), old[:-1]))
    return record.replace(old, new, 1)


def mutate(data: bytes, rng: random.Random) -> bytes:
    flags, records = unpack(data)
    if not records:
        return _repo_seed(rng.randrange(16))
    roll = rng.random()
    if roll < 0.07:
        return pack(rng.randrange(16), records)
    if roll < 0.12:  # a record more (a copy) or fewer
        i = rng.randrange(len(records))
        if rng.random() < 0.5 and len(records) < RECORDS_MAX:
            records.insert(i, records[i])
        elif len(records) > 1:
            del records[i]
        return pack(flags, records)
    i = rng.randrange(len(records))
    kind, record = records[i]
    if roll < 0.25:
        records[i] = (kind, _retarget(record, len(records), rng))
    elif roll < 0.6 and (kind in TYPES or kind == FILE_KIND):
        records[i] = (kind, _tweak_record(flags, kind, record, rng))
    else:
        records[i] = (kind if rng.random() < 0.95 else rng.randrange(5), generic(record, rng))
    return pack(flags, records)


def _tweak_record(flags: int, kind: int, record: bytes, rng: random.Random) -> bytes:
    """A GVariant record (or a content object's header) decoded, one value changed, encoded."""
    mode_name = MODES[flags & 3]
    if kind == FILE_KIND and mode_name == "archive-z2":
        if len(record) < 8:
            return generic(record, rng)
        length = struct.unpack_from(">I", record)[0]
        head, body, node = record[8:8 + length], record[8 + length:], ARCHIVE_HEADER
        if rng.random() < 0.3:  # the data: inflate, change, deflate (sizes may disagree)
            try:
                plain = zlib.decompressobj(-15).decompress(body, 1 << 20)
            except zlib.error:
                return generic(record, rng)
            deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
            return record[:8 + length] + deflate.compress(generic(plain, rng)) + deflate.flush()
    elif kind == FILE_KIND and mode_name == "bare-user":
        (length,) = struct.unpack_from("<H", record.ljust(2, b"\0"))
        head, body, node = record[2:2 + length], record[2 + length:], FILEMETA
    elif kind in TYPES:
        head, body, node = record, b"", TYPES[kind]
    else:
        return generic(record, rng)
    try:
        value = gvariant.decode(node, head)
        head = gvariant.encode(node, _tweak(node, value, rng))
    except (GVariantError, ValueError, OverflowError, TypeError, RecursionError):
        head = generic(head, rng)
    if kind in TYPES:
        return head
    if mode_name == "archive-z2":
        return _SIZE_PREFIX.pack(len(head)) + head + body
    return struct.pack("<H", min(len(head), 0xFFFF)) + head + body

