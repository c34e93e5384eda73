"""Reading the notebook to run, as leniently as nbclient does.

``jupyter execute`` (nbclient) reads a notebook with ``nbformat.read``, which
*logs* a schema violation and goes on: a kernelspec without ``name``, unknown
metadata keys, a code cell without ``execution_count`` or ``outputs``, an
unknown cell type all run. It fails only where the notebook cannot be run at
all (a cell without ``source`` or ``cell_type``, a cell or ``metadata`` that is
not an object, a kernelspec that is not one) - with a traceback. nbrunbook runs
the first kind with one warning line and refuses the second kind with one
error line (exit 2). Tags decide what a cell is here (``parameters``,
``runbook:*``, ``skip-execution``), so tags that are not a list of strings are
refused too, where nbclient would read ``"skip-execution"`` as a substring, and
so are invalid cell ids (a cell id is a step's identity).
"""

from __future__ import annotations

import json
import typing as t

from .keys import CELL_ID_RE
from .notebook_ids import NotebookError


def unrunnable(raw: dict[str, t.Any]) -> str | None:
    """Why the notebook JSON cannot be run at all, or ``None``."""
    metadata = raw.get("metadata")
    if not isinstance(metadata, dict):
        return "its metadata is missing or not an object"
    spec = metadata.get("kernelspec")
    if spec is not None and not isinstance(spec, dict):
        return "metadata.kernelspec is not an object"
    for index, cell in enumerate(raw["cells"]):
        where = f"cell {index + 1}"
        if not isinstance(cell, dict):
            return f"{where} is not an object"
        if not isinstance(cell.get("cell_type"), str):
            return f"{where} has no cell_type"
        source = cell.get("source")
        if not (isinstance(source, str) or (isinstance(source, list) and all(isinstance(s, str) for s in source))):
            return f"{where} has no source (a string or a list of strings)"
        cell_meta = cell.get("metadata")
        if not isinstance(cell_meta, dict):
            return f"{where} has no metadata object"
        tags = cell_meta.get("tags", [])
        if not (isinstance(tags, list) and all(isinstance(tag, str) for tag in tags)):
            return f"{where}: metadata.tags is not a list of strings"
    return None


def read_lenient(raw: dict[str, t.Any], path: str) -> tuple[t.Any, str | None]:
    """The notebook node and nbformat's validation complaint (one line), like ``nbformat.read``.

    Raises ``NotebookError`` (exit 2) for a notebook that cannot run at all.
    """
    import nbformat

    problem = unrunnable(raw)
    if problem is not None:
        raise NotebookError(path, f"cannot be run: {problem}")
    try:
        nb = nbformat.reader.reads(json.dumps(raw))
        nb = nbformat.convert(nb, 4)
    except (nbformat.ValidationError, nbformat.reader.NotJSONError, ValueError, KeyError) as exc:
        raise NotebookError(path, f"is not a valid notebook ({_first_line(exc)})") from None
    except (AssertionError, TypeError) as exc:
        # nbformat's converters assert on what they cannot read (a non-integer nbformat_minor, say).
        why = _first_line(exc) or "nbformat could not read its version or structure"
        raise NotebookError(path, f"is not a valid notebook ({why})") from None
    bad = [c.get("id") for c in raw["cells"] if "id" in c and not _valid_id(c.get("id"))]
    if bad:
        # nbclient runs these with a warning, but here a cell id is a step's identity.
        raise NotebookError(path, f"is not a valid notebook (invalid cell ids {', '.join(map(repr, bad[:5]))})")
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as exc:
        return nb, _describe(exc)
    except (AssertionError, TypeError) as exc:  # the validator asserts on a non-integer nbformat_minor
        why = _first_line(exc) or "nbformat could not read its version"
        raise NotebookError(path, f"is not a valid notebook ({why})") from None
    return nb, None


def _valid_id(cell_id: t.Any) -> bool:
    return isinstance(cell_id, str) and CELL_ID_RE.fullmatch(cell_id) is not None


def _first_line(exc: BaseException) -> str:
    message = str(getattr(exc, "message", "") or exc)
    return message.strip().splitlines()[0] if message.strip() else type(exc).__name__


def _describe(exc: t.Any) -> str:
    """``where: what`` for a jsonschema error, on one line."""
    path = [str(p) for p in getattr(exc, "path", []) or []]
    where = ".".join(f"[{p}]" if p.isdigit() else p for p in path).replace(".[", "[")
    message = _first_line(exc)
    if len(message) > 200:
        message = message[:197] + "..."
    return f"{where}: {message}" if where else message
