"""`cfsc dump`, `ls`, `objects`, `missing-objects`, `info`, `fsck-store`: looking into images.

Every verb takes any source: an image is read as is, anything else is compiled in memory
first (`cfsc.tools.images.open_image`), so the answers describe what `cfsc compile` writes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import stat
import sys

import orjson
import typer
from cfsc.base.errors import UsageError
from cfsc.base.options import Options
from cfsc.base.tree import S_IFBLK, S_IFCHR, S_IFLNK, S_IFMT, S_IFREG
from cfsc.cli import command
from cfsc.tools import images

FROM = typer.Option(None, "--from", help="Source format (default: detected from the content).")
JSON = typer.Option(False, "--json", help="JSON output.")


def _write_json_line(obj) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE))


def _open(sources: list[str], fmt: str | None) -> list:
    return [images.open_image(s, Options(), fmt) for s in sources]


@command("dump")
def dump_cmd(
    source: str = typer.Argument(..., help="Image or any other source ('-' = stdin)."),
    fmt: str = typer.Option("dump", "--format", "-f", help="Text backend: dump, json, or another registered one."),
    as_json: bool = typer.Option(False, "--json", help="Same as --format json."),
    filters: list[str] = typer.Option([], "--filter", help="Only this child of the root (repeatable)."),
    output: str | None = typer.Option(None, "-o", "--output", help="Write here instead of stdout."),
    source_format: str | None = FROM,
    min_version: int = typer.Option(0, "--min-version", help="For a non-image source: lowest format version."),
    max_version: int = typer.Option(1, "--max-version", help="For a non-image source: highest format version."),
    strict: bool = typer.Option(False, "--strict", help="Strict dumpfile parsing (upstream's CFS_PARSE_STRICT)."),
) -> None:
    """Print an image as a dumpfile (exactly as `composefs-info dump`), JSON lines, or another text format."""
    if as_json:
        fmt = "json"
    options = Options(min_version=min_version, max_version=max_version, strict=strict)
    names = images.filter_names(filters)
    if output is None:
        images.dump(source, sys.stdout.buffer, fmt, names, options, source_format)
        sys.stdout.flush()
        return
    from cfsc.base.output import atomic_output

    with atomic_output(output) as out:
        images.dump(source, out, fmt, names, options, source_format)


def _mtime(sec: int) -> str:
    try:
        return datetime.datetime.fromtimestamp(sec, datetime.UTC).strftime("%Y-%m-%d %H:%M")
    except (OverflowError, OSError, ValueError):
        return str(sec)


def _ls_line(name: bytes, e) -> bytes:
    from cfsc.backends.dumptext import escape, escape_ls

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
def ls_cmd(
    source: str = typer.Argument(..., help="Image (or any source)."),
    path: str = typer.Argument("/", help="Directory or file inside the image."),
    recursive: bool = typer.Option(False, "-R", "--recursive", help="Everything below PATH, with full paths."),
    as_json: bool = JSON,
    source_format: str | None = FROM,
    where: str | None = typer.Option(None, "--where", help='Only entries matching a query, e.g. \'type == reg and size > 1M\' (see `cfsc diff --help`).'),
) -> None:
    """List a directory of an image (mode, links, owner, size, mtime, name; `@` backing file)."""
    from cfsc.backends.jsonlines import entry_object

    matches = None
    if where is not None:  # the query language of `cfsc.base.query` (issue 8)
        from cfsc.base.query import parse

        matches = parse(where, "--where")
    (image,) = _open([source], source_format)
    out = sys.stdout.buffer
    for item_path, e, first in images.listing(image, os.fsencode(path), recursive):
        if matches is not None and not matches(item_path, e):
            continue
        if as_json:
            out.write(orjson.dumps(entry_object(item_path, e, first), option=orjson.OPT_APPEND_NEWLINE))
        else:
            out.write(_ls_line(item_path if recursive else item_path.rpartition(b"/")[2] or b"/", e))


def _print_objects(found: dict, as_json: bool) -> None:
    from cfsc.base.jsonbytes import put

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
def objects_cmd(
    sources: list[str] = typer.Argument(..., help="Images (or any sources)."),
    as_json: bool = JSON,
    source_format: str | None = FROM,
) -> None:
    """The backing files the images need (payloads), sorted, each once."""
    _print_objects(images.objects(_open(sources, source_format)), as_json)


@command("missing-objects")
def missing_objects_cmd(
    sources: list[str] = typer.Argument(..., help="Images (or any sources)."),
    basedir: str = typer.Option(..., "--basedir", help="The object store the images are mounted with."),
    as_json: bool = JSON,
    source_format: str | None = FROM,
) -> None:
    """The backing files the images need that are not in the store."""
    _print_objects(images.missing_objects(_open(sources, source_format), basedir), as_json)


INFO_LABELS = (
    ("image", "image"), ("format_version", "format version"), ("size", "size (bytes)"),
    ("blocks", "blocks"), ("fsverity_digest", "fs-verity digest"), ("has_acl", "has ACLs"),
    ("inodes", "inodes"), ("root_nid", "root nid"), ("hidden_whiteouts", "hidden whiteouts"),
)


@command("info")
def info_cmd(
    sources: list[str] = typer.Argument(..., help="Images (or any sources)."),
    as_json: bool = JSON,
    source_format: str | None = FROM,
) -> None:
    """Format version, size, fs-verity digest, entry counts, inode formats, shared xattrs."""
    for image in _open(sources, source_format):
        facts = images.info(image)
        if as_json:
            _write_json_line(facts)
            continue
        lines = [f"{label}: {facts[key]}" for key, label in INFO_LABELS]
        lines.append(f"build time: {facts['build_time']}.{facts['build_time_nsec']:09d}")
        lines.append("entries: " + ", ".join(f"{n} {k}" for k, n in facts["entries"].items() if n))
        f = facts["files"]
        lines.append(f"regular files: {f['inline']} inline, {f['external']} external ({f['external_bytes']} bytes, "
                     f"{f['with_digest']} with digest, {f['objects']} distinct objects), {f['empty']} empty")
        lines.append(f"inode formats: {facts['inode_formats']['compact']} compact, {facts['inode_formats']['extended']} extended")
        lines.append(f"shared xattrs: {facts['shared_xattrs']['count']} ({facts['shared_xattrs']['bytes']} bytes)")
        sys.stdout.write("\n".join(lines) + "\n")


@command("fsck-store")
def fsck_store_cmd(
    sources: list[str] = typer.Argument(..., help="Images (or any sources)."),
    basedir: str = typer.Option(..., "--basedir", help="The object store the images are mounted with."),
    as_json: bool = JSON,
    threads: int | None = typer.Option(None, "--threads", min=1, help="Threads hashing objects (default: CPUs available)."),
    source_format: str | None = FROM,
) -> None:
    """Check the store for every object the images use: missing, truncated or altered (fs-verity digest).

    Exit status 1 if any object is missing or corrupt, 0 if all are intact.
    """
    from cfsc.base.jsonbytes import put
    from cfsc.tools.fsck_store import check_store

    if not os.path.isdir(basedir):
        raise UsageError("not a directory", basedir)
    report = check_store(_open(sources, source_format), basedir, threads or Options().threads)
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
        _write_json_line({"store": basedir, "objects": report.objects, "missing": report.count("missing"),
                          "corrupt": report.count("corrupt"), "invalid": report.count("invalid"),
                          "unverified": report.unverified, "problems": problems})
    else:
        from cfsc.backends.dumptext import escape

        out = sys.stdout.buffer
        for p in report.problems:
            out.write(b"%s %s: %s\n" % (p.kind.encode(), escape(p.payload), p.detail.encode()))
            for image_name, path in p.users:
                out.write(b"  used by %s:%s\n" % (os.fsencode(image_name), escape(path)))
        unverified = f" ({report.unverified} without a digest: size checked only)" if report.unverified else ""
        out.write(f"{report.objects} objects checked in {basedir}: {report.count('missing')} missing, "
                  f"{report.count('corrupt')} corrupt, {report.count('invalid')} invalid{unverified}\n".encode())
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    if report.problems:
        raise typer.Exit(1)
