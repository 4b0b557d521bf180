"""The FUSE server's fast paths against their reference paths.

* `ImageView._make` (stat fields and the usual xattr bodies read without a `RawInode` or the
  generic parse) equals `ImageView._make_reference` at every inode slot of real, odd and
  corrupt images — garbage slots included, where both must fail alike.
  The odd image holds store-backed bodies both in the writer's shape (`lowered_pair`) and
  next to it (other entries, odd values), so each fast layer meets its near misses.
* A directory stream encoded once and served in slices (`Server._encoded`) pages exactly as
  the record-by-record encoding (`Server._records`) does, at any buffer size; streams
  encoded ahead of a walk are the same bytes; a large directory, paged as asked
  (`Server._page`), gives the same pages too.
* A small backing file read once (`Store.open_read`) is verified from the bytes it serves:
  a tampered one is still EIO on its first read, on a real mount without passthrough.
"""

from __future__ import annotations

import errno
import gzip
import io
import os
import socket
import time
from pathlib import Path

import pytest
from cfsc.backends.erofs.reader import Image
from cfsc.backends.erofs.writer import write_image
from cfsc.base.errors import IntegrityError
from cfsc.base.fsverity import digest_bytes, payload_path
from cfsc.base.options import Options
from cfsc.base.tree import S_IFDIR, S_IFREG, Inode, Tree
from cfsc.build import compile_tree
from cfsc.build.pipeline import run_passes
from cfsc.frontends import dumpfile
from cfsc.fuse import open_view
from cfsc.fuse import protocol as P
from cfsc.fuse.server import Server
from cfsc.fuse.view import ImageView, Node
from cfsc.store.backing import Store

from tests.helpers.data import CONFORMANCE
from tests.helpers.fuse import data_image, fuse_mounted, read_or_errno
from tests.helpers.hostile_images import CORPUS

IMAGES = CONFORMANCE / "upstream-images"
SLOTS_MAX = 40000  # inode slots compared per image (the config images have ~50k)


def _image_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def _odd_xattrs_image() -> bytes:
    """Metacopy and redirect values of every odd kind, inline and shared, with user xattrs
    inline and shared beside them."""
    from cfsc.backends.erofs.overlay import METACOPY as M
    from cfsc.backends.erofs.overlay import REDIRECT as R

    odd = {b"plain": ((M, b""), (R, b"/ab/cd")), b"digest": ((M, bytes(4) + b"\x11" * 32), (R, b"ab/cd")),
           b"short-metacopy": ((M, b"\1" * 10), (R, b"//ab/cd")), b"nul": ((M, b""), (R, b"/ab/cd\0tail")),
           b"slash": ((M, b""), (R, b"/")), b"no-redirect": ((M, bytes(36)),),
           b"long-metacopy": ((M, bytes(37)), (R, b"/q")), b"no-metacopy": ((R, b"/ab/x"),),
           b"two-a": ((M, b""), (R, b"/shared/one")), b"two-b": ((M, b""), (R, b"/shared/one")),
           b"user-inline": ((M, b""), (R, b"/ab/u"), (b"user.only", b"x")),
           b"escaped": ((b"trusted.overlay.overlay.x", b"1"), (M, b""), (R, b"/ab/e")),
           # SHA-512 metacopies (composefs-rs): the 68-byte form, and one whose id says SHA-256
           b"sha512": ((M, b"\0\x44\0\x02" + b"\x22" * 64), (R, b"/ab/" + b"c" * 126)),
           b"sha512-bad-id": ((M, b"\0\x44\0\x01" + b"\x22" * 64), (R, b"/ab/s"))}
    dump = b"/ 4096 40755 2 0 0 0 0.0 - - - user.common=1\n" + b"".join(
        b"/%s 3 100644 1 0 0 0 0.0 - abc - user.common=1\n" % n for n in odd)
    tree = run_passes(dumpfile.loads(dump, Options(), "odd.dump"), Options())
    for name, pairs in odd.items():  # lowered already: these go to the image as they are
        node = tree.root.children[name]
        node.xattrs = tuple(sorted(node.xattrs + pairs))
    out = io.BytesIO()
    write_image(tree, out)
    return out.getvalue()


def _images():
    """Every image whose superblock the reader accepts (else no inode is ever read)."""
    yield "odd-xattrs", _odd_xattrs_image()
    for path in sorted(IMAGES.iterdir()):
        yield path.name, _image_bytes(path)
    for name, data, _offset, _words in CORPUS:
        try:
            Image(data, name)
        except OSError:
            continue
        yield f"corrupt-{name}", data


def _outcome(make, nid: int):
    try:
        node = make(nid)
    except OSError as e:
        return "error", type(e).__name__, str(e)
    if node is None:
        return None
    return tuple(getattr(node, slot) for slot in Node.__slots__)


@pytest.mark.parametrize("name, data", list(_images()), ids=[n for n, _d in _images()])
def test_fast_nodes_equal_the_reference_at_every_inode_slot(name, data):
    image = Image(data, name)
    fast, reference = ImageView(image), ImageView(image)
    slots = min((image.end - image.meta_base) >> 5, SLOTS_MAX)
    nodes = 0
    for nid in range(slots):
        got = _outcome(fast._make, nid)
        assert got == _outcome(reference._make_reference, nid), f"{name}: nid {nid}"
        nodes += got is not None and got[0] != "error"
    assert nodes, "some slot holds an inode"


def test_the_odd_image_meets_each_fast_layer_and_its_near_misses():
    from cfsc.backends.erofs.inode_attrs import inline_xattrs, lowered_pair, stat_fields

    image = Image(_odd_xattrs_image(), "odd")
    shapes = set()
    for nid in range((image.end - image.meta_base) >> 5):
        f = stat_fields(image, nid)
        if f is None or not f[9]:
            continue
        pair = lowered_pair(image, f[8], f[9])
        items = inline_xattrs(image, f[8], f[9])
        if pair is not None:  # the narrow layer agrees with the generic one where it answers
            assert items == (pair[0], [(b"trusted.overlay.metacopy", pair[1]), (b"trusted.overlay.redirect", pair[2])])
        shapes.add((pair is not None, items is not None and len(items[1])))
    assert {(True, 2), (False, 1), (False, 3)} <= shapes, shapes


# -- directory streams -----------------------------------------------------------------------


class Connection:
    """A `Server` on one end of a SOCK_SEQPACKET pair (one message per request and reply,
    as `/dev/fuse` frames them), its workers running."""

    def __init__(self, image: Path, basedirs=(), threads=2):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.fd = theirs.detach()
        self.server = Server(self.fd, open_view(str(image)), Store([str(b) for b in basedirs]), threads=threads)
        self.server.start()
        self.unique = 0

    def call(self, opcode, body=b"", nodeid=1):
        self.unique += 2
        self.sock.send(P.IN_HEADER.pack(40 + len(body), opcode, self.unique, nodeid, 0, 0, os.getpid(), 0) + body)
        self.sock.settimeout(10)
        data = self.sock.recv(1 << 21)
        _length, error, unique = P.OUT_HEADER.unpack_from(data)
        assert unique == self.unique
        return error, data[16:]

    def close(self):
        self.sock.close()
        self.server.wait(5)
        self.server.close()
        os.close(self.fd)


def _reference_pages(server: Server, nodeid: int, plus: bool, size: int) -> list[bytes]:
    """The pages of a listing encoded record by record, as the server did before streams."""
    node = server._node(nodeid)
    pages = []
    offset = 0
    while True:
        parts = []
        used = 0
        for index, (name, ino, dtype, entry) in enumerate(server._records(node, offset, plus), offset):
            rec = P.DIRENT.pack(ino, index + 1, len(name), dtype) + name + b"\0" * (-len(name) % 8)
            if plus:
                rec = entry + rec
            if used + len(rec) > size:
                break
            parts.append(rec)
            used += len(rec)
        page = b"".join(parts)
        pages.append(page)
        if not page:
            return pages
        offset += len(parts)


def _served_pages(conn: Connection, nodeid: int, plus: bool, size: int) -> list[bytes]:
    opcode = P.Opcode.READDIRPLUS if plus else P.Opcode.READDIR
    pages = []
    offset = 0
    while True:
        error, page = conn.call(opcode, P.READ_IN.pack(0, offset, size, 0, 0), nodeid)
        assert error == 0
        pages.append(page)
        if not page:
            return pages
        pos = 0
        while pos < len(page):  # the next offset: the last record's d_off
            d = P.DIRENT.read(page, pos + (P.ENTRY_OUT.size if plus else 0))
            offset = d.off
            pos += (P.ENTRY_OUT.size if plus else 0) + P.DIRENT.size + (d.namelen + 7) // 8 * 8


def _tree_image(tmp: Path) -> Path:
    lines = [b"/ 4096 40755 2 0 0 0 0.0 - - -"]
    for i in range(3):
        lines.append(b"/d%d 4096 40755 2 0 0 0 0.0 - - -" % i)
        for j in range(200):
            lines.append(b"/d%d/entry-%04d-%s 5 100644 1 0 0 0 0.0 - hello -" % (i, j, b"x" * (j % 37)))
        lines.append(b"/d%d/sub 4096 40755 2 0 0 0 0.0 - - -" % i)
        lines.append(b"/d%d/sub/leaf 0 100644 1 0 0 0 0.0 - - -" % i)
    image = tmp / "tree.cfs"
    tree = run_passes(dumpfile.loads(b"\n".join(sorted(lines)) + b"\n", Options(), "tree.dump"), Options())
    with open(image, "wb") as f:
        write_image(tree, f)
    return image


@pytest.mark.parametrize("image", ["tree", "special.v1.cfs", "config-with-hard-link.v1.cfs.gz"])
def test_directory_streams_page_as_the_reference(image, tmp_path):
    if image == "tree":
        path = _tree_image(tmp_path)
    else:
        path = tmp_path / "image.cfs"
        path.write_bytes(_image_bytes(IMAGES / image))
    conn = Connection(path)
    try:
        conn.call(P.Opcode.INIT, P.INIT_IN.pack(7, 45, 1 << 20, 0xFFFFFFFF) + P.INIT_IN_FLAGS2.pack(0))
        view = conn.server.view
        dirs = [P.ROOT_ID] + [nid + 2 for _name, nid in view.children(view.root_nid)
                              if view.node(nid) is not None and view.node(nid).mode & 0o170000 == 0o040000][:8]
        for nodeid in dirs:
            for plus in (False, True):
                for size in (200, 4096, 32768, 1 << 20):
                    assert _served_pages(conn, nodeid, plus, size) == \
                        _reference_pages(conn.server, nodeid, plus, size), (nodeid, plus, size)
    finally:
        conn.close()


def test_a_large_directory_is_paged_as_the_reference_without_a_stream(tmp_path):
    """Beyond STREAM_ENTRIES a directory is encoded page by page (`Server._page`): the same
    pages, and no whole stream kept (a million entries made ~700 MB of them)."""
    from cfsc.fuse.server import STREAM_ENTRIES

    count = STREAM_ENTRIES + 300
    root = Inode(S_IFDIR | 0o755)
    big = Inode(S_IFDIR | 0o755)
    root.add_child(b"big", big)
    for i in range(count):
        big.add_child(b"f%06d-%s" % (i, b"y" * (i % 29)), Inode(S_IFREG | 0o644, uid=i))
    path = tmp_path / "large.cfs"
    path.write_bytes(compile_tree(Tree(root, "large"), Options()))
    conn = Connection(path)
    try:
        conn.call(P.Opcode.INIT, P.INIT_IN.pack(7, 45, 1 << 20, 0xFFFFFFFF) + P.INIT_IN_FLAGS2.pack(0))
        view = conn.server.view
        nodeid = view.lookup(view.root_nid, b"big").nid + 2
        for plus in (False, True):
            for size in (4096, 1 << 17):
                served = _served_pages(conn, nodeid, plus, size)
                assert served == _reference_pages(conn.server, nodeid, plus, size), (plus, size)
                assert sum(len(p) for p in served) > count * 24
        assert not any(key >> 1 == nodeid - 2 for key in conn.server._streams)
    finally:
        conn.close()


def test_subdirectories_are_encoded_ahead_of_the_walk_and_alike(tmp_path):
    conn = Connection(_tree_image(tmp_path))
    try:
        conn.call(P.Opcode.INIT, P.INIT_IN.pack(7, 45, 1 << 20, 0xFFFFFFFF) + P.INIT_IN_FLAGS2.pack(0))
        server = conn.server
        _served_pages(conn, P.ROOT_ID, True, 4096)
        first = server.view.lookup(server.view.root_nid, b"d0")
        key = first.nid * 2 + 1
        end = time.monotonic() + 10
        while key not in server._streams and time.monotonic() < end:
            time.sleep(0.01)  # the waiting worker encodes it once the reply is out
        assert key in server._unasked, "encoded before any request asked"
        ahead = server._streams[key][0]
        assert _served_pages(conn, first.nid + 2, True, 1 << 20)[0] == ahead
        assert key not in server._unasked
        assert b"".join(_reference_pages(server, first.nid + 2, True, 1 << 20)) == ahead
    finally:
        conn.close()


# -- small files read once --------------------------------------------------------------------


def test_small_files_are_verified_from_the_bytes_served(tmp_path):
    store_dir = tmp_path / "store"
    data = os.urandom(9000)
    target = store_dir / os.fsdecode(payload_path(digest_bytes(data)))
    target.parent.mkdir(parents=True)
    target.write_bytes(data)
    payload, digest = payload_path(digest_bytes(data)), digest_bytes(data)
    store = Store([str(store_dir)])
    try:
        fd, got, _size = store.open_read(payload, digest, 1 << 17)
        os.close(fd)
        assert got == data and store.measured == len(data)
        fd, got, _size = store.open_read(payload, digest, 100)  # over the limit: the fd only
        os.close(fd)
        assert got is None
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        with pytest.raises(IntegrityError, match="tampered or corrupt"):
            store.open_read(payload, digest, 1 << 17)
    finally:
        store.close()


@pytest.mark.fuse
@pytest.mark.root
@pytest.mark.timeout(120)
def test_a_tampered_small_object_is_eio_without_passthrough(tmp_path):

    image, store, files = data_image(tmp_path)
    flipped = store / os.fsdecode(payload_path(digest_bytes(files["flipped"])))
    raw = bytearray(flipped.read_bytes())
    raw[5000] ^= 1
    flipped.write_bytes(raw)
    mnt = tmp_path / "m"
    mnt.mkdir()
    with fuse_mounted(image, mnt, [store], passthrough=False) as server:
        assert not server.passthrough
        assert read_or_errno(mnt / "flipped") == "EIO"
        assert (mnt / "small").read_bytes() == files["small"]
        assert (mnt / "big").read_bytes() == files["big"]


def test_small_files_read_without_an_open_serve_what_open_files_serve(tmp_path):
    """A READ of a small file nobody holds open (`Server._read_small`: opened, read,
    verified, closed at once) gives the bytes, and the errors, of the reference path (OPEN,
    then READs through the kept `Held`), at any offset and size; nothing is kept."""

    image, store, files = data_image(tmp_path)
    flipped = store / os.fsdecode(payload_path(digest_bytes(files["flipped"])))
    raw = bytearray(flipped.read_bytes())
    raw[5000] ^= 1
    flipped.write_bytes(raw)
    conn = Connection(image, [store])
    try:
        flags = 0xFFFFFFFF & ~P.FUSE_NO_OPEN_SUPPORT  # OPEN answered: the reference path to compare with
        conn.call(P.Opcode.INIT, P.INIT_IN.pack(7, 45, 1 << 20, flags) + P.INIT_IN_FLAGS2.pack(0))
        server = conn.server
        assert not server.passthrough and not server.no_open
        reads = [(0, 1 << 17), (0, 4096), (4095, 3), (100, 1 << 20), (8999, 10), (1 << 20, 4096)]
        for name in ("small", "nodigest", "flipped", "truncated"):
            node = server.view.lookup(server.view.root_nid, name.encode())
            assert node.external and node.size <= 1 << 17
            nodeid = node.nid + 2
            fresh = [conn.call(P.Opcode.READ, P.READ_IN.pack(0, off, size, 0, 0), nodeid) for off, size in reads]
            assert node.nid not in server._held, "read once, nothing kept"
            error, body = conn.call(P.Opcode.OPEN, P.OPEN_IN.pack(os.O_RDONLY, 0), nodeid)
            if name == "flipped":
                assert error == -errno.EIO and fresh == [(-errno.EIO, b"")] * len(reads)
                continue
            assert error == 0
            fh = P.OPEN_OUT.unpack_from(body)[0]
            held = [conn.call(P.Opcode.READ, P.READ_IN.pack(fh, off, size, 0, 0), nodeid) for off, size in reads]
            # while held, a READ without an open takes the held file too: still the same bytes
            again = [conn.call(P.Opcode.READ, P.READ_IN.pack(0, off, size, 0, 0), nodeid) for off, size in reads]
            conn.call(P.Opcode.RELEASE, P.RELEASE_IN.pack(fh, 0, 0), nodeid)
            data = files[name]
            assert fresh == held == again == [(0, data[off:off + size]) for off, size in reads], name
    finally:
        conn.close()


def test_a_corrupt_entry_is_left_for_the_request_by_the_read_ahead(tmp_path):
    """Encoding ahead (`_read_ahead`) meets a corrupt inode: that directory is left for the
    request that asks for it, which lists the name (DT_UNKNOWN) and logs the refusal once;
    nothing is logged ahead of it."""
    good = (IMAGES / "special.v1.cfs").read_bytes()
    reader = Image(good)
    nid = reader.lookup(reader.inode(reader.root_nid), b"inline")
    bad = bytearray(good)
    bad[reader.inode_offset(nid):reader.inode_offset(nid) + 2] = b"\xff\xff"  # i_format: no such layout
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        server = Server(devnull, ImageView(Image(bytes(bad), "bad.cfs")), Store([]))
        key = server.view.root_nid * 2 + 1
        server._ahead.append(key)
        server._read_ahead(lambda _timeout: False)
        assert key not in server._streams and not server._logged
        blob, ends = server._encoded(server.view.node(server.view.root_nid), True)
        assert [m for m in server._logged if "i_format 0xffff" in m]
        records = _reference_pages(server, P.ROOT_ID, True, 1 << 20)[0]
        assert blob == records and b"inline" in blob
    finally:
        os.close(devnull)
