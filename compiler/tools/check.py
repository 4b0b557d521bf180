"""CI checks: a source compiles to the digest it should, and to one digest however it is compiled.

`expect` compiles a source and compares its fs-verity digest with an expected one and/or a
reference (an image, or any source compiled with the same options); on a mismatch the report
carries the diff of the two images, with the reasons their bytes differ (`cfsc.tools.explain`).

`reproducible` compiles the source several ways and wants one digest from all of them; each
way that differs comes with the diff against the first compilation:

* `shuffled`    — the input in another order its format allows: a dumpfile's lines (parents
                  still first), a tar archive's members or a CRFS TOC's entries (`reorder`:
                  whatever touches one path, or a path and its ancestor, keeps its relative
                  order; a hard link touches its target too, a whiteout what it hides);
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
import heapq
import io
import json
import mmap
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cfsc.backends.dumptext import BadEscape, unescape
from cfsc.base.errors import CfscError, InputError, UsageError
from cfsc.base.fsverity import digest_bytes
from cfsc.base.options import Options
from cfsc.base.streams import read_all, read_once, source_name
from cfsc.base.tree import Tree
from cfsc.tools.diff import Report, diff_images
from cfsc.tools.manifest import detect, inputs, side_name

VARIANTS = ("shuffled", "reversed", "threads", "environment", "dump", "image")
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
    from cfsc.tools.diff import report_json as diff_json

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


def compile_tree(tree: Tree, options: Options) -> bytes:
    from cfsc.backends.erofs.writer import write_image
    from cfsc.build import batch_allocation
    from cfsc.build.pipeline import run_passes

    out = io.BytesIO()
    with batch_allocation():
        write_image(run_passes(tree, options), out)
    return out.getvalue()


def compile_source(source, options: Options, fmt: str | None = None,
                   transform: Callable[[Tree], Tree] | None = None) -> bytes:
    from cfsc import frontends
    from cfsc.build import batch_allocation

    with batch_allocation():
        tree = frontends.load(inputs(source), options, fmt)
    if transform is not None:
        tree = transform(tree)
    return compile_tree(tree, options)


def parse_digest(text: str) -> bytes:
    """`sha256:HEX` or `HEX` (64 hex digits) → 32 bytes."""
    hexdigits = text[7:] if text.lower().startswith("sha256:") else text
    if not re.fullmatch(r"[0-9a-fA-F]{64}", hexdigits):
        raise UsageError(f"expected sha256:<64 hex digits>, got {text!r}", "--expect-digest")
    return bytes.fromhex(hexdigits)


def expect(source, options: Options, fmt: str | None = None, digest: bytes | None = None,
           reference=None, reference_format: str | None = None,
           baseline: bytes | None = None) -> CheckReport:
    """Compile `source` and compare with an expected digest and/or a reference (either may be
    a tuple of layers)."""
    from cfsc.tools.images import open_image

    if digest is None and reference is None:
        raise UsageError("nothing to compare with: give --expect-digest and/or --reference")
    image = baseline if baseline is not None else compile_source(source, options, fmt)
    report = CheckReport(side_name(source), digest_bytes(image), expected=digest)
    if reference is not None:
        report.reference = side_name(reference)
        if isinstance(reference, tuple):
            ref_bytes = compile_source(reference, options, reference_format)
        else:
            ref_bytes = bytes(open_image(reference, dataclasses.replace(options), reference_format).data)
        if report.expected is None:
            report.expected = digest_bytes(ref_bytes)
        if report.expected != report.digest:
            from cfsc.backends.erofs.reader import Image

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
    if report is None:
        report = CheckReport(side_name(source), digest_bytes(baseline))
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
            attempt.digest = digest_bytes(image)
            if image != baseline:
                from cfsc.backends.erofs.reader import Image

                attempt.diff = diff_images(Image(baseline, "first compilation"), Image(image, f"{name} ({detail})"))
            report.attempts.append(attempt)
    return report


def _ways(source, options: Options, fmt: str, baseline: bytes) -> dict[str, Callable]:
    """name → a function giving `(detail, make-image)` pairs (none where a way does not apply)."""
    versions = Options(min_version=options.min_version, max_version=options.max_version)

    def shuffled():
        if fmt == "tar":
            return [("members reordered (per path, ancestors and hard-link targets in order)",
                     lambda: _compile_reordered(source, options, fmt, shuffle_tar))]
        if fmt == "crfs":
            return [("entries reordered (per path, ancestors and hard-link targets in order)",
                     lambda: _compile_reordered(source, options, fmt, shuffle_toc))]
        if fmt != "dump" or isinstance(source, tuple):
            return []
        data = read_all(source)
        if not data.startswith(b"/"):
            return []

        def make() -> bytes:
            from cfsc.frontends import dumpfile

            with _batch():
                tree = dumpfile.loads(shuffle_dumpfile(data, seed=1), options, side_name(source))
            return compile_tree(tree, options)

        return [("lines reordered, parents first", make)]

    def reversed_():
        return [("entries inserted in reverse order",
                 lambda: compile_source(source, options, fmt, lambda t: t.copy(reverse=True)))]

    def threads():
        n = 1 if options.threads > 1 else 4
        return [(f"--threads {n} (first: {options.threads})",
                 lambda: compile_source(source, dataclasses.replace(options, threads=n), fmt))]

    def environment():
        return [(f"TZ={env['TZ']} LC_ALL={env['LC_ALL']} umask {mask:03o}",
                 lambda env=env, mask=mask: compile_in_child(source, options, fmt, env, mask))
                for env, mask in ENVIRONMENTS]

    def dump():
        def make() -> bytes:
            from cfsc.backends.dumpfile import dump_image
            from cfsc.backends.erofs.reader import Image
            from cfsc.frontends import dumpfile

            text = io.BytesIO()
            dump_image(Image(baseline), text)
            with _batch():
                tree = dumpfile.loads(text.getvalue(), versions, "dump of the image")
            return compile_tree(tree, versions)

        return [("image → dumpfile → image", make)]

    def image():
        def make() -> bytes:
            from cfsc.backends.erofs.reader import Image
            from cfsc.frontends.image import read_tree

            with _batch():
                tree = read_tree(Image(baseline, "the image"))
            return compile_tree(tree, versions)

        return [("image → tree → image", make)]

    return {"shuffled": shuffled, "reversed": reversed_, "threads": threads, "environment": environment,
            "dump": dump, "image": image}


def _batch():
    from cfsc.build import batch_allocation

    return batch_allocation()


def _depth(line: bytes) -> int:
    path = line.split(b" ", 1)[0]
    if b"\\" in path:  # an escaped '/' counts
        try:
            path = unescape(path)
        except BadEscape:
            pass  # (the frontend reports it, wherever the line goes)
    return sum(1 for part in path.split(b"/") if part)


def shuffle_dumpfile(data: bytes, seed: int = 0) -> bytes:
    """The dumpfile's records in a random order that still lists every parent before its children."""
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    rng = random.Random(seed)
    keyed = sorted((_depth(line), rng.random(), line) for line in lines)
    return b"".join(line + b"\n" for _d, _r, line in keyed)


# -- tar archives and CRFS TOCs in another valid order ---------------------------------------

def reorder(units: list[list[tuple[bytes, ...]]], seed: int) -> list[int]:
    """A random order of `units` (each: the paths it touches, as tuples of components) that
    keeps in their order any two touching one path, or a path and one of its ancestors.

    That is all tar and CRFS semantics leave to the order: a later member or entry for a path
    replaces or updates an earlier one; one for a path decides what a path below it can be
    (a file there refuses children, a replaced directory takes its subtree along); a hard
    link names what its target is at that point.  A random topological sort over edges from
    each unit to the later units it conflicts with, found with per-path sets of the units at
    or below the path that no later unit at the path follows yet (so edges stay few).
    """
    n = len(units)
    after: list[list[int]] = [[] for _ in range(n)]
    waiting = [0] * n
    last_at: dict[tuple, int] = {}
    below: dict[tuple, set[int]] = {}
    for j, paths in enumerate(units):
        before: set[int] = set()
        for path in paths:
            before.update(below.get(path, ()))
            for k in range(len(path)):
                i = last_at.get(path[:k])
                if i is not None:
                    before.add(i)
        before.discard(j)
        for i in before:
            after[i].append(j)
        waiting[j] = len(before)
        for path in paths:
            last_at[path] = j
            below[path] = {j}  # later ones here depend on j, and j on everything before it
            for k in range(len(path)):
                below.setdefault(path[:k], set()).add(j)
    rng = random.Random(seed)
    ready = [(rng.random(), j) for j in range(n) if not waiting[j]]
    heapq.heapify(ready)
    order = []
    while ready:
        _key, i = heapq.heappop(ready)
        order.append(i)
        for j in after[i]:
            waiting[j] -= 1
            if not waiting[j]:
                heapq.heappush(ready, (rng.random(), j))
    assert len(order) == n
    return order


def _parts(raw: bytes) -> tuple[bytes, ...]:
    """A member or entry name as the tar and CRFS frontends clean it (`..`: the root, which
    orders it against everything; the frontend refuses it anyway)."""
    parts = tuple(p for p in raw.split(b"/") if p and p != b".")
    return () if b".." in parts else parts


def _tar_paths(m) -> list[tuple[bytes, ...]]:
    from cfsc.frontends.tar.layers import AUFS_META, OPAQUE, WHITEOUT
    from cfsc.frontends.tar.stream import HARDLINK

    path = _parts(m.path)
    paths = [path]
    if m.type == HARDLINK:
        paths.append(_parts(m.linkpath))
    name = path[-1] if path else b""
    if name == OPAQUE:
        paths.append(path[:-1])
    elif name.startswith(WHITEOUT) and not name.startswith(AUFS_META):
        paths.append(path[:-1] + (name[len(WHITEOUT):],))
    return paths


def shuffle_tar(source, out, seed: int) -> None:
    """Write the archive's members, uncompressed, in another order (`reorder`) to `out`.

    Each member moves with the extension headers before it, verbatim.  A member preceded by
    a PAX global header or a volume label stays where it is, and nothing moves across it (a
    global header sets defaults for every later member).  A member ends after its data,
    padded to a block."""
    from cfsc.base.streams import decompressing, open_binary
    from cfsc.frontends.tar.stream import BLOCK, HEADER, PAX_GLOBAL, SIZE, TYPEFLAG, VOLUME_LABEL, TarReader, number

    with tempfile.TemporaryFile(prefix="cfsc-check-") as plain:
        with open_binary(source) as raw:
            shutil.copyfileobj(decompressing(raw), plain)
        if not plain.tell():
            return
        plain.seek(0)
        with mmap.mmap(plain.fileno(), 0, access=mmap.ACCESS_READ) as data:
            runs: list[list] = [[]]  # members between fixed spans: [(start, end, paths)]
            fixed: list[tuple[int, int]] = []  # the span before each run but the first
            end = 0
            with TarReader(plain) as reader:
                for m in reader.members():
                    start, pos = end, end
                    barrier = False
                    while pos < m.offset:  # the extension headers before the member
                        h = HEADER.unpack_from(data, pos)
                        barrier = barrier or h[TYPEFLAG] in (PAX_GLOBAL, VOLUME_LABEL)
                        size = number(h[SIZE])
                        pos += BLOCK + size + -size % BLOCK
                    end = reader.offset + m.size + -m.size % BLOCK
                    if barrier:
                        fixed.append((start, end))
                        runs.append([])
                    else:
                        runs[-1].append((start, end, _tar_paths(m)))
            for i, run in enumerate(runs):
                if i:
                    out.write(data[fixed[i - 1][0]:fixed[i - 1][1]])
                for k in reorder([paths for _s, _e, paths in run], seed + i):
                    out.write(data[run[k][0]:run[k][1]])
            out.write(data[end:])  # the end-of-archive blocks


def _toc_name(entry, key: str) -> bytes | None:
    """A CRFS name or link target's bytes (from its base64 twin, `cfsc.base.jsonbytes`), or None."""
    import binascii

    from cfsc.backends.crfs_format import twin

    if type(entry) is not dict:
        return None
    encoded = entry.get(twin(key))
    if type(encoded) is str:
        try:
            return binascii.a2b_base64(encoded + "=" * (-len(encoded) % 4))
        except binascii.Error:
            return b".."  # refused by the frontend: order it against everything
    value = entry.get(key)
    return value.encode("utf-8", "surrogateescape") if type(value) is str else None


def shuffle_toc(source, out, seed: int) -> None:
    """Write the TOC with its entries in another order (`reorder`) to `out`.

    A chunk entry without a name extends the last regular file before it, even one in an
    earlier TOC: it stays glued to that file's entry (with whatever lies between them), and
    the TOC's last regular file entry stays in place, with nothing moving across it."""
    import orjson

    doc = orjson.loads(read_all(source))
    entries = doc.get("entries") if type(doc) is dict else None
    if type(entries) is not list:
        out.write(orjson.dumps(doc))
        return
    units: list[list[int]] = []  # entry indices
    paths: list[list[tuple[bytes, ...]]] = []
    last_file = None  # the unit of the last regular file entry
    for i, e in enumerate(entries):
        kind = e.get("type") if type(e) is dict else None
        name = _toc_name(e, "name")
        if name is None and kind == "chunk" and last_file is not None:
            units[last_file:] = [[k for unit in units[last_file:] for k in unit] + [i]]
            paths[last_file:] = [[p for group in paths[last_file:] for p in group]]
            continue
        touched = [_parts(name) if name is not None else ()]
        if kind == "hardlink":
            target = _toc_name(e, "linkName")
            touched.append(_parts(target) if target is not None else ())
        if kind == "reg":
            last_file = len(units)
        units.append([i])
        paths.append(touched)
    if last_file is not None:
        paths[last_file].append(())  # the root: ordered against everything
    doc["entries"] = [entries[k] for u in reorder(paths, seed) for k in units[u]]
    out.write(orjson.dumps(doc))


def _compile_reordered(source, options: Options, fmt: str, shuffle: Callable) -> bytes:
    """Compile the source with each of its inputs (layers, TOCs) rewritten by `shuffle`."""
    from cfsc import frontends

    with tempfile.TemporaryDirectory(prefix="cfsc-check-") as tmp:
        rewritten = []
        for i, one in enumerate(inputs(source)):
            path = os.path.join(tmp, f"{i}")
            with open(path, "wb") as out:
                shuffle(one, out, seed=1 + i)
            rewritten.append(path)
        with _batch():
            tree = frontends.load(rewritten, options, fmt)
        return compile_tree(tree, options)


# -- a compilation in a fresh process ---------------------------------------------------------

def compile_in_child(source, options: Options, fmt: str | None, env: dict[str, str], umask: int) -> bytes:
    """Compile in `python -m cfsc.tools.check` with another environment; the image comes back as bytes."""
    # Every option the first compilation had, the store too: it names OSTree payloads (and an
    # object already in the store keeps it: `cfsc.store.objects` never replaces one).
    fields = dataclasses.asdict(dataclasses.replace(options, progress=False))
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
    from cfsc.build import compile_image

    spec = json.loads(sys.stdin.buffer.read())
    fields = spec["options"]
    fields["exclude"] = tuple(fields.get("exclude") or ())
    try:
        compile_image(spec["sources"], spec["output"], Options(**fields), spec["format"])
    except CfscError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(_child())
