"""Comparing: `diff(a, b)` and `check(source, …)`, the reports `cfsc diff` and `cfsc check` print.

Both are the command line's own code paths (`cfsc.tools.diff`, `cfsc.tools.check`); the verbs
call these functions and print what they return, so `report.to_dict()` is, as data, the JSON
document `--json` prints (schemas: `cfsc schema diff-report`, `cfsc schema check-report`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cfsc.api.arguments import Source, options_of, side_of
from cfsc.base.options import Options

if TYPE_CHECKING:
    from cfsc.tools import check as _check
    from cfsc.tools import diff as _diff


class Change:
    """One entry added, removed or changed.

    `a`, `b`: the entry's attributes on each side (field → value; None on the side that lacks
    the entry); `attributes`: for a change, `(field, xattr key or None, a value, b value)` per
    difference (`field == "xattr"` for one xattr)."""

    __slots__ = ("_change", "_fields")

    def __init__(self, change: _diff.Change, fields: tuple[str, ...]) -> None:
        self._change = change
        self._fields = fields

    @property
    def path(self) -> bytes:
        return self._change.path

    @property
    def kind(self) -> str:
        """`added`, `removed` or `changed`."""
        return self._change.kind

    @property
    def a(self) -> dict[str, Any] | None:
        rec = self._change.a
        return None if rec is None else dict(zip(self._fields, rec, strict=True))

    @property
    def b(self) -> dict[str, Any] | None:
        rec = self._change.b
        return None if rec is None else dict(zip(self._fields, rec, strict=True))

    @property
    def attributes(self) -> list[tuple[str, bytes | None, Any, Any]]:
        return list(self._change.attributes)

    def __repr__(self) -> str:
        return f"<cfsc.Change {self.kind} {self.path!r}>"


class DiffReport:
    """What differs between two sources (`cfsc.diff`)."""

    __slots__ = ("_report",)

    def __init__(self, report: _diff.Report) -> None:
        self._report = report

    @property
    def identical(self) -> bool:
        """No entry differs (and, for two images, neither do their bytes unless `layout` is
        ignored): `cfsc diff`'s exit status 0."""
        return self._report.identical

    @property
    def changes(self) -> list[Change]:
        """Every difference, in depth-first path order."""
        fields = self._report.fields
        return [Change(c, fields) for c in self._report.changes]

    @property
    def summary(self) -> dict[str, Any]:
        """Counts: `added`, `removed`, `changed`, and per attribute."""
        return self._report.summary()

    @property
    def digests(self) -> tuple[bytes | None, bytes | None]:
        """The two sides' image digests, where a side is (or was compiled to) an image."""
        return self._report.a.digest, self._report.b.digest

    def to_dict(self, changes: bool = True) -> dict[str, Any]:
        """The report as JSON data, as `cfsc diff --json` prints it (`changes=False`: as
        `--json --stat` prints it, without the list)."""
        from cfsc.tools.diff import report_json

        return report_json(self._report, changes=changes)

    def __repr__(self) -> str:
        s = self.summary
        return f"<cfsc.DiffReport identical={self.identical} +{s['added']} -{s['removed']} ~{s['changed']}>"


def diff(a: Source, b: Source, *, ignore: Iterable[str] = (), where: str | None = None, explain: bool = False,
         format: str | None = None, options: Options | None = None, **option_fields: Any) -> DiffReport:  # noqa: A002
    """Compare two sources as the images they are or compile to (`cfsc diff A B`).

    `ignore`: attribute names to leave out of the comparison (`mtime`, `owner`, `xattr:KEY`,
    `layout`, …, as `--ignore` takes them); `where`: a query, only changes whose entry matches
    on either side count; `explain`: also say why image bytes differ when a side is not an
    image.  Keywords are `cfsc.Options` fields, applied to both sides."""
    from cfsc.base import query
    from cfsc.tools import diff as diffing
    from cfsc.tools.manifest import Ignore

    opts = options_of(options, option_fields)
    ignored = Ignore.parse([ignore] if isinstance(ignore, str) else ignore)
    matches = query.parse(where, "--where") if where is not None else None
    return DiffReport(diffing.diff(side_of(a), side_of(b), opts, format, ignored, matches, explain))


class CheckReport:
    """The verdict of `cfsc.check`: the digest found, the one expected, how each way of
    compiling came out."""

    __slots__ = ("_report",)

    def __init__(self, report: _check.CheckReport) -> None:
        self._report = report

    @property
    def ok(self) -> bool:
        """Every check passed: `cfsc check`'s exit status 0."""
        return self._report.ok

    @property
    def digest(self) -> bytes:
        """The fs-verity digest of the image the source compiles to."""
        return self._report.digest

    @property
    def expected(self) -> bytes | None:
        return self._report.expected

    @property
    def diff(self) -> DiffReport | None:
        """The compiled source against the reference, when they differ."""
        return DiffReport(self._report.diff) if self._report.diff is not None else None

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON data, as `cfsc check --json` prints it."""
        from cfsc.tools.check import report_json

        return report_json(self._report)

    def __repr__(self) -> str:
        return f"<cfsc.CheckReport ok={self.ok} digest={self.digest.hex()}>"


def check(source: Source, *, expect_digest: str | bytes | None = None, reference: Source | None = None,
          reproducible: bool = False, ways: Iterable[str] | None = None, format: str | None = None,  # noqa: A002
          options: Options | None = None, **option_fields: Any) -> CheckReport:
    """Check what a source compiles to, for CI (`cfsc check`).

    `expect_digest`: the fs-verity digest it must have (`sha256:HEX`, `HEX`, or the raw
    bytes); `reference`: an image (or any source, compiled with the same options) it must
    equal, the diff coming with the report when it does not; `reproducible`: compile it
    several ways (`ways`: some of shuffled, reversed, threads, environment, dump, image;
    default all) and want one digest.  At least one of the three is needed."""
    from cfsc.base.errors import UsageError
    from cfsc.tools import check as checking

    if expect_digest is None and reference is None and not reproducible:
        raise UsageError("nothing to check: give expect_digest, reference and/or reproducible=True")
    opts = options_of(options, option_fields)
    digest = None
    if expect_digest is not None:  # raw bytes go through the same check as text (their length)
        digest = checking.parse_digest(expect_digest if isinstance(expect_digest, str) else bytes(expect_digest).hex())
    chosen = checking.known_ways(ways) if ways is not None else list(checking.VARIANTS)
    side = side_of(source)
    ref = side_of(reference) if reference is not None else None
    if reproducible:
        checking.readable_again(side)
    baseline = checking.compile_source(side, opts, format)
    report = None
    if digest is not None or ref is not None:
        report = checking.expect(side, opts, format, digest, ref, baseline=baseline)
    if reproducible:  # (without an expectation, it makes the report: the digest in `--hash`)
        report = checking.reproducible(side, opts, format, chosen, report, baseline)
    return CheckReport(report)


__all__ = ["Change", "CheckReport", "DiffReport", "check", "diff"]
