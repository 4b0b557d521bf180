"""`cfsc diff` and `cfsc check`: what differs between two sources, and digest checks for CI.

Exit status: 0 identical / check passed, 1 different / check failed, 2 bad input or usage.
"""

from __future__ import annotations

import contextlib
import os
import sys

import typer
from cfsc.backends.dumptext import escape_ls
from cfsc.base import rfc3339
from cfsc.base.errors import UsageError
from cfsc.base.jsonbytes import json_line
from cfsc.base.options import Options
from cfsc.cli import command
from cfsc.cli.sources import FROM, source_options

COLORS = {"added": "\033[32m", "removed": "\033[31m", "changed": "\033[33m", "head": "\033[1m"}
RESET = "\033[0m"
MARKS = {"added": b"+", "removed": b"-", "changed": b"~"}
VALUE_MAX = 80

JSON = typer.Option(False, "--json", help="One JSON document (see `cfsc schema diff-report` / `check-report`).")
COLOR = typer.Option("auto", "--color", help="auto (a terminal without NO_COLOR), always or never.")


def _color(choice: str) -> bool:
    if choice == "always":
        return True
    if choice == "never":
        return False
    if choice != "auto":
        raise UsageError(f"expected auto, always or never, got {choice!r}", "--color")
    return sys.stdout is not None and sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _write_json(obj) -> None:
    sys.stdout.buffer.write(json_line(obj))


# -- human output --------------------------------------------------------------------------

def _bytes(value: bytes) -> bytes:
    shown = escape_ls(value[:VALUE_MAX])
    more = f"… ({len(value)} bytes)".encode() if len(value) > VALUE_MAX else b""
    return b'"' + shown.replace(b'"', b'\\"') + b'"' + more


def _value(name: str, value) -> bytes:
    if value is None:
        return b"(none)"
    if name == "mode":
        return b"%04o" % value
    if name == "mtime":
        when = rfc3339.format_or_none(value)  # any s64 is a legal mtime: show the number alone
        return b"%d (%s)" % (value, when.encode()) if when else b"%d" % value
    if name == "rdev":
        return b"%d:%d" % (os.major(value), os.minor(value))
    if name == "digest":
        return value.hex().encode()
    if name == "hardlinks":
        return b", ".join(escape_ls(p) for p in value)
    if isinstance(value, bytes):
        return _bytes(value)
    return str(value).encode()


def _brief(fields: tuple[str, ...], rec) -> bytes:
    """`reg 0644 12 bytes` — what a + or - line says about the entry."""
    values = dict(zip(fields, rec, strict=True))
    parts = [values.get("type", "?").encode()]
    if values.get("mode") is not None:
        parts.append(b"%04o" % values["mode"])
    if values.get("size") is not None:
        parts.append(b"%d bytes" % values["size"])
    if values.get("target") is not None:
        parts.append(b"-> " + _bytes(values["target"]))
    return b" ".join(parts)


def render(report, out, color: bool) -> None:
    def paint(kind: str, text: bytes) -> bytes:
        return (COLORS[kind].encode() + text + RESET.encode()) if color else text

    fields = report.fields
    out.write(paint("head", f"--- {report.a.name} ({report.a.format})\n+++ {report.b.name} ({report.b.format})\n".encode()))
    lines = []
    for c in report.changes:
        head = MARKS[c.kind] + b" " + escape_ls(c.path)
        if c.kind == "changed":
            lines.append(paint("changed", head) + b"\n")
            for name, key, va, vb in c.attributes:
                label = b"xattr " + escape_ls(key) if name == "xattr" else name.encode()
                if name == "xattr" and va is None:
                    text = b"added " + _bytes(vb)
                elif name == "xattr" and vb is None:
                    text = b"removed (was " + _bytes(va) + b")"
                else:
                    text = _value(name, va) + " → ".encode() + _value(name, vb)
                lines.append(b"    " + label + b": " + text + b"\n")
        else:
            lines.append(paint(c.kind, head) + b"  " + _brief(fields, c.a if c.b is None else c.b) + b"\n")
        if len(lines) > 4096:
            out.write(b"".join(lines))
            lines.clear()
    out.write(b"".join(lines))
    _render_layout(report, out)
    out.write(_summary_line(report).encode() + b"\n")


def _render_layout(report, out) -> None:
    if report.layout:
        out.write(b"image bytes differ; why:\n")
        for reason in report.layout:
            out.write(f"  {reason.aspect}: {reason.detail}\n".encode())


def _summary_line(report) -> str:
    s = report.summary()
    total = s["added"] + s["removed"] + s["changed"]
    if report.identical:
        return "identical"
    text = (f"{total} {'entry differs' if total == 1 else 'entries differ'}: "
            f"{s['added']} added, {s['removed']} removed, {s['changed']} changed")
    if not total:
        text = "the trees are identical; the image bytes differ"
    return text


def render_stat(report, out) -> None:
    s = report.summary()
    out.write(f"--- {report.a.name} ({report.a.format})\n+++ {report.b.name} ({report.b.format})\n".encode())
    for kind in ("added", "removed", "changed"):
        out.write(f"{kind:>8} {s[kind]}\n".encode())
    for name, count in s["attributes"].items():
        out.write(f"{'':>8}   {name} {count}\n".encode())
    tops: dict[bytes, list[int]] = {}
    for c in report.changes:
        parts = c.path.split(b"/")
        top = b"/" + parts[1] if len(parts) > 2 else b"/"
        counts = tops.setdefault(top, [0, 0, 0])
        counts[("added", "removed", "changed").index(c.kind)] += 1
    if tops:
        width = max(len(escape_ls(t)) for t in tops)
        for top, (added, removed, changed) in sorted(tops.items()):
            name = escape_ls(top).ljust(width)
            out.write(name + f"  +{added} -{removed} ~{changed}\n".encode())
    _render_layout(report, out)
    out.write(_summary_line(report).encode() + b"\n")


@command("diff")
@source_options(old_flags=True)
def diff_cmd(
    a: str = typer.Argument(..., help="First source: image, dumpfile, directory, tar, CRFS JSON, ostree:REPO:REF, "
                            "or layers L1.tar+L2.tar (bottom first)."),
    b: str = typer.Argument(..., help="Second source (any kind)."),
    as_json: bool = JSON,
    stat: bool = typer.Option(False, "--stat", help="Only counts: per kind, per attribute, per top-level directory."),
    ignore: list[str] = typer.Option([], "--ignore", help="Attributes to leave out, comma-separated: mode, uid, gid, owner, "
                                     "rdev, mtime, mtime_nsec, size, nlink, target, payload, digest, content, data, "
                                     "xattrs, xattr:KEY, hardlinks, layout."),
    where: str | None = typer.Option(None, "--where", help="Only report entries matching this query (on either side)."),
    explain: bool = typer.Option(False, "--explain", help="Compile non-image sides too and say why the image bytes differ."),
    color: str = COLOR,
    source_format: str | None = FROM,
    *,
    options: Options,
) -> None:
    """Entries added, removed and changed between two sources, attribute by attribute.

    Both sides are compared as the image each one is or compiles to, as a user sees it; the
    source options are `cfsc compile`'s and apply to both sides.

    Layers: a side may be tar layers joined by +, bottom first (base.tar+app.tar.gz), merged
    as `cfsc compile base.tar app.tar.gz` merges them (+ splits only if no file has that name).

    Queries (--where, --exclude) look like: path ~ "/usr/lib/**" and type == reg and size > 1M
    (fields: path name type mode uid gid size mtime nlink rdev target payload digest content
    xattr["KEY"]; ~ is a glob, ** crosses directories).  When both sides are images whose
    bytes differ, the reasons follow (format version, inode formats, shared xattrs …), and
    that counts as a difference even where the trees agree, unless --ignore layout.

    Exit status: 0 identical, 1 different, 2 error.
    """
    # start-up: lark (the query) and the diff engine ~40-80 ms; `cfsc check` and --help need neither
    from cfsc.api.comparing import diff
    from cfsc.tools.manifest import layers

    paint = _color(color)
    result = diff(layers(a), layers(b), ignore=ignore, where=where, explain=explain, format=source_format,
                  options=options)
    out = sys.stdout.buffer
    if as_json:
        _write_json(result.to_dict(changes=not stat))
    else:
        report = result._report  # the renderers read the tool's report directly
        if stat:
            render_stat(report, out)
        else:
            render(report, out, paint)
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    if not result.identical:
        raise typer.Exit(1)


def render_check(report, out, color: bool) -> None:
    from cfsc.base.fsverity import algorithm_of

    def hexd(d: bytes | None) -> str:
        return f"{algorithm_of(d).name}:{d.hex()}" if d is not None else "-"

    out.write(f"{report.source}: {hexd(report.digest)}\n".encode())
    if report.expected is not None:
        verdict = "ok" if report.expected == report.digest else "DIFFERS"
        against = f" ({report.reference})" if report.reference else ""
        out.write(f"expected{against}: {hexd(report.expected)}  {verdict}\n".encode())
        if report.diff is not None:
            render(report.diff, out, color)
        elif report.expected != report.digest:
            out.write(b"(give --reference IMAGE|DUMP to see what differs)\n")
    if report.attempts:
        width = max(len(a.name) for a in report.attempts)
        for a in report.attempts:
            verdict = "same" if a.ok else ("ERROR" if a.error else "DIFFERS")
            out.write(f"  {a.name:<{width}}  {verdict:<7}  {hexd(a.digest)}  {a.detail}\n".encode())
            if a.error:
                out.write(f"      {a.error}\n".encode())
        for a in report.attempts:
            if a.diff is not None:
                out.write(f"\n{a.name} ({a.detail}) differs from the first compilation:\n".encode())
                render(a.diff, out, color)
        bad = sum(1 for a in report.attempts if not a.ok)
        if bad:
            out.write(f"not reproducible: {bad} of {len(report.attempts)} ways differ\n".encode())
        else:
            out.write(f"reproducible: {len(report.attempts) + 1} compilations, one digest\n".encode())


@command("check")
@source_options(old_flags=True)
def check_cmd(
    source: str = typer.Argument(..., help="The source to compile (any kind; layers: L1.tar+L2.tar, as for diff)."),
    expect_digest: str | None = typer.Option(None, "--expect-digest", help="The digest it must compile to: sha256:HEX (or HEX; sha512:HEX compares the SHA-512 one)."),
    reference: str | None = typer.Option(None, "--reference", help="An image (or any source, compiled alike) to diff against; "
                                         "without --expect-digest its digest is the expected one."),
    reproducible: bool = typer.Option(False, "--reproducible", help="Compile it several ways; all digests must agree."),
    ways: str | None = typer.Option(None, "--ways", help="With --reproducible: which ways, comma-separated "
                                    "(shuffled, reversed, threads, environment, dump, image; default all)."),
    as_json: bool = JSON,
    color: str = COLOR,
    source_format: str | None = FROM,
    *,
    options: Options,
) -> None:
    """Check a source's digest for CI: against an expected digest or reference, and/or for reproducibility.

    --reproducible compiles the source several ways — its input reordered as the format
    allows (a dumpfile's lines, parents first; a tar archive's members or a CRFS TOC's
    entries, keeping the order of those for one path, a path and its ancestors, and hard
    links after their targets), entries inserted in reverse, another --threads, child
    processes with other TZ, locale and umask, and round trips through a dump and through
    the image — and fails unless every digest is the same, showing the diff of each one
    that is not.

    SOURCE (and --reference) may be tar layers joined by +, bottom first, as for `cfsc diff`.
    The source options are `cfsc compile`'s, so a check reproduces any compilation; a
    reference that is not an image is compiled with them too.

    Exit status: 0 passed, 1 failed, 2 error.
    """
    # start-up: the checker ~90 ms (it pulls in every frontend); `cfsc diff` and --help need it not
    from cfsc.api.comparing import check
    from cfsc.tools.manifest import layers

    if expect_digest is None and reference is None and not reproducible:
        raise UsageError("nothing to check: give --expect-digest, --reference and/or --reproducible")
    paint = _color(color)
    chosen = [w.strip() for w in ways.split(",") if w.strip()] if ways else None
    result = check(layers(source), expect_digest=expect_digest,
                   reference=layers(reference) if reference is not None else None, reproducible=reproducible,
                   ways=chosen, format=source_format, options=options)
    if as_json:
        _write_json(result.to_dict())
    else:
        render_check(result._report, sys.stdout.buffer, paint)  # the renderer reads the tool's report
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    if not result.ok:
        raise typer.Exit(1)
