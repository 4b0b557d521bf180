"""Verbs run without typer when their arguments are plain: `cfsc compile SRC… -o IMAGE` and
the `cfsc mkcomposefs` drop-in.

Start-up is a large part of compiling an everyday image (a 64k-entry dumpfile takes the C
tool a quarter of a second), and typer with click is ~30 ms of it.  `run` takes the verb's
arguments itself when it knows every one of them, and returns None otherwise (`--help`,
`--from`, a source option, `--`, `--output=X`…): typer then parses them as always.  The
verbs' bodies are the functions below, which the typer verbs call too, so the two routes
differ only in parsing (tests/test_cli.py compares them, `main(direct=False)` being the
reference).
"""

from __future__ import annotations

import os
import sys

from cfsc import build
from cfsc.base.errors import UsageError
from cfsc.base.options import NUMBER, SOURCE_OPTIONS, Options, SourceOption
from cfsc.cli import digest_line, guarded
from cfsc.cli.getopt import getopt_long, strtol

OUTPUT_FLAGS = ("-o", "--output", "--out")


def _taken(option: SourceOption):
    """The values of `option` taken here, from its declaration (`minimum`, `choices`)."""
    if option.choices:
        return lambda v: v in option.choices
    if option.value == NUMBER:
        least = option.minimum if option.minimum is not None else 0
        return lambda v: v.isascii() and v.isdigit() and int(v) >= least
    return lambda v: v[:1] not in ("", "-")  # a path: typer says what an empty one is


# The options of a store import (`compile DIR -o IMAGE --digest-store S`: typer is ~50 ms of
# such a run), each with the values taken here; any other (`--threads 0`, `--hash md5`, a value
# that looks like a flag) is typer's to parse and to refuse with its own message.
STORE_OPTIONS = {o.flag: o for o in SOURCE_OPTIONS if o.field in ("digest_store", "threads", "hash")}
STORE_FLAGS = {flag: _taken(o) for flag, o in STORE_OPTIONS.items()}


def run(args: list[str], keep: list | None = None) -> int | None:
    """Run `args` (the verb first) if they are plain: the exit code, or None for typer.
    `keep`: where a compile leaves its tree for a process that ends next (`build.compile_image`)."""
    verb, rest = args[0], args[1:]
    if verb == "compile":
        parsed = _compile_arguments(rest)
        if parsed is None:
            return None
        sources, output, print_digest, print_digest_only, options = parsed
        code = guarded(compile_sources, sources, output, options, None, print_digest, print_digest_only, keep)
    elif verb == "mkcomposefs" and "--" not in rest:  # (click would take the `--` away)
        code = guarded(mkcomposefs, rest, keep)
    else:
        return None
    return code or 0


def _compile_arguments(args: list[str]) -> tuple[list[str], str | None, bool, bool, Options] | None:
    """Sources, output, the digest flags and the options of a store import (`--digest-store
    DIR`, `--threads N`, `--hash NAME`, with a value typer would take as it is), or None when
    anything else is given (or twice)."""
    sources: list[str] = []
    output = None
    seen: set[str] = set()
    valued: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag in STORE_FLAGS:
            if not eq:
                i += 1
                if i == len(args):
                    return None
                value = args[i]
            if flag in valued or not STORE_FLAGS[flag](value):
                return None
            valued[flag] = value
        elif arg in OUTPUT_FLAGS or arg in ("--print-digest", "--print-digest-only"):
            key = "-o" if arg in OUTPUT_FLAGS else arg
            if key in seen:
                return None
            seen.add(key)
            if key == "-o":
                i += 1
                if i == len(args) or (args[i][:1] == "-" and args[i] != "-"):
                    return None
                output = args[i]
        elif arg[:1] == "-" and arg != "-":
            return None
        else:
            sources.append(arg)
        i += 1
    if not sources:
        return None
    options = Options()
    for flag, value in valued.items():
        option = STORE_OPTIONS[flag]
        setattr(options, option.field, int(value) if option.value == NUMBER else value)
    return sources, output, "--print-digest" in seen, "--print-digest-only" in seen, options


def compile_sources(sources: list[str], output: str | None, options: Options, source_format: str | None,
                    print_digest: bool, print_digest_only: bool, keep: list | None = None) -> None:
    """`cfsc compile`: sources into an image at `output`, its digest printed if asked."""
    if output is None and not print_digest_only:
        raise UsageError("no output: give -o IMAGE (or --print-digest-only)")
    if output is not None and print_digest_only:
        raise UsageError("--print-digest-only writes no image: drop -o")
    options.progress = sys.stderr is not None and sys.stderr.isatty()
    digest = build.compile_image(sources, output, options, source_format,
                                 want_digest=print_digest or print_digest_only, keep=keep)
    if digest is not None:
        digest_line(digest)


MKCOMPOSEFS_OPTIONS = {
    "skip-xattrs": False, "user-xattrs": False, "skip-devices": False, "use-epoch": False,
    "digest-store": True, "print-digest": False, "print-digest-only": False,
    "from-file": False, "max-version": True, "min-version": True, "threads": True,
}


def mkcomposefs(args: list[str], keep: list | None = None) -> None:
    """Drop-in for upstream `mkcomposefs [OPTIONS] SOURCE IMAGE` (same options and syntax)."""
    where = "mkcomposefs"
    opts, operands = getopt_long(args, MKCOMPOSEFS_OPTIONS, "", where)
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
    digest = build.compile_image([operands[0]], output, options, fmt, want_digest=print_digest, keep=keep)
    if digest is not None:
        digest_line(digest)
