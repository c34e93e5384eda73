"""An instance attached to a kernel: store, manifest, identity, options, heartbeat.

:func:`attach` is the one way to attach, used by ``%runbook start|attach``
and by the headless runner (which calls it in the kernel, then sends each
cell's id and tags in the execute_request metadata, see
:mod:`nbrunbook.kernel_ext`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nbrunbook.engine.errors import InstanceNotFound
from nbrunbook.engine.keys import CELL_ID_RE, new_instance_id, new_run_id, process_owner, validate_instance_id
from nbrunbook.engine.model import DONE, GUARDED, Instance, Manifest, ManifestCell
from nbrunbook.engine.store import DEFAULT_LEASE

from .cells import CellSpec, classify, source_hash
from .clients import Origin, current_origin
from .defaults import ON_CHANGED, OUTPUT_LIMIT, VALUE_LIMIT, WAIT_TIMEOUT
from .errors import BadOption, NotebookNotFound
from .manifest import ManifestChanges, Notebook, find_notebook, manifest_changes, read_notebook

if TYPE_CHECKING:
    from nbrunbook.engine.store import Store


@dataclass(frozen=True)
class Options:
    """How the guard behaves for one attached instance.

    ``on_changed``: what to do when a done cell's source changed since it ran:
    ``skip`` (with a warning; the notebook default), ``error`` (refuse; the
    headless default) or ``rerun`` (open a new invocation and run it).
    ``rerun_interrupted``: retry interrupted steps instead of asking for a
    decision. ``wait_timeout``: seconds to wait for a cell busy elsewhere.
    ``unordered``: create the instance without order enforcement (fixed at
    creation). The limits cap recorded outputs and each saved value, in bytes.
    ``allow_errors``: this advance goes on past failed cells (``nbrunbook run
    --allow-errors``), so a cell's order check must not wait for them.
    """

    on_changed: str = "skip"
    rerun_interrupted: bool = False
    wait_timeout: float = WAIT_TIMEOUT
    lease: float = DEFAULT_LEASE
    max_attempts: int | None = None
    unordered: bool = False
    output_limit: int = OUTPUT_LIMIT
    value_limit: int = VALUE_LIMIT
    #: ``interactive`` or ``headless`` (journaled; the runner passes headless).
    mode: str = "interactive"
    allow_errors: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, base: Options | None = None) -> Options:
        """Options from a mapping (``-`` or ``_`` in names), checked; unknown names are refused."""
        fields = {f.name for f in dataclasses.fields(cls)}
        clean: dict[str, Any] = {}
        for raw, value in (values or {}).items():
            name = str(raw).replace("-", "_")
            if name not in fields:
                raise BadOption(str(raw), f"unknown option (known: {', '.join(sorted(fields))})")
            clean[name] = value
        opts = dataclasses.replace(base or cls(), **clean)
        if opts.on_changed not in ON_CHANGED:
            raise BadOption("on_changed", f"{opts.on_changed!r} is not one of {', '.join(ON_CHANGED)}")
        if opts.mode not in ("interactive", "headless"):
            raise BadOption("mode", f"{opts.mode!r} is not interactive or headless")
        for name in ("wait_timeout", "lease"):
            if not isinstance(getattr(opts, name), (int, float)) or getattr(opts, name) <= 0:
                raise BadOption(name, "must be a positive number of seconds")
        for name in ("output_limit", "value_limit"):
            if not isinstance(getattr(opts, name), int) or getattr(opts, name) < 0:
                raise BadOption(name, "must be a number of bytes")
        if opts.max_attempts is not None and (not isinstance(opts.max_attempts, int) or opts.max_attempts < 1):
            raise BadOption("max_attempts", "must be a positive integer")
        return opts


@dataclass(frozen=True)
class Target:
    """The cell about to run, as the guard identified it."""

    cell_id: str | None
    spec: CellSpec
    live_hash: str
    label: str
    requires: tuple[str, ...] = ()
    known: bool = True  # in the pinned manifest

    @property
    def path(self) -> str | None:
        """The step path, or None for a cell that is not a step."""
        return f"cell/{self.cell_id}" if self.cell_id else None


@dataclass(frozen=True)
class _Entry:
    cell: ManifestCell
    tags: tuple[str, ...]
    spec: CellSpec


class Session:
    """One attached instance in one kernel (see module doc)."""

    def __init__(
        self,
        shell: Any,
        store: Store,
        instance: Instance,
        manifest: Manifest | None,
        notebook: Notebook | None,
        options: Options,
        *,
        run_id: str,
        owner: str,
        owns_store: bool,
        created: bool = False,
    ) -> None:
        self.shell = shell
        #: True if attaching created the instance.
        self.created = created
        self.store = store
        self.instance = instance
        self.manifest = manifest
        self.notebook = notebook
        self.options = options
        self.run_id = run_id
        self.owner = owner
        self.owns_store = owns_store
        #: Outcomes committed in the background: (future, cell label), reported at the next cell.
        self.pending: list[tuple[Future[Any], str]] = []
        # The store's error that lost one of this session's outcomes (a full disk): see guard._lost_outcome.
        self.lost_outcome: BaseException | None = None
        self.notices: set[str] = set()
        #: Client sessions (message header ``session``) that send this notebook's cells.
        self.clients: set[str] = set()
        #: Notices to show with the next cell (e.g. what changed since the instance last ran).
        self.startup_notes: list[str] = []
        #: Called before the store is released (e.g. to stop live dashboards).
        self.on_close: list[Callable[[], object]] = []
        self.last_cell: str | None = None
        self._last_index = -1
        self._requires: dict[str, tuple[str, ...]] = {}
        self._entries: dict[str, _Entry] = {}
        self._by_hash: dict[str, list[_Entry]] = {}
        self._index()

    # ----------------------------------------------------------- identity

    @property
    def instance_id(self) -> str:
        """The attached instance's id."""
        return self.instance.instance_id

    @property
    def params(self) -> dict[str, Any]:
        """The instance's (fixed) parameters."""
        return dict(self.instance.params)

    @property
    def unordered(self) -> bool:
        """True if the instance was created without order enforcement."""
        return bool(self.instance.options.get("unordered"))

    def _index(self) -> None:
        entries: dict[str, _Entry] = {}
        nb_cells = self.notebook.by_id if self.notebook else {}
        for cell in self.manifest.cells if self.manifest else []:
            nbc = nb_cells.get(cell.cell_id)
            if nbc is not None and nbc.source_hash == cell.source_hash:
                spec = nbc.spec
                tags = nbc.tags
            else:
                spec = CellSpec(kind=cell.kind, retry_safe=cell.retry_safe, name=cell.name)
                tags = ()
            entries[cell.cell_id] = _Entry(cell, tags, spec)
        self._entries = entries
        self._by_hash = {}
        for e in entries.values():
            self._by_hash.setdefault(e.cell.source_hash, []).append(e)
        self._requires = {}

    def cells(self) -> list[ManifestCell]:
        """The manifest's cells in order."""
        return list(self.manifest.cells) if self.manifest else []

    def label(self, path_or_id: str) -> str:
        """``name [id]`` for a cell path, key or id."""
        cid = path_or_id.split("/", 1)[1] if path_or_id.startswith("cell/") else path_or_id
        cid = cid.split("@", 1)[0]
        entry = self._entries.get(cid)
        if entry is None or not entry.spec.name:
            return cid
        return f"{entry.spec.name!r} [{cid}]"

    def requires(self, cell_id: str) -> tuple[str, ...]:
        """Paths of the guarded cells before this one in the manifest."""
        cached = self._requires.get(cell_id)
        if cached is None:
            entry = self._entries[cell_id]
            cached = tuple(c.path for c in self.cells() if c.kind == GUARDED and c.index < entry.cell.index)
            self._requires[cell_id] = cached
        return cached

    def retarget(self, target: Target) -> Target:
        """``target`` with its order requirements recomputed from the current manifest."""
        if target.cell_id is None or target.cell_id not in self._entries or not target.requires:
            return dataclasses.replace(target, requires=())
        return dataclasses.replace(target, requires=self.requires(target.cell_id))

    def notice_once(self, key: str) -> bool:
        """True the first time ``key`` is seen in this session."""
        if key in self.notices:
            return False
        self.notices.add(key)
        return True

    def identify(
        self, raw: str, cell_id: str | None, tags: tuple[str, ...] | None, transform: Callable[[str], str] | None
    ) -> tuple[Target | None, list[str]]:
        """Which cell this source is, with notices to show; ``None`` if it is no step at all."""
        notes = self.startup_notes
        self.startup_notes = []
        live = source_hash(raw)
        if cell_id is not None and not CELL_ID_RE.fullmatch(cell_id):
            cell_id = None  # e.g. a VS Code cell URI: not an nbformat id
        origin = current_origin(self.shell)
        entry: _Entry | None = None
        if cell_id is not None:
            entry = self._entries.get(self._step_id(cell_id))
            if entry is None and self.reload_if_changed(notes):
                entry = self._entries.get(self._step_id(cell_id))
            if entry is not None:
                cell_id = entry.cell.cell_id
                if origin.client is not None:
                    self.clients.add(origin.client)  # it sends this notebook's cells
            elif self.notebook is not None and self.notebook.derived_ids:
                # The file has no ids, so the frontend's are its own (JupyterLab makes up a uuid per
                # cell of a 4.4 notebook until it is saved): the source says which cell it is.
                entry = self._by_source(live)
                if entry is not None:
                    cell_id = entry.cell.cell_id
        else:
            entry = self._by_source(live)
            if entry is None and self.reload_if_changed(notes):
                # A notebook without ids, saved after an edit: aligned again, the edit keeps its cell's id.
                entry = self._by_source(live)
            if entry is not None:
                cell_id = entry.cell.cell_id
                if entry.spec.kind == GUARDED and self.notice_once("no-cell-ids"):
                    notes.append(
                        "this frontend sends no cell ids: cells are matched to the runbook by their source "
                        "and manifest order"
                    )
        if entry is not None:
            assert cell_id is not None
            self._last_index = entry.cell.index
            if live == entry.cell.source_hash:
                spec = entry.spec
            else:
                spec = classify(raw, tags if tags is not None else entry.tags, transform=transform)
                spec = dataclasses.replace(spec, name=entry.spec.name or spec.name)
            # --allow-errors: the runner sends the cells in order and stops at any
            # refusal, so every earlier guarded cell is done or failed by now; the
            # order check would only block on the failed ones it means to pass.
            ordered = not (self.unordered or spec.unordered or self.options.allow_errors)
            requires = self.requires(cell_id) if ordered and spec.kind == GUARDED else ()
            return Target(cell_id, spec, live, self.label(cell_id), requires), notes
        spec = classify(raw, tags or (), transform=transform)
        if self._foreign(origin):
            # A console (or any other client) on this kernel: its code is no cell of the notebook.
            if spec.kind == GUARDED and self.notice_once(f"foreign:{origin.client}"):
                where = os.path.basename(self.notebook.path) if self.notebook else f"runbook {self.instance.runbook!r}"
                notes.append(
                    f"code from another client of this kernel (a console?) is not a cell of {where}: "
                    "it runs unguarded, not as a step (said once per client)"
                )
            return None, notes
        if cell_id is not None:
            if origin.client is not None:
                self.clients.add(origin.client)
            if spec.kind == GUARDED and self.notice_once(f"unknown:{cell_id}"):
                notes.append(
                    f"cell {cell_id} is not in the pinned runbook (a new cell? save the notebook to pin it): "
                    "it is a step, without order checks"
                )
            return Target(cell_id, spec, live, cell_id, (), known=False), notes
        if spec.kind == GUARDED:
            notes.append(
                "this cell is not in the pinned runbook and the frontend sent no cell id: it ran unguarded "
                "(save the notebook and `%runbook attach` again to pin it)"
            )
            return None, notes
        return Target(None, spec, live, "cell", ()), notes

    def _step_id(self, cell_id: str) -> str:
        """The step id of a cell id the frontend sent (the file's id may stand for a derived one)."""
        return self.notebook.aliases.get(cell_id, cell_id) if self.notebook is not None else cell_id

    def _by_source(self, live: str) -> _Entry | None:
        """The manifest cell with this source hash, preferring the first after the last one run."""
        candidates = self._by_hash.get(live, [])
        later = [e for e in candidates if e.cell.index > self._last_index]
        found = later or candidates
        return found[0] if found else None

    def _foreign(self, origin: Origin) -> bool:
        """True if the request comes from a client that is not this notebook's.

        The notebook's clients: the one that attached the instance, and any
        that sent a cell of the notebook. A JupyterLab notebook whose page was
        reloaded has a new client id but says it is a notebook (``deletedCells``),
        so a new, unsaved cell typed there stays a step.
        """
        if origin.client is None or not self.clients or origin.client in self.clients:
            return False
        if origin.notebook_frontend:
            self.clients.add(origin.client)
            return False
        return True

    def reload_if_changed(self, notes: list[str]) -> bool:
        """Re-read the notebook if its file changed and pin the new manifest; True if it did."""
        nb = self.notebook
        if nb is None:
            return False
        try:
            mtime = os.stat(nb.path).st_mtime
        except OSError:
            return False
        if mtime == nb.mtime:
            return False
        previous = self.manifest
        try:
            fresh = read_notebook(
                nb.path,
                runbook=nb.runbook,
                transform=_transform(self.shell),
                pinned=previous.cells if previous else None,
            )
        except Exception as exc:  # noqa: BLE001 - keep the pinned runbook, say why once
            nb.mtime = mtime
            notes.append(f"the notebook changed but cannot be re-read ({exc}); keeping the pinned runbook")
            return False
        manifest = self.store.pin_manifest(fresh.runbook, fresh.manifest_cells(), path=fresh.path)
        if manifest.version != (previous.version if previous else 0):
            self.instance, _ = self.store.open_instance(
                fresh.runbook,
                self.instance_id,
                self.instance.params,
                manifest_version=manifest.version,
                owner=self.owner,
                run_id=self.run_id,
            )
            changes = manifest_changes(previous.cells if previous else [], manifest.cells)
            what = f": {self.describe(changes)}" if changes else ""
            notes.append(f"the notebook changed: pinned runbook manifest version {manifest.version}{what}")
        self.notebook = fresh
        self.manifest = manifest
        self._index()
        return True

    def describe(self, changes: ManifestChanges) -> str:
        """The changes by cell, with the rerun command for edited cells that already ran."""

        def rerun(cell_id: str) -> str:
            if self.options.mode == "headless":
                return f"nbrunbook rerun {self.instance_id} {cell_id}"
            return f"%runbook rerun {cell_id}"

        def done(cell_id: str) -> bool:
            try:
                state = self.store.step(self.instance_id, f"cell/{cell_id}")
            except Exception:  # noqa: BLE001 - a hint only: name the command anyway
                return True
            return state is not None and state.status == DONE

        return changes.describe(rerun, done, self.options.on_changed)

    # --------------------------------------------------------------- life

    def close(self) -> None:
        """Wait for outcomes in flight, release the store if we opened it."""
        for fn in self.on_close:
            try:
                fn()
            except Exception:  # noqa: BLE001 - closing the store matters more
                pass
        try:
            self.store.flush()
        finally:
            if self.owns_store:
                self.store.close()


def _transform(shell: Any) -> Callable[[str], str] | None:
    manager = getattr(shell, "input_transformer_manager", None)
    return getattr(manager, "transform_cell", None)


def attach(
    shell: Any,
    instance_id: str | None = None,
    *,
    store: str | os.PathLike[str] | Store | None = None,
    notebook: str | os.PathLike[str] | None = None,
    params: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | Options | None = None,
    runbook: str | None = None,
    create: bool = True,
    force_params: bool = False,
    require_notebook: bool = True,
) -> Session:
    """Attach an instance to this kernel's guard; return the session.

    ``store``: a path/URL for :func:`~nbrunbook.engine.factory.open_store` or
    an open :class:`Store` (not closed on detach); default: beside the notebook.
    ``notebook``: the runbook file (found from the kernel's session when None).
    ``params``: the instance's parameters; ``None`` means "the stored ones" on
    resume and ``{}`` for a new instance. A resume with other params raises
    ``ParamsMismatch`` unless ``force_params``. ``options``: see :class:`Options`.
    ``create=False`` refuses unknown instances (``InstanceNotFound``).
    ``require_notebook=False`` attaches with the stored manifest when no
    notebook file can be found.

    The extension is loaded if it is not yet; a previously attached instance
    is detached first.
    """
    from nbrunbook.engine.factory import default_store_path, open_store
    from nbrunbook.engine.store import Store as StoreABC

    from .extension import guard_for

    guard = guard_for(shell, load=True)
    if instance_id is not None:
        validate_instance_id(instance_id)
    opts = options if isinstance(options, Options) else Options.from_mapping(options)
    nb: Notebook | None = None
    try:
        nb_path = find_notebook(os.fspath(notebook) if notebook is not None else None, shell.user_ns)
    except NotebookNotFound:
        if require_notebook:
            raise
        nb_path = None
    if nb_path is not None:
        nb = read_notebook(nb_path, runbook=runbook, transform=_transform(shell))
    if isinstance(store, StoreABC):
        st, owns = store, False
    else:
        location = os.fspath(store) if store is not None else default_store_path(os.path.dirname(nb_path or ""))
        if store is None and nb_path is None and not os.environ.get("NBRUNBOOK_STORE"):
            location = default_store_path(os.getcwd())
        st, owns = open_store(location), True
    try:
        session = _open(shell, st, owns, nb, instance_id, params, opts, runbook, create, force_params)
    except BaseException:
        if owns:
            st.close()
        raise
    origin = current_origin(shell)
    if origin.client is not None:
        session.clients.add(origin.client)  # the client that attaches is the notebook's (or the runner)
    guard.attach(session)
    return session


def _open(
    shell: Any,
    st: Store,
    owns: bool,
    nb: Notebook | None,
    instance_id: str | None,
    params: Mapping[str, Any] | None,
    opts: Options,
    runbook: str | None,
    create: bool,
    force_params: bool,
) -> Session:
    owner = process_owner()
    run_id = new_run_id()
    iid = instance_id or new_instance_id()
    existing: Instance | None = None
    if instance_id is not None:
        try:
            existing = st.get_instance(iid)
        except InstanceNotFound:
            if not create:
                raise
    if params is None:
        params = existing.params if existing is not None else {}
    name = nb.runbook if nb is not None else (runbook or (existing.runbook if existing else None))
    if name is None:
        raise NotebookNotFound(["no notebook file and no runbook name to create the instance with"])
    before: Manifest | None = None
    if existing is not None and existing.manifest_version:
        before = st.manifest(existing.runbook, existing.manifest_version)
        known = {c.cell_id for c in before.cells}
        if nb is not None and (nb.derived_ids or any(c.cell_id not in known for c in nb.cells)):
            # No ids in the file (or new ones where the instance ran derived ids): take the ones this
            # instance runs, so an edit is an edit and not a new cell.
            nb = read_notebook(nb.path, runbook=nb.runbook, transform=_transform(shell), pinned=before.cells)
    manifest: Manifest | None = None
    if nb is not None:
        manifest = st.pin_manifest(name, nb.manifest_cells(), path=nb.path)
    instance_options: dict[str, Any] = {"unordered": True} if opts.unordered else {}
    if opts.max_attempts is not None:
        instance_options["max_attempts"] = opts.max_attempts
    instance, created = st.open_instance(
        name,
        iid,
        params,
        manifest_version=manifest.version if manifest else 0,
        owner=owner,
        run_id=run_id,
        options=instance_options,
        force_params=force_params,
    )
    if manifest is None and instance.manifest_version:
        manifest = st.manifest(instance.runbook, instance.manifest_version)
    st.append(
        iid,
        "kernel_attached",
        owner=owner,
        run_id=run_id,
        payload={
            "notebook": nb.path if nb else None,
            "manifest_version": manifest.version if manifest else 0,
            "created": created,
            "mode": opts.mode,
            "pid": os.getpid(),
        },
    )
    session = Session(
        shell, st, instance, manifest, nb, opts, run_id=run_id, owner=owner, owns_store=owns, created=created
    )
    # Interactive only: headless, an edited done cell stops the run with its own message (--on-changed).
    if (
        opts.mode == "interactive"
        and before is not None
        and manifest is not None
        and manifest.version != before.version
    ):
        changes = manifest_changes(before.cells, manifest.cells)
        if changes:
            session.startup_notes.append(
                f"the notebook changed since instance {iid} last ran (manifest version {before.version} -> "
                f"{manifest.version}): {session.describe(changes)}"
            )
    return session
