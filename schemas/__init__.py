"""The JSON Schemas of what cfsc reads and writes, shipped as package data.

How to add a schema: put `NAME.json` here (draft 2020-12, `"$id": "urn:cfsc:schema:NAME"`, a
`title`; give reusable pieces a `title` too: it becomes the "expected …" of error messages).
`names()` lists it, `load(NAME)` returns it, `cfsc schema NAME` prints it, and the test suite
runs `check_schema` on every file here.

`problems()` validates an instance and turns jsonschema's errors into cfsc's one-line located
messages (`WHERE.path.to[3].field: expected …, got …`).  jsonschema is thorough but slow (about
0.1 ms per small object), so hot paths check values in code and come here only to explain a
rejection; the tests check that code and schema agree.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources

from cfsc.base.errors import UsageError

ID_PREFIX = "urn:cfsc:schema:"


def names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def text(name: str) -> str:
    """The schema exactly as shipped."""
    if name not in names():
        raise UsageError(f"no schema {name!r}: expected one of {', '.join(names())}", "schema")
    return resources.files(__name__).joinpath(name + ".json").read_text(encoding="utf-8")


@functools.cache
def load(name: str) -> dict:
    return json.loads(text(name))


@functools.cache
def validator(name: str, definition: str | None = None):
    """A compiled validator for the schema, or for one of its `$defs` (refs still resolve)."""
    import jsonschema

    schema = load(name)
    cls = jsonschema.validators.validator_for(schema)
    whole = cls(schema, format_checker=cls.FORMAT_CHECKER, registry=_registry())
    if definition is None:
        return whole
    return whole.evolve(schema={"$ref": f"{schema['$id']}#/$defs/{definition}"})


@functools.cache
def _registry():
    """Every shipped schema by its `$id`, so one schema can refer to another (`urn:cfsc:schema:NAME`)."""
    from referencing import Registry, Resource

    return Registry().with_resources((ID_PREFIX + n, Resource.from_contents(load(n))) for n in names())


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_DEPENDENCY = re.compile(r"'(.*)' is a dependency of '(.*)'\Z")  # jsonschema's dependentRequired message


def json_path(parts) -> str:
    """`entries[3].xattrs["user.foo"]` from a sequence of keys and indexes."""
    out = []
    for part in parts:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif _IDENTIFIER.match(part):
            out.append(f".{part}" if out else part)
        else:
            out.append(f"[{json.dumps(part, ensure_ascii=False)}]")
    return "".join(out)


def located(where: str, path, message: str) -> str:
    """One error line: `WHERE: PATH: message`, leaving out what is empty."""
    return ": ".join(p for p in (where, json_path(path), message) if p)


def shown(value) -> str:
    """A short description of a JSON value for messages: `a string \"abc\"`, `an object`, `-1`."""
    kind = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null", int: "an integer", float: "a number"}.get(type(value), type(value).__name__)
    if isinstance(value, (dict, list)):
        return kind
    text = json.dumps(value, ensure_ascii=False)
    if len(text) > 40:
        text = text[:37] + "…"
    return f"{kind} {text}" if isinstance(value, str) else text


def _message(error) -> tuple[list, str]:
    """(path below the instance, message) for one jsonschema error."""
    path = list(error.absolute_path)
    kind = error.validator
    schema = error.schema if isinstance(error.schema, dict) else {}
    title = schema.get("title")
    got = shown(error.instance)
    if kind == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        for_type = error.instance.get("type") if isinstance(error.instance, dict) else None
        extra = f" for type {for_type}" if isinstance(for_type, str) else ""
        return path + missing[:1], f"missing: required{extra}"
    if kind == "dependentRequired":
        m = _DEPENDENCY.match(error.message)
        if m:
            return path + [m.group(1)], f"missing: required with {m.group(2)}"
    if "propertyNames" in error.relative_schema_path:
        return path + [error.instance], f"unknown key: expected {title or 'a known key'}"
    if title and kind in ("type", "pattern", "enum", "minimum", "maximum", "const", "format"):
        return path, f"expected {title}, got {got}"
    if kind == "type":
        wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return path, f"expected {' or '.join(wanted)}, got {got}"
    if kind == "enum":
        return path, f"expected one of {', '.join(map(str, error.validator_value))}, got {got}"
    if kind == "const":
        return path, f"expected {json.dumps(error.validator_value)}, got {got}"
    if kind == "minimum":
        return path, f"expected at least {error.validator_value}, got {got}"
    if kind == "maximum":
        return path, f"expected at most {error.validator_value}, got {got}"
    return path, error.message


def problems(name: str, instance, where: str = "", path=(), definition: str | None = None) -> list[str]:
    """Every way `instance` breaks the schema (or one of its `$defs`), as located lines.

    `where` names the input (a file), `path` is where `instance` sits in it (`["entries", 3]`).
    """
    errors = validator(name, definition).iter_errors(instance)
    return sorted({located(where, [*path, *p], m) for p, m in map(_message, errors)})
