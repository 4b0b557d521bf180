"""`cfsc compile` and `cfsc measure`: building images and digests."""

from __future__ import annotations

import sys

import typer
from cfsc.base.errors import CfscError
from cfsc.base.fsverity import algorithm_named, digest_file, hash_pool, short_gil_switches
from cfsc.base.options import Options
from cfsc.cli import command
from cfsc.cli.direct import compile_sources
from cfsc.cli.sources import FROM, some_source_options, source_options


@command("compile")
@source_options(old_flags=True)
def compile_cmd(
    sources: list[str] = typer.Argument(..., help="Input(s): dumpfile, image, directory, tar layers, CRFS JSON, ostree:REPO:REF, oci:DIR[:TAG], oci-archive:, docker-archive:, containers-storage:NAME; '-' = stdin."),
    output: str | None = typer.Option(None, "-o", "--output", "--out", help="Image to write ('-' = stdout)."),
    source_format: str | None = FROM,
    print_digest: bool = typer.Option(False, "--print-digest", help="Print the image's fs-verity digest."),
    print_digest_only: bool = typer.Option(False, "--print-digest-only", help="Print the digest, write no image."),
    *,
    options: Options,
) -> None:
    """Compile a source into a composefs image."""
    compile_sources(sources, output, options, source_format, print_digest, print_digest_only)


@command("measure")
@some_source_options("hash")
def measure_cmd(
    files: list[str] = typer.Argument(..., help="Files to measure."),
    *,
    options: Options,
) -> None:
    """Print each file's fs-verity digest, as `fsverity digest [--hash-alg=…]` does (sha256:HEX FILE)."""
    algorithm = algorithm_named(options.hash)
    with short_gil_switches():
        for name in files:
            try:
                digest = digest_file(name, algorithm, hash_pool())  # a big file's hashing on every core
            except OSError as e:
                raise CfscError(f"cannot read: {e.strerror}", name) from None
            sys.stdout.write(f"{algorithm.name}:{digest.hex()} {name}\n")
