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
            unsaved[name] = f"{exc.type_name} is not JSON/Arrow data (save it with `#| runbook: save={name}:pickle`)"
        except Exception as exc:  # noqa: BLE001 - a broken __eq__ or pyarrow quirk must not fail the cell
            unsaved[name] = f"{type(exc).__name__}: {exc}"
    for spec in explicit:
        if spec.name not in user_ns:
            warnings.append(f"save={spec.name}: no variable {spec.name!r} after the cell ran")
            continue
        try:
            values[spec.name] = encode(user_ns[spec.name], name=spec.name, allow_pickle=spec.pickle, limit=limit)
        except (ValueNotSerializable, ValueTooLarge) as exc:
            warnings.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - reported, the cell's own outcome stands
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
