"""`cfsc.base.record` makes the class `dataclasses.dataclass` makes from the same declaration
(for what cfsc uses: init by position or keyword, defaults, computed defaults, eq, repr,
slots, frozen, hash, replace, asdict); dataclasses is the reference it is checked against."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle

import pytest
from cfsc.base import record
from cfsc.base.options import SOURCE_OPTIONS, Options, SourceOption

def _factory() -> list:
    return ["made"]


def declare(decorator, field):
    class Point:
        """A point."""

        x: int
        y: int = 2
        tags: list = field(default_factory=_factory)
        label: str | None = None

        @property
        def norm(self) -> int:
            return abs(self.x) + abs(self.y)

    return decorator(Point)


@pytest.mark.parametrize("frozen", [False, True])
def test_record_behaves_as_the_dataclass_of_the_same_declaration(frozen):
    new = declare(record.record(frozen=frozen, slots=True), record.field)
    ref = declare(dataclasses.dataclass(frozen=frozen, slots=True), dataclasses.field)
    assert str(inspect.signature(new)) == str(inspect.signature(ref))
    assert new.__slots__ == ref.__slots__ and new.__doc__ == ref.__doc__ and new.__qualname__ == ref.__qualname__
    assert record.fields(new) == tuple(f.name for f in dataclasses.fields(ref))
    assert record.defaults(new) == {"y": 2, "label": None}
    for args, kwargs in [((1,), {}), ((1, 3), {"label": "a"}), ((), {"x": 5, "tags": ["t"]})]:
        a, b = new(*args, **kwargs), ref(*args, **kwargs)
        assert repr(a) == repr(b)
        assert record.asdict(a) == dataclasses.asdict(b) and a.norm == b.norm
        assert a == new(*args, **kwargs) and a != new(9) and (a == b) is False  # another class
        assert record.asdict(record.replace(a, y=7)) == dataclasses.asdict(dataclasses.replace(b, y=7))
        assert copy.copy(a) == a and copy.deepcopy(a) == a
        if frozen:  # hashed by value (the list a tuple here: hashable)
            assert hash(record.replace(a, tags=("t",))) == hash(new(*args, **{**kwargs, "tags": ("t",)}))
        for value in (a, b):
            with pytest.raises(TypeError):
                hash(value)  # mutable, or frozen with a list in it
    assert new(1).tags is not new(1).tags  # computed for each instance, as default_factory
    for bad in [((), {}), ((1,), {"z": 1}), ((1,), {"x": 1}), ((1, 2, 3, 4, 5), {})]:
        with pytest.raises(TypeError):
            new(*bad[0], **bad[1])
        with pytest.raises(TypeError):
            ref(*bad[0], **bad[1])
    a = new(1)
    with pytest.raises(AttributeError):
        a.z = 1  # slots: a misspelt field is an error
    if frozen:
        with pytest.raises(AttributeError):
            a.x = 2
        with pytest.raises(AttributeError):
            del a.x
    else:
        a.x = 2
        assert a.x == 2


def test_options_and_source_options_are_records():
    options = Options(max_version=0)
    assert options.threads >= 1 and options.max_version == 0 and options == Options(max_version=0)
    assert record.replace(options, hash="sha512").hash == "sha512" and options.hash == "sha256"
    with pytest.raises(AttributeError):
        options.max_verison = 1
    with pytest.raises(AttributeError):
        SOURCE_OPTIONS[0].flag = "--x"
    assert isinstance(SOURCE_OPTIONS[0], SourceOption)
    for value in (options, SOURCE_OPTIONS[-1]):
        assert pickle.loads(pickle.dumps(value)) == value == copy.copy(value)


def test_record_refuses_what_it_does_not_make():
    with pytest.raises(ValueError):
        @record.record(slots=True)
        class Bad:
            items: list = []  # noqa: RUF012 (the point: one list shared by every instance)
