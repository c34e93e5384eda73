"""A cell's saved values: recorded with its ``done``, restored when it is skipped.

Saved: the names the cell assigns at top level whose values are JSON- or
Arrow-serialisable and under the size cap, plus the names listed in
``#| runbook: save=a,b``. Never pickled unless a name is marked
``save=name:pickle``; a pickled value is unpickled only when the (current)
cell still marks it so. Modules, functions and classes are never data.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from nbrunbook.engine.errors import ValueNotSerializable, ValueTooLarge
from nbrunbook.engine.model import EncodedValue
from nbrunbook.engine.values import decode, encode

from .cells import SaveSpec
from .defaults import VALUE_LIMIT

#: Value names starting with this are the guard's own records, never user variables.
RESERVED_PREFIX = "#"


def _not_data(value: Any) -> bool:
    return inspect.ismodule(value) or inspect.isroutine(value) or inspect.isclass(value)


#: Advice for a value that is a live handle: pickle cannot carry it, a cell can rebuild it.
REBUILD = "re-create it in a cell marked `#| runbook: always` (it runs on every resume)"


def is_resource(value: Any) -> bool:
    """Whether ``value`` is a live handle - an open file, socket, lock, generator, connection, client.

    Such a value is state outside the process (a descriptor, a connection, a
    server-side session): no serialiser can save it, pickle included, so the
    advice is to rebuild it, not to pickle it. A ``close()`` method is the
    common mark of files, sockets, database connections and API clients
    (``requests.Session``, boto3, httpx, DB-API); generators and locks have
    no serialisable state either.
    """
    import io
    import socket
    import threading
    import types

    if isinstance(value, (io.IOBase, socket.socket, types.GeneratorType, types.CoroutineType)):
        return True
    if isinstance(value, (type(threading.Lock()), type(threading.RLock()), threading.Thread)):
        return True
    try:
        return callable(getattr(type(value), "close", None)) and not isinstance(value, (str, bytes, int, float))
    except Exception:  # noqa: BLE001 - a hostile __getattr__ is not a resource we can advise on
        return False


def _resource_reason(value: Any) -> str:
    t = type(value)
    return f"{t.__module__}.{t.__qualname__} is an open resource, which cannot be saved (not even pickled): {REBUILD}"


def _too_big(value: Any, limit: int) -> bool:
    """A cheap upper-bound check before paying for a full encode."""
    if isinstance(value, (str, bytes)):
        return len(value) > limit
    if isinstance(value, (list, tuple, dict, set)):
        return len(value) * 2 > limit
    return False


def collect(
    user_ns: Mapping[str, Any], names: Sequence[str], explicit: Sequence[SaveSpec], *, limit: int = VALUE_LIMIT
) -> tuple[dict[str, EncodedValue], dict[str, str], list[str]]:
    """Encode the values to save.

    Returns ``(values, unsaved, warnings)``: ``unsaved`` maps implicit names
    that are data but could not be recorded to why (shown when the cell is
    skipped later); ``warnings`` are about explicit ``save=`` names, shown now.
    """
    values: dict[str, EncodedValue] = {}
    unsaved: dict[str, str] = {}
    warnings: list[str] = []
    wanted = {s.name: s for s in explicit}
    for name in names:
        if name in wanted or name not in user_ns:
            continue
        value = user_ns[name]
        if _not_data(value):
            continue
        if _too_big(value, limit):
            unsaved[name] = f"larger than {limit} bytes"
            continue
        try:
            values[name] = encode(value, name=name, limit=limit)
        except ValueTooLarge as exc:
            unsaved[name] = f"{exc.size} bytes, over the {limit}-byte cap"
        except ValueNotSerializable as exc:
            pickle_hint = f"{exc.type_name} is not JSON/Arrow data (save it with `#| runbook: save={name}:pickle`)"
            unsaved[name] = _resource_reason(value) if is_resource(value) else pickle_hint
        except Exception as exc:  # noqa: BLE001 - a broken __eq__ or pyarrow quirk must not fail the cell
            unsaved[name] = f"{type(exc).__name__}: {exc}"
    for spec in explicit:
        if spec.name not in user_ns:
            warnings.append(f"save={spec.name}: no variable {spec.name!r} after the cell ran")
            continue
        value = user_ns[spec.name]
        try:
            values[spec.name] = encode(value, name=spec.name, allow_pickle=spec.pickle, limit=limit)
        except ValueNotSerializable as exc:
            if is_resource(value):
                # Not the generic "opt in to pickle" hint: pickling a file or a client fails or lies.
                exc = ValueNotSerializable(spec.name, exc.type_name, _resource_reason(value))
            warnings.append(str(exc))
        except ValueTooLarge as exc:
            warnings.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - pickle=True of a resource, say: same advice, the cell stands
            if is_resource(value):
                warnings.append(f"cannot record {spec.name!r}: {_resource_reason(value)}")
            else:
                warnings.append(f"save={spec.name}: {type(exc).__name__}: {exc}")
    return values, unsaved, warnings


def restore(
    user_ns: MutableMapping[str, Any], values: Mapping[str, EncodedValue], *, pickle_names: frozenset[str] = frozenset()
) -> tuple[list[str], list[str]]:
    """Put recorded values back into the namespace; ``(restored names, problems)``."""
    restored: list[str] = []
    problems: list[str] = []
    for name, value in values.items():
        if name.startswith(RESERVED_PREFIX):
            continue
        try:
            user_ns[name] = decode(value, name=name, allow_pickle=name in pickle_names)
        except ValueNotSerializable as exc:
            problems.append(f"{name} not restored: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - one bad value must not stop the others
            problems.append(f"{name} not restored: {type(exc).__name__}: {exc}")
            continue
        restored.append(name)
    return restored, problems
