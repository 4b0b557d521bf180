"""High-level entry points shared by the CLI and library users."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Iterator, Sequence

from cfsc.base.errors import TreeError
from cfsc.base.options import Options
from cfsc.base.output import DigestingWriter, atomic_output
from cfsc.base.tree import Tree


@contextlib.contextmanager
def batch_allocation() -> Iterator[None]:
    """Pause the cyclic garbage collector while building a large tree.

    The tree has no reference cycles to collect, but a million new objects make CPython run
    full collections over all of them again and again (~15% of compile time).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load(sources: Sequence, options: Options | None = None, fmt: str | None = None) -> Tree:
    """Load one or more sources (several only for layered formats) into a tree."""
    from cfsc import frontends

    return frontends.load(list(sources), options or Options(), fmt)


def compile_image(
    sources: Sequence,
    output: str | None,
    options: Options | None = None,
    fmt: str | None = None,
    want_digest: bool = False,
) -> bytes | None:
    """Compile sources into a composefs image at `output` (`-` = stdout, None = nowhere).

    Returns the image's fs-verity digest when `want_digest`.  The image appears atomically.
    """
    from cfsc.backends.erofs.writer import write_image
    from cfsc.build.pipeline import run_passes

    # Store objects are named only once the image is written, just before it is renamed into
    # place, and only those it refers to: a run that fails before then leaves neither.
    options = options or Options()
    held = None
    if options.digest_store:
        from cfsc.store.objects import HeldObjects

        held = HeldObjects()
        options = dataclasses.replace(options, held=held)
    try:
        with batch_allocation():
            tree = load(sources, options, fmt)
            try:
                tree = run_passes(tree, options)
            except TreeError as e:
                where = tree.locate(e.raw_path) if tree.locate is not None else None
                if where is None:
                    raise
                raise TreeError(e.what, e.raw_path, where) from None
            with atomic_output(output) if output is not None else contextlib.nullcontext() as out:
                sink = DigestingWriter(out) if want_digest else out
                write_image(tree, sink)  # type: ignore[arg-type]
                if held is not None:
                    held.commit(_referenced(tree))
            return sink.digest() if want_digest else None  # type: ignore[union-attr]
    except BaseException:
        if held is not None:
            held.close()
        raise


def _referenced(tree: Tree) -> set[bytes]:
    """The digests of the store objects a compiled tree's image refers to."""
    from cfsc.backends.erofs.overlay import is_external

    return {node.digest for node in tree.inodes or () if node.digest is not None and is_external(node)}
