"""Plain records exchanged with a :class:`~nbrunbook.engine.store.Store`.

They are frozen dataclasses of JSON-friendly fields so that the store server
can send them over its socket unchanged (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .keys import idempotency_key, step_key

T = TypeVar("T")

# Step statuses (DESIGN.md §3). ``skipped`` is a person's decision (resolve --skip)
# and counts as finished, like ``done``.
PENDING = "pending"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
INTERRUPTED = "interrupted"
SKIPPED = "skipped"
FINISHED = frozenset({DONE, SKIPPED})
STATUSES = (PENDING, RUNNING, DONE, FAILED, INTERRUPTED, SKIPPED)

# Cell kinds recorded in a manifest.
GUARDED = "guarded"
ALWAYS = "always"
PARAMETERS = "parameters"
INJECTED = "injected-parameters"


class _Record:
    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON-able data."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Rebuild a record from :meth:`to_dict` output."""
        names = _field_names(cls)  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    # dataclasses.fields() walks the class on every call: ~5 us per decoded record on the wire.
    return frozenset(f.name for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class ManifestCell(_Record):
    """One code cell of a runbook as pinned when an instance starts."""

    cell_id: str
    index: int
    kind: str = GUARDED
    source_hash: str = ""
    name: str = ""
    retry_safe: bool = False

    @property
    def path(self) -> str:
        """The step path of this cell."""
        return f"cell/{self.cell_id}"


@dataclass(frozen=True)
class Manifest(_Record):
    """A pinned version of a runbook's cells."""

    runbook: str
    version: int
    hash: str
    cells: list[ManifestCell]
    created_at: float
    path: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        cells = [c if isinstance(c, ManifestCell) else ManifestCell.from_dict(c) for c in data["cells"]]
        return cls(**{**data, "cells": cells})

    @property
    def guarded(self) -> list[ManifestCell]:
        """The cells that are durable steps (progress counts these)."""
        return [c for c in self.cells if c.kind == GUARDED]


@dataclass(frozen=True)
class Instance(_Record):
    """One durable run of a runbook with fixed parameters."""

    instance_id: str
    runbook: str
    manifest_version: int
    params: dict[str, Any]
    options: dict[str, Any]
    created_at: float
    created_by: str


@dataclass(frozen=True)
class StepState(_Record):
    """The cursor row of a step: where it stands now."""

    instance_id: str
    path: str
    parent: str | None
    invocation: int
    attempt: int
    epoch: int
    status: str
    owner: str | None
    run_id: str | None
    lease_until: float | None
    claimed_at: float | None
    finished_at: float | None

    @property
    def step_key(self) -> str:
        """The full key of the current invocation."""
        return step_key(self.path, self.invocation)

    @property
    def idempotency_key(self) -> str:
        """``hash(instance, step key)`` of the current invocation."""
        return idempotency_key(self.instance_id, self.step_key)

    @property
    def duration(self) -> float | None:
        """Seconds from the last claim to the outcome, if finished."""
        if self.claimed_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.claimed_at


@dataclass(frozen=True)
class Event(_Record):
    """One journal row. Never updated, never deleted."""

    instance_id: str
    seq: int
    step_key: str | None
    event: str
    invocation: int | None
    attempt: int | None
    epoch: int | None
    owner: str | None
    run_id: str | None
    ts: float
    payload: dict[str, Any] = field(default_factory=dict)


class ClaimOutcome(enum.StrEnum):
    """What a claim attempt found."""

    CLAIMED = "claimed"  # the caller holds the step now and must run it
    DONE = "done"  # finished in this invocation: skip and replay
    BUSY = "busy"  # a live owner holds it: wait, then look again
    INTERRUPTED = "interrupted"  # cut off mid-run (owner died, interrupt requested): a person must decide
    EXHAUSTED = "exhausted"  # failed as many times as allowed
    ORDER = "order"  # earlier cells are not finished


@dataclass(frozen=True)
class Claim(_Record):
    """The answer to :meth:`Store.claim`; ``state`` is the cursor row after it."""

    outcome: ClaimOutcome
    state: StepState
    missing: list[str] = field(default_factory=list)
    max_attempts: int = 0
    #: The recorded values of a ``done`` step, when asked for (``claim(..., with_values=True)``).
    values: dict[str, EncodedValue] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Claim:
        values = data.get("values")
        return cls(
            outcome=ClaimOutcome(data["outcome"]),
            state=StepState.from_dict(data["state"]),
            missing=list(data.get("missing", [])),
            max_attempts=int(data.get("max_attempts", 0)),
            values=None if values is None else {k: EncodedValue.from_dict(v) for k, v in values.items()},
        )

    @property
    def step_key(self) -> str:
        """The key of the claimed (or found) invocation."""
        return self.state.step_key

    @property
    def idempotency_key(self) -> str:
        """The idempotency key of that invocation."""
        return self.state.idempotency_key


@dataclass(frozen=True)
class EncodedValue(_Record):
    """A recorded value: its encoding (``json``, ``arrow`` or ``pickle``) and bytes."""

    encoding: str
    data: bytes


@dataclass(frozen=True)
class InstanceStatus(_Record):
    """An instance with its manifest and every cursor row, read in one snapshot."""

    instance: Instance
    manifest: Manifest | None
    steps: list[StepState]
    last_seq: int
    status: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InstanceStatus:
        return cls(
            instance=Instance.from_dict(data["instance"]),
            manifest=Manifest.from_dict(data["manifest"]) if data.get("manifest") else None,
            steps=[StepState.from_dict(s) for s in data["steps"]],
            last_seq=data["last_seq"],
            status=data["status"],
        )

    def cells(self) -> list[tuple[ManifestCell, StepState | None]]:
        """Each manifest cell with its cursor row (``None`` if never claimed)."""
        by_path = {s.path: s for s in self.steps}
        cells = self.manifest.cells if self.manifest else []
        return [(c, by_path.get(c.path)) for c in cells]

    def counts(self) -> dict[str, int]:
        """Guarded cells by status, plus ``total``."""
        counts = {s: 0 for s in STATUSES}
        total = 0
        for cell, state in self.cells():
            if cell.kind != GUARDED:
                continue
            total += 1
            counts[state.status if state else PENDING] += 1
        counts["total"] = total
        return counts


@dataclass(frozen=True)
class InstanceSummary(_Record):
    """One line of :meth:`Store.instances`."""

    instance_id: str
    runbook: str
    status: str
    created_at: float
    done: int
    total: int
    running: int
    failed: int
    interrupted: int


def derive_status(counts: dict[str, int]) -> str:
    """The instance status from its guarded cells' counts.

    ``running`` beats ``interrupted`` beats ``failed``; ``done`` needs every
    guarded cell finished; an instance nobody advanced yet is ``created``.
    """
    total = counts.get("total", 0)
    finished = counts.get(DONE, 0) + counts.get(SKIPPED, 0)
    if counts.get(RUNNING):
        return RUNNING
    if counts.get(INTERRUPTED):
        return INTERRUPTED
    if counts.get(FAILED):
        return FAILED
    if total and finished == total:
        return DONE
    if finished:
        return "active"
    return "created"
