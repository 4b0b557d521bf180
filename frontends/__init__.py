"""Frontends: lower a source to the typed tree.

How to add a frontend: write `frontends/<format>.py` exposing `load(source, options) -> Tree`
(and `sniff(head: bytes) -> bool` if the format can be recognised from its first bytes), then
add a row to `FRONTENDS`.  The first row whose `sniff` accepts the head of the input wins when
the user does not name the format with `--from`.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from cfsc.errors import UsageError
from cfsc.options import Options
from cfsc.tree import Tree

# name → (module, description); order matters for detection.
FRONTENDS: dict[str, tuple[str, str]] = {
    "dump": ("cfsc.frontends.dumpfile", "composefs dumpfile (mkcomposefs --from-file)"),
}


def module(name: str) -> ModuleType:
    try:
        return importlib.import_module(FRONTENDS[name][0])
    except KeyError:
        raise UsageError(f"unknown source format {name!r}: expected one of {', '.join(FRONTENDS)}", "--from") from None


def detect(source, head: bytes) -> str:
    """The frontend for a source, from its kind (directory, ref) or its first bytes."""
    for name, (modname, _desc) in FRONTENDS.items():
        mod = importlib.import_module(modname)
        sniff = getattr(mod, "sniff", None)
        if sniff is not None and sniff(head):
            return name
    where = os.fsdecode(source) if isinstance(source, (str, bytes, os.PathLike)) else "<stdin>"
    raise UsageError("cannot tell the source format from its content: use --from", where)


def load(source, options: Options | None = None, fmt: str | None = None) -> Tree:
    options = options or Options()
    if fmt is None:
        fmt = "dump"
    return module(fmt).load(source, options)
