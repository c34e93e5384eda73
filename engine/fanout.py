"""Running the branches of one fan-out (``rb.map`` / ``rb.parallel``).

The calling thread drives everything: it claims branches in chunks with
:meth:`Store.claim_many` (one transaction per chunk, so the store's group
commit keeps a fan-out fast), hands claimed branches to an executor, and
collects their outcomes from a queue. Branches record their own outcome
(``complete(wait=False)`` / ``fail``) as soon as they end; the call returns
only after every record is durable.

* Threads (the default :class:`~.executors.ThreadWorkers`, or any
  ``ThreadPoolExecutor``): the worker runs the branch in a copy of the
  caller's ``contextvars`` context with the branch's :class:`StepContext`
  bound, then records it.
* Any other ``concurrent.futures`` executor (``"process"``): the worker only
  calls the function; the result comes back to this process, which encodes
  and records it.

Claims are taken a window ahead of the workers, sized to about 0.2 s of work,
so slow branches are not claimed (and shown running) long before they start;
one heartbeat entry per fan-out keeps every claimed branch's lease alive.
"""

from __future__ import annotations

import contextvars
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import executors, heartbeat, values
from .context import StepContext, bind, unbind
from .errors import AttemptsExhausted, RunbookError, StepBusy, StepInterrupted
from .faults import crashpoint
from .model import Claim, ClaimOutcome, StepState
from .store import DEFAULT_LEASE, Store

# Per-branch states kept by the driving thread (under the fan-out's lock).
_UNCLAIMED, _SUBMITTED, _STARTED, _CANCELLED, _RECORDED = 0, 1, 2, 3, 4
_MIN_WINDOW, _MAX_WINDOW = 16, 1024
_WINDOW_SECONDS = 0.2  # claim about this much work ahead of the workers
_POLL = 0.2  # the driving thread wakes this often, so Ctrl-C is seen at once
DEFAULT_BUSY_TIMEOUT = 3600.0
T = TypeVar("T")


@dataclass(frozen=True)
class BranchOptions:
    """How branches of a step are claimed and recorded (from ``StepContext.options``)."""

    lease: float = DEFAULT_LEASE
    retry_safe: bool = False
    max_attempts: int | None = None
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT
    allow_pickle: bool = False

    @classmethod
    def of(cls, options: Mapping[str, Any], allow_pickle: bool | None = None) -> BranchOptions:
        """Read the options the guard passed for the step; ``allow_pickle`` overrides."""
        max_attempts = options.get("max_attempts")
        return cls(
            lease=float(options.get("lease", DEFAULT_LEASE)),
            retry_safe=bool(options.get("retry_safe", False)),
            max_attempts=int(max_attempts) if max_attempts else None,
            busy_timeout=float(options.get("busy_timeout", DEFAULT_BUSY_TIMEOUT)),
            allow_pickle=bool(options.get("allow_pickle", False)) if allow_pickle is None else allow_pickle,
        )


@dataclass(frozen=True)
class Call:
    """One branch's work: ``fn(*args, **kwargs)``."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def branch_context(parent: StepContext, claim: Claim, store: Store | None) -> StepContext:
    """The :class:`StepContext` of a claimed branch: its own identity, the parent's run."""
    st = claim.state
    return StepContext(
        instance_id=parent.instance_id,
        step_key=claim.step_key,
        invocation=st.invocation,
        attempt=st.attempt,
        epoch=st.epoch,
        idempotency_key=claim.idempotency_key,
        params=parent.params,
        run_id=parent.run_id,
        owner=parent.owner,
        store=store,
        options=parent.options if store is not None else {},
    )


def error_record(exc: BaseException, *, not_started: bool = False) -> dict[str, Any]:
    """The ``error`` payload of a failed branch."""
    import traceback

    record: dict[str, Any] = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
        "message": str(exc),
    }
    if not_started:
        record["not_started"] = True
    elif exc.__traceback__ is not None:
        record["traceback"] = "".join(traceback.format_exception(exc)[-20:])
    return record


def recorded_result(store: Store, claim: Claim, allow_pickle: bool) -> Any:
    """The result recorded with a finished branch (``None`` if a person resolved it without one)."""
    found = store.values(claim.state.instance_id, claim.step_key).get("result")
    return None if found is None else values.decode(found, name=claim.step_key, allow_pickle=allow_pickle)


def refusal(claim: Claim) -> RunbookError:
    """The error for a claim that neither ran nor finished (interrupted, exhausted)."""
    st = claim.state
    if claim.outcome is ClaimOutcome.INTERRUPTED:
        return StepInterrupted(st.instance_id, claim.step_key)
    if claim.outcome is ClaimOutcome.EXHAUSTED:
        return AttemptsExhausted(st.instance_id, claim.step_key, st.attempt, claim.max_attempts)
    return RunbookError(f"branch {claim.step_key}: unexpected claim outcome {claim.outcome}")


def record_not_started(store: Store, claim: Claim, parent: StepContext, *, wait: bool = True) -> None:
    """Fail a claimed branch that never ran, so a retry of the parent runs it."""
    interrupt = KeyboardInterrupt("interrupted before this branch started")
    store.fail(
        claim.state.instance_id,
        claim.step_key,
        owner=parent.owner,
        epoch=claim.state.epoch,
        run_id=parent.run_id,
        error=error_record(interrupt, not_started=True),
        wait=wait,
    )


_SHIELD: ThreadPoolExecutor | None = None
_SHIELD_LOCK = threading.Lock()


def shielded(fn: Callable[[], T], on_interrupt: Callable[[T], None]) -> T:
    """Run a store call so that Ctrl-C cannot lose its outcome.

    The call runs on a helper thread. If the caller is interrupted while
    waiting, it still waits for the call to finish, hands the result to
    ``on_interrupt`` (e.g. to record claims that committed as not started) and
    re-raises - otherwise a claim could commit with nobody left to run it.
    """
    global _SHIELD
    with _SHIELD_LOCK:
        if _SHIELD is None:
            _SHIELD = ThreadPoolExecutor(4, thread_name_prefix="nbrunbook-claim")
        pool = _SHIELD
    fut = pool.submit(fn)
    try:
        return fut.result()
    except BaseException as exc:
        if fut.done() and fut.exception() is exc:
            raise  # the call itself failed
        try:
            result = fut.result()
        except BaseException:  # noqa: BLE001 - the call failed too: nothing committed to clean up
            raise exc from None
        on_interrupt(result)
        raise


class _BusyWaiter(threading.Thread):
    """Waits for branches another owner is running, and tells the driver when they settle."""

    def __init__(self, store: Store, instance_id: str, post: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__(name="nbrunbook-branch-wait", daemon=True)
        self.store = store
        self.instance_id = instance_id
        self.post = post
        self.items: queue.SimpleQueue[tuple[int, str, float] | None] = queue.SimpleQueue()
        self.stopped = False

    def add(self, index: int, path: str, deadline: float) -> None:
        self.items.put((index, path, deadline))

    def stop(self) -> None:
        self.stopped = True
        self.items.put(None)

    def run(self) -> None:
        waiting: list[tuple[int, str, float]] = []
        try:
            self._loop(waiting)
        except Exception as exc:  # noqa: BLE001 - e.g. the store closed: fail what we waited for
            while True:
                for index, _, _ in waiting:
                    self.post(("busy_failed", index, exc))
                try:
                    item = self.items.get_nowait()
                except queue.Empty:
                    return
                waiting = [item] if item is not None else []

    def _loop(self, waiting: list[tuple[int, str, float]]) -> None:
        while not self.stopped:
            block = not waiting
            try:
                while True:
                    item = self.items.get(block=block, timeout=None)
                    if item is None:
                        return
                    waiting.append(item)
                    block = False
            except queue.Empty:
                pass
            still = []
            for index, path, deadline in waiting:
                state = self.store.step(self.instance_id, path)
                if state is None or state.status != "running":
                    self.post(("ready", index))
                elif time.monotonic() > deadline:
                    self.post(("busy_timeout", index, state))
                else:
                    still.append((index, path, deadline))
            waiting[:] = still
            if waiting:
                index, path, deadline = waiting[0]
                self.store.wait(self.instance_id, path, timeout=max(0.0, min(1.0, deadline - time.monotonic())))


class FanOut:
    """One ``rb.map`` / ``rb.parallel`` call in flight, driven by the calling thread."""

    def __init__(
        self,
        parent: StepContext,
        store: Store,
        label: str,
        paths: list[str],
        calls: list[Call],
        options: BranchOptions,
        *,
        executor: Executor | str | None,
        max_workers: int | None,
    ) -> None:
        self.parent = parent
        self.store = store
        self.label = label
        self.paths = paths
        self.calls = calls
        self.opts = options
        n = len(calls)
        self.results: list[Any] = [None] * n
        self.errors: dict[int, BaseException] = {}
        self.keys: list[str | None] = [None] * n  # step keys, once claimed or found
        self._state = [_UNCLAIMED] * n
        self._claims: dict[int, Claim] = {}
        self._futures: dict[int, Future[Any]] = {}  # process executors only
        self._records: list[tuple[int, Future[Any]]] = []
        self._lock = threading.Lock()
        self._cancelled = False
        self._q: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._waiter: _BusyWaiter | None = None
        self._leases: heartbeat.LeaseGroup | None = None
        self._unresolved = n
        self._inflight = 0
        self._next = 0
        self._reclaim: list[int] = []
        self._owned = not isinstance(executor, Executor)
        self._pool: Any
        if isinstance(executor, Executor):
            self._pool = executor
        elif executor == "process":
            self._pool = executors.process_pool(n, max_workers)
        else:
            self._pool = executors.ThreadWorkers(executors.default_threads(n, max_workers))
        self._threads = executors.runs_in_process(self._pool)
        self._workers = max(1, getattr(self._pool, "size", 0) or getattr(self._pool, "_max_workers", 0) or 1)

    # ------------------------------------------------------------- driving

    def run(self) -> list[Any]:
        """Run every branch; return results in order or raise (see ``rb.map``)."""
        started = time.monotonic()
        try:
            while self._unresolved:
                self._feed(started)
                if not self._unresolved:
                    break
                try:
                    msg = self._q.get(timeout=_POLL)
                except queue.Empty:
                    continue
                self._handle(msg)
                while True:  # take everything already queued before feeding again
                    try:
                        msg = self._q.get_nowait()
                    except queue.Empty:
                        break
                    self._handle(msg)
        except BaseException:
            self._abort()
            if self._leases is not None:
                self._leases.release_when_empty()  # branches still running keep their leases
            raise
        finally:
            if self._waiter is not None:
                self._waiter.stop()
        if self._leases is not None:
            self._leases.release()
        if self._owned:
            self._pool.shutdown(wait=True)
        self._settle()
        if self.errors:
            raise self._group()
        return self.results

    def _window(self, started: float) -> int:
        done = len(self.results) - self._unresolved
        by_rate = int(done / max(time.monotonic() - started, 1e-3) * _WINDOW_SECONDS)
        return max(_MIN_WINDOW, 2 * self._workers, min(_MAX_WINDOW, by_rate))

    def _feed(self, started: float) -> None:
        n = len(self.calls)
        while self._reclaim or self._next < n:
            window = self._window(started)
            if self._inflight > window // 2:
                return
            take = self._reclaim[: max(window - self._inflight, 1)]
            del self._reclaim[: len(take)]
            while self._next < n and len(take) < window - self._inflight:
                take.append(self._next)
                self._next += 1
            claims = shielded(lambda: self._claim_chunk(take), lambda claims: None)  # noqa: B023 - called at once
            for i, claim in zip(take, claims, strict=True):
                self._on_claim(i, claim)

    def _claim_chunk(self, take: list[int]) -> list[Claim]:
        """Claim ``take`` in one transaction (on the shield thread, see :func:`shielded`).

        The claims are noted here, before the driver sees them, so that an
        interrupted driver still records every committed claim (``_abort``).
        """
        claims = self.store.claim_many(
            self.parent.instance_id,
            [self.paths[i] for i in take],
            owner=self.parent.owner,
            run_id=self.parent.run_id,
            lease=self.opts.lease,
            retry_safe=self.opts.retry_safe,
            max_attempts=self.opts.max_attempts,
        )
        with self._lock:
            for i, claim in zip(take, claims, strict=True):
                self._claims[i] = claim
        return claims

    def _on_claim(self, i: int, claim: Claim) -> None:
        key = self.keys[i] = claim.step_key
        outcome = claim.outcome
        if outcome is ClaimOutcome.CLAIMED:
            crashpoint("after_claim")
            self._submit(i, key, claim)
        elif outcome is ClaimOutcome.DONE:
            try:
                self._resolve(i, recorded_result(self.store, claim, self.opts.allow_pickle))
            except Exception as exc:  # noqa: BLE001 - a recorded value that cannot be read fails this branch
                self._resolve(i, error=exc)
        elif outcome is ClaimOutcome.BUSY:
            if self._waiter is None or not self._waiter.is_alive():
                self._waiter = _BusyWaiter(self.store, self.parent.instance_id, self._q.put)
                self._waiter.start()
            self._waiter.add(i, self.paths[i], time.monotonic() + self.opts.busy_timeout)
        else:
            self._resolve(i, error=refusal(claim))

    def _submit(self, i: int, key: str, claim: Claim) -> None:
        if self._leases is None:
            self._leases = heartbeat.hold_group(
                self.store, self.parent.instance_id, owner=self.parent.owner, lease=self.opts.lease
            )
        self._leases.add(key, claim.state.epoch)
        self._state[i] = _SUBMITTED
        self._inflight += 1
        if self._threads:
            # A context copy per branch: one Context cannot be entered by two threads,
            # and a branch's own context changes must not leak into the next one.
            self._pool.submit(contextvars.copy_context().run, self._thread_branch, i, key, claim)
            return
        snapshot = {
            "instance_id": self.parent.instance_id,
            "step_key": key,
            "invocation": claim.state.invocation,
            "attempt": claim.state.attempt,
            "epoch": claim.state.epoch,
            "idempotency_key": claim.idempotency_key,
            "params": dict(self.parent.params),
            "run_id": self.parent.run_id,
            "owner": self.parent.owner,
        }
        call = self.calls[i]
        try:
            fut = self._pool.submit(executors.call_in_worker, executors.ship(call.fn, call.args, call.kwargs), snapshot)
        except Exception as exc:  # noqa: BLE001 - e.g. the function does not pickle: this branch fails
            self._q.put(self._record_error(i, key, claim, exc))
            return
        self._futures[i] = fut
        fut.add_done_callback(lambda f: self._process_done(i, key, claim, f))

    def _handle(self, msg: tuple[Any, ...]) -> None:
        kind, i = msg[0], msg[1]
        if kind == "ok":
            self._inflight -= 1
            self._resolve(i, msg[2])
        elif kind == "err":
            self._inflight -= 1
            exc = msg[2]
            if not isinstance(exc, Exception):
                raise exc  # KeyboardInterrupt / SystemExit inside a branch: stop the fan-out
            self._resolve(i, error=exc)
        elif kind == "ready":
            self._reclaim.append(i)
        elif kind == "busy_failed":
            self._resolve(i, error=msg[2])
        elif kind == "busy_timeout":
            state: StepState = msg[2]
            owner = state.owner or "another owner"
            self._resolve(i, error=StepBusy(state.instance_id, state.step_key, owner, state.claimed_at or 0.0))

    def _resolve(self, i: int, value: Any = None, *, error: BaseException | None = None) -> None:
        if error is not None:
            self.errors[i] = error
        else:
            self.results[i] = value
        self._unresolved -= 1

    # ------------------------------------------------------------ branches

    def _thread_branch(self, i: int, key: str, claim: Claim) -> None:
        """Run one branch on a worker thread, record it, tell the driver (always, once)."""
        msg: tuple[Any, ...] | None = ("err", i, RuntimeError(f"branch {key}: the branch runner failed"))
        try:
            with self._lock:
                if self._cancelled:
                    msg = None  # never started: the driver records it as such
                    return
                self._state[i] = _STARTED
            call = self.calls[i]
            token = bind(branch_context(self.parent, claim, self.store))
            try:
                value = call.fn(*call.args, **call.kwargs)
            except BaseException as exc:  # noqa: BLE001 - recorded, then handed to the driver
                msg = self._record_error(i, key, claim, exc)
                return
            finally:
                unbind(token)
            msg = self._record_value(i, key, claim, value)
        finally:
            if msg is not None:
                self._q.put(msg)

    def _process_done(self, i: int, key: str, claim: Claim, fut: Future[Any]) -> None:
        if fut.cancelled():
            return  # cancelled before it started: the driver records it
        exc = fut.exception()
        if exc is not None:
            self._q.put(self._record_error(i, key, claim, exc))
        else:
            self._q.put(self._record_value(i, key, claim, fut.result()))

    def _record_value(self, i: int, key: str, claim: Claim, value: Any) -> tuple[Any, ...]:
        try:
            encoded = values.encode(value, name=f"result of {key}", allow_pickle=self.opts.allow_pickle)
        except Exception as exc:  # noqa: BLE001 - not recordable: the branch fails with the reason
            return self._record_error(i, key, claim, exc)
        self._done_with(i, key)
        crashpoint("before_record")
        try:
            fut = self.store.complete(
                self.parent.instance_id,
                key,
                owner=self.parent.owner,
                epoch=claim.state.epoch,
                run_id=self.parent.run_id,
                values={"result": encoded},
                wait=False,
            )
        except Exception as exc:  # noqa: BLE001 - the store refused: the branch did not finish
            return ("err", i, exc)
        assert isinstance(fut, Future)
        self._records.append((i, fut))
        return ("ok", i, value)

    def _record_error(self, i: int, key: str, claim: Claim, exc: BaseException) -> tuple[Any, ...]:
        self._done_with(i, key)
        crashpoint("before_record")
        try:
            fut = self.store.fail(
                self.parent.instance_id,
                key,
                owner=self.parent.owner,
                epoch=claim.state.epoch,
                run_id=self.parent.run_id,
                error=error_record(exc),
                wait=False,
            )
        except Exception as store_exc:  # noqa: BLE001 - report the branch's own error, note the store's
            exc.add_note(f"recording this failure also failed: {store_exc}")
        else:
            assert isinstance(fut, Future)
            self._records.append((i, fut))
        return ("err", i, exc)

    def _done_with(self, i: int, key: str) -> None:
        """The branch's outcome is being recorded: no more renewals, no cancelling."""
        with self._lock:
            self._state[i] = _RECORDED
        if self._leases is not None:
            self._leases.discard(key)

    # -------------------------------------------------------------- ending

    def _abort(self) -> None:
        """Ctrl-C (or a store error) in the driver: branches not started are recorded
        as failed-not-started so a retry runs them; running ones record themselves."""
        with self._lock:
            self._cancelled = True
            # Claimed and not started: submitted to a worker that has not begun it,
            # or committed while the driver was being interrupted.
            pending = [
                i
                for i, claim in self._claims.items()
                if claim.outcome is ClaimOutcome.CLAIMED and self._state[i] in (_UNCLAIMED, _SUBMITTED)
            ]
            for i in pending:
                self._state[i] = _CANCELLED
        if not self._threads:
            kept = [i for i in pending if i in self._futures and not self._futures[i].cancel()]
            pending = [i for i in pending if i not in kept]
            with self._lock:
                for i in kept:
                    self._state[i] = _SUBMITTED  # running in a worker process: its callback records it
        if self._owned:
            if self._threads:
                self._pool.shutdown(wait=False)
            else:
                self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            for i in pending:
                claim = self._claims[i]
                if self._leases is not None:
                    self._leases.discard(claim.step_key)
                record_not_started(self.store, claim, self.parent, wait=False)
            self.store.flush()
        except Exception:  # noqa: BLE001 - the original interruption matters more
            pass

    def _settle(self) -> None:
        """Wait until every recorded outcome is durable; a fenced one is an error."""
        for i, fut in self._records:
            try:
                fut.result()
            except RunbookError as exc:  # StepFenced: someone else's outcome stands
                self.errors[i] = exc

    def _group(self) -> ExceptionGroup:
        failed = sorted(self.errors)
        names = [self.keys[i] or self.paths[i] for i in failed]
        excs: list[Exception] = []
        for i, name in zip(failed, names, strict=True):
            exc = self.errors[i]
            assert isinstance(exc, Exception)
            exc.add_note(f"in branch {name}")
            excs.append(exc)
        shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
        return ExceptionGroup(f"{self.label}: {len(failed)} of {len(self.calls)} branches failed: {shown}", excs)
