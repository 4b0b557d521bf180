"""Property tests: random trees compile, deterministically, whatever the input order."""

from __future__ import annotations

import io
import struct

from cfsc.backends.erofs.reader import Image
from cfsc.backends.erofs.writer import write_image
from cfsc.base.options import Options
from cfsc.base.tree import S_IFDIR, Inode, Tree
from cfsc.build import compile_tree
from cfsc.build.pipeline import PASSES, run_passes
from cfsc.frontends import dumpfile
from cfsc.frontends.image import read_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.roundtrip import dump_of, home_first_in_dfs, lossless
from tests.helpers.strategies import trees

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def image(tree: Tree, **options) -> bytes:
    return compile_tree(tree, Options(**options))


@SETTINGS
@given(trees())
def test_random_trees_compile_deterministically(tree):
    copies = [tree.copy(), tree.copy(reverse=True), tree.copy()]
    first = image(copies[0])
    assert image(copies[1]) == first, "children insertion order changed the bytes"
    assert image(copies[2]) == first
    for version in (0, 1):
        assert image(tree.copy(), min_version=version, max_version=version)[12] == version


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(trees(max_entries=300))
def test_wide_random_trees_compile_deterministically_and_through_their_dump(tree):
    """Bigger trees (many inodes sharing xattr pairs: the shared table is actually used), and
    the same tree given as dumpfile text compiles to the same bytes.  (The dump makes each
    hard-linked inode's first depth-first name its home and drops the xattrs upstream's
    reader drops: the tree is given in that form, as in test_image_reader.)"""
    tree = home_first_in_dfs(lossless(tree))
    first = image(tree.copy())
    assert image(tree.copy(reverse=True)) == first
    version = first[12]
    again = image(dumpfile.loads(dump_of(first), Options(strict=True)), min_version=version, max_version=version)
    assert again == first


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees())
def test_every_pass_is_idempotent(tree):
    """The writer alone after each pass again (compile_tree would run them all again)."""
    options = Options()
    compiled = run_passes(tree.copy(), options)
    reference = io.BytesIO()
    write_image(compiled, reference)
    for compiler_pass in PASSES:
        compiled = compiler_pass(compiled, options)
        again = io.BytesIO()
        write_image(compiled, again)
        assert again.getvalue() == reference.getvalue(), compiler_pass.__name__


def test_deep_tree_needs_no_recursion():
    root = Inode(S_IFDIR | 0o755)
    node = root
    for _ in range(5000):
        child = Inode(S_IFDIR | 0o755)
        node.add_child(b"d", child)
        node = child
    data = image(Tree(root))
    # the reader walks it back to the bottom, 5000 levels down, also without recursion
    depth, node = 0, read_tree(Image(data, "deep.cfs")).root
    while node.children:
        (name, node), = node.children.items()
        assert name == b"d"
        depth += 1
    assert depth == 5000


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(trees())
def test_spliced_xattr_bodies_equal_the_generic_ones(tree):
    """The writer splices an external file's metacopy and redirect into cached layouts (both,
    or only the redirect when the metacopy is shared); the generic merge is the reference."""
    from cfsc.backends.erofs.layout import EROFS_XATTR_IBODY_HEADER
    from cfsc.backends.erofs.overlay import image_xattrs, is_external
    from cfsc.backends.erofs.xattrs import XattrEncoder

    compiled = run_passes(tree, Options())
    encoder = XattrEncoder(compiled.shared_xattrs)
    encoder.base = 7
    for node in compiled.inodes:
        if is_external(node):
            layout = encoder._layout(image_xattrs(node))
            generic = b"".join((EROFS_XATTR_IBODY_HEADER.pack(~layout.bits & 0xFFFFFFFF, len(layout.ids)),
                                struct.pack(f"<{len(layout.ids)}I", *[7 + r for r in layout.ids]), *layout.inline))
            assert encoder.body(node, True) == generic
            assert encoder.size(node, True) == len(generic)


@SETTINGS
@given(trees())
def test_has_whiteout_equals_has_whiteout_walk(tree):
    """`select_version` rules out whiteouts from the gathered modes of all children; the walk
    over every home inode is the reference (hard-link entries and devices other than 0:0
    must not count)."""
    from cfsc.passes.select_version import has_whiteout, has_whiteout_walk

    assert has_whiteout(tree) == has_whiteout_walk(tree)


def test_shared_redirect_bodies_equal_the_generic_ones():
    """Files naming one object (copies of a file) share their redirect; with their metacopy
    shared too (no digest, or the same one) the encoder caches the whole body per (xattrs,
    digest, payload), else it lays the file out afresh.  Both against the generic merge."""
    from cfsc.backends.erofs.layout import EROFS_XATTR_IBODY_HEADER
    from cfsc.backends.erofs.overlay import image_xattrs, is_external
    from cfsc.backends.erofs.xattrs import XattrEncoder
    from cfsc.base.tree import S_IFREG

    root = Inode(S_IFDIR | 0o755)
    label = ((b"security.selinux", b"system_u:object_r:bin_t:s0"),)
    own = ((b"user.x", b"1"),)
    digests = [None, b"\1" * 32, b"\2" * 32]
    for i in range(24):
        payload = b"ab/" + bytes([0x61 + i % 3]) * 62
        xattrs = (label, own, (), label + (() if i % 5 else ((b"user.y", b"%d" % i),)))[i % 4]
        digest = digests[i % 3] if i % 7 else b"%02d" % i + b"\0" * 30
        root.add_child(b"f%02d" % i, Inode(S_IFREG | 0o644, size=100 + i, payload=payload, digest=digest,
                                           xattrs=tuple(sorted(xattrs))))
    compiled = run_passes(Tree(root), Options())
    encoder = XattrEncoder(compiled.shared_xattrs)
    assert encoder.shared_payloads and encoder.metacopies_shared
    encoder.base = 5
    for node in compiled.inodes:
        if is_external(node):
            layout = encoder._layout(image_xattrs(node))
            generic = b"".join((EROFS_XATTR_IBODY_HEADER.pack(~layout.bits & 0xFFFFFFFF, len(layout.ids)),
                                struct.pack(f"<{len(layout.ids)}I", *[5 + r for r in layout.ids]), *layout.inline))
            assert encoder.body(node, True) == generic
            assert encoder.size(node, True) == len(generic)
    assert encoder.with_redirect  # the cached path was taken


def _link_shape(tree: Tree) -> list[tuple]:
    """Every entry of a tree: path, whether it is a link, its inode (numbered in walk order),
    mode and nlink; so two trees compare equal when their hard-link structure is the same."""
    numbers: dict[int, int] = {}
    shape = []
    for path, node, _parent, is_link in tree.walk():
        shape.append((path, is_link, numbers.setdefault(id(node), len(numbers)), node.mode, node.nlink))
    return shape


@SETTINGS
@given(trees(), st.lists(st.tuples(st.booleans(), st.integers(0, 1 << 16)), max_size=6),
       st.sampled_from([None, "plain", "with a link"]))
def test_resolve_hardlinks_equals_resolve_hardlinks_walk(tree, damage, wide):
    """`resolve_hardlinks` takes a directory without links whole and gives up on the first
    repair; `resolve_hardlinks_walk` looks at every entry.  Same tree, links, homes and nlink,
    also for the trees that need repairs: an inode homed under a second name (True), a home
    entry turned into a link, leaving its inode only links (False).  `wide`: a directory of
    40 entries (subdirectories among them), past the size taken column-wise."""
    from cfsc.base.tree import S_IFDIR, S_IFREG, Inode
    from cfsc.passes.resolve_hardlinks import COLUMNS_FROM, resolve_hardlinks, resolve_hardlinks_walk

    if wide:
        w = Inode(S_IFDIR | 0o755)
        tree.root.add_child(b"~wide", w)
        for k in range(40):
            w.add_child(b"w%02d" % k, Inode(S_IFDIR | 0o755) if k % 9 == 0 else Inode(S_IFREG | 0o644))
        if wide == "with a link":
            w.add_child(b"zz", w.children[b"w01"], link=True)
        assert len(w.children) >= COLUMNS_FROM
    entries = [(parent, path.rsplit(b"/", 1)[1], node) for path, node, parent, is_link in tree.walk()
               if parent is not None and not is_link]
    for second_home, pick in damage:
        if not entries:
            break
        parent, name, node = entries[pick % len(entries)]
        if second_home and node.children is None:
            parent.add_child(name + b"~", node)
        elif not second_home and name in parent.children:
            parent.add_child(name, node, link=True)
    quick, walked = tree.copy(), tree.copy()
    assert _link_shape(resolve_hardlinks(quick, Options())) == _link_shape(resolve_hardlinks_walk(walked, Options()))
