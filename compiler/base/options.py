"""Compile options: one typed bag passed to frontends, passes and backends, and the one
declaration of the command-line options that set it.

The CLI builds an `Options` once from flags and the environment (the only place that reads
either); library users construct it directly.  `SOURCE_OPTIONS` declares every option that
shapes the tree a source gives — flag, value, help, the source kinds it applies to, the field
it sets — and every verb that takes a source offers all of them (`cfsc.cli.sources`), so a
compilation any verb can describe, the others can reproduce.
"""

from __future__ import annotations

import os

from cfsc.base.fsverity import ALGORITHMS
from cfsc.base.record import field, record


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) or 1


# A record, not a dataclass: `dataclasses` is ~10 ms of start-up (`cfsc.base.record`).
@record(slots=True)
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
    # fs-verity hash of file digests, store names and the image digest: sha256 or sha512
    hash: str = "sha256"
    threads: int = field(default_factory=_cpus)
    progress: bool = False
    # layers
    keep_whiteouts: bool = False
    # CRFS: the directory holding the payloads, to compute their fs-verity digests
    payload_dir: str | None = None
    # OSTree extras
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


# -- the command-line options that shape a tree --------------------------------------------------

# Source kinds, as the frontends are named (`cfsc.frontends.FRONTENDS`; a test keeps them equal).
KINDS = {"dump": "dumpfiles", "image": "images", "dir": "directories", "tar": "tar layers",
         "crfs": "CRFS TOCs", "ostree": "OSTree commits", "oci": "container images"}
ALL = tuple(KINDS)

# What an option's value is on the command line (the CLI turns each into the field's value):
FLAG = "flag"        # --x: True
NUMBER = "number"    # --x N: an integer (default: the field's)
DIR = "dir"          # --x DIR: a path
TEXT = "text"        # --x VALUE: a string
QUERIES = "queries"  # --x Q, repeatable: queries (`cfsc.base.query`), checked before reading
EPOCH = "epoch"      # --x: $SOURCE_DATE_EPOCH, read by the CLI


@record(frozen=True, slots=True)
class SourceOption:
    """One option that shapes the tree a source gives."""

    field: str                 # the `Options` field it sets
    flag: str
    value: str                 # FLAG, NUMBER, DIR, QUERIES or EPOCH
    kinds: tuple[str, ...]     # the source kinds it changes anything for
    text: str                  # what it does; `help` adds the kinds
    old_flag: str | None = None  # an earlier spelling, still accepted (hidden) where it was documented
    minimum: int | None = None   # NUMBER: the least value accepted
    choices: tuple[str, ...] = ()  # TEXT: the values accepted (none: any)

    @property
    def help(self) -> str:
        if self.kinds == ALL:
            return self.text
        kinds = ", ".join(KINDS[k] for k in self.kinds)
        return f"{kinds[0].upper()}{kinds[1:]}: {self.text[0].lower()}{self.text[1:]}"


SOURCE_OPTIONS: tuple[SourceOption, ...] = (
    SourceOption("min_version", "--min-version", NUMBER, ALL,
                 "Lowest composefs format version of the image compiled."),
    SourceOption("max_version", "--max-version", NUMBER, ALL,
                 "Highest composefs format version the image compiled may use."),
    SourceOption("strict", "--strict", FLAG, ("dump",),
                 "Strict parsing (upstream's CFS_PARSE_STRICT)."),
    SourceOption("use_epoch", "--use-epoch", FLAG, ("dir", "tar", "oci"),
                 "Set every mtime to 0."),
    SourceOption("skip_devices", "--skip-devices", FLAG, ("dir", "tar", "oci"),
                 "Leave out character and block devices."),
    SourceOption("skip_xattrs", "--skip-xattrs", FLAG, ("dir", "tar", "ostree", "oci"),
                 "Record no xattrs."),
    SourceOption("user_xattrs", "--user-xattrs", FLAG, ("dir", "tar", "ostree", "oci"),
                 "Record only user.* xattrs."),
    SourceOption("hardlinks", "--hardlinks", FLAG, ("dir", "ostree"),
                 "Keep hard links as one inode (mkcomposefs makes each name its own inode; "
                 "tar layers always keep them)."),
    SourceOption("keep_whiteouts", "--keep-whiteouts", FLAG, ("tar", "oci"),
                 "Keep OCI whiteouts as overlay whiteouts (for stacking the image over lower layers)."),
    SourceOption("payload_dir", "--payload-dir", DIR, ("crfs",),
                 "Compute the fs-verity digests of the payloads found in DIR.", old_flag="--basedir"),
    SourceOption("verify", "--verify", FLAG, ("ostree",),
                 "Re-check every content object's checksum while reading it."),
    SourceOption("ostree_compat", "--ostree-compat", FLAG, ("ostree",),
                 "The image `ostree checkout --composefs` writes (no inline data, payloads "
                 "XX/YYYY.file, usr etc boot var sysroot)."),
    SourceOption("platform", "--platform", TEXT, ("oci",),
                 "The platform to pick from a multi-platform index, os/arch or os/arch/variant (default: the host's)."),
    SourceOption("storage_root", "--storage-root", DIR, ("oci",),
                 "containers-storage: the store's root (default: /var/lib/containers/storage)."),
    SourceOption("toc_only", "--toc-only", FLAG, ("oci",),
                 "zstd:chunked / eStargz layers: build the tree from their TOC alone, reading no file data."),
    SourceOption("digest_store", "--digest-store", DIR, ("dir", "tar", "ostree", "oci"),
                 "Import file data into this content store (named by fs-verity digest)."),
    SourceOption("hash", "--hash", TEXT, ("dir", "tar", "ostree", "oci", "crfs"),
                 "fs-verity hash of file digests and store object names (and of --print-digest): "
                 "sha256 (default, as mkcomposefs) or sha512 (as composefs-rs).", choices=tuple(ALGORITHMS)),
    SourceOption("threads", "--threads", NUMBER, ("dir", "tar", "ostree", "oci"),
                 "Threads (for a directory: processes) reading and hashing files (default: CPUs available).", minimum=1),
    SourceOption("exclude", "--exclude", QUERIES, ALL,
                 "Leave out entries matching a query, e.g. 'path ~ \"/usr/share/doc/**\"' "
                 "(repeatable; see `cfsc diff --help`)."),
    SourceOption("clamp_mtime", "--clamp-mtime", EPOCH, ALL,
                 "No mtime later than $SOURCE_DATE_EPOCH (later ones become it)."),
)


def reshapes(options: Options, kind: str) -> bool:
    """Whether an option that applies to sources of `kind` is set: an image source is then
    compiled with them rather than read as it is."""
    default = Options()
    return any(getattr(options, o.field) != getattr(default, o.field) for o in SOURCE_OPTIONS if kind in o.kinds)
