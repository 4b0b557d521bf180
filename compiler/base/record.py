"""Record classes for the modules every command imports: the part of `dataclasses` they use.

`dataclasses` imports `inspect` (with `ast`, `dis`, `tokenize` …): ~10 ms of every command's
start-up, where the C tool compiles an everyday image in a quarter of a second.  `@record`
makes the same class from the same declaration (annotated class attributes, in order, their
values the defaults; `field(default_factory=f)` for one computed per instance): `__slots__`,
`__init__` taking them by position or keyword, `__eq__`, `__repr__`, and with `frozen=True`
immutability and `__hash__`; no inheritance, no other options.  `fields`, `defaults`,
`replace` and `asdict` stand for their `dataclasses` namesakes.  Type checkers see a dataclass
(the `TYPE_CHECKING` branch), which is what it behaves as (`tests/test_record.py`).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's, without importing typing (start-up); type checkers read it as True
if TYPE_CHECKING:
    from dataclasses import dataclass as record
    from dataclasses import field
    from typing import Any, TypeVar

    T = TypeVar("T")
else:
    def field(*, default_factory):
        """A field whose default is `default_factory()`, called for each instance."""
        return _Factory(default_factory)

    def record(cls=None, /, *, frozen: bool = False, slots: bool = True):
        """The record class declared by `cls` (see the module's docstring).  Records always
        have slots: `slots=True` is written so that type checkers read the same class."""
        assert slots, "records always have __slots__"
        if cls is None:
            return lambda cls: _make(cls, frozen)
        return _make(cls, frozen)


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make) -> None:
        self.make = make


class _Computed:
    def __repr__(self) -> str:
        return "<factory>"  # (in signatures, as dataclasses shows it)


_MISSING = object()  # no default: a required field
_COMPUTED = _Computed()  # the default of a field with a default_factory: compute it


def _make(cls: type, frozen: bool) -> type:
    assert cls.__bases__ == (object,), f"{cls.__name__}: a record inherits no fields"
    names = tuple(cls.__dict__.get("__annotations__", {}))
    declared = {name: cls.__dict__.get(name, _MISSING) for name in names}
    for name, default in declared.items():
        if isinstance(default, (list, dict, set, bytearray)):  # (as dataclasses refuses them)
            raise ValueError(f"mutable default {type(default).__name__} for field {name}: use field(default_factory=…)")
    # __init__ is generated, as dataclasses does: the signature and Python's own TypeErrors
    # for a missing, unknown or repeated argument come with it.
    scope: dict = {"_COMPUTED": _COMPUTED, "_set": object.__setattr__ if frozen else None}
    params, lines = [], []
    for name, default in declared.items():
        if default is _MISSING:
            params.append(name)
        else:
            scope[f"_d_{name}"] = default.make if isinstance(default, _Factory) else default
            params.append(f"{name}=_COMPUTED" if isinstance(default, _Factory) else f"{name}=_d_{name}")
        value = f"_d_{name}() if {name} is _COMPUTED else {name}" if isinstance(default, _Factory) else name
        lines.append(f"_set(self, {name!r}, {value})" if frozen else f"self.{name} = {value}")
    source = f"def __init__(self, {', '.join(params)}):\n    " + "\n    ".join(lines or ["pass"])
    exec(source, scope)  # noqa: S102 (the names are the class's own annotated identifiers)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in declared and k not in ("__dict__", "__weakref__")}
    namespace.update(__slots__=names, __qualname__=cls.__qualname__, __init__=scope["__init__"],
                     __record_fields__=declared, __eq__=_eq, __repr__=_repr, __match_args__=names)
    scope["__init__"].__qualname__ = f"{cls.__qualname__}.__init__"
    scope["__init__"].__annotations__ = {**cls.__dict__.get("__annotations__", {}), "return": None}
    if frozen:  # (pickling and copying go through __init__: __setattr__ refuses)
        namespace.update(__setattr__=_frozen, __delattr__=_frozen, __hash__=_hash, __reduce__=_reduce)
    else:
        namespace["__hash__"] = None  # mutable and compared by value: unhashable, as a dataclass
    return type(cls)(cls.__name__, cls.__bases__, namespace)


def _values(obj) -> tuple:
    return tuple(getattr(obj, name) for name in obj.__record_fields__)


def _eq(self, other):
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _repr(self) -> str:
    return f"{type(self).__qualname__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self.__record_fields__)})"


def _hash(self) -> int:
    return hash(_values(self))


def _reduce(self):
    return type(self), _values(self)


def _frozen(self, name, *value):
    raise AttributeError(f"cannot assign to or delete field {name!r} of a frozen {type(self).__name__}")


def fields(cls_or_obj) -> tuple[str, ...]:
    """The names of a record's fields, in declaration order."""
    return tuple(cls_or_obj.__record_fields__)


def defaults(cls_or_obj) -> dict[str, Any]:
    """Each field's fixed default (not those computed per instance, nor required fields)."""
    return {name: d for name, d in cls_or_obj.__record_fields__.items() if d is not _MISSING and not isinstance(d, _Factory)}


def replace(obj: T, **changes: Any) -> T:
    """A copy of `obj` with `changes` (a new instance: computed defaults are not recomputed)."""
    return type(obj)(**{**asdict(obj), **changes})


def asdict(obj) -> dict[str, Any]:
    """Field name → value (a shallow dict: the values themselves, not copies)."""
    return {name: getattr(obj, name) for name in obj.__record_fields__}
