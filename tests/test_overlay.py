"""The overlay convention (`cfsc.backends.erofs.overlay`) and the places that write it out.

Hot loops (the writer's two inode loops, the sharing pass, the manifest's column path) test
"external file" inline instead of calling `is_external`; these tests hold each of them to the
predicate on random trees.  The encodings round-trip through their decoders.
"""

from __future__ import annotations

import io
from collections import Counter
from itertools import chain

from cfsc.backends.erofs.layout import EROFS_INODE_CHUNK_BASED
from cfsc.backends.erofs.overlay import (
    ESCAPED,
    METACOPY,
    METACOPY_HEADER,
    REDIRECT,
    TRUSTED_OVERLAY,
    escape_key,
    image_xattrs,
    implied_xattrs,
    is_external,
    metacopy_digest,
    metacopy_value,
    redirect_payload,
    redirect_xattr,
    unescape_key,
)
from cfsc.backends.erofs.reader import Image
from cfsc.backends.erofs.writer import write_image
from cfsc.base.options import Options
from cfsc.base.tree import S_IFDIR, S_IFMT, S_IFREG, Inode
from cfsc.build.pipeline import run_passes
from cfsc.tools.manifest import _Records
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.strategies import trees

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def raw_inodes(image: Image):
    """Every inode reachable from the root, once each."""
    stack, seen = [image.root_nid], set()
    while stack:
        nid = stack.pop()
        if nid in seen:
            continue
        seen.add(nid)
        raw = image.inode(nid)
        yield raw
        if raw.mode & S_IFMT == S_IFDIR:
            stack.extend(child for _name, child, _t in image.dirents(raw))


@SETTINGS
@given(trees())
def test_the_writer_makes_exactly_the_external_files_chunk_based(tree):
    compiled = run_passes(tree, Options())
    out = io.BytesIO()
    write_image(compiled, out)
    image = Image(out.getvalue(), "t.cfs")
    seen = 0
    for raw in raw_inodes(image):
        node = compiled.inodes[raw.ino]
        assert (raw.layout == EROFS_INODE_CHUNK_BASED) == is_external(node), raw
        seen += 1
    assert seen == len(compiled.inodes)


@SETTINGS
@given(trees())
def test_the_sharing_pass_counts_the_implied_pairs_as_image_xattrs_says(tree):
    compiled = run_passes(tree, Options())
    counts = Counter(chain.from_iterable(map(image_xattrs, compiled.inodes)))
    assert set(compiled.shared_xattrs) == {pair for pair, n in counts.items() if n > 1}


@SETTINGS
@given(trees())
def test_manifest_columns_take_external_files_as_the_predicate_does(tree):
    compiled = run_passes(tree, Options())
    records = _Records(True, {})
    nodes = list(compiled.inodes)
    assert records.column(nodes) == [records.one(n) for n in nodes]


def test_implied_xattrs_of_an_external_file():
    digest = bytes(range(32))
    node = Inode(S_IFREG | 0o644, size=10, payload=b"ab/cd", digest=digest)
    assert implied_xattrs(node) == ((METACOPY, METACOPY_HEADER + digest), (REDIRECT, b"/ab/cd"))
    assert implied_xattrs(Inode(S_IFREG | 0o644, size=10)) == ((METACOPY, b""),)
    assert implied_xattrs(Inode(S_IFREG | 0o644, size=3, content=b"abc")) == ()
    assert implied_xattrs(Inode(S_IFREG | 0o644)) == ()


@given(st.binary(max_size=40))
def test_escaping_round_trips(tail):
    for key in (TRUSTED_OVERLAY + tail, b"user.overlay." + tail, b"trusted.x" + tail):
        stored = escape_key(key)
        assert stored.startswith(ESCAPED) == key.startswith(TRUSTED_OVERLAY)
        assert unescape_key(stored) == key


@given(st.one_of(st.none(), st.binary(min_size=32, max_size=32)),
       st.binary(min_size=1, max_size=100).filter(lambda p: b"\0" not in p))
def test_metacopy_and_redirect_values_decode_to_what_was_encoded(digest, payload):
    assert metacopy_digest(metacopy_value(digest)) == digest
    assert redirect_payload(redirect_xattr(payload)[1]) == payload
