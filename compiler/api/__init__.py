"""The public Python API, re-exported by the `cfsc` package (`cfsc.open`, `cfsc.diff` …).

    reading.py     open(source) → Image: walk(), lookup(), listdir(); Entry attributes
    comparing.py   diff(a, b) → DiffReport, check(source, …) → CheckReport (the CLI's reports)
    compiling.py   compile(sources, output) → the image's fs-verity digest
    arguments.py   sources and keyword options as the tools take them

It sits above `cfsc.tools` and `cfsc.build` and below the CLI, whose `diff` and `check` verbs
call it.  Its modules import the machinery inside the functions, so `import cfsc` and the
CLI's start-up do not pay for what a call does not use.
"""

from cfsc.api.comparing import Change, CheckReport, DiffReport, check, diff
from cfsc.api.compiling import compile  # noqa: A004
from cfsc.api.reading import Entry, Image, open  # noqa: A004

__all__ = ["Change", "CheckReport", "DiffReport", "Entry", "Image", "check", "compile", "diff", "open"]
