"""The store interface: the only way the extension, runner and widgets touch state.

This module imports no implementation. :func:`nbrunbook.engine.factory.open_store`
picks one (embedded DuckDB, the store server client, ...). Every
implementation passes the contract suite in ``tests/test_store_contract.py``.

Atomicity vocabulary used in the docstrings below:

* *atomic* - all rows the call writes (cursor, journal, values) commit in one
  transaction, or none do; events get consecutive ``seq`` numbers allocated
  inside that transaction.
* *durable on return* - the call returns only after that commit.
* *ordered* - operations submitted by one thread commit in submission order,
  so once a call has returned, every call the same thread made before it is
  durable too (this is what makes ``wait=False`` safe, see :meth:`complete`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from .model import (
    Claim,
    EncodedValue,
    Event,
    Instance,
    InstanceStatus,
    InstanceSummary,
    Manifest,
    ManifestCell,
    StepState,
)

DEFAULT_LEASE = 30.0
DEFAULT_MAX_ATTEMPTS = 10
DECISIONS = ("rerun", "done", "skip")

#: Event names written by state transitions; ``append`` refuses them so the
#: journal and the cursor can never disagree.
TRANSITION_EVENTS = frozenset(
    {
        "instance_created",
        "params_forced",
        "manifest_pinned",
        "claimed",
        "done",
        "failed",
        "interrupted",
        "fenced",
        "reopened",
        "resolved",
    }
)


#: The reason journaled when a holder reports its cell cut off by a requested interrupt.
INTERRUPT_REQUESTED = "interrupt requested"


class Store(abc.ABC):
    """Claims, outcomes and the journal of runbook instances.

    Thread-safe: one store object may be shared by every thread of a process.
    """

    #: Where the store lives (a file path, or a URL).
    location: str

    # ------------------------------------------------------------ runbooks

    @abc.abstractmethod
    def pin_manifest(self, runbook: str, cells: Sequence[ManifestCell], *, path: str = "") -> Manifest:
        """Record the runbook's cells; return the manifest version that holds them.

        Atomic, durable on return, idempotent: if the latest version of the
        runbook has the same cells, it is returned unchanged; otherwise a new
        version (latest + 1) is written. Creates the runbook on first use.
        Cell ids must be unique (``InvalidName`` names the duplicates).
        """

    @abc.abstractmethod
    def manifest(self, runbook: str, version: int | None = None) -> Manifest:
        """A pinned manifest (the latest if ``version`` is None). Read-only."""

    # ----------------------------------------------------------- instances

    @abc.abstractmethod
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
    ) -> tuple[Instance, bool]:
        """Create the instance, or return the existing one; ``(instance, created)``.

        Atomic and durable on return; two callers racing to create the same id
        get one instance (one ``instance_created`` event at seq 1). Parameters
        are fixed at creation: an existing instance opened with other params
        raises ``ParamsMismatch`` and changes nothing, unless ``force_params``,
        which records the new params with a ``params_forced`` event. If the
        instance's manifest version differs from ``manifest_version`` the
        instance moves to it with a ``manifest_pinned`` event (same transaction).
        """

    @abc.abstractmethod
    def get_instance(self, instance_id: str) -> Instance:
        """The instance (``InstanceNotFound`` if none). Read-only."""

    # --------------------------------------------------------------- steps

    @abc.abstractmethod
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
    ) -> Claim:
        """Try to take the step; the returned :class:`Claim` says what happened.

        Atomic compare-and-set on the cursor row plus its events, durable on
        return - the caller may run the step's side effect only after this
        returns ``CLAIMED``, and at most one caller per (step, epoch) ever
        does. Rules (DESIGN.md §3): no row / ``pending`` -> running;
        ``failed`` -> running with attempt + 1 (``EXHAUSTED`` past the limit);
        ``running`` whose owner is gone or whose lease expired -> journaled
        ``interrupted`` first; ``running`` held by a live owner -> ``BUSY``;
        ``done``/``skipped`` -> ``DONE``; ``interrupted`` -> ``INTERRUPTED``
        unless ``retry_safe`` or ``rerun_interrupted`` (then attempt + 1).
        ``requires`` lists step paths that must be finished first (``ORDER``
        otherwise). A retry of the same call (same owner and ``token``) after a
        lost reply returns the caller's own claim instead of ``BUSY``.
        With ``with_values``, a ``DONE`` answer for a step in status ``done``
        also carries its recorded values (``Claim.values``, as :meth:`values`
        returns them), saving a skipping caller a second request.
        """

    @abc.abstractmethod
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
    ) -> list[Claim]:
        """:meth:`claim` for many steps in one transaction (fan-outs); one answer per path.

        Atomic and durable on return for all of them together; each path gets
        the same rules and outcomes as a single claim (no ``requires``).
        """

    @abc.abstractmethod
    def renew(
        self, instance_id: str, step_key: str, *, owner: str, epoch: int, lease: float = DEFAULT_LEASE
    ) -> StepState:
        """Extend the caller's lease. Atomic; raises ``StepFenced`` if the claim is stale.

        Renewing writes the cursor only: leases are liveness, not history.
        """

    @abc.abstractmethod
    def complete(
        self,
        instance_id: str,
        step_key: str,
        *,
        owner: str,
        epoch: int,
        run_id: str,
        payload: Mapping[str, Any] | None = None,
        values: Mapping[str, EncodedValue] | None = None,
        wait: bool = True,
    ) -> StepState | Future[StepState]:
        """Record success: running -> done, with a ``done`` event and the values.

        Atomic. ``step_key`` is the claimed invocation's key (``Claim.step_key``).
        Needs the caller's invocation, owner and epoch to match the cursor row
        of a running step; otherwise a ``fenced`` event is journaled under the
        caller's key and ``StepFenced`` raised - a stale outcome is never applied.
        Repeating a call that already committed returns the same state.
        With ``wait=False`` it returns a future at once; the operation is
        *ordered* before any later call from this thread, so it is durable
        once any later call returns (or ``flush()`` does).
        """

    @abc.abstractmethod
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
    ) -> StepState | Future[StepState]:
        """Record failure: running -> failed, with a ``failed`` event. Same rules as :meth:`complete`.

        With ``interrupted`` the holder says its cell was cut off by an
        interrupt somebody requested (the frontend's interrupt or restart, a
        timeout): running -> ``interrupted``, journaled ``interrupted`` with the
        error and the reason "interrupt requested". Its outcome is unknown,
        exactly as after a dead owner, so the next claim is refused unless the
        cell is retry-safe (DESIGN.md §3).
        """

    @abc.abstractmethod
    def rerun(self, instance_id: str, path: str, *, owner: str, run_id: str, reason: str = "") -> StepState:
        """Open a new invocation of a finished step (invocation + 1, new key).

        Atomic, durable on return, journaled ``reopened`` under the new key.
        Refused (``InvalidTransition``) while the step is running.
        """

    @abc.abstractmethod
    def resolve(
        self, instance_id: str, path: str, decision: str, *, owner: str, run_id: str, note: str = ""
    ) -> StepState:
        """A person's decision on an interrupted or failed step.

        ``rerun`` -> pending (next claim is attempt + 1, same idempotency key),
        and so is every interrupted branch under the step's current invocation
        (each journaled ``resolved`` with the note "with its cell ..."), so the
        step's next attempt can run them; ``done`` -> done; ``skip`` -> skipped.
        Atomic (the step and its branches in one transaction), durable on
        return, journaled ``resolved``.
        """

    @abc.abstractmethod
    def release_owner(self, owner: str, *, reason: str, run_id: str | None = None) -> list[StepState]:
        """The owner is gone: every step it holds turns ``interrupted`` now.

        Atomic, durable on return; one ``interrupted`` event per step with the
        reason. Returns the steps it changed.
        """

    @abc.abstractmethod
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
    ) -> Event:
        """Append a free event (not a state transition) and return it.

        Atomic, durable on return. With ``once=True`` the first event of this
        name for this step key wins: later calls return that first event
        unchanged (used for ``fanout_declared``).
        """

    # --------------------------------------------------------------- reads

    @abc.abstractmethod
    def step(self, instance_id: str, path: str) -> StepState | None:
        """The cursor row of one step, or ``None``. Reads committed state."""

    @abc.abstractmethod
    def steps(self, instance_id: str, *, parent: str | None = None) -> list[StepState]:
        """Cursor rows of an instance (only children of ``parent`` if given)."""

    @abc.abstractmethod
    def instance_status(self, instance_id: str) -> InstanceStatus:
        """Instance, manifest and cursor rows from one consistent snapshot."""

    @abc.abstractmethod
    def journal(self, instance_id: str, since_seq: int = 0, limit: int | None = None) -> list[Event]:
        """Events with ``seq > since_seq`` in seq order (at most ``limit``)."""

    @abc.abstractmethod
    def instances(self, *, runbook: str | None = None, status: str | None = None) -> list[InstanceSummary]:
        """Every instance (optionally of one runbook / in one status), newest first."""

    @abc.abstractmethod
    def values(self, instance_id: str, step_key: str) -> dict[str, EncodedValue]:
        """The values recorded with a step key's ``done``. Never decoded here."""

    @abc.abstractmethod
    def wait(self, instance_id: str, path: str, *, timeout: float) -> StepState | None:
        """Block until the step is not ``running`` (or ``timeout`` passes); return its row."""

    @abc.abstractmethod
    def subscribe(
        self, instance_id: str, callback: Callable[[list[Event]], None], *, since_seq: int = 0
    ) -> Callable[[], None]:
        """Call ``callback`` with each batch of new events as they commit.

        Events with ``seq > since_seq`` already in the journal are delivered
        first. Returns a function that ends the subscription. Callbacks run on
        a store thread and must be quick.
        """

    @abc.abstractmethod
    def flush(self) -> None:
        """Return when every operation submitted so far is durable."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store. Outstanding operations are flushed first."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
