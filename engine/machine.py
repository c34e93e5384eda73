"""The step state machine (DESIGN.md §3) as pure functions over one cursor row.

Each function takes the current row (``None`` if the step has no row yet) and
returns a :class:`Transition`: the new row, the events to journal, and what to
answer the caller. Nothing here does I/O; a store applies transitions inside
one transaction, so the compare-and-set is exactly "decide on the row the
store holds, then commit the decision with its events".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import model
from .errors import (
    InvalidTransition,
    RunbookError,
    StepFenced,
    StepNotFound,
)
from .keys import parent_of, step_key
from .model import ClaimOutcome

LIVE = "live"
GONE = "gone"
UNKNOWN = "unknown"


class Liveness(Protocol):
    """Tells whether an owner is alive, as far as this store can know."""

    def owner_state(self, owner: str) -> str:
        """``live``, ``gone`` or ``unknown`` (then only its lease decides)."""


@dataclass
class Row:
    """A cursor row as the writer holds it in memory."""

    path: str
    parent: str | None
    invocation: int = 1
    attempt: int = 0
    epoch: int = 0
    status: str = model.PENDING
    owner: str | None = None
    run_id: str | None = None
    token: str | None = None
    lease_until: float | None = None
    claimed_at: float | None = None
    finished_at: float | None = None

    @property
    def key(self) -> str:
        return step_key(self.path, self.invocation)

    def copy(self) -> Row:
        return dataclasses.replace(self)

    def to_state(self, instance_id: str) -> model.StepState:
        return model.StepState(
            instance_id=instance_id,
            path=self.path,
            parent=self.parent,
            invocation=self.invocation,
            attempt=self.attempt,
            epoch=self.epoch,
            status=self.status,
            owner=self.owner,
            run_id=self.run_id,
            lease_until=self.lease_until,
            claimed_at=self.claimed_at,
            finished_at=self.finished_at,
        )


@dataclass
class NewEvent:
    """An event to journal; the store allocates its seq when it commits."""

    step_key: str | None
    event: str
    invocation: int | None
    attempt: int | None
    epoch: int | None
    owner: str | None
    run_id: str | None
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class Transition:
    """The outcome of applying one operation to one row."""

    row: Row | None  # the row after the operation (unchanged object if no change)
    changed: bool = False
    events: list[NewEvent] = field(default_factory=list)
    outcome: ClaimOutcome | None = None
    missing: list[str] = field(default_factory=list)
    error: RunbookError | None = None  # raised to the caller after commit


def _event(row: Row, name: str, owner: str | None, run_id: str | None, **payload: Any) -> NewEvent:
    return NewEvent(row.key, name, row.invocation, row.attempt, row.epoch, owner, run_id, payload)


def _interrupt(row: Row, reason: str, run_id: str | None, now: float) -> NewEvent:
    """running -> interrupted, in place; returns the event."""
    previous = row.owner
    row.status = model.INTERRUPTED
    row.finished_at = now
    row.lease_until = None
    row.token = None
    return _event(row, "interrupted", previous, run_id or row.run_id, reason=reason, previous_owner=previous)


def _holder_gone(row: Row, now: float, liveness: Liveness) -> str | None:
    """Why a running row's holder no longer counts, or None if it still does."""
    assert row.owner is not None
    state = liveness.owner_state(row.owner)
    if state == GONE:
        return "owner gone"
    if row.lease_until is not None and row.lease_until < now:
        return "lease expired"
    return None


def claim(
    row: Row | None,
    *,
    path: str,
    owner: str,
    run_id: str,
    token: str | None,
    lease: float,
    retry_safe: bool,
    rerun_interrupted: bool,
    requires: Sequence[str],
    is_finished: Callable[[str], bool],
    max_attempts: int,
    now: float,
    liveness: Liveness,
) -> Transition:
    """Decide a claim (see :meth:`Store.claim` for the rules)."""
    events: list[NewEvent] = []
    if row is None:
        # A fresh row is written only if the claim succeeds below.
        row = Row(path=path, parent=parent_of(path))
        changed = False
    else:
        row = row.copy()
        changed = False

    if row.status == model.RUNNING:
        if row.owner == owner and token is not None and row.token == token:
            # Our own claim whose reply was lost (server restart): hand it back.
            return Transition(row, changed, events, ClaimOutcome.CLAIMED)
        reason = _holder_gone(row, now, liveness)
        if reason is None:
            return Transition(row, changed, events, ClaimOutcome.BUSY)
        events.append(_interrupt(row, reason, run_id, now))
        changed = True

    if row.status in model.FINISHED:
        return Transition(row, changed, events, ClaimOutcome.DONE)
    if row.status == model.INTERRUPTED and not (retry_safe or rerun_interrupted):
        return Transition(row, changed, events, ClaimOutcome.INTERRUPTED)
    if row.status == model.FAILED and row.attempt >= max_attempts:
        return Transition(row, changed, events, ClaimOutcome.EXHAUSTED)

    missing = [p for p in requires if not is_finished(p)]
    if missing:
        return Transition(row, changed, events, ClaimOutcome.ORDER, missing=missing)

    after = row.status
    row.status = model.RUNNING
    row.attempt += 1
    row.epoch += 1
    row.owner = owner
    row.run_id = run_id
    row.token = token
    row.lease_until = now + lease
    row.claimed_at = now
    row.finished_at = None
    payload: dict[str, Any] = {}
    if after != model.PENDING:
        payload["after"] = after
    events.append(_event(row, "claimed", owner, run_id, **payload))
    return Transition(row, True, events, ClaimOutcome.CLAIMED)


def _stale(row: Row | None, invocation: int, owner: str, epoch: int) -> bool:
    return row is None or row.invocation != invocation or row.owner != owner or row.epoch != epoch


def _fenced(
    instance_id: str, row: Row | None, path: str, invocation: int, owner: str, epoch: int, run_id: str | None, what: str
) -> Transition:
    if row is None:
        return Transition(None, error=StepNotFound(instance_id, step_key(path, invocation)))
    key = step_key(path, invocation)
    ev = NewEvent(
        key,
        "fenced",
        invocation,
        None,
        epoch,
        owner,
        run_id,
        {"rejected": what, "current_epoch": row.epoch, "current_owner": row.owner, "current_status": row.status},
    )
    err = StepFenced(instance_id, key, owner, epoch, row.owner, row.epoch, row.status)
    return Transition(row, False, [ev], error=err)


def finish(
    instance_id: str,
    row: Row | None,
    *,
    path: str,
    invocation: int,
    owner: str,
    epoch: int,
    run_id: str,
    status: str,
    payload: Mapping[str, Any],
    now: float,
) -> Transition:
    """running -> done | failed for the matching holder; a stale holder is fenced."""
    if row is not None and not _stale(row, invocation, owner, epoch) and row.status == status:
        # A retry of an outcome that already committed (lost reply): same answer.
        return Transition(row)
    if row is None or _stale(row, invocation, owner, epoch) or row.status != model.RUNNING:
        return _fenced(instance_id, row, path, invocation, owner, epoch, run_id, status)
    row = row.copy()
    row.status = status
    row.finished_at = now
    row.lease_until = None
    row.token = None
    duration = now - row.claimed_at if row.claimed_at is not None else None
    ev = _event(row, status, owner, run_id, duration=duration, **payload)
    return Transition(row, True, [ev])


def renew(
    instance_id: str, row: Row | None, *, path: str, invocation: int, owner: str, epoch: int, lease: float, now: float
) -> Transition:
    """Extend a live holder's lease; stale holders get ``StepFenced`` (not journaled)."""
    if row is None or _stale(row, invocation, owner, epoch) or row.status != model.RUNNING:
        if row is None:
            return Transition(None, error=StepNotFound(instance_id, step_key(path, invocation)))
        key = step_key(path, invocation)
        return Transition(row, error=StepFenced(instance_id, key, owner, epoch, row.owner, row.epoch, row.status))
    row = row.copy()
    row.lease_until = now + lease
    return Transition(row, True)


def release(row: Row, *, reason: str, run_id: str | None, now: float) -> Transition:
    """The holder is gone: running -> interrupted."""
    row = row.copy()
    ev = _interrupt(row, reason, run_id, now)
    return Transition(row, True, [ev])


def rerun(
    instance_id: str,
    row: Row | None,
    *,
    path: str,
    owner: str,
    run_id: str,
    reason: str,
    now: float,
    liveness: Liveness,
) -> Transition:
    """Open a new invocation of a finished (or failed / interrupted) step."""
    if row is None:
        return Transition(None, error=StepNotFound(instance_id, path))
    row = row.copy()
    events: list[NewEvent] = []
    if row.status == model.RUNNING:
        why = _holder_gone(row, now, liveness)
        if why is None:
            return Transition(row, error=InvalidTransition(instance_id, row.key, row.status, "rerun"))
        events.append(_interrupt(row, why, run_id, now))
    if row.status == model.PENDING and row.attempt == 0:
        return Transition(
            row, bool(events), events, error=InvalidTransition(instance_id, row.key, "not run yet", "rerun")
        )
    previous = row.key
    row.invocation += 1
    row.attempt = 0
    row.status = model.PENDING
    row.owner = None
    row.run_id = run_id
    row.token = None
    row.lease_until = None
    row.claimed_at = None
    row.finished_at = None
    events.append(_event(row, "reopened", owner, run_id, previous=previous, reason=reason))
    return Transition(row, True, events)


def resolve(
    instance_id: str,
    row: Row | None,
    *,
    path: str,
    decision: str,
    owner: str,
    run_id: str,
    note: str,
    now: float,
    liveness: Liveness,
) -> Transition:
    """A person's decision on an interrupted or failed step."""
    if row is None:
        return Transition(None, error=StepNotFound(instance_id, path))
    row = row.copy()
    events: list[NewEvent] = []
    if row.status == model.RUNNING:
        why = _holder_gone(row, now, liveness)
        if why is None:
            return Transition(row, error=InvalidTransition(instance_id, row.key, row.status, f"resolve --{decision}"))
        events.append(_interrupt(row, why, run_id, now))
    if row.status not in (model.INTERRUPTED, model.FAILED):
        return Transition(
            row,
            bool(events),
            events,
            error=InvalidTransition(instance_id, row.key, row.status, f"resolve --{decision}"),
        )
    previous = row.status
    row.status = {"rerun": model.PENDING, "done": model.DONE, "skip": model.SKIPPED}[decision]
    # The decider is recorded in the event; nobody holds the step afterwards, so
    # a late outcome from the vanished holder is fenced (owner mismatch).
    row.owner = None
    row.run_id = run_id
    row.token = None
    row.lease_until = None
    row.finished_at = now
    events.append(_event(row, "resolved", owner, run_id, decision=decision, previous=previous, note=note))
    return Transition(row, True, events)
