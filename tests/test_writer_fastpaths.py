"""The image writer's loops against their references: `_size` and `_emit` take most external
files' xattrs from per-tuple parts (`XattrEncoder.external_fixed`, `external_heads`); with
`fast=False` every file goes through `external_size` / `external_body`.  Same plan, same
bytes, on random trees, the conformance corpus and trees made to reach every branch."""

from __future__ import annotations

import hashlib

import pytest
from cfsc.backends.erofs import writer
from cfsc.backends.erofs.xattrs import XattrEncoder
from cfsc.base.options import Options
from cfsc.base.tree import S_IFDIR, S_IFREG, Inode, Tree
from cfsc.build.pipeline import run_passes
from cfsc.frontends import dumpfile
from hypothesis import HealthCheck, given, settings

from tests.helpers.data import cases, read_input
from tests.helpers.strategies import trees

GOOD = [c for c in cases() if c.get("expect") != "error" and not c["strict"]]


def written(tree: Tree, fast: bool) -> tuple[list, bytes]:
    """The plan's per-inode lists and the records `_emit` writes, all inodes in one run."""
    inodes = tree.inodes
    encoder = XattrEncoder(tree.shared_xattrs)
    plan = writer._new_plan(inodes)
    writer._size(inodes, plan, encoder, 0, len(inodes), {0: 0}, fast)
    plan.inodes_end = writer._place(plan, 0, len(inodes), writer.HEAD_END)
    plan.n_data_blocks = sum(plan.blocks)
    first_block, _total = writer._blocks(plan, encoder)
    out: list[bytes] = []
    _end, blocks = writer._emit(inodes, plan, encoder, 0, len(inodes), writer.HEAD_END, first_block,
                                out.append, fast)
    return [plan.heads, plan.tails, plan.blocks, plan.nids], b"".join(out + blocks)


def assert_same(tree: Tree) -> None:
    tree = run_passes(tree, Options())
    assert written(tree, True) == written(tree, False)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(trees(max_entries=120))
def test_fast_loops_equal_the_references_on_random_trees(tree):
    assert_same(tree)


@pytest.mark.parametrize("case", GOOD, ids=[c["input"] for c in GOOD])
def test_fast_loops_equal_the_references_on_conformance_cases(case):
    assert_same(dumpfile.loads(read_input(case["input"]), Options()))


@pytest.mark.parametrize("digests", ["none", "one-none", "sha256", "sha512", "mixed"])
@pytest.mark.parametrize("labels", ["shared", "own", "none"])
def test_fast_loops_equal_the_references_on_every_branch(digests, labels):
    """Files without a digest (their empty metacopy shared, or one file's alone) or with one
    (unique, shared by copies, SHA-512); payloads unique, shared by copies, empty; xattr tuples shared (all
    references), the file's own (inline entries) or none; a directory of many chunks."""
    root = Inode(S_IFDIR | 0o755)
    big = Inode(S_IFDIR | 0o755)
    root.add_child(b"big", big)
    for i in range(400):
        n = 64 if digests == "sha512" or (digests == "mixed" and i % 3 == 1) else 32
        digest = None if digests == "none" or (digests == "mixed" and i % 3 == 0) or (
            digests == "one-none" and i == 7) else (
            hashlib.sha512(b"%d" % (i % 50)).digest()[:n] if i % 4 == 0 else hashlib.sha512(b"%d" % i).digest()[:n])
        payload = b"" if i % 17 == 0 else b"%02x/%s" % (i % 256, b"p" * (i % 7)) if i % 5 else b"ab/copy"
        xattrs = {"shared": ((b"security.selinux", b"system_u:object_r:bin_t:s0"),),
                  "own": ((b"user.own", b"%d" % i),), "none": ()}[labels]
        big.add_child(b"f%03d-%s" % (i, b"n" * (i % 90)), Inode(S_IFREG | 0o644, size=1 + i, payload=payload or None,
                                                              digest=digest, xattrs=xattrs))
    assert_same(Tree(root))
