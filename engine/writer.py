"""The one writer thread of an embedded store: group commit over DuckDB.

All writes of a process to a store file go through one :class:`Writer`. It
owns the DuckDB connection, keeps every loaded instance's cursor rows and next
``seq`` in memory (it is the only writer, so memory and file agree after each
commit), and commits queued operations in groups:

1. take every operation waiting in the queue (FIFO);
2. apply each to the in-memory state with :mod:`.machine`, collecting rows;
   an operation that raises is undone alone (its undo-log mark);
3. write the group with at most four set-based statements (cursor inserts,
   cursor updates, journal, values) plus rare ones, then ``COMMIT``;
4. only then answer the callers. If the commit fails, the in-memory state is
   rolled back and each operation is retried alone, so one bad operation
   cannot fail its neighbours.

DuckDB pitfalls this avoids by construction (DESIGN.md §4): one writer means no
racing ``UPDATE``/``RETURNING`` forms and no ``ON CONFLICT`` wins before commit;
any error inside the transaction leads to ``ROLLBACK``, never ``COMMIT``.
"""

from __future__ import annotations

import functools
import json
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import machine, model
from .errors import InstanceNotFound, RunbookError, StoreError, store_write_error
from .faults import crashpoint
from .machine import NewEvent, Row

if TYPE_CHECKING:
    import duckdb

MAX_GROUP = 2048
#: See :meth:`Writer._linger_for`.
DEFAULT_LINGER = 0.0015
_STOP = object()
_caller = threading.local()


def set_caller(ident: int | None) -> None:
    """Name who is calling from this thread (``None``: the thread itself).

    The group-commit heuristics wait briefly for callers answered by recent
    commits. The store server runs requests on pooled threads, so it names
    the client thread behind each request instead.
    """
    _caller.ident = ident


_CURSOR_COLS = (
    "instance_id, path, parent, invocation, attempt, epoch, status, owner, run_id, token, "
    "lease_until, claimed_at, finished_at"
)
_CURSOR_NAMES = [c.strip() for c in _CURSOR_COLS.split(",")]
# Up to this many rows a multi-row VALUES statement is cheaper than unnest().
_VALUES_MAX_ROWS = 3


def _insert(table: str, rows: list[tuple[Any, ...]]) -> tuple[str, list[Any]]:
    """The statement and its parameters that insert ``rows`` (tuples of the table's width) into ``table``."""
    if len(rows) <= _VALUES_MAX_ROWS:
        one = "(" + ", ".join("?" * len(rows[0])) + ")"
        return f"INSERT INTO {table} VALUES " + ", ".join([one] * len(rows)), [v for row in rows for v in row]
    columns = list(zip(*rows, strict=True))
    shared = [_one_value(col) for col in columns]
    if all(shared):
        shared[0] = False  # one unnest() makes the rows; scalars alone would make one
    params = [col[0] if one else list(col) for col, one in zip(columns, shared, strict=True)]
    return _unnest_sql(table, tuple(shared)), params


def _one_value(column: tuple[Any, ...]) -> bool:
    first = column[0]
    kind = type(first)
    return all(type(v) is kind and v == first for v in column)


@functools.cache
def _unnest_sql(table: str, shared: tuple[bool, ...]) -> str:
    # A column with the same value in every row (a group's claims share their
    # instance, status, owner, run, often the lease) is one scalar parameter
    # that DuckDB repeats: turning a Python list into a DuckDB list and
    # unnesting it costs ~0.2 ms more per statement here. Untyped unnest:
    # DuckDB casts to the column types; typed casts cost more.
    marks = [f"${i}" if one else f"unnest(${i})" for i, one in enumerate(shared, 1)]
    return f"INSERT INTO {table} SELECT " + ", ".join(marks)


_UPDATABLE = tuple(_CURSOR_NAMES[2:])  # every column but the key


@functools.cache
def _update_one_sql(columns: tuple[str, ...]) -> str:
    """UPDATE of one cursor row setting ``columns`` (names from ``_UPDATABLE`` only)."""
    assert columns and set(columns) <= set(_UPDATABLE)
    return "UPDATE cursor SET " + ", ".join(f"{c} = ?" for c in columns) + " WHERE instance_id = ? AND path = ?"


SQL_UPDATE_CURSOR_MANY = (
    "UPDATE cursor SET "
    + ", ".join(f"{c} = v.{c}" for c in _CURSOR_NAMES[2:])
    + " FROM (SELECT "
    + ", ".join(f"unnest(${i}) AS {c}" for i, c in enumerate(_CURSOR_NAMES, 1))
    + ") AS v WHERE cursor.instance_id = v.instance_id AND cursor.path = v.path"
)


def dumps(obj: Any) -> str:
    """Compact JSON for payloads and parameters."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, default=str)


@dataclass
class InstanceState:
    """What the writer holds in memory for one instance."""

    instance: model.Instance
    next_seq: int
    rows: dict[str, Row]
    # path -> the row as the file holds it (rows are copied on every change,
    # never mutated in place, so this is a snapshot): says INSERT vs UPDATE,
    # and which columns an UPDATE must set.
    persisted: dict[str, Row]
    once: dict[tuple[str, str | None], model.Event] = field(default_factory=dict)


class Deferred:
    """Returned by an operation to raise ``error`` to its caller after commit."""

    def __init__(self, error: RunbookError) -> None:
        self.error = error


class Batch:
    """The changes of one group commit, with an undo log for partial rollback."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.now = writer.clock()
        self.undo: list[Callable[[], object]] = []
        self.events: list[tuple[str, model.Event]] = []
        self.dirty: dict[tuple[str, str], None] = {}
        self.values: list[tuple[str, str, str, str, bytes]] = []
        self.sql: list[tuple[str, list[Any]]] = []
        self.after_commit: list[Callable[[], None]] = []

    def mark(self) -> tuple[int, int, int, int, int]:
        return (len(self.undo), len(self.events), len(self.values), len(self.sql), len(self.after_commit))

    def rollback_to(self, mark: tuple[int, int, int, int, int]) -> None:
        n_undo, n_events, n_values, n_sql, n_after = mark
        while len(self.undo) > n_undo:
            self.undo.pop()()
        del self.events[n_events:]
        del self.values[n_values:]
        del self.sql[n_sql:]
        del self.after_commit[n_after:]

    @property
    def has_writes(self) -> bool:
        return bool(self.events or self.dirty or self.values or self.sql)

    # --- state changes, each with its undo entry

    def set_row(self, st: InstanceState, row: Row) -> None:
        old = st.rows.get(row.path)
        path = row.path

        def undo() -> None:
            if old is None:
                st.rows.pop(path, None)
            else:
                st.rows[path] = old

        self.undo.append(undo)
        st.rows[path] = row
        self.dirty[(st.instance.instance_id, path)] = None

    def add_event(self, st: InstanceState, ev: NewEvent) -> model.Event:
        seq = st.next_seq

        def undo() -> None:
            st.next_seq = seq

        self.undo.append(undo)
        st.next_seq = seq + 1
        event = model.Event(
            instance_id=st.instance.instance_id,
            seq=seq,
            step_key=ev.step_key,
            event=ev.event,
            invocation=ev.invocation,
            attempt=ev.attempt,
            epoch=ev.epoch,
            owner=ev.owner,
            run_id=ev.run_id,
            ts=self.now,
            payload=ev.payload,
        )
        self.events.append((st.instance.instance_id, event))
        return event

    def apply(self, st: InstanceState, tr: machine.Transition) -> None:
        """Record a transition's row and events (the row only if it changed)."""
        if tr.changed and tr.row is not None:
            self.set_row(st, tr.row)
        for ev in tr.events:
            self.add_event(st, ev)

    def add_sql(self, sql: str, params: list[Any]) -> None:
        self.sql.append((sql, params))

    def on_commit(self, fn: Callable[[], None]) -> None:
        self.after_commit.append(fn)


@dataclass
class _Op:
    fn: Callable[[Batch], Any]
    future: Future[Any]
    sync: bool
    caller: int = 0
    submitted: float = 0.0  # time.monotonic() when queued


class _Gaps:
    """How long after a fire-and-forget outcome each caller sends its next synchronous operation.

    The writer uses this to decide whether a group holding only outcomes should
    wait for that operation (to share one commit) or commit at once (so the
    commit overlaps whatever the caller does in between). Kept per caller as a
    moving average; updated from the callers' threads (plain dict operations,
    atomic under the GIL; a lost update only delays learning).
    """

    _WEIGHT = 0.3  # of the newest observation

    def __init__(self) -> None:
        self._pending: dict[int, float] = {}  # caller -> when its latest outcome was queued
        self.average: dict[int, float] = {}

    def outcome_queued(self, caller: int, now: float) -> None:
        self._pending[caller] = now
        if len(self._pending) > 4096:  # callers whose last word was an outcome (closed connections)
            for key in list(self._pending)[:1024]:
                self._pending.pop(key, None)

    def sync_queued(self, caller: int, now: float) -> None:
        since = self._pending.pop(caller, None)
        if since is None:
            return
        gap = now - since
        old = self.average.get(caller)
        self.average[caller] = gap if old is None else old + self._WEIGHT * (gap - old)
        if len(self.average) > 4096:  # callers come and go (server connections): forget the oldest
            for key in list(self.average)[:1024]:
                self.average.pop(key, None)


class Writer:
    """Owns the DuckDB connection; runs operations in group commits."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        path: str,
        *,
        clock: Callable[[], float] = time.time,
        linger: float = DEFAULT_LINGER,
        gather: float = 0.001,
        on_commit: Callable[[Batch], None] | None = None,
    ) -> None:
        self.con = con
        self.path = path
        self.clock = clock
        # A group of outcomes only waits for its caller's next operation if that
        # caller usually sends it within ``linger`` seconds (see _Gaps).
        self.linger = linger
        self.gather = gather
        self.gaps = _Gaps()
        # Threads that waited on the last two groups: they are about to ask again.
        self._recent: tuple[set[int], set[int]] = (set(), set())
        self.on_commit = on_commit
        self.states: dict[str, InstanceState] = {}
        # runbook -> (version, hash, created_at, path) of its latest manifest
        self.manifest_heads: dict[str, tuple[int, str, float, str]] = {}
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"nbrunbook-writer:{path}", daemon=True)
        self._closed = False
        self.groups = 0  # commits done (for benchmarks and tests)
        self.grouped_ops = 0
        self._thread.start()

    # ------------------------------------------------------------------ API

    def submit(self, fn: Callable[[Batch], Any], *, sync: bool = True) -> Future[Any]:
        """Queue ``fn`` to run in the writer thread inside the next group."""
        if self._closed:
            raise StoreError(self.path, "the store is closed")
        fut: Future[Any] = Future()
        caller = getattr(_caller, "ident", None) or threading.get_ident()
        now = time.monotonic()
        if sync:
            self.gaps.sync_queued(caller, now)
        else:
            self.gaps.outcome_queued(caller, now)
        self._q.put(_Op(fn, fut, sync, caller, now))
        return fut

    def call(self, fn: Callable[[Batch], Any]) -> Any:
        """Run ``fn`` in the next group and return its result once committed."""
        return self.submit(fn).result()

    def flush(self) -> None:
        """Return once every operation queued before this call has committed."""
        self.call(lambda batch: None)

    def close(self) -> None:
        """Commit what is queued, stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._q.put(_STOP)
        self._thread.join()

    # ------------------------------------------------------- instance state

    def state(self, instance_id: str) -> InstanceState:
        """The in-memory state of an instance, loading it on first use (writer thread only)."""
        st = self.states.get(instance_id)
        if st is not None:
            return st
        con = self.con
        row = con.execute(
            "SELECT instance_id, runbook, manifest_version, params, options, created_at, created_by "
            "FROM instances WHERE instance_id = ?",
            [instance_id],
        ).fetchone()
        if row is None:
            raise InstanceNotFound(instance_id)
        inst = model.Instance(row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4]), row[5], row[6])
        seq_row = con.execute("SELECT max(seq) FROM journal WHERE instance_id = ?", [instance_id]).fetchone()
        next_seq = (seq_row[0] or 0) + 1 if seq_row else 1
        rows: dict[str, Row] = {}
        for r in con.execute(f"SELECT {_CURSOR_COLS} FROM cursor WHERE instance_id = ?", [instance_id]).fetchall():
            rows[r[1]] = Row(*r[1:])
        once: dict[tuple[str, str | None], model.Event] = {}
        for r in con.execute(
            "SELECT seq, step_key, event, invocation, attempt, epoch, owner, run_id, ts, payload FROM journal "
            "WHERE instance_id = ? AND event = 'fanout_declared' ORDER BY seq",
            [instance_id],
        ).fetchall():
            ev = model.Event(instance_id, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], json.loads(r[9]))
            once.setdefault((ev.event, ev.step_key), ev)
        st = InstanceState(inst, next_seq, rows, dict(rows), once)
        self.states[instance_id] = st
        return st

    def add_state(self, batch: Batch, st: InstanceState) -> None:
        """Register a newly created instance (undone if its group rolls back)."""
        iid = st.instance.instance_id
        self.states[iid] = st
        batch.undo.append(lambda: self.states.pop(iid, None))

    def replace_instance(self, batch: Batch, st: InstanceState, inst: model.Instance) -> None:
        """Swap an instance record in memory (undone with its group)."""
        old = st.instance
        st.instance = inst

        def undo() -> None:
            st.instance = old

        batch.undo.append(undo)

    # ----------------------------------------------------------------- loop

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._q.get()
            if first is _STOP:
                break
            ops: list[_Op] = [first]
            stop = self._drain(ops)
            callers = {op.caller for op in ops if op.sync}
            crowd = self._recent[0] | self._recent[1]
            if not stop and not callers:
                wait = self._linger_for(ops)
                if wait > 0:
                    stop = self._linger(ops, wait)
            elif not stop and self.gather > 0 and len(crowd - callers) > 0 and len(crowd) > 1:
                stop = self._gather(ops, crowd)
            self._recent = (self._recent[1], {op.caller for op in ops if op.sync})
            self._execute(ops)

    def _drain(self, ops: list[_Op]) -> bool:
        while len(ops) < MAX_GROUP:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            ops.append(item)
        return False

    def _gather(self, ops: list[_Op], crowd: set[int]) -> bool:
        # Several threads were answered by recent commits and are about to ask
        # again: wait a moment for them so they share the next commit.
        deadline = time.monotonic() + self.gather
        missing = crowd - {op.caller for op in ops}
        while missing and len(ops) < MAX_GROUP:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                item = self._q.get(timeout=remaining)
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            ops.append(item)
            missing.discard(item.caller)
        return self._drain(ops)

    def _linger_for(self, ops: list[_Op]) -> float:
        """How long a group of outcomes only should wait for its callers' next operation.

        Waiting pays when that operation comes sooner than what sharing a commit
        saves (one BEGIN/COMMIT and a statement per table: ~1-2 ms here): a
        kernel running cells back to back sends its next claim ~0.3 ms after an
        outcome. A headless run's next claim follows a kernel round trip
        (several ms); there, committing at once lets the commit overlap the
        round trip instead of delaying the claim behind it. Callers never seen
        to follow up quickly do not wait.
        """
        if self.linger <= 0:
            return 0.0
        averages = self.gaps.average
        gaps = [averages.get(op.caller) for op in ops]
        if any(g is None or g > self.linger for g in gaps):
            return 0.0
        oldest = min(op.submitted for op in ops)
        return max(0.0, oldest + self.linger - time.monotonic())

    def _linger(self, ops: list[_Op], wait: float) -> bool:
        # Only fire-and-forget outcomes are waiting: give the caller's next
        # operation (usually the next claim) a moment to share this commit.
        deadline = time.monotonic() + wait
        while len(ops) < MAX_GROUP:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                item = self._q.get(timeout=remaining)
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            ops.append(item)
            if item.sync:
                return self._drain(ops)
        return False

    def _execute(self, ops: list[_Op]) -> None:
        batch = Batch(self)
        results: list[tuple[_Op, Any, BaseException | None]] = []
        for op in ops:
            if not op.future.set_running_or_notify_cancel():
                continue
            mark = batch.mark()
            try:
                results.append((op, op.fn(batch), None))
            except BaseException as exc:  # noqa: BLE001 - delivered to the caller
                batch.rollback_to(mark)
                results.append((op, None, exc))
        if batch.has_writes:
            try:
                self._commit(batch)
            except Exception as exc:  # noqa: BLE001
                batch.rollback_to((0, 0, 0, 0, 0))
                if len(results) > 1:
                    # Isolate the operation that broke the commit.
                    for op, _, _ in results:
                        op.future = _refresh(op.future)
                        self._execute([op])
                    return
                err = store_write_error(self.path, exc)  # a full disk: StoreUnavailable, exit 4
                for op, _, _ in results:
                    op.future.set_exception(err)
                return
            for iid, path in batch.dirty:
                st = self.states.get(iid)
                row = st.rows.get(path) if st is not None else None
                if st is not None and row is not None:
                    st.persisted[path] = row
            self.groups += 1
            self.grouped_ops += len(results)
            crashpoint("after_commit")
        for fn in batch.after_commit:
            fn()
        for op, result, error in results:
            if error is not None:
                op.future.set_exception(error)
            elif isinstance(result, Deferred):
                op.future.set_exception(result.error)
            else:
                op.future.set_result(result)
        if self.on_commit is not None and batch.has_writes:
            self.on_commit(batch)

    def _commit(self, batch: Batch) -> None:
        con = self.con
        con.execute("BEGIN TRANSACTION")
        try:
            for sql, params in batch.sql:
                con.execute(sql, params)
            self._write_cursor(batch)
            self._write_journal(batch)
            self._write_values(batch)
            crashpoint("inside_commit")
        except BaseException:
            # Never COMMIT after an error: DuckDB would roll back silently.
            try:
                con.execute("ROLLBACK")
            except Exception:  # noqa: BLE001 - the original error matters
                pass
            raise
        con.execute("COMMIT")

    def _write_cursor(self, batch: Batch) -> None:
        inserts: list[tuple[Any, ...]] = []
        updates: list[tuple[Any, ...]] = []
        single: tuple[Row, Row, str] | None = None  # (old, new, instance) of a lone update
        for iid, path in batch.dirty:
            st = self.states.get(iid)
            row = st.rows.get(path) if st else None
            if st is None or row is None:
                continue  # created and undone within the group
            old = st.persisted.get(path)
            if old == row:
                continue  # changed and changed back within the group
            values = (
                iid,
                path,
                row.parent,
                row.invocation,
                row.attempt,
                row.epoch,
                row.status,
                row.owner,
                row.run_id,
                row.token,
                row.lease_until,
                row.claimed_at,
                row.finished_at,
            )
            if old is None:
                inserts.append(values)
            else:
                updates.append(values)
                single = (old, row, iid)
        con = self.con
        if inserts:
            con.execute(*_insert("cursor", inserts))
        if len(updates) == 1:
            assert single is not None
            old, row, iid = single
            # Only the columns this group changed: each column set costs ~0.05 ms here.
            changed = [c for c in _UPDATABLE if getattr(old, c) != getattr(row, c)]
            con.execute(_update_one_sql(tuple(changed)), [*(getattr(row, c) for c in changed), iid, row.path])
        elif updates:
            con.execute(SQL_UPDATE_CURSOR_MANY, [list(c) for c in zip(*updates, strict=True)])

    def _write_journal(self, batch: Batch) -> None:
        rows = [
            (
                iid,
                e.seq,
                e.step_key,
                e.event,
                e.invocation,
                e.attempt,
                e.epoch,
                e.owner,
                e.run_id,
                e.ts,
                dumps(e.payload),
            )
            for iid, e in batch.events
        ]
        if rows:
            self.con.execute(*_insert("journal", rows))

    def _write_values(self, batch: Batch) -> None:
        if batch.values:
            self.con.execute(*_insert("step_values", batch.values))


def _refresh(fut: Future[Any]) -> Future[Any]:
    """A future already marked running cannot be run again; hand over to a fresh one."""
    fresh: Future[Any] = Future()

    def relay(f: Future[Any]) -> None:
        exc = f.exception()
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(f.result())

    fresh.add_done_callback(relay)
    return fresh
