"""Cell ids for notebooks that have none (nbformat 4.4 and older 4.x).

A step's identity is its cell id. A notebook without ids gets ids derived
from the cell's position among code cells and a hash of its source - stable
as long as the notebook does not change, and identical whether the runner
derives them in memory on each run or ``nbrunbook upgrade`` writes them into
the file, so instances started before an upgrade keep their history.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from .errors import RunbookError


class NotebookError(RunbookError, ValueError):
    """The file is missing, unreadable or not a notebook this tool can use."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _source(cell: Mapping[str, Any]) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def derived_id(kind: str, index: int, source: str) -> str:
    """``c3-1a2b3c4d`` for the 4th code cell (``m`` for markdown/raw), hash of its source."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    return f"{'c' if kind == 'code' else 'm'}{index}-{digest}"


def missing_ids(nb: Mapping[str, Any]) -> int:
    """How many cells lack an id."""
    return sum(1 for c in nb.get("cells", []) if not c.get("id"))


def assign_ids(nb: dict[str, Any]) -> int:
    """Give every cell without an id its derived id (in place); returns how many were set."""
    counters = {"code": 0, "other": 0}
    taken = {str(c["id"]) for c in nb.get("cells", []) if c.get("id")}
    changed = 0
    for cell in nb.get("cells", []):
        kind = "code" if cell.get("cell_type") == "code" else "other"
        index = counters[kind]
        counters[kind] += 1
        if cell.get("id"):
            continue
        new = derived_id(kind, index, _source(cell))
        while new in taken:  # identical sources at the same index cannot happen; be safe anyway
            new += "x"
        cell["id"] = new
        taken.add(new)
        changed += 1
    if changed:
        nb["nbformat_minor"] = max(5, int(nb.get("nbformat_minor", 0)))
    return changed


def read_json(path: str) -> dict[str, Any]:
    """The notebook as raw JSON (no nbformat repair), or ``NotebookError``."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise NotebookError(path, "no such file") from None
    except IsADirectoryError:
        raise NotebookError(path, "is a directory, not a notebook") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NotebookError(path, f"cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise NotebookError(path, f"is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    # The version first: an nbformat 3 notebook keeps its cells under "worksheets".
    if isinstance(data, dict) and isinstance(data.get("nbformat"), int) and data["nbformat"] != 4:
        raise NotebookError(
            path, f"nbformat {data['nbformat']} is not supported; open and save it with Jupyter (nbformat 4)"
        )
    if not isinstance(data, dict) or "cells" not in data or not isinstance(data.get("cells"), list):
        raise NotebookError(path, "is not a Jupyter notebook (no cell list)")
    if data.get("nbformat") != 4:
        raise NotebookError(
            path, f"nbformat {data.get('nbformat')} is not supported; open and save it with Jupyter (nbformat 4)"
        )
    return data


def upgrade(path: str) -> int:
    """Write derived ids into the notebook file; returns how many cells got one.

    The only operation of nbrunbook that modifies a user's notebook. Written to
    a temporary file in the same directory and renamed over the original, so
    the notebook is never left half-written.
    """
    data = read_json(path)
    changed = assign_ids(data)
    if not changed:
        return 0
    import nbformat

    node = nbformat.from_dict(data)
    try:
        nbformat.validate(node)
    except nbformat.ValidationError as exc:
        raise NotebookError(path, f"would not be a valid notebook after the upgrade ({exc.message})") from None
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".nbrunbook-upgrade-", suffix=".ipynb", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            nbformat.write(node, fh)
        os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return changed
