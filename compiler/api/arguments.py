"""What the API accepts, turned into what the tools take: sources and options.

A *source* is a path (`str`, `bytes` or `os.PathLike`), a reference (`ostree:REPO:REF`,
`oci:DIR`, …), `-` for standard input, or a list/tuple of sources combined as layers, bottom
first (tar layers; `cfsc compile l1.tar l2.tar`).  The command line spells layers
`l1.tar+l2.tar`; the API takes a list and never splits a name on `+`.

Options are `cfsc.Options` fields given as keywords (`max_version=0`, `exclude=[...]`),
optionally on top of an `Options` passed as `options=`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Union

from cfsc.base import record
from cfsc.base.options import Options

Path = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
Source = Union[Path, Sequence[Path]]

# Set by the compiler itself (`compile_image`), never by a caller.
_INTERNAL = frozenset({"held"})
_FIELDS = tuple(name for name in record.fields(Options) if name not in _INTERNAL)


def path_of(source: Path) -> str:
    """One source as the frontends take it (a str: prefixed references are strings)."""
    path = os.fspath(source)
    return os.fsdecode(path) if isinstance(path, bytes) else path


def side_of(source: Source) -> str | tuple[str, ...]:
    """A source as the tools take a side: one path, or a tuple of layers."""
    if isinstance(source, (str, bytes, os.PathLike)):
        return path_of(source)
    layers = tuple(path_of(s) for s in source)
    if not layers:
        raise TypeError("expected a source or a non-empty list of layers, got an empty list")
    return layers[0] if len(layers) == 1 else layers


def sources_of(sources: Source) -> list[str]:
    """Sources for `compile`: one, or several combined."""
    side = side_of(sources)
    return list(side) if isinstance(side, tuple) else [side]


def options_of(options: Options | None, fields: dict[str, Any]) -> Options:
    """`options` (default `Options()`) with `fields` set; an unknown name is a TypeError, as
    for any Python call with a wrong keyword."""
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}: expected some of {', '.join(_FIELDS)}")
    if "exclude" in fields:
        exclude = fields["exclude"]
        fields["exclude"] = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    base = options if options is not None else Options()
    return record.replace(base, **fields) if fields else base
