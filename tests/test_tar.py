"""The tar frontend: real archives against GNU tar's extraction, crafted archives against the
dumpfile of the same tree, and hostile archives against the documented errors.

Real archives are the data.tar of Debian packages (`tests/data/tar/`, provenance in
`tests/data/README.md`; one more is fetched with `apt-get download`).  Each is extracted by
GNU tar as root with owners, permissions, times and xattrs kept and compiled with
`cfsc compile --hardlinks DIR`; compiling the archive itself must give the same bytes and the
same store.  `--delay-directory-restore` makes the extraction faithful: without it GNU tar sets
a directory's mtime when it leaves the directory, and dpkg-deb puts symlinks after everything
else, so extracting them moves the mtime of their directory to "now" again.  Times need no other
adjustment: GNU tar restores exactly what the archive holds (whole seconds in these GNU-format
archives, nanoseconds from PAX records), as the tar frontend reads it.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import subprocess
from pathlib import Path

import pytest
import zstandard
from cfsc import frontends
from cfsc.base.errors import InputError, OutputError, UsageError
from cfsc.base.fsverity import FsVerityHasher, digest_file, payload_path
from cfsc.base.options import Options
from cfsc.base.tree import S_IFDIR, S_IFLNK, S_IFREG
from cfsc.build.pipeline import run_passes
from cfsc.frontends.tar import layers as tar
from cfsc.frontends.tar import stream as tarstream
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.checks import DEBS, EXTRACT, compare_images, image, spec, store_listing
from tests.helpers.data import image_of
from tests.helpers.dirtrees import Entry, dumpfile
from tests.helpers.tarcraft import archive, base256, from_entries, gnu_long, header, member, padded, pax_records

pytestmark = [pytest.mark.tools, pytest.mark.root]

DEB_CACHE = Path("/var/cache/cfsc-test-debs")


def load(data: bytes | list[bytes], tmp_path: Path, **options):
    """Load archive bytes (or several layers) through files, in-process."""
    paths = []
    for i, layer in enumerate(data if isinstance(data, list) else [data]):
        p = tmp_path / f"layer{i}.tar"
        p.write_bytes(layer)
        paths.append(str(p))
    return tar.load_many(paths, Options(**options))








# -- real archives: GNU tar extraction is the oracle ------------------------------------------


def check_against_extraction(cfsc, archive_path: Path, tmp_path: Path, *args: str) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    subprocess.run([*EXTRACT, "-xf", str(archive_path), "-C", str(tree)], check=True)
    want, got = tmp_path / "dir.cfs", tmp_path / "tar.cfs"
    cfsc("compile", "--hardlinks", str(tree), "-o", str(want), "--digest-store", str(tmp_path / "s1"), *args,
         check=True)
    cfsc("compile", str(archive_path), "-o", str(got), "--digest-store", str(tmp_path / "s2"), *args, check=True)
    compare_images(cfsc, got, want)
    assert store_listing(tmp_path / "s2") == store_listing(tmp_path / "s1")


@pytest.mark.parametrize("deb", DEBS, ids=lambda p: p.name.split("_")[0])
def test_debian_data_tar_equals_gnu_tar_extraction(deb, tmp_path, cfsc):
    check_against_extraction(cfsc, deb, tmp_path)


def fetched_deb(name: str) -> Path:
    """A package from the Debian mirror, cached across runs.  No network is a failure, not a
    skip: the mirror is part of this suite's environment (CI installs from it too)."""
    DEB_CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(DEB_CACHE.glob(f"{name}_*.deb"))
    if not found:
        p = subprocess.run(["apt-get", "download", name], cwd=DEB_CACHE, capture_output=True)
        found = sorted(DEB_CACHE.glob(f"{name}_*.deb"))
        if p.returncode or not found:
            pytest.fail(f"apt-get download {name} failed (this test needs a Debian mirror; run apt-get update):"
                        f" {p.stderr.decode()[-500:]}")
    return found[-1]


def test_fetched_debian_package_equals_gnu_tar_extraction(tmp_path, cfsc):
    """passwd: setuid and setgid programs, a non-root group, many symlinks (~1 MB)."""
    deb = fetched_deb("passwd")
    layer = tmp_path / "data.tar"
    with open(layer, "wb") as out:
        subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=out, check=True)
    check_against_extraction(cfsc, layer, tmp_path, "--threads", "2")


# -- crafted archives: the dumpfile of the same tree is the oracle -----------------------------


@pytest.mark.parametrize("flags", [{}, {"use_epoch": True}, {"skip_devices": True}, {"skip_xattrs": True},
                                   {"user_xattrs": True}], ids=lambda f: ",".join(f) or "default")
def test_pax_archive_equals_the_dumpfile(tmp_path, flags):
    entries = spec()
    got = image(load(from_entries(entries), tmp_path, **flags))
    assert got == image_of(dumpfile(entries, hardlinks=True, **flags))


def test_pax_archive_equals_gnu_tar_extraction(tmp_path, cfsc):
    """The crafted archive of every file type, odd names, xattrs, times before 1970, links."""
    layer = tmp_path / "spec.tar"
    layer.write_bytes(from_entries(spec()))
    check_against_extraction(cfsc, layer, tmp_path)


def test_gnu_tar_formats_agree(tmp_path, cfsc):
    """GNU tar's gnu, posix and ustar writers give the same image for one tree."""
    src = tmp_path / "src"
    (src / "d" / ("x" * 90)).mkdir(parents=True)
    long_file = src / "d" / ("x" * 90) / ("y" * 60)
    long_file.write_bytes(b"long name " * 20)
    (src / "f").write_bytes(b"f" * 100)
    os.link(long_file, src / "hl")
    os.symlink("t" * 150, src / "longlink")
    os.chown(src / "f", 3000000, 70000)  # past ustar's 7 octal digits: base-256 or PAX
    for p in [long_file, src / "f", src / "hl", src / "d" / ("x" * 90), src / "d", src]:
        os.utime(p, ns=(0, 1_600_000_000_123_456_789), follow_symlinks=False)
    os.utime(src / "longlink", ns=(0, 1_600_000_000_000_000_000), follow_symlinks=False)
    images = []
    for fmt in ("gnu", "posix"):
        layer = tmp_path / f"{fmt}.tar"
        subprocess.run(["tar", f"--format={fmt}", "--sort=name", "--numeric-owner", "-C", str(src), "-cf",
                        str(layer), "."], check=True)
        out = tmp_path / f"{fmt}.cfs"
        cfsc("compile", str(layer), "-o", str(out), check=True)
        images.append(out.read_bytes())
    assert images[0] != images[1]  # gnu keeps whole seconds, posix the nanoseconds
    epoch = [cfsc("compile", "--use-epoch", str(tmp_path / f"{f}.tar"), "-o", "-", check=True).stdout
             for f in ("gnu", "posix")]
    assert epoch[0] == epoch[1]
    check_against_extraction(cfsc, tmp_path / "posix.tar", tmp_path)


def test_header_encodings(tmp_path):
    """ustar prefix, GNU long names and links, base-256 numbers, PAX overrides and globals,
    xattr spellings, old-style directories, signed checksums, volume labels."""
    blob = bytes(range(256))
    name_hi = b"h\xe9" * 10
    block = header(name_hi, b"0", size=0)
    signed_sum = sum(b - 256 if b >= 128 else b for b in block[:148] + b" " * 8 + block[156:])
    parts = [
        header(b"vol", b"V", size=0),
        member(b"file.txt", b"z" * 50, prefix=b"deep/" + b"p" * 120),  # ustar: prefix/name
        gnu_long(b"L", b"g/" + b"n" * 200) + member(b"ignored", b"long", magic=b"ustar ", version=b" \0"),
        gnu_long(b"K", b"t" * 300) + member(b"sym", typeflag=b"2", linkname=b"short"),
        member(b"b256", b"x" * 70, raw={"uid": base256(5_000_000, 8), "gid": base256(4_000_000_000, 8),
                                        "mtime": base256(-5, 12)}),
        member(b"paxsize", b"p" * 100, size=0, pax={b"size": b"100"}),
        member(b"paxtime", b"", pax={b"mtime": b"-1.5", b"uid": b"7", b"gid": b"8"}),
        member(b"paxfrac", b"", pax={b"mtime": b"12.1234567891"}),
        member(b"xattrs", b"", pax=[(b"SCHILY.xattr.user.both", b"schily"),
                                    (b"LIBARCHIVE.xattr.user.both", b"bGliYXJjaGl2ZQ"),
                                    (b"LIBARCHIVE.xattr.user.%3Dodd%25", b"AAEC"),
                                    (b"SCHILY.xattr.user.bin", blob), (b"RHT.security.selinux", b"ctx\0")]),
        header(b"olddir/", b"\0", mode=0o750),
        block[:148] + b"%06o\0 " % (signed_sum & 0o777777) + block[156:],
        member(b"contig", b"c" * 10, typeflag=b"7"),
        member(b"hardlink-with-size", typeflag=b"1", linkname=b"contig", size=100),  # no data follows
        member(b"after", b"ok"),
    ]
    tree = load(archive(*parts), tmp_path)
    t = tree.lookup
    assert t(b"deep/" + b"p" * 120 + b"/file.txt").content == b"z" * 50
    assert t(b"g/" + b"n" * 200).content == b"long"
    assert t(b"sym").payload == b"t" * 300 and t(b"sym").mode == S_IFLNK | 0o777
    b256 = t(b"b256")
    assert (b256.uid, b256.gid, b256.mtime) == (5_000_000, 4_000_000_000, -5)
    assert t(b"paxsize").size == 100 and t(b"paxsize").payload is not None
    pt = t(b"paxtime")
    assert (pt.mtime, pt.mtime_nsec, pt.uid, pt.gid) == (-2, 500_000_000, 7, 8)
    assert (t(b"paxfrac").mtime, t(b"paxfrac").mtime_nsec) == (12, 123_456_789)
    assert dict(t(b"xattrs").xattrs) == {b"user.both": b"schily", b"user.=odd%": b"\0\1\2", b"user.bin": blob,
                                         b"security.selinux": b"ctx\0"}
    assert t(b"olddir").mode == S_IFDIR | 0o750
    assert t(name_hi).mode == S_IFREG | 0o644
    assert t(b"hardlink-with-size") is t(b"contig")
    assert t(b"after").content == b"ok"
    assert t(b"vol") is None


def test_global_pax_headers(tmp_path):
    glob = header(b"global", b"g", size=len(pax_records({b"mtime": b"100.5", b"uid": b"9",
                                                          b"SCHILY.xattr.user.g": b"1", b"comment": b"x"})))
    glob += padded(pax_records({b"mtime": b"100.5", b"uid": b"9", b"SCHILY.xattr.user.g": b"1", b"comment": b"x"}))
    tree = load(archive(glob, member(b"a", b""), member(b"b", b"", pax={b"uid": b"3", b"SCHILY.xattr.user.g": b"2"})),
                tmp_path)
    a, b = tree.lookup(b"a"), tree.lookup(b"b")
    assert (a.uid, a.mtime, a.mtime_nsec, a.xattrs) == (9, 100, 500_000_000, ((b"user.g", b"1"),))
    assert (b.uid, b.mtime, b.xattrs) == (3, 100, ((b"user.g", b"2"),))


def test_implied_directories_and_root(tmp_path):
    tree = load(archive(member(b"a/b/c", b"x", mtime=5)), tmp_path)
    for path in (b"/", b"a", b"a/b"):
        d = tree.lookup(path)
        assert (d.mode, d.uid, d.gid, d.mtime, d.xattrs) == (S_IFDIR | 0o755, 0, 0, 0, ())
    tree = load(archive(member(b"x", b""), member(b"/", typeflag=b"5", mode=0o700, uid=4, mtime=9)), tmp_path)
    assert (tree.root.mode, tree.root.uid, tree.root.mtime) == (S_IFDIR | 0o700, 4, 9)
    with pytest.raises(InputError, match="names the root, which can only be a directory"):
        load(archive(member(b"./", b"x")), tmp_path)


def test_duplicate_members_last_wins(tmp_path):
    tree = load(archive(
        member(b"f", b"first"), member(b"f", b"second"),  # file over file
        member(b"d/", typeflag=b"5", mode=0o700, mtime=1), member(b"d/child", b"c"),
        member(b"d/", typeflag=b"5", mode=0o750, mtime=2, pax={b"SCHILY.xattr.user.x": b"1"}),  # dir over dir
        member(b"gone/sub/x", b"x"), member(b"gone", b"now a file"),  # file over a subtree
        member(b"was-file", b"f"), member(b"was-file/", typeflag=b"5"),  # dir over file
        member(b"t", b"target"), member(b"l", typeflag=b"1", linkname=b"t"),
        member(b"t", b"replaced"),  # the link keeps the inode it was made to
    ), tmp_path)
    t = tree.lookup
    assert t(b"f").content == b"second"
    d = t(b"d")
    assert (d.mode, d.mtime, d.xattrs, list(d.children)) == (S_IFDIR | 0o750, 2, ((b"user.x", b"1"),), [b"child"])
    assert t(b"gone").content == b"now a file"
    assert t(b"was-file").children == {}
    assert t(b"l").content == b"target" and t(b"t").content == b"replaced"
    assert not tree.root.is_link(b"l")  # its only name now: the home


def test_hard_links_one_inode(tmp_path):
    tree = load(archive(member(b"z/orig", b"o" * 100), member(b"a/first", typeflag=b"1", linkname=b"./z/orig"),
                        member(b"m", typeflag=b"1", linkname=b"/z/orig")), tmp_path)
    node = tree.lookup(b"z/orig")
    assert tree.lookup(b"a/first") is node and tree.lookup(b"m") is node
    homes = [p for p, n, _parent, link in tree.walk() if n is node and not link]
    assert homes == [b"/a/first"]  # the first name in depth-first name order
    run_passes(tree, Options())
    assert node.nlink == 3


def test_symlinks_keep_targets_verbatim(tmp_path):
    tree = load(archive(member(b"abs", typeflag=b"2", linkname=b"/etc/passwd", mode=0o755),
                        member(b"up", typeflag=b"2", linkname=b"../../../x")), tmp_path)
    assert tree.lookup(b"abs").payload == b"/etc/passwd" and tree.lookup(b"abs").mode == S_IFLNK | 0o777
    assert tree.lookup(b"up").payload == b"../../../x"


def test_empty_archive(tmp_path, cfsc):
    layer = tmp_path / "empty.tar"
    layer.write_bytes(bytes(10240))
    out = cfsc("compile", str(layer), "-o", "-", check=True).stdout
    assert out == image_of(b"/ 0 40755 2 0 0 0 0.0 - - -\n")


def test_sniff():
    layer = archive(member(b"a", b"x"))
    assert tar.sniff(layer[:4096])
    v7 = header(b"a", magic=b"", version=b"")
    assert tar.sniff(v7 + bytes(1024))
    assert tar.sniff(bytes(4096))
    assert not tar.sniff(b"/ 4096 40755 2 0 0 0 0.0 - - -\n")
    assert not tar.sniff(bytes(range(256)) * 4)


# -- compression, stdin, threads, the store ------------------------------------------------


def big_layer() -> tuple[bytes, list[Entry]]:
    """Small, inline, mid-sized and streamed (> WHOLE_MAX) files, with duplicates."""
    rnd = os.urandom
    big = rnd(5 * 1024 * 1024 + 3)
    entries = [Entry(b"", "dir"), Entry(b"big", data=big), Entry(b"big-again", data=big),
               Entry(b"dir", "dir")]
    entries += [Entry(b"dir/f%03d" % i, data=rnd(i * 97)) for i in range(120)]
    return from_entries(entries), entries


def test_compressions_and_stdin(tmp_path, cfsc):
    entries = [Entry(b"", "dir")] + [Entry(b"f%03d" % i, data=os.urandom(i * 300)) for i in range(60)]
    layer = from_entries(entries)
    want = image_of(dumpfile(entries, hardlinks=True))
    half = len(layer) // 2
    zc = zstandard.ZstdCompressor()
    skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"skip"
    variants = {
        "gz": gzip.compress(layer[:half]) + gzip.compress(layer[half:]),  # two gzip members
        "zst": zc.compress(layer[:half]) + skippable + zc.compress(layer[half:]),  # frames + a skippable one
        "xz": lzma.compress(layer[:half]) + lzma.compress(layer[half:]),  # two xz streams
    }
    for ext, data in variants.items():
        path = tmp_path / f"layer.tar.{ext}"
        path.write_bytes(data)
        assert cfsc("compile", str(path), "-o", "-", check=True).stdout == want, ext
    for ext, data in variants.items():  # detected on stdin too (test_detect has more)
        assert cfsc("compile", "-", "-o", "-", input=data, check=True).stdout == want, ext
    assert cfsc("compile", "--from", "tar", "-", "-o", "-", input=variants["zst"], check=True).stdout == want


def test_threads_and_store(tmp_path, cfsc):
    layer, entries = big_layer()
    path = tmp_path / "layer.tar"
    path.write_bytes(layer)
    want = image_of(dumpfile(entries, hardlinks=True))
    listings = []
    for threads in ("1", "2", "3"):
        store = tmp_path / f"store{threads}"
        out = cfsc("compile", str(path), "-o", "-", "--threads", threads, "--digest-store", str(store),
                   check=True).stdout
        assert out == want
        listings.append(store_listing(store))
        # every object is named by the fs-verity digest of its content
        for name, _size in listings[-1]:
            assert digest_file(store / name).hex() == name.replace("/", "")
    assert listings[0] == listings[1] == listings[2]
    # 64-byte files are inline, not in the store; duplicates are stored once
    assert len(listings[0]) == len({e.data for e in entries if e.kind == "reg" and len(e.data) > 64})
    # without a store: the same image, nothing written
    assert cfsc("compile", str(path), "-o", "-", check=True).stdout == want


# -- hostile and broken archives --------------------------------------------------------------


def hostile_cases():
    ok = member(b"ok", b"fine")
    good = archive(ok, member(b"big", b"b" * 3000))
    return {
        # name: (archive, message pattern, byte offset the message must name)
        "dotdot": (archive(ok, member(b"../escape", b"x")), r"member '../escape' at byte 1024: .*contains '\.\.'", 1024),
        "dotdot-inside": (archive(member(b"a/../../etc/passwd", b"x")), r"contains '\.\.'", 0),
        "dotdot-pax-path": (archive(member(b"safe", b"x", pax={b"path": b"x/../../y"})), r"contains '\.\.'", 1024),
        "symlink-then-file": (archive(member(b"lnk", typeflag=b"2", linkname=b"/etc"),
                                      member(b"lnk/passwd", b"pwned")),
                              r"member 'lnk/passwd' at byte 512: the path goes through the symlink 'lnk'", 512),
        "relative-symlink-then-file": (archive(member(b"d/", typeflag=b"5"),
                                               member(b"l", typeflag=b"2", linkname=b"d"), member(b"l/f", b"x")),
                                       r"goes through the symlink 'l'", 1024),
        "file-then-child": (archive(member(b"f", b"x"), member(b"f/child", b"y")), r"'f', which is not a directory",
                            1024),
        "link-dotdot": (archive(member(b"l", typeflag=b"1", linkname=b"../../etc/shadow")), r"contains '\.\.'", 0),
        "link-missing": (archive(member(b"l", typeflag=b"1", linkname=b"nowhere")), r"which does not exist", 0),
        "link-to-itself": (archive(member(b"d/a", b"a"), member(b"./d/a", typeflag=b"1", linkname=b"d//a")),
                           r"member '\./d/a' at byte 1024: hard link to itself \('d//a'\)", 1024),
        "link-to-itself-missing": (archive(member(b"a", typeflag=b"1", linkname=b"a")), r"which does not exist", 0),
        "path-too-long": (archive(member(b"f", b"x", pax={b"path": b"d/" * 2048 + b"f"})),
                          r"member name is a path of 4098 bytes: at most 4096", 5120),
        "link-path-too-long": (archive(member(b"t", b"x"), member(b"l", typeflag=b"1", pax={b"linkpath": b"a/" * 2100})),
                               r"member 'l' at byte 6144: hard-link target is a path of 4200 bytes: at most 4096", 6144),
        "link-to-later": (archive(member(b"l", typeflag=b"1", linkname=b"t"), member(b"t", b"x")),
                          r"which does not exist", 0),
        "link-to-dir": (archive(member(b"d/", typeflag=b"5"), member(b"l", typeflag=b"1", linkname=b"d")),
                        r"hard link to the directory 'd'", 512),
        "huge-declared-size": (archive(ok, member(b"huge", b"", size=1 << 40)), r"member 'huge' at byte 1024: truncated",
                               1024),
        "size-beyond-composefs": (archive(header(b"huge", raw={"size": base256(1 << 60, 12)})),
                                  r"declares 1152921504606846976 bytes", 0),
        "negative-size": (archive(header(b"neg", raw={"size": base256(-1, 12)})),
                          r"member 'neg' at byte 0: bad header: size -1 is out of range 0\.\.9223372036854775807", 0),
        "truncated-in-data": (good[:1024 + 512 + 1000], r"member 'big' at byte 1024: truncated: the archive ends at"
                              r" byte 2536, 2000 bytes short", 1024),
        "truncated-in-header": (good[:1024 + 100], r"byte 1024: truncated: the archive ends inside a header", 1024),
        "no-end-marker": (good[:-1024], r"byte 4608: truncated: the archive ends without its end-of-archive marker",
                          4608),
        "truncated-padding": (good[:1024 + 512 + 3000 + 10], r"member 'big' at byte 1024: truncated: the archive"
                              r" ends inside the padding", 1024),
        "bad-checksum": (archive(ok, header(b"x", checksum=12345)), r"byte 1024: bad header checksum \(stored 12345",
                         1024),
        "garbage-header": (archive(ok) [:1024] + b"not a tar header".ljust(512, b"!") + bytes(1024),
                           r"byte 1024: not a tar header", 1024),
        "bad-number": (archive(header(b"x", raw={"uid": b"12x4"})), r"byte 0: bad header: a numeric field", 0),
        "bad-pax-record": (archive(member(b"x", b"", pax={b"path": b"p"})[:512] + padded(b"99 path=p\n")
                                   + header(b"x")), r"bad PAX record", 0),
        "bad-pax-number": (archive(member(b"x", b"", pax={b"uid": b"-3"})), r"bad PAX record uid=-3", 1024),
        "bad-libarchive-base64": (archive(member(b"x", b"", pax={b"LIBARCHIVE.xattr.user.a": b"!!"})),
                                  r"PaxHeaders/x.* at byte 0: .*not base64", 0),
        "pax-without-member": (archive(member(b"x", b"", pax={b"path": b"p"})[:1024]), r"byte 0: an extended header"
                               r" is not followed by a member", 0),
        "gnu-sparse": (archive(member(b"sparse", b"", typeflag=b"S")), r"old GNU sparse files \(type S\) are not supported", 0),
        "pax-sparse-version": (archive(member(b"s", b"", pax={b"GNU.sparse.major": b"2", b"GNU.sparse.minor": b"0"})),
                               r"GNU sparse format 2\.0 is not supported: expected 0\.0, 0\.1 or 1\.0", 1024),
        **sparse_cases(),
        "unknown-type": (archive(member(b"what", b"", typeflag=b"Z")), r"unknown type flag b'Z'", 0),
        "huge-pax-header": (archive(header(b"x", b"x", size=64 << 20)), r"extended header of 67108864 bytes", 0),
        "bare-whiteout": (archive(member(b"d/.wh.", b"")), r"whiteout '\.wh\.' names no entry", 0),
        "device-out-of-range": (archive(member(b"dev", typeflag=b"3", devmajor=5000, devminor=1)),
                                r"device 5000:1", 0),
        "owner-out-of-range": (archive(member(b"x", b"", pax={b"uid": b"4294967296"})),
                               r"bad PAX record uid=4294967296: out of range 0\.\.4294967295 \(a 32-bit id\)", 1024),
        **out_of_range_cases(),
        "long-name-component": (archive(member(b"n" * 300, b"", pax={b"path": b"n" * 300})),
                                r"component of 300 bytes", 1024),
        "nul-in-pax-path": (archive(member(b"x", b"", pax={b"path": b"a\0b/../c"})),
                            r"member 'a\\x00b/\.\./c' at byte 1024: member name 'a\\x00b/\.\./c' contains a NUL byte", 1024),
        "nul-in-pax-linkpath": (archive(member(b"t", b"t"), member(b"l", typeflag=b"1", pax={b"linkpath": b"t\0\n"})),
                                r"hard-link target 't\\x00\\n' contains a NUL byte", 2048),
    }


def sparse_cases() -> dict:
    """Sparse maps that do not describe the member's data (PAX formats 0.0, 0.1, 1.0)."""
    def sparse(data: bytes = b"abc", **pax) -> bytes:
        return archive(member(b"s", data, pax={b"GNU.sparse." + k.encode(): v for k, v in pax.items()}))

    return {
        "sparse-no-map": (sparse(size=b"10"), r"GNU.sparse.\* records without a sparse map", 1024),
        "sparse-map-overlap": (sparse(b"abcd", map=b"0,2,1,2", numblocks=b"2", size=b"10"), r"region 1 \(1\+2\) overlaps",
                               1024),
        "sparse-map-past-end": (sparse(map=b"8,3", numblocks=b"1", size=b"10"), r"ends past the file's 10 bytes", 1024),
        "sparse-map-short-data": (sparse(map=b"0,2", numblocks=b"1", size=b"10"),
                                  r"its regions hold 2 bytes, the member's data is 3", 1024),
        "sparse-map-long-data": (sparse(map=b"0,2,5,2", numblocks=b"2", size=b"10"),
                                 r"its regions hold 4 bytes, the member's data is 3", 1024),
        "sparse-numblocks": (sparse(map=b"0,3", numblocks=b"2", size=b"10"), r"GNU.sparse.numblocks=2", 1024),
        "sparse-numblocks-5000-digits": (sparse(map=b"0,3", numblocks=b"1" * 5000, size=b"10"),
                                         r"GNU.sparse.numblocks=1111", 5632),
        "sparse-map-junk": (sparse(map=b"0,x", numblocks=b"1", size=b"10"), r"region 0 is 0,x", 1024),
        "sparse-size-junk": (sparse(map=b"0,3", numblocks=b"1", size=b"-1"), r"GNU.sparse.size=-1", 1024),
        "sparse-0.0-unpaired": (sparse(offset=b"0"), r"GNU.sparse.offset without", 1024),
        "sparse-0.0-numbytes-first": (sparse(numbytes=b"3"), r"GNU.sparse.offset and numbytes must alternate", 1024),
        "sparse-1.0-too-many-regions": (sparse(b"1048577\n".ljust(512, b"\0"), major=b"1", minor=b"0",
                                               realsize=b"10"), r"a sparse map of 1048577 regions: at most 1048576", 1024),
        "sparse-0.1-too-many-regions": (sparse(map=b"0,0," * (1 << 20) + b"0,0", numblocks=b"1048577", size=b"10"),
                                        r"a sparse map of 1048577 regions: at most 1048576", 4195328),
        "sparse-realsize-junk": (sparse(b"1\n0\n3\n".ljust(512, b"\0") + b"abc", major=b"1", minor=b"0",
                                        realsize=b"-1"), r"bad PAX record GNU.sparse.realsize=-1", 1024),
        "sparse-1.0-no-map": (sparse(b"3\n0\n", major=b"1", minor=b"0", realsize=b"10"),
                              r"\(format 1\.0\): it does not end within the member's data", 1024),
        "sparse-1.0-junk": (sparse(b"1\nzz\n".ljust(512, b"\0") + b"abc", major=b"1", minor=b"0", realsize=b"10"),
                            r"\(format 1\.0\): zz is not a decimal", 1024),
        "sparse-on-symlink": (archive(member(b"l", typeflag=b"2", linkname=b"t", pax={b"GNU.sparse.map": b""})),
                              r"not a regular file", 1024),
        "sparse-global": (archive(header(b"g", b"g", size=len(pax_records({b"GNU.sparse.map": b"0,1"})))
                                  + padded(pax_records({b"GNU.sparse.map": b"0,1"})), member(b"f", b"x")),
                          r"a global PAX header holds GNU.sparse.map", 0),
    }


def out_of_range_cases() -> dict:
    """Numbers a member cannot have (issue #13: an mtime beyond 64 bits was reduced modulo 2^64,
    to -1 say): every header field and PAX record, octal, base-256 or decimal, is refused with
    the member named, as GNU tar refuses them, instead of being wrapped or cut."""
    time_range = r"out of range -9223372036854775808\.\.9223372036854775807 \(a 64-bit time\)"
    size_range = r"out of range 0\.\.9223372036854775807 \(a 64-bit file size\)"
    id_range = r"out of range 0\.\.4294967295 \(a 32-bit id\)"
    globals_ = pax_records({b"mtime": b"9" * 25})
    return {
        "pax-mtime-huge": (archive(member(b"f", b"x", pax={b"mtime": b"9" * 30})),
                           r"member 'f' at byte 1024: bad PAX record mtime=9{30}: " + time_range, 1024),
        "pax-mtime-2^64-1": (archive(member(b"f", b"x", pax={b"mtime": b"18446744073709551615"})), time_range, 1024),
        "pax-mtime-below": (archive(member(b"f", b"x", pax={b"mtime": b"-9223372036854775808.5"})), time_range, 1024),
        "pax-mtime-digits": (archive(member(b"f", b"x", pax={b"mtime": b"1" * 5000 + b".5"})),
                             r"mtime=1{40}… \(5002 bytes\): " + time_range, 5632),
        "pax-global-mtime": (archive(header(b"g", b"g", size=len(globals_)) + padded(globals_),
                                     member(b"f", b"x")), r"member 'f' at byte 1024: bad PAX record mtime=9{25}", 1024),
        "pax-atime-huge": (archive(member(b"f", b"x", pax={b"atime": b"9" * 30})), r"atime=9{30}: " + time_range, 1024),
        "pax-ctime-bad": (archive(member(b"f", b"x", pax={b"ctime": b"1e9"})),
                          r"bad PAX record ctime=1e9: expected a decimal time", 1024),
        "pax-size-huge": (archive(member(b"f", b"x", pax={b"size": b"9" * 30})), r"size=9{30}: " + size_range, 1024),
        "pax-uid-digits": (archive(member(b"f", b"x", pax={b"uid": b"9" * 5000})), r"uid=9{40}… \(5000 bytes\): "
                           + id_range, 5632),
        "pax-gid-huge": (archive(member(b"f", b"x", pax={b"gid": b"4294967296"})), r"gid=4294967296: " + id_range,
                         1024),
        "pax-uid-fraction": (archive(member(b"f", b"x", pax={b"uid": b"1.5"})),
                             r"bad PAX record uid=1\.5: expected a decimal number", 1024),
        "b256-mtime-88-bits": (archive(member(b"f", b"x", raw={"mtime": base256((1 << 88) - 1, 12)})),
                               r"member 'f' at byte 0: bad header: mtime 309485009821345068724781055 is " + time_range,
                               0),
        "b256-mtime-negative": (archive(member(b"f", b"x", raw={"mtime": base256(-(1 << 80), 12)})),
                                r"bad header: mtime -1208925819614629174706176 is " + time_range, 0),
        "b256-size-dir": (archive(member(b"d", b"", b"5", raw={"size": base256(1 << 70, 12)})),
                          r"member 'd' at byte 0: bad header: size 1180591620717411303424 is " + size_range, 0),
        "b256-uid-negative": (archive(member(b"f", b"x", raw={"uid": base256(-1, 8)})), r"uid -1 is " + id_range, 0),
        "b256-gid-huge": (archive(member(b"f", b"x", raw={"gid": base256(1 << 40, 8)})),
                          r"gid 1099511627776 is " + id_range, 0),
        "b256-mode-negative": (archive(member(b"f", b"x", raw={"mode": base256(-1, 8)})),
                               r"mode -1 is out of range 0\.\.65535 \(the file type and permission bits\)", 0),
        "octal-mode-above-16-bits": (archive(member(b"f", b"x", raw={"mode": b"77777777"})),
                                     r"mode 16777215 is out of range 0\.\.65535", 0),
        "b256-odd-first-byte": (archive(member(b"f", b"x", raw={"mtime": b"\xc0" + bytes(11)})),
                                r"byte 0: bad header: a numeric field is neither octal nor base-256", 0),
        "b256-extension-size": (archive(header(b"x", b"x", raw={"size": base256(1 << 64, 12)}) + bytes(512)),
                                r"member 'x' at byte 0: bad header: size 18446744073709551616 is " + size_range, 0),
        "b256-device-negative": (archive(member(b"c", typeflag=b"3", raw={"devmajor": base256(-1, 8)})),
                                 r"device -1:0: composefs stores majors up to 4095", 0),
    }


def _sparse_files(src: Path) -> None:
    """Sparse files of every layout GNU tar maps differently (holes found by SEEK_HOLE)."""
    src.mkdir()
    layouts = {"hole-data-hole": [(1 << 20, b"mid")], "data-hole-data": [(0, b"head"), (3 << 20, b"tail")],
               "many": [(i * 8192, b"%d" % i) for i in range(300)]}  # a 1.0 map over several blocks
    for name, pieces in layouts.items():
        with open(src / name, "wb") as f:
            for offset, data in pieces:
                f.seek(offset)
                f.write(data)
            f.truncate(max(offset + len(data) for offset, data in pieces) + (2 << 20 if name != "data-hole-data" else 0))
    (src / "all-hole").write_bytes(b"")
    os.truncate(src / "all-hole", 5 << 20)
    (src / "tiny-hole").write_bytes(b"")
    os.truncate(src / "tiny-hole", 40)  # all zeros, inline


@pytest.mark.parametrize("version", ["0.0", "0.1", "1.0"])
def test_pax_sparse_files_as_gnu_tar_extracts_them(version, tmp_path, cfsc):
    """GNU tar's PAX sparse formats (Go's archive/tar reads them too, so umoci and
    containers/storage extract them; they were refused): the holes are zeros, the name and
    size are the real ones."""
    src = tmp_path / "src"
    _sparse_files(src)
    layer = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=posix", f"--sparse-version={version}", "-C", str(src), "-cf",
                    str(layer), "."], check=True)
    assert layer.stat().st_size * 4 < sum(p.stat().st_size for p in src.iterdir())  # the holes are not in it
    assert b"GNU.sparse." in layer.read_bytes()
    check_against_extraction(cfsc, layer, tmp_path)


def test_a_terabyte_sparse_file_from_gnu_tar(tmp_path, cfsc):
    """GNU tar's map of a 1 TiB file holding 12 bytes: compiled without reading a terabyte of
    zeros, the store object as sparse as the file, its digest the tree of those zeros."""
    src = tmp_path / "src"
    src.mkdir()
    pieces = [(0, b"head"), (600 << 30, b"mid!"), ((1 << 40) - 4, b"tail")]
    with open(src / "disk.img", "wb") as f:
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
    layer = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=posix", "-C", str(src), "-cf", str(layer), "."], check=True)
    store = tmp_path / "s"
    cfsc("compile", str(layer), "-o", str(tmp_path / "x.cfs"), "--digest-store", str(store), check=True)
    hasher = FsVerityHasher()
    at = 0
    for offset, data in pieces:
        hasher.update_zeros(offset - at)
        hasher.update(data)
        at = offset + len(data)
    digest = hasher.digest()
    obj = store / payload_path(digest).decode()
    st = obj.stat()
    assert st.st_size == 1 << 40 and st.st_blocks * 512 <= 1 << 20
    with open(obj, "rb") as f:
        for offset, data in pieces:
            f.seek(offset)
            assert f.read(len(data)) == data
    dump = cfsc("dump", str(tmp_path / "x.cfs"), check=True).stdout
    assert b"/disk.img %d " % (1 << 40) in dump and digest.hex().encode() in dump


def test_sparse_archive_is_reproducible(tmp_path, cfsc):
    """`check --reproducible` reorders the members: a sparse member ends where its data regions
    end, not at its file size (the reordered archive was cut wrong and lost entries)."""
    src = tmp_path / "src"
    _sparse_files(src)
    (src / "d").mkdir()
    (src / "d" / "after").write_bytes(b"after the sparse ones")
    layer = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=posix", "--sparse-version=1.0", "-C", str(src), "-cf", str(layer),
                    "."], check=True)
    p = cfsc("check", "--reproducible", str(layer))
    assert p.returncode == 0 and p.stdout.decode().endswith("one digest\n"), p.stdout.decode()


def test_sparse_data_through_every_reading_path(tmp_path):
    """A crafted 0.1 member read inline, whole and streamed: the same bytes as the file."""
    def sparse(name: bytes, size: int, regions: list[tuple[int, bytes]]) -> bytes:
        numbers = b",".join(b"%d,%d" % (o, len(d)) for o, d in regions)
        return member(b"GNUSparseFile.0/" + name, b"".join(d for _, d in regions),
                      pax={b"GNU.sparse.map": numbers, b"GNU.sparse.numblocks": b"%d" % len(regions),
                           b"GNU.sparse.name": name, b"GNU.sparse.size": b"%d" % size})

    def expanded(size: int, regions: list[tuple[int, bytes]]) -> bytes:
        out = bytearray(size)
        for o, d in regions:
            out[o:o + len(d)] = d
        return bytes(out)

    cases = {b"inline": (50, [(10, b"abc"), (40, b"z")]),
             b"whole": (100_000, [(0, b"x" * 5000), (70_000, b"y" * 100)]),
             b"streamed": (9 << 20, [(1, b"q" * 3000), ((4 << 20) - 7, b"w" * (2 << 20)), ((9 << 20) - 1, b"e")]),
             b"empty-map": (3 << 20, [])}
    tree = load(archive(*(sparse(n, size, r) for n, (size, r) in cases.items())), tmp_path,
                digest_store=str(tmp_path / "s"))
    for name, (size, regions) in cases.items():
        node = tree.lookup(name)
        assert node.size == size
        data = expanded(size, regions)
        if node.content is not None:
            assert node.content == data
        else:
            assert (tmp_path / "s" / node.payload.decode()).read_bytes() == data


def test_sparse_holes_read_as_zeros_add_up_across_members(tmp_path):
    """Holes handed out as zeros (`chunks`, `read`) are bounded over the archive's total:
    three members of 400 MiB holes each, read as bytes; the third goes past 1 GiB plus 1024
    bytes per archive byte and is refused, naming it."""
    import io

    data = archive(*(member(b"s%d" % i, b"a", pax={b"GNU.sparse.map": b"0,1", b"GNU.sparse.numblocks": b"1",
                                                   b"GNU.sparse.size": b"%d" % (400 << 20)}) for i in range(3)))
    reader = tarstream.TarReader(io.BytesIO(data))
    seen = []
    with pytest.raises(InputError, match=r"member 's2' at byte 5120: sparse holes read as \d+ zero bytes so far:"
                                         r" refused as a bomb"):
        for m in reader.members():
            seen.append(sum(map(len, reader.chunks(m.size))))
    assert seen == [400 << 20, 400 << 20]


def test_sparse_holes_stay_holes(tmp_path):
    """A layer of 2^53 bytes of holes compiles (its digest by runs): a bomb only if its holes
    were read as zeros.  With a store, a 64 GiB sparse file's object keeps its holes (a few
    blocks on disk), its digest the one the runs give; one the store's file system cannot
    hold is one line naming the store."""
    def sparse(name: bytes, size: int, regions: list[tuple[int, bytes]]) -> bytes:
        numbers = b",".join(b"%d,%d" % (o, len(d)) for o, d in regions)
        return member(name, b"".join(d for _, d in regions),
                      pax={b"GNU.sparse.map": numbers, b"GNU.sparse.numblocks": b"%d" % len(regions),
                           b"GNU.sparse.size": b"%d" % size})

    huge = sparse(b"huge", 1 << 53, [(0, b"a"), ((1 << 53) - 1, b"z")])
    tree = load(archive(huge), tmp_path)
    hasher = FsVerityHasher()
    hasher.update(b"a")
    hasher.update_zeros((1 << 53) - 2)
    hasher.update(b"z")
    assert tree.lookup(b"huge").digest == hasher.digest()

    big = sparse(b"big", 64 << 30, [(1 << 30, b"x" * 5000), ((64 << 30) - 3, b"end")])
    store = tmp_path / "s"
    tree = load(archive(big), tmp_path, digest_store=str(store))
    node = tree.lookup(b"big")
    st = os.stat(store / node.payload.decode())
    assert st.st_size == 64 << 30 and st.st_blocks * 512 <= 1 << 20
    with open(store / node.payload.decode(), "rb") as f:
        f.seek(1 << 30)
        assert f.read(5001) == b"x" * 5000 + b"\0"
        f.seek((64 << 30) - 4)
        assert f.read() == b"\0end"
    hasher = FsVerityHasher()
    hasher.update_zeros(1 << 30)
    hasher.update(b"x" * 5000)
    hasher.update_zeros((63 << 30) - 5003)
    hasher.update(b"end")
    assert node.digest == hasher.digest()

    with pytest.raises(OutputError, match=r"s2: cannot write a store object: its file system holds no file reaching byte 9007199254740991"):
        load(archive(huge), tmp_path, digest_store=str(tmp_path / "s2"))
    assert store_listing(tmp_path / "s2") == []


HOSTILE = hostile_cases()


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_a_located_error(case, tmp_path):
    data, pattern, offset = HOSTILE[case]
    with pytest.raises(InputError, match=pattern) as e:
        load(data, tmp_path, digest_store=str(tmp_path / "store"))
    assert f"byte {offset}" in str(e.value) and str(e.value).startswith(str(tmp_path / "layer0.tar") + ": ")
    assert str(e.value).isprintable()  # one line, control bytes escaped
    assert store_listing(tmp_path / "store") == []  # no object, no temp file


def test_absolute_and_odd_paths_stay_inside(tmp_path):
    tree = load(archive(member(b"/abs/file", b"a"), member(b"//x//y/./z/", typeflag=b"5"),
                        member(b"./././dot", b"d")), tmp_path)
    assert tree.lookup(b"abs/file").content == b"a"
    assert tree.lookup(b"x/y/z").is_dir()
    assert tree.lookup(b"dot").content == b"d"
    assert sorted(tree.root.children) == [b"abs", b"dot", b"x"]


def test_paths_up_to_path_max(tmp_path, cfsc):
    """A member's path is at most PATH_MAX bytes as an absolute path (no extractor can create a
    longer one; `limits.check_archive_path`, the TOC's rule too).  A 4 MB PAX path made 2 million directories in memory
    (2 GB, 24 s) and an image; now it is refused at once, in a one-line message that shows the
    start of the name and its length."""
    longest = b"/".join([b"d" * 254] * 16)  # 16 components of 255 bytes with their `/`: 4080
    longest += b"/" + b"f" * (4096 - 4080 - 2)
    tree = load(archive(member(b"x", b"x", pax={b"path": longest})), tmp_path)
    assert tree.lookup(longest).content == b"x"
    deep = tmp_path / "deep.tar"
    deep.write_bytes(archive(member(b"f", b"x", pax={b"path": b"a/" * 2_000_000 + b"f"})))
    p = cfsc("compile", str(deep), "-o", str(tmp_path / "out.cfs"))
    err = p.stderr.decode()
    assert p.returncode == 2 and err.count("\n") == 1 and len(err) < 600, err[:600]
    assert "… (4000001 bytes)' at byte " in err and "a path of 4000002 bytes: at most 4096, as an extracted layer can have" in err
    assert not (tmp_path / "out.cfs").exists()


def test_hostile_on_the_command_line(tmp_path, cfsc):
    """Exit 2, one `error:` line naming the member and offset, no image, no temp objects —
    also when the archive breaks off inside a large member that was being streamed."""
    layer, _entries = big_layer()
    cut = layer.index(b"big-again") + 512 * 2 + (3 << 20)  # 3 MiB into the second big file
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(gzip.compress(layer[:cut]))
    out = tmp_path / "out.cfs"
    for threads in ("1", "2"):
        p = cfsc("compile", str(broken), "-o", str(out), "--threads", threads, "--digest-store",
                 str(tmp_path / "store"))
        assert p.returncode == 2
        lines = p.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {broken}: member './big-again' at byte "), lines
        assert "truncated" in lines[0]
        assert not out.exists()
        assert not [n for n, _ in store_listing(tmp_path / "store") if n.startswith(".tmp")]
    corrupt = bytearray(gzip.compress(layer))
    corrupt[len(corrupt) // 2] ^= 0xFF
    broken.write_bytes(corrupt)
    p = cfsc("compile", str(broken), "-o", str(out))
    assert p.returncode == 2 and "cannot" in p.stderr.decode() and not out.exists()


def offsets(data: bytes) -> dict[bytes, int]:
    """Each member's header offset (the entry header, after any extension headers)."""
    out = {}
    pos = 0
    while data[pos:pos + 512] != bytes(512):
        block = data[pos:pos + 512]
        size = int(block[124:136].strip(b"\0 ") or b"0", 8)
        if block[156:157] in b"0\x0057":
            out[block[:100].rstrip(b"\0")] = pos
        pos += 512 + size + (-size % 512)
    return out


def test_decompression_errors_are_located(tmp_path, cfsc):
    """A truncated or corrupt compressed archive: the member being read (or the one before, or
    the end marker), the archive offset where the good data ends, the compressed bytes read."""
    big = os.urandom(300_000)
    layer = archive(member(b"small", b"s" * 100), member(b"big", big), member(b"after", b"a" * 1000))
    at = offsets(layer)
    path = tmp_path / "cut.tar.xz"
    xz = lzma.compress(layer)
    path.write_bytes(xz[:150_000])  # inside the data of "big"
    good = len(lzma.LZMADecompressor().decompress(xz[:150_000]))
    assert at[b"big"] + 512 < good < at[b"after"]
    p = cfsc("compile", str(path), "-o", str(tmp_path / "x.cfs"))
    assert p.returncode == 2
    assert p.stderr.decode() == (f"error: {path}: member 'big' at byte {at[b'big']}: truncated: the xz data ends"
                                 f" inside a stream (150000 compressed bytes read) at byte {good} of the archive\n")
    p = cfsc("compile", "-", "-o", str(tmp_path / "x.cfs"), input=path.read_bytes())  # stdin: the same
    assert p.stderr.decode().startswith(f"error: <stdin>: member 'big' at byte {at[b'big']}: truncated: the xz data")

    # A gzip member whose CRC fails, ending where "after" starts: located in "big", the member
    # it ends in (ISA-L checks the CRC in the call that inflates the end, and that call's data,
    # 64 KiB at most, goes with the failure), with the compressed bytes read.
    first = bytearray(gzip.compress(layer[:at[b"after"]]))
    first[-8] ^= 1  # the CRC
    path = tmp_path / "crc.tar.gz"
    path.write_bytes(bytes(first) + gzip.compress(layer[at[b"after"]:]))
    p = cfsc("compile", str(path), "-o", str(tmp_path / "x.cfs"))
    err = p.stderr.decode()
    assert p.returncode == 2
    assert p.stderr.decode().startswith(f"error: {path}: member 'big' at byte {at[b'big']}: cannot decompress (gzip)"
                                        " at byte "), err
    where = int(re.search(r" at byte (\d+) of the archive \(\d+ compressed bytes read\): ", err)[1])
    assert at[b"big"] < where <= at[b"after"] and err.endswith(": member 1: Error -6 Incorrect checksum found\n"), err

    # Trailing garbage: after the end-of-archive marker.
    path = tmp_path / "garbage.tar.gz"
    path.write_bytes(gzip.compress(layer) + b"garbage")
    p = cfsc("compile", str(path), "-o", str(tmp_path / "x.cfs"))
    err = p.stderr.decode()
    assert p.returncode == 2
    assert err.startswith(f"error: {path}: byte {len(layer)}: cannot decompress (gzip) after the end-of-archive"
                          " marker ("), err
    assert "Not a gzipped file" in err and not (tmp_path / "x.cfs").exists()


def test_negative_pax_times_as_gnu_tar_extracts_them(tmp_path):
    """Fractions past the nanosecond round towards minus infinity (GNU tar as root, `-xp`)."""
    values = [b"-1.0000000001", b"-0.0000000001", b"-1.9999999999", b"-1.5", b"-2", b"-1.000000000000",
              b"12.1234567891", b"-0.1", b"0.9999999999"]
    layer = archive(*[member(b"f%d" % i, b"", pax={b"mtime": v}) for i, v in enumerate(values)])
    out = tmp_path / "x"
    out.mkdir()
    (tmp_path / "t.tar").write_bytes(layer)
    subprocess.run(["tar", "-xpf", str(tmp_path / "t.tar"), "-C", str(out)], check=True, capture_output=True)
    tree = load(layer, tmp_path)
    for i, v in enumerate(values):
        node = tree.lookup(b"f%d" % i)
        want = divmod(os.lstat(out / f"f{i}").st_mtime_ns, 1_000_000_000)
        assert (node.mtime, node.mtime_nsec) == want, v
    assert (tree.lookup(b"f0").mtime, tree.lookup(b"f0").mtime_nsec) == (-2, 999_999_999)


def test_conflicting_options(tmp_path):
    with pytest.raises(UsageError):
        load(archive(), tmp_path, skip_xattrs=True, user_xattrs=True)


def test_registered_and_detected(tmp_path):
    path = tmp_path / "x.tar.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(big_layer()[0]))
    assert frontends.detect(str(path)) == "tar"


# GNU tar refuses these too (exit 2, "out of range" / "out of time_t range"); mode and negative
# base-256 ids it takes, masked or wrapped, where cfsc refuses them (the tree could not hold them).
REFUSED_BY_GNU_TAR = ["pax-mtime-huge", "pax-mtime-2^64-1", "pax-mtime-below", "pax-atime-huge", "pax-size-huge",
                      "pax-gid-huge", "b256-mtime-88-bits", "b256-mtime-negative", "b256-size-dir"]


@pytest.mark.parametrize("case", REFUSED_BY_GNU_TAR)
def test_numbers_gnu_tar_refuses_too(case, tmp_path):
    path = tmp_path / "t.tar"
    path.write_bytes(HOSTILE[case][0])
    p = subprocess.run(["tar", "-tvf", str(path)], capture_output=True)
    assert p.returncode == 2 and b"range" in p.stderr, p.stderr


def test_numbers_at_the_edges_of_their_ranges(tmp_path):
    """The extreme values a member may have are kept exactly (and the image holds them)."""
    low, high = -(1 << 63), (1 << 63) - 1
    layer = archive(
        member(b"pax-low", b"", pax={b"mtime": b"%d" % low, b"uid": b"4294967295", b"gid": b"0",
                                     b"atime": b"%d.999999999" % high}),
        member(b"pax-high", b"", pax={b"mtime": b"000%d.9999999999" % high}),
        member(b"b256", b"", raw={"mtime": base256(low, 12), "uid": base256((1 << 32) - 1, 8),
                                  "mode": base256(0o100755, 8)}),
        member(b"nul-first", b"", raw={"mode": b"\0" + b"7777777"}),  # a NUL ends the field: 0, as GNU tar
    )
    tree = load(layer, tmp_path)
    t = tree.lookup
    assert (t(b"pax-low").mtime, t(b"pax-low").uid) == (low, (1 << 32) - 1)
    assert (t(b"pax-high").mtime, t(b"pax-high").mtime_nsec) == (high, 999_999_999)
    assert (t(b"b256").mtime, t(b"b256").uid, t(b"b256").mode) == (low, (1 << 32) - 1, S_IFREG | 0o755)
    assert t(b"nul-first").mode == S_IFREG
    image(tree)


OCTAL_FIELD = st.binary(max_size=12).map(lambda b: bytes(b"01234567 \0"[x % 10] for x in b))


@settings(max_examples=500, deadline=None)
@given(st.lists(OCTAL_FIELD, min_size=5, max_size=5), st.sampled_from(["plain", "nul", "space"]))
def test_fast_header_numbers_agree_with_the_reference(fields, style):
    """`fast_header_numbers` (one `int` per field) reads what `header_numbers` (the careful
    reading) reads, or leaves the field to it, for any mix of octal digits, spaces and NULs."""
    if style == "nul":
        fields = [b"\0" + f for f in fields]
    elif style == "space":
        fields = [b" " + f + b" " for f in fields]
    widths = {"mode": 8, "uid": 8, "gid": 8, "size": 12, "mtime": 12}
    raw = {name: f[:w].ljust(w, b"\0") for (name, w), f in zip(widths.items(), fields, strict=True)}
    block = header(b"x", raw=raw)
    h = tarstream.HEADER.unpack(block)
    assert not block[100:148].translate(None, b"01234567 \0")  # the fast path's own condition
    fast = tarstream.fast_header_numbers(h)
    try:
        reference = tarstream.header_numbers(h)
    except ValueError:
        reference = None
    assert fast is None or fast == reference, (raw, fast, reference)


def test_finding_mtime_beyond_64_bits_on_the_command_line(tmp_path, cfsc):
    """Issue #13: `mtime=999…9` became a time modulo 2^64; now one located line, exit 2."""
    for name, layer in (("pax", archive(member(b"./f", b"x", pax={b"mtime": b"9" * 30}))),
                        ("b256", archive(member(b"./f", b"x", raw={"mtime": base256((1 << 88) - 1, 12)})))):
        path = tmp_path / f"{name}.tar"
        path.write_bytes(layer)
        p = cfsc("compile", str(path), "-o", str(tmp_path / "out.cfs"))
        lines = p.stderr.decode().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and not (tmp_path / "out.cfs").exists(), lines
        assert lines[0].startswith(f"error: {path}: member './f' at byte ") and "mtime" in lines[0]
        assert "out of range -9223372036854775808..9223372036854775807 (a 64-bit time)" in lines[0]


# -- the name cache and the reference walk --------------------------------------------------------

class _Forgetful(dict):
    """A parent cache that never has the parent: every member takes `resolve`, the reference."""

    def get(self, key, default=None):
        return default

    def __setitem__(self, key, value):
        pass


class _ReferenceBuilder(tar._Builder):
    @property
    def dirs(self):
        return _Forgetful()

    @dirs.setter
    def dirs(self, value):
        pass


COMPONENTS = [b"a", b"b", b"c", b"a", b"b", b".", b"", b".wh.a", b".wh.b", b".wh..wh..opq", b"n" * 255]
ODD_COMPONENTS = [b"..", b"n" * 256, b".wh..wh.plnk", b".wh."]
member_specs = st.tuples(
    st.lists(st.sampled_from(COMPONENTS * 4 + ODD_COMPONENTS), min_size=1, max_size=3).map(b"/".join),
    st.sampled_from([b"0", b"5", b"2", b"1", b"3"]),
    st.lists(st.sampled_from(COMPONENTS[:4]), min_size=1, max_size=2).map(b"/".join),
    st.sampled_from([b"", b"/", b"./"]),
)


def _layer(specs) -> bytes:
    parts = []
    for path, kind, link, lead in specs:
        parts.append(member(lead + path + (b"/" if kind == b"5" else b""), b"x" if kind == b"0" else b"",
                            kind, linkname=link, pax={b"path": lead + path} if len(path) > 99 else None))
    return archive(*parts)


def _outcome(layers, tmp_path, keep):
    try:
        return image(load(layers, tmp_path, keep_whiteouts=keep))
    except InputError as e:
        return str(e)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(member_specs, max_size=6), min_size=1, max_size=2), st.booleans())
def test_cached_parents_agree_with_the_reference_walk(tmp_path_factory, layers, keep):
    """The fast path (a member's parent found by its spelling in `dirs`) and `resolve` (clean the
    name, walk from the root) give the same tree or the same error, for odd names (`.`, `..`,
    empty components, whiteouts, long names) over one or two layers."""
    tmp_path = tmp_path_factory.mktemp("layers")
    data = [_layer(specs) for specs in layers]
    fast = _outcome(data, tmp_path, keep)
    saved = tar._Builder
    tar._Builder = _ReferenceBuilder
    try:
        reference = _outcome(data, tmp_path, keep)
    finally:
        tar._Builder = saved
    assert fast == reference


@pytest.mark.parametrize("compress", [lambda b: gzip.compress(b, 1), lambda b: lzma.compress(b, preset=0),
                                      zstandard.compress], ids=["gzip", "xz", "zstd"])
def test_read_ahead_gives_the_same_members_and_closes_the_input(tmp_path, compress):
    """zstd and xz are decompressed in their own thread (gzip inline: ISA-L holds the GIL):
    the members and data are those of the plain archive, and a reader closed early stops that
    thread, which closes the input (or closes it itself)."""
    files = [member(b"f%d" % i, os.urandom(i * 20_000)) for i in range(24)]  # more chunks than are read ahead
    layer = archive(*files)
    plain, packed = tmp_path / "l.tar", tmp_path / "l.tar.c"
    plain.write_bytes(layer)
    packed.write_bytes(compress(layer))

    def listing(path):
        with tarstream.TarReader(str(path)) as r:
            return [(m.path, m.offset, r.read(m.size) if m.size else b"") for m in r.members()]

    assert listing(packed) == listing(plain)
    r = tarstream.TarReader(str(packed))
    next(iter(r.members()))
    r.close()
    assert (r._ahead is None) == (packed.read_bytes()[:2] == b"\x1f\x8b")
    if r._ahead is not None:
        r._ahead._thread.join()
    assert r._raw.closed
