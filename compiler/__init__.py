"""cfsc: a declarative compiler for composefs images.

The public API (typed; documented in the README's "Python API" section):

    import cfsc
    with cfsc.open("root.dump") as image:          # an image, or any source compiled in memory
        for entry in image.walk():                  # the order of `cfsc dump`
            print(entry.path, entry.type, entry.size, entry.payload)
        image.lookup("/etc/hostname").content
    digest = cfsc.compile(["root.dump"], "root.cfs", max_version=0)
    report = cfsc.diff("old.cfs", "root.dump")      # report.to_dict() == `cfsc diff --json`
    cfsc.check("root.dump", expect_digest=digest)   # `cfsc check`
    cfsc.errors.CfscError                           # every error cfsc raises

The compiler's own entry points stay exported for code that works on trees:
`load(sources, options) -> Tree`, `compile_image`, `run_passes`, `PASSES`, `Options`.
"""

from __future__ import annotations

import importlib

from cfsc import errors
from cfsc.base.errors import CfscError
from cfsc.base.options import Options
from cfsc.base.tree import Inode, Tree

TYPE_CHECKING = False  # typing's, without importing typing (start-up); type checkers read it as True
if TYPE_CHECKING:  # the names `__getattr__` imports on first use, for type checkers
    from typing import Any

    from cfsc.api import Change, CheckReport, DiffReport, Entry, Image, check, compile, diff, open  # noqa: A004
    from cfsc.build import compile_image, load
    from cfsc.build.pipeline import PASSES, run_passes

__all__ = ["PASSES", "CfscError", "Change", "CheckReport", "DiffReport", "Entry", "Image", "Inode", "Options",
           "Tree", "check", "compile", "compile_image", "diff", "errors", "load", "open", "run_passes"]
__version__ = "0.1.0"

# Everything but the error classes, options and tree types is imported on first use: every
# `cfsc` command imports this package, and those that compile nothing (mount, composefs-fuse,
# schema) skip loading the compiler and its passes (start-up: `cfsc mount` ~5 ms less); a
# library user pays for the reader, the compiler or the diff only when calling them.
_LAZY = {"compile_image": "cfsc.build", "load": "cfsc.build",
         "PASSES": "cfsc.build.pipeline", "run_passes": "cfsc.build.pipeline",
         **dict.fromkeys(("Change", "CheckReport", "DiffReport", "Entry", "Image", "check", "compile", "diff",
                          "open"), "cfsc.api")}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cfsc' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
