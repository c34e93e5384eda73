"""The frames' JSON codec (engine/wirejson.py) writes and reads exactly what Python's json does."""

from __future__ import annotations

import decimal
import json
import math
import platform
import socket
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbrunbook.engine import protocol, wirejson


def _stdlib(msg: Any) -> bytes:
    return json.dumps(msg, separators=(",", ":"), default=str).encode()


_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities included: json writes NaN, Infinity
    | st.text()
    | st.binary().map(bytes)  # not JSON: default=str
    | st.decimals(allow_nan=False).map(decimal.Decimal)
)
_keys = st.text() | st.integers() | st.booleans() | st.none() | st.floats(allow_nan=False)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=20,
)


def test_the_c_codec_is_the_one_in_use_on_cpython() -> None:
    # Otherwise the tests below would only compare json with itself.
    if platform.python_implementation() != "CPython":
        pytest.skip("the C accelerator is CPython's")
    assert wirejson.encode is wirejson._fast_encode
    assert wirejson.decode is not wirejson._slow_decode


@settings(max_examples=400, deadline=None)
@given(_values)
def test_encoding_is_byte_for_byte_json_dumps(value: Any) -> None:
    msg = {"t": "res", "id": 7, "ok": value}
    assert wirejson.encode(msg) == _stdlib(msg)


@settings(max_examples=400, deadline=None)
@given(_values)
def test_decoding_reads_back_what_json_loads_reads(value: Any) -> None:
    body = _stdlib({"ok": value})
    ours, theirs = wirejson.decode(body), json.loads(body)
    # NaN != NaN: compare the documents through the (verified) encoder.
    assert _stdlib(ours) == _stdlib(theirs)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_any_text_is_accepted_or_refused_as_json_loads_does(text: str) -> None:
    try:
        expected: Any = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            wirejson.decode(text.encode())
        return
    got = wirejson.decode(text.encode())
    assert _stdlib(got) == _stdlib(expected)


@pytest.mark.parametrize(
    "body",
    [b"", b"   ", b"{", b'{"a":1}x', b'{"a":1} {"b":2}', b"\xff\xfe{}", b'{"a":01}', b"nul", b"[1,]"],
)
def test_malformed_frames_are_value_errors(body: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(body.decode(errors="replace"))
    with pytest.raises(ValueError):
        wirejson.decode(body)
    with pytest.raises(ValueError):
        wirejson.decode(bytearray(body))  # the client's reader hands over a bytearray slice


def test_whitespace_around_a_document_is_skipped_as_by_json_loads() -> None:
    assert wirejson.decode(b' \n{"a": [1, 2.5, NaN]}\t\r\n')["a"][:2] == [1, 2.5]
    assert math.isnan(wirejson.decode(b"[NaN]")[0])


def test_a_circular_message_is_refused_and_the_next_one_encodes() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(ValueError, match="ircular"):
        wirejson.encode({"ok": loop})
    again = {"ok": [1, [1]]}  # a fresh markers dict each call: no stale entry from the failure
    assert wirejson.encode(again) == _stdlib(again)


def test_frames_round_trip_through_the_protocol_reader() -> None:
    msgs = [{"t": "req", "id": i, "op": "claim", "args": {"path": f"cell/é{i}", "lease": 30.5}} for i in range(3)]
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"".join(protocol.dumps(m) for m in msgs))
        a.shutdown(socket.SHUT_WR)
        reader = protocol.SocketReader(b)  # the client's reader: frames from a bytearray buffer
        got = []
        while reader.fill():
            while (m := reader.frame()) is not None:
                got.append(m)
        # The server's reader: read_frame over a buffered stream.
        c, d = socket.socketpair()
        with c, d, d.makefile("rb") as stream:
            c.sendall(b"".join(protocol.dumps(m) for m in msgs))
            c.shutdown(socket.SHUT_WR)
            read = [protocol.read_frame(stream) for _ in msgs]
            assert protocol.read_frame(stream) is None
    assert got == msgs == read
