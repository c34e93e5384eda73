"""The run-once cell guard (DESIGN.md §3, §5).

Three hooks, all public IPython API present in IPython 8 and 9:

* ``pre_run_cell(info)`` decides, before any user code runs: identify the
  cell (``info.cell_id``, else manifest order + source hash), then claim it in
  the store (``always``/``parameters`` cells are not claimed). ``DONE`` ->
  skip; ``BUSY`` -> wait visibly, then look again; ``INTERRUPTED``,
  ``EXHAUSTED``, ``ORDER`` and store errors -> refuse. Any failure in the hook
  itself also refuses the cell: the guard fails closed.
* An AST transformer replaces the body of a skipped or refused cell with one
  call, ``run_pending(token)``, which replays the recorded outputs (and
  returns the recorded result, so it shows as ``Out[n]``) or raises the
  refusal. It never raises itself: if building the call fails, the body
  becomes ``pass``.
* ``post_run_cell(result)`` records the outcome of a claimed cell from the
  ``ExecutionResult``: ``complete`` with outputs and saved values, or ``fail``
  with the error. An error after a requested interrupt (SIGINT arrived while
  the cell ran: see :mod:`.interrupts`) ends the step ``interrupted``, since
  the cell was cut off at an unknown point; a ``KeyboardInterrupt`` the cell
  raised itself is an ordinary failure. Commits are submitted with
  ``wait=False`` so they overlap the next cell; a fenced or failed commit is
  reported at the next cell.

pre and post are paired by the identity of ``result.info``. A ``pre`` while
another top-level cell of the same execute request is in progress is a
nested ``run_cell`` (``%%capture``...) and is ignored, as are silent
executions (IPython fires no events for them) and executions without
``store_history``. Two IPython paths hand ``post_run_cell`` no matching info:
a cancelled ``await`` cell (``result`` is ``None``) and a run that raised
outside user code (a fresh ``ExecutionInfo``); both are matched to the top
frame.
"""

from __future__ import annotations

import _signal
import ast
import itertools
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from nbrunbook.engine.errors import (
    AttemptsExhausted,
    OrderViolation,
    RunbookError,
    StepBusy,
    StepFenced,
    StepInterrupted,
    StoreUnavailable,
)
from nbrunbook.engine.faults import crashpoint
from nbrunbook.engine.model import GUARDED, PARAMETERS, Claim, ClaimOutcome

# Only what loading needs is imported here; the modules a running session
# uses (capture, replay, saved, cells, the step context, the heartbeat) are
# imported on first use, so `%load_ext nbrunbook` stays cheap.
if TYPE_CHECKING:
    from nbrunbook.engine.heartbeat import Lease

    from .capture import OutputRecorder
    from .interrupts import InterruptWatch
    from .session import Session, Target

# token -> what the replaced body of a skipped/refused cell does
_PENDING: dict[int, Callable[[], Any]] = {}
_TOKENS = itertools.count(1)


def run_pending(token: int) -> Any:
    """The body of a skipped or refused cell (called from code the transformer wrote)."""
    action = _PENDING.pop(token, None)
    return action() if action is not None else None


def _render(exc: BaseException) -> BaseException:
    """Show a refusal as one clear line instead of a traceback into the guard."""
    line = f"\x1b[0;31m{type(exc).__name__}\x1b[0m: {exc}"
    try:
        exc._render_traceback_ = lambda: [line]  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return exc


def _guard_failed(exc: BaseException) -> RunbookError:
    from .errors import GuardFailed

    return GuardFailed(exc)


# ``signal.signal`` wraps this C function to map handlers to enum members; for a
# function handler that mapping fails by raising inside ``enum``: ~10 us a swap
# here, four swaps per claimed cell, two per skipped one. The C function takes
# and returns the same handlers without it.
_set_handler: Callable[[int, Any], Any] = getattr(_signal, "signal", signal.signal)


@contextmanager
def _sigint_deferred() -> Iterator[dict[str, bool]]:
    """Hold SIGINT during a store call so a claim is never half-known; say if one came."""
    state = {"fired": False}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum: int, frame: Any) -> None:
        state["fired"] = True

    try:
        previous = _set_handler(signal.SIGINT, handler)
    except (ValueError, OSError):
        yield state
        return
    try:
        yield state
    finally:
        _set_handler(signal.SIGINT, previous)


class Frame:
    """One pre_run_cell, waiting for its post_run_cell."""

    __slots__ = (
        "claim",
        "ctx_token",
        "error",
        "expects_error",
        "ignored",
        "info",
        "kind",
        "lease",
        "msg_id",
        "names",
        "recorder",
        "replay",
        "target",
        "transformed",
        "watch",
    )

    def __init__(self, info: Any, msg_id: str | None, ignored: bool = False) -> None:
        self.info = info
        self.msg_id = msg_id
        self.ignored = ignored
        self.target: Target | None = None
        self.claim: Claim | None = None
        self.kind = ""
        self.error: BaseException | None = None
        self.expects_error = False
        self.replay: Callable[[], Any] | None = None
        self.recorder: OutputRecorder | None = None
        self.ctx_token: Any = None
        self.lease: Lease | None = None
        self.names: list[str] = []
        self.transformed = False
        self.watch: InterruptWatch | None = None


def _pending_call(token: int) -> ast.Module:
    """``__import__("nbrunbook.kernel_ext.guard", fromlist=["run_pending"]).run_pending(token)`` as a module.

    Built node by node: parsing the same text costs three times as much
    (~55 vs ~17 us here), on every skipped cell.
    """
    loc: dict[str, Any] = {"lineno": 1, "col_offset": 0, "end_lineno": 1, "end_col_offset": 0}
    importer = ast.Call(
        func=ast.Name(id="__import__", ctx=ast.Load(), **loc),
        args=[ast.Constant(value=__name__, **loc)],
        keywords=[
            ast.keyword(
                arg="fromlist", value=ast.List(elts=[ast.Constant("run_pending", **loc)], ctx=ast.Load(), **loc), **loc
            )
        ],
        **loc,
    )
    call = ast.Call(
        func=ast.Attribute(value=importer, attr="run_pending", ctx=ast.Load(), **loc),
        args=[ast.Constant(value=token, **loc)],
        keywords=[],
        **loc,
    )
    return ast.Module(body=[ast.Expr(value=call, **loc)], type_ignores=[])


def _lost_outcome(session: Session) -> StoreUnavailable | None:
    """The store's error that kept an outcome of this session from being recorded, if any."""
    if isinstance(session.lost_outcome, StoreUnavailable):
        return session.lost_outcome
    for fut, _ in session.pending:
        try:
            exc = fut.exception(timeout=30)
        except TimeoutError:
            continue
        if isinstance(exc, StoreUnavailable):
            return exc
    return None


class _Transformer(ast.NodeTransformer):
    """Registered in ``shell.ast_transformers``; delegates to the guard, never raises."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def visit(self, node: ast.AST) -> Any:
        try:
            return self.guard.transform(node)
        except Exception:  # noqa: BLE001 - IPython would unregister us; fail closed instead
            return self.guard.transform_failed(node)


class Guard:
    """Holds the hooks for one shell and the attached :class:`Session` (if any)."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.session: Session | None = None
        self.transformer = _Transformer(self)
        self._stack: list[Frame] = []
        self._next: Frame | None = None
        self._registered = False
        #: Called first in every pre_run_cell, attached or not (set by the extension): one hook, not two.
        self.before_cell: Callable[[Any], None] | None = None

    # --------------------------------------------------------- registration

    def register(self) -> None:
        """Install the hooks."""
        if self._registered:
            return
        self.shell.events.register("pre_run_cell", self.pre_run_cell)
        self.shell.events.register("post_run_cell", self.post_run_cell)
        self.shell.ast_transformers.append(self.transformer)
        self._registered = True

    def unregister(self) -> None:
        """Remove every hook and detach (what ``%unload_ext`` does)."""
        try:
            self.detach()
        finally:
            for event, fn in (("pre_run_cell", self.pre_run_cell), ("post_run_cell", self.post_run_cell)):
                try:
                    self.shell.events.unregister(event, fn)
                except ValueError:
                    pass
            while self.transformer in self.shell.ast_transformers:
                self.shell.ast_transformers.remove(self.transformer)
            self._registered = False

    def attach(self, session: Session) -> None:
        """Make ``session`` the attached instance (detaching the previous one)."""
        self.detach()
        self.session = session
        self.shell.user_ns.update(session.params)

    def settle(self) -> None:
        """Wait for outcomes in flight (and report failed ones), so reads see them."""
        if self.session is not None:
            self._report_pending(self.session, block=True)

    def detach(self) -> Session | None:
        """Detach the instance: outcomes in flight are committed, the store released."""
        session, self.session = self.session, None
        # The cell is cut off from its store: its outcome is unknown, as after a shutdown.
        self._abandon(session, "the instance was detached while the cell ran", cut_off=True)
        self._next = None
        if session is not None:
            self._report_pending(session, block=True)
            session.close()
        return session

    # ------------------------------------------------------------ messages

    def warn(self, text: str) -> None:
        """A notice for the person, in the running cell's stderr."""
        try:
            sys.stderr.write(f"nbrunbook: {text}\n")
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass

    def _request(self, info: Any) -> tuple[str | None, dict[str, Any]]:
        """(msg_id, metadata) of the execute_request being handled, if in a kernel."""
        meta = getattr(info, "cell_meta", None)  # IPython 9 passes it along
        kernel = getattr(self.shell, "kernel", None)
        parent: Any = {}
        if kernel is not None:
            try:
                parent = kernel.get_parent("shell")
            except (AttributeError, TypeError, LookupError):
                parent = getattr(kernel, "_parent_header", {}) or {}
        if not isinstance(parent, dict):
            parent = {}
        if not isinstance(meta, dict):
            meta = parent.get("metadata") or {}
        msg_id = (parent.get("header") or {}).get("msg_id")
        return msg_id, meta if isinstance(meta, dict) else {}

    # ------------------------------------------------------------ pre_run_cell

    def pre_run_cell(self, info: Any) -> None:
        """Decide claim / skip / wait / refuse before the cell's code runs."""
        if self.before_cell is not None:
            self.before_cell(info)  # the extension's own pre-cell work (a quiet repeated %load_ext)
        session = self.session
        if session is None:
            return
        frame: Frame | None = None
        try:
            msg_id, meta = self._request(info)
            if self._stack:
                if msg_id is None or self._stack[0].msg_id == msg_id:
                    self._stack.append(Frame(info, msg_id, ignored=True))  # nested run_cell
                    return
                self._abandon(session, "post_run_cell never came for this cell")
            frame = Frame(info, msg_id)
            self._stack.append(frame)
            if getattr(info, "silent", False) or not getattr(info, "store_history", True):
                frame.ignored = True
                return
            # ipykernel resets this flag only for sync cells: left over from an earlier cell's failed
            # display, it would turn a top-level `await` cell's reply (and so its outcome) into an error.
            if getattr(self.shell, "_last_traceback_during_displayhook", False):
                self.shell._last_traceback_during_displayhook = False
            self._next = frame
            self._decide(session, frame, info, meta)
        except BaseException as exc:  # noqa: BLE001 - fail closed: the body must not run unguarded
            if frame is None:
                frame = Frame(info, None)
                self._stack.append(frame)
            frame.ignored = False
            frame.error = _render(exc if isinstance(exc, (RunbookError, KeyboardInterrupt)) else _guard_failed(exc))
            self._next = frame

    def _decide(self, session: Session, frame: Frame, info: Any, meta: dict[str, Any]) -> None:
        self._report_pending(session, block=False)
        raw = info.raw_cell or ""
        cell_id = getattr(info, "cell_id", None) or meta.get("cellId")
        tags = meta.get("tags")
        tag_tuple = tuple(str(t) for t in tags) if isinstance(tags, list) else None
        transform = getattr(getattr(self.shell, "input_transformer_manager", None), "transform_cell", None)
        target, notes = session.identify(raw, cell_id if isinstance(cell_id, str) else None, tag_tuple, transform)
        for note in notes:
            self.warn(note)
        if target is None:
            return
        frame.target = target
        frame.kind = target.spec.kind
        for problem in target.spec.problems:
            if session.notice_once(f"problem:{target.cell_id}:{problem}"):
                self.warn(f"{target.label}: {problem}")
        from .cells import RAISES_EXCEPTION_TAG, SKIP_EXECUTION_TAG

        request_tags = tag_tuple or ()
        if target.spec.kind != GUARDED or target.path is None or SKIP_EXECUTION_TAG in request_tags:
            return  # not a step (a `skip-execution` cell is one nbclient never runs)
        # The request's tags count too: the runner sends them, the pinned manifest may predate them.
        frame.expects_error = target.spec.raises_exception or RAISES_EXCEPTION_TAG in request_tags
        session.last_cell = target.cell_id
        self._claim(session, frame, target)

    def _claim(self, session: Session, frame: Frame, target: Target) -> None:
        store = session.store
        opts = session.options
        iid = session.instance_id
        path = target.path
        assert path is not None and target.cell_id is not None
        deadline: float | None = None
        reopened = reloaded = False
        while True:
            with _sigint_deferred() as sig:
                claim = store.claim(
                    iid,
                    path,
                    owner=session.owner,
                    run_id=session.run_id,
                    token=f"{session.run_id}:{next(_TOKENS)}",
                    lease=opts.lease,
                    retry_safe=target.spec.retry_safe,
                    rerun_interrupted=opts.rerun_interrupted,
                    requires=target.requires,
                    max_attempts=opts.max_attempts,
                    with_values=True,  # a skip needs them: one request instead of two
                )
            outcome = claim.outcome
            if outcome == ClaimOutcome.CLAIMED:
                frame.claim = claim
                crashpoint("after_claim")
                self._report_pending(session, block=False)
                if sig["fired"]:
                    frame.error = KeyboardInterrupt()
                    return
                self._begin(session, frame, claim)
                return
            if sig["fired"]:
                frame.error = KeyboardInterrupt()
                return
            state = claim.state
            if outcome == ClaimOutcome.DONE:
                from .record import read_record

                values = claim.values or {}
                record = read_record(values)
                recorded_hash = record.get("source_hash")
                note = ""
                if recorded_hash and recorded_hash != target.live_hash:
                    if opts.on_changed == "rerun" and not reopened:
                        store.rerun(iid, path, owner=session.owner, run_id=session.run_id, reason="source changed")
                        reopened = True
                        continue
                    if opts.on_changed == "error":
                        from .errors import SourceChanged

                        frame.error = _render(
                            SourceChanged(iid, claim.step_key, target.cell_id, recorded_hash, target.live_hash)
                        )
                        return
                    note = (
                        f"{target.label} changed since it ran: its recorded run is shown, the new code did not "
                        f"run (to run it: %runbook rerun {target.cell_id})"
                    )
                from .replay import skipper

                ns = self.shell.user_ns
                frame.replay = skipper(self.shell, ns, target, claim.state, session.run_id, values, record, note)
                return
            if outcome == ClaimOutcome.BUSY:
                if state.owner == session.owner and not any(
                    f.claim is not None and f.claim.step_key == claim.step_key for f in self._stack
                ):
                    # Our own claim whose outcome was lost (an interrupt at the wrong moment): fail it, go on.
                    store.fail(
                        iid,
                        claim.step_key,
                        owner=session.owner,
                        epoch=state.epoch,
                        run_id=session.run_id,
                        error={"type": "OutcomeLost", "message": "the kernel lost this cell's outcome"},
                    )
                    continue
                now = time.monotonic()
                if deadline is None:
                    deadline = now + opts.wait_timeout
                    since = time.strftime("%H:%M:%S", time.localtime(state.claimed_at or time.time()))
                    from .replay import who

                    self.warn(
                        f"{target.label} is running in {who(state.owner)} since {since} "
                        f"(run {state.run_id}); waiting up to {opts.wait_timeout:g} s for it to finish "
                        "(interrupt the kernel to stop waiting)"
                    )
                remaining = deadline - now
                if remaining <= 0:
                    frame.error = _render(StepBusy(iid, claim.step_key, state.owner or "?", state.claimed_at or 0.0))
                    return
                try:
                    store.wait(iid, path, timeout=remaining)
                except KeyboardInterrupt:
                    frame.error = _render(KeyboardInterrupt(f"stopped waiting for {target.label}"))
                    return
                continue
            if outcome == ClaimOutcome.INTERRUPTED:
                err = StepInterrupted(iid, claim.step_key, cell=target.cell_id)
                if opts.mode == "interactive":
                    err.args = (
                        f"{err} - or here: %runbook resolve {target.cell_id} --rerun|--done|--skip "
                        "(or mark the cell `#| runbook: retry-safe`)",
                    )
                frame.error = _render(err)
                return
            if outcome == ClaimOutcome.EXHAUSTED:
                frame.error = _render(AttemptsExhausted(iid, claim.step_key, state.attempt, claim.max_attempts))
                return
            if outcome == ClaimOutcome.ORDER:
                if not reloaded:
                    # The file may have been saved since the manifest was pinned (a cell that
                    # became `always`, a removed cell): re-pin once and look again.
                    reloaded = True
                    notes: list[str] = []
                    if session.reload_if_changed(notes):
                        for note in notes:
                            self.warn(note)
                        target = session.retarget(target)
                        continue
                missing = [session.label(p) for p in claim.missing]
                # An earlier cell still "running" may be one whose outcome the store could not take
                # (a full disk that has room again): that is the error to show, not the order.
                lost = _lost_outcome(session)
                frame.error = _render(lost or OrderViolation(iid, target.label, missing))
                return
            raise RuntimeError(f"unexpected claim outcome {outcome!r}")

    def _begin(self, session: Session, frame: Frame, claim: Claim) -> None:
        """The cell is ours: bind its context, record its outputs, keep its lease."""
        from nbrunbook.engine import context as step_context
        from nbrunbook.engine import heartbeat

        from .capture import OutputRecorder

        state = claim.state
        ctx = step_context.StepContext(
            instance_id=session.instance_id,
            step_key=claim.step_key,
            invocation=state.invocation,
            attempt=state.attempt,
            epoch=state.epoch,
            idempotency_key=claim.idempotency_key,
            params=session.params,
            run_id=session.run_id,
            owner=session.owner,
            store=session.store,
            options={
                "lease": session.options.lease,
                "max_attempts": session.options.max_attempts,
                # The cell's branches are as retry-safe as the cell, or as the run was told to be.
                "retry_safe": frame.target is not None
                and (frame.target.spec.retry_safe or session.options.rerun_interrupted),
            },
        )
        frame.ctx_token = step_context.bind(ctx)
        step_context.set_cell(ctx)
        frame.lease = heartbeat.hold(
            session.store,
            session.instance_id,
            claim.step_key,
            owner=session.owner,
            epoch=state.epoch,
            lease=session.options.lease,
        )
        recorder = OutputRecorder(session.options.output_limit)
        recorder.start(self.shell, frame.msg_id)
        frame.recorder = recorder
        from .interrupts import InterruptWatch

        # Last, so nothing above runs with it: from here a SIGINT means the cell was cut off.
        frame.watch = InterruptWatch()
        frame.watch.start()

    # ------------------------------------------------------------ transformer

    def transform(self, node: ast.AST) -> ast.AST:
        """Replace a skipped/refused cell's body; note a claimed cell's assigned names."""
        frame, self._next = self._next, None
        if frame is None or frame.transformed:
            return node
        frame.transformed = True
        if frame.error is not None or frame.replay is not None:
            token = next(_TOKENS)
            _PENDING[token] = self._body(frame)
            call = _pending_call(token)
            if frame.error is None and isinstance(node, ast.Module):
                # A skipped cell's top-level imports run again: they have no side
                # effects worth guarding, and later cells need the names they bind.
                imports = [
                    n
                    for n in node.body
                    if isinstance(n, ast.Import) or (isinstance(n, ast.ImportFrom) and n.module != "__future__")
                ]
                call.body = [*imports, *call.body]
            return call
        if frame.claim is not None:
            from .cells import assigned_names

            try:
                frame.names = assigned_names(node)
            except (RecursionError, AttributeError, TypeError):
                frame.names = []
        return node

    def transform_failed(self, node: ast.AST) -> ast.AST:
        """The transformer broke: never let a skipped or refused body run."""
        frame = self._next
        self._next = None
        if frame is not None and (frame.error is not None or frame.replay is not None):
            return ast.Module(body=[ast.Pass()], type_ignores=[])
        return node

    def _body(self, frame: Frame) -> Callable[[], Any]:
        def body() -> Any:
            if frame.error is not None:
                raise frame.error
            assert frame.replay is not None
            return frame.replay()

        return body

    # ----------------------------------------------------------- post_run_cell

    def post_run_cell(self, result: Any) -> None:
        """Record the outcome of a claimed cell."""
        if not self._stack:
            return
        frame = self._match(result)
        if frame is None or frame.ignored:
            return
        session = self.session
        if frame.watch is not None:
            # Before the deferral below swaps handlers: the cell is over, a SIGINT now cuts nothing off.
            frame.watch.stop()
        try:
            # A skip or a refusal has no outcome to protect from an interrupt.
            with _sigint_deferred() if frame.claim is not None else nullcontext():
                self._finish(session, frame, result)
        except Exception as exc:  # noqa: BLE001 - say so; the step stays running and is released later
            self.warn(f"could not record the outcome of {frame.target.label if frame.target else 'the cell'}: {exc}")

    def _match(self, result: Any) -> Frame | None:
        info = getattr(result, "info", None) if result is not None else None
        stack = self._stack
        for i in range(len(stack) - 1, -1, -1):
            if stack[i].info is info:
                frame = stack[i]
                for leftover in stack[i + 1 :]:
                    self._cleanup(leftover)
                del stack[i:]
                return frame
        if result is None:
            return stack.pop()  # an `await` cell cancelled by an interrupt
        raw = getattr(info, "raw_cell", None)
        if not raw or raw.isspace():
            return None  # an empty cell: IPython fires no pre_run_cell for it
        if stack[-1].info is not None and getattr(stack[-1].info, "raw_cell", None) == raw:
            return stack.pop()  # the runner raised outside user code: IPython made a fresh info
        return None

    def _finish(self, session: Session | None, frame: Frame, result: Any) -> None:
        if self._next is frame:
            self._next = None
        claim = frame.claim
        fenced = self._cleanup(frame)
        if session is None:
            return
        self._report_pending(session, block=True)
        if frame.kind == PARAMETERS:
            # Papermill semantics: the instance's parameters override the cell's defaults.
            self.shell.user_ns.update(session.params)
        if claim is None:
            return
        target = frame.target
        assert target is not None
        from .outcome import FAILED, Outcome, decide, reply_error

        if frame.error is not None:
            outcome = Outcome(FAILED, frame.error)  # a SIGINT during the claim: the body never ran
        else:
            # The error the execute reply carries, not whether our code path saw one: an error while
            # the result is displayed makes the reply an error too.
            error = reply_error(self.shell, result)
            # Cut off by a requested interrupt: the outcome is unknown (DESIGN.md §3). One the cell
            # raised itself (no SIGINT came) is an ordinary failure; one it caught is no error at all.
            requested = frame.watch is not None and frame.watch.requested
            outcome = decide(self.shell, error, interrupted=requested, raises_expected=frame.expects_error)
        if fenced is not None:
            self.warn(f"warning: {target.label}: {fenced}")
        from .record import record_outcome

        fut = record_outcome(
            self.shell, session, claim, target, frame.recorder, frame.names, outcome, result, self.warn
        )
        session.pending.append((fut, target.label))

    def _cleanup(self, frame: Frame) -> StepFenced | None:
        """Undo what pre_run_cell set up for a frame: capture, context, heartbeat."""
        fenced = None
        if frame.watch is not None:
            frame.watch.stop()
        if frame.recorder is not None:
            frame.recorder.stop()
        if frame.ctx_token is not None:
            from nbrunbook.engine import context as step_context

            try:
                step_context.unbind(frame.ctx_token)
            except ValueError:
                step_context.bind(None)  # post runs outside the asyncio task that bound it
            frame.ctx_token = None
            step_context.set_cell(None)
        if frame.lease is not None:
            frame.lease.release()
            fenced, frame.lease = frame.lease.fenced, None
        return fenced

    def _abandon(self, session: Session | None, why: str, *, cut_off: bool = False) -> None:
        """Drop frames whose post_run_cell will not come.

        Their claims end ``interrupted`` when the cell was cut off (a detach, a
        requested interrupt): its outcome is unknown. A lost pre/post pairing
        alone fails the claim (``OutcomeLost``), so the cell runs again.
        """
        for frame in reversed(self._stack):
            requested = frame.watch is not None and frame.watch.requested
            self._cleanup(frame)
            if frame.claim is not None and session is not None:
                interrupted = cut_off or requested
                try:
                    session.store.fail(
                        session.instance_id,
                        frame.claim.step_key,
                        owner=session.owner,
                        epoch=frame.claim.state.epoch,
                        run_id=session.run_id,
                        error={"type": "KeyboardInterrupt" if requested else "OutcomeLost", "message": why},
                        interrupted=interrupted,
                    )
                except RunbookError as exc:  # fenced meanwhile, or the store is gone: say so, go on
                    self.warn(f"could not record that {frame.claim.step_key} was abandoned: {exc}")
        self._stack.clear()

    def _report_pending(self, session: Session, *, block: bool) -> None:
        """Say which background commits failed (fenced outcomes included)."""
        if session.pending:
            from .record import report_pending

            report_pending(session, self.warn, block=block)
