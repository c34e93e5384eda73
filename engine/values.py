"""Encoding of recorded values: cell values to restore and branch results.

* ``json`` - exact JSON: ``None``, ``bool``, ``int``, ``float``, ``str``, lists,
  dicts with ``str`` keys, and tuples (tagged, so they come back as tuples).
  A value that would not round-trip exactly is not JSON.
* ``arrow:<kind>`` - pandas / polars data frames and pyarrow tables, as an
  Arrow IPC stream (needs ``pyarrow``).
* ``pickle`` - only when the caller explicitly opts in for that value; decoding
  a pickle likewise needs an explicit opt-in (DESIGN.md §4: the store never
  unpickles anything it was not told to).
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import ValueNotSerializable, ValueTooLarge
from .model import EncodedValue

DEFAULT_LIMIT = 16 * 1024 * 1024
_TUPLE = "__nbrunbook_tuple__"


class _NotExact(Exception):
    pass


def _to_json(value: Any, depth: int = 0) -> Any:
    if depth > 100:
        raise _NotExact("nested too deeply")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)  # IntEnum and friends lose their type: refuse those below
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise _NotExact("NaN/inf")
        return value
    if isinstance(value, list):
        return [_to_json(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return {_TUPLE: [_to_json(v, depth + 1) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise _NotExact("non-string keys")
        if _TUPLE in value:
            raise _NotExact("reserved key")
        return {k: _to_json(v, depth + 1) for k, v in value.items()}
    raise _NotExact(type(value).__name__)


def _from_json(data: Any) -> Any:
    if isinstance(data, list):
        return [_from_json(v) for v in data]
    if isinstance(data, dict):
        if set(data) == {_TUPLE}:
            return tuple(_from_json(v) for v in data[_TUPLE])
        return {k: _from_json(v) for k, v in data.items()}
    return data


def _exact_types(value: Any) -> bool:
    """True if every scalar is exactly a JSON type (not a subclass such as IntEnum, numpy.bool_)."""
    if type(value) in (type(None), bool, int, float, str):
        return True
    if type(value) in (list, tuple):
        return all(_exact_types(v) for v in value)
    if type(value) is dict:
        return all(_exact_types(v) for v in value.values())
    return False


def _arrow_kind(value: Any) -> str | None:
    mod = type(value).__module__.split(".")[0]
    name = type(value).__name__
    if mod == "pandas" and name == "DataFrame":
        return "pandas"
    if mod == "pyarrow" and name == "Table":
        return "pyarrow"
    if mod == "polars" and name == "DataFrame":
        return "polars"
    return None


def encode(value: Any, *, name: str, allow_pickle: bool = False, limit: int = DEFAULT_LIMIT) -> EncodedValue:
    """Encode ``value`` for the store, or raise ``ValueNotSerializable`` / ``ValueTooLarge``."""
    encoded = _encode(value, name=name, allow_pickle=allow_pickle)
    if len(encoded.data) > limit:
        raise ValueTooLarge(name, len(encoded.data), limit)
    return encoded


def _encode(value: Any, *, name: str, allow_pickle: bool) -> EncodedValue:
    if _exact_types(value):
        try:
            text = json.dumps(_to_json(value), separators=(",", ":"), allow_nan=False)
        except (_NotExact, ValueError):
            pass
        else:
            return EncodedValue("json", text.encode())
    kind = _arrow_kind(value)
    if kind is not None:
        try:
            import pyarrow as pa
        except ImportError:  # pragma: no cover - pyarrow ships with the extras we test
            raise ValueNotSerializable(name, type(value).__name__, "install pyarrow to record data frames") from None
        if kind == "pandas":
            table = pa.Table.from_pandas(value)
        elif kind == "polars":
            table = value.to_arrow()
        else:
            table = value
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return EncodedValue(f"arrow:{kind}", sink.getvalue().to_pybytes())
    if allow_pickle:
        import pickle

        return EncodedValue("pickle", pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    raise ValueNotSerializable(
        name,
        f"{type(value).__module__}.{type(value).__qualname__}",
        "return JSON data (dict/list/str/number/bool/None/tuple) or a data frame, or opt in to pickle for this value",
    )


def decode(value: EncodedValue, *, name: str = "value", allow_pickle: bool = False) -> Any:
    """Decode a recorded value. Pickles only with ``allow_pickle``."""
    enc = value.encoding
    if enc == "json":
        return _from_json(json.loads(value.data))
    if enc.startswith("arrow:"):
        import pyarrow as pa

        table = pa.ipc.open_stream(value.data).read_all()
        kind = enc.split(":", 1)[1]
        if kind == "pandas":
            return table.to_pandas()
        if kind == "polars":
            import polars as pl

            return pl.from_arrow(table)
        return table
    if enc == "pickle":
        if not allow_pickle:
            raise ValueNotSerializable(name, "pickle", "this value was pickled; decode it only with an explicit opt-in")
        import pickle

        return pickle.loads(value.data)  # the caller opted in for this value
    raise ValueNotSerializable(name, enc, "unknown encoding")


def describe(value: Any) -> str:
    """A short type name for messages."""
    return f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")
