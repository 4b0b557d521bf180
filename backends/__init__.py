"""Backends: turn a compiled tree into an output format.

How to add a backend: write `backends/<format>.py` (or a package) exposing
`write(tree, out, options)` that writes to a binary stream, and add a row to `BACKENDS`.
Backends that need the composefs lowering (the image) get a tree that went through the whole
pipeline; text backends (dumpfile, JSON) get the tree as the frontend produced it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

from cfsc.base.options import Options
from cfsc.base.tree import Tree


def _write_image(tree: Tree, out: BinaryIO, options: Options) -> None:
    from cfsc.backends.erofs.writer import write_image
    from cfsc.build.pipeline import run_passes

    write_image(run_passes(tree, options), out)


def _write_dump(tree: Tree, out: BinaryIO, options: Options) -> None:
    from cfsc.backends.dumpfile import write

    write(tree, out, options)


def _write_json(tree: Tree, out: BinaryIO, options: Options) -> None:
    from cfsc.backends.jsonlines import write

    write(tree, out, options)


def _write_crfs(tree: Tree, out: BinaryIO, options: Options) -> None:
    from cfsc.backends.crfs import write

    write(tree, out, options)


# name → (writer, description)
BACKENDS: dict[str, tuple[Callable[[Tree, BinaryIO, Options], None], str]] = {
    "image": (_write_image, "composefs image (EROFS), byte-identical with mkcomposefs 1.0.8"),
    "dump": (_write_dump, "dumpfile text, as composefs-info dump prints the compiled image"),
    "json": (_write_json, "one JSON object per entry per line (the dump's fields)"),
    "crfs": (_write_crfs, "CRFS / eStargz TOC JSON that `--from crfs` compiles back (cfsc schema crfs-toc)"),
}
