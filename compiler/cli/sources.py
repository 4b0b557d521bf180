"""The options of every verb that takes a source, made from their one declaration
(`cfsc.base.options.SOURCE_OPTIONS`).

`@source_options()` adds a typer parameter per declaration to the verb's signature (typer
reads `__signature__`), listed under their own heading in `--help`, and hands the verb one
`Options` built from them in its `options` argument.  A verb thus cannot lack an option
`compile` has, and the help of a flag is the same everywhere.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable

import typer
from cfsc.base import record
from cfsc.base.errors import UsageError
from cfsc.base.options import DIR, EPOCH, FLAG, NUMBER, QUERIES, SOURCE_OPTIONS, TEXT, Options, SourceOption
from cfsc.cli import renamed, source_date_epoch

PANEL = "Source options"
FROM = typer.Option(None, "--from", metavar="FORMAT", rich_help_panel=PANEL,
                    help="Source format: dump, image, dir, tar, crfs, ostree, oci (default: detected from the content).")

_TYPES = {FLAG: bool, EPOCH: bool, NUMBER: int | None, DIR: str | None, TEXT: str | None, QUERIES: list[str]}


def _parameter(option: SourceOption, name: str, flag: str, hidden: bool = False) -> inspect.Parameter:
    default: object = None
    if option.value in (FLAG, EPOCH):
        default = False
    elif option.value == QUERIES:
        default = []
    elif option.value == NUMBER:
        default = record.defaults(Options).get(option.field)  # None: computed (CPUs)
    info = typer.Option(default, flag, help=option.help, hidden=hidden, rich_help_panel=PANEL,
                        metavar="|".join(option.choices) or {DIR: "DIR", NUMBER: "N", QUERIES: "QUERY", TEXT: "VALUE"}.get(option.value),
                        min=option.minimum)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=_TYPES[option.value])


def _old(option: SourceOption) -> str:
    return "old_" + option.field


def adding(parameters: list[inspect.Parameter], into: str, make: Callable[[dict], object]):
    """Decorator: `parameters` join the verb's signature (typer reads `__signature__`); their
    values, by name, become `make(values)`, passed to the verb as its keyword argument `into`."""

    def wrap(func):
        hints = typing.get_type_hints(func)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(func).parameters.values() if p.name != into]
        names = [p.name for p in parameters]
        clash = {p.name for p in own} & set(names)
        assert not clash, f"{func.__name__} declares {sorted(clash)} itself"

        @functools.wraps(func)
        def run(*args, **kwargs):
            values = {name: kwargs.pop(name) for name in names}
            return func(*args, **{into: make(values)}, **kwargs)

        signature = own + parameters
        run.__signature__ = inspect.Signature(signature)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in signature}
        return run

    return wrap


def source_options(old_flags: bool = False):
    """Give the decorated verb every source option; it receives them as `options: Options`
    (a keyword-only parameter of its own).  `old_flags`: also accept each option's earlier
    spelling, hidden (on the verbs whose documentation showed it)."""
    parameters = [_parameter(o, o.field, o.flag) for o in SOURCE_OPTIONS]
    if old_flags:
        parameters += [_parameter(o, _old(o), o.old_flag, hidden=True) for o in SOURCE_OPTIONS if o.old_flag]
    return adding(parameters, "options", build)


def some_source_options(*fields: str):
    """Like `source_options`, but only the options setting `fields`: for a verb that takes
    no source yet shares an option's meaning (`measure --hash`)."""
    chosen = [o for o in SOURCE_OPTIONS if o.field in fields]
    assert len(chosen) == len(fields), fields
    return adding([_parameter(o, o.field, o.flag) for o in chosen], "options", build)


def build(values: dict) -> Options:
    """`Options` from the parsed source options (field or old_field → command-line value)."""
    values = dict(values)
    for o in SOURCE_OPTIONS:
        if o.field not in values:
            continue
        if o.old_flag and _old(o) in values:
            values[o.field] = renamed(values[o.field], values.pop(_old(o)), o.flag, o.old_flag)
        if o.value == EPOCH:
            values[o.field] = source_date_epoch() if values[o.field] else None
        elif o.value == QUERIES:
            values[o.field] = tuple(values[o.field])
            if values[o.field]:  # a bad query fails before any source is read
                from cfsc.base import query  # here: it imports lark (tens of ms), wanted only for a query

                query.any_of(values[o.field], o.flag)
        elif o.value == NUMBER and values[o.field] is None:
            del values[o.field]  # computed by Options
        elif o.value == TEXT and values[o.field] is None:
            del values[o.field]  # Options' default
        elif o.choices and values[o.field] not in o.choices:
            raise UsageError(f"{values[o.field]!r}: expected {', '.join(o.choices[:-1])} or {o.choices[-1]}", o.flag)
    return Options(**values)
