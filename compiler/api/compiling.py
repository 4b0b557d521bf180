"""Compiling: `compile(sources, output)`, what `cfsc compile` does, returning the image's digest."""

from __future__ import annotations

import os
from typing import Any

from cfsc.api.arguments import Source, options_of, path_of, sources_of
from cfsc.base.options import Options


def compile(sources: Source, output: str | os.PathLike | None, *, format: str | None = None,  # noqa: A001
            options: Options | None = None, **option_fields: Any) -> bytes:
    """Compile one source, or several combined (tar layers, bottom first), into a composefs
    image at `output` (None: write nothing, only measure it); returns the image's fs-verity
    digest (what `mount -o digest=` expects).

    The image appears atomically: after an error nothing was written, and with `digest_store`
    no store object was named.  Keywords are `cfsc.Options` fields (`max_version=0`,
    `digest_store="store/"`, `threads=4`, …)."""
    from cfsc.build import compile_image

    opts = options_of(options, option_fields)
    out = path_of(output) if output is not None else None
    digest = compile_image(sources_of(sources), out, opts, format, want_digest=True)
    assert digest is not None
    return digest


__all__ = ["compile"]
