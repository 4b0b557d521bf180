"""Compile options: one typed bag passed to frontends, passes and backends.

The CLI builds it once from flags and the environment (the only place that reads either);
library users construct it directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(slots=True)
class Options:
    # format version selection (§0 step 1 of the format note)
    min_version: int = 0
    max_version: int = 1
    # dumpfile parsing: upstream's CFS_PARSE_STRICT rules
    strict: bool = False
    # directory / tar / ostree frontends
    hardlinks: bool = False
    skip_xattrs: bool = False
    user_xattrs: bool = False
    skip_devices: bool = False
    use_epoch: bool = False
    digest_store: str | None = None
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)) or 1)
    progress: bool = False
    # layers
    keep_whiteouts: bool = False
    # CRFS / OSTree extras
    basedir: str | None = None
    verify: bool = False
    ostree_compat: bool = False  # the image `ostree checkout --composefs` writes
    # container images (`frontends.oci`)
    platform: str | None = None  # os/arch[/variant] picked from an image index; None: the host's
    storage_root: str | None = None  # containers-storage root; None: /var/lib/containers/storage
    toc_only: bool = False  # zstd:chunked / eStargz layers built from their TOC alone
    # mtime clamping (SOURCE_DATE_EPOCH, read by the CLI)
    clamp_mtime: int | None = None
    # entries to leave out: queries (`cfsc.base.query`), any match excludes
    exclude: tuple[str, ...] = ()
    # set by `compile_image`: store objects get their names after the image is written
    # (`cfsc.store.objects.HeldObjects`); None: each frontend names them when its source is read
    held: object | None = None
