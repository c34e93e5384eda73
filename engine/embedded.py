"""The embedded store: a DuckDB file owned by this process.

Every write goes through the process's one :class:`~.writer.Writer` for the
file (two ``EmbeddedStore`` objects on one path share it); reads use their own
DuckDB cursors and see committed state only. The store server uses this class
for the file it serves, with a liveness oracle fed by client connections.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from . import machine, model
from .dbfile import open_database
from .errors import (
    DuplicateCellIds,
    InstanceNotFound,
    InvalidName,
    ParamsMismatch,
    RunbookMismatch,
    RunbookNotFound,
    StepNotFound,
    ValueNotSerializable,
)
from .keys import parse_owner, process_owner, split_step_key, validate_instance_id
from .machine import GONE, LIVE, UNKNOWN
from .store import DECISIONS, DEFAULT_LEASE, DEFAULT_MAX_ATTEMPTS, INTERRUPT_REQUESTED, TRANSITION_EVENTS, Store
from .valuecache import ValueCache
from .writer import _CURSOR_COLS, DEFAULT_LINGER, Batch, Deferred, InstanceState, Writer, dumps

_EVENT_COLS = "seq, step_key, event, invocation, attempt, epoch, owner, run_id, ts, payload"


class LocalLiveness:
    """Liveness on one machine without a server: this process's owner is live;
    an owner whose process is gone (same host, PID not running) is gone; any
    other owner is unknown and only its lease decides."""

    def __init__(self) -> None:
        self._gone: set[str] = set()
        self._host = socket.gethostname()

    def mark_gone(self, owner: str) -> None:
        """Treat ``owner`` as gone from now on."""
        self._gone.add(owner)

    def owner_state(self, owner: str) -> str:
        """See :class:`~.machine.Liveness`."""
        if owner in self._gone:
            return GONE
        if owner == process_owner():
            return LIVE
        parsed = parse_owner(owner)
        if parsed is None or parsed[1] != self._host:
            return UNKNOWN
        pid = parsed[2]
        if pid == os.getpid():
            return GONE  # our PID, another boot nonce: an earlier process that died
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return GONE
        except PermissionError:
            return UNKNOWN
        return UNKNOWN  # running, but maybe a reused PID: let the lease decide


def _json_params(params: Mapping[str, Any]) -> dict[str, Any]:
    try:
        text = json.dumps(dict(params), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueNotSerializable("parameters", type(exc).__name__, str(exc)) from None
    result: dict[str, Any] = json.loads(text)
    return result


def manifest_hash(cells: Sequence[model.ManifestCell]) -> str:
    """A stable hash of a manifest's cells."""
    text = json.dumps([c.to_dict() for c in cells], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _event_from_row(instance_id: str, r: Sequence[Any]) -> model.Event:
    return model.Event(instance_id, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], json.loads(r[9]))


def _state_from_row(r: Sequence[Any]) -> model.StepState:
    return model.StepState(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[10], r[11], r[12])


class _Core:
    """One open file per process: connection, writer, readers, subscribers."""

    def __init__(self, path: str, clock: Callable[[], float], liveness: machine.Liveness, linger: float) -> None:
        self.path = path
        self.pid = os.getpid()
        self.refs = 0
        self.clock = clock
        self.liveness = liveness
        self.con = open_database(path)
        self._reader_root = self.con.cursor()
        self._readers: list[Any] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        self.changed = threading.Condition()
        self.generation = 0
        self._subs: dict[str, list[_Subscription]] = {}
        self._sub_lock = threading.Lock()
        self._dispatch: list[Any] = []
        self._dispatch_cv = threading.Condition()
        self._dispatcher: threading.Thread | None = None
        self.values_cache = ValueCache()
        self.writer = Writer(self.con, path, clock=clock, linger=linger, on_commit=self._committed)
        self.closed = False
        # Fire-and-forget outcomes must reach the file even if the program
        # forgets to close the store.
        atexit.register(self.close)

    def reader(self) -> Any:
        cur = getattr(self._local, "cur", None)
        if cur is None:
            with self._lock:
                cur = self._reader_root.cursor()
                self._readers.append(cur)
            self._local.cur = cur
        return cur

    def _committed(self, batch: Batch) -> None:
        """After each group commit (writer thread): cache its values, wake waiters, feed subscribers."""
        if batch.values:
            by_step: dict[tuple[str, str], dict[str, model.EncodedValue]] = {}
            for iid, key, name, encoding, data in batch.values:
                by_step.setdefault((iid, key), {})[name] = model.EncodedValue(encoding, data)
            for (iid, key), values in by_step.items():
                self.values_cache.put(iid, key, values)
        events = batch.events
        with self.changed:
            self.generation += 1
            self.changed.notify_all()
        if events and self._subs:
            with self._dispatch_cv:
                self._dispatch.append(("events", events))
                self._dispatch_cv.notify()

    # ------------------------------------------------------ subscriptions

    def subscribe(self, sub: _Subscription) -> None:
        # Registered at once, so every commit from now on is queued for the
        # dispatcher (behind the "add" below); it delivers to the subscription
        # only once the backlog went out, and the seq filter drops repeats.
        with self._sub_lock:
            self._subs.setdefault(sub.instance_id, []).append(sub)
        with self._dispatch_cv:
            if self._dispatcher is None:
                self._dispatcher = threading.Thread(target=self._dispatch_loop, name="nbrunbook-dispatch", daemon=True)
                self._dispatcher.start()
            self._dispatch.append(("add", sub))
            self._dispatch_cv.notify()

    def unsubscribe(self, sub: _Subscription) -> None:
        with self._sub_lock:
            subs = self._subs.get(sub.instance_id, [])
            if sub in subs:
                subs.remove(sub)

    def _dispatch_loop(self) -> None:
        while True:
            with self._dispatch_cv:
                while not self._dispatch:
                    self._dispatch_cv.wait()
                item = self._dispatch.pop(0)
            kind, data = item
            if kind == "stop":
                return
            if kind == "add":
                sub: _Subscription = data
                # Events committed before this read are in the backlog; later ones
                # are queued behind this item (the subscription was registered
                # before it was queued), so nothing is lost or delivered twice.
                backlog = _read_journal(self.reader(), sub.instance_id, sub.last_seq, None)
                sub.deliver(backlog)
                sub.ready = True
                continue
            by_instance: dict[str, list[model.Event]] = {}
            for iid, ev in data:
                by_instance.setdefault(iid, []).append(ev)
            for iid, evs in by_instance.items():
                with self._sub_lock:
                    subs = list(self._subs.get(iid, []))
                for s in subs:
                    if s.ready:
                        s.deliver(evs)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        self.writer.close()
        with self._dispatch_cv:
            if self._dispatcher is not None:
                self._dispatch.append(("stop", None))
                self._dispatch_cv.notify()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=5)
        with self._lock:
            for cur in self._readers:
                try:
                    cur.close()
                except Exception:  # noqa: BLE001 - closing anyway
                    pass
            self._reader_root.close()
        self.con.close()


class _Subscription:
    def __init__(self, instance_id: str, callback: Callable[[list[model.Event]], None], since_seq: int) -> None:
        self.instance_id = instance_id
        self.callback = callback
        self.last_seq = since_seq
        self.ready = False  # set by the dispatcher once the backlog is delivered

    def deliver(self, events: list[model.Event]) -> None:
        fresh = [e for e in events if e.seq > self.last_seq]
        if not fresh:
            return
        self.last_seq = fresh[-1].seq
        try:
            self.callback(fresh)
        except Exception:  # noqa: BLE001 - a broken subscriber must not stop the others
            pass


_CORES: dict[str, _Core] = {}
_CORES_LOCK = threading.Lock()


def _read_journal(cur: Any, instance_id: str, since_seq: int, limit: int | None) -> list[model.Event]:
    sql = f"SELECT {_EVENT_COLS} FROM journal WHERE instance_id = ? AND seq > ? ORDER BY seq"
    params: list[Any] = [instance_id, since_seq]
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    return [_event_from_row(instance_id, r) for r in cur.execute(sql, params).fetchall()]


class EmbeddedStore(Store):
    """A store backed by a DuckDB file opened in this process (see module doc)."""

    def __init__(
        self,
        path: str,
        *,
        clock: Callable[[], float] = time.time,
        liveness: machine.Liveness | None = None,
        linger: float = DEFAULT_LINGER,
    ) -> None:
        self.location = os.path.abspath(path)
        key = os.path.realpath(self.location)
        with _CORES_LOCK:
            core = _CORES.get(key)
            if core is None or core.pid != os.getpid():
                core = _Core(key, clock, liveness or LocalLiveness(), linger)
                _CORES[key] = core
            core.refs += 1
        self._core = core
        self._writer = core.writer
        self._closed = False

    @property
    def liveness(self) -> machine.Liveness:
        """The liveness oracle deciding whether a holder is gone."""
        return self._core.liveness

    @property
    def writer(self) -> Writer:
        """The process's writer for this file (benchmarks read its counters)."""
        return self._writer

    # --------------------------------------------------------------- runbooks

    def pin_manifest(self, runbook: str, cells: Sequence[model.ManifestCell], *, path: str = "") -> model.Manifest:
        if not runbook or len(runbook) > 256 or any(ord(c) < 32 for c in runbook):
            raise InvalidName("runbook name", runbook, "use 1-256 printable characters")
        cells = list(cells)
        ids = [c.cell_id for c in cells]
        dups = [i for i in ids if ids.count(i) > 1]
        if dups:
            raise DuplicateCellIds(dups)
        digest = manifest_hash(cells)

        def op(batch: Batch) -> model.Manifest:
            w = self._writer
            head = w.manifest_heads.get(runbook)
            if head is None:
                row = w.con.execute(
                    "SELECT version, hash, created_at, path FROM manifests WHERE runbook = ? "
                    "ORDER BY version DESC LIMIT 1",
                    [runbook],
                ).fetchone()
                head = (row[0], row[1], row[2], row[3]) if row else (0, "", 0.0, "")
            if head[1] == digest:
                return model.Manifest(runbook, head[0], digest, cells, head[2], head[3])
            version = head[0] + 1
            if version == 1:
                batch.add_sql("INSERT INTO runbooks VALUES (?, ?)", [runbook, batch.now])
            batch.add_sql(
                "INSERT INTO manifests VALUES (?, ?, ?, ?, ?, ?)",
                [runbook, version, digest, dumps([c.to_dict() for c in cells]), path, batch.now],
            )
            previous = w.manifest_heads.get(runbook)
            w.manifest_heads[runbook] = (version, digest, batch.now, path)

            def undo() -> None:
                if previous is None:
                    w.manifest_heads.pop(runbook, None)
                else:
                    w.manifest_heads[runbook] = previous

            batch.undo.append(undo)
            return model.Manifest(runbook, version, digest, cells, batch.now, path)

        result: model.Manifest = self._writer.call(op)
        return result

    def manifest(self, runbook: str, version: int | None = None) -> model.Manifest:
        cur = self._core.reader()
        if version is None:
            row = cur.execute(
                "SELECT version, hash, cells, path, created_at FROM manifests WHERE runbook = ? "
                "ORDER BY version DESC LIMIT 1",
                [runbook],
            ).fetchone()
        else:
            row = cur.execute(
                "SELECT version, hash, cells, path, created_at FROM manifests WHERE runbook = ? AND version = ?",
                [runbook, version],
            ).fetchone()
        if row is None:
            raise RunbookNotFound(runbook, version)
        cells = [model.ManifestCell.from_dict(c) for c in json.loads(row[2])]
        return model.Manifest(runbook, row[0], row[1], cells, row[4], row[3])

    # -------------------------------------------------------------- instances

    def open_instance(
        self,
        runbook: str,
        instance_id: str,
        params: Mapping[str, Any],
        *,
        manifest_version: int,
        owner: str,
        run_id: str,
        options: Mapping[str, Any] | None = None,
        force_params: bool = False,
    ) -> tuple[model.Instance, bool]:
        validate_instance_id(instance_id)
        clean = _json_params(params)
        opts = _json_params(options or {})

        def op(batch: Batch) -> tuple[model.Instance, bool]:
            w = self._writer
            try:
                st: InstanceState | None = w.state(instance_id)
            except InstanceNotFound:
                st = None
            if st is None:
                has_manifest = w.con.execute(
                    "SELECT 1 FROM manifests WHERE runbook = ? AND version = ?", [runbook, manifest_version]
                ).fetchone()
                if not has_manifest and manifest_version != 0:
                    raise RunbookNotFound(runbook, manifest_version)
                inst = model.Instance(instance_id, runbook, manifest_version, clean, opts, batch.now, owner)
                batch.add_sql(
                    "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [instance_id, runbook, manifest_version, dumps(clean), dumps(opts), batch.now, owner],
                )
                st = InstanceState(inst, 1, {}, {})
                w.add_state(batch, st)
                batch.add_event(
                    st,
                    machine.NewEvent(
                        None,
                        "instance_created",
                        None,
                        None,
                        None,
                        owner,
                        run_id,
                        {"runbook": runbook, "params": clean, "manifest_version": manifest_version, "options": opts},
                    ),
                )
                return inst, True
            inst = st.instance
            if inst.runbook != runbook:
                raise RunbookMismatch(instance_id, inst.runbook, runbook)
            if inst.params != clean:
                if not force_params:
                    raise ParamsMismatch(instance_id, inst.params, clean)
                batch.add_sql("UPDATE instances SET params = ? WHERE instance_id = ?", [dumps(clean), instance_id])
                batch.add_event(
                    st,
                    machine.NewEvent(
                        None,
                        "params_forced",
                        None,
                        None,
                        None,
                        owner,
                        run_id,
                        {"previous": inst.params, "params": clean},
                    ),
                )
                inst = model.Instance(**{**inst.to_dict(), "params": clean})
                w.replace_instance(batch, st, inst)
            if manifest_version and inst.manifest_version != manifest_version:
                batch.add_sql(
                    "UPDATE instances SET manifest_version = ? WHERE instance_id = ?", [manifest_version, instance_id]
                )
                batch.add_event(
                    st,
                    machine.NewEvent(
                        None,
                        "manifest_pinned",
                        None,
                        None,
                        None,
                        owner,
                        run_id,
                        {"version": manifest_version, "previous": inst.manifest_version},
                    ),
                )
                inst = model.Instance(**{**inst.to_dict(), "manifest_version": manifest_version})
                w.replace_instance(batch, st, inst)
            return inst, False

        result: tuple[model.Instance, bool] = self._writer.call(op)
        return result

    def get_instance(self, instance_id: str) -> model.Instance:
        row = (
            self._core.reader()
            .execute(
                "SELECT instance_id, runbook, manifest_version, params, options, created_at, created_by "
                "FROM instances WHERE instance_id = ?",
                [instance_id],
            )
            .fetchone()
        )
        if row is None:
            raise InstanceNotFound(instance_id)
        return model.Instance(row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4]), row[5], row[6])

    # ------------------------------------------------------------------ steps

    def claim(
        self,
        instance_id: str,
        path: str,
        *,
        owner: str,
        run_id: str,
        token: str | None = None,
        lease: float = DEFAULT_LEASE,
        retry_safe: bool = False,
        rerun_interrupted: bool = False,
        requires: Sequence[str] = (),
        max_attempts: int | None = None,
        with_values: bool = False,
    ) -> model.Claim:
        settled = self.settled_claim(instance_id, path, max_attempts=max_attempts, with_values=with_values)
        if settled is not None:
            return settled
        result = self.submit_claim(
            instance_id,
            path,
            owner=owner,
            run_id=run_id,
            token=token,
            lease=lease,
            retry_safe=retry_safe,
            rerun_interrupted=rerun_interrupted,
            requires=requires,
            max_attempts=max_attempts,
        ).result()
        return self.with_values(result) if with_values else result

    def submit_claim(
        self,
        instance_id: str,
        path: str,
        *,
        owner: str,
        run_id: str,
        token: str | None = None,
        lease: float = DEFAULT_LEASE,
        retry_safe: bool = False,
        rerun_interrupted: bool = False,
        requires: Sequence[str] = (),
        max_attempts: int | None = None,
    ) -> Future[model.Claim]:
        """Queue :meth:`claim` in the writer and return its future at once (no settled check, no values).

        The future resolves in the writer thread right after the group's
        commit, so a callback on it runs there: the store server answers a
        claim from that callback without waking a thread per claim. A caller
        that wants a done step's values adds them with :meth:`with_values`
        on its own thread (they are a read, never work for the writer).
        """
        liveness = self._core.liveness

        def op(batch: Batch) -> model.Claim:
            st = self._writer.state(instance_id)
            limit = max_attempts or int(st.instance.options.get("max_attempts", DEFAULT_MAX_ATTEMPTS))

            def finished(p: str) -> bool:
                r = st.rows.get(p)
                return r is not None and r.status in model.FINISHED

            tr = machine.claim(
                st.rows.get(path),
                path=path,
                owner=owner,
                run_id=run_id,
                token=token,
                lease=lease,
                retry_safe=retry_safe,
                rerun_interrupted=rerun_interrupted,
                requires=requires,
                is_finished=finished,
                max_attempts=limit,
                now=batch.now,
                liveness=liveness,
            )
            batch.apply(st, tr)
            assert tr.row is not None and tr.outcome is not None
            return model.Claim(tr.outcome, tr.row.to_state(instance_id), tr.missing, limit)

        fut: Future[model.Claim] = self._writer.submit(op)
        return fut

    def with_values(self, claim: model.Claim) -> model.Claim:
        """``claim`` carrying the values of the done step it found (other claims unchanged)."""
        if claim.outcome is not model.ClaimOutcome.DONE or claim.state.status != model.DONE:
            return claim
        # The done it found committed (with its values) before this answer:
        # a reader sees them, and the writer thread does no extra work.
        return dataclasses.replace(claim, values=self.values(claim.state.instance_id, claim.step_key))

    def settled_claim(
        self, instance_id: str, path: str, *, max_attempts: int | None = None, with_values: bool = False
    ) -> model.Claim | None:
        """The answer to a claim of a step committed as finished, found without the writer; else ``None``.

        Such a claim writes nothing: the writer would answer ``DONE`` from the
        same committed row (a finished step stays finished until a rerun or a
        resolve commits; this answer is ordered before any still in flight).
        Skipping a done cell thus costs no hand-over to the writer thread and
        no wait behind a group commit. Rows not yet loaded, or changed and not
        yet committed, take the writer's path.
        """
        st = self._writer.states.get(instance_id)
        if st is None:
            return None
        row = st.persisted.get(path)  # the committed row: replaced on commit, never mutated
        if row is None or row.status not in model.FINISHED:
            return None
        limit = max_attempts or int(st.instance.options.get("max_attempts", DEFAULT_MAX_ATTEMPTS))
        claim = model.Claim(model.ClaimOutcome.DONE, row.to_state(instance_id), [], limit)
        return self.with_values(claim) if with_values else claim

    def claim_many(
        self,
        instance_id: str,
        paths: Sequence[str],
        *,
        owner: str,
        run_id: str,
        token: str | None = None,
        lease: float = DEFAULT_LEASE,
        retry_safe: bool = False,
        rerun_interrupted: bool = False,
        max_attempts: int | None = None,
    ) -> list[model.Claim]:
        paths = list(paths)
        if len(set(paths)) != len(paths):
            raise InvalidName("step paths", ", ".join(sorted({p for p in paths if paths.count(p) > 1})), "listed twice")
        liveness = self._core.liveness

        def op(batch: Batch) -> list[model.Claim]:
            st = self._writer.state(instance_id)
            limit = max_attempts or int(st.instance.options.get("max_attempts", DEFAULT_MAX_ATTEMPTS))
            out = []
            for path in paths:
                tr = machine.claim(
                    st.rows.get(path),
                    path=path,
                    owner=owner,
                    run_id=run_id,
                    token=token,
                    lease=lease,
                    retry_safe=retry_safe,
                    rerun_interrupted=rerun_interrupted,
                    requires=(),
                    is_finished=lambda p: True,
                    max_attempts=limit,
                    now=batch.now,
                    liveness=liveness,
                )
                batch.apply(st, tr)
                assert tr.row is not None and tr.outcome is not None
                out.append(model.Claim(tr.outcome, tr.row.to_state(instance_id), tr.missing, limit))
            return out

        result: list[model.Claim] = self._writer.call(op)
        return result

    def renew(
        self, instance_id: str, step_key: str, *, owner: str, epoch: int, lease: float = DEFAULT_LEASE
    ) -> model.StepState:
        path, invocation = split_step_key(step_key)

        def op(batch: Batch) -> Any:
            st = self._writer.state(instance_id)
            tr = machine.renew(
                instance_id,
                st.rows.get(path),
                path=path,
                invocation=invocation,
                owner=owner,
                epoch=epoch,
                lease=lease,
                now=batch.now,
            )
            if tr.error is not None:
                raise tr.error
            batch.apply(st, tr)
            assert tr.row is not None
            return tr.row.to_state(instance_id)

        result: model.StepState = self._writer.call(op)
        return result

    def _finish(
        self,
        instance_id: str,
        step_key: str,
        status: str,
        owner: str,
        epoch: int,
        run_id: str,
        payload: Mapping[str, Any],
        values: Mapping[str, model.EncodedValue] | None,
        wait: bool,
    ) -> model.StepState | Future[model.StepState]:
        path, invocation = split_step_key(step_key)
        payload = dict(payload)

        def op(batch: Batch) -> Any:
            st = self._writer.state(instance_id)
            tr = machine.finish(
                instance_id,
                st.rows.get(path),
                path=path,
                invocation=invocation,
                owner=owner,
                epoch=epoch,
                run_id=run_id,
                status=status,
                payload=payload,
                now=batch.now,
            )
            batch.apply(st, tr)
            if tr.error is not None:
                if isinstance(tr.error, StepNotFound):
                    raise tr.error
                return Deferred(tr.error)
            if tr.changed and values:
                for name, v in values.items():
                    batch.values.append((instance_id, step_key, name, v.encoding, v.data))
            assert tr.row is not None
            return tr.row.to_state(instance_id)

        fut = self._writer.submit(op, sync=wait)
        if wait:
            result: model.StepState = fut.result()
            return result
        return fut

    def complete(
        self,
        instance_id: str,
        step_key: str,
        *,
        owner: str,
        epoch: int,
        run_id: str,
        payload: Mapping[str, Any] | None = None,
        values: Mapping[str, model.EncodedValue] | None = None,
        wait: bool = True,
    ) -> model.StepState | Future[model.StepState]:
        return self._finish(instance_id, step_key, model.DONE, owner, epoch, run_id, payload or {}, values, wait)

    def fail(
        self,
        instance_id: str,
        step_key: str,
        *,
        owner: str,
        epoch: int,
        run_id: str,
        error: Mapping[str, Any],
        wait: bool = True,
        interrupted: bool = False,
    ) -> model.StepState | Future[model.StepState]:
        if interrupted:
            payload = {"error": dict(error), "reason": INTERRUPT_REQUESTED}
            return self._finish(instance_id, step_key, model.INTERRUPTED, owner, epoch, run_id, payload, None, wait)
        return self._finish(
            instance_id, step_key, model.FAILED, owner, epoch, run_id, {"error": dict(error)}, None, wait
        )

    def _path_of(self, path_or_key: str) -> str:
        if "@" in path_or_key.rsplit("/", 1)[-1]:
            return split_step_key(path_or_key)[0]
        return path_or_key

    def rerun(self, instance_id: str, path: str, *, owner: str, run_id: str, reason: str = "") -> model.StepState:
        path = self._path_of(path)
        liveness = self._core.liveness

        def op(batch: Batch) -> Any:
            st = self._writer.state(instance_id)
            tr = machine.rerun(
                instance_id,
                st.rows.get(path),
                path=path,
                owner=owner,
                run_id=run_id,
                reason=reason,
                now=batch.now,
                liveness=liveness,
            )
            batch.apply(st, tr)
            if tr.error is not None:
                if not tr.events:
                    raise tr.error
                return Deferred(tr.error)
            assert tr.row is not None
            return tr.row.to_state(instance_id)

        result: model.StepState = self._writer.call(op)
        return result

    def resolve(
        self, instance_id: str, path: str, decision: str, *, owner: str, run_id: str, note: str = ""
    ) -> model.StepState:
        if decision not in DECISIONS:
            raise InvalidName("decision", decision, "use rerun, done or skip")
        path = self._path_of(path)
        liveness = self._core.liveness

        def op(batch: Batch) -> Any:
            st = self._writer.state(instance_id)
            tr = machine.resolve(
                instance_id,
                st.rows.get(path),
                path=path,
                decision=decision,
                owner=owner,
                run_id=run_id,
                note=note,
                now=batch.now,
                liveness=liveness,
            )
            batch.apply(st, tr)
            if tr.error is not None:
                if not tr.events:
                    raise tr.error
                return Deferred(tr.error)
            assert tr.row is not None
            if decision == "rerun":
                self._rerun_interrupted_branches(batch, st, tr.row.key, owner=owner, run_id=run_id)
            return tr.row.to_state(instance_id)

        result: model.StepState = self._writer.call(op)
        return result

    def _rerun_interrupted_branches(
        self, batch: Batch, st: InstanceState, key: str, *, owner: str, run_id: str
    ) -> None:
        # A person who reruns a cell decides for the branches it left interrupted
        # too: otherwise the cell's next attempt would find them refusing to run
        # and fail. Each gets its own journaled decision; a branch still held by a
        # live owner is left alone (machine.resolve refuses it).
        prefix = key + "/"
        below = sorted(
            (
                r
                for r in st.rows.values()
                if r.path.startswith(prefix) and r.status in (model.INTERRUPTED, model.RUNNING)
            ),
            key=lambda r: r.path,
        )
        for row in below:
            tr = machine.resolve(
                st.instance.instance_id,
                row,
                path=row.path,
                decision="rerun",
                owner=owner,
                run_id=run_id,
                note=f"with its cell {key}",
                now=batch.now,
                liveness=self._core.liveness,
            )
            if tr.error is None:
                batch.apply(st, tr)

    def release_owner(
        self, owner: str, *, reason: str, run_id: str | None = None, unless_live: bool = False
    ) -> list[model.StepState]:
        """See :meth:`Store.release_owner`.

        ``unless_live`` (used by the store server): decide inside the writer,
        ordered with every other write, and do nothing if the liveness oracle
        says the owner is live again by then (it reconnected meanwhile).
        """
        liveness = self._core.liveness

        def op(batch: Batch) -> list[model.StepState]:
            w = self._writer
            if unless_live and liveness.owner_state(owner) == LIVE:
                return []
            held = w.con.execute(
                "SELECT DISTINCT instance_id FROM cursor WHERE owner = ? AND status = 'running'", [owner]
            ).fetchall()
            ids = {r[0] for r in held}
            # Rows claimed but not yet committed are only in memory: look there too.
            ids.update(
                iid
                for iid, st in w.states.items()
                if any(r.owner == owner and r.status == model.RUNNING for r in st.rows.values())
            )
            changed: list[model.StepState] = []
            for iid in sorted(ids):
                st = w.state(iid)
                for row in list(st.rows.values()):
                    if row.owner == owner and row.status == model.RUNNING:
                        tr = machine.release(row, reason=reason, run_id=run_id, now=batch.now)
                        batch.apply(st, tr)
                        assert tr.row is not None
                        changed.append(tr.row.to_state(iid))
            return changed

        result: list[model.StepState] = self._writer.call(op)
        return result

    def running_owners(self) -> list[str]:
        """Owners holding ``running`` steps in the file (the store server gives them a grace period)."""
        rows = (
            self._core.reader()
            .execute("SELECT DISTINCT owner FROM cursor WHERE status = 'running' AND owner IS NOT NULL ORDER BY owner")
            .fetchall()
        )
        return [r[0] for r in rows]

    def append(
        self,
        instance_id: str,
        event: str,
        *,
        owner: str,
        run_id: str,
        step_key: str | None = None,
        payload: Mapping[str, Any] | None = None,
        once: bool = False,
    ) -> model.Event:
        if event in TRANSITION_EVENTS:
            raise InvalidName("event", event, "state-transition events are written by the store itself")
        if not event or len(event) > 64:
            raise InvalidName("event", event, "use 1-64 characters")
        body = json.loads(dumps(dict(payload or {})))
        invocation = split_step_key(step_key)[1] if step_key else None

        def op(batch: Batch) -> model.Event:
            st = self._writer.state(instance_id)
            if once:
                prior = st.once.get((event, step_key))
                if prior is not None:
                    return prior
            ev = batch.add_event(st, machine.NewEvent(step_key, event, invocation, None, None, owner, run_id, body))
            if once:
                st.once[(event, step_key)] = ev
                batch.undo.append(lambda: st.once.pop((event, step_key), None))
            return ev

        result: model.Event = self._writer.call(op)
        return result

    # ------------------------------------------------------------------ reads

    def step(self, instance_id: str, path: str) -> model.StepState | None:
        row = (
            self._core.reader()
            .execute(f"SELECT {_CURSOR_COLS} FROM cursor WHERE instance_id = ? AND path = ?", [instance_id, path])
            .fetchone()
        )
        return _state_from_row(row) if row else None

    def steps(self, instance_id: str, *, parent: str | None = None) -> list[model.StepState]:
        cur = self._core.reader()
        if parent is None:
            rows = cur.execute(
                f"SELECT {_CURSOR_COLS} FROM cursor WHERE instance_id = ? ORDER BY path", [instance_id]
            ).fetchall()
        else:
            rows = cur.execute(
                f"SELECT {_CURSOR_COLS} FROM cursor WHERE instance_id = ? AND parent = ? ORDER BY path",
                [instance_id, parent],
            ).fetchall()
        return [_state_from_row(r) for r in rows]

    def instance_status(self, instance_id: str) -> model.InstanceStatus:
        cur = self._core.reader()
        cur.execute("BEGIN TRANSACTION")  # one snapshot for all reads below
        try:
            inst = self.get_instance(instance_id)
            manifest = None
            if inst.manifest_version:
                manifest = self.manifest(inst.runbook, inst.manifest_version)
            steps = [
                _state_from_row(r)
                for r in cur.execute(
                    f"SELECT {_CURSOR_COLS} FROM cursor WHERE instance_id = ? AND parent IS NULL", [instance_id]
                ).fetchall()
            ]
            seq = cur.execute("SELECT max(seq) FROM journal WHERE instance_id = ?", [instance_id]).fetchone()
        finally:
            cur.execute("COMMIT")
        partial = model.InstanceStatus(inst, manifest, steps, (seq[0] or 0) if seq else 0, "")
        return model.InstanceStatus(inst, manifest, steps, partial.last_seq, model.derive_status(partial.counts()))

    def journal(self, instance_id: str, since_seq: int = 0, limit: int | None = None) -> list[model.Event]:
        return _read_journal(self._core.reader(), instance_id, since_seq, limit)

    def instances(self, *, runbook: str | None = None, status: str | None = None) -> list[model.InstanceSummary]:
        cur = self._core.reader()
        cur.execute("BEGIN TRANSACTION")
        try:
            sql = "SELECT instance_id, runbook, manifest_version, created_at FROM instances"
            params: list[Any] = []
            if runbook is not None:
                sql += " WHERE runbook = ?"
                params.append(runbook)
            inst_rows = cur.execute(sql + " ORDER BY created_at DESC, instance_id DESC", params).fetchall()
            cell_rows = cur.execute("SELECT instance_id, path, status FROM cursor WHERE parent IS NULL").fetchall()
            manifests = {
                (r[0], r[1]): [model.ManifestCell.from_dict(c) for c in json.loads(r[2])]
                for r in cur.execute("SELECT runbook, version, cells FROM manifests").fetchall()
            }
        finally:
            cur.execute("COMMIT")
        by_instance: dict[str, dict[str, str]] = {}
        for iid, path, st in cell_rows:
            by_instance.setdefault(iid, {})[path] = st
        out = []
        for iid, rb, version, created in inst_rows:
            cells = manifests.get((rb, version), [])
            statuses = by_instance.get(iid, {})
            counts = {s: 0 for s in model.STATUSES}
            total = 0
            for c in cells:
                if c.kind != model.GUARDED:
                    continue
                total += 1
                counts[statuses.get(c.path, model.PENDING)] += 1
            counts["total"] = total
            derived = model.derive_status(counts)
            if status is not None and derived != status:
                continue
            out.append(
                model.InstanceSummary(
                    iid,
                    rb,
                    derived,
                    created,
                    counts[model.DONE] + counts[model.SKIPPED],
                    total,
                    counts[model.RUNNING],
                    counts[model.FAILED],
                    counts[model.INTERRUPTED],
                )
            )
        return out

    def values(self, instance_id: str, step_key: str) -> dict[str, model.EncodedValue]:
        cache = self._core.values_cache
        cached = cache.get(instance_id, step_key)
        if cached is not None:
            return cached
        rows = (
            self._core.reader()
            .execute(
                "SELECT name, encoding, data FROM step_values WHERE instance_id = ? AND step_key = ?",
                [instance_id, step_key],
            )
            .fetchall()
        )
        found = {name: model.EncodedValue(enc, bytes(data)) for name, enc, data in rows}
        cache.put(instance_id, step_key, found)
        return found

    def wait(self, instance_id: str, path: str, *, timeout: float) -> model.StepState | None:
        deadline = time.monotonic() + timeout
        core = self._core
        while True:
            with core.changed:
                gen = core.generation
            state = self.step(instance_id, path)
            if state is None or state.status != model.RUNNING:
                return state
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return state
            with core.changed:
                if core.generation == gen:
                    # Wake at least once a second: a holder's lease can expire
                    # without any commit happening.
                    core.changed.wait(min(remaining, 1.0))

    def subscribe(
        self, instance_id: str, callback: Callable[[list[model.Event]], None], *, since_seq: int = 0
    ) -> Callable[[], None]:
        sub = _Subscription(instance_id, callback, since_seq)
        self._core.subscribe(sub)
        return lambda: self._core.unsubscribe(sub)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _CORES_LOCK:
            core = self._core
            core.refs -= 1
            if core.refs > 0:
                return
            if _CORES.get(core.path) is core:
                del _CORES[core.path]
        core.close()
