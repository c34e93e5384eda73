"""The store server's frames as JSON, through the json module's C encoder and scanner directly.

``json.dumps(msg, separators=..., default=str)`` builds a ``JSONEncoder``
and a C encoder per call, and ``json.loads(bytes)`` detects the encoding,
builds no decoder but goes through two more Python layers and their regexes.
Per message that is ~5 µs warm here, but a claim's round trip passes four of
them (request and answer, encoded and decoded) right after the processes
sat idle for the cell's run, with their caches cold: a bare Python ping-pong
of a claim-sized frame after 5 ms idle took 0.47-0.54 ms with ``json`` and
0.34-0.40 ms with the C parts called directly (``BENCHMARKS.md``, series F).

The wire is unchanged, byte for byte: the same compact JSON, ASCII-only
(``ensure_ascii``), NaN and infinities as Python's ``json`` writes them,
non-JSON values as ``str()``, circular structures refused. Without
CPython's ``_json`` accelerator the plain ``json`` functions are used.
"""

from __future__ import annotations

import json
import json.decoder
import json.encoder
import json.scanner
import re
from collections.abc import Callable
from typing import Any

# Not in typeshed (undocumented, present in CPython since 2.6); None without _json.
_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_make_scanner: Any = getattr(json.scanner, "c_make_scanner", None)
_ESCAPE: Any = getattr(json.encoder, "c_encode_basestring_ascii", None)
_WS: Any = re.compile(r"[ \t\n\r]*").match  # what json.loads skips around a document


def _slow_encode(msg: Any) -> bytes:
    return json.dumps(msg, separators=(",", ":"), default=str).encode()


def _slow_decode(body: bytes | bytearray) -> Any:
    return json.loads(body)


def _fast_encode(msg: Any) -> bytes:
    # A fresh markers dict per call, as json.dumps has: the encoder leaves
    # entries behind when it fails midway (a circular structure).
    assert _make_encoder is not None
    return "".join(_make_encoder({}, str, _ESCAPE, None, ":", ",", False, False, True)(msg, 0)).encode()


def _fast_decoder() -> Callable[[bytes | bytearray], Any]:
    assert _make_scanner is not None
    scan = _make_scanner(json.decoder.JSONDecoder())

    def decode(body: bytes | bytearray) -> Any:
        s = body.decode()  # frames are UTF-8; a bad byte is a UnicodeDecodeError (a ValueError)
        try:
            obj, end = scan(s, _WS(s, 0).end())
        except StopIteration as err:  # the scanner's "no value here" (json.loads turns it into this)
            raise json.JSONDecodeError("Expecting value", s, err.value) from None
        if end != len(s) and _WS(s, end).end() != len(s):
            raise json.JSONDecodeError("Extra data", s, end)
        return obj

    return decode


_FAST = _make_encoder is not None and _make_scanner is not None and _ESCAPE is not None

#: One message as compact JSON bytes (``json.dumps(msg, separators=(",", ":"), default=str)``).
encode: Callable[[Any], bytes] = _fast_encode if _FAST else _slow_encode
#: One JSON document from UTF-8 bytes (``json.loads``); malformed input raises ``ValueError``.
decode: Callable[[bytes | bytearray], Any] = _fast_decoder() if _FAST else _slow_decode
