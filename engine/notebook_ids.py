"""Cell ids for notebooks that have none (nbformat 4.4 and older 4.x).

A step's identity is its cell id. A notebook without ids gets ids derived
from the cell's position among code cells and a hash of its source. Alone,
that would give an edited cell (or every cell below an inserted one) a new
id, and a done step would silently run again. So when the instance already
pinned a manifest, the notebook's code cells are first *aligned* to it
(:func:`align`): a cell whose source is unchanged keeps its pinned id, and a
cell whose source changed at the same place between unchanged neighbours is
the same cell, edited - it keeps its id too, so the guard sees the edit
exactly as for a notebook with real ids. Only the rest (inserted cells) get
fresh derived ids. The runner (before the kernel starts), the kernel (on
attach and when it re-reads the file) and ``nbrunbook upgrade`` all use this
one function with the same manifest, so they agree on every id.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import RunbookError
from .keys import CELL_ID_RE

#: (cell id, source hash) of a pinned manifest's code cells, in order.
Pinned = Sequence[tuple[str, str]]
#: The shape of an id :func:`derived_id` makes (``x`` suffixes keep it unique).
DERIVED_ID_RE = re.compile(r"[cm][0-9]+-[0-9a-f]{8}x*")


class NotebookError(RunbookError, ValueError):
    """The file is missing, unreadable or not a notebook this tool can use."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _source(cell: Mapping[str, Any]) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def source_hash(source: str) -> str:
    """A stable hash of a cell's source (newlines normalised, outer whitespace ignored)."""
    text = source.replace("\r\n", "\n").strip()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def derived_id(kind: str, index: int, source: str) -> str:
    """``c3-1a2b3c4d`` for the 4th code cell (``m`` for markdown/raw), hash of its source."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    return f"{'c' if kind == 'code' else 'm'}{index}-{digest}"


def _has_id(cell: Any) -> bool:
    # An id that is present but empty or malformed is a bad id, not a missing one.
    return isinstance(cell, Mapping) and cell.get("id") is not None


def missing_ids(nb: Mapping[str, Any]) -> int:
    """How many cells have no id at all (an empty ``""`` id is invalid, not missing)."""
    return sum(1 for c in nb.get("cells", []) if isinstance(c, Mapping) and not _has_id(c))


def invalid_id(nb: Mapping[str, Any]) -> str | None:
    """What is wrong with the first cell whose id is present but invalid, or None.

    nbformat 4.5 ids are 1-64 of ``A-Z a-z 0-9 _ -``; the id names the step,
    so an empty or odd id is refused rather than replaced.
    """
    for number, cell in enumerate(nb.get("cells", []), 1):
        if not _has_id(cell):
            continue
        cid = cell["id"]
        if not isinstance(cid, str) or not CELL_ID_RE.fullmatch(cid):
            kind = cell.get("cell_type", "?")
            return f"cell {number} ({kind}) has an invalid id {cid!r}: a cell id is 1-64 characters of A-Z a-z 0-9 _ -"
    return None


def align(sources: Sequence[str], pinned: Pinned) -> list[str | None]:
    """For each code cell source, the pinned id it is (unchanged or edited in place), or None (new).

    Matching is over source hashes with ``difflib.SequenceMatcher``: equal runs
    keep their ids; a replaced run is taken as those cells edited, paired in
    order (the extra cells of a longer run are new, the missing ones removed).
    """
    new = [source_hash(s) for s in sources]
    old = [h for _, h in pinned]
    out: list[str | None] = [None] * len(new)
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag in ("equal", "replace"):
            for k in range(min(i2 - i1, j2 - j1)):
                out[j1 + k] = pinned[i1 + k][0]
    return out


def adopted_ids(ids: Sequence[str], sources: Sequence[str], pinned: Pinned) -> dict[str, str]:
    """Real ids that stand for derived ids an instance already uses: ``{file id: pinned id}``.

    A 4.4 notebook that ran, then got ids written by a tool other than
    ``nbrunbook upgrade`` (JupyterLab gives every cell a fresh uuid when it
    saves one), would otherwise look like a new notebook and run every cell
    again. When none of the file's ids is pinned, a code cell aligned (see
    :func:`align`) to a pinned cell whose id is a derived one is that cell:
    its steps keep their ids.
    """
    known = {cid for cid, _ in pinned}
    present = set(ids)
    # Only a wholesale change of ids: a notebook that shares any id with the manifest has its own
    # identity (e.g. written by `nbrunbook upgrade`), and a cell replaced in it is a new cell.
    if present & known or not any(DERIVED_ID_RE.fullmatch(c) for c in known):
        return {}
    out: dict[str, str] = {}
    for cid, match in zip(ids, align(sources, pinned), strict=True):
        if match and cid not in known and match not in present and DERIVED_ID_RE.fullmatch(match):
            out[cid] = match
    return out


def assign_ids(nb: dict[str, Any], pinned: Pinned | None = None) -> list[str]:
    """Give every cell without an id an id (in place); returns the ids set, in cell order.

    With ``pinned`` (the instance's manifest), code cells keep the pinned ids
    :func:`align` finds for them; the others get :func:`derived_id` - never an
    id that is pinned for another cell (a removed cell's history must not
    become a new cell's).
    """
    cells = [c for c in nb.get("cells", []) if isinstance(c, dict)]
    code = [c for c in cells if c.get("cell_type") == "code"]
    matched = align([_source(c) for c in code], pinned) if pinned else [None] * len(code)
    by_cell = {id(c): m for c, m in zip(code, matched, strict=True)}
    taken = {str(c["id"]) for c in cells if _has_id(c)}
    reserved = {cid for cid, _ in pinned or ()}
    counters = {"code": 0, "other": 0}
    set_ids: list[str] = []
    for cell in cells:
        kind = "code" if cell.get("cell_type") == "code" else "other"
        index = counters[kind]
        counters[kind] += 1
        if _has_id(cell):
            continue
        new = by_cell.get(id(cell))
        if new is None or new in taken:
            new = derived_id(kind, index, _source(cell))
            while new in taken or new in reserved:  # an unlikely hash/index clash; stay unique anyway
                new += "x"
        cell["id"] = new
        taken.add(new)
        set_ids.append(new)
    if set_ids:
        nb["nbformat_minor"] = max(5, int(nb.get("nbformat_minor", 0)))
    return set_ids


def pinned_cells(
    store: str, *, instance: str | None = None, runbook: str | None = None
) -> list[tuple[str, str]] | None:
    """(id, source hash) of the manifest ``instance`` runs (else ``runbook``'s latest), or None.

    Only reads: a store file that does not exist is not created (no instance
    can be in it), and an unknown instance or runbook gives None.
    """
    from .errors import InstanceNotFound
    from .factory import open_store, split_location

    _, target = split_location(store)
    if "://" not in store and not os.path.exists(target):
        return None
    st = open_store(store)
    try:
        if instance is not None:
            try:
                inst = st.get_instance(instance)
            except InstanceNotFound:
                return None
            if not inst.manifest_version:
                return None
            manifest = st.manifest(inst.runbook, inst.manifest_version)
        elif runbook is not None:
            try:
                manifest = st.manifest(runbook)
            except LookupError:
                return None
        else:
            return None
    finally:
        st.close()
    return [(c.cell_id, c.source_hash) for c in sorted(manifest.cells, key=lambda c: c.index)]


def derived_note(notebook: str, ids: Sequence[str], aligned: bool) -> str:
    """The one line that says which ids were derived and how to write real ones."""
    shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
    how = " (matched to the cells the instance pinned, so edits are found)" if aligned else ""
    return (
        f"{notebook} has no cell ids (nbformat 4.4): using ids derived from cell order and source{how} for "
        f"{len(ids)} cells ({shown}); `nbrunbook upgrade {notebook}` writes them into the file"
    )


def derive_for_run(nb: dict[str, Any], notebook: str, store: str, instance: str | None) -> str:
    """Give a notebook about to run ids where it has none (in place); the note to print, or "".

    A resumed instance's pinned manifest is read (read-only) so the ids are
    the ones it already uses, exactly as the kernel will derive them on attach.
    """
    if not missing_ids(nb):
        return ""
    pinned = None
    if instance is not None:
        from .keys import validate_instance_id

        validate_instance_id(instance)
        pinned = pinned_cells(store, instance=instance)
    return derived_note(notebook, assign_ids(nb, pinned), aligned=bool(pinned))


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
    problem = invalid_id(data)
    if problem:
        raise NotebookError(path, f"is not a valid notebook ({problem})")
    return data


def upgrade(path: str, pinned: Pinned | None = None) -> int:
    """Write ids into the notebook file; returns how many cells got one (0 if every cell had one).

    ``pinned``: the manifest the notebook's instances run (see
    :func:`pinned_cells`), so the written ids are the ones those instances
    already use and they resume the same steps. The only operation of
    nbrunbook that modifies a user's notebook. Written to a temporary file in
    the same directory and renamed over the original, so the notebook is never
    left half-written.
    """
    data = read_json(path)
    changed = len(assign_ids(data, pinned))
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
