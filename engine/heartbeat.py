"""Lease renewal for the claims this process holds (DESIGN.md §3, liveness).

One daemon thread per process renews every held claim a third of a lease
after its last renewal. Holding a claim costs a heap push and nothing more
until it is due, so short steps are never renewed at all and nothing needs a
thread of its own:

* :func:`hold` keeps one claim alive (a cell, a task) until
  :meth:`Lease.release`;
* :func:`hold_group` keeps a changing set of claims alive (the branches of one
  fan-out) with a single heap entry: adding or dropping a member is a dict
  operation, which matters at thousands of branches per second.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time

from .errors import StepFenced
from .store import Store


class Lease:
    """One claim being kept alive; :meth:`release` when its outcome is recorded."""

    __slots__ = ("epoch", "fenced", "instance_id", "lease", "owner", "released", "step_key", "store")

    def __init__(self, store: Store, instance_id: str, step_key: str, owner: str, epoch: int, lease: float) -> None:
        self.store = store
        self.instance_id = instance_id
        self.step_key = step_key
        self.owner = owner
        self.epoch = epoch
        self.lease = lease
        self.released = False
        #: Set when a renewal found the claim taken over; its outcome will be fenced.
        self.fenced: StepFenced | None = None

    def release(self) -> None:
        """Stop renewing (the heap entry is dropped when it comes due)."""
        self.released = True

    def beat(self) -> bool:
        """Renew now (heartbeat thread); False once the claim is lost."""
        fenced = _renew(self.store, self.instance_id, self.step_key, self.owner, self.epoch, self.lease)
        if fenced is not None and not self.released:  # a renewal racing the outcome is not a takeover
            self.fenced = fenced
        return fenced is None


class LeaseGroup:
    """Claims of one owner in one instance kept alive together (a fan-out's branches)."""

    def __init__(self, store: Store, instance_id: str, owner: str, lease: float) -> None:
        self.store = store
        self.instance_id = instance_id
        self.owner = owner
        self.lease = lease
        self.released = False
        self._closing = False
        self._members: dict[str, int] = {}  # step key -> epoch
        self._lock = threading.Lock()
        #: Step keys whose renewal found the claim taken over.
        self.fenced: dict[str, StepFenced] = {}

    def add(self, step_key: str, epoch: int) -> None:
        """Keep ``step_key`` (claimed at ``epoch``) alive until :meth:`discard`."""
        with self._lock:
            self._members[step_key] = epoch

    def discard(self, step_key: str) -> None:
        """Stop renewing one member (its outcome is being recorded)."""
        with self._lock:
            self._members.pop(step_key, None)

    def release(self) -> None:
        """Stop renewing every member."""
        self.released = True

    def release_when_empty(self) -> None:
        """Keep renewing the members left (still running), then stop by itself."""
        self._closing = True

    def beat(self) -> bool:
        """Renew every current member (heartbeat thread); False once released."""
        with self._lock:
            members = list(self._members.items())
            if self._closing and not members:
                self.released = True
                return False
        for key, epoch in members:
            if self.released:
                break
            fenced = _renew(self.store, self.instance_id, key, self.owner, epoch, self.lease)
            if fenced is not None:
                with self._lock:
                    if self._members.pop(key, None) is not None:
                        self.fenced[key] = fenced
        return True


def _renew(store: Store, instance_id: str, step_key: str, owner: str, epoch: int, lease: float) -> StepFenced | None:
    try:
        store.renew(instance_id, step_key, owner=owner, epoch=epoch, lease=lease)
    except StepFenced as exc:
        return exc
    except Exception:  # noqa: BLE001 - store closed or step gone: nothing to keep alive, and the
        pass  # heartbeat thread must survive whatever one renewal raises
    return None


_Held = Lease | LeaseGroup


class Heartbeat:
    """Renews held leases from one daemon thread, started on first use."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Held]] = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._sleep_until = float("inf")

    def hold(self, store: Store, instance_id: str, step_key: str, owner: str, epoch: int, lease: float) -> Lease:
        """Keep the claim ``(step_key, owner, epoch)`` alive until released."""
        held = Lease(store, instance_id, step_key, owner, epoch, lease)
        self.push(held, time.monotonic() + lease / 3)
        return held

    def push(self, held: _Held, due: float) -> None:
        """Schedule ``held.beat()`` at ``due`` (monotonic seconds)."""
        with self._cv:
            heapq.heappush(self._heap, (due, next(self._order), held))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nbrunbook-heartbeat", daemon=True)
                self._thread.start()
            elif due < self._sleep_until:
                self._cv.notify()  # only wake the thread if this is the earliest due entry

    def _run(self) -> None:
        while True:
            with self._cv:
                while True:
                    now = time.monotonic()
                    due = self._heap[0][0] if self._heap else float("inf")
                    if due <= now:
                        break
                    self._sleep_until = due
                    self._cv.wait(min(due - now, 60.0))
                self._sleep_until = float("inf")
                batch = []
                while self._heap and self._heap[0][0] <= now:
                    _, _, held = heapq.heappop(self._heap)
                    if not held.released:
                        batch.append(held)
            for held in batch:
                if held.beat() and not held.released:
                    self.push(held, time.monotonic() + held.lease / 3)


_HEARTBEAT = Heartbeat()


def hold(store: Store, instance_id: str, step_key: str, *, owner: str, epoch: int, lease: float) -> Lease:
    """Keep a claim alive from this process's heartbeat thread until ``release()``."""
    return _HEARTBEAT.hold(store, instance_id, step_key, owner, epoch, lease)


def hold_group(store: Store, instance_id: str, *, owner: str, lease: float) -> LeaseGroup:
    """An empty :class:`LeaseGroup` renewed from the heartbeat thread until ``release()``."""
    group = LeaseGroup(store, instance_id, owner, lease)
    _HEARTBEAT.push(group, time.monotonic() + lease / 3)
    return group
