"""Reading images back: reference dumps, and round trips through the reader and the dump.

Three properties, on every conformance case and on random trees:

* compile → read → compile gives the same bytes (the reader recovers everything the image
  layout depends on, hard-link homes included);
* compile → dump → compile gives the same bytes (the dump is a faithful dumpfile);
* read(compile(t)) equals `normalised(t)` — what an image can say about a tree.
"""

from __future__ import annotations

import gzip

import pytest
from cfsc.backends.erofs.reader import Image
from cfsc.base.options import Options
from cfsc.base.tree import S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Inode, Tree
from cfsc.build import compile_tree as build_image
from cfsc.frontends import dumpfile
from cfsc.frontends.image import read_tree
from cfsc.passes.resolve_hardlinks import resolve_hardlinks
from hypothesis import HealthCheck, given, settings

from tests.helpers.data import CONFORMANCE, cases, image_of, read_input
from tests.helpers.roundtrip import dump_of, home_first_in_dfs, lossless
from tests.helpers.strategies import trees

IMAGES = sorted((CONFORMANCE / "upstream-images").iterdir())
DUMPS = sorted((CONFORMANCE / "upstream-dumps").iterdir())
GOOD = [c for c in cases() if c.get("expect") != "error"]
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def unzip(path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def compile_tree(tree: Tree, version: int | None = None) -> bytes:
    options = Options() if version is None else Options(min_version=version, max_version=version)
    return build_image(tree, options)




def reread(image: bytes) -> Tree:
    return read_tree(Image(image, "test.cfs"))


# -- reference output ------------------------------------------------------------------

def _case_of_dump(name: str) -> tuple[dict, int]:
    stem, version = name.split(".dump")[0].rsplit(".v", 1)
    case = next(c for c in GOOD if c["input"].split(".dump")[0] == stem)
    return case, int(version)


@pytest.mark.parametrize("dump", DUMPS, ids=lambda p: p.name)
def test_dump_matches_composefs_info(dump):
    """Every reference dump: of the upstream image where one is stored, else of ours."""
    case, version = _case_of_dump(dump.name)
    stored = [p for p in IMAGES if p.name.startswith(dump.name.split(".dump")[0] + ".cfs")]
    if stored:
        image = unzip(stored[0])
    else:
        image = image_of(read_input(case["input"]), min_version=version, max_version=version, strict=case["strict"])
    assert dump_of(image) == unzip(dump)


def test_every_reference_dump_and_image_is_covered():
    assert len(DUMPS) == 24 and len(IMAGES) == 14
    for image in IMAGES:
        assert any(d.name.startswith(image.name.split(".cfs")[0] + ".dump") for d in DUMPS)


@pytest.mark.parametrize("path", IMAGES, ids=lambda p: p.name)
def test_upstream_images_reencode_byte_for_byte(path):
    data = unzip(path)
    image = Image(data, path.name)
    assert compile_tree(read_tree(image), image.version) == data


# -- conformance round trips -----------------------------------------------------------

@pytest.mark.parametrize("case", GOOD, ids=[c["input"] for c in GOOD])
@pytest.mark.parametrize("version", [0, 1])
def test_conformance_round_trips(case, version):
    first = image_of(read_input(case["input"]), min_version=version, max_version=version, strict=case["strict"])
    assert compile_tree(reread(first), version) == first, "compile → read → compile"
    text = dump_of(first)
    again = image_of(text, min_version=version, max_version=version, strict=True)
    assert again == first, "compile → dump → compile"


def test_hardlink_home_is_recovered_when_the_link_comes_first():
    # /a/x (the link) is met before /b/y (the home) breadth-first; i_ino says which is home.
    # (/a/z is numbered in between; without it either choice would give the same bytes.)
    dump = (b"/ 4096 40755 2 0 0 0 0.0 - - -\n/a 0 40755 2 0 0 0 0.0 - - -\n/b 0 40755 2 0 0 0 0.0 - - -\n"
            b"/a/x 0 @100644 1 0 0 0 0.0 /b/y - -\n/a/z 0 100644 1 0 0 0 0.0 - - -\n"
            b"/b/y 3 100644 2 0 0 0 0.0 - abc -\n")
    image = image_of(dump)
    tree = reread(image)
    assert tree.root.children[b"a"].is_link(b"x") and not tree.root.children[b"b"].is_link(b"y")
    assert compile_tree(tree) == image


@pytest.mark.parametrize("version", [0, 1])
def test_hardlinked_whiteout_is_homed_where_its_directory_is_marked(version):
    # Nothing is numbered between /d/x and /e/x, so i_ino cannot tell which is home; the
    # home's directory alone carries the whiteouts marker (and, in v1, opaque=x).
    tree = dumpfile.loads(b"/ 4096 40755 2 0 0 0 0.0 - - -\n/d 0 40755 2 0 0 0 0.0 - - -\n"
                          b"/e 0 40755 2 0 0 0 0.0 - - -\n/e/x 0 20644 2 0 0 0 0.0 - - -\n"
                          b"/d/x 0 @20644 2 0 0 0 0.0 /e/x - -\n", Options())
    image = compile_tree(tree, version)
    read = reread(image)
    assert read.root.children[b"d"].is_link(b"x") and not read.root.children[b"e"].is_link(b"x")
    assert compile_tree(read, version) == image


def test_device_size_that_only_made_the_inode_extended_survives():
    dump = b"/ 4096 40755 2 0 0 0 0.0 - - -\n/c 5000000000 20644 1 0 0 259 0.0 - - -\n/f 0 10644 1 0 0 0 0.0 - - -\n"
    image = image_of(dump)
    assert compile_tree(reread(image)) == image


def test_hardlink_to_a_directory_round_trips():
    dump = b"/ 4096 40755 2 0 0 0 0.0 - - -\n/d 0 40755 2 0 0 0 0.0 - - -\n/l 0 @100644 1 0 0 0 0.0 /d - -\n"
    image = image_of(dump)
    tree = reread(image)
    assert tree.root.children[b"l"] is tree.root.children[b"d"]
    assert compile_tree(tree) == image


def test_lossy_overlay_keys_are_dropped_like_upstream():
    """libcomposefs' reader drops the whiteout markers whoever set them; a user's own
    `trusted.overlay.whiteout` on a regular file reads back as a whiteout."""
    dump = (b"/ 4096 40755 2 0 0 0 0.0 - - -\n/a 0 100644 1 0 0 0 0.0 - - - user.overlay.whiteout=1 user.k=v\n"
            b"/b 0 100644 1 0 0 0 0.0 - - - trusted.overlay.whiteout=\n")
    tree = reread(image_of(dump))
    assert tree.root.children[b"a"].xattrs == ((b"user.k", b"v"),)
    assert tree.root.children[b"b"].mode == S_IFCHR | 0o644 and tree.root.children[b"b"].rdev == 0


def test_filter_keeps_only_named_root_children():
    tree = reread(image_of(read_input("special.dump")))
    image = Image(image_of(read_input("special.dump")), "x")
    assert sorted(read_tree(image, frozenset({b"inline", b"fifo"})).root.children) == [b"fifo", b"inline"]
    assert len(tree.root.children) > 2


# -- random trees ----------------------------------------------------------------------



def normalised(tree: Tree, version: int) -> list:
    """What an image of `tree` says about it, as a comparable list (one row per name).

    * nlink as the compiler fills it (number of names; directories 2 + subdirectories);
    * directory sizes are not compared (the image stores its own layout's size);
    * a whiteout (char 0:0) has size 0 and no payload, content or digest;
    * devices, fifos and sockets keep no payload, content or digest (rdev only for devices);
    * a regular file keeps inline content, or (if external) a non-empty payload and digest;
    * in format 1, a directory holding a whiteout shows `trusted.overlay.opaque=x` and
      `user.overlay.opaque=x` (the marks the writer adds and upstream's reader keeps).
    """
    tree = resolve_hardlinks(tree.copy(), Options())
    rows = []
    first: dict[int, bytes] = {}  # id(inode) -> its first name depth-first (which is home varies)
    for path, node, _parent, _is_link in tree.walk():
        first.setdefault(id(node), path)
        ftype = node.mode & S_IFMT
        size, payload, content, digest, rdev = node.size, None, None, None, 0
        if ftype == S_IFDIR:
            size = None
        elif ftype == S_IFREG:
            if node.content is not None:
                content = node.content
            elif node.size:
                payload = node.payload or None
                digest = node.digest
        elif ftype == S_IFLNK:
            payload = node.payload
        elif ftype == S_IFCHR and node.rdev == 0:
            size = 0
        elif ftype in (S_IFCHR, S_IFBLK):
            rdev = node.rdev
        xattrs = dict(node.xattrs)
        if version >= 1 and ftype == S_IFDIR and any(
                c.mode & S_IFMT == S_IFCHR and c.rdev == 0 for n, c in node.children.items() if not node.is_link(n)):
            xattrs[b"trusted.overlay.opaque"] = xattrs[b"user.overlay.opaque"] = b"x"
        rows.append((path, first[id(node)], node.mode, node.uid, node.gid, node.mtime, node.mtime_nsec, size, rdev,
                     None if ftype == S_IFDIR else node.nlink, payload, content, digest, sorted(xattrs.items())))
    return rows


@SETTINGS
@given(trees())
def test_random_trees_compile_read_compile(tree):
    tree = lossless(tree)
    first = compile_tree(tree.copy())
    version = first[12]
    read = reread(first)
    assert compile_tree(read.copy(), version) == first
    assert normalised(read, version) == normalised(tree, version)


@SETTINGS
@given(trees())
def test_random_trees_compile_dump_compile(tree):
    tree = home_first_in_dfs(lossless(tree))
    first = compile_tree(tree)
    version = first[12]
    text = dump_of(first)
    assert image_of(text, min_version=version, max_version=version, strict=True) == first


def test_reader_api_lookup_and_entries():
    data = image_of(read_input("special.dump"))
    image = Image(data, "special")
    root = image.inode(image.root_nid)
    inline = image.inode(image.lookup(root, b"inline"))
    assert inline.mode == S_IFREG | 0o777 and inline.size == 15  # special.dump: /inline 15 100777
    assert image.lookup(root, b"nope") is None
    hidden = image.inode(image.lookup(root, b"00"))  # the hidden root whiteout is still a dirent
    assert hidden.mode & S_IFMT == S_IFCHR and hidden.rdev == 0
    names = [n for n, _nid, _t in image.dirents(root)]
    assert names == sorted(names) and b"." not in names


def test_deep_image_reads_without_recursion():
    root = Inode(S_IFDIR | 0o755)
    node = root
    for _ in range(3000):
        child = Inode(S_IFDIR | 0o755)
        node.add_child(b"d", child)
        node = child
    data = compile_tree(Tree(root))
    assert compile_tree(reread(data)) == data
    assert dump_of(data).count(b"\n") == 3001


def test_many_lookups_through_one_entries_object():
    """A long-lived `Entries` (a server's) serves any number of lookups: the walk budget
    guards walks, not bounded path lookups (it used to fail after a few thousand)."""
    import gzip

    from cfsc.backends.erofs.entries import Entries, resolve
    from cfsc.backends.erofs.reader import Image

    from tests.helpers.data import CONFORMANCE

    data = gzip.decompress((CONFORMANCE / "upstream-images" / "config-with-hard-link.v0.cfs.gz").read_bytes())
    image = Image(data, "config.cfs")
    entries = Entries(image)
    for _ in range(5000):
        assert resolve(image, b"/etc/passwd", entries).size > 0


@SETTINGS
@given(trees())
def test_the_inline_fast_path_reads_xattrs_as_the_generic_parse(tree):
    """Entries reads the writer's inline metacopy/redirect without the generic parse (and the
    shared rest from a cache); every inode must come out as `interpret_xattrs` says."""
    from cfsc.backends.erofs.entries import Entries, interpret_xattrs

    image = Image(compile_tree(lossless(tree)), "fast.cfs")
    entries = Entries(image)
    for nid in {nid for _path, nid in _all_nids(image)}:
        raw = image.inode(nid)
        e = entries.of(raw)
        if e is None or not raw.xattr_size:
            continue
        xattrs, payload, digest, _whiteout = interpret_xattrs(image.xattrs(raw), raw.mode & S_IFMT == S_IFREG)
        assert e.xattrs == xattrs
        if raw.mode & S_IFMT == S_IFREG:
            assert (e.payload, e.digest) == (payload, digest)


def _all_nids(image: Image):
    stack = [(b"/", image.root_nid)]
    seen = set()
    while stack:
        path, nid = stack.pop()
        if nid in seen:
            continue
        seen.add(nid)
        yield path, nid
        raw = image.inode(nid)
        if raw.mode & S_IFMT == S_IFDIR:
            stack.extend((path + b"/" + name, child) for name, child, _t in image.dirents(raw))
