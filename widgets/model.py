"""What a dashboard shows, kept up to date incrementally from the journal.

:class:`InstanceView` loads one snapshot (instance, manifest, cursor rows),
remembers the journal ``seq`` it reflects, and then only applies the events
after it (``store.journal(instance, since_seq=last)``): a refresh costs one
indexed query for the new events, never a reload, however long the journal.
Pure Python - no ipywidgets - so it is tested and benchmarked on its own.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nbrunbook.engine import model
from nbrunbook.engine.keys import parent_of, split_step_key
from nbrunbook.engine.store import Store

_STATUS_BY_EVENT = {
    "claimed": model.RUNNING,
    "done": model.DONE,
    "failed": model.FAILED,
    "interrupted": model.INTERRUPTED,
    "reopened": model.PENDING,
}
_DECISIONS = {"rerun": model.PENDING, "done": model.DONE, "skip": model.SKIPPED}
BRANCH_STATUSES = (model.PENDING, model.RUNNING, model.DONE, model.FAILED, model.INTERRUPTED, model.SKIPPED)


@dataclass
class StepView:
    """One step as the dashboard knows it."""

    path: str
    status: str = model.PENDING
    invocation: int = 1
    attempt: int = 0
    owner: str | None = None
    run_id: str | None = None
    started: float | None = None
    finished: float | None = None

    @property
    def duration(self) -> float | None:
        """Seconds from claim to outcome, when both are known."""
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started


@dataclass
class FanOut:
    """The branches under one parent step key."""

    parent: str
    branches: dict[str, StepView] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Branches by status."""
        c = collections.Counter(b.status for b in self.branches.values())
        return {s: c.get(s, 0) for s in BRANCH_STATUSES}

    def failed_keys(self) -> list[str]:
        """Paths of failed or interrupted branches, sorted."""
        return sorted(p for p, b in self.branches.items() if b.status in (model.FAILED, model.INTERRUPTED))


class InstanceView:
    """The live state of one instance for dashboards (see module doc)."""

    def __init__(self, store: Store, instance_id: str, *, tail: int = 12) -> None:
        self.store = store
        self.instance_id = instance_id
        self.tail_size = tail
        self.tail: collections.deque[model.Event] = collections.deque(maxlen=tail)
        self.last_seq = 0
        self.instance: model.Instance | None = None
        self.manifest: model.Manifest | None = None
        self.cells: dict[str, StepView] = {}
        self.fanouts: dict[str, FanOut] = {}
        self.reload()

    # ------------------------------------------------------------- loading

    def reload(self) -> None:
        """Take a fresh snapshot (at start, and when the manifest changes)."""
        st = self.store.instance_status(self.instance_id)
        self.instance, self.manifest = st.instance, st.manifest
        self.cells = {s.path: _from_state(s) for s in st.steps}
        self.fanouts = {}
        for s in self.store.steps(self.instance_id):
            if s.parent is not None:
                self._fanout(s.parent).branches[s.path] = _from_state(s)
        self.tail.clear()
        self.tail.extend(self.store.journal(self.instance_id, since_seq=max(0, st.last_seq - self.tail_size)))
        self.last_seq = st.last_seq

    def refresh(self, limit: int = 20_000) -> int:
        """Apply the events committed since the last refresh; return how many."""
        total = 0
        while True:
            events = self.store.journal(self.instance_id, since_seq=self.last_seq, limit=limit)
            if not events:
                return total
            self.apply(events)
            total += len(events)
            if len(events) < limit:
                return total

    def apply(self, events: Iterable[model.Event]) -> None:
        """Fold events (in seq order) into the view; older ones are ignored."""
        reload = False
        for e in events:
            if e.seq <= self.last_seq:
                continue
            self.last_seq = e.seq
            self.tail.append(e)
            if e.event in ("manifest_pinned", "params_forced"):
                reload = True
                continue
            if not e.step_key or (e.event not in _STATUS_BY_EVENT and e.event != "resolved"):
                continue
            path, invocation = split_step_key(e.step_key)
            parent = parent_of(path)
            table = self.cells if parent is None else self._fanout(parent).branches
            view = table.get(path) or StepView(path)
            table[path] = view
            status = _DECISIONS.get(e.payload.get("decision", ""), view.status) if e.event == "resolved" else None
            view.status = status or _STATUS_BY_EVENT[e.event]
            view.invocation = invocation
            if e.event == "claimed":
                view.attempt = e.attempt or view.attempt
                view.owner, view.run_id, view.started, view.finished = e.owner, e.run_id, e.ts, None
            elif e.event == "reopened":
                view.attempt, view.owner, view.started, view.finished = 0, None, None, None
            else:
                view.finished = e.ts
        if reload:
            self.reload()

    def _fanout(self, parent: str) -> FanOut:
        fan = self.fanouts.get(parent)
        if fan is None:
            fan = self.fanouts[parent] = FanOut(parent)
        return fan

    # ---------------------------------------------------------------- reads

    def rows(self) -> list[tuple[model.ManifestCell, StepView | None]]:
        """Manifest cells in order with what is known of each."""
        cells = self.manifest.cells if self.manifest else []
        return [(c, self.cells.get(c.path)) for c in cells]

    def counts(self) -> dict[str, int]:
        """Guarded cells by status, plus ``total`` and ``finished``."""
        counts = {s: 0 for s in model.STATUSES}
        total = 0
        for cell, view in self.rows():
            if cell.kind != model.GUARDED:
                continue
            total += 1
            counts[view.status if view else model.PENDING] += 1
        counts["total"] = total
        counts["finished"] = counts[model.DONE] + counts[model.SKIPPED]
        return counts

    @property
    def status(self) -> str:
        """The instance status, derived like the store derives it."""
        return model.derive_status(self.counts())

    def fanouts_of(self, cell_path: str) -> list[FanOut]:
        """Fan-outs whose parent is (an invocation of) this cell, newest invocation last."""
        prefix = cell_path + "@"
        return [f for k, f in sorted(self.fanouts.items()) if k.startswith(prefix) and "/" not in k[len(prefix) :]]

    def summary(self) -> dict[str, Any]:
        """Plain data for tests and JSON output."""
        return {
            "instance": self.instance_id,
            "status": self.status,
            "counts": self.counts(),
            "last_seq": self.last_seq,
            "fanouts": {k: {"counts": f.counts(), "failed": f.failed_keys()} for k, f in self.fanouts.items()},
        }


def _from_state(s: model.StepState) -> StepView:
    return StepView(s.path, s.status, s.invocation, s.attempt, s.owner, s.run_id, s.claimed_at, s.finished_at)
