"""Why two images' bytes differ: the reasons `cfsc diff` gives for each kind of cause."""

from __future__ import annotations

from cfsc import schemas
from cfsc.backends.erofs.reader import Image
from cfsc.tools.diff import diff_images, report_json
from cfsc.tools.explain import explain
from cfsc.tools.manifest import Ignore

from tests.helpers.data import image_of, run_cfsc

TREE = b"""\
/ 0 40755 2 0 0 0 100.0 - - -
/a 5 100644 1 0 0 0 100.0 - hello - user.x=1
/b 5 100644 1 0 0 0 100.0 - world - user.x=1
/d 0 40755 2 0 0 0 100.0 - - -
/d/f 3 100644 1 0 0 0 100.0 - abc -
"""


def reasons(a: bytes, b: bytes) -> dict[str, str]:
    report = diff_images(Image(a, "A"), Image(b, "B"))
    assert schemas.problems("diff-report", report_json(report)) == []
    assert report.layout is not None and report.layout[0].aspect == "digest"
    return {r.aspect: r.detail for r in report.layout}


def test_same_tree_as_v0_and_v1():
    why = reasons(image_of(TREE, max_version=0), image_of(TREE, min_version=1))
    assert set(why) == {"digest", "format_version", "first_difference"}
    assert why["format_version"].startswith("format version 0 → 1")
    assert why["first_difference"] == "the bytes first differ at offset 0xc: composefs header (composefs_version)"


def test_same_tree_with_whiteouts_as_v0_and_v1():
    tree = TREE + b"/d/w 0 20000 1 0 0 0 100.0 - - -\n"
    report = diff_images(Image(image_of(tree, max_version=0), "v0"), Image(image_of(tree), "v1"))
    # version 1 shows the opaque markers on the whiteout's directory: a user-visible change …
    assert [(c.path, [a[:2] for a in c.attributes]) for c in report.changes] == [
        (b"/d", [("xattr", b"trusted.overlay.opaque"), ("xattr", b"user.overlay.opaque")])]
    why = {r.aspect: r.detail for r in report.layout}
    # … explained by the version
    assert {"format_version", "tree", "overlay_xattrs", "inode_positions"} <= set(why)
    assert "/d: +trusted.overlay.overlay.opaque='x' +user.overlay.opaque='x'" in why["overlay_xattrs"]


def test_one_uid_above_65535_makes_an_extended_inode():
    why = reasons(image_of(TREE), image_of(TREE.replace(b"/d/f 3 100644 1 0 0", b"/d/f 3 100644 1 70000 0")))
    assert "/d/f: compact → extended (uid 70000 > 65535)" in why["inode_format"]
    # /d/f is the last inode: nothing moves but the shared xattr table that follows it
    assert why["shared_xattrs"].startswith("the shared xattr table moved from 0x25e0 to 0x2600")
    assert why["first_difference"].endswith("the inode of /a (nid 198), its xattrs")
    assert why["tree"].startswith("the trees differ (1 entry")
    assert "size" not in why or "→" in why["size"]


def test_one_shared_xattr_turned_unique():
    why = reasons(image_of(TREE), image_of(TREE.replace(b"world - user.x=1", b"world - user.x=2")))
    assert why["shared_xattrs"].startswith("shared xattr table (1 → 0 entries")
    assert "user.x='1' only in A's (on 2 inodes in A, 1 in B)" in why["shared_xattrs"]
    assert "/a: user.x='1' shared → inline" in why["xattr_sharing"]


def test_same_tree_other_hardlink_home():
    a = TREE + b"/d/g 3 100644 2 0 0 0 100.0 - xyz -\n/h 3 @100644 2 0 0 0 100.0 /d/g - -\n"
    b = TREE + b"/h 3 100644 2 0 0 0 100.0 - xyz -\n/d/g 3 @100644 2 0 0 0 100.0 /h - -\n"
    report = diff_images(Image(image_of(a), "A"), Image(image_of(b), "B"))
    assert report.changes == [] and not report.identical  # same tree, other bytes
    why = {r.aspect: r.detail for r in report.layout}
    assert "inode_numbers" in why and "inode_order" in why
    ignoring = diff_images(Image(image_of(a), "A"), Image(image_of(b), "B"), ignore=Ignore(["layout"]))
    assert ignoring.identical


def test_identical_bytes_need_no_reason():
    image = image_of(TREE)
    assert explain(Image(image), Image(image)) == []
    report = diff_images(Image(image), Image(image))
    assert report.identical and report.layout is None


def test_cli_explains_two_images(tmp_path):
    a, b = tmp_path / "a.cfs", tmp_path / "b.cfs"
    a.write_bytes(image_of(TREE, max_version=0))
    b.write_bytes(image_of(TREE, min_version=1))
    p = run_cfsc("diff", str(a), str(b))
    assert p.returncode == 1
    out = p.stdout.decode()
    assert "image bytes differ; why:\n" in out and "  format_version: format version 0 → 1" in out
    assert out.endswith("the trees are identical; the image bytes differ\n")
    assert run_cfsc("diff", str(a), str(b), "--ignore", "layout").returncode == 0
    # --explain compiles a dumpfile side to compare bytes too
    dump = tmp_path / "t.dump"
    dump.write_bytes(TREE)
    p = run_cfsc("diff", str(dump), str(b), "--explain")
    assert p.returncode == 1 and b"format_version" in p.stdout
    assert run_cfsc("diff", str(dump), str(a)).returncode == 0


def test_a_real_type_change_is_not_a_whiteout_encoding():
    tree = TREE + b"/sda 0 60660 1 0 6 2048 100.0 - - -\n"
    report = diff_images(Image(image_of(tree), "A"), Image(image_of(tree.replace(b" 60660 ", b" 20660 ")), "B"))
    assert [(c.path, c.attributes) for c in report.changes] == [(b"/sda", [("type", None, "block", "char")])]
    why = {r.aspect: r.detail for r in report.layout}
    assert "whiteout_encoding" not in why
    assert why["tree"].startswith("the trees differ (1 entry, listed above)")


def test_whiteout_stored_as_a_character_device():
    """Another writer's whiteout (a bare character device 0:0) against composefs' marked file."""
    from cfsc.backends.erofs.entries import resolve

    tree = TREE + b"/d/w 0 20000 1 0 0 0 100.0 - - -\n"
    ours = image_of(tree)
    raw = resolve(Image(ours), b"/d/w").raw
    assert raw.blkaddr == 0 and raw.mode == 0o100000
    theirs = bytearray(ours)
    theirs[raw.offset + 4:raw.offset + 6] = (0o20000).to_bytes(2, "little")  # i_mode
    why = {r.aspect: r.detail for r in diff_images(Image(bytes(theirs), "A"), Image(ours, "B")).layout}
    assert ("/d/w: character device 0:0 (mode 20000) → regular file marked trusted.overlay.overlay.whiteout "
            "(mode 100000)") in why["whiteout_encoding"]
