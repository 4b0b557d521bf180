"""cfsc: a declarative compiler for composefs images.

Library entry points (the CLI calls these too):

    from cfsc import load, compile_image, run_passes, Options
    tree = load(["root.dump"])              # any frontend, detected from the content
    compile_image(["root.dump"], "root.cfs", Options(max_version=0))
"""

from cfsc.base.options import Options
from cfsc.base.tree import Inode, Tree
from cfsc.build import compile_image, load
from cfsc.build.pipeline import PASSES, run_passes

__all__ = ["PASSES", "Inode", "Options", "Tree", "compile_image", "load", "run_passes"]
__version__ = "0.1.0"
