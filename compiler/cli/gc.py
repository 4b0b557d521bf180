"""`cfsc gc`: remove the store objects no kept image needs (`cfsc.tools.gc`)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time

import orjson
import typer
from cfsc.base.errors import UsageError
from cfsc.base.jsonbytes import put
from cfsc.cli import command

_DURATION = re.compile(r"(\d+(?:\.\d*)?)([smhd]?)\Z")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str, flag: str) -> float:
    """`90`, `90s`, `15m`, `2h`, `7d` in seconds."""
    m = _DURATION.match(text.strip())
    if m is None:
        raise UsageError(f"expected a duration (seconds, or a number with s, m, h or d), got {text!r}", flag)
    return float(m.group(1)) * _UNIT[m.group(2)]


@command("gc")
def gc_cmd(
    store: str = typer.Argument(..., metavar="STORE", help="The content store (a --digest-store directory)."),
    more: list[str] = typer.Argument(None, metavar="[IMAGE…]", show_default=False,
                                     help="More images to keep (so that `--keep *.cfs` keeps them all)."),
    keep: list[str] = typer.Option([], "--keep", metavar="IMAGE", help="An image whose objects stay (repeatable)."),
    keep_dir: list[str] = typer.Option([], "--keep-dir", metavar="DIR",
                                       help="Keep every image under DIR (every file there must be one; repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Remove nothing; report what would go."),
    grace: str = typer.Option("0", "--grace", metavar="DURATION",
                              help="Spare objects and temp files changed less than this long ago (30s, 15m, 2h, 7d):"
                                   " for writers that do not lock the store (mkcomposefs, older cfsc)."),
    wait: str = typer.Option("60", "--wait", metavar="DURATION",
                             help="How long to wait for compiles using the store to finish."),
    list_names: bool = typer.Option(False, "--list", help="Also print each file removed (with --json: `names`, relative to the store)."),
    as_json: bool = typer.Option(False, "--json", help="JSON output (schema: `cfsc schema gc-report`)."),
) -> None:
    """Remove every store object that none of the kept images refers to, and the temp files
    and commit journals of killed runs.  Safe beside compiles into the same store: it waits
    for those in flight and new ones wait for it (a lock file, STORE/.cfsc-lock).

    Every kept image is read first: one that cannot be read stops gc (exit 2), nothing removed.

    Names in the store that are not objects are reported and left alone.
    """
    from cfsc.tools.gc import collect  # start-up: only `cfsc gc` needs it

    images = keep + (more or [])
    if not keep and not keep_dir:
        raise UsageError("give the images to keep: --keep IMAGE or --keep-dir DIR (to empty a store, remove it)")
    if more and not keep:
        raise UsageError("images after the store are kept with --keep: give --keep before them", more[0])
    report = collect(store, images, keep_dir, dry_run=dry_run, grace=duration(grace, "--grace"), now=time.time(),
                     wait=duration(wait, "--wait"), names=list_names)
    out = sys.stdout.buffer
    if as_json:
        out.write(orjson.dumps(report_json(report), option=orjson.OPT_APPEND_NEWLINE))
    else:
        out.write(_text(report).encode("utf-8", "surrogateescape"))
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()


def report_json(report) -> dict:
    """The `gc-report` object (`cfsc schema gc-report`)."""
    obj: dict = {}
    put(obj, "store", os.fsencode(report.store))
    images = []
    for path, count in report.images:
        image: dict = {}
        put(image, "path", os.fsencode(path))
        image["objects"] = count
        images.append(image)
    other = []
    for path, what in report.other:
        entry: dict = {}
        put(entry, "path", path)
        entry["kind"] = what
        other.append(entry)
    obj.update({
        "dry_run": report.dry_run, "grace": report.grace, "images": images, "referenced": report.referenced,
        "missing": report.missing, "kept": vars(report.kept), "removed": vars(report.removed),
        "young": vars(report.young), "temp_files": vars(report.temp_files), "journals": vars(report.journals),
        "young_temps": vars(report.young_temps), "freed": report.freed, "other": other,
    })
    if report.names is not None:
        obj["names"] = report.names
    return obj


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _text(r) -> str:
    lines = [os.path.join(r.store, name) for name in r.names or ()]
    would = "would remove" if r.dry_run else "removed"
    lines.append(f"{would} {_count(r.removed.count, 'object', 'objects')} ({_size(r.removed.bytes)}), "
                 f"{_count(r.temp_files.count, 'temp file', 'temp files')} ({_size(r.temp_files.bytes)}) and "
                 f"{_count(r.journals.count, 'commit journal', 'commit journals')}: {_size(r.freed)} "
                 f"{'would be ' if r.dry_run else ''}freed in {r.store}")
    missing = f"; {r.missing} of them missing from the store (see `cfsc fsck-store`)" if r.missing else ""
    lines.append(f"kept {_count(r.kept.count, 'object', 'objects')} ({_size(r.kept.bytes)}) that "
                 f"{_count(len(r.images), 'image refers', 'images refer')} to{missing}")
    if r.young.count or r.young_temps.count:
        lines.append(f"spared {_count(r.young.count, 'unreferenced object', 'unreferenced objects')} "
                     f"({_size(r.young.bytes)}) and {_count(r.young_temps.count, 'temp file', 'temp files')} "
                     f"changed less than {r.grace:g} s ago (--grace)")
    for path, what in r.other:
        lines.append(f"left alone, not a store object: {os.path.join(r.store, os.fsdecode(path))} ({what})")
    return "".join(line + "\n" for line in lines)
