"""Run code as a claimed cell, the way the kernel guard will: claim, bind, record.

Branch tests use this until they run through real kernels: the guard's only
job towards ``rb.task``/``rb.map`` is to bind the cell's :class:`StepContext`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nbrunbook.engine import context
from nbrunbook.engine.context import StepContext
from nbrunbook.engine.keys import process_owner
from nbrunbook.engine.model import ClaimOutcome, Event
from nbrunbook.engine.store import Store


@contextmanager
def running_cell(
    store: Store,
    instance_id: str,
    cell: str = "fan",
    *,
    owner: str | None = None,
    run_id: str = "run-1",
    params: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> Iterator[StepContext]:
    """Claim ``cell/<cell>``, bind its context for the block, then record done or failed."""
    me = owner or process_owner()
    claim = store.claim(instance_id, f"cell/{cell}", owner=me, run_id=run_id)
    assert claim.outcome is ClaimOutcome.CLAIMED, claim
    st = claim.state
    ctx = StepContext(
        instance_id=instance_id,
        step_key=claim.step_key,
        invocation=st.invocation,
        attempt=st.attempt,
        epoch=st.epoch,
        idempotency_key=claim.idempotency_key,
        params=dict(params or {}),
        run_id=run_id,
        owner=me,
        store=store,
        options=dict(options or {}),
    )
    try:
        with context.bound(ctx):
            yield ctx
    except BaseException as exc:
        store.fail(instance_id, claim.step_key, owner=me, epoch=st.epoch, run_id=run_id, error={"type": repr(exc)})
        raise
    store.complete(instance_id, claim.step_key, owner=me, epoch=st.epoch, run_id=run_id)


def as_context(ctx: StepContext, *, owner: str, run_id: str) -> StepContext:
    """The same step seen by another advancer (another owner and run)."""
    return StepContext(
        instance_id=ctx.instance_id,
        step_key=ctx.step_key,
        invocation=ctx.invocation,
        attempt=ctx.attempt,
        epoch=ctx.epoch,
        idempotency_key=ctx.idempotency_key,
        params=ctx.params,
        run_id=run_id,
        owner=owner,
        store=ctx.store,
        options=ctx.options,
    )


def branch_events(events: list[Event]) -> list[Event]:
    """The events of branches (step keys with a ``[key]``), leaving cells out."""
    return [e for e in events if e.step_key and "[" in e.step_key]


class Effects:
    """An external effects file: one JSON line per side effect (DESIGN.md §11)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def record(self, **extra: Any) -> None:
        """Write one effect line for the branch running now."""
        ctx = context.context()
        line = {
            "step_key": ctx.step_key,
            "key": ctx.idempotency_key,
            "owner": ctx.owner,
            "epoch": ctx.epoch,
            "run_id": ctx.run_id,
            **extra,
        }
        with self._lock, self.path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
