"""`cfsc dump`, `ls`, `objects`, `missing-objects`, `info`, `fsck-store`: looking into images.

Every verb takes any source: an image is read as is, anything else is compiled in memory
first (`cfsc.tools.images.open_image`), so the answers describe what `cfsc compile` writes.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import stat
import sys

import orjson
import typer
from cfsc.backends.dumptext import escape, escape_ls
from cfsc.base import rfc3339
from cfsc.base.errors import UsageError
from cfsc.base.jsonbytes import json_line, put
from cfsc.base.options import Options
from cfsc.base.output import atomic_output
from cfsc.base.tree import S_IFBLK, S_IFCHR, S_IFLNK, S_IFMT, S_IFREG
from cfsc.cli import command, renamed
from cfsc.cli.sources import FROM, adding, source_options
from cfsc.tools import images

JSON = typer.Option(False, "--json", help="JSON output.")


def _write_json_line(obj) -> None:
    sys.stdout.buffer.write(json_line(obj))


def _open(sources: list[str], options: Options, fmt: str | None) -> list:
    return [images.open_image(s, options, fmt, recompile=True) for s in sources]


def _store(values: dict) -> str:
    store = renamed(values["store"], values["old_store"], "--store", "--basedir")
    if store is None:
        raise UsageError("give the object store: --store DIR")
    return store


# The verb gets `store`: --store DIR, required; --basedir is its old name (hidden).
store_option = adding([
    inspect.Parameter("store", inspect.Parameter.KEYWORD_ONLY, annotation=str | None, default=typer.Option(
        None, "--store", metavar="DIR", help="The object store the images are mounted with (required).")),
    inspect.Parameter("old_store", inspect.Parameter.KEYWORD_ONLY, annotation=str | None, default=typer.Option(
        None, "--basedir", hidden=True, help="The old name of --store.")),
], "store", _store)


@command("dump")
@source_options()
def dump_cmd(
    source: str = typer.Argument(..., help="Image or any other source ('-' = stdin)."),
    fmt: str = typer.Option("dump", "--format", "-f", help="Text backend: dump, json, or another registered one."),
    as_json: bool = typer.Option(False, "--json", help="Same as --format json."),
    filters: list[str] = typer.Option([], "--filter", help="Only this child of the root (repeatable)."),
    output: str | None = typer.Option(None, "-o", "--output", help="Write here instead of stdout."),
    source_format: str | None = FROM,
    *,
    options: Options,
) -> None:
    """Print an image as a dumpfile (exactly as `composefs-info dump`), JSON lines, or another text format."""
    if as_json:
        fmt = "json"
    names = images.filter_names(filters)
    if output is None:
        images.dump(source, sys.stdout.buffer, fmt, names, options, source_format)
        sys.stdout.flush()
        return
    with atomic_output(output) as out:
        images.dump(source, out, fmt, names, options, source_format)


def _mtime(sec: int) -> str:
    """`YYYY-MM-DD HH:MM` (UTC), or the seconds for a time outside years 0001-9999."""
    when = rfc3339.format_or_none(sec)
    return when[:16].replace("T", " ") if when else str(sec)


def _ls_line(name: bytes, e) -> bytes:
    ftype = e.mode & S_IFMT
    if ftype == S_IFCHR or ftype == S_IFBLK:
        size = f"{os.major(e.rdev)}, {os.minor(e.rdev)}"
    else:
        size = str(e.size)
    head = f"{stat.filemode(e.mode)} {e.nlink:>3} {e.uid:>5} {e.gid:>5} {size:>10} {_mtime(e.mtime)} "
    line = head.encode() + escape_ls(name)
    if ftype == S_IFLNK:
        line += b" -> " + escape(e.payload)
    elif ftype == S_IFREG and e.payload is not None:
        line += b" @ " + escape(e.payload)
    return line + b"\n"


@command("ls")
@source_options()
def ls_cmd(
    source: str = typer.Argument(..., help="Image (or any source)."),
    path: str = typer.Argument("/", help="Directory or file inside the image."),
    recursive: bool = typer.Option(False, "-R", "--recursive", help="Everything below PATH, with full paths."),
    as_json: bool = JSON,
    source_format: str | None = FROM,
    where: str | None = typer.Option(None, "--where", help='Only entries matching a query, e.g. \'type == reg and size > 1M\' (see `cfsc diff --help`).'),
    *,
    options: Options,
) -> None:
    """List a directory of an image (mode, links, owner, size, mtime, name; `@` backing file)."""
    # start-up: the JSON-lines backend ~3-4 ms; only `cfsc ls --json` needs it
    from cfsc.backends.jsonlines import entry_object

    matches = None
    if where is not None:  # the query language of `cfsc.base.query` (issue 8)
        # start-up: lark ~25 ms; only --where needs it
        from cfsc.base.query import parse

        matches = parse(where, "--where")
    (image,) = _open([source], options, source_format)
    out = sys.stdout.buffer
    for item_path, e, first in images.listing(image, os.fsencode(path), recursive):
        if matches is not None and not matches(item_path, e):
            continue
        if as_json:
            out.write(orjson.dumps(entry_object(item_path, e, first), option=orjson.OPT_APPEND_NEWLINE))
        else:
            out.write(_ls_line(item_path if recursive else item_path.rpartition(b"/")[2] or b"/", e))


def _print_objects(found: dict, as_json: bool) -> None:
    out = sys.stdout.buffer
    for payload in sorted(found):
        if as_json:
            e = found[payload]
            obj: dict = {}
            put(obj, "object", payload)
            obj["size"] = e.size
            if e.digest is not None:
                obj["digest"] = e.digest.hex()
            _write_json_line(obj)
        else:
            out.write(payload + b"\n")


@command("objects")
@source_options()
def objects_cmd(
    sources: list[str] = typer.Argument(..., help="Images (or any sources)."),
    as_json: bool = JSON,
    source_format: str | None = FROM,
    *,
    options: Options,
) -> None:
    """The backing files the images need (payloads), sorted, each once."""
    _print_objects(images.objects(_open(sources, options, source_format)), as_json)


@command("missing-objects")
@source_options()
@store_option
def missing_objects_cmd(
    sources: list[str] = typer.Argument(..., help="Images (or any sources)."),
    as_json: bool = JSON,
    source_format: str | None = FROM,
    *,
    options: Options,
    store: str,
) -> None:
    """The backing files the images need that are not in the store (--store DIR)."""
    _print_objects(images.missing_objects(_open(sources, options, source_format), store), as_json)


INFO_LABELS = (
    ("image", "image"), ("format_version", "format version"), ("size", "size (bytes)"),
    ("blocks", "blocks"), ("fsverity_digest", "fs-verity digest"), ("has_acl", "has ACLs"),
    ("inodes", "inodes"), ("root_nid", "root nid"), ("hidden_whiteouts", "hidden whiteouts"),
)


@command("info")
@source_options()
def info_cmd(
    sources: list[str] = typer.Argument(..., help="Images (or any sources)."),
    as_json: bool = JSON,
    source_format: str | None = FROM,
    *,
    options: Options,
) -> None:
    """Format version, size, fs-verity digest, entry counts, inode formats, shared xattrs."""
    for image in _open(sources, options, source_format):
        facts = images.info(image)
        if as_json:
            _write_json_line(facts)
            continue
        lines = [f"{label}: {facts[key]}" for key, label in INFO_LABELS]
        if "fsverity_digest_sha512" in facts:
            lines.insert(5, f"fs-verity digest (sha512): {facts['fsverity_digest_sha512']}")
        lines.append(f"build time: {facts['build_time']}.{facts['build_time_nsec']:09d}")
        lines.append("entries: " + ", ".join(f"{n} {k}" for k, n in facts["entries"].items() if n))
        f = facts["files"]
        lines.append(f"regular files: {f['inline']} inline, {f['external']} external ({f['external_bytes']} bytes, "
                     f"{f['with_digest']} with digest{_hashes(f['digest_hashes'])}, "
                     f"{f['objects']} distinct objects), {f['empty']} empty")
        lines.append(f"inode formats: {facts['inode_formats']['compact']} compact, {facts['inode_formats']['extended']} extended")
        lines.append(f"shared xattrs: {facts['shared_xattrs']['count']} ({facts['shared_xattrs']['bytes']} bytes)")
        sys.stdout.write("\n".join(lines) + "\n")


def _hashes(names: list[str]) -> str:
    """Which digests the files carry, said only when not all mkcomposefs' SHA-256."""
    return f" ({', '.join(names)})" if names and names != ["sha256"] else ""


@command("fsck-store")
@source_options()
@store_option
def fsck_store_cmd(
    sources: list[str] = typer.Argument(..., help="Images (or any sources)."),
    as_json: bool = JSON,
    source_format: str | None = FROM,
    *,
    options: Options,
    store: str,
) -> None:
    """Check the store (--store DIR) for every object the images use: missing, truncated or
    altered (fs-verity digest).  --threads also sets the threads hashing objects.

    Also counts the temp files interrupted imports left (`.cfsc-tmp-*`; not a problem).

    Exit status 1 if any object is missing or corrupt, 0 if all are intact.
    """
    # start-up: the store checker ~16 ms; only `cfsc fsck-store` needs it
    from cfsc.tools.fsck_store import check_store

    if not os.path.isdir(store):
        raise UsageError("not a directory", store)
    report = check_store(_open(sources, options, source_format), store, options.threads)
    if as_json:
        problems = []
        for p in report.problems:
            obj: dict = {}
            put(obj, "object", p.payload)
            obj["problem"] = p.kind
            obj["detail"] = p.detail
            users = []
            for image_name, path in p.users:
                user: dict = {"image": image_name}
                put(user, "path", path)
                users.append(user)
            obj["users"] = users
            problems.append(obj)
        _write_json_line({"store": store, "objects": report.objects, "missing": report.count("missing"),
                          "corrupt": report.count("corrupt"), "invalid": report.count("invalid"),
                          "unverified": report.unverified, "temp_files": report.temp_files,
                          "temp_bytes": report.temp_bytes, "problems": problems})
    else:
        out = sys.stdout.buffer
        for p in report.problems:
            out.write(b"%s %s: %s\n" % (p.kind.encode(), escape(p.payload), p.detail.encode()))
            for image_name, path in p.users:
                out.write(b"  used by %s:%s\n" % (os.fsencode(image_name), escape(path)))
        unverified = f" ({report.unverified} without a digest: size checked only)" if report.unverified else ""
        out.write(f"{report.objects} objects checked in {store}: {report.count('missing')} missing, "
                  f"{report.count('corrupt')} corrupt, {report.count('invalid')} invalid{unverified}\n".encode())
        if report.temp_files:
            out.write(f"{report.temp_files} temp files of interrupted imports ({report.temp_bytes} bytes) at the top"
                      " of the store: safe to delete while no import runs\n".encode())
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    if report.problems:
        raise typer.Exit(1)
