"""Drop-in verbs with upstream's exact syntax, for scripts written for the C tools.

Options are parsed with GNU getopt_long semantics (`cfsc.cli.getopt`), not by typer.
"""

from __future__ import annotations

import os

import typer
from cfsc import build
from cfsc.backends.dumptext import escape, escape_ls
from cfsc.base.errors import CfscError, UsageError
from cfsc.base.fsverity import digest_file
from cfsc.base.options import Options
from cfsc.base.output import atomic_output
from cfsc.base.tree import S_IFDIR, S_IFLNK, S_IFMT, S_IFREG
from cfsc.cli import command, digest_line
from cfsc.cli.direct import mkcomposefs
from cfsc.cli.getopt import getopt_long


@command("mkcomposefs", context_settings={"ignore_unknown_options": True,
                                          "allow_extra_args": True, "help_option_names": []})
def mkcomposefs_cmd(ctx: typer.Context) -> None:
    """Drop-in for upstream `mkcomposefs [OPTIONS] SOURCE IMAGE` (same options and syntax)."""
    mkcomposefs(list(ctx.args))  # (`cfsc.cli.direct` runs it without typer on most arguments)


COMPOSEFS_INFO_OPTIONS = {"basedir": True, "filter": True}
COMPOSEFS_INFO_COMMANDS = ("ls", "objects", "missing-objects", "dump", "measure-file")


@command("composefs-info", context_settings={"ignore_unknown_options": True,
                                             "allow_extra_args": True, "help_option_names": []})
def composefs_info_cmd(ctx: typer.Context) -> None:
    """Drop-in for upstream `composefs-info [--basedir=DIR] [--filter=NAME]... COMMAND IMAGE...`.

    COMMAND is ls, objects, missing-objects, dump or measure-file; the output is upstream's,
    byte for byte.  measure-file prints the kernel's digest for an empty file (1.0.8 does not).
    """
    import sys

    # start-up: the image reader and cfsc.tools.images ~13 ms; `cfsc mkcomposefs` needs neither
    from cfsc.backends.erofs.reader import Image
    from cfsc.tools import images

    where = "composefs-info"
    opts, operands = getopt_long(list(ctx.args), COMPOSEFS_INFO_OPTIONS, "", where)
    basedir = None
    filters = []
    for name, value in opts:
        if name == "basedir":
            basedir = value
        else:
            filters.append(value or "")
    names = images.filter_names(filters)
    if not operands:
        raise UsageError("no command specified: expected " + ", ".join(COMPOSEFS_INFO_COMMANDS), where)
    verb, paths = operands[0], operands[1:]
    if verb not in COMPOSEFS_INFO_COMMANDS:
        raise UsageError(f"unknown command {verb!r}: expected " + ", ".join(COMPOSEFS_INFO_COMMANDS), where)
    out = sys.stdout.buffer
    if verb == "measure-file":
        _measure_files(paths, where)
        return
    if basedir is not None:
        os.close(images.open_basedir(basedir))
    if not paths:
        raise UsageError("no image path specified", where)
    if verb in ("objects", "missing-objects"):
        loaded = [Image.open(p) for p in paths]
        found = (images.objects(loaded, names) if verb == "objects"
                 else images.missing_objects(loaded, basedir, names))
        out.write(b"".join(p + b"\n" for p in sorted(found)))
        return
    for path in paths:
        image = Image.open(path)
        if verb == "dump":
            # start-up: the dumpfile writer ~12 ms; only --dump needs it
            from cfsc.backends.dumpfile import dump_image

            dump_image(image, out, names)
        else:
            _upstream_ls(image, names, out)
    out.flush()


def _upstream_ls(image, names, out) -> None:
    """composefs-info ls: every entry but the root; `/` TAB after directories, TAB `-> ` before
    a symlink target, TAB `@ ` before a backing file; nothing after a hard link."""
    # start-up: the entry walker ~10 ms; `cfsc mkcomposefs` never reads an image
    from cfsc.backends.erofs.entries import walk

    lines = []
    it = walk(image, names)
    next(it)  # the root is not listed
    for path, e, first in it:
        line = escape_ls(path)
        ftype = e.mode & S_IFMT
        if first is not None:
            pass
        elif ftype == S_IFDIR:
            line += b"/\t"
        elif ftype == S_IFLNK:
            line += b"\t-> " + escape(e.payload)
        elif ftype == S_IFREG and e.payload is not None:
            line += b"\t@ " + escape(e.payload)
        lines.append(line + b"\n")
    out.write(b"".join(lines))


def _measure_files(paths: list[str], where: str) -> None:
    import sys

    if not paths:
        raise UsageError("no files specified", where)
    for path in paths:
        try:
            digest = digest_file(path)
        except OSError as e:
            raise CfscError(f"failed to measure: {e.strerror}", path) from None
        digest_line(digest)
    sys.stdout.flush()


@command("composefs-dump", context_settings={"ignore_unknown_options": True,
                                             "allow_extra_args": True, "help_option_names": []})
def composefs_dump_cmd(ctx: typer.Context) -> None:
    """Drop-in for upstream `composefs-dump SRC DEST`: re-encode an image at its own format version.

    Like upstream, the first name depth-first becomes each inode's home, so an image whose
    hard links were homed elsewhere comes out reordered (`cfsc compile IMAGE` keeps them).
    """
    # start-up: the reader and the image frontend ~12 ms; `cfsc mkcomposefs` needs neither
    from cfsc.backends.erofs.reader import Image
    from cfsc.frontends.image import read_tree

    where = "composefs-dump"
    args = list(ctx.args)
    if not args:
        raise UsageError("no source path specified", where)
    if len(args) < 2:
        raise UsageError("no destination path specified", where)
    image = Image.open(args[0])
    with build.batch_allocation():
        tree = read_tree(image, upstream=True)
    options = Options(min_version=image.version, max_version=image.version)
    with atomic_output(args[1]) as out:
        build.compile_tree(tree, options, out)
