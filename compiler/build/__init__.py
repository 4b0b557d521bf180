"""The compiler composed: sources → tree → image, or any backend's output.

Every verb, tool, drop-in, test and bench that turns a tree into bytes comes here, so they
all run the same passes in the same order and their errors name the same input position
(`pipeline.located`: a dumpfile's `file:line`, an OSTree dirtree object).

    load(sources, options, fmt)              sources → tree (any frontend)
    compile_tree(tree, options, out=None)    tree → image bytes (or written to `out`)
    compile_in_memory(tree, options)         tree → the image, opened for reading
    write(tree_or_image, fmt, out, options)  → any backend, given what it takes
    compile_image(sources, output, …)        load + compile_tree into a file, store objects named
"""

from __future__ import annotations

import contextlib
import gc
import io
from collections.abc import Iterator, Sequence

from cfsc import backends, frontends
from cfsc.backends.erofs.overlay import is_external
from cfsc.base import record
from cfsc.base.fsverity import algorithm_named
from cfsc.base.options import Options
from cfsc.base.output import DigestingWriter, atomic_output
from cfsc.base.tree import Tree
from cfsc.build.pipeline import located, run_passes
from cfsc.passes.resolve_hardlinks import resolve_hardlinks

TYPE_CHECKING = False  # typing's, without importing typing (start-up); type checkers read it as True
if TYPE_CHECKING:
    from typing import BinaryIO

    from cfsc.backends.erofs.reader import Image


@contextlib.contextmanager
def batch_allocation() -> Iterator[None]:
    """Pause the cyclic garbage collector while building a large tree.

    The tree has no reference cycles to collect, but a million new objects make CPython run
    full collections over all of them again and again (~15% of compile time).

    At the end what was made meanwhile goes to the oldest generation: it was all still
    young, so the first allocation after `gc.enable()` would otherwise start a young
    collection that walks the whole tree once (64k entries: 15-50 ms; 250k: 0.17 s).  A
    freeze and thaw moves it there at once; skipped when something else froze objects (the
    FUSE server does), which the thaw would let go of.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            if not gc.get_freeze_count():
                gc.freeze()
                gc.unfreeze()
            gc.enable()


def load(sources: Sequence, options: Options | None = None, fmt: str | None = None) -> Tree:
    """Load one or more sources (several only for formats that combine) into a tree."""
    with batch_allocation():
        return frontends.load(list(sources), options or Options(), fmt)


def compile_tree(tree: Tree, options: Options | None = None, out: BinaryIO | None = None,
                 keep: list | None = None) -> bytes | None:
    """The image of a tree: every pass, then the image writer, into `out` (a binary stream),
    or returned as bytes without one.  `keep`: as `compile_image`'s, for the writer's plan.

    With `options.held` (set by `compile_image`), the store objects the image refers to get
    their names once it is written, and only those.
    """
    from cfsc.backends.erofs.writer import write_image  # start-up: verbs that only read images skip it (~3 ms)

    options = options or Options()
    sink = out if out is not None else io.BytesIO()
    with batch_allocation():
        tree = run_passes(tree, options)
        with located(tree):
            write_image(tree, sink, keep=keep)
    if options.held is not None:
        options.held.commit(_referenced(tree))  # type: ignore[attr-defined]
    return sink.getvalue() if out is None else None  # type: ignore[union-attr]


def compile_in_memory(tree: Tree, options: Options | None = None) -> Image:
    """Compile a tree and open the result: the image `cfsc compile` would write."""
    from cfsc.backends.erofs.reader import Image  # start-up: `cfsc compile` never reads an image (~2.5 ms)

    return Image(compile_tree(tree, options), tree.source or "<compiled>")  # type: ignore[arg-type]


def write(what: Tree | Image, fmt: str, out: BinaryIO, options: Options | None = None,
          names: frozenset[bytes] | None = None) -> None:
    """A tree, or an image, in a backend's format, composed as the backend needs
    (`Backend.takes`): a tree is compiled for a backend that describes images, an image read
    back as a tree for one that takes a tree.  `names`: only those children of an image's root."""
    # start-up: `cfsc compile` never reads an image (the reader and the image frontend: ~3 ms)
    from cfsc.backends.erofs.reader import Image
    from cfsc.frontends.image import read_tree

    backend = backends.get(fmt)
    options = options or Options()
    if backend.takes == backends.IMAGE:
        image = what if isinstance(what, Image) else compile_in_memory(what, options)
        backend.writer()(image, out, names)
        return
    if isinstance(what, Image):
        with batch_allocation():
            what = read_tree(what, names)
    if backend.takes == backends.COMPILED:
        compile_tree(what, options, out)
    else:
        backend.writer()(run_passes(what, options, (resolve_hardlinks,)), out, options)


def compile_image(
    sources: Sequence,
    output: str | None,
    options: Options | None = None,
    fmt: str | None = None,
    want_digest: bool = False,
    keep: list | None = None,
) -> bytes | None:
    """Compile sources into a composefs image at `output` (`-` = stdout, None = nowhere).

    Returns the image's fs-verity digest when `want_digest`.  The image appears atomically.
    `keep`: a list the tree and the writer's plan are left in (replacing what it held), for
    a caller whose process ends next without the interpreter's teardown (`cli._leave`): the
    kernel then frees them with the address space at once, not object by object on return
    (64k entries: 15-20 ms; a million: ~0.3 s).
    """
    # Store objects are named only once the image is written, just before it is renamed into
    # place, and only those it refers to: a run that fails before then leaves neither.
    options = options or Options()
    held = None
    if options.digest_store:
        from cfsc.store.objects import HeldObjects  # start-up: only --digest-store needs the store (~3.5 ms)

        held = HeldObjects()
        options = record.replace(options, held=held)
    if keep is not None:
        keep.clear()  # (before the load: a caller compiling again holds one tree at a time)
    try:
        with batch_allocation():
            tree = load(sources, options, fmt)
            with atomic_output(output) if output is not None else contextlib.nullcontext() as out:
                sink = (DigestingWriter(out, algorithm_named(options.hash))
                        if want_digest or out is None else out)
                compile_tree(tree, options, sink, keep)  # type: ignore[arg-type]
                if keep is not None:
                    keep.append(tree)
            return sink.digest() if want_digest else None  # type: ignore[union-attr]
    finally:
        # After a failure: drop the objects.  After success too, once the image is in place:
        # let go of the store's lease (`cfsc.store.locks`), so `cfsc gc` may run again.
        if held is not None:
            held.close()


def _referenced(tree: Tree) -> set[bytes]:
    """The digests of the store objects a compiled tree's image refers to."""
    return {node.digest for node in tree.inodes or () if node.digest is not None and is_external(node)}
