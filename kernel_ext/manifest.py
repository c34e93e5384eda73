"""Read a notebook into runbook cells, and find which notebook a kernel runs.

The file is read with ``nbformat.reader`` (no validation pass), because
``nbformat.read`` silently *repairs* duplicate cell ids - a runbook must refuse
them instead, naming them, since the step identity is the cell id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nbrunbook.engine.errors import DuplicateCellIds
from nbrunbook.engine.keys import CELL_ID_RE
from nbrunbook.engine.model import GUARDED, ManifestCell
from nbrunbook.engine.notebook_ids import assign_ids, missing_ids

from .cells import CellSpec, classify, source_hash
from .errors import NotebookNotFound, NotebookUnsupported


@dataclass(frozen=True)
class NotebookCell:
    """A code cell of the runbook with everything the guard precomputes."""

    cell_id: str
    index: int
    source: str
    tags: tuple[str, ...]
    spec: CellSpec
    source_hash: str

    @property
    def path(self) -> str:
        """The cell's step path."""
        return f"cell/{self.cell_id}"

    def manifest_cell(self) -> ManifestCell:
        """The cell as pinned in a manifest."""
        return ManifestCell(
            cell_id=self.cell_id,
            index=self.index,
            kind=self.spec.kind,
            source_hash=self.source_hash,
            name=self.spec.name,
            retry_safe=self.spec.retry_safe,
        )


@dataclass
class Notebook:
    """A runbook notebook: its path, name and code cells."""

    path: str
    runbook: str
    cells: list[NotebookCell]
    mtime: float = 0.0
    #: True for an nbformat 4.4 notebook whose ids were derived (order + source hash).
    derived_ids: bool = False
    by_id: dict[str, NotebookCell] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.by_id = {c.cell_id: c for c in self.cells}

    def manifest_cells(self) -> list[ManifestCell]:
        """The cells to pin."""
        return [c.manifest_cell() for c in self.cells]

    @property
    def guarded(self) -> list[NotebookCell]:
        """The cells that are steps."""
        return [c for c in self.cells if c.spec.kind == GUARDED]


def _source(cell: Mapping[str, Any]) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def read_notebook(
    path: str | os.PathLike[str], *, runbook: str | None = None, transform: Callable[[str], str] | None = None
) -> Notebook:
    """Read ``path`` into a :class:`Notebook`.

    Raises ``NotebookUnsupported`` for unreadable files and nbformat < 4, and
    ``DuplicateCellIds`` naming the ids used by several cells. Cells without
    ids (nbformat 4.4) get ids derived from their order and source
    (:mod:`nbrunbook.engine.notebook_ids`) and ``derived_ids`` is set.
    """
    path = os.path.abspath(os.fspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        mtime = os.stat(path).st_mtime
    except OSError as exc:
        raise NotebookUnsupported(path, f"cannot be read ({exc.strerror or exc})") from None
    # Plain json, not nbformat: importing nbformat pulls jsonschema (seconds on
    # some installs) into the kernel, and we only need the cells, unrepaired.
    try:
        nb = json.loads(text)
    except (json.JSONDecodeError, ValueError) as exc:
        raise NotebookUnsupported(path, f"is not a notebook ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(nb, dict):
        raise NotebookUnsupported(path, "is not a notebook (not a JSON object)")
    major = nb.get("nbformat")
    if major != 4:
        raise NotebookUnsupported(
            path, f"nbformat {major} is not supported; open and save it with Jupyter (nbformat 4)"
        )
    raw_cells = nb.get("cells")
    if not isinstance(raw_cells, list):
        raise NotebookUnsupported(path, "has no cell list")
    code = [c for c in raw_cells if isinstance(c, Mapping) and c.get("cell_type") == "code"]
    derived = missing_ids(nb) > 0
    if derived:
        # nbformat 4.4: ids from order + source, the same `nbrunbook upgrade` writes.
        assign_ids(nb)
        code = [c for c in raw_cells if isinstance(c, Mapping) and c.get("cell_type") == "code"]
    ids = [str(c["id"]) for c in code]
    bad = [i for i in ids if not CELL_ID_RE.fullmatch(i)]
    if bad:
        raise NotebookUnsupported(path, f"invalid cell ids {', '.join(map(repr, bad[:5]))} (1-64 of A-Z a-z 0-9 _ -)")
    dups = [i for i in ids if ids.count(i) > 1]
    if dups:
        raise DuplicateCellIds(dups)
    cells = []
    for index, cell in enumerate(code):
        source = _source(cell)
        meta = cell.get("metadata") or {}
        tags = tuple(str(t) for t in (meta.get("tags") or []))
        spec = classify(source, tags, fallback_name=f"cell {index + 1}", transform=transform)
        cells.append(NotebookCell(str(cell["id"]), index, source, tags, spec, source_hash(source)))
    name = runbook or os.path.splitext(os.path.basename(path))[0]
    return Notebook(path, name, cells, mtime, derived_ids=derived)


def find_notebook(explicit: str | None, user_ns: Mapping[str, Any], *, cwd: str | None = None) -> str:
    """The notebook file this kernel runs.

    In order: ``explicit`` (``--notebook``), ``$JPY_SESSION_NAME`` (set by
    jupyter_server; absolute or relative to the server root, so it is also
    tried relative to the kernel's directory and by its base name), VS Code's
    ``__vsc_ipynb_file__``. Raises ``NotebookNotFound`` saying what was tried.
    """
    cwd = cwd or os.getcwd()
    tried: list[str] = []
    if explicit:
        candidate = os.path.abspath(os.path.join(cwd, os.path.expanduser(explicit)))
        if os.path.isfile(candidate):
            return candidate
        raise NotebookUnsupported(candidate, "no such file")
    session = os.environ.get("JPY_SESSION_NAME", "")
    if session:
        for candidate in (session, os.path.join(cwd, session), os.path.join(cwd, os.path.basename(session))):
            if candidate.endswith(".ipynb") and os.path.isfile(candidate):
                return os.path.abspath(candidate)
        tried.append(f"JPY_SESSION_NAME={session!r} is not a notebook file here")
    else:
        tried.append("JPY_SESSION_NAME is not set")
    vsc = user_ns.get("__vsc_ipynb_file__")
    if isinstance(vsc, str) and vsc:
        if os.path.isfile(vsc):
            return os.path.abspath(vsc)
        tried.append(f"__vsc_ipynb_file__={vsc!r} does not exist")
    else:
        tried.append("__vsc_ipynb_file__ is not set")
    raise NotebookNotFound(tried)
