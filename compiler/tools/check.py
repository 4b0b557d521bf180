"""CI checks: a source compiles to the digest it should, and to one digest however it is compiled.

`expect` compiles a source and compares its fs-verity digest with an expected one and/or a
reference (an image, or any source compiled with the same options); on a mismatch the report
carries the diff of the two images, with the reasons their bytes differ (`cfsc.tools.explain`).

`reproducible` compiles the source several ways and wants one digest from all of them; each
way that differs comes with the diff against the first compilation:

* `shuffled`    — the input in another order its format allows (`Frontend.reorder`,
                  `cfsc.frontends.reorder`): a dumpfile's lines (parents still first), a tar
                  archive's members or a CRFS TOC's entries (whatever touches one path, or a
                  path and its ancestor, keeps its relative order);
* `reversed`    — the loaded tree rebuilt with every directory's entries inserted in reverse
                  (`Tree.copy(reverse=True)`): nothing may depend on a listing order;
* `threads`     — one reading thread instead of several (or several instead of one);
* `environment` — compiled by fresh `python -m cfsc.tools.check` processes with other TZ, locale
                  and umask (whatever a process inherits must not leak into the image);
* `dump`        — the image dumped as a dumpfile and compiled again;
* `image`       — the image read back as a source and compiled again.

The first four load the source again (so a frontend that is not deterministic shows up);
the last two start from the image (so a lossy or inexact round trip shows up).

A source may be a stack of tar layers (a tuple, `cfsc.tools.manifest.layers`): each layer is
shuffled on its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from cfsc import build, frontends
from cfsc.backends.dumpfile import batched, dump_lines
from cfsc.backends.erofs.reader import Image
from cfsc.base import record
from cfsc.base.errors import CfscError, InputError, UsageError
from cfsc.base.fsverity import algorithm_named, algorithm_of, digest_bytes
from cfsc.base.options import Options
from cfsc.base.streams import read_once, source_name
from cfsc.base.tree import Tree
from cfsc.frontends import dumpfile
from cfsc.frontends.image import read_tree
from cfsc.tools.diff import Report, diff_images
from cfsc.tools.diff import report_json as diff_json
from cfsc.tools.images import open_image
from cfsc.tools.manifest import detect, inputs, side_name

VARIANTS = ("shuffled", "reversed", "threads", "environment", "dump", "image")
# The `dump` way reads at most this many times the image (+ the floor) of dump text: real images
# dump to 1-3 times their size, a 100k-deep chain to 1000 times (15k levels, 225 MB, still pass).
DUMP_RATIO = 32
DUMP_FLOOR = 256 << 20
ENVIRONMENTS = (
    ({"TZ": "Pacific/Kiritimati", "LC_ALL": "C", "LANG": "C"}, 0o077),
    ({"TZ": "America/St_Johns", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}, 0o000),
)


@dataclass
class Attempt:
    """One way of compiling: its digest, or the error it hit, and the diff if it differs."""

    name: str
    detail: str
    digest: bytes | None = None
    error: str | None = None
    diff: Report | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.diff is None


@dataclass
class CheckReport:
    source: str
    digest: bytes
    expected: bytes | None = None
    reference: str | None = None
    diff: Report | None = None  # the compiled source against the reference, if they differ
    attempts: list[Attempt] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        if self.expected is not None and self.expected != self.digest:
            return False
        return all(a.ok for a in self.attempts)


def report_json(report: CheckReport) -> dict:
    """The report as JSON data (schema: `cfsc schema check-report`)."""
    obj: dict = {"source": report.source, "ok": report.ok, "digest": report.digest.hex(),
                 "expected": report.expected.hex() if report.expected is not None else None,
                 "reference": report.reference,
                 "diff": diff_json(report.diff) if report.diff is not None else None}
    ways = []
    for a in report.attempts:
        way: dict = {"way": a.name, "detail": a.detail, "ok": a.ok,
                     "digest": a.digest.hex() if a.digest is not None else None}
        if a.error is not None:
            way["error"] = a.error
        if a.diff is not None:
            way["diff"] = diff_json(a.diff)
        ways.append(way)
    obj["reproducible"] = ways
    return obj


def compile_source(source, options: Options, fmt: str | None = None,
                   transform: Callable[[Tree], Tree] | None = None) -> bytes:
    """The image a side (a source, or a tuple of layers) compiles to; `transform` changes the
    loaded tree first."""
    tree = build.load(inputs(source), options, fmt)
    if transform is not None:
        tree = transform(tree)
    return build.compile_tree(tree, options)  # type: ignore[return-value]


def parse_digest(text: str) -> bytes:
    """`sha256:HEX` or `HEX` (64 hex digits) → 32 bytes; `sha512:HEX` or 128 hex digits → 64."""
    prefix, _, hexdigits = text.rpartition(":")
    if not (re.fullmatch(r"[0-9a-fA-F]{64}|[0-9a-fA-F]{128}", hexdigits)
            and prefix.lower() in ("", algorithm_of(bytes(len(hexdigits) // 2)).name)):  # type: ignore[union-attr]
        raise UsageError(f"expected sha256:<64 hex digits> (or sha512:<128>), got {text!r}", "--expect-digest")
    return bytes.fromhex(hexdigits)


def expect(source, options: Options, fmt: str | None = None, digest: bytes | None = None,
           reference=None, reference_format: str | None = None,
           baseline: bytes | None = None) -> CheckReport:
    """Compile `source` and compare with an expected digest and/or a reference (either may be
    a tuple of layers)."""
    if digest is None and reference is None:
        raise UsageError("nothing to compare with: give --expect-digest and/or --reference")
    image = baseline if baseline is not None else compile_source(source, options, fmt)
    # The digest given says the algorithm; else --hash does.
    algorithm = algorithm_of(digest) if digest is not None else algorithm_named(options.hash)
    report = CheckReport(side_name(source), digest_bytes(image, algorithm), expected=digest)
    if reference is not None:
        report.reference = side_name(reference)
        if isinstance(reference, tuple):
            ref_bytes = compile_source(reference, options, reference_format)
        else:
            ref_bytes = bytes(open_image(reference, record.replace(options), reference_format).data)
        if report.expected is None:
            report.expected = digest_bytes(ref_bytes, algorithm)
        if report.expected != report.digest:
            report.diff = diff_images(Image(image, report.source), Image(ref_bytes, report.reference))
    return report


def known_ways(names: Iterable[str]) -> list[str]:
    """The ways named (`--ways`), each checked."""
    names = list(names)
    for name in names:
        if name not in VARIANTS:
            raise UsageError(f"unknown way {name!r}: expected some of {', '.join(VARIANTS)}", "--ways")
    return names


def readable_again(source) -> None:
    """Refuse a source that can be read only once (stdin, a pipe): --reproducible reads it
    several times, and a second read of a pipe finds nothing."""
    parts = source if isinstance(source, tuple) else (source,)
    once = next((p for p in parts if read_once(p)), None)
    if once is not None:
        raise UsageError("can be read only once (standard input, a pipe): --reproducible reads its source several"
                         " times; give a file, directory or ref", source_name(once))


def reproducible(source, options: Options, fmt: str | None = None, variants: Iterable[str] = VARIANTS,
                 report: CheckReport | None = None, baseline: bytes | None = None) -> CheckReport:
    """Compile `source` every way in `variants` and compare each digest with the first one."""
    readable_again(source)
    variants = known_ways(variants)
    if fmt is None:
        fmt = detect(source)
    if baseline is None:
        baseline = compile_source(source, options, fmt)
    algorithm = algorithm_of(report.digest) if report is not None else algorithm_named(options.hash)
    if report is None:
        report = CheckReport(side_name(source), digest_bytes(baseline, algorithm))
    ways = _ways(source, options, fmt, baseline)
    for name in variants:
        for detail, make in ways[name]():
            attempt = Attempt(name, detail)
            try:
                image = make()
            except CfscError as e:
                attempt.error = str(e)
                report.attempts.append(attempt)
                continue
            attempt.digest = digest_bytes(image, algorithm)
            if image != baseline:
                attempt.diff = diff_images(Image(baseline, "first compilation"), Image(image, f"{name} ({detail})"))
            report.attempts.append(attempt)
    return report


def _ways(source, options: Options, fmt: str, baseline: bytes) -> dict[str, Callable]:
    """name → a function giving `(detail, make-image)` pairs (none where a way does not apply)."""
    versions = Options(min_version=options.min_version, max_version=options.max_version)

    def shuffled():
        frontend = frontends.get(fmt)
        if frontend.reorder is None:
            return []
        return [(frontend.reorder_detail, lambda: _compile_reordered(source, options, frontend))]

    def reversed_():
        return [("entries inserted in reverse order",
                 lambda: compile_source(source, options, fmt, lambda t: t.copy(reverse=True)))]

    def threads():
        n = 1 if options.threads > 1 else 4
        return [(f"--threads {n} (first: {options.threads})",
                 lambda: compile_source(source, record.replace(options, threads=n), fmt))]

    def environment():
        return [(f"TZ={env['TZ']} LC_ALL={env['LC_ALL']} umask {mask:03o}",
                 lambda env=env, mask=mask: compile_in_child(source, options, fmt, env, mask))
                for env, mask in ENVIRONMENTS]

    def dump():
        def make() -> bytes:
            # Streamed into the parser, and only so far: a deep tree's dump is its depth²
            # bytes (10 GB at 100k levels) and the parser keeps each directory's path.
            with build.batch_allocation():
                pieces = _bounded(batched(dump_lines(Image(baseline))), DUMP_RATIO * len(baseline) + DUMP_FLOOR)
                tree = dumpfile.loads(pieces, versions, "dump of the image")
            return build.compile_tree(tree, versions)  # type: ignore[return-value]

        return [("image → dumpfile → image", make)]

    def image():
        def make() -> bytes:
            with build.batch_allocation():
                tree = read_tree(Image(baseline, "the image"))
            return build.compile_tree(tree, versions)  # type: ignore[return-value]

        return [("image → tree → image", make)]

    return {"shuffled": shuffled, "reversed": reversed_, "threads": threads, "environment": environment,
            "dump": dump, "image": image}


def _bounded(pieces: Iterable[bytes], budget: int) -> Iterator[bytes]:
    """The pieces of a dump, until they add up to more than `budget` bytes."""
    total = 0
    for piece in pieces:
        total += len(piece)
        if total > budget:
            raise InputError(f"its dump passes {budget} bytes, {DUMP_RATIO} times the image and more (paths of a "
                             "deep tree add up to its depth squared): not compiled back", "dump of the image")
        yield piece


def _compile_reordered(source, options: Options, frontend: frontends.Frontend) -> bytes:
    """Compile the source with each of its inputs (layers, TOCs) in another order (`Frontend.reorder`)."""
    assert frontend.reorder is not None
    shuffle = frontends.function(frontend.reorder)
    with tempfile.TemporaryDirectory(prefix="cfsc-check-") as tmp:
        rewritten = []
        for i, one in enumerate(inputs(source)):
            path = os.path.join(tmp, f"{i}")
            with open(path, "wb") as out:
                shuffle(one, out, seed=1 + i)
            rewritten.append(path)
        return compile_source(tuple(rewritten), options, frontend.name)


# -- a compilation in a fresh process ---------------------------------------------------------

def compile_in_child(source, options: Options, fmt: str | None, env: dict[str, str], umask: int) -> bytes:
    """Compile in `python -m cfsc.tools.check` with another environment; the image comes back as bytes."""
    # Every option the first compilation had, the store too: it names OSTree payloads (and an
    # object already in the store keeps it: `cfsc.store.objects` never replaces one).
    fields = record.asdict(record.replace(options, progress=False))
    spec = {"sources": [os.fsdecode(s) for s in inputs(source)], "format": fmt, "options": fields}
    with tempfile.TemporaryDirectory(prefix="cfsc-check-") as tmp:
        spec["output"] = os.path.join(tmp, "image.cfs")
        # The shell sets the umask (preexec_fn is unsafe once a frontend has started threads).
        command = ["/bin/sh", "-c", f'umask {umask:03o} && exec "$0" -m cfsc.tools.check', sys.executable]
        proc = subprocess.run(command, input=json.dumps(spec).encode(), env={**os.environ, **env},
                              capture_output=True)
        if proc.returncode != 0:
            message = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            raise InputError(f"the compilation in a child process failed: {message[-1] if message else proc.returncode}",
                             side_name(source))
        with open(spec["output"], "rb") as f:
            return f.read()


def _child() -> int:
    spec = json.loads(sys.stdin.buffer.read())
    fields = spec["options"]
    fields["exclude"] = tuple(fields.get("exclude") or ())
    try:
        build.compile_image(spec["sources"], spec["output"], Options(**fields), spec["format"])
    except CfscError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(_child())
