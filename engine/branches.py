"""Parallel branches inside a cell: ``rb.task``, ``rb.map``, ``rb.parallel`` (DESIGN.md §7).

Each branch is a durable child step of the step running now (a guarded cell,
or another branch): it is claimed, run with its own :class:`StepContext`
bound, and its result (JSON or Arrow; pickle only when opted in) is recorded.

Identity (DESIGN.md §1-2; never completion order, timestamps or seq):

* A branch's path is ``<parent step key>/<name>[<key>]``. The parent step key
  carries the parent's *invocation*, so a retry of the parent (new attempt)
  finds its finished branches and returns their recorded results without
  running them, and a rerun (new invocation) runs every branch fresh.
* Every call has a *name*: ``name=``, else the function's ``__name__``
  (``"parallel"`` for ``rb.parallel``). Calls of the same name within one
  parent are numbered by a counter taken at call time, in call order
  (:meth:`StepContext.next_index`): the first ``rb.map`` named ``check`` puts
  its branches under ``check``, the second under ``check#1``.
* ``rb.map`` keys: ``key(item)`` if given, else the item's index in the list;
  ``rb.parallel`` keys: the dict's keys. The list of keys (and, for index
  keys, a digest of each item) is journaled once per call as
  ``fanout_declared`` and checked on every later attempt: a changed list is a
  :class:`FanoutChanged` error naming the difference, never a silent mix-up of
  recorded results. The event's step key is the call's group,
  ``<parent key>/<name>@1`` (the store keeps the first ``fanout_declared`` per
  step key, so each call of a cell needs its own).
* ``rb.task`` with ``key=`` is ``<name>[<key>]`` wherever it is called (two
  calls with one name and key are one step); without a key it is
  ``<name>[#<n>]``, ``n`` from the same counter. Keys of the form ``#<n>``
  are therefore reserved.

Options for branches come from the parent's ``StepContext.options`` (the cell
guard fills them from the cell's tags): ``lease`` (seconds, renewed by the
process heartbeat), ``retry_safe`` (an interrupted branch may run again; else
it raises :class:`StepInterrupted`), ``max_attempts``, ``busy_timeout``
(waiting for a branch another owner runs), ``allow_pickle``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

from . import heartbeat, values
from .context import StepContext, bound, current
from .errors import InvalidName, RunbookError, StepBusy
from .fanout import (
    BranchOptions,
    Call,
    FanOut,
    branch_context,
    error_record,
    record_not_started,
    recorded_result,
    refusal,
    shielded,
)
from .keys import branch_path, escape_component, split_step_key, step_key
from .model import STATUSES, ClaimOutcome, Event, StepState
from .store import Store

__all__ = [
    "BranchStatus",
    "DuplicateBranchKeys",
    "FanoutChanged",
    "NotInStep",
    "branch_status",
    "map",
    "parallel",
    "task",
]

T = TypeVar("T")
FANOUT_DECLARED = "fanout_declared"
_RESERVED_KEY = re.compile(r"#\d+")
_MAX_NAME = 100
_MAX_KEY = 256


class NotInStep(RunbookError):
    """A branch was started where no runbook step is running."""

    def __init__(self, call: str, reason: str = "") -> None:
        self.call = call
        self.reason = reason
        super().__init__(
            f"{call}() needs a running runbook step: call it from a guarded cell of a started "
            "instance (%runbook start) or from inside another branch" + (f" ({reason})" if reason else "")
        )

    def __reduce__(self) -> tuple[type[NotInStep], tuple[str, str]]:
        # Raised in process workers too: rebuild from the fields, not the message.
        return (type(self), (self.call, self.reason))


class DuplicateBranchKeys(RunbookError, ValueError):
    """Two items of one fan-out have the same key."""

    def __init__(self, call: str, keys: Sequence[str]) -> None:
        self.call = call
        self.keys = sorted(set(keys))
        shown = ", ".join(repr(k) for k in self.keys[:10])
        super().__init__(f"{call}: several items have the same key: {shown} (each branch needs its own key)")


class FanoutChanged(RunbookError):
    """The list of a fan-out differs from the one journaled when the step first ran."""

    def __init__(
        self,
        call: str,
        parent: str,
        *,
        added: Sequence[str] = (),
        removed: Sequence[str] = (),
        changed: Sequence[str] = (),
        kind: tuple[str, str] | None = None,
    ) -> None:
        self.call = call
        self.parent = parent
        self.added = list(added)
        self.removed = list(removed)
        self.changed = list(changed)
        parts = []
        if kind is not None:
            parts.append(f"it was rb.{kind[0]}, now rb.{kind[1]}")
        for label, keys in (("keys added", added), ("keys removed", removed), ("items changed at", changed)):
            if keys:
                parts.append(
                    f"{label}: " + ", ".join(keys[:10]) + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")
                )
        super().__init__(
            f"{call} under {parent}: the fan-out list differs from the one journaled when this step "
            f"first ran ({'; '.join(parts)}). Recorded branch results are matched by key, so they "
            "would be mixed up: run it with the same list, give items stable keys with key=, or rerun "
            "the cell for a fresh invocation"
        )


# ------------------------------------------------------------------ names


def _parent(call: str) -> tuple[StepContext, Store]:
    ctx = current()
    if ctx is None:
        raise NotInStep(call)
    if ctx.store is None:
        raise NotInStep(call, "this branch runs in a worker process without a store; nest branches in threads")
    return ctx, ctx.store


def _call_name(name: str | None, fn: Any, fallback: str) -> str:
    if name is None:
        target = getattr(fn, "func", fn)  # functools.partial
        found = getattr(target, "__name__", None)
        if isinstance(found, str) and found and "#" not in found and len(found) <= _MAX_NAME:
            return found
        return fallback
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME or "#" in name:
        raise InvalidName("branch name", str(name), f"use 1-{_MAX_NAME} characters without '#'")
    return name


def _branch_key(key: Any) -> str:
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    if not isinstance(key, str) or not key or len(key) > _MAX_KEY:
        raise InvalidName("branch key", repr(key), f"keys are ints or strings of 1-{_MAX_KEY} characters")
    if _RESERVED_KEY.fullmatch(key):
        raise InvalidName("branch key", key, "keys of the form #<n> are reserved for rb.task calls without a key")
    return key


def _digest(item: Any) -> str:
    """A short fingerprint of an item, to notice a changed list on resume.

    JSON data is compared by value; anything else by its type only (give such
    items stable keys with ``key=``).
    """
    try:
        text = json.dumps(item, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        text = "type:" + values.describe(item)
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def group_key(parent_key: str, group: str) -> str:
    """The step key under which a fan-out call journals ``fanout_declared``."""
    return step_key(f"{parent_key}/{escape_component(group)}", 1)


def _declare(
    ctx: StepContext,
    store: Store,
    call: str,
    kind: str,
    name: str,
    index: int,
    group: str,
    keys: list[str],
    digests: list[str] | None,
) -> None:
    payload: dict[str, Any] = {"kind": kind, "parent": ctx.step_key, "name": name, "call": index, "count": len(keys)}
    if digests is None:
        payload["keys"] = keys
    else:
        payload["items"] = digests  # index keys: the keys are 0..count-1
    first = store.append(
        ctx.instance_id,
        FANOUT_DECLARED,
        owner=ctx.owner,
        run_id=ctx.run_id,
        step_key=group_key(ctx.step_key, group),
        payload=payload,
        once=True,
    )
    _check_same(call, ctx.step_key, first.payload, payload)


def _declared_keys(payload: Mapping[str, Any]) -> list[str]:
    keys = payload.get("keys")
    if keys is not None:
        return [str(k) for k in keys]
    return [str(i) for i in range(int(payload.get("count", 0)))]


def _check_same(call: str, parent: str, before: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    if before.get("kind") != now.get("kind"):
        raise FanoutChanged(call, parent, kind=(str(before.get("kind")), str(now.get("kind"))))
    old, new = _declared_keys(before), _declared_keys(now)
    old_set, new_set = set(old), set(new)
    added = [k for k in new if k not in old_set]
    removed = [k for k in old if k not in new_set]
    changed: list[str] = []
    old_items, new_items = before.get("items"), now.get("items")
    if (old_items is None) != (new_items is None):
        raise FanoutChanged(call, parent, added=added or new, removed=removed or old)
    if old_items is not None and new_items is not None:
        changed = [str(i) for i, (a, b) in enumerate(zip(old_items, new_items, strict=False)) if a != b]
    if added or removed or changed:
        raise FanoutChanged(call, parent, added=added, removed=removed, changed=changed)


# -------------------------------------------------------------------- API


def task(
    fn: Callable[..., T],
    /,
    *args: Any,
    name: str | None = None,
    key: str | int | None = None,
    allow_pickle: bool | None = None,
    **kwargs: Any,
) -> T:
    """Run ``fn(*args, **kwargs)`` as a durable child step of the current step.

    Returns its result; if this branch already finished in the current
    invocation of the parent (a retry), returns the recorded result without
    running ``fn``. Runs in the calling thread. If ``fn`` raises, the failure
    is recorded and the exception propagates (a retry runs it again). A branch
    interrupted mid-run (its process died) raises :class:`StepInterrupted`
    unless the step's options say it is retry-safe. ``name``/``key``: see the
    module docstring; a function whose own keywords are called ``name``,
    ``key`` or ``allow_pickle`` needs :func:`functools.partial`.
    """
    ctx, store = _parent("rb.task")
    label = _call_name(name, fn, "task")
    branch = _branch_key(key) if key is not None else f"#{ctx.next_index(label)}"
    path = branch_path(ctx.step_key, label, branch)
    opts = BranchOptions.of(ctx.options, allow_pickle)
    claim = _claim_one(ctx, store, path, opts)
    if claim.outcome is ClaimOutcome.DONE:
        result: T = recorded_result(store, claim, opts.allow_pickle)
        return result
    st = claim.state
    lease = heartbeat.hold(store, st.instance_id, claim.step_key, owner=ctx.owner, epoch=st.epoch, lease=opts.lease)
    try:
        with bound(branch_context(ctx, claim, store)):
            value = fn(*args, **kwargs)
        encoded = values.encode(value, name=f"result of {claim.step_key}", allow_pickle=opts.allow_pickle)
    except BaseException as exc:
        lease.release()
        # Ordered before anything this thread does next (the parent's outcome included).
        store.fail(
            st.instance_id,
            claim.step_key,
            owner=ctx.owner,
            epoch=st.epoch,
            run_id=ctx.run_id,
            error=error_record(exc),
            wait=False,
        )
        raise
    lease.release()
    store.complete(
        st.instance_id,
        claim.step_key,
        owner=ctx.owner,
        epoch=st.epoch,
        run_id=ctx.run_id,
        values={"result": encoded},
        wait=False,
    )
    return value


def _claim_one(ctx: StepContext, store: Store, path: str, opts: BranchOptions) -> Any:
    """Claim one branch, waiting while another owner runs it; CLAIMED or DONE, else raise."""
    import time

    deadline = time.monotonic() + opts.busy_timeout
    while True:
        claim = shielded(
            lambda: store.claim(
                ctx.instance_id,
                path,
                owner=ctx.owner,
                run_id=ctx.run_id,
                lease=opts.lease,
                retry_safe=opts.retry_safe,
                max_attempts=opts.max_attempts,
            ),
            lambda c: record_not_started(store, c, ctx) if c.outcome is ClaimOutcome.CLAIMED else None,
        )
        if claim.outcome in (ClaimOutcome.CLAIMED, ClaimOutcome.DONE):
            return claim
        if claim.outcome is not ClaimOutcome.BUSY:
            raise refusal(claim)
        remaining = deadline - time.monotonic()
        state = store.wait(ctx.instance_id, path, timeout=max(0.0, remaining))
        if state is not None and state.status == "running" and time.monotonic() >= deadline:
            raise StepBusy(ctx.instance_id, state.step_key, state.owner or "another owner", state.claimed_at or 0.0)


def map(
    fn: Callable[[Any], T],
    items: Iterable[Any],
    key: Callable[[Any], str | int] | None = None,
    max_workers: int | None = None,
    executor: Executor | str | None = None,
    *,
    name: str | None = None,
    allow_pickle: bool | None = None,
) -> list[T]:
    """Run ``fn(item)`` for every item as parallel durable branches; results in list order.

    ``key``: a function giving each item's stable key (default: its index).
    ``executor``: threads by default (``max_workers`` of them; context
    variables reach them), ``"process"`` for a process pool (the function,
    items and results must pickle; the worker only runs ``fn``), or any
    ``concurrent.futures.Executor``. Branches finished in an earlier attempt
    of the parent return their recorded results without running. If branches
    fail, the others still finish, then one ``ExceptionGroup`` is raised whose
    message names every failed branch key. ``KeyboardInterrupt`` records the
    branches not yet started as such (a retry runs them) and is re-raised.
    With explicit keys the list may come back in another order on a retry
    (results follow the new order); with index keys it must be the same list.
    A ``ThreadPoolExecutor`` passed in must not be shared with branches that
    fan out again into it (they would wait for themselves); the default pool
    is per call.
    """
    ctx, store = _parent("rb.map")
    label = _call_name(name, fn, "map")
    index = ctx.next_index(label)
    items = list(items)
    if key is None:
        keys = [str(i) for i in range(len(items))]
        digests: list[str] | None = [_digest(item) for item in items]
    elif callable(key):
        keys = [_branch_key(key(item)) for item in items]
        digests = None
    else:
        raise TypeError(f"rb.map key= must be a function of the item, not {values.describe(key)}")
    calls = [Call(fn, (item,)) for item in items]
    return _fan_out(ctx, store, "map", label, index, keys, digests, calls, executor, max_workers, allow_pickle)


def parallel(
    fns: Mapping[str, Callable[[], Any]],
    *,
    name: str | None = None,
    max_workers: int | None = None,
    executor: Executor | str | None = None,
    allow_pickle: bool | None = None,
) -> dict[str, Any]:
    """Run each ``fns[key]()`` as a parallel durable branch; a dict of results by key.

    Same rules as :func:`map`, with the dict's keys as branch keys.
    """
    ctx, store = _parent("rb.parallel")
    label = _call_name(name, None, "parallel")
    index = ctx.next_index(label)
    names = list(fns)
    for k in names:
        if not isinstance(k, str):
            raise InvalidName("branch key", repr(k), "rb.parallel needs string keys")
    keys = [_branch_key(k) for k in names]
    calls = [Call(fns[k]) for k in names]
    results = _fan_out(ctx, store, "parallel", label, index, keys, None, calls, executor, max_workers, allow_pickle)
    return dict(zip(names, results, strict=True))


def _fan_out(
    ctx: StepContext,
    store: Store,
    kind: str,
    label: str,
    index: int,
    keys: list[str],
    digests: list[str] | None,
    calls: list[Call],
    executor: Executor | str | None,
    max_workers: int | None,
    allow_pickle: bool | None,
) -> list[Any]:
    group = label if index == 0 else f"{label}#{index}"
    call = f"rb.{kind} {group!r}"
    if len(set(keys)) != len(keys):
        raise DuplicateBranchKeys(call, [k for k, n in Counter(keys).items() if n > 1])
    if not (executor is None or executor in ("thread", "process") or isinstance(executor, Executor)):
        raise ValueError(
            f"executor must be None, 'thread', 'process' or a concurrent.futures.Executor, not {executor!r}"
        )
    if max_workers is not None and max_workers < 1:
        raise ValueError("max_workers must be at least 1")
    _declare(ctx, store, call, kind, label, index, group, keys, digests)
    if not calls:
        return []
    paths = [branch_path(ctx.step_key, group, k) for k in keys]
    opts = BranchOptions.of(ctx.options, allow_pickle)
    runner = FanOut(
        ctx, store, f"{call} under {ctx.step_key}", paths, calls, opts, executor=executor, max_workers=max_workers
    )
    return runner.run()


# ----------------------------------------------------------------- status


@dataclass(frozen=True)
class BranchStatus:
    """The branches directly under one step, for progress displays."""

    parent: str
    #: Branches by status (every status of ``model.STATUSES``) plus ``total``.
    counts: dict[str, int]
    #: Step keys of failed / interrupted branches, in path order.
    failed: list[str]
    interrupted: list[str]
    #: Cursor rows of the claimed branches, in path order.
    branches: list[StepState]


def branch_status(
    store: Store, instance_id: str, parent_key: str, *, events: Iterable[Event] | None = None
) -> BranchStatus:
    """Where the branches of the step ``parent_key`` stand (reads committed state).

    Counts come from the cursor. Pass journal ``events`` you already hold (a
    dashboard tails the journal) to count declared branches that nobody
    claimed yet as ``pending``.
    """
    split_step_key(parent_key)
    rows = store.steps(instance_id, parent=parent_key)
    counts = {s: 0 for s in STATUSES}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    total = len(rows)
    if events is not None:
        claimed = {row.path for row in rows}
        declared: set[str] = set()
        for ev in events:
            if ev.event != FANOUT_DECLARED or ev.payload.get("parent") != parent_key or not ev.step_key:
                continue
            group_path = split_step_key(ev.step_key)[0]
            declared.update(f"{group_path}[{escape_component(k)}]" for k in _declared_keys(ev.payload))
        unclaimed = len(declared - claimed)
        counts["pending"] += unclaimed
        total += unclaimed
    counts["total"] = total
    return BranchStatus(
        parent=parent_key,
        counts=counts,
        failed=[r.step_key for r in rows if r.status == "failed"],
        interrupted=[r.step_key for r in rows if r.status == "interrupted"],
        branches=rows,
    )
