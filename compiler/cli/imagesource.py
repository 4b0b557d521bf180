"""Options of container-image sources, shared by every verb that takes a source."""

from __future__ import annotations

import typer
from cfsc.base.options import Options

PLATFORM = typer.Option(None, "--platform", help="Container images: os/arch[/variant] to pick from a multi-platform index (default: the host's).")
STORAGE_ROOT = typer.Option(None, "--storage-root", help="containers-storage: the store's root (default: /var/lib/containers/storage).")
TOC_ONLY = typer.Option(False, "--toc-only", help="zstd:chunked / eStargz layers: build the tree from their TOC alone, reading no file data.")


def apply(options: Options, platform: str | None, storage_root: str | None, toc_only: bool) -> Options:
    """`options` with the image-source options set (a bad --platform fails before any input is read)."""
    if platform is not None:
        from cfsc.frontends.oci.layout import parse_platform

        parse_platform(platform)
    options.platform = platform
    options.storage_root = storage_root
    options.toc_only = toc_only
    return options
