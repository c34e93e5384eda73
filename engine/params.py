"""Runbook parameters, papermill-compatible (DESIGN.md §6).

``-p NAME VALUE`` values are typed the way papermill types them (``True``,
``False``, ``None``, int, float, else the string); ``-r NAME VALUE`` keeps the
string; ``-f FILE`` and ``-y YAML`` give YAML mappings. Later sources override
earlier ones in papermill's order: YAML strings, then files, then raw, then
``-p``. A ``parameters``-tagged cell gets an ``injected-parameters`` cell after
it (or at the top when there is none), in a copy of the notebook only.
"""

from __future__ import annotations

import copy
import json
import keyword
import math
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import RunbookError

INJECTED_TAG = "injected-parameters"
PARAMETERS_TAG = "parameters"
INJECTED_CELL_ID = "injected-parameters"


class BadParameter(RunbookError, ValueError):
    """A parameter cannot be used: bad name, unreadable YAML, or a value that is not plain data."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"parameter {name}: {reason}")


def resolve_type(value: str) -> Any:
    """Type a ``-p`` value exactly as papermill does."""
    if value == "True":
        return True
    if value == "False":
        return False
    if value == "None":
        return None
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def _check_name(name: str) -> str:
    if not name.isidentifier() or keyword.iskeyword(name):
        raise BadParameter(name, "not a valid Python name")
    return name


#: Deepest nesting a parameter value may have: the injected cell is Python source,
#: and CPython's parser refuses ~200 nested brackets; nobody's parameters go near 100.
MAX_DEPTH = 100
#: Most values (every list item, map key and value counted) one parameter may expand to.
#: YAML aliases share objects, so a few lines can name billions of values ("billion laughs").
MAX_VALUES = 100_000


def _check_shape(name: str, value: Any) -> None:
    """Refuse values too deep, too big once aliases are expanded, or holding text that is not Unicode.

    Iterative, with a budget: it stops at the first problem instead of
    recursing (RecursionError) or expanding an alias bomb (hours, gigabytes).
    """
    stack: list[tuple[Any, int]] = [(value, 1)]  # a flat list is one level deep
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise BadParameter(name, f"expands to more than {MAX_VALUES:,} values (YAML aliases or a cycle?)")
        if depth > MAX_DEPTH:
            raise BadParameter(name, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, str):
            _check_text(name, item)
        elif isinstance(item, dict):
            for key, sub in item.items():
                stack.append((key, depth + 1))
                stack.append((sub, depth + 1))
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend((sub, depth + 1) for sub in item)


def _check_text(name: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # A lone surrogate: undecodable bytes from argv (surrogateescape) or a "\ud800" escape in
        # YAML. It cannot be written to a notebook or a store as UTF-8.
        raise BadParameter(
            name, f"not valid Unicode text (lone surrogate {text[exc.start]!a} at position {exc.start})"
        ) from None


def _plain(name: str, value: Any) -> Any:
    """Parameters are fixed per instance and compared on resume: plain JSON data only."""
    _check_shape(name, value)
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        raise BadParameter(name, f"{value!r} cannot be a fixed parameter value (not comparable)")
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise BadParameter(
            name, f"values of type {type(value).__name__} are not plain data (use strings, numbers, lists, maps)"
        ) from None
    if json.loads(text) != value:
        raise BadParameter(name, f"{value!r} does not survive a JSON round trip (tuples? non-string keys?)")
    return value


def _yaml_mapping(text: str, source: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadParameter(source, f"not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        # PyYAML's composer recurses once per nesting level.
        raise BadParameter(source, f"nested more than {MAX_DEPTH} levels deep") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadParameter(source, f"expected a mapping of names to values, got {type(data).__name__}")
    return {str(k): v for k, v in data.items()}


def collect(
    *,
    yaml_strings: Iterable[str] = (),
    files: Iterable[str] = (),
    raw: Iterable[tuple[str, str]] = (),
    typed: Iterable[tuple[str, str]] = (),
) -> dict[str, Any]:
    """Merge parameters from every source (papermill's order) and validate them."""
    out: dict[str, Any] = {}
    for text in yaml_strings:
        out.update(_yaml_mapping(text, "-y"))
    for path in files:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise BadParameter(path, f"cannot read the parameters file ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise BadParameter(path, f"the parameters file is not UTF-8 text (byte {exc.start})") from None
        out.update(_yaml_mapping(text, path))
    for name, value in raw:
        out[name] = value
    for name, value in typed:
        out[name] = resolve_type(value)
    for k in out:
        _check_text(repr(k), k)  # before the name check, so the message can show it
    return {_check_name(k): _plain(k, v) for k, v in out.items()}


def python_source(params: Mapping[str, Any], comment: str = "Parameters") -> str:
    """The injected cell's code: one assignment per parameter, as a Python literal."""
    lines = [f"# {comment}"]
    for name, value in params.items():
        # Checked again here: parameters read back from a store become code in this cell.
        lines.append(f"{_check_name(name)} = {value!r}")
    return "\n".join(lines) + "\n"


def _tags(cell: Mapping[str, Any]) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def inject(nb: Any, params: Mapping[str, Any]) -> Any:
    """A copy of ``nb`` with the ``injected-parameters`` cell placed like papermill places it.

    An existing injected cell is replaced; else the new cell goes right after
    the first ``parameters``-tagged cell, else at the top. With no parameters,
    the notebook is returned unchanged (a copy).
    """
    import nbformat

    nb = copy.deepcopy(nb)
    if not params:
        return nb
    cell = nbformat.v4.new_code_cell(source=python_source(params))
    cell.metadata["tags"] = [INJECTED_TAG]
    cell["id"] = INJECTED_CELL_ID  # stable, so the injected cell is the same step on every resume
    cells = list(nb.cells)
    injected = next((i for i, c in enumerate(cells) if INJECTED_TAG in _tags(c)), -1)
    declared = next((i for i, c in enumerate(cells) if PARAMETERS_TAG in _tags(c)), -1)
    if injected >= 0:
        cells[injected] = cell
    elif declared >= 0:
        cells.insert(declared + 1, cell)
    else:
        cells.insert(0, cell)
    nb.cells = cells
    return nb
