"""`cfsc schema`: the JSON Schemas of what cfsc reads and writes (`cfsc.schemas`)."""

from __future__ import annotations

import sys

import typer
from cfsc import schemas
from cfsc.base.errors import UsageError
from cfsc.cli import command


@command("schema")
def schema_cmd(
    name: str | None = typer.Argument(None, help="Schema to print (see --list)."),
    list_names: bool = typer.Option(False, "--list", help="List the schemas with their titles."),
) -> None:
    """Print a JSON Schema (draft 2020-12) exactly as shipped, or list them."""
    if list_names:
        for known in schemas.names():
            sys.stdout.write(f"{known}\t{schemas.load(known).get('title', '')}\n")
        return
    if name is None:
        raise UsageError(f"give a schema name: {', '.join(schemas.names())} (or --list)")
    sys.stdout.write(schemas.text(name))
