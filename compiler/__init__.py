"""cfsc: a declarative compiler for composefs images.

Library entry points (the CLI calls these too):

    from cfsc import load, compile_image, run_passes, Options
    tree = load(["root.dump"])              # any frontend, detected from the content
    compile_image(["root.dump"], "root.cfs", Options(max_version=0))
"""

import importlib

from cfsc.base.options import Options
from cfsc.base.tree import Inode, Tree

__all__ = ["PASSES", "Inode", "Options", "Tree", "compile_image", "load", "run_passes"]
__version__ = "0.1.0"

# The compiler's entry points are imported on first use: every `cfsc` command imports this
# package, and those that compile nothing (mount, composefs-fuse, schema) skip loading the
# compiler and its passes (start-up: `cfsc mount` ~5 ms less).
_COMPILER = {"compile_image": "cfsc.build", "load": "cfsc.build",
             "PASSES": "cfsc.build.pipeline", "run_passes": "cfsc.build.pipeline"}


def __getattr__(name: str):
    module = _COMPILER.get(name)
    if module is None:
        raise AttributeError(f"module 'cfsc' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
