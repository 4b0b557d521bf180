"""`cfsc compile` and `cfsc measure`: building images and digests."""

from __future__ import annotations

import sys

import typer
from cfsc import build
from cfsc.base.errors import CfscError, UsageError
from cfsc.base.options import Options
from cfsc.cli import command, digest_line, imagesource, source_date_epoch


@command("compile")
def compile_cmd(
    sources: list[str] = typer.Argument(..., help="Input(s): dumpfile, image, directory, tar layers, CRFS JSON, ostree:REPO:REF, oci:DIR[:TAG], oci-archive:, docker-archive:, containers-storage:NAME; '-' = stdin."),
    output: str | None = typer.Option(None, "-o", "--output", "--out", help="Image to write ('-' = stdout)."),
    source_format: str | None = typer.Option(None, "--from", help="Source format (default: detected from the content)."),
    min_version: int = typer.Option(0, "--min-version", help="Lowest composefs format version to use."),
    max_version: int = typer.Option(1, "--max-version", help="Highest composefs format version allowed."),
    strict: bool = typer.Option(False, "--strict", help="Strict dumpfile parsing (upstream's CFS_PARSE_STRICT)."),
    print_digest: bool = typer.Option(False, "--print-digest", help="Print the image's fs-verity digest."),
    print_digest_only: bool = typer.Option(False, "--print-digest-only", help="Print the digest, write no image."),
    digest_store: str | None = typer.Option(None, "--digest-store", help="Directory tree, tar layers: import external files into this content store."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Threads reading and hashing files (default: CPUs available)."),
    use_epoch: bool = typer.Option(False, "--use-epoch", help="Directory tree, tar layers: set every mtime to 0."),
    skip_devices: bool = typer.Option(False, "--skip-devices", help="Directory tree, tar layers: leave out character and block devices."),
    skip_xattrs: bool = typer.Option(False, "--skip-xattrs", help="Directory tree, tar layers: record no xattrs."),
    user_xattrs: bool = typer.Option(False, "--user-xattrs", help="Directory tree, tar layers: record only user.* xattrs."),
    hardlinks: bool = typer.Option(False, "--hardlinks", help="Directory tree: keep hard links (mkcomposefs makes each name its own inode; tar layers always do)."),
    basedir: str | None = typer.Option(None, "--basedir", help="CRFS TOC: fs-verity digests for payloads found in this directory."),
    keep_whiteouts: bool = typer.Option(False, "--keep-whiteouts", help="Tar layers: keep OCI whiteouts as overlay whiteouts (for stacking the image over lower layers)."),
    exclude: list[str] = typer.Option([], "--exclude", help='Leave out entries matching a query, e.g. \'path ~ "/usr/share/doc/**"\' (repeatable; see `cfsc diff --help`).'),
    clamp_mtime: bool = typer.Option(False, "--clamp-mtime", help="No mtime later than $SOURCE_DATE_EPOCH (later ones become it)."),
    verify: bool = typer.Option(False, "--verify", help="OSTree: re-check every content object's checksum while reading it."),
    ostree_compat: bool = typer.Option(False, "--ostree-compat", help="OSTree: the image `ostree checkout --composefs` writes (no inline data, payloads XX/YYYY.file, usr etc boot var sysroot)."),
    platform: str | None = imagesource.PLATFORM,
    storage_root: str | None = imagesource.STORAGE_ROOT,
    toc_only: bool = imagesource.TOC_ONLY,
) -> None:
    """Compile a source into a composefs image."""
    if output is None and not print_digest_only:
        raise UsageError("no output: give -o IMAGE (or --print-digest-only)")
    if output is not None and print_digest_only:
        raise UsageError("--print-digest-only writes no image: drop -o")
    options = Options(min_version=min_version, max_version=max_version, strict=strict,
                      digest_store=digest_store, use_epoch=use_epoch, skip_devices=skip_devices,
                      skip_xattrs=skip_xattrs, user_xattrs=user_xattrs, hardlinks=hardlinks,
                      progress=sys.stderr.isatty(), basedir=basedir,
                      keep_whiteouts=keep_whiteouts, exclude=tuple(exclude),
                      clamp_mtime=source_date_epoch() if clamp_mtime else None,
                      verify=verify, ostree_compat=ostree_compat)
    imagesource.apply(options, platform, storage_root, toc_only)
    if threads is not None:
        options.threads = threads
    if exclude:
        from cfsc.base import query

        query.any_of(exclude, "--exclude")  # a bad query fails before the source is read
    digest = build.compile_image(sources, output, options, source_format,
                                 want_digest=print_digest or print_digest_only)
    if digest is not None:
        digest_line(digest)


@command("measure")
def measure_cmd(
    files: list[str] = typer.Argument(..., help="Files to measure."),
) -> None:
    """Print each file's fs-verity digest, as `fsverity digest` does (sha256:HEX FILE)."""
    from cfsc.base.fsverity import digest_file

    for name in files:
        try:
            digest = digest_file(name)
        except OSError as e:
            raise CfscError(f"cannot read: {e.strerror}", name) from None
        sys.stdout.write(f"sha256:{digest.hex()} {name}\n")
