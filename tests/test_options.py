"""One option model: the source options are declared once and every verb that takes a source
accepts them all, with the same help; `--basedir`'s two meanings have their own names.

The declarations are walked through the click commands typer builds, so an option added to
one verb alone fails here; real runs then show that the options reach the frontends on the
verbs that lacked them (`check --keep-whiteouts` on tar layers, `diff --verify` on OSTree
commits, `--payload-dir` on CRFS) and that the old `--basedir` spellings still work.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess

import pytest
import typer.main
from cfsc import frontends
from cfsc.base import record
from cfsc.base.fsverity import digest_file
from cfsc.base.options import ALL, KINDS, SOURCE_OPTIONS, Options
from cfsc.cli import COMMANDS, app

from tests.helpers.data import run_cfsc
from tests.helpers.dirtrees import Entry, make
from tests.helpers.tarcraft import archive, member

SOURCE_VERBS = ("compile", "diff", "check", "dump", "ls", "objects", "missing-objects", "info", "fsck-store")
# What `compile` has that is about its output, not about reading the source.
COMPILE_OUTPUT = {"-o", "--output", "--out", "--print-digest", "--print-digest-only", "-h", "--help"}


def commands() -> dict:
    for module in set(COMMANDS.values()):
        importlib.import_module(f"cfsc.cli.{module}")
    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


def flags(command, hidden: bool = True) -> dict[str, object]:
    """flag → click parameter, of the options (not arguments) a command accepts."""
    return {flag: p for p in command.params if p.param_type_name == "option" and (hidden or not p.hidden)
            for flag in (*p.opts, *p.secondary_opts)}


def test_declarations_match_options_and_frontends():
    fields = set(record.fields(Options))
    assert set(KINDS) == set(frontends.FRONTENDS) and ALL == tuple(KINDS)
    for o in SOURCE_OPTIONS:
        assert o.field in fields and o.kinds and set(o.kinds) <= set(KINDS), o
        assert o.flag == "--" + o.field.replace("_", "-"), o  # one name from flag to field
    assert len({o.flag for o in SOURCE_OPTIONS}) == len(SOURCE_OPTIONS)


def test_every_verb_that_takes_a_source_has_every_source_option():
    cmds = commands()
    compile_flags = set(flags(cmds["compile"], hidden=False)) - COMPILE_OUTPUT
    for verb in SOURCE_VERBS:
        have = flags(cmds[verb])
        # everything `compile` reads a source with, so any compilation can be reproduced
        assert compile_flags <= set(have), (verb, sorted(compile_flags - set(have)))
        for o in SOURCE_OPTIONS:
            param = have[o.flag]
            assert param.help == o.help and not param.hidden, (verb, o.flag)  # one help text
            assert param.name == o.field
        assert have["--from"].help == flags(cmds["compile"])["--from"].help


def test_basedir_is_a_hidden_old_name_where_it_was_documented():
    cmds = commands()
    for verb in ("compile", "diff", "check"):  # the CRFS payload directory
        assert flags(cmds[verb])["--basedir"].hidden and flags(cmds[verb])["--basedir"].name == "old_payload_dir"
    for verb in ("missing-objects", "fsck-store", "mount"):  # the object store
        have = flags(cmds[verb])
        assert "--store" in have and have["--basedir"].hidden and have["--basedir"].name == "old_store"
    for verb in ("dump", "ls", "objects", "info"):  # never had it
        assert "--basedir" not in flags(cmds[verb])
    for verb in (*SOURCE_VERBS, "mount"):
        assert "--basedir" not in flags(cmds[verb], hidden=False)
        assert b"--basedir" not in run_cfsc(verb, "--help", check=True).stdout


def digest_of(*args: str) -> str:
    p = run_cfsc("compile", *args, "--print-digest-only", check=True)
    return p.stdout.decode().strip()


# -- tar layers: check --keep-whiteouts -------------------------------------------------------

@pytest.fixture
def layers(tmp_path):
    lower, upper = tmp_path / "lower.tar", tmp_path / "upper.tar"
    lower.write_bytes(archive(member(b"a", b"a" * 100), member(b"d/x", b"x"), member(b"b", b"b")))
    upper.write_bytes(archive(member(b".wh.a"), member(b"d/.wh..wh..opq"), member(b"c", b"c")))
    return lower, upper


def test_check_keep_whiteouts_on_tar_layers(layers):
    lower, upper = layers
    for sources, side in (([str(upper)], str(upper)), ([str(lower), str(upper)], f"{lower}+{upper}")):
        kept = digest_of("--keep-whiteouts", *sources)
        merged = digest_of(*sources)
        assert kept != merged
        p = run_cfsc("check", side, "--keep-whiteouts", "--expect-digest", kept)
        assert p.returncode == 0, p.stdout + p.stderr
        p = run_cfsc("check", side, "--expect-digest", kept)  # without it: another image
        assert p.returncode == 1 and b"DIFFERS" in p.stdout
    # compiled every way, the whiteouts are kept every time (the child process too)
    p = run_cfsc("check", "--reproducible", "--keep-whiteouts", "--expect-digest", digest_of("--keep-whiteouts", str(upper)),
                 str(upper))
    assert p.returncode == 0 and b"reproducible" in p.stdout, p.stdout + p.stderr


def test_inspection_verbs_take_source_options(layers, tmp_path):
    _lower, upper = layers
    kept = run_cfsc("dump", str(upper), "--keep-whiteouts", check=True).stdout
    assert b"/a 0 20000 1 0 0 0 " in kept and b"/a " not in run_cfsc("dump", str(upper), check=True).stdout
    listing = run_cfsc("ls", str(upper), "--keep-whiteouts", check=True).stdout
    assert b" a\n" in listing and b" c\n" in listing
    info = json.loads(run_cfsc("info", "--json", str(upper), "--keep-whiteouts", "--max-version", "0", check=True).stdout)
    assert info["format_version"] == 0
    # an image is read as it is, unless an option that applies to images is given
    image = tmp_path / "up.cfs"
    run_cfsc("compile", str(upper), "--min-version", "1", "-o", str(image), check=True)
    assert b" c\n" in run_cfsc("ls", str(image), check=True).stdout
    assert b" c\n" not in run_cfsc("ls", str(image), "--exclude", 'path == "/c"', check=True).stdout
    assert json.loads(run_cfsc("info", "--json", str(image), check=True).stdout)["format_version"] == 1
    assert json.loads(run_cfsc("info", "--json", str(image), "--max-version", "0",
                               check=True).stdout)["format_version"] == 0


def test_diff_clamp_mtime_applies_to_an_image_side(layers, tmp_path):
    _lower, upper = layers
    image = tmp_path / "up.cfs"
    run_cfsc("compile", str(upper), "-o", str(image), check=True)
    env = {"SOURCE_DATE_EPOCH": "5"}
    assert run_cfsc("diff", str(image), str(upper), env=env).returncode == 0
    # both sides clamped alike: the image too, as `compile IMAGE --clamp-mtime` would
    p = run_cfsc("diff", str(image), str(upper), "--clamp-mtime", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    clamped = tmp_path / "clamped.cfs"
    run_cfsc("compile", str(upper), "--clamp-mtime", "-o", str(clamped), env=env, check=True)
    assert run_cfsc("diff", str(image), str(clamped), "--ignore", "layout").returncode == 1
    assert run_cfsc("diff", str(image), str(clamped), "--clamp-mtime", "--ignore", "layout", env=env).returncode == 0


# -- OSTree: diff --verify, check --ostree-compat --------------------------------------------

def ostree_cli(*args: str) -> None:
    subprocess.run(["ostree", *args], check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    src, repo = tmp_path / "src", tmp_path / "repo"
    make(src, [Entry(b"", "dir", mode=0o755), Entry(b"small", data=b"s"),
               Entry(b"big", data=b"b" * 5000), Entry(b"d", "dir", mode=0o755), Entry(b"d/f", data=b"f" * 300)])
    ostree_cli("init", f"--repo={repo}", "--mode=bare")
    ostree_cli("commit", f"--repo={repo}", "-b", "main", f"--tree=dir={src}", "-s", "test")
    return repo


def test_diff_and_check_verify_on_ostree(repo, tmp_path):
    source = f"ostree:{repo}:main"
    image = tmp_path / "ostree.cfs"
    run_cfsc("compile", source, "--verify", "-o", str(image), check=True)
    p = run_cfsc("diff", "--verify", source, str(image))
    assert p.returncode == 0, p.stdout + p.stderr
    (obj,) = [p for p in (repo / "objects").rglob("*.file") if p.stat().st_size == 5000]
    data = bytearray(obj.read_bytes())
    data[100] ^= 1
    os.chmod(obj, 0o644)
    obj.write_bytes(data)
    p = run_cfsc("diff", source, str(image))  # unverified: only the file's fs-verity digest changes
    assert p.returncode == 1 and b"digest:" in p.stdout, p.stdout + p.stderr
    p = run_cfsc("diff", "--verify", source, str(image))
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stderr
    assert f"{obj}: corrupt: its content checksum is".encode() in p.stderr and b"(file /big)" in p.stderr
    p = run_cfsc("check", "--verify", source, "--reference", str(image))
    assert p.returncode == 2 and b"corrupt" in p.stderr


def test_check_reproducible_with_a_digest_store_on_ostree(repo, tmp_path):
    """The store names OSTree payloads: the compilation in a child process must have it too."""
    source, store = f"ostree:{repo}:main", str(tmp_path / "store")
    expected = digest_of(source, "--digest-store", store)
    assert expected != digest_of(source)
    p = run_cfsc("check", "--reproducible", source, "--digest-store", store, "--expect-digest", expected)
    assert p.returncode == 0 and b"reproducible" in p.stdout, p.stdout + p.stderr


def test_check_ostree_compat(repo):
    source = f"ostree:{repo}:main"
    compat = digest_of("--ostree-compat", source)
    assert compat != digest_of(source)
    assert run_cfsc("check", "--ostree-compat", source, "--expect-digest", compat).returncode == 0
    assert run_cfsc("check", source, "--expect-digest", compat).returncode == 1


# -- CRFS: --payload-dir, and --basedir as its old name ---------------------------------------

def test_payload_dir_and_its_old_name(tmp_path):
    store = tmp_path / "payloads"
    (store / "ab").mkdir(parents=True)
    (store / "ab" / "cdef").write_bytes(b"x" * 10000)
    toc = tmp_path / "t.json"
    toc.write_text(json.dumps({"version": 1, "entries": [
        {"type": "reg", "name": "f", "size": 10000, "x-payload": "ab/cdef"}]}))
    new = digest_of("--payload-dir", str(store), str(toc))
    assert digest_of("--basedir", str(store), str(toc)) == new != digest_of(str(toc))
    digest = digest_file(store / "ab" / "cdef").hex().encode()
    for flag in ("--payload-dir", "--basedir"):
        assert run_cfsc("check", str(toc), flag, str(store), "--expect-digest", new).returncode == 0
        image = tmp_path / "img.cfs"
        run_cfsc("compile", str(toc), flag, str(store), "-o", str(image), check=True)
        assert run_cfsc("diff", str(toc), str(image), flag, str(store)).returncode == 0
        assert run_cfsc("diff", str(toc), str(image)).returncode == 1  # the digest is missing
    assert digest in run_cfsc("dump", str(toc), "--payload-dir", str(store), check=True).stdout
    p = run_cfsc("compile", str(toc), "--payload-dir", str(store), "--basedir", str(tmp_path), "-o", "-")
    assert p.returncode == 2 and p.stderr == b"error: --payload-dir: --basedir is the old name of --payload-dir: give one of them\n"
    # the same directory under both names is no contradiction
    assert digest_of("--payload-dir", str(store), "--basedir", str(store), str(toc)) == new


# -- the object store: --store, and --basedir as its old name ---------------------------------

def test_store_and_its_old_name(tmp_path):
    files, store = tmp_path / "files", tmp_path / "store"
    make(files, [Entry(b"", "dir", mode=0o755), Entry(b"one", data=b"1" * 100), Entry(b"two", data=b"2" * 200)])
    image = tmp_path / "img.cfs"
    run_cfsc("compile", str(files), "--digest-store", str(store), "-o", str(image), check=True)
    objects = run_cfsc("objects", str(image), check=True).stdout
    os.unlink(store / objects.splitlines()[0].decode())
    for flag in ("--store", "--basedir"):
        p = run_cfsc("missing-objects", str(image), flag, str(store), check=True)
        assert p.stdout == objects.splitlines(keepends=True)[0]
        p = run_cfsc("fsck-store", str(image), flag, str(store))
        assert p.returncode == 1 and b"1 missing" in p.stdout
    for verb in ("missing-objects", "fsck-store"):
        p = run_cfsc(verb, str(image))
        assert p.returncode == 2 and p.stderr == b"error: give the object store: --store DIR\n"
        p = run_cfsc(verb, str(image), "--store", str(store), "--basedir", str(tmp_path))
        assert p.returncode == 2 and b"--basedir is the old name of --store" in p.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = run_cfsc("mount", str(image), str(mnt), "--store", str(store), "--basedir", str(tmp_path))
    assert p.returncode == 2 and b"--basedir is the old name of --store" in p.stderr and not os.path.ismount(mnt)
    run_cfsc("compile", str(files), "--digest-store", str(store), "-o", str(image), check=True)  # the object back
    run_cfsc("mount", str(image), str(mnt), "--basedir", str(store), check=True)
    try:
        assert (mnt / "one").read_bytes() == b"1" * 100 and (mnt / "two").read_bytes() == b"2" * 200
    finally:
        run_cfsc("umount", str(mnt), check=True)
