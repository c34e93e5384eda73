"""Value encoding: exact JSON, Arrow for frames, pickle only on explicit opt-in."""

from __future__ import annotations

import enum
import math

import pytest

from nbrunbook.engine.errors import ValueNotSerializable, ValueTooLarge
from nbrunbook.engine.values import decode, encode


@pytest.mark.parametrize(
    "value",
    [None, True, 0, -3, 2**70, 1.5, "ü", [], {}, [1, [2, (3, "x")]], {"a": {"b": [None, 1.0]}}, (1, 2), ((),)],
)
def test_json_round_trips_exactly(value: object) -> None:
    ev = encode(value, name="v")
    assert ev.encoding == "json"
    back = decode(ev)
    assert back == value and type(back) is type(value)


class Colour(enum.IntEnum):
    RED = 1


@pytest.mark.parametrize(
    "value, type_name",
    [({1: "a"}, "dict"), (object(), "object"), ({"x": {1, 2}}, "dict"), (Colour.RED, "Colour"), (math.nan, "float")],
)
def test_not_exact_json_is_refused_naming_the_type(value: object, type_name: str) -> None:
    with pytest.raises(ValueNotSerializable) as info:
        encode(value, name="result")
    assert "result" in str(info.value) and type_name in str(info.value)


def test_pickle_only_on_opt_in() -> None:
    value = {1: {2, 3}}
    ev = encode(value, name="v", allow_pickle=True)
    assert ev.encoding == "pickle"
    with pytest.raises(ValueNotSerializable, match="pickled"):
        decode(ev)
    assert decode(ev, allow_pickle=True) == value


def test_arrow_tables_and_frames() -> None:
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"a": [1, 2], "b": ["x", None]})
    ev = encode(table, name="t")
    assert ev.encoding == "arrow:pyarrow"
    assert decode(ev).equals(table)


def test_size_cap() -> None:
    with pytest.raises(ValueTooLarge):
        encode("x" * 100, name="big", limit=50)
