"""Read a notebook into runbook cells, and find which notebook a kernel runs.

The file is read with ``nbformat.reader`` (no validation pass), because
``nbformat.read`` silently *repairs* duplicate cell ids - a runbook must refuse
them instead, naming them, since the step identity is the cell id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nbrunbook.engine.errors import DuplicateCellIds
from nbrunbook.engine.keys import CELL_ID_RE
from nbrunbook.engine.model import GUARDED, ManifestCell
from nbrunbook.engine.notebook_ids import adopted_ids, assign_ids, invalid_id, missing_ids

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
    #: The ids that were derived, in cell order (all cells, markdown included).
    derived: tuple[str, ...] = ()
    #: Ids in the file that stand for the derived ids an instance uses (see ``adopted_ids``).
    aliases: dict[str, str] = field(default_factory=dict)
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
    path: str | os.PathLike[str],
    *,
    runbook: str | None = None,
    transform: Callable[[str], str] | None = None,
    pinned: Sequence[ManifestCell] | None = None,
) -> Notebook:
    """Read ``path`` into a :class:`Notebook`.

    Raises ``NotebookUnsupported`` for unreadable files and nbformat < 4, and
    ``DuplicateCellIds`` naming the ids used by several cells. Cells without
    ids (nbformat 4.4) get ids derived from their order and source
    (:mod:`nbrunbook.engine.notebook_ids`) and ``derived_ids`` is set; with
    ``pinned`` (the instance's manifest) they are aligned to it first, so
    unchanged and edited cells keep the ids the instance uses.
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
    problem = invalid_id(nb)
    if problem:
        raise NotebookUnsupported(path, f"is not a valid notebook ({problem})")
    code = [c for c in raw_cells if isinstance(c, Mapping) and c.get("cell_type") == "code"]
    derived: list[str] = []
    order = [(c.cell_id, c.source_hash) for c in sorted(pinned or (), key=lambda c: c.index)]
    if missing_ids(nb):
        # nbformat 4.4: the ids the runner and `nbrunbook upgrade` derive from the same manifest.
        derived = assign_ids(nb, order or None)
        code = [c for c in raw_cells if isinstance(c, Mapping) and c.get("cell_type") == "code"]
    ids = [str(c["id"]) for c in code]
    bad = [i for i in ids if not CELL_ID_RE.fullmatch(i)]
    if bad:
        raise NotebookUnsupported(path, f"invalid cell ids {', '.join(map(repr, bad[:5]))} (1-64 of A-Z a-z 0-9 _ -)")
    dups = [i for i in ids if ids.count(i) > 1]
    if dups:
        raise DuplicateCellIds(dups)
    aliases = adopted_ids(ids, [_source(c) for c in code], order) if order and not derived else {}
    ids = [aliases.get(i, i) for i in ids]  # a step keeps its derived id under the file's new one
    cells = []
    for index, cell in enumerate(code):
        source = _source(cell)
        meta = cell.get("metadata") or {}
        tags = tuple(str(t) for t in (meta.get("tags") or []))
        spec = classify(source, tags, fallback_name=f"cell {index + 1}", transform=transform)
        cells.append(NotebookCell(ids[index], index, source, tags, spec, source_hash(source)))
    name = runbook or os.path.splitext(os.path.basename(path))[0]
    return Notebook(path, name, cells, mtime, derived_ids=bool(derived), derived=tuple(derived), aliases=aliases)


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


def _label(cell: ManifestCell) -> str:
    return f"{cell.name!r} [{cell.cell_id}]" if cell.name and cell.name != cell.cell_id else cell.cell_id


@dataclass(frozen=True)
class ManifestChanges:
    """What changed between two pinned versions of a runbook, by cell id."""

    added: tuple[ManifestCell, ...] = ()
    edited: tuple[ManifestCell, ...] = ()
    removed: tuple[ManifestCell, ...] = ()
    moved: bool = False

    def __bool__(self) -> bool:
        return bool(self.added or self.edited or self.removed or self.moved)

    def describe(
        self, rerun: Callable[[str], str], done: Callable[[str], bool] = lambda _: True, on_changed: str = "skip"
    ) -> str:
        """``added 'x' [id]; edited ...; removed ...`` and what the person may do.

        ``rerun(cell_id)`` spells the rerun command (``%runbook rerun ID`` in a
        notebook, ``nbrunbook rerun INSTANCE ID`` headless); ``done(cell_id)``
        tells which edited cells already ran (only those need a decision);
        ``on_changed`` is the policy that applies to them (see ``Options``).
        """
        parts: list[str] = []
        if self.added:
            parts.append("added " + ", ".join(map(_label, self.added)) + " (new steps)")
        if self.edited:
            parts.append("edited " + ", ".join(map(_label, self.edited)))
        if self.removed:
            parts.append("removed " + ", ".join(map(_label, self.removed)) + " (their history stays in the journal)")
        if self.moved and not parts:
            parts.append("cells reordered")
        text = "; ".join(parts)
        ran = [c for c in self.edited if done(c.cell_id)]
        if not ran:
            return text
        if on_changed == "rerun":
            return text + ". An edited cell that already ran runs again (--on-changed rerun)"
        fate = "stops the run (--on-changed error)" if on_changed == "error" else "keeps its recorded run (shown)"
        commands = ", ".join(f"`{rerun(c.cell_id)}`" for c in ran)
        return text + f". An edited cell that already ran {fate}, not run again; to run the new code: {commands}"


def manifest_changes(old: Sequence[ManifestCell], new: Sequence[ManifestCell]) -> ManifestChanges:
    """The cells added, edited (same id, other source) and removed from ``old`` to ``new``."""
    before = {c.cell_id: c for c in old}
    after = {c.cell_id: c for c in new}
    kept_old = [c.cell_id for c in sorted(old, key=lambda c: c.index) if c.cell_id in after]
    kept_new = [c.cell_id for c in sorted(new, key=lambda c: c.index) if c.cell_id in before]
    return ManifestChanges(
        added=tuple(c for c in new if c.cell_id not in before),
        edited=tuple(c for c in new if c.cell_id in before and before[c.cell_id].source_hash != c.source_hash),
        removed=tuple(c for c in old if c.cell_id not in after),
        moved=kept_old != kept_new,
    )
