"""`cfsc export`: a source (an image, a container image, anything) → a tar layer."""

from __future__ import annotations

import typer
from cfsc.base.options import Options
from cfsc.base.output import atomic_output
from cfsc.build import batch_allocation
from cfsc.cli import command, renamed
from cfsc.cli.sources import FROM, source_options
from cfsc.tools import images


@command("export")
@source_options()
def export_cmd(
    source: str = typer.Argument(..., help="Image or any other source ('-' = stdin)."),
    output: str = typer.Option(..., "-o", "--output", help="The tar layer to write ('-' = stdout)."),
    store: str | None = typer.Option(None, "--store", metavar="DIR[:DIR…]",
                                     help="Store(s) holding the external file data."),
    old_store: str | None = typer.Option(None, "--basedir", hidden=True, help="The old name of --store."),
    source_format: str | None = FROM,
    *,
    options: Options,
) -> None:
    """Write the tree a source shows as one tar layer (POSIX/PAX, xattrs, hard links, devices;
    deterministic order and headers) that `cfsc compile` turns back into the same image."""
    # start-up: the tar writer, the image frontend and the store reader ~9 ms, which
    # `cfsc --help` (it loads every verb's module) would pay; only export needs them
    from cfsc.backends import tarlayer
    from cfsc.frontends.image import read_tree
    from cfsc.store.backing import parse_basedirs

    store = renamed(store, old_store, "--store", "--basedir")
    image = images.open_image(source, options, source_format)
    with batch_allocation():
        tree = read_tree(image)
    with atomic_output(output) as out:
        tarlayer.write(tree, out, parse_basedirs(store) if store else None)
