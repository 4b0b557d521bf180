"""One composition (`cfsc.build`): every verb compiles the same way and names errors alike,
and the frontend and backend registries say what each format can do."""

from __future__ import annotations

import io

import pytest
from cfsc import backends, build, frontends
from cfsc.backends.erofs.reader import Image
from cfsc.base.errors import TreeError
from cfsc.base.options import Options
from cfsc.frontends import dumpfile

from tests.helpers.data import image_of, read_input

# Line 3 breaks libcomposefs' xattr accounting: the overlay pass must replace the input's big
# `user.overlay.whiteouts` on /w (it holds a whiteout), which only the pipeline finds out.
BIG = b"v" * 30000
BAD = (b"/ 0 40755 3 0 0 0 0.0 - - -\n"
       b"/a 0 100644 1 0 0 0 0.0 - - -\n"
       b"/w 0 40755 2 0 0 0 0.0 - - - user.overlay.whiteouts=" + BIG + b"\n"
       b"/w/x 0 20644 1 0 0 0 0.0 - - -\n"
       b"/z 3 100644 1 0 0 0 0.0 - abc -\n")
GOOD = b"/ 0 40755 2 0 0 0 0.0 - - -\n/a 0 100644 1 0 0 0 0.0 - - -\n"
WHAT = "cannot set user.overlay.whiteout"


def _verbs(bad: str, good_dump: str, good_image: str) -> list[list[str]]:
    return [
        ["compile", bad, "-o", bad + ".cfs"],
        ["compile", "--print-digest-only", bad],
        ["mkcomposefs", "--from-file", bad, bad + ".cfs"],
        ["dump", bad],
        ["dump", "--json", bad],
        ["dump", "--format", "crfs", bad],
        ["info", bad],
        ["ls", bad],
        ["objects", bad],
        ["diff", bad, good_dump],
        ["diff", good_dump, bad],
        ["diff", bad, bad],
        ["diff", bad, good_image],
        ["diff", "--explain", bad, good_dump],
        ["check", bad, "--expect-digest", "0" * 64],
        ["check", bad, "--reference", good_image],
        ["check", "--reproducible", bad],
    ]


@pytest.mark.parametrize("last", [False, True], ids=["middle", "last-line-unterminated"])
def test_every_verb_names_the_line_a_pipeline_error_comes_from(cfsc, tmp_path, last):
    text, line = BAD, 3
    if last:  # a whiteout whose own big `user.overlay.whiteout` the pass must replace
        text, line = GOOD + b"/v 0 40755 2 0 0 0 0.0 - - -\n/v/x 0 20644 1 0 0 0 0.0 - - - user.overlay.whiteout=" + BIG, 4
    bad = tmp_path / "w.dump"
    bad.write_bytes(text)
    good = tmp_path / "good.dump"
    good.write_bytes(GOOD)
    image = tmp_path / "good.cfs"
    image.write_bytes(image_of(GOOD))
    for args in _verbs(str(bad), str(good), str(image)):
        p = cfsc(*args)
        err = p.stderr.decode()
        assert p.returncode == 2 and err.startswith(f"error: {bad}:{line}:/") and WHAT in err, (args, err)
        assert len(err.splitlines()) == 1, (args, err)
    assert not (tmp_path / "w.dump.cfs").exists()


def test_compile_tree_locates_errors_in_text_already_read():
    with pytest.raises(TreeError) as e:
        build.compile_tree(dumpfile.loads(BAD, Options(), "given.dump"))
    assert str(e.value).startswith("given.dump:3:/w: " + WHAT)


def test_compile_tree_writes_or_returns_the_same_bytes():
    data = read_input("special.dump")
    out = io.BytesIO()
    assert build.compile_tree(dumpfile.loads(data), Options(), out) is None
    assert out.getvalue() == build.compile_tree(dumpfile.loads(data)) == image_of(data)
    assert bytes(build.compile_in_memory(dumpfile.loads(data)).data) == out.getvalue()


@pytest.mark.parametrize("fmt", sorted(backends.BACKENDS))
def test_every_backend_from_a_tree_or_its_image(fmt):
    """`build.write` gives each backend what it takes, from a source tree or the image it
    compiles to: what describes the image is the same either way, and what cfsc reads back
    compiles to that image again."""
    data = read_input("special.dump")
    image = build.compile_in_memory(dumpfile.loads(data))
    versions = Options(min_version=image.version, max_version=image.version)
    outputs = []
    for what in (dumpfile.loads(data), image):
        out = io.BytesIO()
        build.write(what, fmt, out)
        outputs.append(out.getvalue())
    backend = backends.get(fmt)
    if backend.takes != backends.HOMED:
        assert outputs[0] == outputs[1]
    if backend.takes == backends.COMPILED:
        assert outputs[0] == image.data
    if fmt in frontends.FRONTENDS:  # a format cfsc reads back
        for output in outputs:
            tree = frontends.get(fmt).load([io.BytesIO(output)], versions)
            assert build.compile_tree(tree, versions) == image.data


def test_registry_rows_name_what_exists():
    for f in frontends.FRONTENDS.values():
        module = f.code()
        assert callable(module.load), f.name
        assert f.combines == hasattr(module, "load_many"), f.name
        assert (f.reads == frontends.DATA) == hasattr(module, "sniff"), f.name
        assert (f.reads == frontends.REF) == (f.prefix is not None), f.name
        for spec in (f.reorder, f.delta):
            if spec is not None:
                assert callable(frontends.function(spec)), spec
        if f.delta is not None:
            assert callable(module.loads), f.name  # the delta's halves load from bytes
    for b in backends.BACKENDS.values():
        assert b.takes in (backends.COMPILED, backends.IMAGE, backends.HOMED) and callable(b.writer()), b.name


def test_an_image_source_is_opened_as_it_is(tmp_path):
    """`image` frontends are inspected as they are, not compiled again: an image whose bytes
    are not what cfsc writes keeps them."""
    from cfsc.tools.images import open_image

    dump = b"/ 4096 40755 2 0 0 0 0.0 - - -\n/f 3 100644 1 0 0 0 0.0 - abc -\n"
    data = image_of(dump, min_version=1, max_version=1)
    assert image_of(dump) != data  # compiled again, it would be format 0
    path = tmp_path / "x.cfs"
    path.write_bytes(data + bytes(4096))  # trailing zeros: not read (only what the superblock declares)
    assert bytes(open_image(str(path)).data) == data
    assert isinstance(open_image(str(path)), Image)


def test_a_batch_leaves_what_it_made_in_the_oldest_generation():
    """`batch_allocation` runs with the collector off; what it made is then moved to the
    oldest generation, so no young collection walks a whole tree after it.  When objects
    are frozen (the FUSE server freezes what it loaded) nothing is moved, and they stay so."""
    import gc

    def young(marker: list) -> bool:
        return any(o is marker for o in gc.get_objects(generation=0))

    gc.collect()
    with build.batch_allocation():
        made = [[i] for i in range(5000)]
    assert gc.isenabled() and not young(made) and any(o is made for o in gc.get_objects(generation=2))
    assert gc.get_freeze_count() == 0

    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with build.batch_allocation():
            kept = [[i] for i in range(50)]
        assert gc.isenabled() and gc.get_freeze_count() == frozen and young(kept)
    finally:
        gc.unfreeze()
    del made, kept


def test_compile_image_leaves_the_tree_and_plan_in_keep_and_the_cli_keeps_the_latest(tmp_path):
    """`keep` holds the compiled tree and the writer's plan past the return (the `cfsc`
    process ends without the interpreter's teardown, so the kernel frees them at once), and
    only those of the latest compile; `main` called in-process keeps nothing."""
    import gc

    from cfsc.base.tree import Inode
    from cfsc.cli import main

    source = tmp_path / "in.dump"
    source.write_bytes(GOOD)
    keep: list = [object()]
    build.compile_image([str(source)], str(tmp_path / "a.cfs"), Options(), "dump", keep=keep)
    plan, tree = keep
    assert len(plan.nids) == len(tree.inodes) and b"a" in tree.root.children
    gc.collect()
    before = sum(isinstance(o, Inode) for o in gc.get_objects())
    for _ in range(2):
        with pytest.raises(SystemExit) as done:
            main(["compile", str(source), "-o", str(tmp_path / "b.cfs")])
        assert done.value.code == 0
    gc.collect()
    assert sum(isinstance(o, Inode) for o in gc.get_objects()) == before  # (nothing left behind)
    assert (tmp_path / "a.cfs").read_bytes() == (tmp_path / "b.cfs").read_bytes()
