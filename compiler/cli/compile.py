"""`cfsc compile` and `cfsc measure`: building images and digests."""

from __future__ import annotations

import sys

import typer
from cfsc import build
from cfsc.base.errors import CfscError, UsageError
from cfsc.base.fsverity import digest_file, hash_pool, short_gil_switches
from cfsc.base.options import Options
from cfsc.cli import command, digest_line
from cfsc.cli.sources import FROM, source_options


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
    if output is None and not print_digest_only:
        raise UsageError("no output: give -o IMAGE (or --print-digest-only)")
    if output is not None and print_digest_only:
        raise UsageError("--print-digest-only writes no image: drop -o")
    options.progress = sys.stderr.isatty()
    digest = build.compile_image(sources, output, options, source_format,
                                 want_digest=print_digest or print_digest_only)
    if digest is not None:
        digest_line(digest)


@command("measure")
def measure_cmd(
    files: list[str] = typer.Argument(..., help="Files to measure."),
) -> None:
    """Print each file's fs-verity digest, as `fsverity digest` does (sha256:HEX FILE)."""
    with short_gil_switches():
        for name in files:
            try:
                digest = digest_file(name, hash_pool())  # a big file's hashing on every core
            except OSError as e:
                raise CfscError(f"cannot read: {e.strerror}", name) from None
            sys.stdout.write(f"sha256:{digest.hex()} {name}\n")
