"""Drop-in verbs with upstream's exact syntax, for scripts written for the C tools.

Options are parsed with GNU getopt_long semantics (`cfsc.getopt`), not by typer.
"""

from __future__ import annotations

import os

import typer

from .. import build
from ..errors import UsageError
from ..options import Options
from . import command, digest_line

MKCOMPOSEFS_OPTIONS = {
    "skip-xattrs": False, "user-xattrs": False, "skip-devices": False, "use-epoch": False,
    "digest-store": True, "print-digest": False, "print-digest-only": False,
    "from-file": False, "max-version": True, "min-version": True, "threads": True,
}


@command("mkcomposefs", context_settings={"ignore_unknown_options": True,
                                          "allow_extra_args": True, "help_option_names": []})
def mkcomposefs_cmd(ctx: typer.Context) -> None:
    """Drop-in for upstream `mkcomposefs [OPTIONS] SOURCE IMAGE` (same options and syntax)."""
    from ..getopt import getopt_long, strtol

    where = "mkcomposefs"
    opts, operands = getopt_long(list(ctx.args), MKCOMPOSEFS_OPTIONS, "", where)
    options = Options()
    from_file = print_digest = print_digest_only = version_set = False
    min_version = max_version = 0
    for name, value in opts:
        if name == "from-file":
            from_file = True
        elif name == "print-digest":
            print_digest = True
        elif name == "print-digest-only":
            print_digest = print_digest_only = True
        elif name in ("min-version", "max-version"):
            version_set = True
            number = strtol(value or "", name.replace("-", " "), where)
            if name == "min-version":
                min_version = number
            else:
                max_version = number
        elif name == "threads":
            options.threads = strtol(value or "", "threads count", where)
            if options.threads <= 0:
                raise UsageError(f"invalid threads count {options.threads}", where)
        elif name == "digest-store":
            options.digest_store = value
        else:
            setattr(options, name.replace("-", "_"), True)
    # Upstream: if either version option is given, the other one defaults to 0.
    options.min_version, options.max_version = (min_version, max_version) if version_set else (0, 1)
    options.strict = "CFS_PARSE_STRICT" in os.environ
    if not operands:
        raise UsageError("no source path specified", where)
    if len(operands) > 2:
        raise UsageError("too many arguments", where)
    if not operands[0]:
        raise UsageError("empty source path specified", where)
    if print_digest_only and len(operands) == 2:
        raise UsageError("cannot specify destination path with --print-digest-only", where)
    if not print_digest_only and len(operands) < 2:
        raise UsageError("no destination path specified", where)
    output = operands[1] if len(operands) == 2 else None
    fmt = "dump" if from_file else "dir"
    digest = build.compile_image([operands[0]], output, options, fmt, want_digest=print_digest)
    if digest is not None:
        digest_line(digest)
