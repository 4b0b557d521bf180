"""Backends: turn a compiled tree into an output format.

How to add a backend: write `backends/<format>.py` (or a package) with a function that writes
to a binary stream, and add a row to `BACKENDS` naming it and saying what it `takes`:

* `COMPILED`: the tree after the whole pipeline, `write(tree, out)` (the image writer);
* `IMAGE`: the image the tree compiles to, opened for reading, `write(image, out, names)`
  (`names`: only those children of the root, or None) — text that describes an image;
* `HOMED`: the tree as the frontend gave it with one home entry per inode (the
  `resolve_hardlinks` pass), `write(tree, out, options)`.

`cfsc.build.write` gives each backend what it takes; backends run no passes themselves.  The
rows name functions rather than import them: a command imports only the backend it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from cfsc.base.errors import UsageError

# What a backend's function is given (`Backend.takes`).
COMPILED = "compiled"
IMAGE = "image"
HOMED = "homed"


class Backend:
    """One output format; `write` is "module:function", imported on first use (a plain class
    like `cfsc.frontends.Frontend`, for start-up time)."""

    __slots__ = ("description", "name", "takes", "text", "write")

    def __init__(self, name: str, write: str, description: str, takes: str, *, text: bool = True) -> None:
        self.name = name
        self.write = write
        self.description = description
        self.takes = takes
        self.text = text  # prints text, for `cfsc dump --format`

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, {self.write!r})"

    def writer(self) -> Callable:
        module, _colon, name = self.write.partition(":")
        return getattr(importlib.import_module(module), name)


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("image", "cfsc.backends.erofs.writer:write_image",
            "composefs image (EROFS), byte-identical with mkcomposefs 1.0.8", COMPILED, text=False),
    Backend("dump", "cfsc.backends.dumpfile:dump_image",
            "dumpfile text, as composefs-info dump prints the compiled image", IMAGE),
    Backend("json", "cfsc.backends.jsonlines:dump_image",
            "one JSON object per entry per line (the dump's fields)", IMAGE),
    Backend("crfs", "cfsc.backends.crfs:write",
            "CRFS / eStargz TOC JSON that `--from crfs` compiles back (cfsc schema crfs-toc)", HOMED),
)}


def get(name: str, text: bool = False) -> Backend:
    """The backend called `name` (`text`: one that prints text)."""
    backend = BACKENDS.get(name)
    if backend is None or (text and not backend.text):
        choices = ", ".join(b.name for b in BACKENDS.values() if b.text or not text)
        raise UsageError(f"unknown {'dump ' if text else ''}format {name!r}: expected one of {choices}", "--format")
    return backend
